"""The edge's entry point: `tokenforge serve edge` (uvicorn, uvloop, httptools)."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from tokenforge.config import Settings
from tokenforge.edge.app import Edge, build_app
from tokenforge.edge.httpproto import protocol_class
from tokenforge.rpc import tune_gc
from tokenforge.telemetry import setup_tracing


def run(settings: Settings) -> int:
    if not settings.admin_token:
        raise SystemExit("edge: TF_ADMIN_TOKEN is not set")
    setup_tracing("edge")

    async def main() -> None:
        edge = Edge(
            router_addr=settings.router_addr,
            ledger_addr=settings.ledger_addr,
            admin_token=settings.admin_token,
            max_body_bytes=settings.max_body_bytes,
            router_timeout_s=settings.request_deadline_s + settings.router_grace_s,
        )
        config = uvicorn.Config(
            build_app(edge), host=settings.edge_host, port=settings.edge_port, loop="uvloop",
            # httptools, plus OpenAI-shaped parse errors and a bound on reading headers
            http=protocol_class(),
            log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="off",
            # The edge trusts no forwarding headers (it uses no client address) and sends no
            # Server header: both are per-request work with nothing to show for it.
            proxy_headers=False, server_header=False,
        )
        server = uvicorn.Server(config)
        tune_gc()
        try:
            await server.serve()
        finally:
            with contextlib.suppress(Exception):
                await edge.aclose()

    import uvloop

    uvloop.install()
    asyncio.run(main())
    return 0
