"""One request's life (DESIGN.md, the settlement protocol): authenticate, pick channels,
quote, hold, attempt with tenacity (retry, then fall back), settle with a receipt built from
the attempt spans. Knows nothing of SQL; money moves only through the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from tokenforge import jsonfast
from tokenforge.catalog import Catalog
from tokenforge.errors import TFError
from tokenforge.money import Bucket, format_nano
from tokenforge.router import spans as attempt_spans
from tokenforge.router.clients import Backends
from tokenforge.router.keys import KeyCache, KeyInfo, secret_from_metadata
from tokenforge.router.policy import Eligible, eligible_channels, visible_models
from tokenforge.router.receipt import Done, Rated, build_draft
from tokenforge.router.request import ChatRequest, parse_chat_request, upstream_body
from tokenforge.router.stream_state import StreamState
from tokenforge.router.upstream import (
    AttemptFailed,
    OpenStream,
    UpstreamPool,
    open_stream,
    post_json,
)
from tokenforge.router.usage import (
    message_text,
    openai_usage,
    usage_from_openai,
    usage_from_openai_or_none,
)
from tokenforge.telemetry import AttemptCollector, hex_trace_id
from tokenforge.v1 import common_pb2, ledger_pb2, metering_pb2, router_pb2

log = logging.getLogger("tokenforge.router")
T = TypeVar("T")

RETRY_AFTER_CAP_S = 10.0
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0
REFUSAL_CODES = frozenset({"insufficient_balance", "key_budget_exceeded", "run_budget_exceeded"})
HOLD_MARGIN_S = 60
UNANSWERED_HOLD_TRIES = 7  # waits 0.5, 0.5, 1, 2, 4, 8, 16 s: ~32 s in all
UNANSWERED_HOLD_FIRST_WAIT_S = 0.5
UNANSWERED_HOLD_MAX_WAIT_S = 16.0
MAX_RUN_FIELD_CHARS = 200
# Settling keeps trying for this long while the ledger is unavailable; well inside the hold's
# margin (HOLD_MARGIN_S), so the hold is still there when the ledger is back.
SETTLE_RETRY_S = 30.0
SETTLE_FIRST_BACKOFF_S = 0.1  # doubling up to the cap
SETTLE_BACKOFF_CAP_S = 2.0
# Rating (and counting) the output an upstream gave keeps trying for this long while
# metering is unavailable (restarting): pure calls, safe to repeat. Rating plus settling
# stays inside the hold's margin (HOLD_MARGIN_S).
RATE_RETRY_S = 15.0
# What a `cancelled` receipt says ended the request (its `error`).
CLIENT_LEFT_BEFORE_ANSWER = {
    "code": "cancelled", "message": "The client went away before an answer; nothing was charged."}
CLIENT_LEFT_DURING_STREAM = {
    "code": "cancelled", "message": "The client went away during the stream; charged for the output generated until then."}


def receipt_error(err: TFError) -> dict[str, str]:
    """A receipt's `error`: the error the client got."""
    return {"code": err.code, "message": err.message}


def check_run_fields(run_id: str, run_step: str) -> None:
    for name, value in (("run_id", run_id), ("run_step", run_step)):
        if len(value) > MAX_RUN_FIELD_CHARS or not value.isprintable():
            raise TFError("invalid_request", f"`{name}` must be printable text of at most {MAX_RUN_FIELD_CHARS} "
                          "characters (headers X-TF-Run-Id, X-TF-Run-Step).", name)


@dataclass
class Ticket:
    """An admitted request: authenticated, priced and holding money."""

    request_id: str
    key: KeyInfo
    req: ChatRequest
    eligible: list[Eligible]
    run_id: str
    run_step: str
    span: Span
    ctx: otel_context.Context
    deadline: float
    max_output_per_choice: int
    receipt_id: str = ""
    unsettled_json: bytes = b""  # the receipt the ledger writes if this request is never settled
    prompt_tokens: int = 0
    pending_hold: tuple[Bucket, int, asyncio.Future[Any]] | None = None
    holds: dict[Bucket, int] = field(default_factory=dict)
    attempts: int = 0
    skipped: list[str] = field(default_factory=list)  # fallbacks not tried: "channel (why)"


