"""Client-side coalescing: the calls a process makes to one service during one event-loop turn
travel as ONE Batch RPC, and each caller still gets its own answer or error.

Why: a unary gRPC call costs this 2-core machine ~0.12 ms of CPU on each side in Python
(bench/README.md), about as much as the ledger's whole bookkeeping for a hold. Under load the
router has tens of requests holding and settling at once; sent one by one, most of the
ledger's and metering's CPU went to gRPC. Sent together, the per-call cost is that of a
protobuf sub-message, and the ledger's group commit gets them all in one turn.

No waiting is added to get a batch: a call is queued and a flush is scheduled with
`call_soon`, so it leaves as soon as the calls already runnable in this turn have queued
theirs. At one request at a time every batch has one call, and costs what a unary call does.

Each call keeps its own deadline (`asyncio.wait_for`), its own trace context (sent inside the
call, so the service's span has the caller's parent) and its own error: a call that fails
raises the TFError its unary twin would have raised.

How a batch travels is the coalescer's transport:
- `UnaryBatches`: one unary `Batch` call per batch.
- `StreamBatches`: every batch is one message on ONE long-lived `BatchStream` call, matched to
  its response by `seq`. A unary call opens an HTTP/2 stream and builds a server call, a
  servicer context and a cancellation watcher for every batch; a message on an open stream
  does none of that. Measured here with a no-op service at one caller: a unary round trip
  0.34-0.40 ms (0.22-0.26 ms of server CPU), a message on an open stream 0.09-0.16 ms
  (0.06-0.09 ms). The router makes four such calls per request, one after another.
  A stream that ends (the service shut down, restarted or went away) fails the batches
  waiting on it with `unavailable`, and the next batch opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.propagate import inject

from tokenforge.errors import ERROR_TABLE, TFError, from_rpc_error

log = logging.getLogger("tokenforge.batching")

MAX_CALLS_PER_BATCH = 256
MAX_BYTES_PER_BATCH = 4 * 1024 * 1024  # well under the 16 MiB message limit
MAX_WAIT_S = 86_400.0  # longer deadlines (or none: inf) are this; timers and timeout_ms need a number
MAX_TIMEOUT_MS = 2**32 - 1  # the uint32 of the batch messages
# A stream that has taken or answered nothing for this long when a caller's deadline passes is
# given up (frozen, wedged, or a peer gone without a word). A shorter silence is not proof:
# a caller with a tight deadline must not fail its neighbours with longer ones.
STREAM_SILENCE_S = 1.0


def call_failure(exc: grpc.aio.AioRpcError) -> TFError:
    """The TFError for a failed call to one of our services."""
    if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        # Our own service did not answer: that is not an upstream timeout.
        return _unavailable()
    return from_rpc_error(exc)


@dataclass(slots=True)
class _Queued:
    call: Any  # a LedgerCall / MeteringCall
    field: str  # its oneof field, which its outcome must match
    future: asyncio.Future[Any]
    deadline: float  # loop time
    size: int


@dataclass
class CoalescerStats:
    rpcs: int = 0
    calls: int = 0
    largest: int = 0


def _unavailable(why: str = "A tokenforge service did not answer in time; try again.") -> TFError:
    return TFError("unavailable", why)


class UnaryBatches:
    """Each batch is one call of the service's unary `Batch` method."""

    def __init__(self, batch_rpc: Callable[..., Any]) -> None:
        self._rpc = batch_rpc

    async def send(self, request: Any, timeout_s: float) -> Any:
        try:
            return await self._rpc(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise call_failure(exc) from None

    async def aclose(self) -> None:
        return None


class StreamBatches:
    """Each batch is one message on one long-lived `BatchStream` call (opened on first use and
    again after it ends), answered by a response with the same `seq`, in any order.

    `open_stream` is the stub's BatchStream multicallable. Writes go one at a time (gRPC
    allows one outstanding write per call) in the order the batches were sent. A batch whose
    deadline passed while it waited for its turn to write is not sent.
    """

    def __init__(self, open_stream: Callable[[], Any]) -> None:
        self._open = open_stream
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._seq = 0
        self._pending: dict[int, tuple[Any, asyncio.Future[Any]]] = {}  # seq → (its call, its future)
        self._answered_at = 0.0  # loop time of the current stream's last answer (or its opening)
        self._write_started: float | None = None  # loop time the write in progress began
        self.streams_opened = 0

    def _stream(self) -> Any:
        if self._call is None:
            self._call = call = self._open()
            self._answered_at = asyncio.get_running_loop().time()
            self.streams_opened += 1
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
        return self._call

    def _give_up_if_silent(self, call: Any, written_at: float) -> None:
        """A caller's deadline passed. Give the current stream up if it has been silent for
        STREAM_SILENCE_S: a write stuck that long, or our batch written that long ago with no
        answer to anyone since. Its waiting batches fail; the next batch opens a new stream."""
        current = self._call
        if current is None:
            return
        now = asyncio.get_running_loop().time()
        stuck_write = self._write_started is not None and now - self._write_started >= STREAM_SILENCE_S
        unanswered = (call is current and written_at and self._answered_at < written_at
                      and now - written_at >= STREAM_SILENCE_S)
        if stuck_write or unanswered:
            self._abandon(current)

    def _abandon(self, call: Any) -> None:
        if self._call is call:
            self._call = None
        call.cancel()

    async def send(self, request: Any, timeout_s: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout_s, MAX_WAIT_S)
        self._seq += 1
        seq = self._seq
        request.seq = seq
        future: asyncio.Future[Any] = loop.create_future()
        call = None
        written_at = 0.0
        try:
            async with asyncio.timeout_at(deadline):
                async with self._write_lock:
                    call = self._stream()
                    self._pending[seq] = (call, future)
                    request.timeout_ms = min(max(1, int((deadline - loop.time()) * 1000)), MAX_TIMEOUT_MS)
                    self._write_started = loop.time()
                    try:
                        await call.write(request)
                    finally:
                        self._write_started = None
                    written_at = loop.time()
                return await future
        except TimeoutError:
            self._give_up_if_silent(call, written_at)
            raise _unavailable() from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # Our write failed: the stream had ended, or never reached the service (gRPC says
            # INTERNAL for a write to a call that could not start). Either way it is gone.
            if call is not None and not written_at:
                self._abandon(call)
            raise _unavailable("A tokenforge service closed its stream; try again.") from None
        finally:
            self._pending.pop(seq, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved here when the stream's end failed it after we gave up

    async def _read(self, call: Any) -> None:
        failure = _unavailable("A tokenforge service closed its stream; try again.")
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                if self._call is call:
                    self._answered_at = asyncio.get_running_loop().time()
                waiting = self._pending.get(response.seq)
                if waiting is not None and not waiting[1].done():
                    waiting[1].set_result(response)
        except grpc.aio.AioRpcError as exc:
            failure = call_failure(exc)
        except asyncio.CancelledError:
            failure = _unavailable("A tokenforge service call failed; try again.")
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not leave callers waiting
            log.warning("a batch stream failed: %r", exc)
        finally:
            if self._call is call:
                self._call = None
            for waiting_call, future in list(self._pending.values()):
                if waiting_call is call and not future.done():
                    future.set_exception(TFError(failure.code, failure.message, failure.param))

    async def aclose(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)


class Coalescer:
    """Gathers calls to one service's `Batch` method.

    `transport` is a `StreamBatches` or `UnaryBatches` (or the stub's unary Batch
    multicallable, for `UnaryBatches`); `call_cls` / `request_cls` the service's call and
    batch request messages (e.g. LedgerCall, LedgerBatchRequest).
    """

    def __init__(self, transport: Any, call_cls: type, request_cls: type) -> None:
        self._transport = transport if hasattr(transport, "send") else UnaryBatches(transport)
        self._call_cls = call_cls
        self._request_cls = request_cls
        self._queue: list[_Queued] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.stats = CoalescerStats()

    async def call(self, field: str, request: Any, ctx: otel_context.Context | None, timeout_s: float) -> Any:
        """Send `request` as the `field` call of the next batch; its response, or its TFError."""
        if timeout_s <= 0:  # out of time already: it must not leave at all
            raise _unavailable()
        timeout_s = min(timeout_s, MAX_WAIT_S)
        loop = asyncio.get_running_loop()
        carrier: dict[str, str] = {}
        inject(carrier, context=ctx)
        future: asyncio.Future[Any] = loop.create_future()
        call = self._call_cls(trace_context=carrier, **{field: request})
        self._queue.append(_Queued(call, field, future, loop.time() + timeout_s, call.ByteSize()))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise _unavailable() from None

    def _flush(self) -> None:
        self._scheduled = False
        queued, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        chunk: list[_Queued] = []
        size = 0
        for q in queued:
            if q.future.done():  # its caller went away before it was sent
                continue
            if chunk and (len(chunk) >= MAX_CALLS_PER_BATCH or size + q.size > MAX_BYTES_PER_BATCH):
                self._start(loop, chunk)
                chunk, size = [], 0
            chunk.append(q)
            size += q.size
        if chunk:
            self._start(loop, chunk)

    def _start(self, loop: asyncio.AbstractEventLoop, chunk: list[_Queued]) -> None:
        task = loop.create_task(self._send(chunk))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, chunk: list[_Queued]) -> None:
        self.stats.rpcs += 1
        self.stats.calls += len(chunk)
        self.stats.largest = max(self.stats.largest, len(chunk))
        loop = asyncio.get_running_loop()
        timeout_s = max(max(q.deadline for q in chunk) - loop.time(), 0.001)
        try:
            response = await self._transport.send(self._request_cls(calls=[q.call for q in chunk]), timeout_s)
        except TFError as err:
            for q in chunk:
                if not q.future.done():
                    q.future.set_exception(TFError(err.code, err.message, err.param))  # one per caller
            return
        except BaseException as exc:  # cancelled, the channel closed under us, a bug: nobody waits forever
            for q in chunk:
                if not q.future.done():
                    q.future.set_exception(TFError("unavailable", "A tokenforge service call failed; try again."))
            if not isinstance(exc, Exception):
                raise
            log.warning("a batch call failed: %r", exc)
            return
        outcomes = response.outcomes
        if len(outcomes) == 1 and len(chunk) > 1 and outcomes[0].WhichOneof("outcome") == "error":
            outcomes = [outcomes[0]] * len(chunk)  # the batch refused whole (a stream's answer)
        for i, q in enumerate(chunk):
            if q.future.done():
                continue
            if i >= len(outcomes):
                q.future.set_exception(TFError("internal_error", "A tokenforge service answered fewer calls than it was sent."))
                continue
            which = outcomes[i].WhichOneof("outcome")
            if which == q.field:
                q.future.set_result(getattr(outcomes[i], which))
            elif which == "error":
                e = outcomes[i].error
                code = e.code if e.code in ERROR_TABLE else "internal_error"
                q.future.set_exception(TFError(code, e.message, e.param or None))
            else:
                q.future.set_exception(TFError("internal_error", f"A tokenforge service answered {which!r} to a {q.field} call."))

    async def aclose(self) -> None:
        """Wait for the batches already sent (their callers are waiting for them)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self._transport.aclose()


__all__ = ["Coalescer", "CoalescerStats", "StreamBatches", "UnaryBatches", "call_failure"]
