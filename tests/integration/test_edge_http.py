"""The edge's HTTP protocol (services/edge/httpproto.py) on a real uvicorn server and real
sockets: OpenAI-shaped parse errors, and the bound on reading a request's line and headers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from tokenforge.edge.httpproto import protocol_class

HEADER_TIMEOUT_S = 0.3
SLOW_APP_S = 3 * HEADER_TIMEOUT_S


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 after reading the body; /slow takes longer than the header bound."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_APP_S)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=protocol_class(HEADER_TIMEOUT_S), lifespan="off", log_level="error",
                            timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: srv.run(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)  # polling a flag the server sets, bounded
    try:
        yield "127.0.0.1", port
    finally:
        srv.should_exit = True
        thread.join(10)


def _read_response(conn: socket.socket, timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP/1.1 response (content-length framed), or what came before the close."""
    conn.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _closed(conn: socket.socket) -> bool:
    conn.settimeout(5.0)
    return conn.recv(1) == b""


def test_a_control_character_in_a_header_is_an_openai_shaped_400(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-TF-Run-Step: a\x01b\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        status, headers, body = _read_response(conn)
        assert status == 400
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
        assert "not valid HTTP/1.1" in error["message"]
        assert _closed(conn)


def test_a_connection_that_sends_nothing_gets_408_after_the_bound(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as conn:
        started = time.monotonic()
        status, headers, body = _read_response(conn)
        waited = time.monotonic() - started
        assert status == 408 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert HEADER_TIMEOUT_S * 0.9 <= waited < HEADER_TIMEOUT_S + 3
        assert _closed(conn)


def test_headers_trickled_past_the_bound_get_408(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the request began; the headers never end
        status, _, body = _read_response(conn)
        assert status == 408
        assert "did not arrive within 0.3 s" in json.loads(body)["error"]["message"]


def test_the_bound_covers_headers_only_and_each_request_of_a_kept_alive_connection(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as conn:
        # an answer slower than the header bound is not cut: the bound stops at the headers
        conn.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(conn)
        assert (status, body) == (200, b"ok")
        # the same connection, idle for longer than the bound between requests, still serves
        # (idle keep-alive has its own timeout) ...
        idle_until = time.monotonic() + 2 * HEADER_TIMEOUT_S  # the idle time under test
        while time.monotonic() < idle_until:
            time.sleep(0.05)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(conn)
        assert (status, body) == (200, b"ok")
        # ... and a further request whose headers stall gets the 408
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        status, _, _ = _read_response(conn)
        assert status == 408
