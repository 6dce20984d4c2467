"""The REST edge: OpenAI-shaped HTTP/SSE in front of the router, admin REST in front of the
ledger. Thin: it translates shapes and errors, and holds no business rules."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenforge.edge import shapes
from tokenforge.errors import MD_CODE, MD_RECEIPT, TFError, from_rpc_error
from tokenforge.rpc import client_channel
from tokenforge.v1 import ledger_pb2, ledger_pb2_grpc, router_pb2, router_pb2_grpc

JSON_HEADERS = {"content-type": "application/json"}
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_REPORT_PAGES = 10
BODY_READ_TIMEOUT_S = 30.0
MAX_HEADER_VALUE_CHARS = 200


def error_response(err: TFError, trace_id: str | None = None) -> Response:
    headers = {}
    if err.receipt_id:
        headers["x-tf-receipt-id"] = err.receipt_id
        if err.unit:  # a request that failed after an attempt: its receipt charged nothing
            headers["x-tf-amount"] = "0"
            headers["x-tf-unit"] = err.unit
    if err.attempts is not None:
        headers["x-tf-attempts"] = str(err.attempts)
    if trace_id:
        headers["x-tf-trace-id"] = trace_id
    return JSONResponse(err.openai_body(), status_code=err.http_status, headers=headers)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


class Edge:
    def __init__(
        self, *, router_addr: str, ledger_addr: str, admin_token: str, max_body_bytes: int,
        router_timeout_s: float | None = None,
    ) -> None:
        # The longest the edge waits for the router's answer to a completion (None: no bound).
        self.router_timeout_s = router_timeout_s
        self._router_channel = client_channel(router_addr)
        self._ledger_channel = client_channel(ledger_addr)
        self.router = router_pb2_grpc.RouterServiceStub(self._router_channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._ledger_channel)
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes
        self.tracer = trace.get_tracer("tokenforge.edge")

    async def aclose(self) -> None:
        await self._router_channel.close()
        await self._ledger_channel.close()

    # ---- plumbing --------------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise TFError("request_too_large", f"The request body is over the limit of {self.max_body_bytes} bytes.")
        chunks: list[bytes] = []
        size = 0
        try:
            # A client that trickles its body (slowloris) is cut off, not waited for forever.
            async with asyncio.timeout(BODY_READ_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise TFError("request_too_large", f"The request body is over the limit of {self.max_body_bytes} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            raise TFError("request_timeout", f"The request body did not arrive within {BODY_READ_TIMEOUT_S:g} s.") from None
        return b"".join(chunks)

    async def read_json(self, request: Request) -> dict[str, Any]:
        raw = await self.read_body(request)
        try:
            body = json.loads(raw, parse_constant=_no_constant) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise shapes.invalid("We could not parse the JSON body of your request. Send valid JSON.", None) from None
        return shapes.require_object(body)

    @staticmethod
    def bearer(request: Request) -> str:
        value = request.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TFError("invalid_api_key", "Missing API key: send `Authorization: Bearer <your tokenforge key>`.")
        return token.strip()

    def require_admin(self, request: Request) -> None:
        token = self.bearer(request)
        if not self.admin_token or not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise TFError("invalid_admin_token", "Missing or wrong admin token.")

    async def call(self, method: Any, message: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        carrier: dict[str, str] = {}
        inject(carrier)
        try:
            return await method(message, metadata=(*carrier.items(), *metadata), timeout=30)
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            if err.param and err.param.endswith("_nano"):
                err.param = err.param.removesuffix("_nano")  # the JSON field, not the proto one
            raise err from None

    async def authenticate(self, request: Request) -> ledger_pb2.Key:
        secret = self.bearer(request)
        return await self.call(self.ledger.AuthenticateKey, ledger_pb2.AuthenticateKeyRequest(secret=secret))

    @staticmethod
    def _header(request: Request, name: str) -> str:
        value = request.headers.get(name, "")
        if not value.isascii():
            # HTTP hands header bytes over as Latin-1; clients (httpx, the openai SDK, curl)
            # send non-ASCII text as UTF-8. Read it as such, so "schritt-ü" stays "schritt-ü".
            try:
                value = value.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise shapes.invalid(f"The `{name}` header must be UTF-8 text.", name) from None
        if len(value) > MAX_HEADER_VALUE_CHARS:
            raise shapes.invalid(f"The `{name}` header may be at most {MAX_HEADER_VALUE_CHARS} characters.", name)
        return value

    def _router_error(self, exc: grpc.aio.AioRpcError) -> TFError:
        """The router's error; or, when the edge's own wait ran out (no error code from the
        router), `unavailable` naming that wait, not an upstream timeout."""
        if self.router_timeout_s is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not any(
                key == MD_CODE for key, _ in exc.trailing_metadata() or ()):
            return TFError("unavailable", f"The router did not answer within {self.router_timeout_s:g} s; "
                                          "its receipt (GET /v1/receipts) will say whether it was charged.")
        return from_rpc_error(exc)

    # ---- OpenAI endpoints ------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        with self.tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER) as span:
            body = await self.read_body(request)
            auth = (("authorization", request.headers.get("authorization", "")),)
            message = router_pb2.ChatCompletionRequest(
                body_json=body,
                run_id=self._header(request, "x-tf-run-id"),
                run_step=self._header(request, "x-tf-run-step"),
            )
            trace_id = format(span.get_span_context().trace_id, "032x")
            if _wants_stream(body):
                return await self._stream(request, message, auth, trace_id)
            carrier: dict[str, str] = {}
            inject(carrier)
            call = self.router.ChatCompletion(message, metadata=(*carrier.items(), *auth), timeout=self.router_timeout_s)
            try:
                resp = await _unless_client_leaves(request, call, call)
            except grpc.aio.AioRpcError as exc:
                return error_response(self._router_error(exc), trace_id)
            except ClientGone:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            s = resp.settlement
            headers = {
                "x-tf-receipt-id": s.receipt_id,
                "x-tf-amount": s.amount,
                "x-tf-unit": s.unit,
                "x-tf-attempts": str(s.attempts),
                "x-tf-trace-id": trace_id,
            }
            return Response(resp.body_json, media_type="application/json", headers=headers)

    async def _stream(self, request: Request, message: router_pb2.ChatCompletionRequest,
                      auth: tuple[tuple[str, str], ...], trace_id: str) -> Response:
        carrier: dict[str, str] = {}
        inject(carrier)
        call = self.router.StreamChatCompletion(
            message, metadata=(*carrier.items(), *auth), timeout=self.router_timeout_s)
        iterator = call.__aiter__()
        try:
            first = await _unless_client_leaves(request, call, iterator.__anext__())
        except grpc.aio.AioRpcError as exc:
            return error_response(self._router_error(exc), trace_id)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except StopAsyncIteration:
            return error_response(TFError("internal_error", "The router ended the stream without an answer."))
        initial = dict(await call.initial_metadata() or ())
        headers = {"cache-control": "no-cache", "x-tf-trace-id": trace_id}
        if initial.get(MD_RECEIPT):
            headers["x-tf-receipt-id"] = str(initial[MD_RECEIPT])

        async def events() -> AsyncIterator[bytes]:
            chunk: router_pb2.ChatCompletionChunk | None = first
            broken = False
            try:
                while chunk is not None:
                    kind = chunk.WhichOneof("kind")
                    if kind == "chunk_json":
                        yield b"data: " + chunk.chunk_json + b"\n\n"
                    elif kind == "error_json":
                        # The stream broke after output: the client gets the error and no
                        # [DONE] once the `partial` receipt is written (the settlement follows).
                        yield b"data: " + chunk.error_json + b"\n\n"
                        broken = True
                    elif kind == "settlement":
                        if not broken:
                            yield b"data: [DONE]\n\n"
                        return
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        chunk = None
            except grpc.aio.AioRpcError as exc:
                err = self._router_error(exc)
                yield b"data: " + json.dumps(err.openai_body()).encode() + b"\n\n"
            finally:
                # The client went away (or we are done): cancel the router call, which
                # cancels the upstream and settles what was generated.
                call.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def models(self, request: Request) -> Response:
        auth = (("authorization", request.headers.get("authorization", "")),)
        resp = await self.call(self.router.ListModels, router_pb2.ListModelsRequest(), auth)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenforge"} for m in resp.models]
        return _json({"object": "list", "data": data})

    async def balance(self, request: Request) -> Response:
        key = await self.authenticate(request)
        kb = await self.call(self.ledger.GetKeyBalance, ledger_pb2.GetKeyBalanceRequest(key_id=key.id))
        body = shapes.balances_json(kb.balances)
        body["key"] = {
            "id": key.id,
            "name": key.name,
            "spent": {"wallet": shapes.format_nano(kb.spent_wallet_nano), "credit": shapes.format_nano(kb.spent_credit_nano)},
        }
        return _json(body)

    async def receipt(self, request: Request) -> Response:
        key = await self.authenticate(request)
        rc = await self.call(self.ledger.GetReceipt, ledger_pb2.GetReceiptRequest(
            receipt_id=request.path_params["receipt_id"], key_id=key.id))
        return Response(rc.receipt_json, media_type="application/json")

    async def receipts(self, request: Request) -> Response:
        key = await self.authenticate(request)
        limit = _limit(request)
        resp = await self.call(self.ledger.ListReceipts, ledger_pb2.ListReceiptsRequest(
            key_id=key.id, limit=limit, after=request.query_params.get("after", "")))
        return _list_response(resp)

    # ---- runs ------------------------------------------------------------------------------

    def _auth_md(self, request: Request) -> tuple[tuple[str, str], ...]:
        self.bearer(request)  # 401 early when there is no key at all
        return (("authorization", request.headers.get("authorization", "")),)

    async def create_run(self, request: Request) -> Response:
        auth = self._auth_md(request)
        body = await self.read_body(request)
        resp = await self.call(self.router.CreateRun, router_pb2.StartRunRequest(body_json=body), auth)
        return Response(resp.body_json, status_code=201, media_type="application/json")

    async def get_run(self, request: Request) -> Response:
        auth = self._auth_md(request)
        resp = await self.call(self.router.GetRun, router_pb2.RunRef(run_id=request.path_params["run_id"]), auth)
        return Response(resp.body_json, media_type="application/json")

    async def close_run(self, request: Request) -> Response:
        auth = self._auth_md(request)
        resp = await self.call(self.router.CloseRun, router_pb2.RunRef(run_id=request.path_params["run_id"]), auth)
        return Response(resp.body_json, media_type="application/json")

    async def run_report_html(self, request: Request) -> Response:
        from tokenforge.report_page import report_html

        auth = self._auth_md(request)
        run_id = request.path_params["run_id"]
        resp = await self.call(self.router.GetRun, router_pb2.RunRef(run_id=run_id), auth)
        key = await self.authenticate(request)
        receipts: list[dict[str, Any]] = []
        after = ""
        for _page in range(MAX_REPORT_PAGES):
            page = await self.call(self.ledger.ListReceipts, ledger_pb2.ListReceiptsRequest(
                key_id=key.id, run_id=run_id, limit=MAX_LIST_LIMIT, after=after))
            receipts += [json.loads(r.receipt_json) for r in page.receipts]
            if not page.has_more:
                break
            after = page.last_id
        return HTMLResponse(report_html(json.loads(resp.body_json), receipts))

    # ---- admin -----------------------------------------------------------------------------

    async def create_account(self, request: Request) -> Response:
        self.require_admin(request)
        body = await self.read_json(request)
        acct = await self.call(self.ledger.CreateAccount, ledger_pb2.CreateAccountRequest(name=shapes.name_field(body)))
        return _json(shapes.balances_json(acct.balances) | {"created_at": acct.created_at}, 201)

    async def get_account(self, request: Request) -> Response:
        self.require_admin(request)
        acct = await self.call(self.ledger.GetAccount, ledger_pb2.GetAccountRequest(account_id=request.path_params["account_id"]))
        return _json(shapes.balances_json(acct.balances) | {"created_at": acct.created_at})

    async def topup(self, request: Request) -> Response:
        self.require_admin(request)
        body = await self.read_json(request)
        resp = await self.call(self.ledger.TopUp, shapes.topup_request(request.path_params["account_id"], body))
        out = shapes.balances_json(resp.balances) | {"topup_id": resp.topup_id, "replayed": resp.replayed}
        return _json(out, 200 if resp.replayed else 201)

    async def refund(self, request: Request) -> Response:
        self.require_admin(request)
        body = await self.read_json(request)
        resp = await self.call(self.ledger.Refund, shapes.refund_request(request.path_params["receipt_id"], body))
        return _json(shapes.refund_json(resp), 200 if resp.replayed else 201)

    async def adjust(self, request: Request) -> Response:
        self.require_admin(request)
        body = await self.read_json(request)
        resp = await self.call(self.ledger.Adjust, shapes.adjustment_request(request.path_params["account_id"], body))
        return _json(shapes.adjustment_json(resp), 200 if resp.replayed else 201)

    async def create_key(self, request: Request) -> Response:
        self.require_admin(request)
        body = await self.read_json(request)
        key_request = shapes.key_request(body)
        if key_request.allowed_models:
            # A name the catalog does not have would make a key that can call nothing.
            catalog = await self.call(self.router.CatalogModels, router_pb2.ListModelsRequest())
            known = set(catalog.models)
            unknown = [m for m in key_request.allowed_models if m not in known]
            if unknown:
                raise shapes.invalid(
                    f"`allowed_models` names models the catalog does not have: {', '.join(unknown)}. "
                    f"The catalog has: {', '.join(catalog.models)}.", "allowed_models")
        created = await self.call(self.ledger.CreateKey, key_request)
        return _json(shapes.key_json(created.key) | {"key": created.secret}, 201)

    async def revoke_key(self, request: Request) -> Response:
        self.require_admin(request)
        key = await self.call(self.ledger.RevokeKey, ledger_pb2.RevokeKeyRequest(key_id=request.path_params["key_id"]))
        return _json(shapes.key_json(key))

    async def list_keys(self, request: Request) -> Response:
        self.require_admin(request)
        account_id = request.query_params.get("account_id", "")
        if not account_id:
            raise shapes.invalid("`account_id` is required.", "account_id")
        resp = await self.call(self.ledger.ListKeys, ledger_pb2.ListKeysRequest(account_id=account_id))
        return _json({"object": "list", "data": [shapes.key_json(k) for k in resp.keys]})

    async def admin_receipt(self, request: Request) -> Response:
        self.require_admin(request)
        rc = await self.call(self.ledger.GetReceipt, ledger_pb2.GetReceiptRequest(receipt_id=request.path_params["receipt_id"]))
        return Response(rc.receipt_json, media_type="application/json")

    async def admin_receipts(self, request: Request) -> Response:
        self.require_admin(request)
        resp = await self.call(self.ledger.ListReceipts, ledger_pb2.ListReceiptsRequest(
            account_id=request.path_params["account_id"], limit=_limit(request), after=request.query_params.get("after", "")))
        return _list_response(resp)

    async def audit(self, request: Request) -> Response:
        self.require_admin(request)
        resp = await self.call(self.ledger.Audit, ledger_pb2.AuditRequest())
        return _json({"ok": resp.ok, "problems": list(resp.problems), "accounts_checked": resp.accounts_checked})

    async def statement(self, request: Request) -> Response:
        self.require_admin(request)
        q = request.query_params
        bucket = shapes.bucket_field(q.get("bucket"), "bucket") if q.get("bucket") else 0
        resp = await self.call(self.ledger.GetStatement, ledger_pb2.GetStatementRequest(
            account_id=request.path_params["account_id"], key_id=q.get("key_id", ""), bucket=bucket,
            limit=_limit(request), after=q.get("after", "")))
        entries = [{
            "id": e.id, "at": e.at, "kind": e.kind, "bucket": {1: "wallet", 2: "credit"}.get(e.bucket),
            "amount": shapes.format_nano(e.amount_nano), "balance": shapes.format_nano(e.balance_nano),
            "receipt_id": e.receipt_id or None, "key_id": e.key_id or None,
        } for e in resp.entries]
        return _json({"object": "list", "data": entries, "has_more": resp.has_more, "last_id": resp.last_id or None})


CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def _until_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, call: grpc.aio.Call, awaitable: Any) -> Any:
    """Await `awaitable`; if the client disconnects first, cancel the router call (which
    cancels the upstream, starts no retry and settles a `cancelled` receipt)."""
    watcher = asyncio.ensure_future(_until_disconnect(request))
    watcher.add_done_callback(lambda w: None if w.cancelled() else (w.exception(), call.cancel()))
    try:
        return await awaitable  # in this task: one task per request fewer than racing two
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone from None  # the watcher cancelled the call: the client left
        raise
    finally:
        watcher.cancel()


def _wants_stream(body: bytes) -> bool:
    """Peek at `stream` without validating: the router validates the whole body."""
    if b'"stream"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise shapes.invalid(f"`limit` must be an integer from 1 to {MAX_LIST_LIMIT}.", "limit")
    return int(raw)


def _list_response(resp: ledger_pb2.ListReceiptsResponse) -> Response:
    data = b",".join(r.receipt_json for r in resp.receipts)
    tail = json.dumps({"has_more": resp.has_more, "last_id": resp.last_id or None})[1:]
    return Response(b'{"object":"list","data":[' + data + b"]," + tail.encode(), media_type="application/json")


def build_app(edge: Edge) -> Starlette:
    def wrap(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                for name, value in request.path_params.items():
                    # An id with a control character (a NUL, say) names nothing we store, and
                    # PostgreSQL cannot even compare it: not found, whatever the endpoint.
                    if isinstance(value, str) and not value.isprintable():
                        raise TFError("not_found", f"No `{name}` with a control character exists.", name)
                return await handler(request)
            except TFError as err:
                return error_response(err)
        return endpoint

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(TFError("not_found", f"No endpoint {request.method} {request.url.path}."))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", wrap(edge.chat_completions), methods=["POST"]),
        Route("/v1/models", wrap(edge.models), methods=["GET"]),
        Route("/v1/balance", wrap(edge.balance), methods=["GET"]),
        Route("/v1/receipts", wrap(edge.receipts), methods=["GET"]),
        Route("/v1/receipts/{receipt_id}", wrap(edge.receipt), methods=["GET"]),
        Route("/v1/runs", wrap(edge.create_run), methods=["POST"]),
        Route("/v1/runs/{run_id}", wrap(edge.get_run), methods=["GET"]),
        Route("/v1/runs/{run_id}/close", wrap(edge.close_run), methods=["POST"]),
        Route("/v1/runs/{run_id}/report.html", wrap(edge.run_report_html), methods=["GET"]),
        Route("/admin/v1/accounts", wrap(edge.create_account), methods=["POST"]),
        Route("/admin/v1/accounts/{account_id}", wrap(edge.get_account), methods=["GET"]),
        Route("/admin/v1/accounts/{account_id}/topups", wrap(edge.topup), methods=["POST"]),
        Route("/admin/v1/accounts/{account_id}/adjustments", wrap(edge.adjust), methods=["POST"]),
        Route("/admin/v1/accounts/{account_id}/receipts", wrap(edge.admin_receipts), methods=["GET"]),
        Route("/admin/v1/accounts/{account_id}/statement", wrap(edge.statement), methods=["GET"]),
        Route("/admin/v1/keys", wrap(edge.create_key), methods=["POST"]),
        Route("/admin/v1/keys", wrap(edge.list_keys), methods=["GET"]),
        Route("/admin/v1/keys/{key_id}/revoke", wrap(edge.revoke_key), methods=["POST"]),
        Route("/admin/v1/receipts/{receipt_id}", wrap(edge.admin_receipt), methods=["GET"]),
        Route("/admin/v1/receipts/{receipt_id}/refunds", wrap(edge.refund), methods=["POST"]),
        Route("/admin/v1/audit", wrap(edge.audit), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
