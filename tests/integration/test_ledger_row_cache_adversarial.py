"""Trying to make the writer's row cache (services/ledger/rowcache.py) give an answer the read
path would not: rows changed behind its back by another ledger process (holds of a request it
thinks it knows, expiries, run closes, debits), the day's spending window rolling over, and
batches that mix warm and cold accounts. Each test is run with the cache on and off where the
answer must be the same, and ends with the ledger's own audit."""

from __future__ import annotations

import secrets

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import core, store, writer
from tokenforge.ledger.core import (
    CreateRunOp,
    HoldOp,
    Policy,
    SettleOp,
    TopUpOp,
)
from tokenforge.money import Bucket

from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
W, C = Bucket.WALLET, Bucket.CREDIT


def _settle(account_id: str, request_id: str, key_id: str, rated: int, bucket: Bucket | None = W,
            run_id: str | None = None) -> SettleOp:
    return SettleOp(account_id, request_id, key_id, bucket, rated, "settled", {"note": "adversarial"}, run_id)


async def _bucket(pool: asyncpg.Pool, account_id: str, bucket: Bucket = W) -> tuple[int, int]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT balance_nano, held_nano FROM buckets WHERE account_id = $1 AND bucket = $2",
                                  account_id, bucket.value)
    return row["balance_nano"], row["held_nano"]


async def _holds(pool: asyncpg.Pool, request_id: str) -> list[tuple[str, str, int, int]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT bucket, state, captured_nano, released_nano FROM holds WHERE request_id = $1 "
                                "ORDER BY bucket", request_id)
    return [tuple(r) for r in rows]


async def _audit_ok(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        problems, _ = await store.audit(conn)
    assert problems == []


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
