"""The ledger's Batch RPC and the client-side Coalescer, against a real ledger process and
real PostgreSQL: every call gets its own answer or error word, money moves exactly as the
unary calls would move it, and a caller that goes away or a ledger that stops answering
breaks nobody else. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from tokenforge.batching import (
    MAX_BYTES_PER_BATCH,
    MAX_CALLS_PER_BATCH,
    Coalescer,
)
from tokenforge.errors import TFError, from_rpc_error
from tokenforge.rpc import MAX_BATCH_CALLS, client_channel
from tokenforge.v1 import ledger_pb2 as L
from tokenforge.v1 import ledger_pb2_grpc

from .conftest import audit_ok, coalescer, free_port, new_customer, start_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET = 1
ONE = 1_000_000_000
DIME = ONE // 10
CALL_TIMEOUT_S = 10.0
YIELDS_MAX = 1000  # event-loop turns a test waits for a batch to leave, at most


def rid(tag: str = "b") -> str:
    return f"{tag}-{secrets.token_hex(6)}"


def coalescer_for(stub: ledger_pb2_grpc.LedgerServiceStub, kind: str) -> Coalescer:
    return coalescer(stub, kind, L.LedgerCall, L.LedgerBatchRequest)


def hold(
    c: Coalescer, key_id: str, request_id: str, amount_nano: int, timeout_s: float = CALL_TIMEOUT_S
) -> Awaitable[Any]:
    request = L.HoldRequest(
        request_id=request_id, key_id=key_id, bucket=WALLET, amount_nano=amount_nano
    )
    return c.call("hold", request, None, timeout_s)


def settle(c: Coalescer, key_id: str, request_id: str, rated_nano: int) -> Awaitable[Any]:
    request = L.SettleRequest(
        request_id=request_id,
        key_id=key_id,
        bucket=WALLET,
        rated_nano=rated_nano,
        status="settled",
        receipt_json=b"{}",
    )
    return c.call("settle", request, None, CALL_TIMEOUT_S)


def release(c: Coalescer, request_id: str) -> Awaitable[Any]:
    return c.call(
        "release", L.ReleaseRequest(request_id=request_id, bucket=WALLET), None, CALL_TIMEOUT_S
    )


async def wallet(stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str) -> tuple[int, int, int]:
    """(balance, held, available) of the account's wallet, in nano."""
    w = (await stub.GetAccount(L.GetAccountRequest(account_id=account_id))).balances.wallet
    assert w.available_nano == w.balance_nano - w.held_nano
    return w.balance_nano, w.held_nano, w.available_nano


async def until_sent(c: Coalescer, rpcs: int) -> None:
    """Yield to the loop until `c` has started `rpcs` Batch RPCs (bounded in turns, not time)."""
    for _ in range(YIELDS_MAX):
        if c.stats.rpcs >= rpcs:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"no batch left in {YIELDS_MAX} turns: {c.stats}")


async def test_one_turn_of_holds_is_one_batch_each_with_its_own_answer(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE)
    co = coalescer_for(stub, kind)
    rids = [rid("co") for _ in range(50)]
    # all different amounts: one caller's answer cannot pass for another's
    amounts = [(i + 1) * 1_000_000 for i in range(50)]
    answers = await asyncio.gather(
        *(hold(co, c.key_id, r, a) for r, a in zip(rids, amounts, strict=True))
    )
    assert (co.stats.calls, co.stats.rpcs, co.stats.largest) == (50, 1, 50)
    for answer, amount in zip(answers, amounts, strict=True):
        assert isinstance(answer, L.HoldResponse)
        assert (answer.amount_nano, answer.replayed) == (amount, False)
        assert answer.hold_id.startswith("hold_") and answer.expires_at.endswith("Z")
    assert len({a.hold_id for a in answers}) == 50
    assert await wallet(stub, c.account_id) == (10 * ONE, sum(amounts), 10 * ONE - sum(amounts))

    # the same calls again: each is a replay of its own hold, and nothing more is held
    again = await asyncio.gather(
        *(hold(co, c.key_id, r, a) for r, a in zip(rids, amounts, strict=True))
    )
    assert [(a.hold_id, a.amount_nano, a.replayed) for a in again] == [
        (a.hold_id, a.amount_nano, True) for a in answers
    ]
    assert (co.stats.calls, co.stats.rpcs) == (100, 2)
    assert await wallet(stub, c.account_id) == (10 * ONE, sum(amounts), 10 * ONE - sum(amounts))
    await co.aclose()
    await audit_ok(stub)


