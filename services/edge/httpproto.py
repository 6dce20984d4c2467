"""The edge's HTTP/1.1 protocol: uvicorn's httptools protocol with two changes.

1. A request that cannot be parsed (a control character in a header, a broken request line)
   is answered with an OpenAI-shaped JSON error, like every other error of the edge, not
   uvicorn's plain-text "Invalid HTTP request received.".
2. The request line and headers must arrive within `header_timeout_s` of the connection
   opening or of the request's first byte (uvicorn has no such bound: a client that opens a
   connection and trickles headers holds it forever). Past it the client gets a 408 and the
   connection is closed. The body has its own bound (BODY_READ_TIMEOUT_S in app.py), and an
   idle keep-alive connection uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tokenforge.errors import ERROR_TABLE, TFError

HEADER_READ_TIMEOUT_S = 30.0


def _error_response(protocol: HttpToolsProtocol, err: TFError) -> bytes:
    status = ERROR_TABLE[err.code][0]
    body = orjson.dumps(err.openai_body())
    head = [STATUS_LINE[status]]
    for name, value in protocol.server_state.default_headers:
        head.extend([name, b": ", value, b"\r\n"])
    head.extend([
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
        b"connection: close\r\n",
        b"\r\n",
        body,
    ])
    return b"".join(head)


def protocol_class(header_timeout_s: float = HEADER_READ_TIMEOUT_S) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), with its header-read bound."""

    class EdgeHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start_header_timer()  # a further request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            self._stop_header_timer()
            err = TFError("invalid_request", "The request is not valid HTTP/1.1 (a header or the request line "
                                             "holds a character HTTP does not allow, or is malformed).")
            self.transport.write(_error_response(self, err))
            self.transport.close()

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            err = TFError("request_timeout",
                          f"The request line and headers did not arrive within {header_timeout_s:g} s.")
            self.transport.write(_error_response(self, err))
            self.transport.close()

    return EdgeHttpProtocol
