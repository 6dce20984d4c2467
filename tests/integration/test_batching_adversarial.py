"""Adversarial tests of the batched paths: the writer with two batches in flight, the Batch
RPC and the Coalescer under database failures, crashes and stops. Real PostgreSQL and real
processes; every wait is bounded."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from tokenforge.errors import TFError
from tokenforge.ledger import store, writer
from tokenforge.ledger.core import HoldOp, Policy
from tokenforge.money import Bucket

from .conftest import writer_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = Policy(600, 3600, 3600)
WAIT_S = 10.0
POLLS_MAX = 500  # polls of the database (10 ms apart) a test waits for a state, at most


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
    account_id, key_id = await writer_customer(pool, group)
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


async def _terminate_others(conn: asyncpg.Connection) -> int:
    """Terminate every other client backend of this database; wait until they are gone."""
    pids = await conn.fetch(
        """SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND backend_type = 'client backend'""")
    for r in pids:
        await conn.execute("SELECT pg_terminate_backend($1)", r["pid"])
    for _ in range(POLLS_MAX):
        left = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])",
                                   [r["pid"] for r in pids])
        if not left:
            return len(pids)
        await asyncio.sleep(0.01)
    raise AssertionError("terminated backends did not go away")


async def test_the_writer_recovers_when_the_database_drops_its_idle_connections(
        fresh_database_url: str, pool: asyncpg.Pool) -> None:
    """PostgreSQL restarted, a failover, an idle-session timeout: the writer's kept connection
    dies while idle (asyncpg then takes it back into the pool by itself). The next operations
    may fail `unavailable`, but the writer must reconnect, not refuse everything forever."""
    group = writer.WriterGroup(pool, POLICY, 1)
    group.start()
    try:
        account_id, key_id = await writer_customer(pool, group, wallet_nano=10_000)
        await group.submit(HoldOp(account_id, "idle-0", key_id, Bucket.WALLET, 1))  # the kept one is open
        killer = await asyncpg.connect(fresh_database_url)
        try:
            assert await _terminate_others(killer) >= 1
        finally:
            await killer.close()
        outcomes: list[object] = []
        for n in range(1, 6):
            try:
                outcomes.append(await asyncio.wait_for(
                    group.submit(HoldOp(account_id, f"idle-{n}", key_id, Bucket.WALLET, 1)), WAIT_S))
            except TFError as err:
                assert err.code == "unavailable", err
                outcomes.append(err.code)
        assert any(not isinstance(o, str) for o in outcomes), f"the writer never recovered: {outcomes}"
        assert not isinstance(outcomes[-1], str), outcomes
    finally:
        await group.stop()


# ---------------------------------------------------------------------------------------------
# The database kills the ledger's connections while coalesced load runs


async def test_terminated_backends_mid_batch_give_errors_or_correct_answers(fresh_database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tokenforge.batching import Coalescer
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    from .conftest import new_customer, start_ledger

    ledger = await start_ledger(fresh_database_url, tmp_path / "ledger.log")
    held: dict[str, tuple[str, int]] = {}  # request id -> (hold id, amount) acknowledged
    settled: dict[str, tuple[str, int]] = {}  # request id -> (receipt id, amount) acknowledged
    errors: list[str] = []
    kills = 0
    try:
        async with client_channel(ledger.addr) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            customers = [await new_customer(stub, wallet_nano=10**12) for _ in range(8)]
            co = Coalescer(stub.Batch, L.LedgerCall, L.LedgerBatchRequest)
            stop = asyncio.Event()

            async def client(i: int) -> None:
                n = 0
                while not stop.is_set():
                    c = customers[(i * 3 + n) % len(customers)]
                    rid = f"term-{i}-{n}-{secrets.token_hex(3)}"
                    amount = 1_000_000 + i * 1000 + n
                    n += 1
                    try:
                        h = await co.call("hold", L.HoldRequest(request_id=rid, key_id=c.key_id, bucket=1,
                                                                amount_nano=amount, ttl_s=600), None, 10.0)
                    except TFError as err:
                        errors.append(err.code)
                        continue
                    held[rid] = (h.hold_id, h.amount_nano)
                    rated = amount // 2
                    for _ in range(20):
                        try:
                            s = await co.call("settle", L.SettleRequest(
                                request_id=rid, key_id=c.key_id, bucket=1, rated_nano=rated, status="settled",
                                receipt_json=b'{"n": 1}'), None, 10.0)
                        except TFError as err:
                            errors.append(err.code)
                            continue
                        settled[rid] = (s.receipt_id, s.amount_nano)
                        assert s.amount_nano == rated, (rid, s)
                        break

            tasks = [asyncio.create_task(client(i)) for i in range(48)]
            killer = await asyncpg.connect(fresh_database_url)
            try:
                for _ in range(40):
                    await asyncio.sleep(0.05)
                    kills += await killer.fetchval(
                        """SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                            WHERE datname = current_database() AND pid <> pg_backend_pid()
                              AND backend_type = 'client backend') t""")
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                await killer.close()
            await co.aclose()

            audit = await stub.Audit(L.AuditRequest())
            assert audit.ok, list(audit.problems)
    finally:
        ledger.stop()
    print(f"terminated {kills} backends; {len(held)} held, {len(settled)} settled; errors {set(errors)}")
    assert kills > 0 and len(settled) > 20
    assert set(errors) <= {"unavailable"}, set(errors)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        holds = {r["request_id"]: r for r in await conn.fetch("SELECT request_id, id, amount_nano, state FROM holds")}
        receipts = {r["request_id"]: r for r in await conn.fetch("SELECT request_id, id, amount_nano FROM receipts")}
    finally:
        await conn.close()
    for rid, (hold_id, amount) in held.items():
        assert (holds[rid]["id"], holds[rid]["amount_nano"]) == (hold_id, amount), rid
    for rid, (receipt_id, amount) in settled.items():
        assert (receipts[rid]["id"], receipts[rid]["amount_nano"]) == (receipt_id, amount), rid
        assert holds[rid]["state"] == "captured"
    assert len(settled) == len(held), "an acknowledged hold was never settled"


# ---------------------------------------------------------------------------------------------
# Same request twice in one batch; kill -9 during coalesced load


async def test_one_request_twice_in_one_batch_matches_the_unary_path(stub) -> None:  # type: ignore[no-untyped-def]
    from tokenforge.batching import Coalescer
    from tokenforge.v1 import ledger_pb2 as L

    from .conftest import audit_ok, new_customer

    c = await new_customer(stub, wallet_nano=10**10)
    co = Coalescer(stub.Batch, L.LedgerCall, L.LedgerBatchRequest)

    def hold(rid: str, amount: int):  # type: ignore[no-untyped-def]
        return co.call("hold", L.HoldRequest(request_id=rid, key_id=c.key_id, bucket=1, amount_nano=amount), None, WAIT_S)

    def settle(rid: str, rated: int):  # type: ignore[no-untyped-def]
        return co.call("settle", L.SettleRequest(request_id=rid, key_id=c.key_id, bucket=1, rated_nano=rated,
                                                 status="settled", receipt_json=b"{}"), None, WAIT_S)

    # The ledger looks a key's account up once and keeps it; two calls that both miss that race
    # each other to the writer. Warm it, so the calls of one batch reach the writer in order.
    await hold("dup-warm-" + secrets.token_hex(4), 1)
    same = "dup-" + secrets.token_hex(4)
    a, b = await asyncio.gather(hold(same, 100), hold(same, 100))
    assert (a.hold_id, a.replayed, b.hold_id, b.replayed) == (a.hold_id, False, a.hold_id, True)
    other = "dup-" + secrets.token_hex(4)
    results = await asyncio.gather(hold(other, 100), hold(other, 200), return_exceptions=True)
    assert not isinstance(results[0], BaseException) and results[0].amount_nano == 100
    assert isinstance(results[1], TFError) and results[1].code == "conflict"
    # two settles of one request in one batch: one capture, one replay; a different one conflicts
    s1, s2, s3 = await asyncio.gather(settle(same, 60), settle(same, 60), settle(same, 70), return_exceptions=True)
    assert not isinstance(s1, BaseException) and not isinstance(s2, BaseException)
    assert (s1.amount_nano, s1.replayed, s2.receipt_id, s2.replayed) == (60, False, s1.receipt_id, True)
    assert isinstance(s3, TFError) and s3.code == "conflict"
    # hold and settle of one request in one batch, in that order: held, then captured
    fresh = "dup-" + secrets.token_hex(4)
    h, s = await asyncio.gather(hold(fresh, 50), settle(fresh, 30))
    assert (h.amount_nano, s.amount_nano, s.released_nano) == (50, 30, 20)
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (10**10 - 90, 101)
    await co.aclose()
    await audit_ok(stub)


async def test_kill_9_during_coalesced_load(fresh_database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tokenforge.batching import Coalescer
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    from .conftest import new_customer, start_ledger

    log = tmp_path / "ledger.log"
    ledger = await start_ledger(fresh_database_url, log)
    held_ok: dict[str, int] = {}
    settled_ok: dict[str, tuple[str, int]] = {}
    try:
        async with client_channel(ledger.addr) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            customers = [await new_customer(stub, wallet_nano=10**12, credit_nano=10**11) for _ in range(12)]
            co = Coalescer(stub.Batch, L.LedgerCall, L.LedgerBatchRequest)
            enough = asyncio.Event()

            async def client(i: int) -> None:
                n = 0
                while True:
                    c = customers[(i + n) % len(customers)]
                    rid = f"k9-{i}-{n}-{secrets.token_hex(3)}"
                    bucket = 1 if n % 3 else 2
                    n += 1
                    try:
                        await co.call("hold", L.HoldRequest(request_id=rid, key_id=c.key_id, bucket=bucket,
                                                            amount_nano=20_000_000, ttl_s=2), None, 5.0)
                        held_ok[rid] = bucket
                        rated = (n % 5) * 7_000_000
                        res = await co.call("settle", L.SettleRequest(
                            request_id=rid, key_id=c.key_id, bucket=bucket, rated_nano=rated, status="settled",
                            receipt_json=b'{"attempts": []}'), None, 5.0)
                        settled_ok[rid] = (res.receipt_id, res.amount_nano)
                    except TFError as err:
                        assert err.code == "unavailable", err
                        return
                    if len(settled_ok) >= 400:
                        enough.set()

            tasks = [asyncio.create_task(client(i)) for i in range(64)]
            await asyncio.wait_for(enough.wait(), 60)
            ledger.kill9()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        ledger.stop()

    ledger = await start_ledger(fresh_database_url, log)
    try:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            holds = {r["request_id"]: r["state"] for r in await conn.fetch("SELECT request_id, state FROM holds")}
            receipts = {r["request_id"]: (r["id"], r["amount_nano"])
                        for r in await conn.fetch("SELECT request_id, id, amount_nano FROM receipts")}
            assert held_ok.keys() <= holds.keys()
            for rid, got in settled_ok.items():
                assert receipts[rid] == got and holds[rid] == "captured"
            for _ in range(POLLS_MAX * 4):  # the reaper frees what the crash left held (ttl 2 s)
                if not await conn.fetchval("SELECT count(*) FROM holds WHERE state = 'active'"):
                    break
                await asyncio.sleep(0.01)
            assert not await conn.fetchval("SELECT count(*) FROM holds WHERE state = 'active'")
            problems, _ = await store.audit(conn)
            assert problems == []
        finally:
            await conn.close()
    finally:
        assert ledger.stop() == 0


async def test_big_receipts_and_release_racing_settle_in_batches(stub) -> None:  # type: ignore[no-untyped-def]
    from tokenforge.batching import Coalescer
    from tokenforge.v1 import ledger_pb2 as L

    from .conftest import audit_ok, new_customer

    customers = [await new_customer(stub, wallet_nano=10**10) for _ in range(4)]
    co = Coalescer(stub.Batch, L.LedgerCall, L.LedgerBatchRequest)
    big = b'{"pad": "' + b"x" * 900_000 + b'"}'
    rids = [f"big-{n}-{secrets.token_hex(3)}" for n in range(40)]
    owner = {r: customers[n % 4] for n, r in enumerate(rids)}
    await asyncio.gather(*(co.call("hold", L.HoldRequest(request_id=r, key_id=owner[r].key_id, bucket=1,
                                                         amount_nano=1000), None, WAIT_S) for r in rids))
    settles = [co.call("settle", L.SettleRequest(request_id=r, key_id=owner[r].key_id, bucket=1, rated_nano=400,
                                                 status="settled", receipt_json=big), None, 30.0) for r in rids]
    releases = [co.call("release", L.ReleaseRequest(request_id=r, bucket=1), None, 30.0) for r in rids]
    mixed = [x for pair in zip(settles, releases, strict=True) for x in pair]
    results = await asyncio.gather(*mixed, return_exceptions=True)
    captured = 0
    for n in range(len(rids)):
        s, rel = results[2 * n], results[2 * n + 1]
        if isinstance(s, TFError):  # the release came first: nothing charged
            assert s.code == "invalid_request" and not isinstance(rel, BaseException), (s, rel)
            assert rel.released_nano == 1000
        else:
            assert not isinstance(s, BaseException), s
            assert s.amount_nano == 400 and s.released_nano == 600
            assert not isinstance(rel, BaseException) and rel.replayed, rel
            captured += 1
    total = 0
    for c in customers:
        acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
        assert acct.balances.wallet.held_nano == 0
        total += 10**10 - acct.balances.wallet.balance_nano
    assert total == 400 * captured
    await co.aclose()
    await audit_ok(stub)


async def test_batched_lookups_answer_unavailable_when_the_database_drops_connections(
        fresh_database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A batched call that reads before it writes (Release looks its request up) while
    PostgreSQL ends the ledger's sessions: `not_found` or `unavailable`, never internal_error
    (the router retries settlement only on `unavailable`)."""
    from tokenforge.batching import Coalescer
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    from .conftest import start_ledger

    ledger = await start_ledger(fresh_database_url, tmp_path / "ledger.log")
    words: list[str] = []
    try:
        async with client_channel(ledger.addr) as channel:
            co = Coalescer(ledger_pb2_grpc.LedgerServiceStub(channel).Batch, L.LedgerCall, L.LedgerBatchRequest)
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    try:
                        await co.call("release", L.ReleaseRequest(request_id="none-" + secrets.token_hex(4),
                                                                  bucket=1), None, 5.0)
                    except TFError as err:
                        words.append(err.code)

            tasks = [asyncio.create_task(client()) for _ in range(16)]
            killer = await asyncpg.connect(fresh_database_url)
            try:
                for _ in range(40):
                    await asyncio.sleep(0.05)
                    await killer.fetchval(
                        """SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                            WHERE datname = current_database() AND pid <> pg_backend_pid()
                              AND backend_type = 'client backend') t""")
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                await killer.close()
    finally:
        ledger.stop()
    assert "not_found" in words
    assert set(words) <= {"not_found", "unavailable"}, {w: words.count(w) for w in set(words)}
