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

from tokenforge.report_figures import (
    BUCKETS,
    budget_rows,
    estimate_per_bucket,
    estimate_rows,
    has_budget,
)
from tokenforge.report_figures import as_dict as _dict
from tokenforge.report_figures import unit as _unit
from tokenforge.terminal import WIDTH, Cell, pairs, printable, table

MAX_LIST_ROWS = 1_000  # plan steps, warnings, by-step/model/route rows, slowest calls: each cut here
MAX_RECEIPT_IDS = 1_000

def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


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
    rows = budget_rows(r)
    note = "" if has_budget(r) else "No budget was set: this run's requests were held against the key's balances."
    return _section(
        "Budget", note,
        table(["bucket", "unit", "budget", "charged", "left", "used", "reserved now"], rows, frozenset(range(2, 7))),
        _wrap("left: budget − charged · reserved now: what the run still holds of its budget (released when "
              "the run closes)"))


def _estimate(r: dict[str, Any]) -> list[str]:
    stored = _dict(r.get("estimate"))
    per_bucket = estimate_per_bucket(r)
    if not per_bucket:
        return _section("Estimate against actual", "No estimate was made when this run started.")
    rows = estimate_rows(r, per_bucket)
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
