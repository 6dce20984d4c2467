"""Calls to upstream channels: one pooled HTTP client per channel, and the classification
of every way an attempt can end (SPEC §5 `outcome`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

from tokenforge import jsonfast
from tokenforge.catalog import Catalog, Channel

MAX_ERROR_TEXT = 300
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_SSE_LINE_BYTES = 1024 * 1024
MAX_CONNECTIONS_PER_CHANNEL = 512
KEEPALIVE_S = 60.0
DNS_CACHE_S = 60
READ_BUFFER_BYTES = 256 * 1024


def json_bytes(body: dict[str, Any]) -> bytes:
    return jsonfast.dumps(body)


@dataclass
class AttemptFailed(Exception):
    """One attempt that did not produce a usable answer."""

    outcome: str                     # timeout | http_error | connection_error | rate_limited | bad_response | stream_error
    error: str
    http_status: int | None = None
    retry_after_s: float | None = None
    upstream_may_bill: bool = False
    client_fault: bool = False       # the upstream said the request itself is wrong: not retried
    usage: dict[str, int] | None = None
    response_model: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.error)

    @property
    def retryable(self) -> bool:
        return not self.client_fault


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def upstream_reason(resp_text: str) -> str:
    """The upstream's own error message, if it sent an OpenAI-shaped error."""
    try:
        data = json.loads(resp_text)
        message = data.get("error", {}).get("message")
        if isinstance(message, str) and message:
            return _short(message)
    except (ValueError, AttributeError):
        pass
    return _short(resp_text) if resp_text else "no reason given"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def classify_status(status: int, headers: Mapping[str, str], body_text: str) -> AttemptFailed:
    reason = upstream_reason(body_text)
    if status == 429:
        return AttemptFailed("rate_limited", f"429 from upstream: {reason}", status, _retry_after(headers))
    if status in (400, 404, 409, 413, 422):
        return AttemptFailed("http_error", f"{status} from upstream: {reason}", status, client_fault=True)
    return AttemptFailed("http_error", f"{status} from upstream: {reason}", status)


def classify_transport(exc: BaseException, timeout_s: float) -> AttemptFailed:
    """An exception from the HTTP client (aiohttp.ClientError or a timeout) → the outcome."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return AttemptFailed("connection_error", f"could not connect within {timeout_s:g} s")
    if isinstance(exc, TimeoutError):
        return AttemptFailed("timeout", f"no response in {timeout_s:g} s", upstream_may_bill=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return AttemptFailed("connection_error", f"connection failed: {_short(str(exc)) or type(exc).__name__}")
    return AttemptFailed(
        "connection_error",
        f"connection broke: {_short(str(exc)) or type(exc).__name__}",
        upstream_may_bill=True,
    )


@dataclass
class UpstreamPool:
    """One keep-alive HTTP client per channel, made once, shared by every request.

    aiohttp, not httpx: measured against the simulator at 32 concurrent requests, httpx
    (0.29, httpcore pool) spent about 2 ms of CPU per request in its connection pool, aiohttp
    about 0.08 ms (bench/README.md).
    """

    catalog: Catalog
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    urls: dict[str, yarl.URL] = field(default_factory=dict)

    def session(self, channel: Channel) -> aiohttp.ClientSession:
        session = self.sessions.get(channel.id)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=MAX_CONNECTIONS_PER_CHANNEL, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=DNS_CACHE_S
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=channel.timeout_s, sock_read=channel.timeout_s),
                auto_decompress=True,
                read_bufsize=READ_BUFFER_BYTES,
                cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies are never sent back
            )
            self.sessions[channel.id] = session
            self.urls[channel.id] = yarl.URL(channel.base_url.rstrip("/") + "/chat/completions")
        return session

    def url(self, channel: Channel) -> yarl.URL:
        return self.urls[channel.id]

    async def aclose(self) -> None:
        for session in self.sessions.values():
            await session.close()
        self.sessions.clear()


def _headers(channel: Channel, request_id: str, attempt: int) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-tf-request-id": request_id, "x-tf-attempt": str(attempt)}
    api_key = channel.api_key()
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


async def _read_bounded(resp: aiohttp.ClientResponse, limit_bytes: int) -> bytes | None:
    """The whole body, or None when it is over `limit_bytes`."""
    if resp.content_length is not None and resp.content_length > limit_bytes:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def post_json(
    pool: UpstreamPool, channel: Channel, body: dict[str, Any], request_id: str, attempt: int, timeout_s: float
) -> tuple[dict[str, Any], int]:
    """A non-streaming chat completion. Returns the parsed body and HTTP status, or raises
    AttemptFailed. `timeout_s` bounds the whole attempt (connect, send, wait, read)."""
    session = pool.session(channel)
    try:
        async with session.post(
            pool.url(channel),
            data=json_bytes(body),
            headers=_headers(channel, request_id, attempt),
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s),
            allow_redirects=False,
        ) as resp:
            status = resp.status
            raw = await _read_bounded(resp, MAX_RESPONSE_BYTES)
            headers = resp.headers
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise classify_transport(exc, timeout_s) from exc
    if raw is None:
        raise AttemptFailed("bad_response", f"upstream answer over {MAX_RESPONSE_BYTES} bytes", status, upstream_may_bill=True)
    if status != 200:
        raise classify_status(status, headers, raw.decode(errors="replace"))
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise AttemptFailed("bad_response", "upstream sent a body that is not JSON", 200, upstream_may_bill=True) from exc
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise AttemptFailed("bad_response", "upstream answer has no `choices`", 200, upstream_may_bill=True)
    return data, status


class OpenStream:
    """An upstream SSE stream whose first event has arrived."""

    def __init__(self, response: aiohttp.ClientResponse, lines: AsyncIterator[bytes], first: dict[str, Any] | None,
                 timeout_s: float) -> None:
        self.response = response
        self.lines = lines
        self.first = first
        self.timeout_s = timeout_s
        self.finished = False

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The remaining events; a transport failure mid-stream raises AttemptFailed."""
        if self.first is not None:
            first, self.first = self.first, None
            yield first
        try:
            async for event in _sse_events(self.lines):
                yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttemptFailed(
                "stream_error", f"stream broke: {type(exc).__name__}", 200, upstream_may_bill=True
            ) from exc
        self.finished = True

    async def aclose(self) -> None:
        if self.finished:
            self.response.release()  # read to the end: the connection goes back to the pool
        else:
            self.response.close()    # cancelled or broken: drop the connection, the upstream sees it


