"""Run estimates: low / expected / high per bucket, and every warning code."""

from __future__ import annotations

import pytest

from tokenforge.catalog import parse_catalog
from tokenforge.errors import TFError
from tokenforge.metering import core
from tokenforge.money import Bucket

W, C = Bucket.WALLET, Bucket.CREDIT


def make_book() -> core.PriceBook:
    def ch(cid: str, route: str) -> dict[str, str]:
        return {"id": cid, "route": route, "base_url": "http://127.0.0.1:1/v1", "api_key_env": "K"}

    def entry(cid: str, inp: str, out: str) -> dict[str, object]:
        return {"channel": cid, "upstream_model": cid, "price": {"input": inp, "output": out}}

    data = {
        "channels": [ch("cheap-a", "routed"), ch("cheap-b", "routed"), ch("direct", "direct")],
        "models": [
            # catalog order puts direct between the routed ones: auto must still try routed first
            {"name": "mini", "channels": [entry("cheap-a", "1.20", "4.80"), entry("direct", "0.15", "0.60"),
                                          entry("cheap-b", "1.60", "6.40")]},
            {"name": "big", "channels": [entry("cheap-b", "20", "80"), entry("cheap-a", "10", "40")]},
            {"name": "official", "channels": [entry("direct", "2.50", "10.00")]},
        ],
    }
    return core.PriceBook(parse_catalog(data, source="t.yaml", env={}))


BOOK = make_book()
# per call, 1000 input + 500 output tokens, in nano:
MINI_A = 1000 * 1200 + 500 * 4800  # 3_600_000
MINI_B = 1000 * 1600 + 500 * 6400  # 4_800_000
MINI_D = 1000 * 150 + 500 * 600  # 450_000
BIG_B = 1000 * 20_000 + 500 * 80_000  # 60_000_000 (the primary, but not the cheapest)
BIG_A = 1000 * 10_000 + 500 * 40_000  # 30_000_000
OFFICIAL = 1000 * 2500 + 500 * 10_000  # 7_500_000
RICH = {W: 10**15, C: 10**15}


def step(model: str, calls: int, name: str = "") -> core.PlanStep:
    return core.PlanStep(model, calls, 1000, 500, name)


def codes(est: core.RunEstimate) -> list[str]:
    return [w.code for w in est.warnings]


def test_routed_policy_low_expected_high() -> None:
    est = core.estimate_run(BOOK, [step("mini", 10), step("big", 3)], "routed", available_nano=RICH)
    assert est.buckets[W] == core.BucketEstimate(
        low_nano=10 * MINI_A + 3 * BIG_A,
        expected_nano=10 * MINI_A + 3 * BIG_B,
        high_nano=10 * MINI_B + 3 * BIG_B,
    )
    assert est.buckets[C] == core.BucketEstimate(0, 0, 0)
    assert "uses_credit" not in codes(est)


def test_direct_policy_goes_to_credit_only() -> None:
    est = core.estimate_run(BOOK, [step("mini", 10), step("official", 2)], "direct", available_nano=RICH)
    assert est.buckets[W] == core.BucketEstimate(0, 0, 0)
    assert est.buckets[C] == core.BucketEstimate(
        10 * MINI_D + 2 * OFFICIAL, 10 * MINI_D + 2 * OFFICIAL, 10 * MINI_D + 2 * OFFICIAL
    )


def test_auto_policy_counts_the_cross_bucket_fallback_in_high_only() -> None:
    est = core.estimate_run(BOOK, [step("mini", 10)], "auto", available_nano=RICH)
    assert est.buckets[W] == core.BucketEstimate(10 * MINI_A, 10 * MINI_A, 10 * MINI_B)
    # the direct channel is a last resort: credit pays only if every routed channel fails
    assert est.buckets[C] == core.BucketEstimate(0, 0, 10 * MINI_D)
    messages = [w.message for w in est.warnings if w.code == "fallback_may_cost_more"]
    assert len(messages) == 2
    assert "`cheap-b`" in messages[0] and "0.012000 CNY more" in messages[0]  # 10 × 1.2e-3
    assert "paid from the credit" in messages[1] and "0.004500 CREDIT" in messages[1]


