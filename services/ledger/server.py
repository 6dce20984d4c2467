"""The ledger's gRPC adapter: protobuf ⇄ core operations, the group-commit writers, the
expiry reaper, and start-up (`tokenforge serve ledger` calls `run(settings)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hmac
import json
import logging
import os
import secrets
import sys
from collections import OrderedDict
from typing import Any

import asyncpg
import grpc
import orjson

from tokenforge.config import Settings
from tokenforge.errors import TFError
from tokenforge.ledger import core, migrations, report, store
from tokenforge.ledger.core import (
    AdjustOp,
    AdjustResult,
    CloseRunOp,
    CreateRunOp,
    ExpireHoldOp,
    HoldOp,
    HoldResult,
    KeyLimitsNano,
    Op,
    Policy,
    RefundOp,
    RefundResult,
    ReleaseOp,
    ReleaseResult,
    RunResult,
    SettleOp,
    SettleResult,
    TopUpOp,
    TopUpResult,
    rfc3339,
)
from tokenforge.ledger.writer import MAX_IN_FLIGHT, ThreadedWriterGroup, WriterGroup
from tokenforge.money import Bucket
from tokenforge.rpc import (
    answer_batch,
    answer_batch_stream,
    install_uvloop,
    rpc_method,
    serve,
    treat_as_unavailable,
)
from tokenforge.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

log = logging.getLogger("tokenforge.ledger")
WRITERS_STOP_S = 3.0  # after the gRPC grace period, at most this long for the writers to finish

Writers = WriterGroup | ThreadedWriterGroup

SECRET_PREFIX = "sk-tf-"
SECRET_DISPLAY_CHARS = 10
MAX_RECEIPT_JSON_BYTES = 1024 * 1024
MAX_UNSETTLED_RECEIPT_BYTES = 16 * 1024
MAX_ESTIMATE_JSON_BYTES = 1024 * 1024
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
REAP_BATCH = 1000
CACHE_ENTRIES = 200_000

_POLICY_TO_TEXT = {
    common_pb2.ROUTE_POLICY_ROUTED: "routed",
    common_pb2.ROUTE_POLICY_DIRECT: "direct",
    common_pb2.ROUTE_POLICY_AUTO: "auto",
}
_POLICY_FROM_TEXT = {v: k for k, v in _POLICY_TO_TEXT.items()}
_DIRECTION_TO_TEXT = {
    ledger_pb2.ADJUSTMENT_DIRECTION_CREDIT: core.ADJUST_CREDIT,
    ledger_pb2.ADJUSTMENT_DIRECTION_DEBIT: core.ADJUST_DEBIT,
}
_DIRECTION_FROM_TEXT = {v: k for k, v in _DIRECTION_TO_TEXT.items()}
# LedgerCall's oneof fields → the methods they stand for
_BATCHED = {"hold": "Hold", "release": "Release", "settle": "Settle"}


class _BoundedMap:
    """An insertion-ordered map that forgets its oldest entries past `limit`."""

    def __init__(self, limit: int) -> None:
        self._data: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def put(self, key: str, value: str) -> None:
        self._data[key] = value
        if len(self._data) > self._limit:
            self._data.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# protobuf conversions


def _balances_pb(account: store.AccountRecord) -> common_pb2.Balances:
    def one(bucket: Bucket) -> common_pb2.BucketBalance:
        b = account.buckets.get(bucket) or store.BucketBalance(bucket, 0, 0)
        return common_pb2.BucketBalance(
            unit=bucket.unit,
            balance_nano=b.balance_nano,
            held_nano=b.held_nano,
            available_nano=b.available_nano,
        )

    return common_pb2.Balances(
        account_id=account.id, name=account.name, wallet=one(Bucket.WALLET), credit=one(Bucket.CREDIT)
    )


def _key_pb(key: store.KeyRecord) -> ledger_pb2.Key:
    return ledger_pb2.Key(
        id=key.id,
        name=key.name,
        account_id=key.account_id,
        route_policy=_POLICY_FROM_TEXT[key.route_policy],
        allowed_models=key.allowed_models,
        limits=ledger_pb2.KeyLimits(
            wallet_total_nano=key.limits.wallet_total,
            wallet_daily_nano=key.limits.wallet_daily,
            credit_total_nano=key.limits.credit_total,
            credit_daily_nano=key.limits.credit_daily,
        ),
        revoked=key.revoked,
        created_at=rfc3339(key.created_at),
        prefix=key.prefix,
    )


def _limits(pb: ledger_pb2.KeyLimits) -> KeyLimitsNano:
    limits = KeyLimitsNano(
        pb.wallet_total_nano, pb.wallet_daily_nano, pb.credit_total_nano, pb.credit_daily_nano
    )
    for name in ("wallet_total_nano", "wallet_daily_nano", "credit_total_nano", "credit_daily_nano"):
        if getattr(pb, name) < 0:
            raise TFError("invalid_request", f"limits.{name} must not be negative (0: no limit)", f"limits.{name}")
    return limits


def _list_limit(limit: int) -> int:
    if limit < 0:
        raise TFError("invalid_request", "limit must not be negative", "limit")
    return min(limit or LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX)


def _json_object(raw: bytes, param: str, max_bytes: int) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > max_bytes:
        raise TFError("invalid_request", f"{param} is larger than {max_bytes} bytes", param)
    try:
        value = orjson.loads(raw)  # stricter than json: no NaN, no lone surrogates
    except (ValueError, UnicodeDecodeError):
        raise TFError("invalid_request", f"{param} is not valid JSON", param) from None
    if not isinstance(value, dict):
        raise TFError("invalid_request", f"{param} must be a JSON object", param)
    return value


def _unsettled_receipt(raw: bytes) -> str | None:
    """A hold's draft receipt, checked now so that the reaper can always write it later."""
    param = "unsettled_receipt_json"
    if not raw:
        return None
    draft = _json_object(raw, param, MAX_UNSETTLED_RECEIPT_BYTES)
    if b"\\u0000" in raw:  # valid JSON, but a jsonb column cannot hold it
        raise TFError("invalid_request", f"{param} must not contain \\u0000", param)
    try:
        orjson.dumps(draft)  # what the reaper will do with it: nesting orjson reads but cannot write
    except TypeError:
        raise TFError("invalid_request", f"{param} is nested too deeply", param) from None
    if "id" in draft:
        try:
            if not isinstance(draft["id"], str):
                raise TFError("invalid_request", "id must be a string", param)
            core.check_receipt_id(draft["id"])  # the router's choice, as Settle's receipt_id
        except TFError as err:
            raise TFError("invalid_request", f"{param}: {err.message}", param) from None
    return raw.decode()


