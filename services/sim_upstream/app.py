"""The simulated OpenAI-compatible upstream, as a bare ASGI app (no framework: it must serve
thousands of requests per second on one core, since the benchmark compares the stack with it).

Endpoints: `POST /v1/chat/completions` (plain and SSE streaming), `GET /v1/models`,
`GET /health`, and `GET /sim/log` (the last requests the simulator saw, for tests that check
what reached the upstream and how it ended). Faults: see `faults.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tokenforge.metering import tokens
from tokenforge.sim_upstream import answers, faults

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 8 * 1024 * 1024
LOG_ENTRIES = 2_000
KNOWN_MODELS = 256
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini-compat", "gpt-4o-compat")

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class StreamBroken(Exception):
    """Raised to make the server drop a stream's connection without ending it (break_after)."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away while sending")
        body = message.get("body", b"")
        size += len(body)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    """Wait `seconds`, using no CPU; True as soon as the client disconnects. Once the body has
    been read, the server's receive() returns only when the client goes away."""
    try:
        message = await asyncio.wait_for(receive(), seconds)
    except TimeoutError:
        return False
    return message["type"] == "http.disconnect"


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _usage(prompt: int, completion: int, f: faults.Faults) -> dict[str, Any]:
    total_completion = completion + f.reasoning_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": total_completion,
        "total_tokens": prompt + total_completion,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": f.reasoning_tokens, "audio_tokens": 0},
    }


