"""Hostile input on the money-moving admin endpoints, through the whole stack: JSON values of
the wrong type, idempotency keys and ids the database cannot store, and ids that would steer
the CLI to another endpoint. Each is refused as the client's mistake (4xx naming the field,
never a 5xx that invites a retry), and moves nothing."""

from __future__ import annotations

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


def test_non_string_json_values_are_400_naming_the_field(stack) -> None:
    c = make_customer(stack, wallet="1.00")
    adj_url = f"/admin/v1/accounts/{c.account_id}/adjustments"
    top_url = f"/admin/v1/accounts/{c.account_id}/topups"
    good = {"bucket": "wallet", "amount": "0.10", "direction": "credit", "reason": "r"}
    with stack.admin() as admin:
        for url, payload, param in (
            (adj_url, good | {"bucket": {"wallet": 1}}, "bucket"),
            (adj_url, good | {"bucket": ["wallet"]}, "bucket"),
            (adj_url, good | {"direction": ["credit"]}, "direction"),
            (adj_url, good | {"direction": {"credit": True}}, "direction"),
            (top_url, {"bucket": ["wallet"], "amount": "0.10"}, "bucket"),
            ("/admin/v1/keys", {"account_id": c.account_id, "name": "k", "route_policy": ["routed"]}, "route_policy"),
        ):
            # A fresh connection each time: a 500 would make the server drop a kept one.
            resp = admin.post(url, json=payload | {"idempotency_key": idem()}, headers={"connection": "close"})
            assert resp.status_code == 400, (payload, resp.status_code, resp.text)
            assert resp.json()["error"]["param"] == param, (payload, resp.text)
        assert admin.get(f"/admin/v1/accounts/{c.account_id}").json()["buckets"]["wallet"]["balance"] == "1.000000"


def test_idempotency_keys_and_ids_the_database_cannot_store_are_refused(stack) -> None:
    c = make_customer(stack, wallet="1.00")
    _, headers = chat(c, "gpt-4o-mini")
    receipt_id = headers["x-tf-receipt-id"]
    refund_url = f"/admin/v1/receipts/{receipt_id}/refunds"
    adj_url = f"/admin/v1/accounts/{c.account_id}/adjustments"
    top_url = f"/admin/v1/accounts/{c.account_id}/topups"
    adj = {"bucket": "wallet", "amount": "0.10", "direction": "credit", "reason": "r"}
    with stack.admin() as admin:
        for url, body in ((refund_url, {"amount": "0.000000001"}), (adj_url, adj),
                          (top_url, {"bucket": "wallet", "amount": "0.10"})):
            # NUL: PostgreSQL text cannot hold it (it was a 503 "retry" that never succeeds);
            # a lone surrogate cannot be encoded for gRPC (it was a 500).
            for key in ("a\x00b", None):
                if key is None:
                    raw = (b'{"idempotency_key": "\\ud800", '
                           + b", ".join(f'"{k}": "{v}"'.encode() for k, v in body.items()) + b"}")
                    resp = admin.post(url, content=raw, headers={"content-type": "application/json", "connection": "close"})
                else:
                    resp = admin.post(url, json=body | {"idempotency_key": key}, headers={"connection": "close"})
                assert resp.status_code == 400, (url, key, resp.status_code, resp.text)
                assert resp.json()["error"]["param"] == "idempotency_key", resp.text
        # An id with NUL names nothing that can exist: 404, not a 500.
        resp = admin.post("/admin/v1/receipts/rcpt_ab%00cdefgh/refunds",
                          json={"amount": "0.000000001", "idempotency_key": idem()}, headers={"connection": "close"})
        assert (resp.status_code, resp.json()["error"]["param"]) == (404, "receipt_id"), resp.text
        resp = admin.post("/admin/v1/accounts/acct%00x/adjustments", json=adj | {"idempotency_key": idem()},
                          headers={"connection": "close"})
        assert (resp.status_code, resp.json()["error"]["param"]) == (404, "account_id"), resp.text
        assert admin.get(f"/admin/v1/accounts/{c.account_id}").json()["buckets"]["wallet"]["balance"] == str(
            Decimal("1.00") - Decimal(headers["x-tf-amount"]))
        assert admin.get(f"/admin/v1/receipts/{receipt_id}").json()["refunded"] == "0"
        audit = admin.get("/admin/v1/audit").json()
        assert audit["ok"], audit["problems"]


def test_the_cli_never_lets_an_id_steer_it_to_another_endpoint(stack) -> None:
    victim = make_customer(stack, wallet="1.00")
    _, headers = chat(victim, "gpt-4o-mini")
    receipt_id = headers["x-tf-receipt-id"]
    other = make_customer(stack, wallet="1.00")
    with stack.admin() as admin:
        before = admin.get(f"/admin/v1/accounts/{victim.account_id}").json()["buckets"]["wallet"]["balance"]
    # `admin adjust ACCOUNT ...` with a crafted "account id" posted its body to the refunds of
    # another receipt (or the top-ups of another account): ids must stay one path segment.
    for crafted in (f"../receipts/{receipt_id}/refunds?", f"{other.account_id}/../../receipts/{receipt_id}/refunds#"):
        out = tf_admin(stack, "adjust", crafted, "--bucket", "wallet", "--amount", "0.000001", "--direction", "credit",
                       "--reason", "goodwill", "--idempotency-key", idem())
        assert out.returncode != 0, out.stdout
    out = tf_admin(stack, "refund", f"../accounts/{other.account_id}/topups?", "--amount", "0.5",
                   "--idempotency-key", idem())
    assert out.returncode != 0, out.stdout
    for step in ("..", "."):  # a whole id that is a path step is refused before any request
        out = tf_admin(stack, "topup", step, "wallet", "0.5")
        assert out.returncode != 0 and "not an id" in out.stderr, out.stdout + out.stderr
    with stack.admin() as admin:
        assert admin.get(f"/admin/v1/receipts/{receipt_id}").json()["refunded"] == "0"
        assert admin.get(f"/admin/v1/accounts/{victim.account_id}").json()["buckets"]["wallet"]["balance"] == before
        assert admin.get(f"/admin/v1/accounts/{other.account_id}").json()["buckets"]["wallet"]["balance"] == "1.000000"
