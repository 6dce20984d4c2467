"""`up`'s restart budget: at most `limit` restarts of one service within any window."""

from __future__ import annotations

import signal

from tokenforge.stack import RestartBudget, describe_exit


def test_five_restarts_within_a_minute_are_allowed_and_the_sixth_is_not() -> None:
    budget = RestartBudget(limit=5, window_s=60.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [True] * 5
    assert budget.used() == 5
    assert budget.take(59.9) is False
    assert budget.used() == 5  # a refused restart spends nothing


def test_restarts_older_than_the_window_no_longer_count() -> None:
    budget = RestartBudget(limit=2, window_s=10.0)
    assert budget.take(0.0) and budget.take(5.0)
    assert budget.take(9.99) is False
    assert budget.take(10.0) is True  # the one at 0.0 is a full window old
    assert budget.take(14.99) is False  # 5.0 and 10.0 still count
    assert budget.take(15.0) is True


def test_a_budget_of_zero_never_restarts() -> None:
    assert RestartBudget(limit=0, window_s=1.0).take(0.0) is False


def test_an_exit_is_described_by_its_code_or_its_signal() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"
