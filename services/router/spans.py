"""Attempt spans and their mapping to the receipt's attempt chain.

An attempt's facts are written once, as span attributes; the receipt's `attempts` are read
back from the ended spans (through telemetry.AttemptCollector), so the receipt and the trace
cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span, Status, StatusCode

from tokenforge.router.policy import Eligible
from tokenforge.router.upstream import AttemptFailed
from tokenforge.telemetry import ATTEMPT_SPAN_MARK, hex_span_id

MAY_BILL_OUTCOMES = frozenset({"success", "timeout", "cancelled", "stream_error"})
MAX_TEXT_CHARS = 300


def clean(text: str) -> str:
    """Text from an upstream, safe for a span and a receipt: no control characters, bounded."""
    text = "".join(ch if ch.isprintable() else " " for ch in text[: MAX_TEXT_CHARS * 2])
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


@functools.lru_cache(maxsize=1024)
def _server(base_url: str) -> tuple[str, int]:
    """A channel's host and port, parsed once per base URL instead of once per attempt."""
    url = urlsplit(base_url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def attempt_attributes(el: Eligible, n: int, resend_count: int, key_id: str) -> dict[str, Any]:
    channel = el.channel.channel
    address, port = _server(channel.base_url)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": el.channel.upstream_model,
        "server.address": address,
        "server.port": port,
        "tf.key_id": key_id,
        "tf.channel": channel.id,
        "tf.route": channel.route,
        "tf.role": el.role,
        "tf.bucket": channel.bucket.value,
        ATTEMPT_SPAN_MARK: n,
    }
    if resend_count:
        attrs["http.request.resend_count"] = resend_count
    return attrs


def record_failure(span: Span, failure: AttemptFailed) -> None:
    span.set_attribute("tf.outcome", failure.outcome)
    span.set_attribute("error.type", failure.outcome)
    span.set_attribute("tf.error", clean(failure.error))
    span.set_attribute("tf.upstream_may_bill", failure.upstream_may_bill)
    span.set_attribute("tf.charged", "0")
    if failure.http_status is not None:
        span.set_attribute("http.response.status_code", failure.http_status)
    if failure.response_model:
        span.set_attribute("gen_ai.response.model", clean(failure.response_model))
    if failure.usage:
        _set_usage(span, failure.usage, "upstream")
    span.set_status(Status(StatusCode.ERROR, failure.outcome))


def record_success(
    span: Span,
    *,
    outcome: str,
    http_status: int | None,
    response_model: str | None,
    usage: dict[str, int] | None,
    usage_source: str,
    charged: str,
    error: str | None = None,
) -> None:
    _record_answer(span, outcome, http_status, response_model, usage, usage_source, charged)
    if error:
        span.set_attribute("tf.error", clean(error))
        span.set_attribute("error.type", outcome)
        span.set_status(Status(StatusCode.ERROR, outcome))


def _record_answer(
    span: Span, outcome: str, http_status: int | None, response_model: str | None,
    usage: dict[str, int] | None, usage_source: str, charged: str,
) -> None:
    """What an upstream answered: the outcome, status, model, usage and what it was charged."""
    span.set_attribute("tf.outcome", outcome)
    span.set_attribute("tf.upstream_may_bill", outcome in MAY_BILL_OUTCOMES)
    span.set_attribute("tf.charged", charged)
    if http_status is not None:
        span.set_attribute("http.response.status_code", http_status)
    if response_model:
        span.set_attribute("gen_ai.response.model", clean(response_model))
    if usage is not None:
        _set_usage(span, usage, usage_source)


def record_unpriced(
    span: Span, *, http_status: int | None, response_model: str | None, usage: dict[str, int] | None,
    usage_source: str, reason: str,
) -> None:
    """The upstream answered, but its answer could not be priced (a service the router needs
    for that did not answer): the attempt succeeded upstream, nothing was charged for it."""
    _record_answer(span, "success", http_status, response_model, usage, usage_source, "0")
    span.set_attribute("tf.error", clean(reason))
    span.set_status(Status(StatusCode.ERROR, "not priced"))


def _set_usage(span: Span, usage: dict[str, int], source: str) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", usage["input_tokens"])
    span.set_attribute("gen_ai.usage.output_tokens", usage["output_tokens"])
    span.set_attribute("tf.usage.cached_input_tokens", usage.get("cached_input_tokens", 0))
    span.set_attribute("tf.usage_source", source)


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    stamp = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attempt_from_span(span: ReadableSpan) -> dict[str, Any]:
    a = span.attributes or {}
    usage = None
    if "gen_ai.usage.input_tokens" in a:
        usage = {
            "input_tokens": int(a["gen_ai.usage.input_tokens"]),  # type: ignore[arg-type]
            "output_tokens": int(a["gen_ai.usage.output_tokens"]),  # type: ignore[arg-type]
            "cached_input_tokens": int(a.get("tf.usage.cached_input_tokens", 0)),  # type: ignore[arg-type]
        }
    duration_ms = None
    if span.start_time is not None and span.end_time is not None:
        duration_ms = (span.end_time - span.start_time) // 1_000_000
    attempt: dict[str, Any] = {
        "n": int(a[ATTEMPT_SPAN_MARK]),  # type: ignore[arg-type]
        "span_id": hex_span_id(span.context.span_id),
        "channel": a.get("tf.channel"),
        "role": a.get("tf.role"),
        "route": a.get("tf.route"),
        "upstream_model": a.get("gen_ai.request.model"),
        "response_model": a.get("gen_ai.response.model"),
        "started_at": _iso(span.start_time),
        "duration_ms": duration_ms,
        "outcome": a.get("tf.outcome", "cancelled"),
        "http_status": a.get("http.response.status_code"),
        "error": a.get("tf.error"),
        "upstream_may_bill": bool(a.get("tf.upstream_may_bill", False)),
        "usage": usage,
        "charged": a.get("tf.charged", "0"),
    }
    if usage is not None:
        attempt["usage_source"] = a.get("tf.usage_source", "upstream")
    return attempt
