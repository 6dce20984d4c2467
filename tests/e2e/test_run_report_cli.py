"""`tokenforge run report` in a terminal, through the real CLI: against a running stack, every
figure of `GET /v1/runs/{id}` is printed as the same string; and served a report whose names
carry escape sequences, the CLI prints them as visible escapes that cannot steer the terminal."""

from __future__ import annotations

import copy
import http.server
import json
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import Customer, make_customer

NONE = "–"
CLEAR = "\x1b[2J"  # ESC [ 2 J: clear the screen
CLEAR_SHOWN = "\\x1b[2J"  # how the report must print it: visible, inert


def _cli(url: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tokenforge.cli", *args, "--url", url], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.decode("utf-8")
    # nothing that acts on a terminal gets through (C0 with ESC, DEL, C1 with CSI; bidi overrides): only line breaks
    acting = [ch for ch in text if ch != "\n" and (unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"))]
    assert not acting, repr(text)
    return text


def _section(text: str, title: str) -> list[str]:
    """The lines under a title line, up to the next blank line."""
    lines = text.split("\n")
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def _table(text: str, title: str) -> list[dict[str, str]]:
    """The table under `title`, cut into columns where its dashed rule has them."""
    lines = _section(text, title)
    rule = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    spans, pos = [], 0
    for dashes in lines[rule].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2

    def cells(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in spans]

    headers = cells(lines[rule - 1])
    rows = []
    for line in lines[rule + 1:]:
        if line.startswith(("refused", "failed:", "left:")):  # the lines under a table
            break
        rows.append(dict(zip(headers, cells(line), strict=True)))
    return rows


def _by(rows: list[dict[str, str]], column: str) -> dict[str, dict[str, str]]:
    return {row[column]: row for row in rows}


def _cell(value: object) -> str:
    return NONE if value is None else str(value)


@pytest.fixture(scope="module")
def run_report(stack) -> tuple[Customer, dict[str, Any], list[str]]:
    """A run with a budget, a plan (an estimate with warnings), a retry, a fallback that cost
    extra and a refusal; its JSON report and the receipt ids of its calls."""
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={
            "name": "cli report", "budget": {"wallet": "0.010000"},
            "plan": [{"model": "gpt-4o-mini", "calls": 3, "input_tokens": 20, "output_tokens": 8, "step": "plan step"}],
        }).json()
        # the edge takes no control character in a step: a raw ESC, or CSI as a Latin-1 byte
        for step in (CLEAR.encode(), b"\x9b2J"):
            resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 400, (step, resp.text)
        calls = (("intro", "gpt-4o-mini", 8), ("lookup", "m-timeout", 8), ("retry", "m-500", 8),
                 ("too big", "gpt-4o-mini", 4096))  # the last one's hold is more than the budget left
        statuses, receipt_ids = [], []
        for step, model, max_tokens in calls:
            resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
            statuses.append((resp.status_code, resp.json().get("error", {}).get("code")))
            receipt_ids.append(resp.headers.get("x-tf-receipt-id"))
        assert statuses == [(200, None)] * 3 + [(402, "run_budget_exceeded")], statuses
        report = http.get(f"/v1/runs/{run['id']}").json()
    wallet = report["totals"]["wallet"]
    # the run has what these tests are about, so each check below checks something
    assert (wallet["retries"], wallet["fallbacks"], report["refused"]) == (1, 1, 1), report
    assert Decimal(wallet["extra_cost"]) > 0 and report["budget"]["wallet"] == "0.010000", report
    assert report["estimate"]["warnings"] and len(report["slowest"]) == 3, report
    return c, report, receipt_ids[:3]


def _check_every_figure(text: str, report: dict[str, Any], shown: dict[str, str]) -> None:
    """Every figure of `report` is in `text` as the same string; a client's name as `shown` maps it."""
    def name(value: object) -> str:
        return shown.get(value, _cell(value)) if isinstance(value, str) else _cell(value)

    assert all(len(line) <= 100 for line in text.split("\n")), max(text.split("\n"), key=len)
    facts = dict(line.split(None, 1) for line in _section(text, f"Run {name(report['name'])}"))
    for label, field in (("run", "id"), ("status", "status"), ("key", "key_id"), ("created", "created_at"),
                         ("expires", "expires_at"), ("closed", "closed_at")):
        assert facts[label] == _cell(report[field]), label
    assert f"refused before any attempt (budget, balance): {report['refused']}" in _section(text, "Totals")

    totals = _by(_table(text, "Totals"), "bucket")
    for bucket, t in report["totals"].items():
        for field, column in (("unit", "unit"), ("amount", "amount"), ("calls", "calls"), ("attempts", "attempts"),
                              ("failed_attempts", "failed"), ("retries", "retries"), ("fallbacks", "fallbacks"),
                              ("extra_cost", "extra cost"), ("uncollected", "uncollected")):
            assert totals[bucket][column] == str(t[field]), (bucket, field)

    wallet = report["totals"]["wallet"]
    budget = _by(_table(text, "Budget"), "bucket")
    for bucket in ("wallet", "credit"):
        assert budget[bucket]["budget"] == (report["budget"][bucket] or "none")
        assert budget[bucket]["charged"] == report["totals"][bucket]["amount"]
        assert budget[bucket]["reserved now"] == report["reserved"][bucket]
    assert Decimal(budget["wallet"]["left"]) == Decimal(report["budget"]["wallet"]) - Decimal(wallet["amount"])
    assert (budget["credit"]["left"], budget["credit"]["used"]) == (NONE, NONE)

    estimate = _by(_table(text, "Estimate against actual"), "bucket")
    for bucket, e in report["estimate"]["estimate"].items():
        assert [estimate[bucket][k] for k in ("low", "expected", "high")] == [e["low"], e["expected"], e["high"]]
        assert estimate[bucket]["actual"] == report["totals"][bucket]["amount"]
    diff = Decimal(wallet["amount"]) - Decimal(report["estimate"]["estimate"]["wallet"]["expected"])
    assert Decimal(estimate["wallet"]["actual − expected"]) == diff
    assert _table(text, "Plan given at the start") == [
        {"step": name(p["step"]), "model": p["model"], "calls": str(p["calls"]), "input tokens/call": str(p["input_tokens"]),
         "output tokens/call": str(p["output_tokens"])} for p in report["estimate"]["plan"]]
    warnings = " ".join(" ".join(_section(text, "Warnings at the start")).split())
    for w in report["estimate"]["warnings"]:
        assert f"{w['code']}: {' '.join(name(w['message']).split())}" in warnings, w

    assert _table(text, "Slowest calls (ms: all attempts together)") == [
        {"receipt": s["receipt_id"], "step": name(s["step"]), "model": s["model"], "ms": str(s["duration_ms"]),
         "attempts": str(s["attempts"]), "status": s["status"]} for s in report["slowest"]]
    for title, key, first in (("By step", "by_step", "step"), ("By model", "by_model", "model"),
                              ("By route", "by_route", "route")):
        assert _table(text, title) == [{first: name(g[first]), "bucket": g["bucket"], "amount": g["amount"],
                                        "unit": g["unit"], "calls": str(g["calls"])} for g in report[key]], key
    listed = " ".join(_section(text, f"Receipts ({len(report['receipts'])})")).split()
    assert listed == report["receipts"] and len(listed) == 3


def test_run_report_prints_every_figure_of_the_json_report(stack, run_report) -> None:
    c, report, _ = run_report
    as_json = _cli(stack.url, "run", "report", report["id"], "--api-key", c.secret, "--json")
    assert json.loads(as_json) == report and as_json == json.dumps(report, indent=2) + "\n"  # as before
    _check_every_figure(_cli(stack.url, "run", "report", report["id"], "--api-key", c.secret), report, {})


@contextmanager
def _serving(bodies: dict[str, Any]) -> Iterator[str]:
    """A local HTTP server answering GET path → JSON body, as an edge would; its URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            body = json.dumps(bodies[self.path]).encode() if self.path in bodies else b'{"error": {}}'
            self.send_response(200 if self.path in bodies else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_escape_sequences_in_names_reach_the_terminal_as_visible_text(stack, run_report) -> None:
    """The stack refuses control characters in names (see the fixture); a report that has them
    anyway (an older edge, another server, a proxy) is still printed safely: the run's own
    report with its names replaced by escape sequences, served over HTTP to the real CLI."""
    c, report, receipt_ids = run_report
    hostile = {"cli report": f"cli {CLEAR}report", "lookup": f"{CLEAR}\x9b3J\rlookup\u202e",
               "plan step": "plan\x1b]0;owned\x07 step"}
    shown = {f"cli {CLEAR}report": f"cli {CLEAR_SHOWN}report", f"{CLEAR}\x9b3J\rlookup\u202e": f"{CLEAR_SHOWN}\\x9b3J\\x0dlookup\\u202e",
             "plan\x1b]0;owned\x07 step": "plan\\x1b]0;owned\\x07 step"}
    doctored = copy.deepcopy(report)
    doctored["name"] = hostile["cli report"]
    for item in [*doctored["by_step"], *doctored["slowest"], *doctored["estimate"]["plan"]]:
        item["step"] = hostile.get(item["step"], item["step"])
    warning = doctored["estimate"]["warnings"][0]
    warning["message"] = f"{CLEAR}{warning['message']}"
    shown[warning["message"]] = CLEAR_SHOWN + report["estimate"]["warnings"][0]["message"]
    assert {g["step"] for g in doctored["by_step"]} >= {hostile["lookup"]}  # the doctoring took

    with c.client() as http:
        receipt = http.get(f"/v1/receipts/{receipt_ids[1]}").json()  # the fallback: its first attempt failed
    receipt["run"]["step"] = hostile["lookup"]
    receipt["attempts"][0]["error"] = f"upstream said {CLEAR}\x9b0c"
    with _serving({f"/v1/runs/{report['id']}": doctored, f"/v1/receipts/{receipt['id']}": receipt}) as url:
        text = _cli(url, "run", "report", report["id"], "--api-key", c.secret)
        receipt_text = _cli(url, "receipt", receipt["id"], "--api-key", c.secret)
    _check_every_figure(text, doctored, shown)
    assert CLEAR_SHOWN in text and "\x1b" not in text
    assert f"step {shown[hostile['lookup']]}" in receipt_text
    assert f"upstream said {CLEAR_SHOWN}\\x9b0c" in receipt_text
