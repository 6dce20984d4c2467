"""Trying to make the writer's row cache (services/ledger/rowcache.py) give an answer the read
path would not: rows changed behind its back by another ledger process (holds of a request it
thinks it knows, expiries, run closes, debits), the day's spending window rolling over, and
batches that mix warm and cold accounts. Each test is run with the cache on and off where the
answer must be the same, and ends with the ledger's own audit."""

from __future__ import annotations

import datetime as dt
import secrets

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import core, store, writer
from tokenforge.ledger.core import (
    AdjustOp,
    CloseRunOp,
    CreateRunOp,
    ExpireHoldOp,
    HoldOp,
    Policy,
    SettleOp,
    TopUpOp,
)
from tokenforge.money import Bucket

from .conftest import audit_clean as _audit_ok
from .conftest import bucket_row as _bucket
from .conftest import settle_op as _settle
from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
W, C = Bucket.WALLET, Bucket.CREDIT


async def _holds(pool: asyncpg.Pool, request_id: str) -> list[tuple[str, str, int, int]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT bucket, state, captured_nano, released_nano FROM holds WHERE request_id = $1 "
                                "ORDER BY bucket", request_id)
    return [tuple(r) for r in rows]


async def _second_key(pool: asyncpg.Pool, account_id: str, limits: core.KeyLimitsNano | None = None) -> str:
    key_id = core.new_id("key")
    async with pool.acquire() as conn:
        await store.create_key(conn, key_id=key_id, account_id=account_id, name="k2", secret=secrets.token_urlsafe(),
                               prefix="sk", route_policy="auto", allowed_models=[],
                               limits=limits or core.KeyLimitsNano())
    return key_id


