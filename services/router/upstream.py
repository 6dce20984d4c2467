"""Calls to upstream channels: one pooled HTTP client per channel, and the classification
of every way an attempt can end (SPEC §5 `outcome`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenforge.catalog import Catalog, Channel

MAX_ERROR_TEXT = 300
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_SSE_LINE_BYTES = 1024 * 1024


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


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def classify_status(resp: httpx.Response, body_text: str) -> AttemptFailed:
    status = resp.status_code
    reason = upstream_reason(body_text)
    if status == 429:
        return AttemptFailed("rate_limited", f"429 from upstream: {reason}", status, _retry_after(resp))
    if status in (400, 404, 409, 413, 422):
        return AttemptFailed("http_error", f"{status} from upstream: {reason}", status, client_fault=True)
    return AttemptFailed("http_error", f"{status} from upstream: {reason}", status)


def classify_transport(exc: httpx.HTTPError, timeout_s: float) -> AttemptFailed:
    if isinstance(exc, httpx.ConnectTimeout):
        return AttemptFailed("connection_error", f"could not connect within {timeout_s:g} s")
    if isinstance(exc, httpx.TimeoutException):
        return AttemptFailed("timeout", f"no response in {timeout_s:g} s", upstream_may_bill=True)
    if isinstance(exc, httpx.ConnectError):
        return AttemptFailed("connection_error", f"connection failed: {_short(str(exc)) or type(exc).__name__}")
    return AttemptFailed(
        "connection_error",
        f"connection broke: {_short(str(exc)) or type(exc).__name__}",
        upstream_may_bill=True,
    )


@dataclass
class UpstreamPool:
    """One keep-alive HTTP client per channel, made once, shared by every request."""

    catalog: Catalog
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    def client(self, channel: Channel) -> httpx.AsyncClient:
        client = self.clients.get(channel.id)
        if client is None:
            client = httpx.AsyncClient(
                base_url=channel.base_url,
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=256),
                timeout=httpx.Timeout(channel.timeout_s),
                follow_redirects=False,
            )
            self.clients[channel.id] = client
        return client

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        self.clients.clear()


def _headers(channel: Channel, request_id: str, attempt: int) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-tf-request-id": request_id, "x-tf-attempt": str(attempt)}
    api_key = channel.api_key()
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


async def post_json(
    pool: UpstreamPool, channel: Channel, body: dict[str, Any], request_id: str, attempt: int, timeout_s: float
) -> tuple[dict[str, Any], int]:
    """A non-streaming chat completion. Returns the parsed body and HTTP status, or raises
    AttemptFailed."""
    client = pool.client(channel)
    try:
        resp = await client.post(
            "/chat/completions",
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers=_headers(channel, request_id, attempt),
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise classify_transport(exc, timeout_s) from exc
    if resp.status_code != 200:
        raise classify_status(resp, resp.text)
    try:
        data = resp.json()
    except ValueError as exc:
        raise AttemptFailed("bad_response", "upstream sent a body that is not JSON", 200, upstream_may_bill=True) from exc
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise AttemptFailed("bad_response", "upstream answer has no `choices`", 200, upstream_may_bill=True)
    return data, resp.status_code


@dataclass
class OpenStream:
    """An upstream SSE stream whose first event has arrived."""

    response: httpx.Response
    lines: AsyncIterator[str]
    first: dict[str, Any] | None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        if self.first is not None:
            first, self.first = self.first, None
            yield first
        async for event in _sse_events(self.lines):
            yield event

    async def aclose(self) -> None:
        await self.response.aclose()


class StreamDone(Exception):
    """The upstream sent `data: [DONE]`."""


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        if len(line) > MAX_SSE_LINE_BYTES:
            raise AttemptFailed("bad_response", "upstream SSE event too large", 200, upstream_may_bill=True)
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise AttemptFailed("bad_response", "upstream SSE event is not JSON", 200, upstream_may_bill=True) from exc
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            raise AttemptFailed(
                "stream_error", f"upstream stream error: {upstream_reason(payload)}", 200, upstream_may_bill=True
            )
        if isinstance(event, dict):
            yield event


async def open_stream(
    pool: UpstreamPool, channel: Channel, body: dict[str, Any], request_id: str, attempt: int, timeout_s: float
) -> OpenStream:
    """Start a streaming completion and wait for its first event; raises AttemptFailed."""
    client = pool.client(channel)
    request = client.build_request(
        "POST",
        "/chat/completions",
        content=json.dumps(body, separators=(",", ":")).encode(),
        headers=_headers(channel, request_id, attempt),
        timeout=timeout_s,
    )
    try:
        resp = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise classify_transport(exc, timeout_s) from exc
    if resp.status_code != 200:
        try:
            text = (await resp.aread()).decode(errors="replace")
        except httpx.HTTPError:
            text = ""
        finally:
            await resp.aclose()
        raise classify_status(resp, text)
    lines = resp.aiter_lines()
    try:
        first = None
        async for event in _sse_events(lines):
            first = event
            break
    except httpx.HTTPError as exc:
        await resp.aclose()
        raise classify_transport(exc, timeout_s) from exc
    except AttemptFailed:
        await resp.aclose()
        raise
    return OpenStream(resp, lines, first)