async def test_more_calls_than_a_batch_holds_are_split(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE)
    co = coalescer_for(stub, kind)
    n = MAX_CALLS_PER_BATCH + 10
    answers = await asyncio.gather(*(hold(co, c.key_id, rid("split"), 1000 + i) for i in range(n)))
    assert [a.amount_nano for a in answers] == [1000 + i for i in range(n)]
    assert (co.stats.calls, co.stats.rpcs, co.stats.largest) == (n, 2, MAX_CALLS_PER_BATCH)
    assert (await wallet(stub, c.account_id))[1] == sum(1000 + i for i in range(n))


async def test_more_bytes_than_a_batch_holds_are_split(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co = coalescer_for(stub, kind)
    rids = [rid("bytes") for _ in range(5)]
    await asyncio.gather(*(hold(co, c.key_id, r, DIME) for r in rids))
    # five receipts of 0.9 MiB: four fit under MAX_BYTES_PER_BATCH, the fifth goes in a second
    receipt = json.dumps({"pad": "x" * (MAX_BYTES_PER_BATCH // 5 + 10_000)}).encode()
    assert 4 * len(receipt) < MAX_BYTES_PER_BATCH < 5 * len(receipt)
    requests = [
        L.SettleRequest(
            request_id=r,
            key_id=c.key_id,
            bucket=WALLET,
            rated_nano=i + 1,
            status="settled",
            receipt_json=receipt,
        )
        for i, r in enumerate(rids)
    ]
    co = coalescer_for(stub, kind)
    settled = await asyncio.gather(*(co.call("settle", q, None, CALL_TIMEOUT_S) for q in requests))
    assert [s.amount_nano for s in settled] == [1, 2, 3, 4, 5]
    assert (co.stats.rpcs, co.stats.calls, co.stats.largest) == (2, 5, 4)
    assert await wallet(stub, c.account_id) == (ONE - 15, 0, ONE - 15)


async def test_a_call_whose_caller_left_before_the_batch_is_not_sent(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co = coalescer_for(stub, kind)
    gone, kept = rid("gone"), rid("kept")
    results = await asyncio.gather(
        hold(co, c.key_id, gone, DIME, timeout_s=0),  # gives up before the batch leaves
        hold(co, c.key_id, kept, 2 * DIME),
        return_exceptions=True,
    )
    assert isinstance(results[0], TFError) and results[0].code == "unavailable"
    assert (results[1].amount_nano, results[1].replayed) == (2 * DIME, False)
    assert (co.stats.rpcs, co.stats.calls) == (1, 1)
    assert await wallet(stub, c.account_id) == (ONE, 2 * DIME, ONE - 2 * DIME)
    with pytest.raises(TFError) as info:
        await release(co, gone)
    assert (info.value.code, info.value.param) == ("not_found", "request_id")


async def test_bad_calls_fail_alone_with_their_own_error_word(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co = coalescer_for(stub, kind)
    good = [rid("good") for _ in range(3)]
    zero_rid, unknown_rid = rid("zero"), rid("unknown")
    calls = [
        hold(co, c.key_id, good[0], DIME),
        hold(co, c.key_id, zero_rid, 0),
        hold(co, c.key_id, good[1], 2 * DIME),
        hold(co, "key_nope", unknown_rid, DIME),
        hold(co, c.key_id, "", DIME),
        hold(co, c.key_id, "x" * 201, DIME),
        hold(co, c.key_id, good[2], 3 * DIME),
        hold(co, c.key_id, rid("broke"), 2 * ONE),
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert co.stats.rpcs == 1
    assert [r.amount_nano for r in (results[0], results[2], results[6])] == [
        DIME,
        2 * DIME,
        3 * DIME,
    ]
    failures = [(r.code, r.param) for r in results if isinstance(r, TFError)]
    assert failures == [
        ("invalid_request", "amount_nano"),
        ("not_found", "key_id"),
        ("invalid_request", "request_id"),
        ("invalid_request", "request_id"),
        ("insufficient_balance", None),
    ], results
    assert "needs up to 2.000000 CNY" in results[7].message and "`max_tokens`" in results[7].message
    # only the good holds moved money; the bad ones left no hold behind
    assert await wallet(stub, c.account_id) == (ONE, 6 * DIME, 4 * DIME)
    for missing in (zero_rid, unknown_rid):
        with pytest.raises(TFError) as info:
            await release(co, missing)
        assert (info.value.code, info.value.param) == ("not_found", "request_id")
    await audit_ok(stub)


async def test_batched_errors_match_their_unary_twins(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co = coalescer_for(stub, kind)
    r = rid("twin")
    await hold(co, c.key_id, r, DIME)
    bad = [
        L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=-1),
        L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=7, amount_nano=DIME),
        # the same request id with another amount: a conflict
        L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=2 * DIME),
        L.HoldRequest(request_id=rid(), key_id="", bucket=WALLET, amount_nano=DIME),
    ]
    batched = await asyncio.gather(
        *(co.call("hold", b, None, CALL_TIMEOUT_S) for b in bad), return_exceptions=True
    )
    for request, got in zip(bad, batched, strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Hold(request)
        unary = from_rpc_error(info.value)
        assert isinstance(got, TFError), got
        assert (got.code, got.param, got.message) == (unary.code, unary.param, unary.message)
    assert [e.code for e in batched] == [
        "invalid_request",
        "invalid_request",
        "conflict",
        "invalid_request",
    ]
    assert await wallet(stub, c.account_id) == (ONE, DIME, ONE - DIME)


async def test_hold_settle_release_in_one_turn_and_a_settle_replay(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE)
    co = coalescer_for(stub, kind)
    to_hold, to_settle, to_release = rid("h"), rid("s"), rid("r")
    await asyncio.gather(
        hold(co, c.key_id, to_settle, DIME), hold(co, c.key_id, to_release, 2 * DIME)
    )
    assert await wallet(stub, c.account_id) == (10 * ONE, 3 * DIME, 97 * DIME)
    rpcs = co.stats.rpcs

    h, s, r = await asyncio.gather(
        hold(co, c.key_id, to_hold, 4 * DIME),
        settle(co, c.key_id, to_settle, 30_000_000),
        release(co, to_release),
    )
    assert co.stats.rpcs == rpcs + 1
    assert isinstance(h, L.HoldResponse) and (h.amount_nano, h.replayed) == (4 * DIME, False)
    assert isinstance(s, L.SettleResponse)
    assert (s.amount_nano, s.held_nano, s.released_nano, s.uncollected_nano, s.replayed) == (
        30_000_000,
        DIME,
        DIME - 30_000_000,
        0,
        False,
    )
    assert s.receipt_id.startswith("rcpt_")
    assert isinstance(r, L.ReleaseResponse) and (r.released_nano, r.replayed) == (2 * DIME, False)
    after = (10 * ONE - 30_000_000, 4 * DIME, 10 * ONE - 30_000_000 - 4 * DIME)
    assert await wallet(stub, c.account_id) == after

    # replays, batched together: same answers, marked replayed, nothing moves
    s2, r2 = await asyncio.gather(
        settle(co, c.key_id, to_settle, 30_000_000), release(co, to_release)
    )
    assert isinstance(s2, L.SettleResponse) and s2.replayed
    assert (s2.receipt_id, s2.amount_nano, s2.held_nano, s2.released_nano) == (
        s.receipt_id,
        s.amount_nano,
        s.held_nano,
        s.released_nano,
    )
    assert isinstance(r2, L.ReleaseResponse) and r2.replayed
    # a settle of the same request with another amount is a conflict, not a second charge
    with pytest.raises(TFError) as info:
        await settle(co, c.key_id, to_settle, 50_000_000)
    assert (info.value.code, info.value.param) == ("conflict", "request_id")
    assert await wallet(stub, c.account_id) == after
    await audit_ok(stub)


async def test_hot_account_race_through_the_coalescer_exactly_100_of_200(stub, kind) -> None:
    """tests/integration/test_ledger_races.py's hot-account race, every hold batched."""
    c = await new_customer(stub, wallet_nano=10 * ONE)
    co = coalescer_for(stub, kind)
    done = asyncio.Event()
    lowest = [2**63]

    async def watch() -> None:
        while not done.is_set():
            _, held, available = await wallet(stub, c.account_id)
            lowest[0] = min(lowest[0], available)
            assert held <= 10 * ONE

    async def one(i: int) -> tuple[str, TFError | None]:
        r = rid(f"race{i}")
        try:
            answer = await hold(co, c.key_id, r, DIME)
        except TFError as exc:
            return r, exc
        assert (answer.amount_nano, answer.replayed) == (DIME, False)
        return r, None

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(one(i) for i in range(200)))
    done.set()
    await asyncio.wait_for(watcher, 10)
    won = [r for r, err in results if err is None]
    refusals = [(err.code, err.param) for _, err in results if err is not None]
    assert len(won) == 100 and refusals == [("insufficient_balance", None)] * 100
    assert co.stats.calls == 200 and co.stats.rpcs < 200
    assert lowest[0] >= 0
    assert await wallet(stub, c.account_id) == (10 * ONE, 10 * ONE, 0)
    settled = await asyncio.gather(*(settle(co, c.key_id, r, DIME) for r in won))
    assert all(s.amount_nano == DIME and not s.replayed for s in settled)
    assert await wallet(stub, c.account_id) == (0, 0, 0)
    await audit_ok(stub)


async def test_a_cancelled_caller_does_not_break_its_batch(stub, kind) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co = coalescer_for(stub, kind)
    rids = [rid("cancel") for _ in range(10)]
    tasks = [asyncio.create_task(hold(co, c.key_id, r, (i + 1) * 1000)) for i, r in enumerate(rids)]
    await until_sent(co, 1)
    assert tasks[3].cancel()
    done, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S)
    assert not pending
    assert tasks[3].cancelled()
    for i, task in enumerate(tasks):
        if i != 3:
            assert (task.result().amount_nano, task.result().replayed) == ((i + 1) * 1000, False)
    assert (co.stats.rpcs, co.stats.calls) == (1, 10)
    # the cancelled call had already left: the ledger applied it, and it releases as usual
    assert (await wallet(stub, c.account_id))[1] == sum((i + 1) * 1000 for i in range(10))
    released = await release(co, rids[3])
    assert (released.released_nano, released.replayed) == (4000, False)
    # and the coalescer carries on
    after = await hold(co, c.key_id, rid("after"), 7)
    assert (after.amount_nano, co.stats.rpcs) == (7, 3)
    await audit_ok(stub)


async def test_nothing_listening_is_unavailable_within_the_call_timeout(kind) -> None:
    async with client_channel(f"127.0.0.1:{free_port()}") as channel:
        co = coalescer_for(ledger_pb2_grpc.LedgerServiceStub(channel), kind)
        started = time.monotonic()
        results = await asyncio.gather(
            *(hold(co, "key_x", rid(), DIME, timeout_s=0.3) for _ in range(3)),
            return_exceptions=True,
        )
        elapsed_s = time.monotonic() - started
    assert [(type(r), getattr(r, "code", None)) for r in results] == [(TFError, "unavailable")] * 3
    assert elapsed_s < 2.0


async def test_a_stopped_ledger_is_unavailable_per_call_deadline(fresh_database_url, tmp_path, kind) -> None:
    """A ledger frozen with SIGSTOP (it accepts nothing, answers nothing): each call gives up
    at its own deadline, not at the longest one in its batch; thawed, the coalescer works
    again; terminated, calls fail fast."""
    private = await start_ledger(fresh_database_url, tmp_path / "ledger.log")
    try:
        async with client_channel(private.addr) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            c = await new_customer(stub, wallet_nano=ONE)
            co = coalescer_for(stub, kind)
            assert (await hold(co, c.key_id, rid("warm"), DIME)).amount_nano == DIME

            private.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                short = asyncio.create_task(hold(co, c.key_id, rid("short"), DIME, timeout_s=0.2))
                long = asyncio.create_task(hold(co, c.key_id, rid("long"), DIME, timeout_s=1.0))
                with pytest.raises(TFError) as info:
                    await asyncio.wait_for(short, 5)
                short_s = time.monotonic() - started
                assert info.value.code == "unavailable"
                # the short call did not wait for its batch's longest deadline
                assert not long.done()
                with pytest.raises(TFError) as info:
                    await asyncio.wait_for(long, 5)
                long_s = time.monotonic() - started
                assert info.value.code == "unavailable"
                assert 0.15 < short_s < 0.95 and 0.95 < long_s < 2.5, (short_s, long_s)
                assert co.stats.rpcs == 2
            finally:
                private.proc.send_signal(signal.SIGCONT)

            thawed = await hold(co, c.key_id, rid("thawed"), DIME)
            assert (thawed.amount_nano, thawed.replayed) == (DIME, False)
            await audit_ok(stub)

            assert private.stop() == 0
            started = time.monotonic()
            with pytest.raises(TFError) as info:
                await hold(co, c.key_id, rid("gone"), DIME, timeout_s=0.5)
            assert info.value.code == "unavailable", info.value.message
            assert time.monotonic() - started < 2.0
    finally:
        private.stop()


async def test_raw_batch_refuses_an_empty_call_alone_and_an_oversized_batch_whole(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    good = L.LedgerCall(
        hold=L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=DIME)
    )
    response = await stub.Batch(L.LedgerBatchRequest(calls=[L.LedgerCall(), good]))
    assert [o.WhichOneof("outcome") for o in response.outcomes] == ["error", "hold"]
    err = response.outcomes[0].error
    assert (err.code, err.param) == ("invalid_request", "calls")
    assert "hold" in err.message and "settle" in err.message
    assert response.outcomes[1].hold.amount_nano == DIME

    empty = await stub.Batch(L.LedgerBatchRequest())
    assert list(empty.outcomes) == []

    too_many = [
        L.LedgerCall(
            hold=L.HoldRequest(request_id=rid("big"), key_id=c.key_id, bucket=WALLET, amount_nano=1)
        )
        for _ in range(MAX_BATCH_CALLS + 1)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Batch(L.LedgerBatchRequest(calls=too_many))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = from_rpc_error(info.value)
    assert (refused.code, refused.param) == ("invalid_request", "calls")
    assert str(MAX_BATCH_CALLS) in refused.message
    # refused whole: not one of its holds was placed
    assert await wallet(stub, c.account_id) == (ONE, DIME, ONE - DIME)
    # exactly the limit is fine
    at_limit = await stub.Batch(L.LedgerBatchRequest(calls=too_many[:MAX_BATCH_CALLS]))
    assert [o.WhichOneof("outcome") for o in at_limit.outcomes] == ["hold"] * MAX_BATCH_CALLS
    assert await wallet(stub, c.account_id) == (
        ONE,
        DIME + MAX_BATCH_CALLS,
        ONE - DIME - MAX_BATCH_CALLS,
    )
    await audit_ok(stub)