class AllFailed(Exception):
    def __init__(self, last: AttemptFailed | None, all_timeouts: bool) -> None:
        super().__init__(last.error if last else "no channel could be tried")
        self.last = last
        self.all_timeouts = all_timeouts


class Router:
    def __init__(
        self,
        *,
        catalog: Catalog,
        backends: Backends,
        pool: UpstreamPool,
        collector: AttemptCollector,
        key_cache_ttl_s: float,
        request_deadline_s: float,
    ) -> None:
        self.catalog = catalog
        self.backends = backends
        self.pool = pool
        self.collector = collector
        self.keys = KeyCache(key_cache_ttl_s)
        self.request_deadline_s = request_deadline_s
        self.tracer = trace.get_tracer("tokenforge.router")
        self._background: set[asyncio.Task[Any]] = set()
        # Background work that may be dropped at shutdown: releasing a hold whose Hold got no
        # answer (it expires on its own anyway). Settlements are never in here.
        self._best_effort: set[asyncio.Task[Any]] = set()
        self._requests: set[asyncio.Task[Any]] = set()  # the tasks serving a chat call now
        self.stopping = False  # set when the process was told to stop (streams cut then are `partial`)

    # ---- admission -------------------------------------------------------------------------

    async def authenticate(self, metadata: Any, ctx: otel_context.Context | None = None) -> KeyInfo:
        secret = secret_from_metadata(metadata)
        digest = KeyCache.digest(secret)
        key = self.keys.get(digest)
        if key is None:
            pb = await self.backends.call(
                self.backends.ledger.AuthenticateKey, ledger_pb2.AuthenticateKeyRequest(secret=secret), ctx
            )
            key = KeyInfo.from_pb(pb)
            self.keys.put(digest, key)
        return key

    def list_models(self, key: KeyInfo) -> list[str]:
        return visible_models(self.catalog, key.route_policy, key.allowed_models)

    async def _admit(
        self, key: KeyInfo, req: ChatRequest, pb: router_pb2.ChatCompletionRequest, parent: otel_context.Context | None
    ) -> Ticket:
        eligible = eligible_channels(self.catalog, req.model, key.route_policy, key.allowed_models)
        model = self.catalog.models[req.model]
        if req.max_tokens is not None and req.max_tokens > model.max_output_tokens:
            raise TFError("invalid_request", f"`{req.max_tokens_field}` may be at most {model.max_output_tokens} "
                          f"for `{req.model}`, got {req.max_tokens}.", req.max_tokens_field)
        check_run_fields(pb.run_id, pb.run_step)
        span = self.tracer.start_span(
            f"chat {req.model}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": req.model,
                "tf.key_id": key.id,
                "tf.route_policy": key.route_policy,
                "tf.stream": req.stream,
            },
        )
        ctx = trace.set_span_in_context(span, parent)
        request_id = f"req_{uuid.uuid4().hex}"
        span.set_attribute("tf.request_id", request_id)
        if pb.run_id:
            span.set_attribute("tf.run_id", pb.run_id)
        ticket = Ticket(
            request_id=request_id,
            key=key,
            req=req,
            eligible=eligible,
            run_id=pb.run_id,
            run_step=pb.run_step,
            span=span,
            ctx=ctx,
            deadline=asyncio.get_running_loop().time() + self.request_deadline_s,
            max_output_per_choice=req.max_tokens or model.max_output_tokens,
            receipt_id=f"rcpt_{uuid.uuid4().hex[:24]}",
        )
        ticket.unsettled_json = self._unsettled_draft(ticket)
        try:
            await self._hold(ticket, eligible[0])
        except TFError as err:
            span.set_status(Status(StatusCode.ERROR, err.code))
            span.set_attribute("error.type", err.code)
            span.end()
            if ticket.run_id and err.code in REFUSAL_CODES:
                await self._record_refusal(ticket, err.code)
            raise
        except BaseException:
            # The caller went away while we priced or held: release whatever got held.
            self._in_background(self._finish_abandoned(ticket))
            raise
        return ticket

    async def _hold(self, t: Ticket, el: Eligible) -> None:
        """Quote `el`'s worst case and hold it in `el`'s bucket."""
        channel = el.channel.channel
        # The hold also covers every later channel of the same bucket, so a fallback to a
        # pricier backup never costs more than was held.
        later = t.eligible[t.eligible.index(el) + 1:]
        cover = [e.channel.channel.id for e in later if e.channel.channel.bucket is channel.bucket]
        quote = await self.backends.call(
            self.backends.metering.Quote,
            metering_pb2.QuoteRequest(
                model=t.req.model,
                channel_id=channel.id,
                messages_json=t.req.quote_json,
                max_tokens=t.max_output_per_choice * t.req.n,
                cover_channel_ids=cover,
            ),
            t.ctx,
        )
        t.prompt_tokens = quote.prompt_tokens
        call = asyncio.ensure_future(self.backends.call(
            self.backends.ledger.Hold,
            ledger_pb2.HoldRequest(
                request_id=t.request_id,
                key_id=t.key.id,
                bucket=channel.bucket.to_pb(),
                amount_nano=quote.amount_nano,
                run_id=t.run_id,
                # Outlives the request's deadline; after a crash the reaper frees it soon after
                # and, if we never settled, stores this receipt (failed, nothing charged).
                ttl_s=int(self.request_deadline_s) + HOLD_MARGIN_S,
                unsettled_receipt_json=t.unsettled_json,
            ),
            t.ctx,
        ))
        # If the caller goes away meanwhile, the hold may still be taken: it is shielded and
        # remembered, so whoever settles the abandoned request waits for it and releases it.
        t.pending_hold = (channel.bucket, quote.amount_nano, call)
        try:
            held = await asyncio.shield(call)
        except TFError as err:
            t.pending_hold = None  # refused: nothing held
            if err.code == "unavailable":
                # No answer is not a refusal: the ledger may still apply the hold after we gave
                # up (it was slow, or frozen with our batch in its socket). Release it once it
                # shows, instead of leaving the customer's money held until the hold expires.
                self._in_background(self._release_unanswered_hold(t, channel.bucket), self._best_effort)
            raise
        t.pending_hold = None
        # Request ids are fresh per request, so a replay is our own hold answered twice: the
        # ledger committed it, lost the connection before answering, and answered it again
        # as a replay on the retry. It is held all the same (a replay matches the parameters).
        t.holds[channel.bucket] = held.amount_nano

    async def _release_unanswered_hold(self, t: Ticket, bucket: Bucket) -> None:
        """Release the hold of a Hold call that got no answer, if the ledger applied it after
        all. Release is idempotent; `not_found` means it has not shown (yet), so tenacity asks
        again with backoff, about 30 s in all, well inside the hold's own expiry."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(UNANSWERED_HOLD_TRIES),
            wait=wait_exponential(multiplier=UNANSWERED_HOLD_FIRST_WAIT_S, max=UNANSWERED_HOLD_MAX_WAIT_S),
            retry=retry_if_exception(lambda e: isinstance(e, TFError) and e.code in ("not_found", "unavailable")),
            reraise=True,
        )
        try:
            await asyncio.sleep(UNANSWERED_HOLD_FIRST_WAIT_S)
            async for attempt in retrying:
                with attempt:
                    released = await self.backends.call(
                        self.backends.ledger.Release,
                        ledger_pb2.ReleaseRequest(request_id=t.request_id, bucket=bucket.to_pb()),
                        t.ctx,
                    )
            log.info("released %s held by request %s after its Hold went unanswered",
                     format_nano(released.released_nano), t.request_id)
        except TFError as err:
            if err.code != "not_found":
                log.warning("could not release the unanswered hold of %s (%s); it expires on its own",
                            t.request_id, err.code)

    async def _record_refusal(self, t: Ticket, code: str) -> None:
        try:
            await self.backends.call(
                self.backends.ledger.RecordRefusal,
                ledger_pb2.RecordRefusalRequest(run_id=t.run_id, key_id=t.key.id, code=code),
                t.ctx,
            )
        except TFError:
            log.warning("could not record a refusal for run %s", t.run_id)

    async def _ensure_hold(self, t: Ticket, el: Eligible) -> bool:
        """Before an attempt on another route's channel: hold in its bucket first (policy auto
        falls back to direct only if Credit covers the hold), then release the old bucket."""
        bucket = el.channel.channel.bucket
        if bucket in t.holds:
            return True
        try:
            await self._hold(t, el)
        except TFError as err:
            if err.code in REFUSAL_CODES:
                t.span.add_event("fallback skipped", {"tf.channel": el.channel.channel.id, "tf.reason": err.code})
                t.skipped.append(f"{el.channel.channel.id} ({err.code} in {bucket.value})")
                return False
            raise
        for other in [b for b in t.holds if b is not bucket]:
            await self.backends.call(
                self.backends.ledger.Release,
                ledger_pb2.ReleaseRequest(request_id=t.request_id, bucket=other.to_pb()),
                t.ctx,
            )
            del t.holds[other]
        return True

    # ---- attempts --------------------------------------------------------------------------

    def _remaining_s(self, t: Ticket) -> float:
        return t.deadline - asyncio.get_running_loop().time()

    def _attempt_timeout_s(self, t: Ticket, el: Eligible) -> float:
        return max(0.001, min(el.channel.channel.timeout_s, self._remaining_s(t)))

    async def _attempt_loop(
        self, t: Ticket, run_one: Callable[[Ticket, Eligible, int, int], Awaitable[T]]
    ) -> T:
        """Tenacity retries each channel up to its `retries`, then we fall back to the next."""
        last: AttemptFailed | None = None
        outcomes: list[str] = []

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, AttemptFailed) and exc.retry_after_s is not None:
                delay = min(exc.retry_after_s, RETRY_AFTER_CAP_S)
            else:
                delay = min(BACKOFF_FIRST_S * 2 ** (state.attempt_number - 1), BACKOFF_CAP_S)
            return max(0.0, min(delay, self._remaining_s(t) - 0.01))

        def out_of_time(state: RetryCallState) -> bool:
            return self._remaining_s(t) <= 0.01

        for el in t.eligible:
            if self._remaining_s(t) <= 0.01:
                break
            if not await self._ensure_hold(t, el):
                continue
            retrying = AsyncRetrying(
                stop=stop_after_attempt(el.channel.channel.retries + 1) | out_of_time,
                wait=wait,
                retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed) and e.retryable),
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        t.attempts += 1
                        resend = attempt.retry_state.attempt_number - 1
                        return await run_one(t, el, t.attempts, resend)
            except AttemptFailed as failure:
                last = failure
                outcomes.append(failure.outcome)
                if failure.client_fault:
                    raise
        raise AllFailed(last, bool(outcomes) and all(o == "timeout" for o in outcomes))

    def _start_attempt_span(self, t: Ticket, el: Eligible, n: int, resend: int) -> Span:
        return self.tracer.start_span(
            f"chat {el.channel.upstream_model}",
            context=t.ctx,
            kind=SpanKind.CLIENT,
            attributes=attempt_spans.attempt_attributes(el, n, resend, t.key.id),
        )

    async def _after_upstream(self, method: Any, request: Any, ctx: otel_context.Context) -> Any:
        """A metering call made once an upstream has answered (Rate, CountTokens): that
        output is billable, so a metering restart must not lose its receipt. These calls are
        pure, so they are asked again while metering is unavailable."""
        return await self._call_while_unavailable(
            method, request, ctx, RATE_RETRY_S, "metering is unavailable after an upstream answered")

    async def _count_text(self, t: Ticket, text: str) -> int:
        if not text:
            return 0
        resp = await self._after_upstream(
            self.backends.metering.CountTokens,
            metering_pb2.CountTokensRequest(model=t.req.model, text=text),
            t.ctx,
        )
        return int(resp.tokens)

    async def _estimated_usage(self, t: Ticket, text: str) -> dict[str, int]:
        """Usage for an answer whose upstream reported none (or none that could be rated):
        the quoted prompt tokens, and the output counted from `text`."""
        return {"input_tokens": t.prompt_tokens, "output_tokens": await self._count_text(t, text),
                "cached_input_tokens": 0, "reasoning_tokens": 0}

    async def _rate(self, t: Ticket, el: Eligible, usage: dict[str, int], source: str) -> Rated:
        primary = t.eligible[0].channel.channel.id
        channel = el.channel.channel.id
        try:
            resp = await self._after_upstream(
                self.backends.metering.Rate,
                metering_pb2.RateRequest(
                    model=t.req.model,
                    channel_id=channel,
                    usage=common_pb2.Usage(**usage),
                    compare_channel_id=primary if primary != channel else "",
                ),
                t.ctx,
            )
        except TFError as err:
            if err.code == "invalid_request":
                raise AttemptFailed(
                    "bad_response", f"upstream usage contradicts itself: {err.message}", 200, upstream_may_bill=True
                ) from None
            raise
        compare = resp.compare_amount_nano if primary != channel else resp.amount_nano
        return Rated(usage, source, resp.amount_nano, Bucket.from_pb(resp.bucket), resp.price, compare)

    async def _attempt_unary(self, t: Ticket, el: Eligible, n: int, resend: int) -> Done:
        span = self._start_attempt_span(t, el, n, resend)
        status: int | None = None
        response_model: str | None = None
        usage: dict[str, int] | None = None
        source = "upstream"
        try:
            body = upstream_body(t.req, el.channel.upstream_model, t.max_output_per_choice)
            data, status = await post_json(
                self.pool, el.channel.channel, body, t.request_id, n, self._attempt_timeout_s(t, el)
            )
            response_model = data.get("model") if isinstance(data.get("model"), str) else None
            try:
                usage = usage_from_openai(data.get("usage"))
            except AttemptFailed as failure:
                failure.response_model = response_model
                raise
            if usage is None:
                usage = await self._estimated_usage(t, message_text(data.get("choices")))
                source = "estimated"
                data["usage"] = openai_usage(usage)  # what was billed, as the client expects a usage
            rated = await self._rate(t, el, usage, source)
            attempt_spans.record_success(
                span, outcome="success", http_status=status, response_model=response_model,
                usage=usage, usage_source=source, charged=format_nano(rated.amount_nano),
            )
            data["model"] = t.req.model
            return Done(el, n, rated, data)
        except AttemptFailed as failure:
            attempt_spans.record_failure(span, failure)
            raise
        except TFError as err:  # the upstream answered; metering could not price it (unavailable)
            attempt_spans.record_unpriced(
                span, http_status=status, response_model=response_model, usage=usage, usage_source=source,
                reason=f"the upstream's answer could not be priced: {err.message}",
            )
            raise
        except BaseException:
            span.set_attribute("tf.outcome", "cancelled")
            span.set_attribute("tf.upstream_may_bill", True)
            raise
        finally:
            span.end()

    # ---- settlement ------------------------------------------------------------------------

    def _unsettled_draft(self, t: Ticket) -> bytes:
        """What the receipt says if this router dies before settling: who, what was asked,
        the trace; no attempts (they are in the trace, as far as they were exported)."""
        draft = build_draft(
            attempts=[],
            trace_id=hex_trace_id(t.span.get_span_context().trace_id),
            request_id=t.request_id,
            key=t.key,
            run_id=t.run_id,
            run_step=t.run_step,
            req=t.req,
            status="failed",
            primary=t.eligible[0].channel,
            done=None,
        )
        draft["id"] = t.receipt_id
        return jsonfast.dumps(draft)

    def _receipt_draft(self, t: Ticket, status: str, done: Done | None, error: dict[str, str] | None) -> dict[str, Any]:
        ctx = t.span.get_span_context()
        return build_draft(
            attempts=[attempt_spans.attempt_from_span(s) for s in self.collector.take(ctx.span_id)],
            trace_id=hex_trace_id(ctx.trace_id),
            request_id=t.request_id,
            key=t.key,
            run_id=t.run_id,
            run_step=t.run_step,
            req=t.req,
            status=status,
            primary=t.eligible[0].channel,
            done=done,
            error=error,
        )

    async def _settle(
        self, t: Ticket, status: str, done: Done | None, error: dict[str, str] | None = None
    ) -> router_pb2.Settlement:
        draft = self._receipt_draft(t, status, done, error)
        bucket = done.rated.bucket if done else None
        request = ledger_pb2.SettleRequest(
            request_id=t.request_id,
            key_id=t.key.id,
            bucket=bucket.to_pb() if bucket else common_pb2.BUCKET_UNSPECIFIED,
            rated_nano=done.rated.amount_nano if done else 0,
            status=status,
            receipt_json=jsonfast.dumps(draft),
            run_id=t.run_id,
            run_step=t.run_step,
            receipt_id=t.receipt_id,
        )
        resp = await self._settle_call(request, t.ctx)
        t.span.set_attribute("tf.receipt_id", resp.receipt_id)
        t.span.set_attribute("tf.status", status)
        return router_pb2.Settlement(
            receipt_id=resp.receipt_id,
            amount=format_nano(resp.amount_nano),
            unit=bucket.unit if bucket else (t.eligible[0].channel.channel.bucket.unit),
            attempts=t.attempts,
            status=status,
        )

    async def _settle_call(self, request: ledger_pb2.SettleRequest, ctx: otel_context.Context) -> Any:
        """Settle is idempotent by request id: while the ledger is unreachable (restarting,
        failing over) asking again can only return the first result, never charge twice. So
        the router keeps asking, with backoff, for up to SETTLE_RETRY_S: a ledger restart does
        not lose a request that reached an upstream (its hold outlives that window)."""
        return await self._call_while_unavailable(
            self.backends.ledger.Settle, request, ctx, SETTLE_RETRY_S,
            "settling %s: the ledger is unavailable", request.request_id)

    async def _call_while_unavailable(
        self, method: Any, request: Any, ctx: otel_context.Context, retry_s: float, what: str, *args: Any
    ) -> Any:
        """A call that is safe to repeat, asked again with backoff while its service answers
        `unavailable`, for up to `retry_s`. The first try is a plain call (tenacity's
        bookkeeping costs ~0.1 ms a request); tenacity drives the rest."""
        try:
            return await self.backends.call(method, request, ctx)
        except TFError as err:
            if err.code != "unavailable":
                raise
            log.warning(what + "; retrying for up to %g s", *args, retry_s)
        retrying = AsyncRetrying(
            stop=stop_after_delay(retry_s),
            wait=wait_exponential(multiplier=SETTLE_FIRST_BACKOFF_S, max=SETTLE_BACKOFF_CAP_S),
            retry=retry_if_exception(lambda e: isinstance(e, TFError) and e.code == "unavailable"),
            reraise=True,
        )
        await asyncio.sleep(SETTLE_FIRST_BACKOFF_S)
        async for attempt in retrying:
            with attempt:
                return await self.backends.call(method, request, ctx)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _settle_failure(self, t: Ticket, exc: BaseException) -> TFError:
        """All attempts failed (or the upstream refused the request): a `failed` receipt,
        nothing charged, and the error the client gets."""
        not_tried = f" Fallbacks not tried: {', '.join(t.skipped)}." if t.skipped else ""
        if isinstance(exc, AttemptFailed) and exc.client_fault:
            err = TFError("invalid_request", f"The upstream rejected the request: {exc.error}", None)
        elif isinstance(exc, AllFailed) and exc.all_timeouts:
            err = TFError("upstream_timeout", f"Every eligible channel timed out ({t.attempts} attempts). "
                                              f"The receipt lists them.{not_tried}")
        else:
            last = exc.last.error if isinstance(exc, AllFailed) and exc.last else "no channel could be tried"
            err = TFError("upstream_error", f"Every eligible channel failed ({t.attempts} attempts); last: {last}. "
                                            f"The receipt lists them.{not_tried}")
        settlement = await self._settle(t, "failed", None, receipt_error(err))
        err.receipt_id = settlement.receipt_id
        err.attempts = t.attempts
        err.unit = settlement.unit
        return err

    def _in_background(self, coro: Awaitable[Any], tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Future[Any]:
        """`coro` as a task kept in `tasks` (default `_background`, which `aclose` waits for)
        until it ends."""
        into = self._background if tasks is None else tasks
        task = asyncio.ensure_future(coro)
        into.add(task)
        task.add_done_callback(into.discard)
        return task

    async def _shielded(self, coro: Awaitable[T]) -> T:
        """Settlement must finish even if the caller goes away meanwhile."""
        return await asyncio.shield(self._in_background(coro))

    async def _finish_abandoned(self, t: Ticket) -> None:
        """The caller went away before an answer: release everything, `cancelled` receipt."""
        try:
            if t.pending_hold is not None:
                bucket, amount_nano, call = t.pending_hold
                t.pending_hold = None
                try:
                    await call
                    t.holds[bucket] = amount_nano
                except TFError:
                    pass  # refused: nothing was held by that call
            if not t.holds:
                return  # it went away before any money was held: nothing to settle
            await self._settle(t, "cancelled", None, CLIENT_LEFT_BEFORE_ANSWER)
        except Exception:
            log.exception("settling abandoned request %s failed; its holds expire on their own", t.request_id)
        finally:
            t.span.end()

    async def _attempts_or_settle(self, t: Ticket, run_one: Callable[[Ticket, Eligible, int, int], Awaitable[T]]) -> T:
        """The attempt loop; when it ends without an answer the request is settled here
        (`failed`, or `cancelled` if the caller went away) and the client's error raised."""
        try:
            return await self._attempt_loop(t, run_one)
        except (AllFailed, AttemptFailed) as exc:
            try:
                err = await self._shielded(self._settle_failure(t, exc))
            finally:
                t.span.end()
            raise err from None
        except TFError as err:
            # A service the request needs did not answer (a fallback's hold, or metering after
            # an upstream answered): the client gets that error, and the receipt is `failed`,
            # nothing charged. (A caller that went away is `cancelled`, below.)
            try:
                settlement = await self._shielded(self._settle(t, "failed", None, receipt_error(err)))
            except TFError:
                log.warning("settling failed request %s: the ledger did not answer; its holds expire",
                            t.request_id)
            else:
                err.receipt_id = settlement.receipt_id
                err.attempts = t.attempts
                err.unit = settlement.unit
            finally:
                t.span.end()
            raise
        except BaseException:
            self._in_background(self._finish_abandoned(t))
            raise

    # ---- unary -----------------------------------------------------------------------------

    async def chat(self, metadata: Any, pb: router_pb2.ChatCompletionRequest) -> tuple[router_pb2.ChatCompletionResponse, Any]:
        key = await self.authenticate(metadata)
        req = parse_chat_request(pb.body_json, streaming_call=False)
        t = await self._admit(key, req, pb, None)
        done = await self._attempts_or_settle(t, self._attempt_unary)
        try:
            settlement = await self._shielded(self._settle(t, "settled", done))
        finally:
            t.span.end()
        body = jsonfast.dumps(done.body)
        return router_pb2.ChatCompletionResponse(body_json=body, settlement=settlement), t

    # ---- streaming -------------------------------------------------------------------------

    async def _attempt_stream_open(self, t: Ticket, el: Eligible, n: int, resend: int) -> tuple[Eligible, int, Span, OpenStream]:
        span = self._start_attempt_span(t, el, n, resend)
        try:
            body = upstream_body(t.req, el.channel.upstream_model, t.max_output_per_choice)
            stream = await open_stream(
                self.pool, el.channel.channel, body, t.request_id, n, self._attempt_timeout_s(t, el)
            )
        except AttemptFailed as failure:
            attempt_spans.record_failure(span, failure)
            span.end()
            raise
        except BaseException:
            span.set_attribute("tf.outcome", "cancelled")
            span.set_attribute("tf.upstream_may_bill", True)
            span.end()
            raise
        return el, n, span, stream

    async def stream(
        self,
        metadata: Any,
        pb: router_pb2.ChatCompletionRequest,
        parent: otel_context.Context | None,
        announce: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[router_pb2.ChatCompletionChunk]:
        """`announce(receipt_id, trace_id)` is called once the request is admitted, before
        any upstream call, so the caller can send the receipt id ahead of the first chunk."""
        key = await self.authenticate(metadata, parent)
        req = parse_chat_request(pb.body_json, streaming_call=True)
        t = await self._admit(key, req, pb, parent)
        if announce is not None:
            try:
                await announce(t.receipt_id, hex_trace_id(t.span.get_span_context().trace_id))
            except BaseException:
                self._in_background(self._finish_abandoned(t))
                raise
        el, n, span, upstream = await self._attempts_or_settle(t, self._attempt_stream_open)

        state = StreamState()
        try:
            async for event in upstream.events():
                chunk = state.take(event, t.req)
                if chunk is not None:
                    yield router_pb2.ChatCompletionChunk(chunk_json=chunk)
                if self._remaining_s(t) <= 0:
                    state.broken = f"the stream passed the request deadline of {self.request_deadline_s:g} s"
                    break
        except AttemptFailed as exc:
            state.broken = exc.error
        except BaseException:
            # The client went away (cancelled or closed at a yield), or the router is stopping
            # and cut the stream: finish without the client. A cut stream that delivered
            # output ended early (`partial`); one that delivered none is charged nothing.
            status = "cancelled"
            if self.stopping and state.text():
                status = "partial"
                state.broken = "the router shut down before the stream ended"
            ended = ({"code": "upstream_error", "message": f"The stream ended early: {state.broken}"}
                     if status == "partial" else CLIENT_LEFT_DURING_STREAM)
            self._in_background(self._finish_stream(t, el, n, span, upstream, state, status, ended))
            raise
        if state.broken is not None:
            error = TFError("upstream_error", f"The upstream stream broke after output began: {state.broken}")
            settling = self._in_background(self._finish_stream(t, el, n, span, upstream, state, "partial",
                                                             receipt_error(error)))
            yield router_pb2.ChatCompletionChunk(error_json=json.dumps(error.openai_body()).encode())
            settlement = await asyncio.shield(settling)
        else:
            if t.req.include_usage and usage_from_openai_or_none(state.usage_raw) is None:
                # The client asked for usage and the upstream sent none: it gets the count we bill.
                state.estimated_usage = await self._estimated_usage(t, state.text())
                yield router_pb2.ChatCompletionChunk(chunk_json=state.usage_chunk(t.req, state.estimated_usage))
            settlement = await self._shielded(self._finish_stream(t, el, n, span, upstream, state, "settled"))
        yield router_pb2.ChatCompletionChunk(settlement=settlement)

    async def _rate_stream(
        self, t: Ticket, el: Eligible, n: int, state: StreamState, status: str
    ) -> tuple[dict[str, int] | None, str, Done | None]:
        """The usage of a stream that ended (as `status`), its source, and its rating."""
        text = state.text()
        source = "upstream"
        usage = usage_from_openai_or_none(state.usage_raw)
        if usage is None:
            source = "estimated"
            if status == "cancelled" and not text:
                return None, source, None  # nothing generated: nothing charged (SPEC §7 rule 8)
            usage = state.estimated_usage or await self._estimated_usage(t, text)
        try:
            rated = await self._rate(t, el, usage, source)
        except AttemptFailed:
            usage = await self._estimated_usage(t, text)
            source = "estimated"
            rated = await self._rate(t, el, usage, source)
        return usage, source, Done(el, n, rated)

    async def _finish_stream(
        self, t: Ticket, el: Eligible, n: int, span: Span, upstream: OpenStream, state: StreamState, status: str,
        error: dict[str, str] | None = None,
    ) -> router_pb2.Settlement:
        try:
            await upstream.aclose()
            outcome = {"settled": "success", "partial": "stream_error", "cancelled": "cancelled"}[status]
            try:
                usage, source, done = await self._rate_stream(t, el, n, state, status)
            except TFError as err:
                # Metering stayed unavailable: the output cannot be priced, but the request
                # reached an upstream, so it still gets its one receipt (uncharged).
                log.warning("could not rate the stream of %s (%s); settling it uncharged", t.request_id, err.code)
                usage, source, done = None, "estimated", None
            attempt_spans.record_success(
                span, outcome=outcome, http_status=200, response_model=state.response_model,
                usage=usage, usage_source=source,
                charged=format_nano(done.rated.amount_nano) if done else "0",
                error=state.broken if status == "partial" else ("client went away" if status == "cancelled" else None),
            )
            span.end()
            return await self._settle(t, status, done, error)
        finally:
            if span.is_recording():
                span.end()
            t.span.end()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a chat call's handler: `aclose` finds the requests still in flight."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._requests.add(task)
        try:
            yield
        finally:
            self._requests.discard(task)

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """After the server stopped: requests still in flight (a handler waiting on an upstream
        does not notice its call was cancelled until it next writes) are cancelled now, so each
        starts its settlement, and every settlement gets up to `timeout_s` to finish. Without
        this the process could exit before a cut stream's settlement began: no receipt."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for task in [*self._requests, *self._best_effort]:
            task.cancel()
        while (pending := {*self._requests, *self._background}) and loop.time() < deadline:
            await asyncio.wait(pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
