"""Batches as messages on one long-lived BatchStream call (`StreamBatches`, the router's way).

Against a real ledger process: a stream lives across many batches, a ledger that shuts down
ends it (its waiting calls fail `unavailable`, nothing hangs) and the next call opens a new
stream to the restarted ledger; an oversized batch is refused call by call. Against a
servicer in this process, where the server's behaviour must be forced: answers that come back
out of order reach their own callers, and a service that stops reading gives every call its
`unavailable` at its own deadline and the stream is replaced. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tokenforge.batching import Coalescer, StreamBatches
from tokenforge.errors import TFError
from tokenforge.rpc import MAX_BATCH_CALLS, client_channel
from tokenforge.v1 import common_pb2, ledger_pb2_grpc
from tokenforge.v1 import ledger_pb2 as L

from .conftest import audit_ok, free_port, new_customer, start_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET = 1
ONE = 1_000_000_000
DIME = ONE // 10
CALL_TIMEOUT_S = 10.0
WAIT_S = 10.0  # the longest any step here may take


def rid(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(6)}"


def hold_call(key_id: str, request_id: str, amount_nano: int) -> L.HoldRequest:
    return L.HoldRequest(request_id=request_id, key_id=key_id, bucket=WALLET, amount_nano=amount_nano)


def stream_coalescer(stub: ledger_pb2_grpc.LedgerServiceStub) -> tuple[Coalescer, StreamBatches]:
    transport = StreamBatches(stub.BatchStream)
    return Coalescer(transport, L.LedgerCall, L.LedgerBatchRequest), transport


async def test_one_stream_carries_many_batches(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    co, transport = stream_coalescer(stub)
    try:
        for i in range(20):  # one after another: twenty batches
            held = await co.call("hold", hold_call(c.key_id, rid("seq"), i + 1), None, CALL_TIMEOUT_S)
            assert (held.amount_nano, held.replayed) == (i + 1, False)
        together = await asyncio.gather(
            *(co.call("hold", hold_call(c.key_id, rid("par"), 100 + i), None, CALL_TIMEOUT_S) for i in range(30))
        )
        assert [h.amount_nano for h in together] == [100 + i for i in range(30)]
        assert (co.stats.rpcs, transport.streams_opened) == (21, 1)
        held_nano = sum(range(1, 21)) + sum(100 + i for i in range(30))
        w = (await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet
        assert (w.balance_nano, w.held_nano) == (ONE, held_nano)
    finally:
        await co.aclose()
    await audit_ok(stub)


async def test_an_oversized_batch_on_a_stream_is_refused_whole_and_the_stream_goes_on(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    calls = [L.LedgerCall(hold=hold_call(c.key_id, rid("big"), 1)) for _ in range(MAX_BATCH_CALLS + 1)]

    async def batches() -> AsyncIterator[L.LedgerBatchRequest]:
        yield L.LedgerBatchRequest(seq=7, timeout_ms=5000, calls=calls)
        yield L.LedgerBatchRequest(seq=8, timeout_ms=5000, calls=calls[:1])

    answers = [r async for r in stub.BatchStream(batches(), timeout=WAIT_S)]
    by_seq = {a.seq: a for a in answers}
    assert sorted(by_seq) == [7, 8]
    # one error for the whole batch, not one per call (a batch of millions of empty calls
    # must not cost the ledger an answer per call)
    [refused] = by_seq[7].outcomes
    assert (refused.WhichOneof("outcome"), refused.error.code, refused.error.param) == ("error", "invalid_request", "calls")
    assert str(MAX_BATCH_CALLS) in refused.error.message
    # the stream went on: the next batch was answered, and only its hold was placed
    assert by_seq[8].outcomes[0].hold.amount_nano == 1
    w = (await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet
    assert w.held_nano == 1
    await audit_ok(stub)


async def test_a_huge_batch_of_empty_calls_is_refused_quickly(stub) -> None:
    """Two million empty calls (4 MB on the wire): refused in about the time it takes to
    parse them, and the ledger keeps answering others meanwhile."""
    huge = L.LedgerBatchRequest(seq=1, timeout_ms=20_000, calls=[L.LedgerCall()] * 2_000_000)

    async def one() -> AsyncIterator[L.LedgerBatchRequest]:
        yield huge

    started = time.monotonic()
    answers = [r async for r in stub.BatchStream(one(), timeout=WAIT_S)]
    assert [len(a.outcomes) for a in answers] == [1]
    assert answers[0].outcomes[0].error.code == "invalid_request"
    assert time.monotonic() - started < 5.0
    await audit_ok(stub)


async def test_a_ledger_restart_ends_the_stream_and_the_next_call_opens_a_new_one(
    fresh_database_url, tmp_path
) -> None:
    port = free_port()
    private = await start_ledger(fresh_database_url, tmp_path / "ledger-1.log", port=port)
    try:
        async with client_channel(private.addr) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            c = await new_customer(stub, wallet_nano=ONE)
            co, transport = stream_coalescer(stub)
            first = await co.call("hold", hold_call(c.key_id, rid("before"), DIME), None, CALL_TIMEOUT_S)
            assert first.amount_nano == DIME

            assert private.stop() == 0  # SIGTERM: drains, ends the stream, exits
            started = time.monotonic()
            with pytest.raises(TFError) as info:
                await co.call("hold", hold_call(c.key_id, rid("down"), DIME), None, 0.5)
            assert info.value.code == "unavailable"
            assert time.monotonic() - started < 2.0

            private = await start_ledger(fresh_database_url, tmp_path / "ledger-2.log", port=port)
            after: Any = None
            for _ in range(50):  # the channel reconnects with backoff: a bounded number of tries
                try:
                    after = await co.call("hold", hold_call(c.key_id, rid("after"), DIME), None, 0.5)
                    break
                except TFError as err:
                    assert err.code == "unavailable"
            assert after is not None and (after.amount_nano, after.replayed) == (DIME, False)
            assert transport.streams_opened >= 2
            w = (await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet
            assert w.held_nano in (2 * DIME, 3 * DIME)  # "down" may or may not have been placed
            await co.aclose()
            await audit_ok(stub)
    finally:
        private.stop()


# -- a servicer in this process, for what a real one cannot be made to do -------------------


class Scripted(ledger_pb2_grpc.LedgerServiceServicer):
    """Answers hold calls with their amount. `reverse` answers each pair of batches second
    one first; `deaf` reads nothing at all (a frozen or wedged peer)."""

    def __init__(self) -> None:
        self.reverse = False
        self.deaf = False
        self.refuse_whole = False  # answer every batch with one error outcome
        self.delay_s = 0.0  # answer each batch this long after reading it
        self.streams = 0
        self.timeouts_ms: list[int] = []

    async def BatchStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        if self.deaf:
            await asyncio.Event().wait()  # until the client gives the stream up
        held: list[L.LedgerBatchRequest] = []
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            self.timeouts_ms.append(request.timeout_ms)
            held.append(request)
            if self.reverse and len(held) < 2:
                continue
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # the service's slowness, not a synchronisation
            for r in reversed(held):
                if self.refuse_whole:
                    error = common_pb2.CallError(code="invalid_request", message="refused whole", param="calls")
                    outcomes = [L.LedgerOutcome(error=error)]
                else:
                    outcomes = [L.LedgerOutcome(hold=L.HoldResponse(amount_nano=c.hold.amount_nano)) for c in r.calls]
                await context.write(L.LedgerBatchResponse(seq=r.seq, outcomes=outcomes))
            held.clear()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, ledger_pb2_grpc.LedgerServiceStub]]:
    servicer = Scripted()
    server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with client_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, ledger_pb2_grpc.LedgerServiceStub(channel)
    finally:
        await server.stop(0)


async def test_answers_out_of_order_reach_their_own_callers(scripted) -> None:
    servicer, stub = scripted
    servicer.reverse = True
    co, transport = stream_coalescer(stub)
    first = asyncio.create_task(co.call("hold", hold_call("k", rid("a"), 11), None, WAIT_S))
    await asyncio.sleep(0)  # let the first batch leave alone
    for _ in range(1000):
        if co.stats.rpcs == 1:
            break
        await asyncio.sleep(0)
    second = asyncio.create_task(co.call("hold", hold_call("k", rid("b"), 22), None, WAIT_S))
    done, _ = await asyncio.wait({first, second}, timeout=WAIT_S)
    assert len(done) == 2
    assert (first.result().amount_nano, second.result().amount_nano) == (11, 22)
    assert (co.stats.rpcs, transport.streams_opened) == (2, 1)
    await co.aclose()


async def test_a_service_that_stops_reading_fails_each_call_at_its_deadline(scripted) -> None:
    servicer, stub = scripted
    servicer.deaf = True
    co, transport = stream_coalescer(stub)
    started = time.monotonic()
    calls = [co.call("hold", hold_call("k", rid("deaf"), 1), None, 0.3 + 0.1 * (i % 3)) for i in range(12)]
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT_S)
    elapsed_s = time.monotonic() - started
    assert [getattr(r, "code", r) for r in results] == ["unavailable"] * 12
    assert elapsed_s < 2.0, elapsed_s

    servicer.deaf = False  # the wedged stream was given up: a new one answers
    answer: Any = None
    for _ in range(3):
        try:
            answer = await co.call("hold", hold_call("k", rid("ok"), 5), None, 2.0)
            break
        except TFError as err:
            assert err.code == "unavailable"
    assert answer is not None and answer.amount_nano == 5
    assert transport.streams_opened >= 2 and servicer.streams == transport.streams_opened
    await co.aclose()


async def test_a_batch_refused_whole_fails_each_of_its_calls_with_that_error(scripted) -> None:
    servicer, stub = scripted
    servicer.refuse_whole = True
    co, _ = stream_coalescer(stub)
    results = await asyncio.wait_for(asyncio.gather(
        *(co.call("hold", hold_call("k", rid("w"), i + 1), None, WAIT_S) for i in range(5)),
        return_exceptions=True), WAIT_S)
    assert co.stats.rpcs == 1
    assert [(type(r), r.code, r.param) for r in results] == [(TFError, "invalid_request", "calls")] * 5
    await co.aclose()


async def test_a_tight_deadline_does_not_fail_a_neighbour_with_a_longer_one(scripted) -> None:
    """The service answers after 0.4 s. A caller allowed 0.1 s fails; one allowed 10 s on the
    same stream still gets its answer: a short silence is no reason to give the stream up."""
    servicer, stub = scripted
    servicer.delay_s = 0.4
    co, transport = stream_coalescer(stub)
    long = asyncio.create_task(co.call("hold", hold_call("k", rid("long"), 10), None, 10.0))
    for _ in range(1000):  # let the long call's batch leave first, alone
        if co.stats.rpcs == 1:
            break
        await asyncio.sleep(0)
    with pytest.raises(TFError) as info:
        await co.call("hold", hold_call("k", rid("short"), 1), None, 0.1)
    assert info.value.code == "unavailable"
    answer = await asyncio.wait_for(long, WAIT_S)
    assert answer.amount_nano == 10
    assert transport.streams_opened == 1
    await co.aclose()


@pytest.mark.parametrize("timeout_s", [1e7, float("inf")], ids=["116-days", "inf"])
async def test_deadlines_beyond_the_wire_format_are_clamped(scripted, timeout_s: float) -> None:
    servicer, stub = scripted
    co, _ = stream_coalescer(stub)
    answer = await asyncio.wait_for(co.call("hold", hold_call("k", rid("far"), 3), None, timeout_s), WAIT_S)
    assert answer.amount_nano == 3
    assert 0 < servicer.timeouts_ms[-1] <= 2**32 - 1
    await co.aclose()
