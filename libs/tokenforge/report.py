"""A run report for people, in a terminal (the page is in `report_page`): every figure of the
JSON report (SPEC §4, `GET /v1/runs/{id}`), laid out for a 100-column terminal.

Money figures are the report's own decimal strings, printed as they came; the few this view
derives (what is left of a budget, the share used, actual against estimate) are computed
exactly in nano-units, never through floats, as the page does. Run names, step names and
every other value pass through `terminal.printable`, so none can steer the terminal.
"""

from __future__ import annotations

import textwrap
from typing import Any

from tokenforge.money import BUCKET_UNIT, Bucket, MoneyError, format_nano, parse_amount_nano
from tokenforge.terminal import WIDTH, Cell, pairs, printable, table

MAX_LIST_ROWS = 1_000  # plan steps, warnings, by-step/model/route rows, slowest calls: each cut here
MAX_RECEIPT_IDS = 1_000
BUCKETS = tuple(b.value for b in Bucket)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _nano(text: Any) -> int | None:
    """A report amount ("0.000125", "-0.000040") → nano-units; None when absent or malformed."""
    if not isinstance(text, str) or not text:
        return None
    sign = -1 if text.startswith("-") else 1
    try:
        return sign * parse_amount_nano(text.removeprefix("-"))
    except MoneyError:
        return None


def _unit(r: dict[str, Any], bucket: str) -> str:
    return str(_dict(_dict(r.get("totals")).get(bucket)).get("unit") or BUCKET_UNIT[Bucket(bucket)])


