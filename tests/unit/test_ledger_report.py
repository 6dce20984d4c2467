"""The run report is a pure function of the run's receipts."""

from __future__ import annotations

import json

from tokenforge.ledger.report import RunInfo, build_report
from tokenforge.money import Bucket, format_nano, parse_amount_nano

W, C = Bucket.WALLET, Bucket.CREDIT


def run_info(**kw) -> RunInfo:  # type: ignore[no-untyped-def]
    base = dict(id="run_1", key_id="key_1", name="r", status="open", budget_nano={W: 5 * 10**9, C: 0},
                reserved_nano={W: 0, C: 0}, spent_nano={W: 0, C: 0}, refused=2,
                created_at="t", expires_at="t", closed_at=None, estimate={"wallet": {"high": "1.00"}})
    base.update(kw)
    return RunInfo(**base)


def receipt(rid: str, amount: str, bucket: str | None, step: str, attempts: list[dict], **kw) -> str:  # type: ignore[no-untyped-def]
    return json.dumps({"id": rid, "amount": amount, "bucket": bucket, "unit": "CNY" if bucket != "credit" else "CREDIT",
                       "uncollected": "0", "run": {"id": "run_1", "step": step}, "requested_model": "m",
                       "final_attempt": attempts[-1]["n"] if attempts else None, "attempts": attempts, **kw})


def test_totals_equal_the_receipts_exactly() -> None:
    amounts = ["0.000000001", "0.333333333", "1.2", "0.000125"]
    bodies = [receipt(f"rcpt_{i}", a, "wallet", "s", [{"n": 1, "channel": "a", "outcome": "success", "duration_ms": i}])
              for i, a in enumerate(amounts)]
    report = build_report(run_info(), bodies)
    assert report["totals"]["wallet"]["amount"] == format_nano(sum(parse_amount_nano(a) for a in amounts))
    assert report["totals"]["wallet"]["calls"] == 4 and report["refused"] == 2
    assert report["receipts"] == [f"rcpt_{i}" for i in range(4)]
    assert report["slowest"][0]["receipt_id"] == "rcpt_3"
    assert report["budget"] == {"wallet": "5.000000", "credit": None}
    assert report["estimate"] == {"wallet": {"high": "1.00"}}


def test_attempts_retries_fallbacks_and_failed_calls() -> None:
    attempts = [
        {"n": 1, "channel": "a", "outcome": "timeout", "route": "routed"},
        {"n": 2, "channel": "a", "outcome": "http_error", "route": "routed"},
        {"n": 3, "channel": "d", "outcome": "success", "route": "direct"},
    ]
    bodies = [
        receipt("rcpt_1", "0.01", "credit", "x", attempts,
                fallback={"used": True, "extra_cost": None}),
        receipt("rcpt_2", "0.02", "wallet", "y", attempts[:1] + [{"n": 2, "channel": "b", "outcome": "success"}],
                fallback={"used": True, "extra_cost": "-0.001"}),
        receipt("rcpt_3", "0", None, "y", attempts[:2], status="failed"),
    ]
    report = build_report(run_info(), bodies)
    credit, wallet = report["totals"]["credit"], report["totals"]["wallet"]
    assert (credit["calls"], credit["attempts"], credit["failed_attempts"], credit["retries"], credit["fallbacks"]) == (1, 3, 2, 1, 1)
    assert credit["extra_cost"] == "0"
    assert (wallet["calls"], wallet["attempts"], wallet["failed_attempts"], wallet["fallbacks"]) == (2, 4, 3, 1)
    assert wallet["extra_cost"] == "-0.001000" and wallet["amount"] == "0.020000"
    assert {r["route"] for r in report["by_route"]} == {"direct", "routed"}
