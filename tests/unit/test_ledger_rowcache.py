"""The row cache's own rules, without a database: copies share nothing with the rows they
were made from, it stays within its bound, and what it does not have needs a read."""

from __future__ import annotations

import dataclasses
import datetime as dt

from tokenforge.ledger import core, rowcache
from tokenforge.ledger.core import Book, HoldOp, Policy, SettleOp, TopUpOp
from tokenforge.money import Bucket

POLICY = Policy(600, 3600, 3600)
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
W, C = Bucket.WALLET, Bucket.CREDIT


def _key() -> core.KeyRow:
    return core.KeyRow("key_1", "acct_1", "k", False, core.KeyLimitsNano(1, 2, 3, 4), {W: 5, C: 6}, {W: 7, C: 8},
                       NOW.date(), {W: 9, C: 10})


def _run() -> core.RunRow:
    return core.RunRow("run_1", "key_1", "acct_1", "r", core.RUN_OPEN, {W: 1, C: 2}, {W: 3, C: 4}, {W: 5, C: 6},
                       NOW, NOW, None, '{"e": 1}')


def _hold(request_id: str = "req_1") -> core.HoldRow:
    return core.HoldRow("hold_1", request_id, W, "acct_1", "key_1", "run_1", True, 11, core.HOLD_ACTIVE, 0, 0, 600,
                        NOW, NOW, None)


def test_copies_keep_every_field_and_share_no_mutable_part() -> None:
    for row, copy in ((_key(), rowcache._copy_key), (_run(), rowcache._copy_run), (_hold(), rowcache._copy_hold)):  # noqa: SLF001
        twin = copy(row)
        assert dataclasses.asdict(twin) == dataclasses.asdict(row)  # a field added later is not dropped
        for f in dataclasses.fields(row):
            value = getattr(row, f.name)
            if isinstance(value, dict):
                assert getattr(twin, f.name) is not value


def _warm(cache: rowcache.RowCache, *, request: bool) -> None:
    book = Book(now=NOW, policy=POLICY)
    book.buckets[("acct_1", W)] = core.BucketRow("acct_1", W, 100, 11)
    book.keys["key_1"] = _key()
    book.runs["run_1"] = _run()
    if request:
        book.holds[("req_1", W)] = _hold()
    cache.remember([HoldOp("acct_1", "req_1", "key_1", W, 11, "run_1")], book)


def test_a_settlement_is_planned_from_the_cache_only_with_all_of_its_rows() -> None:
    cache = rowcache.RowCache()
    settle = SettleOp("acct_1", "req_1", "key_1", W, 5, "settled", {}, "run_1")
    assert cache.plan([settle], Book(now=NOW, policy=POLICY)) is None  # nothing kept yet
    _warm(cache, request=True)
    book = Book(now=NOW, policy=POLICY)
    planned = cache.plan([settle], book)
    assert planned is not None and planned.fresh_requests == []
    assert planned.known_holds == [("req_1", "acct_1")]  # the write checks the request has no other hold
    assert set(book.holds) == {("req_1", W)} and set(book.keys) == {"key_1"} and set(book.runs) == {"run_1"}
    assert planned.snap.buckets == {("acct_1", W): (100, 11)}
    # The book's rows are copies: applying to them leaves the cache as it was.
    book.keys["key_1"].spent[W] += 1
    assert cache.plan([settle], Book(now=NOW, policy=POLICY)).book.keys["key_1"].spent[W] == 5  # type: ignore[union-attr]
    # A settled request leaves the cache: its replay is read from the database.
    book.holds[("req_1", W)].state = core.HOLD_CAPTURED
    cache.remember([settle], book)
    assert cache.plan([settle], Book(now=NOW, policy=POLICY)) is None


def test_a_new_request_is_planned_fresh_and_other_operations_need_a_read() -> None:
    cache = rowcache.RowCache()
    _warm(cache, request=False)
    planned = cache.plan([HoldOp("acct_1", "req_2", "key_1", W, 1)], Book(now=NOW, policy=POLICY))
    assert planned is not None and planned.fresh_requests == ["req_2"] and planned.known_holds == []
    assert cache.plan([HoldOp("acct_1", "req_2", "key_1", C, 1)], Book(now=NOW, policy=POLICY)) is None  # no credit row
    assert cache.plan([HoldOp("acct_1", "req_2", "key_9", W, 1)], Book(now=NOW, policy=POLICY)) is None  # unknown key
    assert cache.plan([TopUpOp("acct_1", W, 1, "t")], Book(now=NOW, policy=POLICY)) is None


def test_the_cache_is_bounded() -> None:
    cache = rowcache.RowCache(max_accounts=3)
    book = Book(now=NOW, policy=POLICY)
    for n in range(5):
        account = f"acct-{n}"
        book.buckets[(account, W)] = core.BucketRow(account, W, 10, 0)
        book.keys[f"key-{n}"] = dataclasses.replace(_key(), id=f"key-{n}", account_id=account)
        cache.remember([TopUpOp(account, W, 10, f"k{n}")], book)
    assert len(cache) == 3
    hold = lambda n: [HoldOp(f"acct-{n}", "r", f"key-{n}", W, 1)]  # noqa: E731
    assert cache.plan(hold(0), Book(now=NOW, policy=POLICY)) is None  # the least recently used went first
    assert cache.plan(hold(4), Book(now=NOW, policy=POLICY)) is not None


def test_runs_are_bounded_per_account_and_closed_ones_are_not_kept() -> None:
    """A warm account that keeps creating runs is never evicted: its runs must not pile up."""
    cache = rowcache.RowCache()
    for n in range(rowcache.MAX_RUNS_PER_ACCOUNT + 50):
        book = Book(now=NOW, policy=POLICY)
        book.buckets[("acct_1", W)] = core.BucketRow("acct_1", W, 100, 0)
        book.keys["key_1"] = _key()
        book.runs[f"run_{n}"] = dataclasses.replace(_run(), id=f"run_{n}")
        cache.remember([core.CreateRunOp("acct_1", "key_1", "r", 1, 0, None, 60)], book)
    assert len(cache._accounts["acct_1"].runs) == rowcache.MAX_RUNS_PER_ACCOUNT  # noqa: SLF001
    # A run that closes leaves: a settlement of its holds reads it (the run is not planned).
    _warm(cache, request=True)
    book = Book(now=NOW, policy=POLICY)
    book.runs["run_1"] = dataclasses.replace(_run(), status=core.RUN_CLOSED)
    cache.remember([core.CloseRunOp("acct_1", "run_1", None)], book)
    assert "run_1" not in cache._accounts["acct_1"].runs  # noqa: SLF001
    settle = SettleOp("acct_1", "req_1", "key_1", W, 5, "settled", {}, "run_1")
    assert cache.plan([settle], Book(now=NOW, policy=POLICY)) is None
