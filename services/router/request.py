"""Validation of an OpenAI chat-completions request body (pure: no I/O).

Both front doors (the REST edge and gRPC callers) send the same JSON body, so this is the one
validator; every error names the field at fault (`param`) in the OpenAI way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenforge import jsonfast
from tokenforge.errors import TFError

MAX_TOKENS_FIELD = 2**31 - 1
PROMPT_SCHEMA_FIELDS = ("tools", "functions", "response_format")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_MESSAGES = 10_000
MAX_N = 8


@dataclass(frozen=True)
class ChatRequest:
    model: str
    body: dict[str, Any]          # the client's body, untouched
    messages_json: bytes          # `messages` re-encoded, for token counting
    quote_json: bytes             # what the hold prices as prompt: messages plus tool/format schemas
    max_tokens: int | None        # max_completion_tokens or max_tokens, if the client set one
    max_tokens_field: str         # which of the two the client used (or max_tokens by default)
    n: int
    stream: bool
    include_usage: bool


def _invalid(message: str, param: str | None) -> TFError:
    return TFError("invalid_request", message, param)


def parse_chat_request(raw: bytes, *, streaming_call: bool | None = None) -> ChatRequest:
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(
            f"We could not parse the JSON body of your request ({exc}). Send valid JSON.", None
        ) from exc
    except RecursionError:
        raise _invalid("The JSON body is nested too deeply.", None) from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)

    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid("`model` is required and must be a non-empty string.", "model")

    messages = body.get("messages")
    if messages is None:
        raise _invalid("`messages` is required: a non-empty array of message objects.", "messages")
    if not isinstance(messages, list):
        raise _invalid("`messages` must be an array of message objects.", "messages")
    if not messages:
        raise _invalid("`messages` must contain at least one message.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise _invalid(f"`messages` may hold at most {MAX_MESSAGES} messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"`messages[{i}]` must be an object.", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _invalid(
                f"`messages[{i}].role` must be one of {', '.join(sorted(ROLES))}.",
                f"messages[{i}].role",
            )
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise _invalid(f"`messages[{i}].content` is required.", f"messages[{i}].content")
        elif not isinstance(content, str | list):
            raise _invalid(
                f"`messages[{i}].content` must be a string or an array of content parts.",
                f"messages[{i}].content",
            )

    max_tokens: int | None = None
    field = "max_tokens"
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(f"`{name}` must be an integer.", name)
        if not 1 <= value <= MAX_TOKENS_FIELD:
            raise _invalid(f"`{name}` must be from 1 to the model's output limit, got {value}.", name)
        if max_tokens is None or value < max_tokens:
            # Both given: the smaller binds (and is what the hold covers and upstream gets).
            max_tokens, field = value, name

    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise _invalid(f"`n` must be an integer from 1 to {MAX_N}.", "n")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("`stream` must be a boolean.", "stream")
    if streaming_call is not None and stream != streaming_call:
        raise _invalid(
            "`stream` must be true for StreamChatCompletion and false for ChatCompletion.",
            "stream",
        )

    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid("`stream_options` must be an object.", "stream_options")
        flag = options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise _invalid(
                "`stream_options.include_usage` must be a boolean.", "stream_options.include_usage"
            )
        include_usage = flag

    messages_json = jsonfast.dumps(messages)
    quote_json = messages_json
    schemas = {k: body[k] for k in PROMPT_SCHEMA_FIELDS if body.get(k) is not None}
    if schemas:
        # Tool and format schemas are prompt tokens upstream too: the hold counts them as
        # one more system message, so a large schema cannot ride on a small hold.
        extra = {"role": "system", "content": json.dumps(schemas, separators=(",", ":"))}
        quote_json = json.dumps([*messages, extra], separators=(",", ":")).encode()
    return ChatRequest(
        model=model,
        body=body,
        messages_json=messages_json,
        quote_json=quote_json,
        max_tokens=max_tokens,
        max_tokens_field=field,
        n=n,
        stream=stream,
        include_usage=include_usage,
    )


def upstream_body(req: ChatRequest, upstream_model: str, max_output_tokens: int) -> dict[str, Any]:
    """What is sent upstream: the client's body with the upstream model name, an explicit
    output cap (so the cost stays inside the hold) and, when streaming, usage always asked for."""
    body = dict(req.body)
    body["model"] = upstream_model
    if req.max_tokens is None:
        body[req.max_tokens_field] = max_output_tokens
    else:
        for name in ("max_completion_tokens", "max_tokens"):
            if body.get(name) is not None:
                body[name] = req.max_tokens  # every cap upstream equals the one held for
    if req.stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return body


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
