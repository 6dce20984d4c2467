"""The report page's edges, without a stack: reports that lack parts, amounts the page derives,
and its bounds."""

from __future__ import annotations

from tests.htmlpage import Page
from tokenforge.report_page import MAX_RECEIPT_ROWS, report_html


def _report(**fields: object) -> dict:
    zero = {"amount": "0", "uncollected": "0", "calls": 0, "attempts": 0, "failed_attempts": 0, "retries": 0,
            "fallbacks": 0, "extra_cost": "0"}
    base: dict = {"id": "run_x", "name": "n", "status": "open", "budget": {"wallet": None, "credit": None},
                  "reserved": {"wallet": "0", "credit": "0"}, "refused": 0, "receipts": [],
                  "totals": {"wallet": {"unit": "CNY", **zero}, "credit": {"unit": "CREDIT", **zero}}}
    return base | fields


def test_a_report_without_an_estimate_says_so() -> None:
    text = report_html(_report(estimate=None))
    assert "No estimate was made" in text and "estimate" not in Page(text).tables


def test_a_used_up_budget_and_a_cheaper_fallback() -> None:
    totals = _report()["totals"]
    totals["credit"] |= {"amount": "2.000000001", "fallbacks": 1, "extra_cost": "-0.000040"}
    page = Page(report_html(_report(budget={"wallet": None, "credit": "2.000000001"}, totals=totals,
                                     estimate={"wallet": {"low": "0", "expected": "0", "high": "0"},
                                               "credit": {"low": "1.5", "expected": "2.5", "high": "3"}})))
    credit = page.by("budget", "bucket")["credit"]
    assert (credit["left"], credit["used"]) == ("0", "100.0 %")
    assert page.by("totals", "bucket")["credit"]["fallback extra cost"] == "-0.000040"
    est = page.by("estimate", "bucket")["credit"]  # a bare per-bucket estimate is read too
    assert (est["actual − expected"], est["range"]) == ("-0.499999999", "within")


def test_receipts_are_listed_up_to_the_bound() -> None:
    ids = [f"rcpt_{i}" for i in range(MAX_RECEIPT_ROWS + 3)]
    text = report_html(_report(receipts=ids))
    assert len(Page(text).rows("receipts")) == MAX_RECEIPT_ROWS
    assert "3 more receipts are listed in the JSON report" in text
