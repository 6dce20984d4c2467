"""A run report as one self-contained HTML page: every figure of the JSON report (SPEC §4),
laid out for someone debugging the run, plus an attempt waterfall drawn from its receipts.

No scripts, no stylesheets or fonts from elsewhere, no images: the page opens offline.
Money figures are the report's own decimal strings, printed as they came; the few the page
derives (what is left of a budget, actual against estimate) are computed exactly in
nano-units, never through floats. Run names, step names and ids come from clients, so every
value is HTML-escaped on its way into the page.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

from tokenforge.report_figures import (
    BUCKETS,
    Cell,
    budget_rows,
    estimate_per_bucket,
    estimate_rows,
    has_budget,
)
from tokenforge.report_figures import as_dict as _dict
from tokenforge.report_figures import unit as _unit

MAX_WATERFALL_ROWS = 500
MAX_RECEIPT_ROWS = 1_000  # the edge reads at most 10 pages of 100 receipts for one page
MAX_LIST_ROWS = 1_000  # plan steps, warnings and report rows: each list is cut here
NONE = "–"


def _e(value: Cell) -> str:
    return NONE if value is None else html.escape(str(value))


def _list(value: Any) -> list[Any]:
    return value[:MAX_LIST_ROWS] if isinstance(value, list) else []


def _table(table_id: str, headers: Sequence[str] | None, rows: Sequence[Sequence[Cell]], numeric: set[int]) -> str:
    """One table; cells are escaped here. `numeric` holds the indexes of right-aligned columns."""
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join(
        "<tr>" + "".join(f"<td class=num>{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table id={table_id}>{head}{body}</table>"


# ---------------------------------------------------------------- sections


def _facts(r: dict[str, Any]) -> str:
    rows: list[list[Cell]] = [
        ["run", r.get("id")], ["name", r.get("name")], ["status", r.get("status")], ["key", r.get("key_id")],
        ["created", r.get("created_at")], ["expires", r.get("expires_at")], ["closed", r.get("closed_at")],
        ["refused before any attempt", r.get("refused", 0)],
    ]
    return _table("run", None, rows, set())


def _cards(r: dict[str, Any]) -> str:
    totals = _dict(r.get("totals"))
    cards = []
    for bucket in BUCKETS:
        t = _dict(totals.get(bucket))
        cards.append(
            f"<div class=card><span class=muted>{_e(bucket)}</span><b>{_e(t.get('amount', '0'))} {_e(_unit(r, bucket))}</b>"
            f"{_e(t.get('calls', 0))} calls · {_e(t.get('attempts', 0))} attempts · {_e(t.get('failed_attempts', 0))} failed<br>"
            f"{_e(t.get('retries', 0))} retries · {_e(t.get('fallbacks', 0))} fallbacks · extra {_e(t.get('extra_cost', '0'))}</div>")
    cards.append(f"<div class=card><span class=muted>refused</span><b>{_e(r.get('refused', 0))}</b>before any attempt "
                 "(budget, balance)</div>")
    return f"<div class=cards>{''.join(cards)}</div>"


def _budget(r: dict[str, Any]) -> str:
    rows = budget_rows(r)
    note = ("" if has_budget(r) else
            "<p class=muted>No budget was set: this run's requests were held against the key's balances.</p>")
    return ("<h2>Budget</h2>" + note
            + _table("budget", ["bucket", "unit", "budget", "charged", "left", "used", "reserved now"], rows, {2, 3, 4, 5, 6})
            + "<p class=muted>charged: what the run's receipts paid · left: budget − charged · reserved now: what the run "
              "still holds of its budget (released when the run closes)</p>")


def _estimate(r: dict[str, Any]) -> str:
    stored = _dict(r.get("estimate"))
    per_bucket = estimate_per_bucket(r)
    if not per_bucket:
        return "<h2>Estimate against actual</h2><p class=muted>No estimate was made when this run started.</p>"
    rows = estimate_rows(r, per_bucket)
    out = ["<h2>Estimate against actual</h2>",
           _table("estimate", ["bucket", "unit", "low", "expected", "high", "actual", "actual − expected", "range"],
                  rows, {2, 3, 4, 5, 6})]
    plan = [p for p in _list(stored.get("plan")) if isinstance(p, dict)]
    if plan:
        out += ["<h3>Plan given at the start</h3>", _table(
            "plan", ["step", "model", "calls", "input tokens per call", "output tokens per call"],
            [[p.get("step"), p.get("model"), p.get("calls"), p.get("input_tokens"), p.get("output_tokens")] for p in plan],
            {2, 3, 4})]
    warnings = [w for w in _list(stored.get("warnings")) if isinstance(w, dict)]
    if warnings:
        out += ["<h3>Warnings at the start</h3>",
                _table("warnings", ["code", "message"], [[w.get("code"), w.get("message")] for w in warnings], set())]
    return "".join(out)


def _totals(r: dict[str, Any]) -> str:
    totals = _dict(r.get("totals"))
    fields = ("amount", "uncollected", "calls", "attempts", "failed_attempts", "retries", "fallbacks", "extra_cost")
    rows: list[list[Cell]] = [[b, _unit(r, b), *(_dict(totals.get(b)).get(f) for f in fields)] for b in BUCKETS]
    return ("<h2>Totals</h2>"
            + _table("totals", ["bucket", "unit", "amount", "uncollected", "calls", "attempts", "failed attempts",
                                "retries", "fallbacks", "fallback extra cost"], rows, set(range(2, 10)))
            + f"<p>Refused before any attempt (budget, balance): <b>{_e(r.get('refused', 0))}</b></p>"
            + "<p class=muted>uncollected: rated cost beyond the hold and the available balance · fallback extra cost: "
              "what the fallbacks cost over the primary channel's price for the same usage</p>")


def _slowest(r: dict[str, Any]) -> str:
    slow = [s for s in _list(r.get("slowest")) if isinstance(s, dict)]
    if not slow:
        return ""
    rows: list[list[Cell]] = [[s.get("receipt_id"), s.get("step"), s.get("model"), s.get("duration_ms"), s.get("attempts"),
                               s.get("status")] for s in slow]
    return ("<h2>Slowest calls</h2>"
            + _table("slowest", ["receipt", "step", "model", "ms (all attempts)", "attempts", "status"], rows, {3, 4}))


def _groups(r: dict[str, Any]) -> str:
    out = []
    for title, key, first in (("By step", "by_step", "step"), ("By model", "by_model", "model"), ("By route", "by_route", "route")):
        items = [i for i in _list(r.get(key)) if isinstance(i, dict)]
        if items:
            rows: list[list[Cell]] = [[i.get(first), i.get("bucket"), i.get("amount"), i.get("unit"), i.get("calls")] for i in items]
            out.append(f"<h2>{title}</h2>" + _table(key.replace("_", "-"), [first, "bucket", "amount", "unit", "calls"], rows, {2, 4}))
    return "".join(out)


def _receipts(r: dict[str, Any], receipts: Sequence[dict[str, Any]]) -> str:
    ids = r.get("receipts") if isinstance(r.get("receipts"), list) else []
    by_id = {rc.get("id"): rc for rc in receipts}
    rows: list[list[Cell]] = []
    for rid in ids[:MAX_RECEIPT_ROWS]:
        rc = by_id.get(rid) or {}
        fallback = _dict(rc.get("fallback"))
        final = next((a for a in rc.get("attempts") or [] if isinstance(a, dict) and a.get("n") == rc.get("final_attempt")), {})
        rows.append([rid, _dict(rc.get("run")).get("step"), rc.get("requested_model"), rc.get("status"), rc.get("amount"),
                     rc.get("unit"), len(rc["attempts"]) if isinstance(rc.get("attempts"), list) else None,
                     final.get("channel"), fallback.get("extra_cost") if fallback.get("used") else None])
    more = (f"<p class=muted>{len(ids) - MAX_RECEIPT_ROWS} more receipts are listed in the JSON report "
            f"(<code>GET /v1/runs/{_e(r.get('id'))}</code>).</p>" if len(ids) > MAX_RECEIPT_ROWS else "")
    return (f"<h2>Receipts ({len(ids)})</h2>"
            + _table("receipts", ["receipt", "step", "model", "status", "amount", "unit", "attempts", "final channel",
                                  "fallback extra cost"], rows, {4, 6, 8}) + more)


def _ts(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _waterfall(receipts: Sequence[dict[str, Any]]) -> str:
    e = html.escape
    rows: list[tuple[float, float, str, str, str]] = []
    for rc in receipts:
        for a in rc.get("attempts") or []:
            start = _ts(a.get("started_at"))
            if start is None:
                continue
            status = "ok" if a.get("outcome") == "success" else ("partial" if a.get("outcome") in ("stream_error",) else
                                                                 "cancelled" if a.get("outcome") == "cancelled" else "failed")
            step = _dict(rc.get("run")).get("step") or "-"
            label = f"{step} · {rc.get('requested_model')} · #{a.get('n')} {a.get('channel')} ({a.get('role')}) · {a.get('outcome')}"
            title = (f"{rc.get('id')} · {label} · {a.get('duration_ms')} ms · charged {a.get('charged')}"
                     + (f" · {a.get('error')}" if a.get("error") else ""))
            rows.append((start, (a.get("duration_ms") or 0) / 1000.0, status, label, title))
    rows.sort()
    rows = rows[:MAX_WATERFALL_ROWS]
    if not rows:
        return ""
    t0 = rows[0][0]
    span = max(max(s + d for s, d, *_ in rows) - t0, 0.001)
    bars = "".join(
        f"<div class=row title='{e(title)}'><div class=label>{e(label)}</div><div class=track>"
        f"<div class='bar {status}' style='left:{(s - t0) / span * 100:.3f}%;width:{max(d / span * 100, 0.2):.3f}%'></div></div></div>"
        for s, d, status, label, title in rows)
    return (f"<h2>Attempts over time</h2><div class=legend><i style='background:#3b82f6'></i>success"
            f"<i style='background:#ef4444'></i>failed<i style='background:#f59e0b'></i>partial / cancelled"
            f" <span class=muted>· 0 – {span:.2f} s · hover a bar for its receipt, error and charge</span></div>"
            f"<div class=wf>{bars}</div>")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 4px} h3{font-size:14px;margin:12px 0 4px}
.muted{color:#667} table{border-collapse:collapse;margin:8px 0 12px;background:#fff}
th,td{padding:4px 10px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#run td:first-child{color:#667}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0} .card{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:12px 16px;min-width:180px}
.card b{font-size:20px;display:block} .wf{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:8px 12px}
.row{display:flex;align-items:center;height:22px;font-size:12px} .label{width:460px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.track{position:relative;flex:1;height:14px;background:#f1f3f5;border-radius:3px}
.bar{position:absolute;top:0;height:14px;border-radius:3px;background:#3b82f6;min-width:2px}
.bar.failed{background:#ef4444} .bar.partial,.bar.cancelled{background:#f59e0b}
.legend{margin:4px 0 8px} .legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px}
"""


def report_html(r: dict[str, Any], receipts: Sequence[dict[str, Any]] | None = None) -> str:
    """The page for report `r` (as `GET /v1/runs/{id}` returns it) and the run's receipts."""
    receipts = [rc for rc in receipts or [] if isinstance(rc, dict)]
    name = _e(r.get("name", ""))
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Run {name} · tokenforge</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Run {name}</h1><div class=muted><code>{_e(r.get('id', ''))}</code> · {_e(r.get('status', ''))}</div>"
        f"{_cards(r)}{_facts(r)}{_budget(r)}{_estimate(r)}{_totals(r)}{_slowest(r)}{_waterfall(receipts)}"
        f"{_groups(r)}{_receipts(r, receipts)}</body></html>"
    )
