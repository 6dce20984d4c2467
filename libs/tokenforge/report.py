"""A run report for people, as tables for the terminal (the page is in `report_page`)."""

from __future__ import annotations

from typing import Any


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
