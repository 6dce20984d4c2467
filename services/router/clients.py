"""gRPC clients the router uses: the ledger and metering, with failed calls turned back into
the TFError the service raised, and the caller's trace context in the metadata."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.propagate import inject

from tokenforge.errors import TFError, from_rpc_error
from tokenforge.rpc import client_channel
from tokenforge.v1 import ledger_pb2_grpc, metering_pb2_grpc

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

    async def call(self, method: Any, request: Any, ctx: otel_context.Context | None = None,
                   timeout_s: float = CALL_TIMEOUT_S) -> Any:
        try:
            return await method(request, metadata=trace_metadata(ctx), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                # Our own service did not answer: that is not an upstream timeout.
                raise TFError("unavailable", "A tokenforge service did not answer in time; try again.") from None
            raise from_rpc_error(exc) from None

    async def aclose(self) -> None:
        await self._ledger_channel.close()
        await self._metering_channel.close()


__all__ = ["Backends", "TFError", "trace_metadata"]
