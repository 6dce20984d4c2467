"""The run report page: every figure of the JSON report on it, read back with the standard
library's HTML parser; and rendered by a real headless browser (Debian's chromium), when one is
installed: every attempt is a bar, failed ones marked."""

from __future__ import annotations

import re
import shutil
import subprocess
from decimal import Decimal

import pytest

from tests.conftest import make_customer
from tests.htmlpage import Page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it where apt works)")
def test_report_page_renders_a_bar_per_attempt(stack, tmp_path) -> None:
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "page"}).json()
        for model, step in (("gpt-4o-mini", "intro"), ("m-timeout", "lookup"), ("m-500", "retry")):
            resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step},
                             json={"model": model, "messages": [{"role": "user", "content": step}], "max_tokens": 8})
            assert resp.status_code == 200, resp.text
        html = http.get(f"/v1/runs/{run['id']}/report.html").text
    page = tmp_path / "report.html"
    page.write_text(html)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    bars = re.findall(r"class=\"bar (\w+)\"", dom)
    assert len(bars) == 5  # 1 + 2 (timeout, backup) + 2 (500, retry)
    assert bars.count("failed") == 2
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1300,900", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=60)
    assert shot.stat().st_size > 10_000


def _cell(value: object) -> str:
    """How the page prints a JSON value: as it is, or a dash for null."""
    return "–" if value is None else str(value)


HOSTILE_STEP = "<script>alert(1)</script>"
HOSTILE_NAME = "debug <b>&'\""