def test_allowed_models_and_per_call_rounding() -> None:
    book = core.PriceBook(parse_catalog({
        "channels": [{"id": "c", "route": "routed", "base_url": "http://x/v1", "api_key_env": "K"}],
        "models": [{"name": "m", "channels": [
            {"channel": "c", "upstream_model": "u", "price": {"input": "0.0005", "output": "1"}}]}],
    }, source="t.yaml", env={}))
    # one input token costs 0.5 nano, rounded half-up per call (as each receipt is) → 1 nano
    est = core.estimate_run(book, [core.PlanStep("m", 7, 1, 0)], "routed", ["m"])
    assert est.buckets[W].expected_nano == 7
    with pytest.raises(TFError) as info:
        core.estimate_run(BOOK, [step("mini", 1), step("big", 1)], "routed", ["mini"])
    assert (info.value.code, info.value.param) == ("model_not_allowed", "plan[1].model")


def test_uses_credit_when_only_direct_routes() -> None:
    est = core.estimate_run(BOOK, [step("mini", 1, "market data"), step("official", 4, "analysis")], "auto")
    uses = [w for w in est.warnings if w.code == "uses_credit"]
    assert len(uses) == 1
    assert "step 'analysis' (official)" in uses[0].message
    assert "0.030000 CREDIT" in uses[0].message  # 4 × 7.5e-3
    # the direct policy makes every step credit-only
    est = core.estimate_run(BOOK, [step("mini", 1)], "direct")
    assert codes(est) == ["uses_credit"]


def test_no_balance_warnings_without_balances() -> None:
    est = core.estimate_run(BOOK, [step("mini", 10_000)], "routed")
    assert codes(est) == ["fallback_may_cost_more"]


def test_insufficient_balance_when_high_exceeds_available() -> None:
    high = 10 * MINI_B
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: high - 1, C: 0})
    warning = next(w for w in est.warnings if w.code == "insufficient_balance")
    assert warning.message.startswith("wallet: the high estimate 0.048000 CNY exceeds the available 0.047999999 CNY")
    assert "Top up the wallet by at least 0.000000001 CNY" in warning.message
    assert "large_share_of_balance" not in codes(est)
    # exactly equal is enough: not insufficient, but a large share
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: high, C: 0})
    assert "insufficient_balance" not in codes(est)
    assert "large_share_of_balance" in codes(est)


def test_large_share_of_balance_advice_depends_on_the_run_budget() -> None:
    high = 10 * MINI_B
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: high, C: 0})
    message = next(w.message for w in est.warnings if w.code == "large_share_of_balance")
    assert message.endswith("; top up or set a budget.")
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: high, C: 0},
                            budget_nano={W: high // 2, C: 0})
    message = next(w.message for w in est.warnings if w.code == "large_share_of_balance")
    assert message.endswith("; top up, or lower the run's wallet budget of 0.024000 CNY.")
    # a budget in the other bucket is not this bucket's
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: high, C: 0},
                            budget_nano={W: 0, C: high})
    message = next(w.message for w in est.warnings if w.code == "large_share_of_balance")
    assert message.endswith("; top up or set a budget.")


def test_large_share_of_balance_boundary() -> None:
    high = 10 * MINI_B
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: 2 * high - 1, C: 0})
    assert "large_share_of_balance" in codes(est)
    est = core.estimate_run(BOOK, [step("mini", 10)], "routed", available_nano={W: 2 * high, C: 0})
    assert "large_share_of_balance" not in codes(est)
    assert "insufficient_balance" not in codes(est)


def test_credit_balance_checked_against_the_credit_high() -> None:
    est = core.estimate_run(BOOK, [step("mini", 10)], "auto", available_nano={W: 10**12, C: 0})
    credit = [w for w in est.warnings if w.code == "insufficient_balance"]
    assert len(credit) == 1 and credit[0].message.startswith("credit:")


