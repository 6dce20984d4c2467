"""The store's optimistic write: a row changed between a batch's read and its write undoes the
whole write, and the writer re-reads and re-applies the batch."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import store, writer
from tokenforge.ledger.core import Book, HoldOp, Policy, SettleOp
from tokenforge.money import Bucket

from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)


async def test_a_row_changed_after_the_read_undoes_the_write(pool: asyncpg.Pool) -> None:
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group)
        op = HoldOp(account_id, "occ-r1", key_id, Bucket.WALLET, 100)
        async with pool.acquire() as conn:
            book = Book(now=dt.datetime.now(dt.UTC), policy=POLICY)
            snap = await store.load_book(conn, [op], book)
            book.apply(op)
            async with pool.acquire() as other:  # the key is revoked meanwhile
                await store.revoke_key(other, key_id)
            with pytest.raises(asyncpg.SerializationError):
                await store.write_book(conn, book, snap)
            assert await conn.fetchval("SELECT count(*) FROM holds WHERE request_id = 'occ-r1'") == 0
            assert await conn.fetchval("SELECT count(*) FROM transfers WHERE account_id = $1", account_id) == 1
            assert await conn.fetchval(
                "SELECT held_nano FROM buckets WHERE account_id = $1 AND bucket = 'wallet'", account_id) == 0
    finally:
        await group.stop()


async def test_the_writer_retries_a_batch_that_lost_a_race(pool: asyncpg.Pool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group)
        real_load = store.load_book
        raced = []

        async def load_then_revoke(conn, ops, book):  # type: ignore[no-untyped-def]
            snap = await real_load(conn, ops, book)
            if not raced:
                raced.append(True)
                async with pool.acquire() as other:
                    await store.revoke_key(other, key_id)
            return snap

        monkeypatch.setattr(writer.store, "load_book", load_then_revoke)
        with pytest.raises(TFError) as info:
            await group.submit(HoldOp(account_id, "occ-r2", key_id, Bucket.WALLET, 100))
        # the first attempt admitted the hold; its write failed; the retry saw the revocation
        assert info.value.code == "invalid_api_key"
        assert group.writers[0].stats.conflicts == 1
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM holds WHERE request_id = 'occ-r2'") == 0
            problems, _ = await store.audit(conn)
        assert problems == []
    finally:
        await group.stop()


# ---------------------------------------------------------------------------------------------
# Two batches in flight: only on different accounts, never one account in two transactions


def _pending(account_id: str, n: int) -> writer._Pending:  # noqa: SLF001 - the splitter's input
    return writer._Pending(HoldOp(account_id, f"r{n}", "key", Bucket.WALLET, 1), None)  # type: ignore[arg-type]


async def test_a_large_batch_splits_by_account_keeping_each_accounts_order() -> None:
    batch = [_pending(f"acct{n % 5}", n) for n in range(40)]
    parts = writer._split_by_account(batch, 2)  # noqa: SLF001
    assert len(parts) == 2 and sum(map(len, parts)) == 40
    assert abs(len(parts[0]) - len(parts[1])) <= 8  # one account's 8 operations at most apart
    accounts = [{p.op.account_id for p in part} for part in parts]
    assert not accounts[0] & accounts[1]
    for part in parts:
        for account in {p.op.account_id for p in part}:
            mine = [p.op.request_id for p in part if p.op.account_id == account]
            assert mine == [p.op.request_id for p in batch if p.op.account_id == account]
    hot = [_pending("acct-hot", n) for n in range(40)]
    assert writer._split_by_account(hot, 2) == [hot]  # noqa: SLF001


async def test_batches_overlap_only_on_different_accounts(pool: asyncpg.Pool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    try:
        customers = [await writer_customer(pool, group) for _ in range(6)]
        real_load = store.load_book
        running: list[set[str]] = []
        overlaps: list[set[str]] = []
        concurrent = []

        async def watched_load(conn, ops, book):  # type: ignore[no-untyped-def]
            mine = {op.account_id for op in ops}
            for other in running:
                if other & mine:
                    overlaps.append(other & mine)
            running.append(mine)
            concurrent.append(len(running))
            try:
                return await real_load(conn, ops, book)
            finally:
                running.remove(mine)

        monkeypatch.setattr(writer.store, "load_book", watched_load)
        ops = [HoldOp(a, f"ovl-{i}-{n}", k, Bucket.WALLET, 1) for n in range(6) for i, (a, k) in enumerate(customers)]
        results = await asyncio.gather(*(group.submit(op) for op in ops))
        assert all(r.amount_nano == 1 and not r.replayed for r in results)
        assert overlaps == []
        assert max(concurrent) == 2 and group.writers[0].stats.max_in_flight == 2
        async with pool.acquire() as conn:  # the pool is still usable by others
            problems, _ = await store.audit(conn)
            held = await conn.fetch("SELECT account_id, held_nano FROM buckets WHERE bucket = 'wallet'")
        assert problems == []
        assert {r["account_id"]: r["held_nano"] for r in held} == {a: 6 for a, _ in customers}
    finally:
        await group.stop()


async def test_a_batch_holds_at_most_max_batch_bytes_of_receipts(pool: asyncpg.Pool) -> None:
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group)
        await asyncio.gather(*(group.submit(HoldOp(account_id, f"big-{i}", key_id, Bucket.WALLET, 10)) for i in range(12)))
        stats = group.writers[0].stats
        batches_before, stats.max_batch = stats.batches, 0  # count the settles' batches only
        mib = 1024 * 1024
        settles = [SettleOp(account_id, f"big-{i}", key_id, Bucket.WALLET, 5, "settled", {"n": i}, receipt_bytes=mib)
                   for i in range(12)]
        results = await asyncio.gather(*(group.submit(op) for op in settles))
        assert all(r.amount_nano == 5 and not r.replayed for r in results)
        # 12 MiB of receipts do not fit one 8 MiB batch: two batches (or more), none over 8
        assert stats.batches - batches_before >= 2
        assert writer.MAX_BATCH_BYTES // mib == 8 and stats.max_batch <= 8
        async with pool.acquire() as conn:
            problems, _ = await store.audit(conn)
            assert await conn.fetchval("SELECT count(*) FROM receipts WHERE request_id LIKE 'big-%'") == 12
        assert problems == []
    finally:
        await group.stop()
