"""The ledger's reaper loop keeps expiring holds whatever one round of it raises: an error it
did not expect must not end the loop, or every hold after it would stay held forever."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from tokenforge.ledger import server, writer
from tokenforge.ledger.core import HoldOp, Policy
from tokenforge.money import Bucket

from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_reaper_survives_unexpected_errors_and_still_expires_holds(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = writer.WriterGroup(pool, Policy(600, 3600, 3600), 1)
    group.start()
    real = server.reap_once
    faults = [asyncpg.InternalClientError("the connection was just closed"), RuntimeError("unexpected")]
    rounds = 0

    async def flaky(*args: object) -> int:
        nonlocal rounds
        rounds += 1
        if faults:
            raise faults.pop(0)  # the first two rounds fail with errors the loop did not list
        return await real(*args)

    monkeypatch.setattr(server, "reap_once", flaky)
    stop = asyncio.Event()
    task = asyncio.create_task(server.reaper(pool, group, 0.05, stop))
    try:
        account_id, key_id = await writer_customer(pool, group, wallet_nano=1000)
        await group.submit(HoldOp(account_id, "reaped", key_id, Bucket.WALLET, 300, ttl_s=1))
        deadline = time.monotonic() + 15
        while True:
            async with pool.acquire() as conn:
                state = await conn.fetchval("SELECT state FROM holds WHERE request_id = 'reaped'")
                held = await conn.fetchval(
                    "SELECT held_nano FROM buckets WHERE account_id = $1 AND bucket = 'wallet'", account_id)
            if state == "expired":
                break
            assert not task.done(), f"the reaper loop ended: {task.exception()!r}"
            assert time.monotonic() < deadline, f"the hold was not expired (state {state})"
            await asyncio.sleep(0.05)  # polling the database for the reaper's work, bounded
        assert held == 0
        assert rounds >= 3 and not faults  # both faults were met, and the loop went on
        assert not task.done()
    finally:
        stop.set()
        with contextlib.suppress(Exception):  # a loop that died has its error reported above
            await asyncio.wait_for(task, 5)
        await group.stop()
