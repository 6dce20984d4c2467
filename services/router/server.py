"""The router's gRPC entry point: `tokenforge serve router`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from tokenforge.catalog import CatalogError, bundled_catalog_path, load_catalog
from tokenforge.config import Settings
from tokenforge.errors import MD_ATTEMPTS, MD_RECEIPT
from tokenforge.router import runs
from tokenforge.router.clients import Backends
from tokenforge.router.service import Router
from tokenforge.router.upstream import UpstreamPool
from tokenforge.rpc import install_uvloop, rpc_method, serve
from tokenforge.telemetry import AttemptCollector, setup_tracing
from tokenforge.v1 import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    @rpc_method
    async def ChatCompletion(self, request: router_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext) -> router_pb2.ChatCompletionResponse:
        with self.router.serving():
            response, _ticket = await self.router.chat(context.invocation_metadata(), request)
        s = response.settlement
        context.set_trailing_metadata(((MD_RECEIPT, s.receipt_id), (MD_ATTEMPTS, str(s.attempts))))
        return response

    @rpc_method
    async def StreamChatCompletion(
        self, request: router_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext, parent: Any
    ) -> AsyncIterator[router_pb2.ChatCompletionChunk]:
        async def announce(receipt_id: str, trace_id: str) -> None:
            await context.send_initial_metadata(((MD_RECEIPT, receipt_id), ("tf-trace-id", trace_id)))

        with self.router.serving():
            async for chunk in self.router.stream(context.invocation_metadata(), request, parent, announce):
                yield chunk

    @rpc_method
    async def ListModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        key = await self.router.authenticate(context.invocation_metadata())
        return router_pb2.ListModelsResponse(models=self.router.list_models(key))

    @rpc_method
    async def CatalogModels(self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(models=sorted(self.router.catalog.models))

    @rpc_method
    async def CreateRun(self, request: router_pb2.StartRunRequest, context: grpc.aio.ServicerContext) -> router_pb2.RunResponse:
        key = await self.router.authenticate(context.invocation_metadata())
        return router_pb2.RunResponse(body_json=await runs.create_run(self.router.backends, key, request.body_json))

    @rpc_method
    async def GetRun(self, request: router_pb2.RunRef, context: grpc.aio.ServicerContext) -> router_pb2.RunResponse:
        key = await self.router.authenticate(context.invocation_metadata())
        return router_pb2.RunResponse(body_json=await runs.get_run(self.router.backends, key, request.run_id))

    @rpc_method
    async def CloseRun(self, request: router_pb2.RunRef, context: grpc.aio.ServicerContext) -> router_pb2.RunResponse:
        key = await self.router.authenticate(context.invocation_metadata())
        return router_pb2.RunResponse(body_json=await runs.close_run(self.router.backends, key, request.run_id))


async def _main(settings: Settings) -> None:
    path = settings.catalog_path or str(bundled_catalog_path())
    try:
        catalog = load_catalog(path)
    except CatalogError as exc:
        raise SystemExit(f"router: {exc}") from None
    collector = AttemptCollector()
    setup_tracing("router", collector)
    backends = Backends(settings.ledger_addr, settings.metering_addr)
    pool = UpstreamPool(catalog)
    router = Router(
        catalog=catalog,
        backends=backends,
        pool=pool,
        collector=collector,
        key_cache_ttl_s=settings.key_cache_ttl_s,
        request_deadline_s=settings.request_deadline_s,
    )

    def register(server: grpc.aio.Server) -> Iterable[str]:
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
        return [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    async def on_stop() -> None:
        await router.aclose()
        await pool.aclose()
        await backends.aclose()

    def on_stopping() -> None:
        router.stopping = True  # streams cut from now on ended early: `partial`, not `cancelled`

    await serve(name="router", bind=settings.router_addr, register=register, on_stop=on_stop,
                on_stopping=on_stopping)


def run(settings: Settings) -> int:
    install_uvloop()
    asyncio.run(_main(settings))
    return 0