def test_report_page_shows_every_figure_of_the_json_report(stack) -> None:
    """A run with a budget, a plan (so an estimate), a retry, a fallback that cost extra, a
    refusal and a hostile step name: every figure of `GET /v1/runs/{id}` is on the page, as
    the same string, and nothing from a client is taken as markup."""
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={
            "name": HOSTILE_NAME, "budget": {"wallet": "0.010000"},
            "plan": [{"model": "gpt-4o-mini", "calls": 3, "input_tokens": 20, "output_tokens": 8, "step": "<i>plan</i>"}],
        }).json()
        calls = (("gpt-4o-mini", HOSTILE_STEP, 8), ("m-timeout", "lookup", 8), ("m-500", "retry", 8),
                 ("gpt-4o-mini", "too big", 4096))  # the last one's hold is more than the budget left
        statuses = []
        for model, step, max_tokens in calls:
            resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
            statuses.append((resp.status_code, resp.json().get("error", {}).get("code")))
        assert statuses == [(200, None)] * 3 + [(402, "run_budget_exceeded")], statuses
        report = http.get(f"/v1/runs/{run['id']}").json()
        text = http.get(f"/v1/runs/{run['id']}/report.html").text
    wallet = report["totals"]["wallet"]
    # the run has what this test is about, so each check below checks something
    assert (wallet["retries"], wallet["fallbacks"], report["refused"]) == (1, 1, 1), report
    assert Decimal(wallet["extra_cost"]) > 0 and report["budget"]["wallet"] == "0.010000", report
    assert report["estimate"]["warnings"] and len(report["slowest"]) == 3, report

    page = Page(text)
    facts = dict(page.tables["run"])
    for label, field in (("run", "id"), ("name", "name"), ("status", "status"), ("key", "key_id"), ("created", "created_at"),
                         ("expires", "expires_at"), ("closed", "closed_at"), ("refused before any attempt", "refused")):
        assert facts[label] == _cell(report[field]), label
    assert facts["name"] == HOSTILE_NAME

    budget = page.by("budget", "bucket")
    for bucket in ("wallet", "credit"):
        assert budget[bucket]["budget"] == (report["budget"][bucket] or "none")
        assert budget[bucket]["charged"] == report["totals"][bucket]["amount"]
        assert budget[bucket]["reserved now"] == report["reserved"][bucket]
    left = Decimal(report["budget"]["wallet"]) - Decimal(wallet["amount"])
    assert Decimal(budget["wallet"]["left"]) == left and budget["credit"]["left"] == "–"

    totals = page.by("totals", "bucket")
    for bucket, t in report["totals"].items():
        for field, column in (("unit", "unit"), ("amount", "amount"), ("uncollected", "uncollected"), ("calls", "calls"),
                              ("attempts", "attempts"), ("failed_attempts", "failed attempts"), ("retries", "retries"),
                              ("fallbacks", "fallbacks"), ("extra_cost", "fallback extra cost")):
            assert totals[bucket][column] == str(t[field]), (bucket, field)

    estimate = page.by("estimate", "bucket")
    for bucket, e in report["estimate"]["estimate"].items():
        assert [estimate[bucket][k] for k in ("low", "expected", "high")] == [e["low"], e["expected"], e["high"]]
        assert estimate[bucket]["actual"] == report["totals"][bucket]["amount"]
    diff = Decimal(wallet["amount"]) - Decimal(report["estimate"]["estimate"]["wallet"]["expected"])
    assert Decimal(estimate["wallet"]["actual − expected"]) == diff
    assert page.rows("plan") == [{"step": _cell(p["step"]), "model": p["model"], "calls": str(p["calls"]),
                                  "input tokens per call": str(p["input_tokens"]),
                                  "output tokens per call": str(p["output_tokens"])} for p in report["estimate"]["plan"]]
    assert page.rows("warnings") == [{"code": w["code"], "message": w["message"]} for w in report["estimate"]["warnings"]]

    assert page.rows("slowest") == [{"receipt": s["receipt_id"], "step": _cell(s["step"]), "model": s["model"],
                                     "ms (all attempts)": str(s["duration_ms"]), "attempts": str(s["attempts"]),
                                     "status": s["status"]} for s in report["slowest"]]
    for key, first in (("by_step", "step"), ("by_model", "model"), ("by_route", "route")):
        assert page.rows(key.replace("_", "-")) == [
            {first: g[first], "bucket": g["bucket"], "amount": g["amount"], "unit": g["unit"], "calls": str(g["calls"])}
            for g in report[key]], key
    receipts = page.by("receipts", "receipt")
    assert list(receipts) == report["receipts"]
    assert sorted(r["fallback extra cost"] for r in receipts.values()) == sorted(["–", "–", wallet["extra_cost"]])

    # the hostile step is text in the tables, never a tag; the page fetches nothing
    assert HOSTILE_STEP in page.by("by-step", "step") and "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    assert not page.tags & {"script", "link", "img", "iframe", "object", "embed", "base"}, page.tags
    assert not page.attrs & {"src", "href", "srcset", "action"} and "url(" not in text and "@import" not in text
    # the page's earlier parts still work: 5 attempt bars (2 failed), the receipts listed
    assert sorted(page.bars) == ["failed", "failed", "ok", "ok", "ok"]
    assert all(rid in text for rid in report["receipts"])


def test_report_page_of_a_closed_run_without_budget_or_plan(stack) -> None:
    """The quiet case reads as such: no budget, no estimate, the run closed, nothing refused."""
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "quiet"}).json()
        resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"]},
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert resp.status_code == 200, resp.text
        assert http.post(f"/v1/runs/{run['id']}/close").status_code == 200
        report = http.get(f"/v1/runs/{run['id']}").json()
        text = http.get(f"/v1/runs/{run['id']}/report.html").text
    assert report["closed_at"] and report["budget"] == {"wallet": None, "credit": None}, report
    page = Page(text)
    facts = dict(page.tables["run"])
    assert (facts["status"], facts["closed"], facts["refused before any attempt"]) == ("closed", report["closed_at"], "0")
    assert [row["budget"] for row in page.rows("budget")] == ["none", "none"]
    assert "No budget was set" in text
    estimate = page.by("estimate", "bucket")
    assert estimate["wallet"]["expected"] == report["estimate"]["estimate"]["wallet"]["expected"]
    assert estimate["wallet"]["actual"] == report["totals"]["wallet"]["amount"] != "0"
    assert page.by("by-step", "step")["(no step)"]["amount"] == report["totals"]["wallet"]["amount"]
