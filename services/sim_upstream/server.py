"""`tokenforge serve sim-upstream`: the simulator on uvicorn (uvloop + httptools), one process.

The socket is bound before anything else, so `TF_SIM_PORT=0` works: the ready line printed on
stdout carries the real port (`sim-upstream ready on http://127.0.0.1:PORT`).
"""

from __future__ import annotations

import logging
import signal
import socket

import uvicorn

from tokenforge.config import Settings
from tokenforge.metering import tokens
from tokenforge.sim_upstream.app import SimUpstream, StreamBroken

log = logging.getLogger("tokenforge.sim_upstream")
GRACEFUL_SHUTDOWN_S = 2  # hanging `+timeout` requests must not hold up a stop
BACKLOG = 4096


class _DropBrokenStreams(logging.Filter):
    """A `break_after` stream is broken on purpose; uvicorn would log it as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamBroken)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def run(settings: Settings) -> int:
    try:
        sock = bind(settings.sim_host, settings.sim_port)
    except OSError as exc:
        print(f"sim-upstream: cannot bind {settings.sim_host}:{settings.sim_port}: {exc}", flush=True)
        return 2
    app = SimUpstream()
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        backlog=BACKLOG,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropBrokenStreams())
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # The tokenizers load in the lifespan start-up, before the first request is served.
    tokens.encoding(tokens.DEFAULT_ENCODING)
    log.info("tokenizers loaded: %s", {k: round(v, 3) for k, v in tokens.load_seconds().items()})
    print(f"sim-upstream ready on http://{shown}:{port}", flush=True)
    # uvicorn re-raises the stop signal after its graceful shutdown, under the handlers it
    # found; with these the re-raise is a no-op and a SIGTERM stop exits 0, like our gRPC
    # services (a supervisor can tell a clean stop from a crash).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    server.run(sockets=[sock])
    return 0


def _stopped(signum: int, frame: object) -> None:
    log.info("sim-upstream stopped by signal %d", signum)
