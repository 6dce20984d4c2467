"""Refunds and adjustments through the whole stack: the admin REST API and the CLI, with the
statement's running balance and the audit after them. Bad input moves no money."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from decimal import Decimal

from tests.conftest import make_customer
from tests.e2e.helpers import chat


def idem() -> str:
    return uuid.uuid4().hex


def tf_admin(stack, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "tokenforge.cli", "admin", "--url", stack.url, "--admin-token", stack.admin_token, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_refund_and_adjust_through_the_admin_api(stack) -> None:
    c = make_customer(stack, wallet="1.00")
    _, headers = chat(c, "gpt-4o-mini")
    receipt_id, amount = headers["x-tf-receipt-id"], Decimal(headers["x-tf-amount"])
    assert amount > 0
    part = (amount / 2).quantize(Decimal("0.000000001"))
    with stack.admin() as admin:
        url = f"/admin/v1/receipts/{receipt_id}/refunds"
        key = idem()
        first = admin.post(url, json={"amount": str(part), "idempotency_key": key, "reason": "slow answer"})
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["object"] == "refund" and body["id"].startswith("rfnd_") and not body["replayed"]
        assert (body["receipt_id"], body["account_id"], body["bucket"], body["unit"]) == (receipt_id, c.account_id, "wallet", "CNY")
        assert Decimal(body["amount"]) == part and body["reason"] == "slow answer"
        assert Decimal(body["receipt"]["refunded"]) == part and Decimal(body["receipt"]["refundable"]) == amount - part
        assert Decimal(body["balance"]["balance"]) == Decimal("1.00") - amount + part

        replay = admin.post(url, json={"amount": str(part), "idempotency_key": key, "reason": "slow answer"})
        assert replay.status_code == 200 and replay.json()["replayed"] and replay.json()["id"] == body["id"]
        conflict = admin.post(url, json={"amount": "0.000000001", "idempotency_key": key, "reason": "slow answer"})
        assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "conflict")

        # Bad input is refused with the field named, and moves nothing.
        for payload, status, code, param in (
            ({"amount": str(amount), "idempotency_key": idem()}, 400, "invalid_request", "amount"),  # more than is left
            ({"amount": 0.01, "idempotency_key": idem()}, 400, "invalid_request", "amount"),  # a JSON number
            ({"amount": "-0.01", "idempotency_key": idem()}, 400, "invalid_request", "amount"),
            ({"amount": "0", "idempotency_key": idem()}, 400, "invalid_request", "amount"),
            ({"amount": "0.01"}, 400, "invalid_request", "idempotency_key"),
            ({"amount": "0.01", "idempotency_key": idem(), "reason": 5}, 400, "invalid_request", "reason"),
        ):
            resp = admin.post(url, json=payload)
            err = resp.json()["error"]
            assert (resp.status_code, err["code"], err["param"]) == (status, code, param), (payload, resp.text)
        missing = admin.post("/admin/v1/receipts/rcpt_nosuchreceipt1/refunds", json={"amount": "0.01", "idempotency_key": idem()})
        assert (missing.status_code, missing.json()["error"]["param"]) == (404, "receipt_id")
        assert admin.post(url, json={"amount": "0.01", "idempotency_key": idem()},
                          headers={"authorization": "Bearer wrong"}).status_code == 401

        adj_url = f"/admin/v1/accounts/{c.account_id}/adjustments"
        credit = admin.post(adj_url, json={"bucket": "credit", "amount": "2.50", "direction": "credit",
                                           "reason": "goodwill", "idempotency_key": idem()})
        assert credit.status_code == 201, credit.text
        cb = credit.json()
        assert (cb["object"], cb["direction"], cb["amount"], cb["unit"], cb["reason"]) == (
            "adjustment", "credit", "2.500000", "CREDIT", "goodwill")
        assert cb["balance"] == {"unit": "CREDIT", "balance": "2.500000", "held": "0", "available": "2.500000"}
        too_much = admin.post(adj_url, json={"bucket": "credit", "amount": "2.500000001", "direction": "debit",
                                             "reason": "mistaken top-up", "idempotency_key": idem()})
        assert (too_much.status_code, too_much.json()["error"]["code"]) == (402, "insufficient_balance")
        for payload, param in (
            ({"bucket": "credit", "amount": "1", "direction": "up", "reason": "r", "idempotency_key": idem()}, "direction"),
            ({"bucket": "credit", "amount": "1", "direction": "debit", "idempotency_key": idem()}, "reason"),
            ({"bucket": "credit", "amount": "1", "direction": "debit", "reason": " ", "idempotency_key": idem()}, "reason"),
            ({"bucket": "purse", "amount": "1", "direction": "debit", "reason": "r", "idempotency_key": idem()}, "bucket"),
            ({"bucket": "credit", "amount": "-1", "direction": "debit", "reason": "r", "idempotency_key": idem()}, "amount"),
        ):
            resp = admin.post(adj_url, json=payload)
            assert (resp.status_code, resp.json()["error"]["param"]) == (400, param), (payload, resp.text)
        debit = admin.post(adj_url, json={"bucket": "credit", "amount": "1.25", "direction": "debit",
                                          "reason": "mistaken top-up", "idempotency_key": idem()})
        assert debit.status_code == 201 and debit.json()["balance"]["balance"] == "1.250000"

        stmt = admin.get(f"/admin/v1/accounts/{c.account_id}/statement").json()["data"]
        assert [(e["kind"], e["bucket"]) for e in stmt] == [
            ("topup", "wallet"), ("capture", "wallet"), ("refund", "wallet"), ("adjustment", "credit"),
            ("adjustment", "credit")]
        assert Decimal(stmt[2]["amount"]) == part and stmt[2]["receipt_id"] == receipt_id
        assert Decimal(stmt[2]["balance"]) == Decimal("1.00") - amount + part
        assert [(e["amount"], e["balance"]) for e in stmt[3:]] == [("2.500000", "2.500000"), ("-1.250000", "1.250000")]
        shown = admin.get(f"/admin/v1/receipts/{receipt_id}").json()
        assert Decimal(shown["refunded"]) == part and Decimal(shown["amount"]) == amount
        audit = admin.get("/admin/v1/audit").json()
        assert audit["ok"], audit["problems"]
    assert c.balance()["key"]["spent"]["wallet"] == headers["x-tf-amount"]  # gross spend, as documented


def test_refund_and_adjust_through_the_cli(stack) -> None:
    c = make_customer(stack, wallet="1.00")
    _, headers = chat(c, "gpt-4o-mini")
    receipt_id = headers["x-tf-receipt-id"]
    out = tf_admin(stack, "refund", receipt_id, "--amount", "0.000001", "--idempotency-key", "cli-r1", "--reason", "test")
    assert out.returncode == 0, out.stderr
    assert "0.000001 CNY back to" in out.stdout and "refundable" in out.stdout
    again = tf_admin(stack, "--json", "refund", receipt_id, "--amount", "0.000001", "--idempotency-key", "cli-r1",
                     "--reason", "test")
    assert again.returncode == 0 and json.loads(again.stdout)["replayed"] is True
    over = tf_admin(stack, "refund", receipt_id, "--amount", "5", "--idempotency-key", "cli-r2")
    assert over.returncode != 0 and "invalid_request" in over.stderr

    out = tf_admin(stack, "adjust", c.account_id, "--bucket", "wallet", "--amount", "1.00", "--direction", "credit",
                   "--reason", "goodwill", "--idempotency-key", "cli-a1")
    assert out.returncode == 0, out.stderr
    assert "credit +1.000000 CNY" in out.stdout and "goodwill" in out.stdout
    refused = tf_admin(stack, "adjust", c.account_id, "--bucket", "wallet", "--amount", "100", "--direction", "debit",
                       "--reason", "oops", "--idempotency-key", "cli-a2")
    assert refused.returncode != 0 and "insufficient_balance" in refused.stderr
    missing = tf_admin(stack, "adjust", c.account_id, "--bucket", "wallet", "--amount", "1", "--direction", "debit",
                       "--idempotency-key", "cli-a3")
    assert missing.returncode != 0 and "--reason" in missing.stderr
    statement = tf_admin(stack, "statement", c.account_id)
    assert statement.returncode == 0 and "refund" in statement.stdout and "adjustment" in statement.stdout
    shown = subprocess.run([sys.executable, "-m", "tokenforge.cli", "receipt", receipt_id, "--url", stack.url,
                            "--admin-token", stack.admin_token], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "refunded 0.000001 CNY" in shown.stdout  # the table shows the refund, not only --json
    assert tf_admin(stack, "audit").returncode == 0
