"""The writer's row cache (services/ledger/rowcache.py): a warm account's holds and settlements
skip the read, and whatever changed behind the cache's back — another ledger process, an admin
revoking a key — is caught by the write, which then reads and applies the batch the usual way.
Every test ends with the ledger's own audit."""

from __future__ import annotations

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import store, writer
from tokenforge.ledger.core import HoldOp, Policy, TopUpOp
from tokenforge.money import Bucket

from .conftest import audit_clean as _audit_ok
from .conftest import bucket_row as _wallet
from .conftest import settle_op as _settle
from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)


@pytest.fixture
async def groups(pool: asyncpg.Pool):  # type: ignore[no-untyped-def]
    """Two writer groups on one database: this ledger process and another one."""
    mine, other = writer.WriterGroup(pool, POLICY, 1), writer.WriterGroup(pool, POLICY, 1)
    mine.start()
    other.start()
    yield mine, other
    await mine.stop()
    await other.stop()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many operations each read of the database (load_book) was for."""
    seen: list[int] = []
    real = store.load_book

    async def counted(conn, ops, book):  # type: ignore[no-untyped-def]
        seen.append(len(ops))
        return await real(conn, ops, book)

    monkeypatch.setattr(writer.store, "load_book", counted)
    return seen


async def test_a_warm_accounts_holds_and_settlements_are_written_without_a_read(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup], reads: list[int]
) -> None:
    mine, _ = groups
    account_id, key_id = await writer_customer(pool, mine)
    await mine.submit(HoldOp(account_id, "warm-0", key_id, Bucket.WALLET, 100))  # cold: reads the key
    assert reads == [1, 1] and mine.writers[0].stats.from_cache == 0  # the top-up, then this hold
    await mine.submit(_settle(account_id, "warm-0", key_id, 37))  # warm from here on
    before = len(reads)
    for n in range(1, 6):
        held = await mine.submit(HoldOp(account_id, f"warm-{n}", key_id, Bucket.WALLET, 100))
        assert held.amount_nano == 100 and not held.replayed
        settled = await mine.submit(_settle(account_id, f"warm-{n}", key_id, 37))
        assert (settled.amount_nano, settled.released_nano, settled.replayed) == (37, 63, False)
    assert len(reads) == before == 2  # eleven operations, no read
    assert mine.writers[0].stats.from_cache == 11 and mine.writers[0].stats.cache_stale == 0
    assert await _wallet(pool, account_id) == (1000 - 6 * 37, 0)
    # A replay is answered from the database (the settled request left the cache): same receipt.
    again = await mine.submit(_settle(account_id, "warm-5", key_id, 37))
    assert again.replayed and again.receipt_id == settled.receipt_id and len(reads) == before + 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM receipts WHERE account_id = $1", account_id) == 6
    await _audit_ok(pool)


async def test_a_key_revoked_behind_the_cache_refuses_the_next_hold(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup], reads: list[int]
) -> None:
    mine, _ = groups
    account_id, key_id = await writer_customer(pool, mine)
    await mine.submit(HoldOp(account_id, "rv-0", key_id, Bucket.WALLET, 100))
    await mine.submit(_settle(account_id, "rv-0", key_id, 10))
    async with pool.acquire() as conn:  # an admin revokes the key: not through the writer
        await store.revoke_key(conn, key_id)
    with pytest.raises(TFError) as info:
        await mine.submit(HoldOp(account_id, "rv-1", key_id, Bucket.WALLET, 100))
    assert info.value.code == "invalid_api_key"
    assert mine.writers[0].stats.cache_stale == 1  # the write caught it; the read decided
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM holds WHERE request_id = 'rv-1'") == 0
    assert await _wallet(pool, account_id) == (990, 0)
    await _audit_ok(pool)


async def test_money_moved_by_another_ledger_process_is_not_overwritten(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine, wallet_nano=500)
    await mine.submit(HoldOp(account_id, "mv-0", key_id, Bucket.WALLET, 100))
    await mine.submit(_settle(account_id, "mv-0", key_id, 100))  # mine believes 400 left
    # The other process takes a hold and tops up: mine's cached bucket and key are now stale.
    await other.submit(HoldOp(account_id, "mv-other", key_id, Bucket.WALLET, 350))
    await other.submit(TopUpOp(account_id, Bucket.WALLET, 1000, "mv-topup"))
    # Mine applies a hold of 300 to its stale rows (it fits the 400 it believes in); the write
    # finds the bucket and the key changed, and mine reads and applies it again.
    held = await mine.submit(HoldOp(account_id, "mv-1", key_id, Bucket.WALLET, 300))
    assert held.amount_nano == 300 and not held.replayed
    assert mine.writers[0].stats.cache_stale == 1
    assert await _wallet(pool, account_id) == (1400, 650)
    # Nobody's hold was lost: both settle to the last unit, and mine is warm again.
    await other.submit(_settle(account_id, "mv-other", key_id, 300))
    settled = await mine.submit(_settle(account_id, "mv-1", key_id, 250))
    assert settled.amount_nano == 250 and settled.released_nano == 50
    assert await _wallet(pool, account_id) == (1400 - 300 - 250, 0)
    await _audit_ok(pool)


async def test_a_stale_balance_in_the_cache_never_refuses_a_hold(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup], reads: list[int]
) -> None:
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine, wallet_nano=100)
    await mine.submit(HoldOp(account_id, "st-0", key_id, Bucket.WALLET, 100))
    await mine.submit(_settle(account_id, "st-0", key_id, 100))  # mine believes 0 left
    await other.submit(TopUpOp(account_id, Bucket.WALLET, 500, "st-topup"))
    before = len(reads)
    held = await mine.submit(HoldOp(account_id, "st-1", key_id, Bucket.WALLET, 200))
    assert held.amount_nano == 200 and len(reads) == before + 1  # the refusal was not trusted
    with pytest.raises(TFError) as info:  # a real shortfall is still refused, after a read
        await mine.submit(HoldOp(account_id, "st-2", key_id, Bucket.WALLET, 301))
    assert info.value.code == "insufficient_balance" and len(reads) == before + 2
    await mine.submit(_settle(account_id, "st-1", key_id, 200))
    assert await _wallet(pool, account_id) == (300, 0)
    await _audit_ok(pool)


async def test_a_request_held_elsewhere_is_read_so_its_settlement_releases_every_hold(
    pool: asyncpg.Pool, groups: tuple[writer.WriterGroup, writer.WriterGroup]
) -> None:
    mine, other = groups
    account_id, key_id = await writer_customer(pool, mine)
    await other.submit(TopUpOp(account_id, Bucket.CREDIT, 1000, "el-credit"))
    await mine.submit(HoldOp(account_id, "el-0", key_id, Bucket.WALLET, 100))
    await mine.submit(_settle(account_id, "el-0", key_id, 10))  # warm
    # The other process holds request el-1 in the wallet; mine then holds it in credit (a
    # fallback) believing it new: the write's check finds the wallet hold, and mine reads.
    await other.submit(HoldOp(account_id, "el-1", key_id, Bucket.WALLET, 200))
    await mine.submit(HoldOp(account_id, "el-1", key_id, Bucket.CREDIT, 300))
    assert mine.writers[0].stats.cache_stale == 1
    settled = await mine.submit(_settle(account_id, "el-1", key_id, 120, Bucket.CREDIT))
    assert settled.amount_nano == 120
    assert await _wallet(pool, account_id) == (990, 0)  # the wallet hold was released too
    assert await _wallet(pool, account_id, Bucket.CREDIT) == (880, 0)
    await _audit_ok(pool)