@pytest.fixture(params=[True, False], ids=["cache", "no-cache"])
async def groups(request: pytest.FixtureRequest, pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    """This ledger process (with or without the row cache) and another one on the same database."""
    mine = writer.WriterGroup(pool, POLICY, 1, row_cache=request.param)
    other = writer.WriterGroup(pool, POLICY, 1, row_cache=False)
    mine.start()
    other.start()
    yield mine, other
    await mine.stop()
    await other.stop()


async def _warm(mine: writer.WriterGroup, account_id: str, key_id: str, name: str) -> None:
    """A hold and a settlement: the account's rows are now what `mine` last committed."""
    await mine.submit(HoldOp(account_id, f"{name}-warm", key_id, W, 10))
    await mine.submit(_settle(account_id, f"{name}-warm", key_id, 1))


# ---- a request the cache thinks it knows all the holds of -------------------------------------


async def test_a_hold_another_process_added_to_a_cached_request_with_another_key_is_seen_by_the_settlement(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    """Another process holds the same request in the other bucket with a second key of the
    account: that touches no row the settlement uses (the credit bucket, the second key), so
    only a check of the request's holds can tell. The read path refuses the settlement (the
    request's holds belong to two keys); the cache must not accept it."""
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine)
    key2 = await _second_key(pool, account_id)
    await other.submit(TopUpOp(account_id, C, 1000, "xk-credit"))
    await _warm(mine, account_id, key_id, "xk")
    await mine.submit(HoldOp(account_id, "xk-1", key_id, W, 100))  # mine knows xk-1: one wallet hold
    await other.submit(HoldOp(account_id, "xk-1", key2, C, 50))  # behind mine's back
    with pytest.raises(TFError) as info:
        await mine.submit(_settle(account_id, "xk-1", key_id, 30))
    assert info.value.code == "invalid_request"
    assert await _holds(pool, "xk-1") == [("credit", "active", 0, 0), ("wallet", "active", 0, 0)]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM receipts WHERE request_id = 'xk-1'") == 0
    await _audit_ok(pool)


async def test_a_run_funded_hold_another_process_added_to_a_cached_request_is_released_by_its_settlement(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    """The same with one key: the other process's hold in the other bucket is drawn from a run
    (so it changes neither the key nor a bucket, only the run). The settlement must release
    it back to the run, as the read path does, not leave it held until it expires."""
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine)
    await other.submit(TopUpOp(account_id, C, 1000, "xr-credit"))
    run = await other.submit(CreateRunOp(account_id, key_id, "agent", 0, 500, None, 600))
    await _warm(mine, account_id, key_id, "xr")
    await mine.submit(HoldOp(account_id, "xr-1", key_id, W, 100))
    await other.submit(HoldOp(account_id, "xr-1", key_id, C, 50, run.run_id))
    settled = await mine.submit(_settle(account_id, "xr-1", key_id, 30))
    assert (settled.amount_nano, settled.released_nano) == (30, 70)
    assert await _holds(pool, "xr-1") == [("credit", "released", 0, 50), ("wallet", "captured", 30, 70)]
    async with pool.acquire() as conn:
        reserved = await conn.fetchval("SELECT reserved_credit_nano FROM runs WHERE id = $1", run.run_id)
        receipt_run = await conn.fetchval("SELECT run_id FROM receipts WHERE request_id = 'xr-1'")
    assert reserved == 500 and receipt_run == run.run_id
    assert await _bucket(pool, account_id) == (1000 - 1 - 30, 0)
    await _audit_ok(pool)


# ---- rows changed behind the cache by another process -----------------------------------------


async def test_a_hold_another_process_expired_is_charged_from_the_balance_not_captured_again(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    """Another process's reaper expires a hold mine still remembers as active; mine's settlement
    must see it expired: the charge comes from the available balance (within it), nothing is
    captured from the hold a second time."""
    mine, _ = groups
    # The other process's clock is an hour ahead: the hold has expired for it.
    other = writer.WriterGroup(pool, POLICY, 1, clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    other.start()
    account_id, key_id = await writer_customer(pool, mine)
    await _warm(mine, account_id, key_id, "ex")
    await mine.submit(HoldOp(account_id, "ex-1", key_id, W, 400, ttl_s=60))
    assert await _bucket(pool, account_id) == (999, 400)
    try:
        assert await other.submit(ExpireHoldOp(account_id, "ex-1", W)) is not None
    finally:
        await other.stop()
    assert await _bucket(pool, account_id) == (999, 0)
    settled = await mine.submit(_settle(account_id, "ex-1", key_id, 300))
    assert (settled.amount_nano, settled.uncollected_nano, settled.held_nano, settled.released_nano) == (300, 0, 400, 400)
    assert await _holds(pool, "ex-1") == [("wallet", "expired", 0, 400)]
    assert await _bucket(pool, account_id) == (699, 0)
    await _audit_ok(pool)


async def test_a_run_closed_by_another_process_refuses_the_next_cached_hold_and_frees_settlements_to_the_bucket(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine)
    run = await mine.submit(CreateRunOp(account_id, key_id, "agent", 600, 0, None, 600))
    await mine.submit(HoldOp(account_id, "rc-0", key_id, W, 100, run.run_id))
    await mine.submit(_settle(account_id, "rc-0", key_id, 40, run_id=run.run_id))  # warm, run included
    await mine.submit(HoldOp(account_id, "rc-1", key_id, W, 200, run.run_id))  # in flight when the run closes
    assert await _bucket(pool, account_id) == (960, 560)
    await other.submit(CloseRunOp(account_id, run.run_id, key_id))
    assert await _bucket(pool, account_id) == (960, 200)  # the run's 360 left went back; rc-1's 200 still held
    with pytest.raises(TFError) as info:
        await mine.submit(HoldOp(account_id, "rc-2", key_id, W, 50, run.run_id))
    assert info.value.code == "invalid_request"
    settled = await mine.submit(_settle(account_id, "rc-1", key_id, 150, run_id=run.run_id))
    assert (settled.amount_nano, settled.released_nano) == (150, 50)
    assert await _bucket(pool, account_id) == (810, 0)  # the 50 left of rc-1 went to the bucket, not the run
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT status, reserved_wallet_nano, spent_wallet_nano FROM runs WHERE id = $1",
                                  run.run_id)
    assert tuple(row) == ("closed", 0, 190)
    await _audit_ok(pool)


async def test_a_debit_by_another_process_refuses_a_cached_hold_beyond_what_is_left(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine)
    await _warm(mine, account_id, key_id, "db")  # mine believes 999 available
    await other.submit(AdjustOp(account_id, W, "debit", 900, "chargeback", "db-adj"))
    with pytest.raises(TFError) as info:
        await mine.submit(HoldOp(account_id, "db-1", key_id, W, 500))
    assert info.value.code == "insufficient_balance"
    held = await mine.submit(HoldOp(account_id, "db-2", key_id, W, 99))
    assert held.amount_nano == 99
    await mine.submit(_settle(account_id, "db-2", key_id, 99))
    assert await _bucket(pool, account_id) == (0, 0)
    await _audit_ok(pool)


# ---- the day's spending window ------------------------------------------------------------------


async def test_a_keys_daily_cap_rolls_over_at_midnight_while_its_row_is_cached(pool: asyncpg.Pool) -> None:
    """The writer's clock crosses UTC midnight between two cached batches: the day's spend
    starts again from zero for the new day (the cached key row still says yesterday), and the
    cap holds on both days."""
    now = [dt.datetime(2031, 5, 1, 23, 59, 50, tzinfo=dt.UTC)]
    mine = writer.WriterGroup(pool, POLICY, 1, clock=lambda: now[0])
    mine.start()
    try:
        account_id, _ = await writer_customer(pool, mine, wallet_nano=5000)
        key_id = await _second_key(pool, account_id, core.KeyLimitsNano(wallet_daily=500))
        await mine.submit(HoldOp(account_id, "md-0", key_id, W, 450))
        await mine.submit(_settle(account_id, "md-0", key_id, 450))
        with pytest.raises(TFError) as info:  # 50 left today
            await mine.submit(HoldOp(account_id, "md-1", key_id, W, 51))
        assert info.value.code == "key_budget_exceeded"
        await mine.submit(HoldOp(account_id, "md-2", key_id, W, 50))  # warm again: from the cache
        now[0] += dt.timedelta(seconds=20)  # 00:00:10 the next day; md-2 still held
        before = mine.writers[0].stats.from_cache
        held = await mine.submit(HoldOp(account_id, "md-3", key_id, W, 450))  # 500 - 0 today - 50 held
        assert held.amount_nano == 450 and mine.writers[0].stats.from_cache == before + 1
        with pytest.raises(TFError) as info:
            await mine.submit(HoldOp(account_id, "md-4", key_id, W, 1))
        assert info.value.code == "key_budget_exceeded"
        await mine.submit(_settle(account_id, "md-2", key_id, 50))
        await mine.submit(_settle(account_id, "md-3", key_id, 450))
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT spent_wallet_nano, day, day_wallet_nano, held_wallet_nano FROM keys "
                                      "WHERE id = $1", key_id)
        assert tuple(row) == (950, dt.date(2031, 5, 2), 500, 0)
        with pytest.raises(TFError) as info:
            await mine.submit(HoldOp(account_id, "md-5", key_id, W, 1))
        assert info.value.code == "key_budget_exceeded"
        await _audit_ok(pool)
    finally:
        await mine.stop()


# ---- two ledger processes with caches, at once ---------------------------------------------------


async def test_two_cached_processes_racing_on_shared_requests_keep_every_cap_and_answer(pool: asyncpg.Pool) -> None:
    """Two writer groups with the cache on (two ledger processes) work the same two accounts at
    once: holds of the same requests in both buckets, by two keys of an account (one capped),
    from a run and not, settlements above and below the hold, releases, expiries, replays,
    top-ups and debits. Whatever interleaving happens: every answer is what the database kept
    (each accepted hold exists with its amount, each receipt has the amounts its settlement
    answered, replays give the first receipt), no cap or budget is passed, and the audit holds."""
    import asyncio
    import random

    from tokenforge.ledger.core import HoldResult, ReleaseOp, SettleResult

    groups = [writer.WriterGroup(pool, POLICY, 1), writer.WriterGroup(pool, POLICY, 1)]
    later = writer.WriterGroup(pool, POLICY, 1, clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    for g in (*groups, later):
        g.start()
    rng = random.Random(7)
    caps = core.KeyLimitsNano(wallet_total=4000, credit_total=3000)
    accounts = []
    try:
        for _ in range(2):
            account_id, key_id = await writer_customer(pool, groups[0], wallet_nano=6000)
            await groups[1].submit(TopUpOp(account_id, C, 6000, "seed-c-" + account_id))
            capped = await _second_key(pool, account_id, caps)
            run = await groups[0].submit(CreateRunOp(account_id, key_id, "agent", 1500, 800, None, 600))
            accounts.append((account_id, [key_id, capped], run.run_id))
        answers: list[tuple[object, object]] = []

        held: list[tuple[str, str, str, Bucket]] = []  # (account, request, key, bucket) of holds asked for

        def random_op(step: int) -> object:
            account_id, keys, run_id = rng.choice(accounts)
            request = f"{account_id}:r{rng.randrange(60)}"
            key_id = rng.choice(keys)
            bucket = rng.choice((W, C))
            roll = rng.random()
            if roll < 0.45:
                in_run = key_id == keys[0] and rng.random() < 0.3
                held.append((account_id, request, key_id, bucket))
                return HoldOp(account_id, request, key_id, bucket, rng.randint(1, 300), run_id if in_run else None)
            if roll < 0.80:
                if held and rng.random() < 0.8:  # mostly a request that was held, by its key
                    account_id, request, key_id, bucket = rng.choice(held)
                return SettleOp(account_id, request, key_id, bucket, rng.choice([0, rng.randint(1, 200), 600]),
                                "settled", {"s": step}, None)
            if roll < 0.88:
                return ReleaseOp(account_id, request, bucket)
            if roll < 0.93:
                return ExpireHoldOp(account_id, request, bucket)  # submitted to the later clock
            if roll < 0.97:
                return TopUpOp(account_id, bucket, rng.randint(1, 500), f"t{step}")
            return AdjustOp(account_id, bucket, "debit", rng.randint(1, 300), "fee", f"d{step}")

        async def run_one(op: object) -> None:
            # Each account has a home process that does most of its work; the other one cuts in.
            home = [a for a, _, _ in accounts].index(op.account_id)  # type: ignore[attr-defined]
            group = later if isinstance(op, ExpireHoldOp) else groups[home if rng.random() < 0.8 else 1 - home]
            try:
                answers.append((op, await asyncio.wait_for(group.submit(op), 30)))  # type: ignore[arg-type]
            except TFError as err:
                answers.append((op, err))

        step = 0
        for _ in range(150):
            wave = [random_op(step + i) for i in range(rng.randint(1, 6))]
            step += len(wave)
            await asyncio.gather(*(run_one(op) for op in wave))
        stats = [g.writers[0].stats for g in groups]
        assert sum(s.from_cache for s in stats) > 0 and sum(s.cache_stale for s in stats) > 0  # both ways

        async with pool.acquire() as conn:
            holds = {r["id"]: r for r in await conn.fetch("SELECT * FROM holds")}
            receipts = {r["request_id"]: r for r in await conn.fetch("SELECT * FROM receipts")}
            keys = await conn.fetch("SELECT * FROM keys WHERE wallet_total_nano > 0")
            runs = await conn.fetch("SELECT * FROM runs")
        first_receipt: dict[str, str] = {}
        for op, outcome in answers:
            if isinstance(outcome, HoldResult):
                hold = holds[outcome.hold_id]
                assert (hold["request_id"], hold["bucket"], hold["amount_nano"]) == (
                    op.request_id, op.bucket.value, outcome.amount_nano)  # type: ignore[attr-defined]
            elif isinstance(outcome, SettleResult):
                receipt = receipts[op.request_id]  # type: ignore[attr-defined]
                assert receipt["id"] == outcome.receipt_id
                assert (receipt["amount_nano"], receipt["uncollected_nano"], receipt["held_nano"],
                        receipt["released_nano"]) == (outcome.amount_nano, outcome.uncollected_nano,
                                                      outcome.held_nano, outcome.released_nano)
                assert first_receipt.setdefault(op.request_id, outcome.receipt_id) == outcome.receipt_id  # type: ignore[attr-defined]
            elif isinstance(outcome, TFError):
                assert outcome.code != "internal_error", (op, outcome)
        assert sum(isinstance(o, SettleResult) for _, o in answers) > 20
        for k in keys:
            assert k["spent_wallet_nano"] + k["held_wallet_nano"] <= caps.wallet_total
            assert k["spent_credit_nano"] + k["held_credit_nano"] <= caps.credit_total
        for r in runs:
            assert r["spent_wallet_nano"] <= r["budget_wallet_nano"] and r["spent_credit_nano"] <= r["budget_credit_nano"]
        await _audit_ok(pool)
    finally:
        for g in (*groups, later):
            await g.stop()


# ---- the writer's own failures and bounds -------------------------------------------------------


async def test_a_cached_batch_that_committed_but_lost_its_answer_is_forgotten_and_replayed_exactly_once(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached batch's statement commits but the connection drops before the answer: the
    writer must forget what it remembered and retry each operation alone from a read, which
    finds them done (replays: the same hold, the same receipt), charging nothing twice."""
    import asyncio

    mine = writer.WriterGroup(pool, POLICY, 1)
    mine.start()
    try:
        account_id, key_id = await writer_customer(pool, mine)
        await _warm(mine, account_id, key_id, "lost")
        first = await mine.submit(HoldOp(account_id, "lost-1", key_id, W, 100))
        real = store.write_book
        dropped: list[int] = []

        async def commit_then_drop(conn, book, snap, fresh_requests=(), known_holds=()):  # type: ignore[no-untyped-def]
            await real(conn, book, snap, fresh_requests, known_holds)
            if (fresh_requests or known_holds) and not dropped:  # the cached batch
                dropped.append(1)
                raise ConnectionResetError("the connection dropped after the commit")

        monkeypatch.setattr(writer.store, "write_book", commit_then_drop)
        held, settled = await asyncio.gather(
            mine.submit(HoldOp(account_id, "lost-2", key_id, W, 200)),
            mine.submit(_settle(account_id, "lost-1", key_id, 60)),
        )
        monkeypatch.setattr(writer.store, "write_book", real)
        assert dropped == [1] and mine.writers[0].stats.retried_alone == 2
        async with pool.acquire() as conn:
            hold_id = await conn.fetchval("SELECT id FROM holds WHERE request_id = 'lost-2'")
            receipt = await conn.fetchrow("SELECT id, amount_nano FROM receipts WHERE request_id = 'lost-1'")
        assert held.replayed and held.hold_id == hold_id and held.amount_nano == 200
        assert settled.replayed and settled.receipt_id == receipt["id"] and receipt["amount_nano"] == 60 == settled.amount_nano
        assert first.hold_id != hold_id
        # Warm again from the reads; the money is right to the unit.
        await mine.submit(_settle(account_id, "lost-2", key_id, 200))
        assert await _bucket(pool, account_id) == (1000 - 1 - 60 - 200, 0)
        await _audit_ok(pool)
    finally:
        await mine.stop()

