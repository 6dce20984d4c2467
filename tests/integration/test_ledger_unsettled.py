"""The receipt of a request no router settled, against real PostgreSQL: the reaper stores the
router's draft when the request's last hold expires; a late Settle replaces it, also when both
meet in one batch or come from two ledger processes; a draft whose receipt id another request
took still lets its hold expire. One receipt per request throughout, and a clean audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncpg
import pytest

from tokenforge.ledger import server, writer
from tokenforge.ledger.core import ExpireHoldOp, HoldOp, Policy, SettleOp
from tokenforge.money import Bucket

from .conftest import audit_clean, bucket_row, writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
W = Bucket.WALLET
RID = "rcpt_0123456789abcdef0123abcd"
DRAFT = json.dumps({"id": RID, "trace_id": "c" * 32, "requested_model": "gpt-4o-mini", "attempts": []})


def later() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


class Clock:
    """A writer's clock the test moves on."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


async def _receipts(pool: asyncpg.Pool, request_id: str) -> list[tuple[str, str, int, bool]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, status, amount_nano, unsettled FROM receipts WHERE request_id = $1",
                                request_id)
    return [tuple(r) for r in rows]


async def test_an_expiry_and_a_late_settlement_in_one_batch_commit_together(pool: asyncpg.Pool) -> None:
    """Found: the expiry's INSERT and the settlement's UPDATE of the same receipt in one
    statement conflicted 8 times, then every operation of the batch was retried alone."""
    clock = Clock()
    group = writer.WriterGroup(pool, POLICY, 1, clock=clock)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group, wallet_nano=1000)
        await group.submit(HoldOp(account_id, "ub-1", key_id, W, 100, ttl_s=1, unsettled_receipt=DRAFT))
        clock.advance(2)
        released, settled = await asyncio.gather(  # submitted in one turn: one batch
            group.submit(ExpireHoldOp(account_id, "ub-1", W, DRAFT)),
            group.submit(SettleOp(account_id, "ub-1", key_id, W, 80, "settled", {}, receipt_id=RID)),
        )
        stats = group.writers[0].stats
    finally:
        await group.stop()
    assert released is not None and released.released_nano == 100
    assert (settled.receipt_id, settled.amount_nano, settled.replayed) == (RID, 80, False)
    assert await _receipts(pool, "ub-1") == [(RID, "settled", 80, False)]
    assert (stats.conflicts, stats.retried_alone) == (0, 0)
    assert await bucket_row(pool, account_id) == (920, 0)
    await audit_clean(pool)


@pytest.mark.parametrize("row_cache", [True, False], ids=["cache", "no-cache"])
async def test_a_late_settlement_from_another_process_replaces_the_stored_receipt(
    pool: asyncpg.Pool, row_cache: bool
) -> None:
    mine = writer.WriterGroup(pool, POLICY, 1, row_cache=row_cache)
    reaper = writer.WriterGroup(pool, POLICY, 1, clock=later)
    mine.start()
    reaper.start()
    try:
        account_id, key_id = await writer_customer(pool, mine, wallet_nano=1000)
        await mine.submit(HoldOp(account_id, "ub-2", key_id, W, 300, ttl_s=60, unsettled_receipt=DRAFT))
        await reaper.submit(ExpireHoldOp(account_id, "ub-2", W, DRAFT))
        assert await _receipts(pool, "ub-2") == [(RID, "failed", 0, True)]
        settled = await mine.submit(SettleOp(account_id, "ub-2", key_id, W, 250, "settled", {"final_attempt": 1},
                                             receipt_id=RID))
        again = await mine.submit(SettleOp(account_id, "ub-2", key_id, W, 250, "settled", {"final_attempt": 1},
                                           receipt_id=RID))
    finally:
        await mine.stop()
        await reaper.stop()
    assert (settled.receipt_id, settled.amount_nano, settled.replayed, again.replayed) == (RID, 250, False, True)
    assert await _receipts(pool, "ub-2") == [(RID, "settled", 250, False)]
    async with pool.acquire() as conn:
        body = json.loads(await conn.fetchval("SELECT body::text FROM receipts WHERE id = $1", RID))
    assert (body["status"], body["amount"], body["final_attempt"]) == ("settled", "0.00000025", 1) and "error" not in body
    assert await bucket_row(pool, account_id) == (750, 0)
    await audit_clean(pool)


async def test_a_draft_whose_receipt_id_is_taken_still_lets_its_hold_expire(pool: asyncpg.Pool) -> None:
    clock = Clock()
    group = writer.WriterGroup(pool, POLICY, 1, clock=clock)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group, wallet_nano=1000)
        await group.submit(HoldOp(account_id, "ub-3", key_id, W, 10))
        await group.submit(SettleOp(account_id, "ub-3", key_id, W, 5, "settled", {}, receipt_id=RID))
        await group.submit(HoldOp(account_id, "ub-4", key_id, W, 100, ttl_s=1, unsettled_receipt=DRAFT))
        n = await server.reap_once(pool, group, clock.advance(2))
    finally:
        await group.stop()
    assert n >= 1
    [(receipt_id, status, amount, flagged)] = await _receipts(pool, "ub-4")
    assert receipt_id != RID and receipt_id.startswith("rcpt_") and (status, amount, flagged) == ("failed", 0, True)
    assert await bucket_row(pool, account_id) == (995, 0)
    await audit_clean(pool)
