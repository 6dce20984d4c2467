"""Adversarial tests of the batched paths: the writer with two batches in flight, the Batch
RPC and the Coalescer under database failures, crashes and stops. Real PostgreSQL and real
processes; every wait is bounded."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import core, migrations, store, writer
from tokenforge.ledger.core import HoldOp, KeyLimitsNano, Policy, TopUpOp
from tokenforge.money import Bucket

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
WAIT_S = 10.0
POLLS_MAX = 500  # polls of the database (10 ms apart) a test waits for a state, at most


@pytest.fixture
async def pool(fresh_database_url: str):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(fresh_database_url)
    await migrations.migrate(conn)
    await conn.close()
    p = await store.create_pool(fresh_database_url, min_size=1, max_size=4, writer=True)
    yield p
    await p.close()


async def _customer(pool: asyncpg.Pool, group: writer.WriterGroup, wallet_nano: int = 1000) -> tuple[str, str]:
    account_id, key_id = core.new_id("acct"), core.new_id("key")
    async with pool.acquire() as conn:
        await store.create_account(conn, account_id, "adv")
        await store.create_key(conn, key_id=key_id, account_id=account_id, name="k", secret=secrets.token_urlsafe(),
                               prefix="sk", route_policy="auto", allowed_models=[], limits=KeyLimitsNano())
    await group.submit(TopUpOp(account_id, Bucket.WALLET, wallet_nano, "adv-" + secrets.token_hex(4)))
    return account_id, key_id


async def _until_lock_wait(conn: asyncpg.Connection) -> None:
    """Poll until some backend waits for a row lock (bounded)."""
    for _ in range(POLLS_MAX):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no backend ever waited for the lock")


async def _until(predicate, turns: int = 10_000) -> None:  # type: ignore[no-untyped-def]
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_stopping_the_writer_answers_a_batch_waiting_behind_one_in_flight(pool: asyncpg.Pool) -> None:
    """A batch taken from the queue that waits for an in-flight batch on the same account must
    get an answer when the writer stops, not be dropped (its caller would wait forever)."""
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    w = group.writers[0]
    account_id, key_id = await _customer(pool, group)
    locker = await pool.acquire()
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM buckets WHERE account_id = $1 FOR UPDATE", account_id)
        first = asyncio.ensure_future(group.submit(HoldOp(account_id, "stop-1", key_id, Bucket.WALLET, 10)))
        async with pool.acquire() as watcher:
            await _until_lock_wait(watcher)  # the first batch is in the database, blocked
        second = asyncio.ensure_future(group.submit(HoldOp(account_id, "stop-2", key_id, Bucket.WALLET, 20)))
        await _until(lambda: not w._queue.empty())  # noqa: SLF001 - queued,
        await _until(lambda: w._queue.empty())  # noqa: SLF001 - and taken: it waits behind the first
        stopping = asyncio.ensure_future(group.stop())
        await _until(lambda: w._task is None or w._task.done())  # noqa: SLF001
        await tx.rollback()
        await asyncio.wait_for(stopping, WAIT_S)
        assert (await asyncio.wait_for(first, WAIT_S)).amount_nano == 10
        done, _ = await asyncio.wait([second], timeout=WAIT_S)
        assert done, "the batch waiting behind the in-flight one was dropped: its caller hangs"
        outcome = second.exception() or second.result()
        if isinstance(outcome, TFError):
            assert outcome.code == "unavailable"
            expected_held = 10
        else:
            assert outcome.amount_nano == 20
            expected_held = 30
        assert await locker.fetchval(
            "SELECT held_nano FROM buckets WHERE account_id = $1 AND bucket = 'wallet'", account_id) == expected_held
        problems, _ = await store.audit(locker)
        assert problems == []
    finally:
        await pool.release(locker)
        await group.stop()
