"""The terminal run report's edges, without a stack: a report with no estimate and no budget,
amounts it derives, names that would steer a terminal or overflow its width, and its bounds."""

from __future__ import annotations

import unicodedata

from tokenforge.report import MAX_RECEIPT_IDS, report_text
from tokenforge.terminal import WIDTH, printable, table, width


def _report(**fields: object) -> dict:
    zero = {"amount": "0", "uncollected": "0", "calls": 0, "attempts": 0, "failed_attempts": 0, "retries": 0,
            "fallbacks": 0, "extra_cost": "0"}
    base: dict = {"id": "run_x", "key_id": "key_x", "name": "n", "status": "closed",
                  "created_at": "2026-12-03T10:00:00+00:00", "expires_at": "2026-12-04T10:00:00+00:00",
                  "closed_at": "2026-12-03T10:05:00+00:00", "budget": {"wallet": None, "credit": None},
                  "reserved": {"wallet": "0", "credit": "0"}, "refused": 0, "by_step": [], "by_model": [],
                  "by_route": [], "slowest": [], "receipts": [], "estimate": None,
                  "totals": {"wallet": {"unit": "CNY", **zero}, "credit": {"unit": "CREDIT", **zero}}}
    return base | fields


def _lines_under(text: str, title: str) -> list[str]:
    lines = text.split("\n")
    start = lines.index(title) + 1
    return lines[start:next((i for i in range(start, len(lines)) if not lines[i]), len(lines))]


def test_a_report_without_an_estimate_or_a_budget_says_so() -> None:
    totals = _report()["totals"]
    totals["wallet"] |= {"amount": "0.002880", "uncollected": "0.000001", "calls": 1, "attempts": 2, "failed_attempts": 1,
                         "fallbacks": 1, "extra_cost": "-0.000040"}
    text = report_text(_report(totals=totals, receipts=["rcpt_a"]))
    assert _lines_under(text, "Estimate against actual") == ["No estimate was made when this run started."]
    assert "Plan given at the start" not in text and "Warnings at the start" not in text
    budget = _lines_under(text, "Budget")
    assert budget[0] == "No budget was set: this run's requests were held against the key's balances."
    # no budget: nothing is left or used of one; what is charged and reserved is still shown
    assert budget[3].split() == ["wallet", "CNY", "none", "0.002880", "–", "–", "0"]
    assert budget[4].split() == ["credit", "CREDIT", "none", "0", "–", "–", "0"]
    wallet_row = _lines_under(text, "Totals")[2].split()
    assert wallet_row == ["wallet", "CNY", "0.002880", "1", "2", "1", "0", "1", "-0.000040", "0.000001"]
    assert "closed   2026-12-03T10:05:00+00:00" in text.split("\n")
    assert _lines_under(text, "Receipts (1)") == ["rcpt_a"]


def test_left_of_a_budget_and_the_difference_from_the_estimate_are_exact() -> None:
    totals = _report()["totals"]
    totals["credit"] |= {"amount": "2.000000001", "calls": 1}
    text = report_text(_report(budget={"wallet": None, "credit": "2.000000003"}, totals=totals,
                               estimate={"wallet": {"low": "0", "expected": "0", "high": "0"},
                                         "credit": {"low": "1.5", "expected": "2.5", "high": "3"}}))
    credit = next(line for line in _lines_under(text, "Budget") if line.startswith("credit")).split()
    assert credit[3:6] == ["2.000000001", "0.000000002", "100.0"]  # what a float would lose
    est = next(line for line in _lines_under(text, "Estimate against actual") if line.startswith("credit")).split()
    assert est[2:] == ["1.5", "2.5", "3", "2.000000001", "-0.499999999", "within"]  # a bare estimate is read too


def test_names_cannot_steer_the_terminal() -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07\x9b3J\r\u202e"
    text = report_text(_report(name=f"run {hostile}", by_step=[{"step": hostile, "bucket": "wallet", "amount": "0",
                                                                "unit": "CNY", "calls": 1}]))
    assert not [ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf")]
    shown = "\\x1b[2J\\x1b]0;owned\\x07\\x9b3J\\x0d\\u202e"
    assert text.startswith(f"Run run {shown}\n") and _lines_under(text, "By step")[2].startswith(shown)
    assert printable("研究 ok") == "研究 ok" and width("研究") == 4  # wide, printable: kept, counted as 4 columns


def test_tables_fit_the_terminal_or_become_blocks() -> None:
    wide = table(["step", "amount"], [["研究", "1.5"], ["x", "0.25"]], frozenset({1}))
    assert wide.split("\n") == ["step  amount", "----  ------", "研究     1.5", "x       0.25"]
    long_step = "s" * (WIDTH + 1)
    text = report_text(_report(by_step=[{"step": long_step, "bucket": "wallet", "amount": "0.1", "unit": "CNY", "calls": 2}]))
    assert _lines_under(text, "By step") == [f"step    {long_step}", "bucket  wallet", "amount  0.1", "unit    CNY",
                                             "calls   2"]
    assert all(width(line) <= WIDTH for line in text.split("\n") if long_step not in line)


def test_receipts_are_listed_up_to_the_bound() -> None:
    ids = [f"rcpt_{i}" for i in range(MAX_RECEIPT_IDS + 3)]
    text = report_text(_report(receipts=ids))
    listed = _lines_under(text, f"Receipts ({len(ids)})")
    assert " ".join(listed[:-1]).split() == ids[:MAX_RECEIPT_IDS]
    assert listed[-1] == "3 more receipts are in the JSON report (tokenforge run report run_x --json)"
    assert all(len(line) <= WIDTH for line in listed)