class SimUpstream:
    """The ASGI application. One instance per process; its state is bounded."""

    def __init__(self) -> None:
        self.tries = faults.TryCounter()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_ENTRIES)
        self.models: dict[str, None] = dict.fromkeys(DEFAULT_MODELS)
        self.requests_total = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path = scope["path"]
        method = scope["method"]
        try:
            if path == "/v1/chat/completions" and method == "POST":
                await self._chat(scope, receive, send)
            elif path in ("/v1/models", "/models") and method == "GET":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenforge-sim"} for m in self.models]
                await _respond(send, 200, json.dumps({"object": "list", "data": data}).encode())
            elif path == "/health" and method == "GET":
                await _respond(send, 200, b'{"status":"ok"}')
            elif path == "/sim/log" and method == "GET":
                body = {"requests_total": self.requests_total, "data": list(self.log)}
                await _respond(send, 200, json.dumps(body).encode())
            else:
                await _respond(send, 404, _error_body(404, f"no route {method} {path}", code="not_found"))
        except BadRequest as exc:
            await _respond(send, exc.status, _error_body(exc.status, exc.message, exc.param, exc.code))
        except ConnectionResetError:
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                answers.vocabulary()  # load the tokenizers before the first request
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _record(self, entry: dict[str, Any], outcome: str, status: int) -> None:
        entry["outcome"] = outcome
        entry["status"] = status
        entry["duration_ms"] = round((time.monotonic() - entry.pop("_t0")) * 1000, 3)
        self.log.append(entry)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests_total += 1
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "body must be a JSON object")
        requested = body.get("model")
        messages = body.get("messages")
        if not isinstance(requested, str) or not requested:
            raise BadRequest(400, "`model` is required", "model")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "`messages` must be a non-empty array", "messages")
        header_faults = _header(scope, b"x-sim-fault")
        try:
            model, f = faults.parse(requested, header_faults)
        except faults.FaultError as exc:
            raise BadRequest(400, str(exc), "model") from None
        if model not in self.models and len(self.models) < KNOWN_MODELS:
            self.models[model] = None
        request_id = _header(scope, b"x-tf-request-id")
        entry: dict[str, Any] = {
            "_t0": time.monotonic(), "request_id": request_id or None, "model": requested,
            "stream": bool(body.get("stream")), "try": 1,
        }

        key = answers.prompt_key(messages)
        if f.counts_tries:
            entry["try"] = self.tries.next_try((request_id or key, requested, header_faults))
        n_try = entry["try"]

        if f.delay_ms and await _client_left_within(receive, f.delay_ms / 1000):
            self._record(entry, "client_gave_up", 0)
            return
        if n_try <= f.timeout_tries:
            # Hang without CPU until the client gives up, bounded so a forgotten client never
            # pins a task forever.
            if await _client_left_within(receive, faults.MAX_TIMEOUT_S):
                self._record(entry, "client_gave_up", 0)
                return
            self._record(entry, "timeout_expired", 504)
            await _respond(send, 504, _error_body(504, "simulated timeout expired"))
            return
        if n_try <= f.rate_limit_tries:
            self._record(entry, "rate_limited", 429)
            after = str(f.rate_limit_after_s).encode()
            headers = [*_JSON, (b"retry-after", after), (b"retry-after-ms", after + b"000")]
            body_429 = _error_body(429, "simulated rate limit: slow down", code="rate_limit_exceeded")
            await _respond(send, 429, body_429, headers)
            return
        if n_try <= f.fail_tries:
            self._record(entry, "error", f.fail_status)
            message = f"simulated upstream error {f.fail_status}"
            await _respond(send, f.fail_status, _error_body(f.fail_status, message))
            return

        encoding_name = tokens.encoding_for_upstream_model(model)
        try:
            prompt = answers.prompt_tokens(messages, encoding_name)
        except ValueError as exc:
            raise BadRequest(400, str(exc), "messages") from None
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest(400, "`max_tokens` must be a positive integer", "max_tokens")
        length = f.tokens if max_tokens is None else min(max_tokens, f.tokens)
        finish = "length" if max_tokens is not None and max_tokens < f.tokens else "stop"
        ans = answers.answer(key, length, encoding_name)
        respond_model = f.respond_model or model
        completion_id = "chatcmpl-sim" + os.urandom(12).hex()
        entry.update(prompt_tokens=prompt, completion_tokens=ans.completion_tokens + f.reasoning_tokens)

        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            await self._stream(send, receive, entry, completion_id, respond_model, ans, prompt, finish, f, include_usage)
            return
        response = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": respond_model,
            "system_fingerprint": "fp_sim",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": ans.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }],
        }
        if not f.no_usage:
            response["usage"] = _usage(prompt, ans.completion_tokens, f)
        self._record(entry, "ok", 200)
        await _respond(send, 200, json.dumps(response, separators=(",", ":")).encode())

    async def _stream(
        self, send: Send, receive: Receive, entry: dict[str, Any], completion_id: str, model: str,
        ans: answers.Answer, prompt: int, finish: str, f: faults.Faults, include_usage: bool,
    ) -> None:
        head = json.dumps({
            "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_sim",
        }, separators=(",", ":"))[:-1]
        tail = ',"usage":null}' if include_usage else "}"

        def chunk(delta: str, finish_reason: str | None = None) -> bytes:
            reason = "null" if finish_reason is None else f'"{finish_reason}"'
            choices = f',"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{reason}}}]'
            return f"data: {head}{choices}{tail}\n\n".encode()

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await send({"type": "http.response.body", "body": chunk('{"role":"assistant","content":""}'), "more_body": True})
        for sent, piece in enumerate(ans.pieces):
            if sent == f.break_after:
                entry["chunks_sent"] = sent
                self._record(entry, "broken", 200)
                raise StreamBroken(f"break_after={f.break_after}")
            if f.chunk_delay_ms and await _client_left_within(receive, f.chunk_delay_ms / 1000):
                entry["chunks_sent"] = sent
                self._record(entry, "client_gave_up", 200)
                return
            body = chunk('{"content":' + json.dumps(piece) + "}")
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if f.break_after >= len(ans.pieces):  # a short answer still breaks, before its end
            entry["chunks_sent"] = len(ans.pieces)
            self._record(entry, "broken", 200)
            raise StreamBroken(f"break_after={f.break_after}")
        out = [chunk("{}", finish)]
        if include_usage and not f.no_usage:
            usage = json.dumps(_usage(prompt, ans.completion_tokens, f), separators=(",", ":"))
            out.append(f'data: {head},"choices":[],"usage":{usage}}}\n\n'.encode())
        out.append(b"data: [DONE]\n\n")
        self._record(entry, "ok", 200)
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})