# ---------------------------------------------------------------------------------------------


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, pool: asyncpg.Pool, writers: Writers, policy: Policy) -> None:
        self._pool = pool
        self._writers = writers
        self._policy = policy
        # Keys and requests never move to another account, so these are safe to keep.
        self._key_account = _BoundedMap(CACHE_ENTRIES)
        self._request_account = _BoundedMap(CACHE_ENTRIES)

    # -- routing helpers ----------------------------------------------------------------------

    async def _cached_account(self, cache: _BoundedMap, lookup: Any, ref: str, missing: Any) -> str:
        """The account `ref` belongs to, from `cache` or the database (then cached)."""
        account_id = cache.get(ref)
        if account_id is None:
            async with self._pool.acquire() as conn:
                account_id = await lookup(conn, ref)
            if account_id is None:
                raise missing()  # built only when needed: cache hits are the hot path
            cache.put(ref, account_id)
        return account_id

    async def _account_of_key(self, key_id: str) -> str:
        if not key_id:
            raise TFError("invalid_request", "key_id is required", "key_id")
        return await self._cached_account(self._key_account, store.account_of_key, key_id,
                                          lambda: TFError("not_found", f"no key {key_id}", "key_id"))

    async def _account_of_request(self, request_id: str) -> str:
        return await self._cached_account(
            self._request_account, store.account_of_request, request_id,
            lambda: TFError("not_found", f"no hold for request {request_id}", "request_id"))

    async def _account(self, account_id: str) -> store.AccountRecord:
        if not account_id:
            raise TFError("invalid_request", "account_id is required", "account_id")
        if "\x00" in account_id:  # PostgreSQL text cannot hold NUL, so no such account exists
            raise TFError("not_found", f"no account {account_id!r}", "account_id")
        async with self._pool.acquire() as conn:
            account = await store.get_account(conn, account_id)
        if account is None:
            raise TFError("not_found", f"no account {account_id}", "account_id")
        return account

    # -- accounts, top-ups, keys --------------------------------------------------------------

    @rpc_method
    async def CreateAccount(self, request: ledger_pb2.CreateAccountRequest, context: Any) -> ledger_pb2.Account:
        core.check_name(request.name)
        account_id = core.new_id("acct")
        async with self._pool.acquire() as conn:
            await store.create_account(conn, account_id, request.name)
        return await self._account_pb(account_id)

    @rpc_method
    async def GetAccount(self, request: ledger_pb2.GetAccountRequest, context: Any) -> ledger_pb2.Account:
        return await self._account_pb(request.account_id)

    async def _account_pb(self, account_id: str) -> ledger_pb2.Account:
        account = await self._account(account_id)
        return ledger_pb2.Account(
            id=account.id, name=account.name, balances=_balances_pb(account), created_at=rfc3339(account.created_at)
        )

    @rpc_method
    async def TopUp(self, request: ledger_pb2.TopUpRequest, context: Any) -> ledger_pb2.TopUpResponse:
        bucket = core.parse_bucket(request.bucket)
        assert bucket is not None
        core.check_amount(request.amount_nano, "amount_nano")
        core.check_idempotency_key(request.idempotency_key)
        await self._account(request.account_id)
        result = await self._writers.submit(
            TopUpOp(request.account_id, bucket, request.amount_nano, request.idempotency_key)
        )
        assert isinstance(result, TopUpResult)
        account = await self._account(request.account_id)
        return ledger_pb2.TopUpResponse(
            topup_id=result.topup_id, balances=_balances_pb(account), replayed=result.replayed
        )

    @rpc_method
    async def Refund(self, request: ledger_pb2.RefundRequest, context: Any) -> ledger_pb2.RefundResponse:
        if not request.receipt_id or len(request.receipt_id) > core.MAX_REQUEST_ID_CHARS:
            raise TFError("invalid_request", "receipt_id is required", "receipt_id")
        core.check_amount(request.amount_nano, "amount_nano")
        core.check_idempotency_key(request.idempotency_key)
        core.check_reason(request.reason, required=False)
        if "\x00" in request.receipt_id:  # PostgreSQL text cannot hold NUL, so no such receipt exists
            raise TFError("not_found", f"no receipt {request.receipt_id!r}", "receipt_id")
        async with self._pool.acquire() as conn:
            account_id = await store.account_of_receipt(conn, request.receipt_id)
        if account_id is None:
            raise TFError("not_found", f"no receipt {request.receipt_id}", "receipt_id")
        result = await self._writers.submit(
            RefundOp(account_id, request.receipt_id, request.amount_nano, request.idempotency_key, request.reason)
        )
        assert isinstance(result, RefundResult)
        account = await self._account(account_id)
        r = result.refund
        refund = ledger_pb2.Refund(
            id=r.id, receipt_id=r.receipt_id, account_id=r.account_id, bucket=r.bucket.to_pb(),
            amount_nano=r.amount_nano, reason=r.reason, created_at=rfc3339(r.created_at),
            receipt_amount_nano=result.receipt_amount_nano, receipt_refunded_nano=result.receipt_refunded_nano,
        )
        return ledger_pb2.RefundResponse(refund=refund, balances=_balances_pb(account), replayed=result.replayed)

    @rpc_method
    async def Adjust(self, request: ledger_pb2.AdjustRequest, context: Any) -> ledger_pb2.AdjustResponse:
        bucket = core.parse_bucket(request.bucket)
        assert bucket is not None
        core.check_amount(request.amount_nano, "amount_nano")
        direction = _DIRECTION_TO_TEXT.get(request.direction)
        if direction is None:
            raise TFError("invalid_request", "direction must be credit or debit", "direction")
        core.check_reason(request.reason, required=True)
        core.check_idempotency_key(request.idempotency_key)
        await self._account(request.account_id)
        result = await self._writers.submit(
            AdjustOp(request.account_id, bucket, direction, request.amount_nano, request.reason,
                     request.idempotency_key)
        )
        assert isinstance(result, AdjustResult)
        account = await self._account(request.account_id)
        a = result.adjustment
        adjustment = ledger_pb2.Adjustment(
            id=a.id, account_id=a.account_id, bucket=a.bucket.to_pb(), direction=_DIRECTION_FROM_TEXT[a.direction],
            amount_nano=a.amount_nano, reason=a.reason, created_at=rfc3339(a.created_at),
        )
        return ledger_pb2.AdjustResponse(adjustment=adjustment, balances=_balances_pb(account), replayed=result.replayed)

    @rpc_method
    async def CreateKey(self, request: ledger_pb2.CreateKeyRequest, context: Any) -> ledger_pb2.CreatedKey:
        core.check_name(request.name)
        policy = _POLICY_TO_TEXT.get(request.route_policy)
        if policy is None:
            raise TFError("invalid_request", "route_policy must be routed, direct or auto", "route_policy")
        limits = _limits(request.limits)
        models = list(request.allowed_models)
        if any(not m for m in models):
            raise TFError("invalid_request", "allowed_models must not contain empty names", "allowed_models")
        await self._account(request.account_id)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        async with self._pool.acquire() as conn:
            key = await store.create_key(
                conn,
                key_id=core.new_id("key"),
                account_id=request.account_id,
                name=request.name,
                secret=secret,
                prefix=secret[:SECRET_DISPLAY_CHARS],
                route_policy=policy,
                allowed_models=models,
                limits=limits,
            )
        return ledger_pb2.CreatedKey(key=_key_pb(key), secret=secret)

    @rpc_method
    async def RevokeKey(self, request: ledger_pb2.RevokeKeyRequest, context: Any) -> ledger_pb2.Key:
        if not request.key_id:
            raise TFError("invalid_request", "key_id is required", "key_id")
        async with self._pool.acquire() as conn:
            key = await store.revoke_key(conn, request.key_id)
            runs = await store.open_runs_of_key(conn, request.key_id) if key is not None else []
        if key is None:
            raise TFError("not_found", f"no key {request.key_id}", "key_id")
        # A revoked key can no longer close its runs: close them now, so their budgets go
        # back to the account instead of staying held until they expire. Requests already
        # admitted in them still settle (closing never takes a hold away).
        for run_id, account_id in runs:
            await self._writers.submit(CloseRunOp(account_id, run_id, None))
        return _key_pb(key)

    @rpc_method
    async def ListKeys(self, request: ledger_pb2.ListKeysRequest, context: Any) -> ledger_pb2.ListKeysResponse:
        await self._account(request.account_id)
        async with self._pool.acquire() as conn:
            keys = await store.list_keys(conn, request.account_id)
        return ledger_pb2.ListKeysResponse(keys=[_key_pb(k) for k in keys])

    @rpc_method
    async def AuthenticateKey(self, request: ledger_pb2.AuthenticateKeyRequest, context: Any) -> ledger_pb2.Key:
        secret = request.secret
        if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
            raise TFError("invalid_api_key", "the API key is not valid")
        digest = store.secret_hash(secret)
        async with self._pool.acquire() as conn:
            found = await store.key_by_hash(conn, digest)
        if found is None or not hmac.compare_digest(found[1], digest):
            raise TFError("invalid_api_key", "the API key is not valid")
        key = found[0]
        if key.revoked:
            raise TFError("invalid_api_key", "this API key has been revoked")
        self._key_account.put(key.id, key.account_id)
        return _key_pb(key)

    @rpc_method
    async def GetKeyBalance(self, request: ledger_pb2.GetKeyBalanceRequest, context: Any) -> ledger_pb2.KeyBalance:
        if not request.key_id:
            raise TFError("invalid_request", "key_id is required", "key_id")
        async with self._pool.acquire() as conn:
            key = await store.get_key(conn, request.key_id)
            if key is None:
                raise TFError("not_found", f"no key {request.key_id}", "key_id")
            account = await store.get_account(conn, key.account_id)
        assert account is not None
        return ledger_pb2.KeyBalance(
            balances=_balances_pb(account),
            key=_key_pb(key),
            spent_wallet_nano=key.spent[Bucket.WALLET],
            spent_credit_nano=key.spent[Bucket.CREDIT],
        )

    # -- settlement ---------------------------------------------------------------------------

    @rpc_method
    async def Hold(self, request: ledger_pb2.HoldRequest, context: Any) -> ledger_pb2.HoldResponse:
        bucket = core.parse_bucket(request.bucket)
        assert bucket is not None
        core.check_request_id(request.request_id)
        core.check_amount(request.amount_nano, "amount_nano")
        self._policy.hold_ttl(request.ttl_s)
        unsettled = _unsettled_receipt(request.unsettled_receipt_json)
        account_id = await self._account_of_key(request.key_id)
        result = await self._writers.submit(
            HoldOp(
                account_id=account_id,
                request_id=request.request_id,
                key_id=request.key_id,
                bucket=bucket,
                amount_nano=request.amount_nano,
                run_id=request.run_id or None,
                ttl_s=request.ttl_s,
                unsettled_receipt=unsettled,
            )
        )
        assert isinstance(result, HoldResult)
        self._request_account.put(request.request_id, account_id)
        return ledger_pb2.HoldResponse(
            hold_id=result.hold_id,
            amount_nano=result.amount_nano,
            expires_at=rfc3339(result.expires_at),
            replayed=result.replayed,
        )

    @rpc_method
    async def Release(self, request: ledger_pb2.ReleaseRequest, context: Any) -> ledger_pb2.ReleaseResponse:
        bucket = core.parse_bucket(request.bucket)
        assert bucket is not None
        core.check_request_id(request.request_id)
        account_id = await self._account_of_request(request.request_id)
        result = await self._writers.submit(ReleaseOp(account_id, request.request_id, bucket))
        assert isinstance(result, ReleaseResult)
        return ledger_pb2.ReleaseResponse(released_nano=result.released_nano, replayed=result.replayed)

    @rpc_method
    async def Settle(self, request: ledger_pb2.SettleRequest, context: Any) -> ledger_pb2.SettleResponse:
        bucket = core.parse_bucket(request.bucket, allow_unspecified=True)
        core.check_request_id(request.request_id)
        if request.rated_nano < 0:
            raise TFError("invalid_request", "rated_nano must not be negative", "rated_nano")
        receipt = _json_object(request.receipt_json, "receipt_json", MAX_RECEIPT_JSON_BYTES)
        if request.receipt_id:
            core.check_receipt_id(request.receipt_id)
        account_id = await self._account_of_key(request.key_id)
        result = await self._writers.submit(
            SettleOp(
                account_id=account_id,
                request_id=request.request_id,
                key_id=request.key_id,
                bucket=bucket,
                rated_nano=request.rated_nano,
                status=request.status,
                receipt=receipt,
                run_id=request.run_id or None,
                run_step=request.run_step or None,
                receipt_id=request.receipt_id or None,
                receipt_bytes=len(request.receipt_json),
            )
        )
        assert isinstance(result, SettleResult)
        return ledger_pb2.SettleResponse(
            receipt_id=result.receipt_id,
            amount_nano=result.amount_nano,
            uncollected_nano=result.uncollected_nano,
            held_nano=result.held_nano,
            released_nano=result.released_nano,
            replayed=result.replayed,
        )

    async def Batch(self, request: ledger_pb2.LedgerBatchRequest, context: Any) -> ledger_pb2.LedgerBatchResponse:
        # Each call is answered (and traced) as Hold/Release/Settle would be; started together,
        # they reach the writer in the same turn and share its next group commit.
        outcomes = await answer_batch(self, request.calls, _BATCHED, ledger_pb2.LedgerOutcome, context)
        return ledger_pb2.LedgerBatchResponse(outcomes=outcomes)

    async def BatchStream(self, request_iterator: Any, context: Any) -> None:
        # The router's way: the same batches as messages on one long-lived stream.
        await answer_batch_stream(self, context, _BATCHED, ledger_pb2.LedgerOutcome, ledger_pb2.LedgerBatchResponse)

    # -- receipts and statements --------------------------------------------------------------

    @rpc_method
    async def GetReceipt(self, request: ledger_pb2.GetReceiptRequest, context: Any) -> ledger_pb2.Receipt:
        if not request.receipt_id:
            raise TFError("invalid_request", "receipt_id is required", "receipt_id")
        async with self._pool.acquire() as conn:
            body = await store.get_receipt(conn, request.receipt_id, request.key_id or None)
        if body is None:
            raise TFError("not_found", f"no receipt {request.receipt_id}", "receipt_id")
        return ledger_pb2.Receipt(id=request.receipt_id, receipt_json=body.encode())

    @rpc_method
    async def ListReceipts(self, request: ledger_pb2.ListReceiptsRequest, context: Any) -> ledger_pb2.ListReceiptsResponse:
        if not (request.key_id or request.account_id or request.run_id):
            raise TFError("invalid_request", "give key_id, account_id or run_id", "key_id")
        limit = _list_limit(request.limit)
        async with self._pool.acquire() as conn:
            # A cursor from outside this listing is refused exactly like an unknown one, so a
            # caller cannot learn whether another key's receipt id exists.
            if request.after and not await store.receipt_exists(
                conn, request.after, key_id=request.key_id or None, account_id=request.account_id or None
            ):
                raise TFError("invalid_request", f"after: no receipt {request.after}", "after")
            rows, has_more = await store.list_receipts(
                conn,
                key_id=request.key_id or None,
                account_id=request.account_id or None,
                run_id=request.run_id or None,
                limit=limit,
                after=request.after or None,
            )
        return ledger_pb2.ListReceiptsResponse(
            receipts=[ledger_pb2.Receipt(id=rid, receipt_json=body.encode()) for rid, body in rows],
            has_more=has_more,
            last_id=rows[-1][0] if rows else "",
        )

    @rpc_method
    async def GetStatement(self, request: ledger_pb2.GetStatementRequest, context: Any) -> ledger_pb2.Statement:
        if bool(request.key_id) == bool(request.account_id):
            raise TFError("invalid_request", "give exactly one of key_id or account_id", "key_id")
        bucket = core.parse_bucket(request.bucket, allow_unspecified=True)
        limit = _list_limit(request.limit)
        after: int | None = None
        if request.after:
            try:
                after = int(request.after)
            except ValueError:
                raise TFError("invalid_request", "after must be an entry id from a previous page", "after") from None
        async with self._pool.acquire() as conn:
            if request.account_id:
                if await store.get_account(conn, request.account_id) is None:
                    raise TFError("not_found", f"no account {request.account_id}", "account_id")
            elif await store.get_key(conn, request.key_id) is None:
                raise TFError("not_found", f"no key {request.key_id}", "key_id")
            rows, has_more = await store.statement(
                conn,
                key_id=request.key_id or None,
                account_id=request.account_id or None,
                bucket=bucket,
                limit=limit,
                after=after,
            )
        return ledger_pb2.Statement(
            entries=[
                ledger_pb2.StatementEntry(
                    id=str(r.id),
                    at=rfc3339(r.at),
                    kind=r.kind,
                    bucket=r.bucket.to_pb(),
                    amount_nano=r.amount_nano,
                    balance_nano=r.balance_nano,
                    receipt_id=r.receipt_id or "",
                    key_id=r.key_id or "",
                )
                for r in rows
            ],
            has_more=has_more,
            last_id=str(rows[-1].id) if rows else "",
        )

    @rpc_method
    async def Audit(self, request: ledger_pb2.AuditRequest, context: Any) -> ledger_pb2.AuditResponse:
        async with self._pool.acquire() as conn:
            problems, n_accounts = await store.audit(conn)
        return ledger_pb2.AuditResponse(ok=not problems, problems=problems, accounts_checked=n_accounts)

    # -- runs ---------------------------------------------------------------------------------

    async def _run_pb(self, run_id: str, key_id: str | None) -> ledger_pb2.Run:
        async with self._pool.acquire() as conn:
            row = await store.get_run(conn, run_id)
            if row is None or (key_id and row["key_id"] != key_id):
                raise TFError("not_found", f"no run {run_id}", "run_id")
            bodies = await store.run_receipts(conn, run_id)
        info = report.RunInfo(
            id=row["id"],
            key_id=row["key_id"],
            name=row["name"],
            status=row["status"],
            budget_nano={Bucket.WALLET: row["budget_wallet_nano"], Bucket.CREDIT: row["budget_credit_nano"]},
            reserved_nano={Bucket.WALLET: row["reserved_wallet_nano"], Bucket.CREDIT: row["reserved_credit_nano"]},
            spent_nano={Bucket.WALLET: row["spent_wallet_nano"], Bucket.CREDIT: row["spent_credit_nano"]},
            refused=row["refused"],
            created_at=rfc3339(row["created_at"]),
            expires_at=rfc3339(row["expires_at"]),
            closed_at=rfc3339(row["closed_at"]) if row["closed_at"] else None,
            estimate=json.loads(row["estimate"]) if row["estimate"] else None,
        )
        body = report.build_report(info, bodies)
        return ledger_pb2.Run(
            id=info.id,
            key_id=info.key_id,
            name=info.name,
            status=info.status,
            report_json=json.dumps(body, separators=(",", ":")).encode(),
        )

    @rpc_method
    async def CreateRun(self, request: ledger_pb2.CreateRunRequest, context: Any) -> ledger_pb2.Run:
        core.check_name(request.name)
        for name in ("budget_wallet_nano", "budget_credit_nano"):
            if getattr(request, name) < 0:
                raise TFError("invalid_request", f"{name} must not be negative", name)
        estimate = _json_object(request.estimate_json, "estimate_json", MAX_ESTIMATE_JSON_BYTES)
        account_id = await self._account_of_key(request.key_id)
        result = await self._writers.submit(
            CreateRunOp(
                account_id=account_id,
                key_id=request.key_id,
                name=request.name,
                budget_wallet_nano=request.budget_wallet_nano,
                budget_credit_nano=request.budget_credit_nano,
                estimate_json=json.dumps(estimate) if request.estimate_json else None,
                ttl_s=request.ttl_s,
            )
        )
        assert isinstance(result, RunResult)
        return await self._run_pb(result.run_id, None)

    @rpc_method
    async def GetRun(self, request: ledger_pb2.GetRunRequest, context: Any) -> ledger_pb2.Run:
        if not request.run_id:
            raise TFError("invalid_request", "run_id is required", "run_id")
        return await self._run_pb(request.run_id, request.key_id or None)

    @rpc_method
    async def CloseRun(self, request: ledger_pb2.CloseRunRequest, context: Any) -> ledger_pb2.Run:
        if not request.run_id:
            raise TFError("invalid_request", "run_id is required", "run_id")
        async with self._pool.acquire() as conn:
            account_id = await store.account_of_run(conn, request.run_id)
        if account_id is None:
            raise TFError("not_found", f"no run {request.run_id}", "run_id")
        await self._writers.submit(CloseRunOp(account_id, request.run_id, request.key_id or None))
        return await self._run_pb(request.run_id, request.key_id or None)

    @rpc_method
    async def RecordRefusal(self, request: ledger_pb2.RecordRefusalRequest, context: Any) -> ledger_pb2.RecordRefusalResponse:
        if not request.run_id:
            raise TFError("invalid_request", "run_id is required", "run_id")
        async with self._pool.acquire() as conn:
            found = await store.record_refusal(conn, request.run_id, request.key_id or None)
        if not found:
            raise TFError("not_found", f"no run {request.run_id}", "run_id")
        return ledger_pb2.RecordRefusalResponse()


