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


def call_failure(exc: grpc.aio.AioRpcError) -> TFError:
    """The TFError for a failed call to one of our services."""
    if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        # Our own service did not answer: that is not an upstream timeout.
        return TFError("unavailable", "A tokenforge service did not answer in time; try again.")
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


class Coalescer:
    """Gathers calls to one service's `Batch` method.

    `batch_rpc` is the stub's Batch multicallable; `call_cls` / `request_cls` the service's
    call and batch request messages (e.g. LedgerCall, LedgerBatchRequest).
    """

    def __init__(self, batch_rpc: Callable[..., Any], call_cls: type, request_cls: type) -> None:
        self._rpc = batch_rpc
        self._call_cls = call_cls
        self._request_cls = request_cls
        self._queue: list[_Queued] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.stats = CoalescerStats()

    async def call(self, field: str, request: Any, ctx: otel_context.Context | None, timeout_s: float) -> Any:
        """Send `request` as the `field` call of the next batch; its response, or its TFError."""
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
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TFError("unavailable", "A tokenforge service did not answer in time; try again.") from None

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
            response = await self._rpc(self._request_cls(calls=[q.call for q in chunk]), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            for q in chunk:
                if not q.future.done():
                    q.future.set_exception(call_failure(exc))  # one TFError per caller
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


__all__ = ["Coalescer", "CoalescerStats", "call_failure"]
