"""gRPC plumbing shared by every service: server start-up with health checking and
reflection, TFError → status translation, W3C trace-context propagation, and client channels.

Trace context is propagated by a small wrapper of ours rather than the stock instrumentation:
it injects/extracts `traceparent` in metadata and costs far less per call.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from tokenforge.errors import TFError
from tokenforge.v1 import common_pb2

log = logging.getLogger("tokenforge.rpc")
_tracer = trace.ProxyTracer("tokenforge.rpc")

GC_GEN0_THRESHOLD = 20_000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
# A server accepts the clients' keepalive pings (every 30 s) also on a call that is open but
# quiet, as the router's long-lived batch streams are when the stack is idle. gRPC's default
# (one such ping per 5 minutes) answered them with GOAWAY "too_many_pings" after a few idle
# minutes, dropping the connection and every stream on it.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC turns SO_REUSEPORT on by default, so a second server on a taken port would bind
    # and silently share it; off, it fails to start and says so.
    ("grpc.so_reuseport", 0),
]


def _error_status(err: TFError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    detail = common_pb2.ErrorDetail(code=err.code, param=err.param or "")
    md = err.trailing_metadata() + (("tf-error-detail-bin", detail.SerializeToString()),)
    return err.grpc_status, err.message, md


def _incoming_context(context: grpc.aio.ServicerContext) -> otel_context.Context:
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return extract(carrier)


@functools.cache
def _service_name(cls: type) -> str:
    """The proto service a servicer implements, from its generated base class."""
    for base in cls.__mro__:
        if base.__name__.endswith("ServiceServicer"):
            return "tokenforge.v1." + base.__name__.removesuffix("Servicer")
    return "tokenforge.v1." + cls.__name__


def _span_name(servicer: Any, method: str) -> str:
    return f"{_service_name(type(servicer))}/{method}"


_UNAVAILABLE: tuple[type[BaseException], ...] = (ConnectionError, OSError, TimeoutError)
# A SERVER span per call only when spans are exported: with nothing exported nobody can see
# it, and it cost about a quarter of the ledger's own CPU per call (measured).
_server_spans = True
_last_outage_log = 0.0
OUTAGE_LOG_INTERVAL_S = 5.0


def treat_as_unavailable(*errors: type[BaseException]) -> None:
    """Exceptions of these types (a database that went away, say) answer UNAVAILABLE so the
    caller may retry, instead of an opaque internal error."""
    global _UNAVAILABLE
    _UNAVAILABLE = (*_UNAVAILABLE, *errors)


def _as_tf_error(exc: Exception, where: str) -> TFError:
    """Any other exception from a handler: logged, and answered without its details."""
    global _last_outage_log
    if isinstance(exc, _UNAVAILABLE):
        now = time.monotonic()
        if now - _last_outage_log > OUTAGE_LOG_INTERVAL_S:  # one line per interval, not a flood
            _last_outage_log = now
            log.warning("%s: a backing service is unavailable: %s: %s", where, type(exc).__name__, exc)
        return TFError("unavailable", "A backing service is unavailable; retry shortly.")
    log.exception("%s failed", where)
    return TFError("internal_error", "Internal error; it has been logged.")


def _mark_error(span: trace.Span, err: TFError) -> None:
    span.set_attribute("rpc.grpc.status_code", err.grpc_status.value[0])
    span.set_attribute("error.type", err.code)
    span.set_status(Status(StatusCode.ERROR, err.code))


async def _abort(exc: Exception, context: grpc.aio.ServicerContext, span: trace.Span | None, where: str) -> None:
    """End the call with the status (and error word) that `exc` stands for."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on its own
        raise exc
    err = exc if isinstance(exc, TFError) else _as_tf_error(exc, where)
    if span is not None:
        _mark_error(span, err)
    code, message, md = _error_status(err)
    context.set_trailing_metadata(md)
    await context.abort(code, message)


