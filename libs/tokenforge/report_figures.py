"""The figures a run report's views derive from the JSON report (SPEC §4), shared by the
terminal view (`report`) and the page (`report_page`) so both show the same numbers.

Money stays exact: the report's decimal strings are read into nano-units, and what is
derived (what is left of a budget, actual against the estimate) is computed there and
formatted back, never through floats. Cells are plain values; each view escapes them its way.
"""

from __future__ import annotations

from typing import Any

from tokenforge.money import BUCKET_UNIT, Bucket, MoneyError, format_nano, parse_amount_nano

BUCKETS = tuple(b.value for b in Bucket)

Cell = str | int | None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def nano(text: Any) -> int | None:
    """A report amount ("0.000125", "-0.000040") → nano-units; None when absent or malformed."""
    if not isinstance(text, str) or not text:
        return None
    sign = -1 if text.startswith("-") else 1
    try:
        return sign * parse_amount_nano(text.removeprefix("-"))
    except MoneyError:
        return None


def signed(amount_nano: int) -> str:
    return ("+" if amount_nano > 0 else "") + format_nano(amount_nano)


def unit(r: dict[str, Any], bucket: str) -> str:
    return str(as_dict(as_dict(r.get("totals")).get(bucket)).get("unit") or BUCKET_UNIT[Bucket(bucket)])


def budget_rows(r: dict[str, Any]) -> list[list[Cell]]:
    """Per bucket: bucket, unit, budget ("none" without one), charged, left, share used, reserved now."""
    budget, reserved, totals = as_dict(r.get("budget")), as_dict(r.get("reserved")), as_dict(r.get("totals"))
    rows: list[list[Cell]] = []
    for bucket in BUCKETS:
        limit = budget.get(bucket)
        charged = as_dict(totals.get(bucket)).get("amount", "0")
        limit_nano, charged_nano = nano(limit), nano(charged)
        left: str | None = None
        used: str | None = None
        if limit_nano and charged_nano is not None:
            left = format_nano(limit_nano - charged_nano)
            tenths = (charged_nano * 1000 + limit_nano // 2) // limit_nano  # a share, not money: rounding is fine
            used = f"{tenths // 10}.{tenths % 10} %"
        rows.append([bucket, unit(r, bucket), limit if limit else "none", charged, left, used, reserved.get(bucket)])
    return rows


def has_budget(r: dict[str, Any]) -> bool:
    budget = as_dict(r.get("budget"))
    return any(budget.get(b) for b in BUCKETS)


def estimate_per_bucket(r: dict[str, Any]) -> dict[str, Any]:
    """The estimate made at the start, per bucket ({} when none was made). The ledger stores
    {"estimate", "warnings", "plan"}; a bare per-bucket estimate is read too."""
    stored = as_dict(r.get("estimate"))
    return as_dict(stored.get("estimate")) or {b: stored[b] for b in BUCKETS if b in stored}


def estimate_rows(r: dict[str, Any], per_bucket: dict[str, Any]) -> list[list[Cell]]:
    """Per bucket: bucket, unit, low, expected, high, actual, actual − expected, where actual falls."""
    totals = as_dict(r.get("totals"))
    rows: list[list[Cell]] = []
    for bucket in BUCKETS:
        e = as_dict(per_bucket.get(bucket))
        actual = as_dict(totals.get(bucket)).get("amount", "0")
        low_nano, expected_nano, high_nano = (nano(e.get(k)) for k in ("low", "expected", "high"))
        actual_nano = nano(actual)
        diff = signed(actual_nano - expected_nano) if actual_nano is not None and expected_nano is not None else None
        where = None
        if actual_nano is not None and low_nano is not None and high_nano is not None:
            where = "below low" if actual_nano < low_nano else "above high" if actual_nano > high_nano else "within"
        rows.append([bucket, unit(r, bucket), e.get("low"), e.get("expected"), e.get("high"), actual, diff, where])
    return rows
