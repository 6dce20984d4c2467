"""The receipt as the router drafts it (pure): who, which route, every attempt (read back from
the attempt spans), usage, price and the fallback block. The ledger adds the money it decides
(amount, held, released, uncollected) when it settles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenforge.catalog import ModelChannel
from tokenforge.money import Bucket, format_nano, format_price
from tokenforge.router.keys import KeyInfo
from tokenforge.router.policy import Eligible
from tokenforge.router.request import ChatRequest
from tokenforge.v1 import common_pb2


@dataclass
class Rated:
    usage: dict[str, int]
    usage_source: str
    amount_nano: int
    bucket: Bucket
    price: common_pb2.Price
    compare_nano: int  # the same usage at the primary channel's price


@dataclass
class Done:
    """The attempt whose output the client received."""

    el: Eligible
    n: int
    rated: Rated
    body: dict[str, Any] | None = None


def build_draft(
    *,
    attempts: list[dict[str, Any]],
    trace_id: str,
    request_id: str,
    key: KeyInfo,
    run_id: str,
    run_step: str,
    req: ChatRequest,
    status: str,
    primary: ModelChannel,
    done: Done | None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`error` says why a receipt charged less than a whole answer (`failed`, `partial`,
    `cancelled`): the error the client got, or what ended the request."""
    primary_unit = primary.channel.bucket.unit
    draft: dict[str, Any] = {
        "trace_id": trace_id,
        "request_id": request_id,
        "key": {"id": key.id, "name": key.name},
        "account_id": key.account_id,
        "run": {"id": run_id, "step": run_step or None} if run_id else None,
        "route_policy": key.route_policy,
        "requested_model": req.model,
        "stream": req.stream,
        "status": status,
        "final_attempt": attempts[-1]["n"] if attempts else 0,
        "attempts": attempts,
        "usage": None,
        "usage_source": None,
        "price": None,
        "error": error,
    }
    if done is None:
        draft["fallback"] = {
            "used": any(a["role"] == "backup" for a in attempts),
            "primary_channel": primary.channel.id,
            "primary_unit": primary_unit,
            "primary_price_amount": None,
            "extra_cost": None,
        }
        return draft
    r = done.rated
    draft["usage"] = {k: r.usage[k] for k in ("input_tokens", "output_tokens", "cached_input_tokens")}
    draft["usage_source"] = r.usage_source
    draft["price"] = {
        "unit": r.bucket.unit,
        "input": format_price(r.price.input_nano),
        "output": format_price(r.price.output_nano),
        "cached_input": format_price(r.price.cached_input_nano),
    }
    same_unit = primary_unit == r.bucket.unit
    draft["fallback"] = {
        "used": done.el.channel.channel.id != primary.channel.id,
        "primary_channel": primary.channel.id,
        "primary_unit": primary_unit,
        "primary_price_amount": format_nano(r.compare_nano),
        # Across units (CNY → CREDIT) an extra cost has no meaning.
        "extra_cost": format_nano(r.amount_nano - r.compare_nano) if same_unit else None,
    }
    return draft
