"""A run report for people: tables for the terminal, a page with an attempt waterfall."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

MAX_WATERFALL_ROWS = 500


def _get(d: Any, *path: str, default: Any = "") -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d if d is not None else default


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for i, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j and _numeric(c) else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).isdigit()


def report_text(r: dict[str, Any]) -> str:
    lines = [f"run {r.get('id')}  {r.get('name', '')}  [{r.get('status', '')}]"]
    budget = r.get("budget") or {}
    if any(budget.values()) if isinstance(budget, dict) else budget:
        lines.append("budget: " + ", ".join(f"{k} {v}" for k, v in budget.items() if v))
    totals = r.get("totals") or {}
    rows = []
    for bucket in ("wallet", "credit"):
        t = totals.get(bucket) or {}
        rows.append([bucket, t.get("unit", "CNY" if bucket == "wallet" else "CREDIT"), t.get("amount", "0"), t.get("calls", 0),
                     t.get("attempts", 0), t.get("failed_attempts", 0), t.get("retries", 0), t.get("fallbacks", 0),
                     t.get("extra_cost", "0")])
    lines += ["", "Totals", _table(["bucket", "unit", "amount", "calls", "attempts", "failed", "retries", "fallbacks", "extra cost"], rows)]
    lines.append(f"refused before any attempt: {r.get('refused', 0)}")
    for title, key, first in (("By step", "by_step", "step"), ("By model", "by_model", "model"), ("By route", "by_route", "route")):
        items = r.get(key) or []
        if items:
            lines += ["", title, _table([first, "amount", "unit", "calls"],
                                        [[i.get(first) or "-", i.get("amount", "0"), i.get("unit", ""), i.get("calls", 0)] for i in items])]
    slow = r.get("slowest") or r.get("slowest_calls") or []
    if slow:
        lines += ["", "Slowest calls", _table(["receipt", "model", "ms", "attempts", "status"],
                                              [[s.get("receipt_id") or s.get("id"), s.get("model") or s.get("requested_model", ""),
                                                s.get("duration_ms", ""), s.get("attempts", ""), s.get("status", "")] for s in slow])]
    est = _get(r, "estimate", "estimate", default=None) or r.get("estimate")
    if isinstance(est, dict) and "wallet" in est:
        lines += ["", "Estimate before the run", _table(["bucket", "low", "expected", "high"],
                                                        [[b, _get(est, b, "low"), _get(est, b, "expected"), _get(est, b, "high")] for b in ("wallet", "credit")])]
    receipts = r.get("receipts") or []
    lines += ["", f"{len(receipts)} receipts" + (": " + ", ".join(receipts[:5]) + (" …" if len(receipts) > 5 else "") if receipts else "")]
    return "\n".join(lines)


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} .muted{color:#667} table{border-collapse:collapse;margin:8px 0 20px}
th,td{padding:4px 10px;border-bottom:1px solid #e3e6ea;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;margin:16px 0} .card{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:12px 16px;min-width:180px}
.card b{font-size:20px;display:block} .wf{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:8px 12px}
.row{display:flex;align-items:center;height:22px;font-size:12px} .label{width:460px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.track{position:relative;flex:1;height:14px;background:#f1f3f5;border-radius:3px}
.bar{position:absolute;top:0;height:14px;border-radius:3px;background:#3b82f6;min-width:2px}
.bar.failed{background:#ef4444} .bar.partial,.bar.cancelled{background:#f59e0b}
.legend{margin:4px 0 8px} .legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 12px}
"""


def report_html(r: dict[str, Any], receipts: list[dict[str, Any]] | None = None) -> str:
    e = html.escape
    totals = r.get("totals") or {}
    cards = []
    for bucket in ("wallet", "credit"):
        t = totals.get(bucket) or {}
        cards.append(f"<div class=card><span class=muted>{e(bucket)}</span><b>{e(str(t.get('amount', '0')))} {e(str(t.get('unit', '')))}</b>"
                     f"{t.get('calls', 0)} calls · {t.get('attempts', 0)} attempts · {t.get('failed_attempts', 0)} failed</div>")
    cards.append(f"<div class=card><span class=muted>refused</span><b>{e(str(r.get('refused', 0)))}</b>before any attempt</div>")

    def table(title: str, key: str, first: str) -> str:
        items = r.get(key) or []
        if not items:
            return ""
        body = "".join(f"<tr><td>{e(str(i.get(first) or '-'))}</td><td class=num>{e(str(i.get('amount', '0')))}</td>"
                       f"<td>{e(str(i.get('unit', '')))}</td><td class=num>{e(str(i.get('calls', 0)))}</td></tr>" for i in items)
        return f"<h2>{e(title)}</h2><table><tr><th>{e(first)}</th><th>amount</th><th>unit</th><th>calls</th></tr>{body}</table>"

    rows: list[tuple[float, float, str, str, str]] = []
    for rc in receipts or []:
        for a in rc.get("attempts") or []:
            start = _ts(a.get("started_at"))
            if start is None:
                continue
            status = "ok" if a.get("outcome") == "success" else ("partial" if a.get("outcome") in ("stream_error",) else
                                                                 "cancelled" if a.get("outcome") == "cancelled" else "failed")
            step = _get(rc, "run", "step", default="") or "-"
            label = f"{step} · {rc.get('requested_model')} · #{a.get('n')} {a.get('channel')} ({a.get('role')}) · {a.get('outcome')}"
            title = (f"{rc.get('id')} · {label} · {a.get('duration_ms')} ms · charged {a.get('charged')}"
                     + (f" · {a.get('error')}" if a.get("error") else ""))
            rows.append((start, (a.get("duration_ms") or 0) / 1000.0, status, label, title))
    rows.sort()
    rows = rows[:MAX_WATERFALL_ROWS]
    waterfall = ""
    if rows:
        t0 = rows[0][0]
        span = max(max(s + d for s, d, *_ in rows) - t0, 0.001)
        bars = "".join(
            f"<div class=row title='{e(title)}'><div class=label>{e(label)}</div><div class=track>"
            f"<div class='bar {status}' style='left:{(s - t0) / span * 100:.3f}%;width:{max(d / span * 100, 0.2):.3f}%'></div></div></div>"
            for s, d, status, label, title in rows)
        waterfall = (f"<h2>Attempts over time</h2><div class=legend><i style='background:#3b82f6'></i>success"
                     f"<i style='background:#ef4444'></i>failed<i style='background:#f59e0b'></i>partial / cancelled"
                     f" <span class=muted>· 0 – {span:.2f} s · hover a bar for its receipt, error and charge</span></div>"
                     f"<div class=wf>{bars}</div>")
    receipt_list = "".join(f"<li><code>{e(str(x))}</code></li>" for x in (r.get("receipts") or [])[:200])
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Run {e(str(r.get('name', '')))} · tokenforge</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Run {e(str(r.get('name', '')))}</h1><div class=muted><code>{e(str(r.get('id', '')))}</code> · {e(str(r.get('status', '')))}</div>"
        f"<div class=cards>{''.join(cards)}</div>"
        f"{waterfall}{table('By step', 'by_step', 'step')}{table('By model', 'by_model', 'model')}{table('By route', 'by_route', 'route')}"
        f"<h2>Receipts</h2><ul>{receipt_list}</ul></body></html>"
    )
