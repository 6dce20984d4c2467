"""The run report (SPEC §4), built from the run's receipts alone: pure, no I/O.

Every figure is a sum over receipts in integer nano-units, so the totals equal the sum of the
run's receipts exactly. A receipt counts in the bucket that paid it; a receipt that charged
nothing (failed, bucket null) counts in the bucket its unit belongs to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenforge.money import Bucket, format_nano, parse_amount_nano

SLOWEST_CALLS = 5
_UNIT_BUCKET = {b.unit: b for b in Bucket}


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: str
    key_id: str
    name: str
    status: str
    budget_nano: dict[Bucket, int]
    reserved_nano: dict[Bucket, int]
    spent_nano: dict[Bucket, int]
    refused: int
    created_at: str
    expires_at: str
    closed_at: str | None
    estimate: Any


def _nano(value: Any) -> int:
    if value in (None, ""):
        return 0
    return parse_amount_nano(str(value))


def _signed_nano(value: Any) -> int:
    """A decimal string that may be negative (a fallback can be cheaper); null → 0."""
    if value in (None, ""):
        return 0
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    return sign * parse_amount_nano(text.lstrip("-"))


def _bucket_of(receipt: dict[str, Any]) -> Bucket:
    if receipt.get("bucket"):
        return Bucket(receipt["bucket"])
    return _UNIT_BUCKET.get(receipt.get("unit") or "", Bucket.WALLET)


def _retries(attempts: Sequence[dict[str, Any]]) -> int:
    seen: set[Any] = set()
    retries = 0
    for attempt in attempts:
        channel = attempt.get("channel")
        if channel in seen:
            retries += 1
        seen.add(channel)
    return retries


class _Group:
    __slots__ = ("amount", "calls")

    def __init__(self) -> None:
        self.amount = 0
        self.calls = 0


def build_report(run: RunInfo, receipt_bodies: Sequence[str]) -> dict[str, Any]:
    receipts = [json.loads(body) for body in receipt_bodies]
    totals: dict[Bucket, dict[str, int]] = {
        b: dict(amount=0, uncollected=0, calls=0, attempts=0, failed_attempts=0, retries=0,
                fallbacks=0, extra_cost=0)
        for b in Bucket
    }
    by_step: dict[tuple[str, Bucket], _Group] = {}
    by_model: dict[tuple[str, Bucket], _Group] = {}
    by_route: dict[tuple[str, Bucket], _Group] = {}
    calls: list[tuple[int, dict[str, Any]]] = []
    for r in receipts:
        bucket = _bucket_of(r)
        amount = _nano(r.get("amount"))
        attempts = r.get("attempts") or []
        t = totals[bucket]
        t["amount"] += amount
        t["uncollected"] += _nano(r.get("uncollected"))
        t["calls"] += 1
        t["attempts"] += len(attempts)
        t["failed_attempts"] += sum(1 for a in attempts if a.get("outcome") != "success")
        t["retries"] += _retries(attempts)
        fallback = r.get("fallback") or {}
        if fallback.get("used"):
            t["fallbacks"] += 1
            t["extra_cost"] += _signed_nano(fallback.get("extra_cost"))
        step = (r.get("run") or {}).get("step") or "(no step)"
        model = r.get("requested_model") or "(unknown)"
        final = next((a for a in attempts if a.get("n") == r.get("final_attempt")), None)
        route = (final or {}).get("route") or bucket.route
        for table, label in ((by_step, step), (by_model, model), (by_route, route)):
            group = table.setdefault((label, bucket), _Group())
            group.amount += amount
            group.calls += 1
        duration_ms = sum(int(a.get("duration_ms") or 0) for a in attempts)
        calls.append((duration_ms, r))

    def rows(table: dict[tuple[str, Bucket], _Group], name: str) -> list[dict[str, Any]]:
        return [
            {name: label, "amount": format_nano(g.amount), "unit": bucket.unit,
             "bucket": bucket.value, "calls": g.calls}
            for (label, bucket), g in table.items()
        ]

    calls.sort(key=lambda item: item[0], reverse=True)
    return {
        "id": run.id,
        "key_id": run.key_id,
        "name": run.name,
        "status": run.status,
        "created_at": run.created_at,
        "expires_at": run.expires_at,
        "closed_at": run.closed_at,
        "budget": {b.value: (format_nano(run.budget_nano[b]) if run.budget_nano[b] else None) for b in Bucket},
        "reserved": {b.value: format_nano(run.reserved_nano[b]) for b in Bucket},
        "totals": {
            b.value: {
                "unit": b.unit,
                "amount": format_nano(t["amount"]),
                "uncollected": format_nano(t["uncollected"]),
                "calls": t["calls"],
                "attempts": t["attempts"],
                "failed_attempts": t["failed_attempts"],
                "retries": t["retries"],
                "fallbacks": t["fallbacks"],
                "extra_cost": format_nano(t["extra_cost"]),
            }
            for b, t in totals.items()
        },
        "refused": run.refused,
        "by_step": rows(by_step, "step"),
        "by_model": rows(by_model, "model"),
        "by_route": rows(by_route, "route"),
        "slowest": [
            {
                "receipt_id": r.get("id"),
                "duration_ms": duration_ms,
                "model": r.get("requested_model"),
                "step": (r.get("run") or {}).get("step"),
                "status": r.get("status"),
                "attempts": len(r.get("attempts") or []),
            }
            for duration_ms, r in calls[:SLOWEST_CALLS]
        ],
        "receipts": [r.get("id") for r in receipts],
        "estimate": run.estimate,
    }
