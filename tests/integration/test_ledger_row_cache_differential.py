"""The row cache changes no answer and no row: one random sequence of holds, settlements
(below, at and above the hold), releases, replays and top-ups made behind the writer's back,
applied to two identical customers — one through a writer with the cache, one without —
gives the same answers and the same money, to the last nano-unit."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import store, writer
from tokenforge.ledger.core import (
    CloseRunOp,
    CreateRunOp,
    HoldOp,
    Policy,
    ReleaseOp,
    SettleOp,
    TopUpOp,
)
from tokenforge.money import Bucket

from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
STEPS = 300
BUCKETS = (Bucket.WALLET, Bucket.CREDIT)


@dataclass
class _Side:
    group: writer.WriterGroup
    account_id: str
    key_id: str
    answers: list[Any] = field(default_factory=list)
    run_id: str = ""


def _answer(outcome: Any) -> Any:
    """What a caller sees, without the ids and times each side makes for itself."""
    if isinstance(outcome, TFError):
        return ("error", outcome.code)
    kept = {k: v for k, v in dataclasses.asdict(outcome).items() if not k.endswith("_id") and k != "expires_at"}
    return (type(outcome).__name__, sorted(kept.items()))


async def _submit(side: _Side, op: Any) -> None:
    try:
        side.answers.append(_answer(await side.group.submit(op)))
    except TFError as err:
        side.answers.append(_answer(err))


async def _state(pool: asyncpg.Pool, account_id: str) -> dict[str, Any]:
    async with pool.acquire() as conn:
        buckets = await conn.fetch("SELECT bucket, balance_nano, held_nano FROM buckets WHERE account_id = $1 "
                                   "ORDER BY bucket", account_id)
        key = await conn.fetchrow("SELECT spent_wallet_nano, spent_credit_nano, held_wallet_nano, held_credit_nano "
                                  "FROM keys WHERE account_id = $1", account_id)
        holds = await conn.fetch("SELECT split_part(request_id, ':', 2) AS r, bucket, amount_nano, state, "
                                 "captured_nano, released_nano FROM holds WHERE account_id = $1 ORDER BY 1, 2",
                                 account_id)
        receipts = await conn.fetch("SELECT split_part(request_id, ':', 2) AS r, status, bucket, amount_nano, "
                                    "uncollected_nano, held_nano, released_nano FROM receipts WHERE account_id = $1 "
                                    "ORDER BY 1", account_id)
        runs = await conn.fetch("SELECT status, reserved_wallet_nano, spent_wallet_nano, spent_credit_nano "
                                "FROM runs WHERE account_id = $1", account_id)
        transfers = await conn.fetch("SELECT kind, unit, src, dst, amount_nano, bucket, balance_after_nano "
                                     "FROM transfers WHERE account_id = $1 ORDER BY id", account_id)
    return {name: [tuple(r) for r in rows] for name, rows in (
        ("buckets", buckets), ("key", [key]), ("holds", holds), ("receipts", receipts), ("runs", runs),
        ("transfers", transfers))}


async def test_the_same_operations_give_the_same_answers_and_rows_with_and_without_the_cache(
    pool: asyncpg.Pool,
) -> None:
    cached = writer.WriterGroup(pool, POLICY, 1, row_cache=True)
    plain = writer.WriterGroup(pool, POLICY, 1, row_cache=False)
    other = writer.WriterGroup(pool, POLICY, 1, row_cache=False)  # another ledger process
    for g in (cached, plain, other):
        g.start()
    try:
        sides = [_Side(cached, *await writer_customer(pool, cached, 2_000)),
                 _Side(plain, *await writer_customer(pool, plain, 2_000))]
        for side in sides:  # an agent run with a wallet budget: its requests hold from it
            created = await side.group.submit(CreateRunOp(side.account_id, side.key_id, "run", 900, 0, None, 600))
            side.run_id = created.run_id
        rng = random.Random(20261204)
        open_requests: dict[str, tuple[Bucket, bool]] = {}
        done: list[tuple[str, Bucket, int, bool]] = []

        def run_of(s: _Side, in_run: bool) -> str | None:
            return s.run_id if in_run else None

        for step in range(STEPS):
            roll = rng.random()
            ops: list[Any] = []
            by: list[writer.WriterGroup | None] = [None, None]  # None: the side's own writer
            if step == STEPS // 2:  # the run closes: its reservation goes back, its holds settle later
                ops = [lambda s: CloseRunOp(s.account_id, s.run_id, s.key_id)]
            elif roll < 0.40 or not open_requests:
                request, bucket = f"s{step}", rng.choice(BUCKETS)
                amount, in_run = rng.randint(1, 400), rng.random() < 0.3
                open_requests[request] = (bucket, in_run)
                ops = [lambda s, r=request, b=bucket, a=amount, i=in_run: HoldOp(
                    s.account_id, f"{s.account_id}:{r}", s.key_id, b, a, run_of(s, i))]
                if rng.random() < 0.2:  # a fallback: the same request held in the other bucket too
                    other_bucket = Bucket.CREDIT if bucket is Bucket.WALLET else Bucket.WALLET
                    ops.append(lambda s, r=request, b=other_bucket, i=in_run: HoldOp(
                        s.account_id, f"{s.account_id}:{r}", s.key_id, b, 50, run_of(s, i)))
            elif roll < 0.75:
                request = rng.choice(sorted(open_requests))
                bucket, in_run = open_requests.pop(request)
                rated = rng.choice([0, rng.randint(1, 200), rng.randint(200, 900)])
                done.append((request, bucket, rated, in_run))
                ops = [lambda s, r=request, b=bucket, x=rated, i=in_run: SettleOp(
                    s.account_id, f"{s.account_id}:{r}", s.key_id, b, x, "settled", {"r": r}, run_of(s, i))]
            elif roll < 0.83:
                request = rng.choice(sorted(open_requests))
                bucket, _ = open_requests.pop(request)
                ops = [lambda s, r=request, b=bucket: ReleaseOp(s.account_id, f"{s.account_id}:{r}", b)]
            elif roll < 0.90 and done:
                request, bucket, rated, in_run = rng.choice(done)  # a replay of a settlement
                ops = [lambda s, r=request, b=bucket, x=rated, i=in_run: SettleOp(
                    s.account_id, f"{s.account_id}:{r}", s.key_id, b, x, "settled", {"r": r}, run_of(s, i))]
            else:  # money moved behind the writer's back
                bucket, amount = rng.choice(BUCKETS), rng.randint(1, 700)
                ops = [lambda s, b=bucket, a=amount, n=step: TopUpOp(s.account_id, b, a, f"{s.account_id}:t{n}")]
                by = [other, other]
            for make in ops:
                for side, group in zip(sides, by, strict=True):
                    await _submit(_Side(group, side.account_id, side.key_id, side.answers) if group else side,
                                  make(side))
        a, b = sides
        assert a.answers == b.answers
        assert sum(1 for x in a.answers if x[0] == "error") > 5  # refusals were part of the run
        state = await _state(pool, a.account_id)
        assert state == await _state(pool, b.account_id)
        (status, reserved, spent_wallet, _), = state["runs"]
        assert status == "closed" and reserved == 0 and spent_wallet > 0  # the run's requests were charged
        stats = cached.writers[0].stats
        assert stats.from_cache > STEPS // 4 and stats.cache_stale > 0  # both ways were taken
        assert plain.writers[0].stats.from_cache == 0
        async with pool.acquire() as conn:
            problems, _ = await store.audit(conn)
        assert problems == []
    finally:
        for g in (cached, plain, other):
            await g.stop()
