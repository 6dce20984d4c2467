"""Protobuf ⇄ the JSON shapes of SPEC §4 (pure)."""

from __future__ import annotations

from typing import Any

from tokenforge.errors import TFError
from tokenforge.money import MoneyError, format_nano, parse_amount_nano
from tokenforge.v1 import common_pb2, ledger_pb2

POLICY_TO_PB = {"routed": common_pb2.ROUTE_POLICY_ROUTED, "direct": common_pb2.ROUTE_POLICY_DIRECT,
                "auto": common_pb2.ROUTE_POLICY_AUTO}
POLICY_FROM_PB = {v: k for k, v in POLICY_TO_PB.items()}
BUCKET_TO_PB = {"wallet": common_pb2.BUCKET_WALLET, "credit": common_pb2.BUCKET_CREDIT}
BUCKET_FROM_PB = {v: k for k, v in BUCKET_TO_PB.items()}
UNIT_OF_BUCKET = {"wallet": "CNY", "credit": "CREDIT"}
DIRECTION_TO_PB = {"credit": ledger_pb2.ADJUSTMENT_DIRECTION_CREDIT, "debit": ledger_pb2.ADJUSTMENT_DIRECTION_DEBIT}
DIRECTION_FROM_PB = {v: k for k, v in DIRECTION_TO_PB.items()}
MAX_NAME_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_REASON_CHARS = 500


def bucket_json(b: common_pb2.BucketBalance, unit: str) -> dict[str, str]:
    return {
        "unit": b.unit or unit,
        "balance": format_nano(b.balance_nano),
        "held": format_nano(b.held_nano),
        "available": format_nano(b.available_nano),
    }


def balances_json(b: common_pb2.Balances) -> dict[str, Any]:
    return {
        "id": b.account_id,
        "name": b.name,
        "buckets": {"wallet": bucket_json(b.wallet, "CNY"), "credit": bucket_json(b.credit, "CREDIT")},
    }


def limits_json(limits: ledger_pb2.KeyLimits) -> dict[str, Any]:
    def one(total: int, daily: int) -> dict[str, str | None]:
        return {"total": format_nano(total) if total else None, "daily": format_nano(daily) if daily else None}

    return {
        "wallet": one(limits.wallet_total_nano, limits.wallet_daily_nano),
        "credit": one(limits.credit_total_nano, limits.credit_daily_nano),
    }


def key_json(key: ledger_pb2.Key) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "account_id": key.account_id,
        "route_policy": POLICY_FROM_PB.get(key.route_policy, "routed"),
        "allowed_models": list(key.allowed_models),
        "limits": limits_json(key.limits),
        "prefix": key.prefix,
        "revoked": key.revoked,
        "created_at": key.created_at,
    }


def invalid(message: str, param: str | None) -> TFError:
    return TFError("invalid_request", message, param)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None)
    return body


def name_field(body: dict[str, Any], field: str = "name", required: bool = True) -> str:
    value = body.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"`{field}` is required and must be a non-empty string.", field)
    if len(value) > MAX_NAME_CHARS:
        raise invalid(f"`{field}` may be at most {MAX_NAME_CHARS} characters.", field)
    if not value.isprintable():
        raise invalid(f"`{field}` must be printable text (no control characters).", field)
    return value.strip()


def amount_field(value: Any, param: str, *, allow_zero: bool = False) -> int:
    if not isinstance(value, str):
        raise invalid(f"`{param}` must be a decimal string such as \"10.00\" (not a JSON number).", param)
    try:
        return parse_amount_nano(value, allow_zero=allow_zero)
    except MoneyError as exc:
        raise invalid(f"`{param}` {exc}.", param) from None


def bucket_field(value: Any, param: str = "bucket") -> int:
    if not isinstance(value, str) or value not in BUCKET_TO_PB:  # a JSON object or array is unhashable
        raise invalid(f"`{param}` must be `wallet` or `credit`.", param)
    return BUCKET_TO_PB[value]


def idempotency_key_field(body: dict[str, Any]) -> str:
    idem = body.get("idempotency_key")
    if not isinstance(idem, str) or not idem.strip() or len(idem) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise invalid(f"`idempotency_key` is required: a string of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters "
                      "that makes a retry safe.", "idempotency_key")
    if not idem.isprintable():
        # NUL cannot be stored, a lone surrogate cannot be sent on: refused here, as the client's mistake.
        raise invalid("`idempotency_key` must be printable text (no control characters).", "idempotency_key")
    return idem


def reason_field(body: dict[str, Any], *, required: bool) -> str:
    value = body.get("reason")
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise invalid("`reason` is required: say why the money moves (a string).", "reason")
    if len(value) > MAX_REASON_CHARS:
        raise invalid(f"`reason` may be at most {MAX_REASON_CHARS} characters.", "reason")
    if not value.isprintable():
        raise invalid("`reason` must be printable text (no control characters).", "reason")
    return value