async def _sse_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body split into lines (LF or CRLF), each at most MAX_SSE_LINE_BYTES."""
    pending = b""
    async for chunk in resp.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
        if len(pending) > MAX_SSE_LINE_BYTES:
            raise AttemptFailed("bad_response", "upstream SSE event too large", 200, upstream_may_bill=True)
    if pending:
        yield pending


async def _sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith(b"data:"):
            continue
        if len(line) > MAX_SSE_LINE_BYTES:
            raise AttemptFailed("bad_response", "upstream SSE event too large", 200, upstream_may_bill=True)
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise AttemptFailed("bad_response", "upstream SSE event is not JSON", 200, upstream_may_bill=True) from exc
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            raise AttemptFailed(
                "stream_error", f"upstream stream error: {upstream_reason(payload.decode(errors='replace'))}", 200,
                upstream_may_bill=True,
            )
        if isinstance(event, dict):
            yield event


async def open_stream(
    pool: UpstreamPool, channel: Channel, body: dict[str, Any], request_id: str, attempt: int, timeout_s: float
) -> OpenStream:
    """Start a streaming completion and wait for its first event; raises AttemptFailed.
    `timeout_s` bounds the connect, the wait for the response, the wait for the first event,
    then each wait for more bytes."""
    session = pool.session(channel)
    try:
        resp = await session.post(
            pool.url(channel),
            data=json_bytes(body),
            headers=_headers(channel, request_id, attempt),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s),
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise classify_transport(exc, timeout_s) from exc
    try:
        if resp.status != 200:
            raw = await _read_bounded(resp, MAX_ERROR_BODY_BYTES)
            raise classify_status(resp.status, resp.headers, (raw or b"").decode(errors="replace"))
        lines = _sse_lines(resp)
        first = None
        # sock_read bounds each read; this bounds an upstream that sends bytes but no event.
        async with asyncio.timeout(timeout_s):
            async for event in _sse_events(lines):
                first = event
                break
    except (aiohttp.ClientError, TimeoutError) as exc:
        resp.close()
        raise classify_transport(exc, timeout_s) from exc
    except BaseException:
        resp.close()
        raise
    return OpenStream(resp, lines, first, timeout_s)