def rpc_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method: a SERVER span in the caller's trace, TFError → gRPC status."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            # The span is never *current* across a yield (detaching a context in another
            # task fails when the client goes away); the handler gets it as `parent`.
            incoming = _incoming_context(context)
            span = (_tracer.start_span(_span_name(self, fn.__name__), context=incoming,
                                       kind=SpanKind.SERVER, attributes={"rpc.system": "grpc"})
                    if _server_spans else trace.NonRecordingSpan(trace.get_current_span(incoming).get_span_context()))
            gen = fn(self, request, context, trace.set_span_in_context(span))
            try:
                async for item in gen:
                    yield item
            except (TFError, Exception) as exc:
                await _abort(exc, context, span, _span_name(self, fn.__name__))
            finally:
                # A client that went away closes us at a yield: close the inner generator
                # now, so it settles what it started instead of waiting for the GC.
                await gen.aclose()
                span.end()

        return stream_wrapper

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not _server_spans:
            # Nothing leaves this process: carry the caller's trace on, record no span.
            token = otel_context.attach(_incoming_context(context))
            try:
                return await fn(self, request, context)
            except (TFError, Exception) as exc:
                await _abort(exc, context, None, _span_name(self, fn.__name__))
            finally:
                otel_context.detach(token)
        with _tracer.start_as_current_span(
            _span_name(self, fn.__name__), context=_incoming_context(context), kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc"}, record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                return await fn(self, request, context)
            except (TFError, Exception) as exc:
                await _abort(exc, context, span, _span_name(self, fn.__name__))

    return wrapper


MAX_BATCH_CALLS = 1024
_NO_TRACE = otel_context.Context()  # a call sent without a trace context


async def answer_batch(
    servicer: Any,
    calls: Iterable[Any],
    methods: dict[str, str],
    outcome_cls: type,
    context: grpc.aio.ServicerContext,
) -> list[Any]:
    """Answer a Batch RPC: each call runs the servicer's own method (the one `rpc_method`
    wrapped) concurrently with the others, in the caller's trace (its `trace_context`), with
    a SERVER span of that method's name when spans are exported, exactly as if it had come
    alone. A call that fails gets its error word in its outcome; the others are unaffected.

    `methods` maps each oneof field of the call to the servicer method it stands for; the
    outcome's oneof uses the same field names, plus `error`. Only methods that do not use
    their `context` may be batched (they all share the Batch call's).
    """
    if len(calls) > MAX_BATCH_CALLS:  # counted without building the calls' objects
        await _abort(_oversized(), context, None, _span_name(servicer, "Batch"))
    return await _answer_calls(servicer, list(calls), methods, outcome_cls, context)


def _oversized() -> TFError:
    return TFError("invalid_request", f"a batch holds at most {MAX_BATCH_CALLS} calls", "calls")


def _call_error(outcome_cls: type, err: TFError) -> Any:
    return outcome_cls(error=common_pb2.CallError(code=err.code, message=err.message, param=err.param or ""))


async def _answer_calls(
    servicer: Any,
    calls: list[Any],
    methods: dict[str, str],
    outcome_cls: type,
    context: grpc.aio.ServicerContext,
) -> list[Any]:
    async def one(call: Any) -> Any:
        field = call.WhichOneof("call")
        if field not in methods:
            err = TFError("invalid_request", f"each call needs one of: {', '.join(methods)}", "calls")
            return _call_error(outcome_cls, err)
        name = methods[field]
        fn = getattr(type(servicer), name).__wrapped__
        parent = extract(dict(call.trace_context)) if call.trace_context else _NO_TRACE
        where = _span_name(servicer, name)
        span = (_tracer.start_span(where, context=parent, kind=SpanKind.SERVER,
                                   attributes={"rpc.system": "grpc", "tf.batched": True})
                if _server_spans else None)
        token = otel_context.attach(trace.set_span_in_context(span, parent) if span is not None else parent)
        try:
            response = await fn(servicer, getattr(call, field), context)
            return outcome_cls(**{field: response})
        except Exception as exc:  # noqa: BLE001 - every failure becomes this call's outcome
            err = exc if isinstance(exc, TFError) else _as_tf_error(exc, where)
            if span is not None:
                _mark_error(span, err)
            return _call_error(outcome_cls, err)
        finally:
            otel_context.detach(token)
            if span is not None:
                span.end()

    if len(calls) == 1:
        return [await one(calls[0])]
    return list(await asyncio.gather(*(one(c) for c in calls)))


MAX_STREAM_BATCHES_IN_FLIGHT = 64  # per stream; beyond it the stream is not read (flow control)
_stream_pumps: set[asyncio.Task[None]] = set()
_draining = False


async def answer_batch_stream(
    servicer: Any,
    context: grpc.aio.ServicerContext,
    methods: dict[str, str],
    outcome_cls: type,
    response_cls: type,
) -> None:
    """Answer a BatchStream RPC: every request message is a batch, answered as `answer_batch`
    answers one (each call alone, in its own trace) by a response carrying the request's `seq`.
    Batches run concurrently, so responses may leave out of order. A batch gets at most its
    `timeout_ms`; past it, its calls are answered `unavailable` (the caller has given up too).

    When the service shuts down (`drain_streams`) the stream stops reading, answers what it
    has read and ends; the client opens a new stream, to another replica or to this one after
    its restart. Calls it had written that were not read fail `unavailable` on its side.
    """
    if _draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
    loop = asyncio.get_running_loop()
    write_lock = asyncio.Lock()
    slots = asyncio.Semaphore(MAX_STREAM_BATCHES_IN_FLIGHT)
    running: set[asyncio.Task[None]] = set()

    async def answer(request: Any) -> None:
        try:
            if len(request.calls) > MAX_BATCH_CALLS:
                # Refused whole, with ONE error outcome (the client applies it to every call):
                # an answer per call would make a hostile batch of millions of empty calls
                # cost seconds of the event loop and gigabytes, and be too large to send.
                outcomes = [_call_error(outcome_cls, _oversized())]
            else:
                calls = list(request.calls)
                timeout_s = request.timeout_ms / 1000 if request.timeout_ms else None
                try:
                    async with asyncio.timeout(timeout_s):
                        outcomes = await _answer_calls(servicer, calls, methods, outcome_cls, context)
                except TimeoutError:
                    late = TFError("unavailable", "A tokenforge service did not answer in time; try again.")
                    outcomes = [_call_error(outcome_cls, late)] * len(calls)
            response = response_cls(seq=request.seq, outcomes=outcomes)
            async with write_lock:
                await context.write(response)
        except Exception as exc:  # noqa: BLE001 - the caller went away: nobody to answer
            log.debug("a batch stream could not answer: %r", exc)
        finally:
            slots.release()

    async def pump() -> None:
        while True:
            await slots.acquire()
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            task = loop.create_task(answer(request))
            running.add(task)
            task.add_done_callback(running.discard)

    reader = loop.create_task(pump())
    _stream_pumps.add(reader)
    try:
        await asyncio.wait({reader})  # read until the client is done or the service drains
        if running:
            await asyncio.wait(running)
    finally:
        _stream_pumps.discard(reader)
        reader.cancel()
        for task in running:
            task.cancel()


def drain_streams() -> None:
    """Stop reading every open batch stream (each answers what it read, then ends) and refuse
    new ones: the first step of a graceful shutdown."""
    global _draining
    _draining = True
    for reader in list(_stream_pumps):
        reader.cancel()


def outgoing_metadata(extra: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Metadata for an outgoing call: the current trace context plus `extra`."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return [*carrier.items(), *extra]


def client_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def tune_gc() -> None:
    """Once start-up is done: move what was loaded (modules, protobuf descriptors, the
    catalog, tokenizer tables) into the permanent generation, where the cyclic collector
    never scans it again, and run the young collection less often. Request garbage is freed
    by reference counting either way; the cycles it leaves are few. Under load the collector
    took ~4% of the router's CPU (py-spy --native) with the defaults (700, 10, 10)."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def serve(
    *,
    name: str,
    bind: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    on_stop: Callable[[], Any] | None = None,
    on_stopping: Callable[[], None] | None = None,
    grace_s: float = 5.0,
) -> None:
    """Run one gRPC service until SIGTERM/SIGINT: health + reflection + the given servicers.

    `register` adds the servicers and returns their full service names. `on_stopping` is
    called when the signal arrives, before the grace period; `on_stop` after the server stopped.
    """
    from opentelemetry.sdk.trace import TracerProvider

    from tokenforge.telemetry import exporting, setup_tracing

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        setup_tracing(name)
    global _server_spans
    _server_spans = exporting()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpcio raises where it used to return 0
        raise SystemExit(f"{name}: cannot bind {bind}: {exc}") from None
    if port == 0:
        raise SystemExit(f"{name}: cannot bind {bind}")
    await server.start()
    tune_gc()
    for svc in ["", *service_names]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving gRPC on %s", name, bind)
    print(f"{name} ready on {bind}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if on_stopping is not None:
        on_stopping()
    for svc in ["", *service_names]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    drain_streams()
    await server.stop(grace_s)
    if on_stop is not None:
        result = on_stop()
        if inspect.isawaitable(result):
            await result


async def wait_healthy(target: str, timeout_s: float) -> None:
    """Poll a gRPC health endpoint until SERVING or the deadline passes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with client_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{target} not healthy within {timeout_s} s")
            await asyncio.sleep(0.05)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return
    uvloop.install()