# ---------------------------------------------------------------------------------------------
# The reaper: expired holds and runs are released through the writers like any movement.


async def reap_once(pool: asyncpg.Pool, writers: Writers, now: dt.datetime) -> int:
    async with pool.acquire() as conn:
        holds = await store.expired_holds(conn, now, REAP_BATCH)
        runs = await store.expired_runs(conn, now, REAP_BATCH)
    ops: list[Op] = [
        ExpireHoldOp(r["account_id"], r["request_id"], Bucket(r["bucket"]), r["unsettled_receipt"]) for r in holds
    ]
    ops += [CloseRunOp(r["account_id"], r["id"], None, expire=True) for r in runs]
    if not ops:
        return 0
    results = await asyncio.gather(*(writers.submit(op) for op in ops), return_exceptions=True)
    for op, result in zip(ops, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("reaper: %r failed: %r", op, result)
            if isinstance(op, ExpireHoldOp) and await _draft_id_taken(pool, op):
                # Its draft can never be stored: expiring the hold matters more, with a receipt
                # the ledger makes from what it knows. (Any other failure keeps the draft, and
                # with it the receipt id a stream announced, for the next round.)
                try:
                    await writers.submit(dataclasses.replace(op, unsettled_receipt=None))
                except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                    log.warning("reaper: expiring %s failed again: %r", op.request_id, exc)
    return len(ops)


async def _draft_id_taken(pool: asyncpg.Pool, op: ExpireHoldOp) -> bool:
    """Whether the receipt id of `op`'s draft belongs to another request's receipt (Hold
    checked everything else about the draft)."""
    try:
        draft = orjson.loads(op.unsettled_receipt) if op.unsettled_receipt else None
    except ValueError:
        return True
    receipt_id = draft.get("id") if isinstance(draft, dict) else None
    if not isinstance(receipt_id, str):
        return False
    try:
        async with pool.acquire() as conn:
            return await store.receipt_id_taken(conn, receipt_id, op.request_id)
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
        return False  # the database is away: the next round asks again


STATS_EVERY_S = 10.0


async def reaper(pool: asyncpg.Pool, writers: Writers, interval_s: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    next_stats = loop.time() + STATS_EVERY_S
    last = (0, 0, 0.0)
    while not stop.is_set():
        if loop.time() >= next_stats:
            next_stats = loop.time() + STATS_EVERY_S
            batches = sum(w.stats.batches for w in writers.writers)
            ops = sum(w.stats.ops for w in writers.writers)
            busy_s = sum(w.stats.busy_s for w in writers.writers)
            if ops > last[1]:
                n_batches = max(batches - last[0], 1)
                log.info(
                    "group commit: %d operations in %d transactions (%.1f per commit, %.1f ms per "
                    "transaction) in the last %.0f s",
                    ops - last[1], batches - last[0], (ops - last[1]) / n_batches,
                    (busy_s - last[2]) * 1000 / n_batches, STATS_EVERY_S,
                )
            last = (batches, ops, busy_s)
        try:
            n = await reap_once(pool, writers, dt.datetime.now(dt.UTC))
            if n:
                log.info("reaper released %d expired holds/runs", n)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("reaper: %r", exc)
        except Exception:  # noqa: BLE001 - the loop must outlive any one round
            # Anything else (asyncpg's InternalClientError on a connection just ended, a bug):
            # if it ended the loop, no hold would ever expire again. Log it whole, go on.
            log.exception("reaper: unexpected error; trying again in %g s", interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


# ---------------------------------------------------------------------------------------------
# Start-up


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


async def _main(settings: Settings) -> int:
    n_writers = int(_env_number("TF_LEDGER_WRITERS", 1))
    row_cache = bool(_env_number("TF_LEDGER_ROW_CACHE", 1))  # 0: every batch reads its rows first
    reap_interval_s = _env_number("TF_LEDGER_REAP_INTERVAL_S", 1.0)
    policy = Policy(
        hold_ttl_s=settings.hold_ttl_s,
        hold_ttl_max_s=settings.hold_ttl_max_s,
        run_ttl_s=max(settings.hold_ttl_max_s, settings.hold_ttl_s),
    )
    for warning in settings.warnings():
        log.warning("%s", warning)
    try:
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"ledger: cannot connect to TF_DATABASE_URL: {exc}", file=sys.stderr)
        return 2
    try:
        applied = await migrations.migrate(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    finally:
        await conn.close()

    pool = await store.create_pool(settings.database_url, min_size=2, max_size=max(settings.db_pool_size, 2))
    writers: Writers
    if _env_number("TF_LEDGER_WRITER_THREAD", 0):
        # the writers have a connection each, on their own thread and loop
        writers = ThreadedWriterGroup(settings.database_url, policy, n_writers, row_cache=row_cache)
        await writers.start()
    else:
        size = n_writers * MAX_IN_FLIGHT  # each batch in flight has a connection
        writer_pool = await store.create_pool(settings.database_url, min_size=size, max_size=size, writer=True)
        writers = WriterGroup(writer_pool, policy, n_writers, row_cache=row_cache)
        writers.start()
    stop_reaper = asyncio.Event()
    reaper_task = asyncio.create_task(reaper(pool, writers, reap_interval_s, stop_reaper))
    servicer = LedgerServicer(pool, writers, policy)

    def register(server: grpc.aio.Server) -> list[str]:
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
        return [ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name]

    async def on_stop() -> None:
        stop_reaper.set()
        try:
            # Batches already sent to PostgreSQL may finish (their callers have been cut off
            # by the gRPC grace period already); a statement stuck behind a lock may not keep
            # the process alive: each batch commits whole or not at all, and every operation
            # is idempotent by its request id, so a cut-off batch is simply retried later.
            async with asyncio.timeout(WRITERS_STOP_S):
                await reaper_task
                await writers.stop()
                if isinstance(writers, WriterGroup):
                    await writers.pool.close()
                await pool.close()
        except TimeoutError:
            log.warning("the writers did not stop within %g s; closing their connections", WRITERS_STOP_S)
            reaper_task.cancel()
            if isinstance(writers, WriterGroup):
                writers.pool.terminate()
            pool.terminate()

    await serve(name="ledger", bind=settings.ledger_addr, register=register, on_stop=on_stop)
    return 0


def run(settings: Settings) -> int:
    if not settings.database_url:
        print(
            "ledger: TF_DATABASE_URL is not set; point it at PostgreSQL "
            "(tokenforge up starts an embedded one for you)",
            file=sys.stderr,
        )
        return 2
    install_uvloop()
    # A database that went away answers UNAVAILABLE (retry), not an opaque internal error.
    # InternalClientError: a pooled connection whose session the server has just ended, handed
    # out before asyncpg saw its socket close, refuses the next statement with it.
    treat_as_unavailable(asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                         asyncpg.InternalClientError)
    if _env_number("TF_LEDGER_WRITER_THREAD", 0):
        # The writers' thread wakes on every database reply; do not let it wait the default
        # 5 ms for the GIL while the gRPC thread is busy.
        sys.setswitchinterval(_env_number("TF_LEDGER_SWITCH_INTERVAL_S", 0.0005))
    return asyncio.run(_main(settings))
