"""gRPC clients the router uses: the ledger and metering, with failed calls turned back into
the TFError the service raised, and the caller's trace context in the metadata.

The calls every request makes (Quote, Hold, Rate, Settle, Release) go through a `Coalescer`:
those made in the same event-loop turn share one batch, sent as a message on a long-lived
BatchStream call to each service (see tokenforge.batching)."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.propagate import inject

from tokenforge.batching import Coalescer, StreamBatches, call_failure
from tokenforge.errors import TFError
from tokenforge.rpc import client_channel
from tokenforge.v1 import ledger_pb2, ledger_pb2_grpc, metering_pb2, metering_pb2_grpc

CALL_TIMEOUT_S = 10.0


def trace_metadata(ctx: otel_context.Context | None) -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    inject(carrier, context=ctx)
    return tuple(carrier.items())


class Backends:
    """The router's connections to the ledger and metering services."""

    def __init__(self, ledger_addr: str, metering_addr: str) -> None:
        self._ledger_channel = client_channel(ledger_addr)
        self._metering_channel = client_channel(metering_addr)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._ledger_channel)
        self.metering = metering_pb2_grpc.MeteringServiceStub(self._metering_channel)
        self.ledger_batch = Coalescer(
            StreamBatches(self.ledger.BatchStream), ledger_pb2.LedgerCall, ledger_pb2.LedgerBatchRequest)
        self.metering_batch = Coalescer(
            StreamBatches(self.metering.BatchStream), metering_pb2.MeteringCall, metering_pb2.MeteringBatchRequest)
        # stub method → (its coalescer, its field in the service's call message)
        self._batched: dict[Any, tuple[Coalescer, str]] = {
            self.ledger.Hold: (self.ledger_batch, "hold"),
            self.ledger.Release: (self.ledger_batch, "release"),
            self.ledger.Settle: (self.ledger_batch, "settle"),
            self.metering.Quote: (self.metering_batch, "quote"),
            self.metering.Rate: (self.metering_batch, "rate"),
        }

    async def call(self, method: Any, request: Any, ctx: otel_context.Context | None = None,
                   timeout_s: float = CALL_TIMEOUT_S) -> Any:
        batched = self._batched.get(method)
        if batched is not None:
            coalescer, field = batched
            return await coalescer.call(field, request, ctx, timeout_s)
        try:
            return await method(request, metadata=trace_metadata(ctx), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise call_failure(exc) from None

    async def aclose(self) -> None:
        await self.ledger_batch.aclose()
        await self.metering_batch.aclose()
        await self._ledger_channel.close()
        await self._metering_channel.close()


__all__ = ["Backends", "TFError", "trace_metadata"]