def _rows(items: list[Any], what: str, r: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The dict items of a report list, at most MAX_LIST_ROWS, and a line saying what was cut."""
    rows = [i for i in items if isinstance(i, dict)]
    if len(rows) <= MAX_LIST_ROWS:
        return rows, ""
    return rows[:MAX_LIST_ROWS], (f"{len(rows) - MAX_LIST_ROWS} more {what} are in the JSON report "
                                  f"(tokenforge run report {printable(r.get('id'))} --json)")


def _section(title: str, *parts: str) -> list[str]:
    return ["", title, *(p for p in parts if p)]


# ---------------------------------------------------------------- sections


def _facts(r: dict[str, Any]) -> list[str]:
    return [f"Run {printable(r.get('name'))}", pairs([
        ("run", r.get("id")), ("status", r.get("status")), ("key", r.get("key_id")),
        ("created", r.get("created_at")), ("expires", r.get("expires_at")), ("closed", r.get("closed_at")),
    ])]


def _totals(r: dict[str, Any]) -> list[str]:
    totals = _dict(r.get("totals"))
    # calls .. fallbacks stay columns 4-8 of the wallet row: `tokenforge demo`'s readers count on it
    fields = ("amount", "calls", "attempts", "failed_attempts", "retries", "fallbacks", "extra_cost", "uncollected")
    rows: list[list[Cell]] = [[b, _unit(r, b), *(_dict(totals.get(b)).get(f) for f in fields)] for b in BUCKETS]
    return _section(
        "Totals",
        table(["bucket", "unit", "amount", "calls", "attempts", "failed", "retries", "fallbacks", "extra cost",
               "uncollected"], rows, frozenset(range(2, 10))),
        f"refused before any attempt (budget, balance): {printable(r.get('refused', 0))}",
        _wrap("failed: attempts that did not succeed · extra cost: what the fallbacks cost over the primary "
              "channel's price for the same usage · uncollected: rated cost beyond the hold and the available "
              "balance"))


def _budget(r: dict[str, Any]) -> list[str]:
    budget, reserved, totals = _dict(r.get("budget")), _dict(r.get("reserved")), _dict(r.get("totals"))
    rows: list[list[Cell]] = []
    for bucket in BUCKETS:
        limit = budget.get(bucket)
        charged = _dict(totals.get(bucket)).get("amount", "0")
        limit_nano, charged_nano = _nano(limit), _nano(charged)
        left: str | None = None
        used: str | None = None
        if limit_nano and charged_nano is not None:
            left = format_nano(limit_nano - charged_nano)
            tenths = (charged_nano * 1000 + limit_nano // 2) // limit_nano  # a share, not money: rounding is fine
            used = f"{tenths // 10}.{tenths % 10} %"
        rows.append([bucket, _unit(r, bucket), limit if limit else "none", charged, left, used, reserved.get(bucket)])
    note = ("" if any(budget.get(b) for b in BUCKETS) else
            "No budget was set: this run's requests were held against the key's balances.")
    return _section(
        "Budget", note,
        table(["bucket", "unit", "budget", "charged", "left", "used", "reserved now"], rows, frozenset(range(2, 7))),
        _wrap("left: budget − charged · reserved now: what the run still holds of its budget (released when "
              "the run closes)"))


def _estimate(r: dict[str, Any]) -> list[str]:
    stored = _dict(r.get("estimate"))
    # the ledger stores {"estimate", "warnings", "plan"}; a bare per-bucket estimate is read too
    per_bucket = _dict(stored.get("estimate")) or {b: stored[b] for b in BUCKETS if b in stored}
    if not per_bucket:
        return _section("Estimate against actual", "No estimate was made when this run started.")
    totals = _dict(r.get("totals"))
    rows: list[list[Cell]] = []
    for bucket in BUCKETS:
        e = _dict(per_bucket.get(bucket))
        actual = _dict(totals.get(bucket)).get("amount", "0")
        low_nano, expected_nano, high_nano = (_nano(e.get(k)) for k in ("low", "expected", "high"))
        actual_nano = _nano(actual)
        diff = None
        if actual_nano is not None and expected_nano is not None:
            diff = ("+" if actual_nano > expected_nano else "") + format_nano(actual_nano - expected_nano)
        where = None
        if actual_nano is not None and low_nano is not None and high_nano is not None:
            where = "below low" if actual_nano < low_nano else "above high" if actual_nano > high_nano else "within"
        rows.append([bucket, _unit(r, bucket), e.get("low"), e.get("expected"), e.get("high"), actual, diff, where])
    out = _section("Estimate against actual",
                   table(["bucket", "unit", "low", "expected", "high", "actual", "actual − expected", "range"],
                         rows, frozenset(range(2, 7))))
    plan, cut = _rows(_list(stored.get("plan")), "plan steps", r)
    if plan:
        out += _section("Plan given at the start", table(
            ["step", "model", "calls", "input tokens/call", "output tokens/call"],
            [[p.get("step"), p.get("model"), p.get("calls"), p.get("input_tokens"), p.get("output_tokens")] for p in plan],
            frozenset({2, 3, 4})), cut)
    warnings, cut = _rows(_list(stored.get("warnings")), "warnings", r)
    if warnings:
        out += _section("Warnings at the start",
                        *(_wrap(f"{printable(w.get('code'))}: {printable(w.get('message'))}", indent="  ") for w in warnings),
                        cut)
    return out


def _slowest(r: dict[str, Any]) -> list[str]:
    slow, cut = _rows(_list(r.get("slowest")), "slowest calls", r)
    if not slow:
        return []
    rows: list[list[Cell]] = [[s.get("receipt_id"), s.get("step"), s.get("model"), s.get("duration_ms"),
                               s.get("attempts"), s.get("status")] for s in slow]
    return _section("Slowest calls (ms: all attempts together)",
                    table(["receipt", "step", "model", "ms", "attempts", "status"], rows, frozenset({3, 4})), cut)


def _groups(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for title, key, first in (("By step", "by_step", "step"), ("By model", "by_model", "model"),
                              ("By route", "by_route", "route")):
        items, cut = _rows(_list(r.get(key)), f"{first} rows", r)
        if items:
            rows: list[list[Cell]] = [[i.get(first), i.get("bucket"), i.get("amount"), i.get("unit"), i.get("calls")]
                                      for i in items]
            out += _section(title, table([first, "bucket", "amount", "unit", "calls"], rows, frozenset({2, 4})), cut)
    return out


def _receipts(r: dict[str, Any]) -> list[str]:
    ids = _list(r.get("receipts"))
    shown = " ".join(printable(i) for i in ids[:MAX_RECEIPT_IDS])
    more = (f"{len(ids) - MAX_RECEIPT_IDS} more receipts are in the JSON report "
            f"(tokenforge run report {printable(r.get('id'))} --json)" if len(ids) > MAX_RECEIPT_IDS else "")
    return _section(f"Receipts ({len(ids)})", _wrap(shown, more="") if ids else "none", more)


def _wrap(text: str, indent: str = "", more: str = "  ") -> str:
    """`text` in lines of at most WIDTH columns; lines after the first indented by `more` too."""
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + more,
                                   break_long_words=False, break_on_hyphens=False))


def report_text(r: dict[str, Any]) -> str:
    """Report `r` (as `GET /v1/runs/{id}` returns it) as text for a terminal."""
    lines = [*_facts(r), *_totals(r), *_budget(r), *_estimate(r), *_slowest(r), *_groups(r), *_receipts(r)]
    return "\n".join(lines)