def test_budget_below_estimate() -> None:
    plan = [step("mini", 10)]
    expected, high = 10 * MINI_A, 10 * MINI_B
    below_expected = core.estimate_run(BOOK, plan, "routed", budget_nano={W: expected - 1})
    warning = next(w for w in below_expected.warnings if w.code == "budget_below_estimate")
    assert "below the expected cost 0.036000 CNY" in warning.message
    assert "Raise the budget to 0.048000 CNY" in warning.message
    below_high = core.estimate_run(BOOK, plan, "routed", budget_nano={W: high - 1})
    warning = next(w for w in below_high.warnings if w.code == "budget_below_estimate")
    assert "below the high estimate 0.048000 CNY" in warning.message
    enough = core.estimate_run(BOOK, plan, "routed", budget_nano={W: high, C: 1})
    assert "budget_below_estimate" not in codes(enough)
    no_budget = core.estimate_run(BOOK, plan, "routed", budget_nano={W: 0})
    assert "budget_below_estimate" not in codes(no_budget)


def test_every_warning_code_is_known_and_has_advice() -> None:
    plan = [step("mini", 100, "a"), step("official", 100, "b")]
    est = core.estimate_run(BOOK, plan, "auto", available_nano={W: 1, C: 1}, budget_nano={W: 1, C: 1})
    assert set(codes(est)) == set(core.WARNING_CODES) - {"large_share_of_balance"}
    for w in est.warnings:
        assert w.code in core.WARNING_CODES
        assert any(verb in w.message for verb in ("Top up", "Raise", "Make sure", "Keep", "Use", "top up"))


@pytest.mark.parametrize(
    "plan, policy, code, param",
    [
        ([step("mini", 1), step("nope", 1)], "routed", "model_not_found", "plan[1].model"),
        ([step("official", 1)], "routed", "route_not_allowed", "plan[0].model"),
        ([core.PlanStep("mini", -1, 1, 1)], "routed", "invalid_request", "plan[0].calls"),
        ([core.PlanStep("mini", 1, -1, 1)], "routed", "invalid_request", "plan[0].input_tokens"),
        ([core.PlanStep("mini", 1, 1, -1)], "routed", "invalid_request", "plan[0].output_tokens"),
        ([step("mini", 1)], "sometimes", "invalid_request", "route_policy"),
        ([step("mini", 1)] * (core.MAX_PLAN_STEPS + 1), "routed", "invalid_request", "plan"),
    ],
)
def test_plan_errors_name_the_field(plan: list[core.PlanStep], policy: str, code: str, param: str) -> None:
    with pytest.raises(TFError) as info:
        core.estimate_run(BOOK, plan, policy)
    assert (info.value.code, info.value.param) == (code, param)


def test_empty_plan_is_zero_and_quiet() -> None:
    est = core.estimate_run(BOOK, [], "auto", available_nano={W: 0, C: 0}, budget_nano={W: 5})
    assert est.buckets == {W: core.BucketEstimate(), C: core.BucketEstimate()}
    assert est.warnings == ()


def test_fallback_warning_suggests_a_budget_only_when_the_run_has_none_in_that_bucket() -> None:
    def fallback_message(budget_nano: dict[Bucket, int] | None) -> str:
        est = core.estimate_run(BOOK, [step("mini", 10)], "routed", budget_nano=budget_nano)
        (message,) = [w.message for w in est.warnings if w.code == "fallback_may_cost_more"]
        return message

    for no_wallet_budget in (None, {W: 0}, {C: 10**9}):  # a credit budget does not cap wallet spending
        message = fallback_message(no_wallet_budget)
        assert message.endswith("Keep a margin of that much, or set a run budget to cap it."), message
    message = fallback_message({W: 10**9})
    assert "set a run budget" not in message
    assert message.endswith("Keep a margin of that much; the run's wallet budget of 1.000000 CNY "
                            "caps what the whole run can spend."), message