def topup_request(account_id: str, body: dict[str, Any]) -> ledger_pb2.TopUpRequest:
    idem = idempotency_key_field(body)
    return ledger_pb2.TopUpRequest(
        account_id=account_id,
        bucket=bucket_field(body.get("bucket")),
        amount_nano=amount_field(body.get("amount"), "amount"),
        idempotency_key=idem,
    )


def refund_request(receipt_id: str, body: dict[str, Any]) -> ledger_pb2.RefundRequest:
    """`{amount, idempotency_key, reason?}`: amount is a positive decimal string."""
    return ledger_pb2.RefundRequest(
        receipt_id=receipt_id,
        amount_nano=amount_field(body.get("amount"), "amount"),
        idempotency_key=idempotency_key_field(body),
        reason=reason_field(body, required=False),
    )


def adjustment_request(account_id: str, body: dict[str, Any]) -> ledger_pb2.AdjustRequest:
    """`{bucket, amount, direction, reason, idempotency_key}`: amount is a positive decimal
    string and `direction` says which way it moves (`credit` adds, `debit` takes away)."""
    direction = body.get("direction")
    if not isinstance(direction, str) or direction not in DIRECTION_TO_PB:
        raise invalid("`direction` must be `credit` (add to the bucket) or `debit` (take from it).", "direction")
    return ledger_pb2.AdjustRequest(
        account_id=account_id,
        bucket=bucket_field(body.get("bucket")),
        amount_nano=amount_field(body.get("amount"), "amount"),
        direction=DIRECTION_TO_PB[direction],
        reason=reason_field(body, required=True),
        idempotency_key=idempotency_key_field(body),
    )


def one_bucket_json(balances: common_pb2.Balances, bucket: str) -> dict[str, str]:
    b = balances.wallet if bucket == "wallet" else balances.credit
    return bucket_json(b, UNIT_OF_BUCKET[bucket])


def refund_json(resp: ledger_pb2.RefundResponse) -> dict[str, Any]:
    r = resp.refund
    bucket = BUCKET_FROM_PB[r.bucket]
    return {
        "id": r.id,
        "object": "refund",
        "receipt_id": r.receipt_id,
        "account_id": r.account_id,
        "bucket": bucket,
        "unit": UNIT_OF_BUCKET[bucket],
        "amount": format_nano(r.amount_nano),
        "reason": r.reason or None,
        "created_at": r.created_at,
        "receipt": {
            "amount": format_nano(r.receipt_amount_nano),
            "refunded": format_nano(r.receipt_refunded_nano),
            "refundable": format_nano(r.receipt_amount_nano - r.receipt_refunded_nano),
        },
        "balance": one_bucket_json(resp.balances, bucket),
        "replayed": resp.replayed,
    }


def adjustment_json(resp: ledger_pb2.AdjustResponse) -> dict[str, Any]:
    a = resp.adjustment
    bucket = BUCKET_FROM_PB[a.bucket]
    return {
        "id": a.id,
        "object": "adjustment",
        "account_id": a.account_id,
        "bucket": bucket,
        "unit": UNIT_OF_BUCKET[bucket],
        "direction": DIRECTION_FROM_PB[a.direction],
        "amount": format_nano(a.amount_nano),
        "reason": a.reason,
        "created_at": a.created_at,
        "balance": one_bucket_json(resp.balances, bucket),
        "replayed": resp.replayed,
    }


def key_request(body: dict[str, Any]) -> ledger_pb2.CreateKeyRequest:
    account_id = body.get("account_id")
    if not isinstance(account_id, str) or not account_id:
        raise invalid("`account_id` is required.", "account_id")
    policy = body.get("route_policy", "routed")
    if not isinstance(policy, str) or policy not in POLICY_TO_PB:
        raise invalid("`route_policy` must be `routed`, `direct` or `auto`.", "route_policy")
    allowed = body.get("allowed_models") or []
    if not isinstance(allowed, list) or not all(isinstance(m, str) and m for m in allowed):
        raise invalid("`allowed_models` must be an array of model names.", "allowed_models")
    limits = ledger_pb2.KeyLimits()
    raw_limits = body.get("limits") or {}
    if not isinstance(raw_limits, dict):
        raise invalid("`limits` must be an object like {\"wallet\": {\"total\": \"5.00\", \"daily\": \"1.00\"}}.", "limits")
    for bucket, caps in raw_limits.items():
        if bucket not in BUCKET_TO_PB or not isinstance(caps, dict):
            raise invalid("`limits` keys must be `wallet` or `credit`, each an object with `total` and/or `daily`.", f"limits.{bucket}")
        for period, value in caps.items():
            if period not in ("total", "daily"):
                raise invalid("a limit is `total` or `daily`.", f"limits.{bucket}.{period}")
            if value is None:
                continue
            setattr(limits, f"{bucket}_{period}_nano", amount_field(value, f"limits.{bucket}.{period}"))
    return ledger_pb2.CreateKeyRequest(
        account_id=account_id,
        name=name_field(body),
        route_policy=POLICY_TO_PB[policy],
        allowed_models=allowed,
        limits=limits,
    )
