"""Regressions for what an adversarial pass found: holds that cover fallbacks, callers that
leave before the answer, and input that must be refused with a 400 that moves nothing."""

from __future__ import annotations

import json
import socket
import time
from decimal import Decimal

import grpc
import httpx
import openai
import pytest

from tests.conftest import Customer, make_customer
from tests.e2e.helpers import M, chat, receipt


def test_the_hold_covers_a_fallback_to_a_pricier_backup(stack) -> None:
    c = make_customer(stack, wallet="10.00")
    _, headers = chat(c, "m-timeout", max_tokens=32)
    r = receipt(c, headers["x-tf-receipt-id"])
    prompt = r["usage"]["input_tokens"]
    backup_worst = (prompt * Decimal("1.60") + 32 * Decimal("6.40")) / M
    assert Decimal(r["held"]) >= backup_worst
    assert Decimal(r["uncollected"]) == 0

    # A wallet that covers the primary's worst case but not the backup's is refused up front
    # instead of ending with an uncollected fallback.
    tight = make_customer(stack, wallet=str((prompt * Decimal("1.00") + 32 * Decimal("2.00")) / M + Decimal("0.00001")))
    before = tight.balance()
    with pytest.raises(openai.APIStatusError) as info:
        chat(tight, "m-timeout", max_tokens=32)
    assert info.value.status_code == 402
    assert tight.balance() == before


def _only_receipt(c: Customer, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    with c.client() as http:
        while True:
            data = http.get("/v1/receipts").json()["data"]
            if data:
                assert len(data) == 1
                return data[0]
            assert time.monotonic() < deadline, "no receipt"
            time.sleep(0.05)


def test_a_client_that_leaves_a_non_streaming_request_starts_no_retry_and_pays_nothing(stack) -> None:
    c = make_customer(stack)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=stack.url, timeout=0.4) as http:
        # m-429: the first try gets 429 with Retry-After 1 s; we leave during that wait.
        http.post("/v1/chat/completions", headers={"authorization": f"Bearer {c.secret}"},
                  json={"model": "m-429", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    r = _only_receipt(c)
    assert r["status"] == "cancelled"
    assert [a["outcome"] for a in r["attempts"]] == ["rate_limited"]
    assert Decimal(r["amount"]) == 0
    assert c.wallet() == Decimal("10.00")
    assert Decimal(c.balance()["buckets"]["wallet"]["held"]) == 0


def test_a_client_that_leaves_before_the_first_chunk_pays_nothing(stack) -> None:
    c = make_customer(stack)
    body = {"model": "m-timeout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=stack.url, timeout=0.2) as http:
        http.post("/v1/chat/completions", headers={"authorization": f"Bearer {c.secret}"}, json=body)
    r = _only_receipt(c)
    assert r["status"] == "cancelled"
    assert [a["channel"] for a in r["attempts"]] == ["slow-a"]  # no fallback started after it left
    assert c.wallet() == Decimal("10.00")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),  # over the model's output cap
        ({"temperature": float("nan")}, None),
    ],
    ids=["huge-max-tokens", "over-model-cap", "nan"],
)
def test_out_of_range_input_is_400(customer: Customer, body: dict, param: str | None) -> None:
    full = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], **body}
    with customer.client() as c:
        resp = c.post("/v1/chat/completions", content=json.dumps(full, allow_nan=True),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert customer.wallet() == Decimal("10.00")


def test_deeply_nested_json_is_400_not_500(customer: Customer) -> None:
    deep = '{"model": "gpt-4o-mini", "stream": true, "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with customer.client() as c:
        resp = c.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "invalid_request"
        admin = c.post("/v1/runs", content='{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
        assert admin.status_code == 400


def test_run_step_with_control_characters_is_refused_over_grpc(stack, customer: Customer) -> None:
    from tokenforge.v1 import router_pb2, router_pb2_grpc

    addr = next(line.split(": ", 1)[1] for line in stack.lines if line.startswith("router gRPC: "))
    with customer.client() as http:
        run = http.post("/v1/runs", json={"name": "r"}).json()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with grpc.insecure_channel(addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for step in ("bad\x00step", "x" * 5000):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamChatCompletion(router_pb2.ChatCompletionRequest(body_json=body, run_id=run["id"], run_step=step),
                                               metadata=(("authorization", f"Bearer {customer.secret}"),), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert customer.wallet() == Decimal("10.00")


@pytest.mark.parametrize("amount", ["1_000", "1e2", "+1", " 1", "٣", 1, 1.5])
def test_topup_amounts_must_be_plain_decimal_strings(stack, amount) -> None:
    with stack.admin() as admin:
        acct = admin.post("/admin/v1/accounts", json={"name": "strict"}).json()
        resp = admin.post(f"/admin/v1/accounts/{acct['id']}/topups",
                          json={"bucket": "wallet", "amount": amount, "idempotency_key": "k"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "amount"
        assert admin.get(f"/admin/v1/accounts/{acct['id']}").json()["buckets"]["wallet"]["balance"] == "0"


def test_names_with_control_characters_are_refused(stack) -> None:
    with stack.admin() as admin:
        resp = admin.post("/admin/v1/accounts", json={"name": "evil\x00name"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "name"


def test_clients_leaving_at_any_moment_leave_no_hold_behind(stack) -> None:
    """Disconnects while the router prices, holds, attempts or settles: every hold taken is
    released or captured, and the money adds up."""
    import concurrent.futures
    import random

    c = make_customer(stack)
    body = {"model": "m-timeout", "messages": [{"role": "user", "content": "leave"}], "max_tokens": 8}

    def leave(i: int) -> None:
        rnd = random.Random(i)
        timeout = rnd.uniform(0.001, 0.08)
        try:
            with httpx.Client(base_url=stack.url, timeout=timeout) as http:
                http.post("/v1/chat/completions", headers={"authorization": f"Bearer {c.secret}"},
                          json=body | {"stream": rnd.random() < 0.5})
        except httpx.HTTPError:
            pass

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(leave, range(96)))
    deadline = time.monotonic() + 15
    while Decimal(c.balance()["buckets"]["wallet"]["held"]) != 0:
        assert time.monotonic() < deadline, f"holds left behind: {c.balance()['buckets']['wallet']}"
        time.sleep(0.1)
    spent = Decimal("10.00") - c.wallet()
    with c.client() as http:
        total, after = Decimal(0), ""
        while True:
            page = http.get("/v1/receipts", params={"limit": 100, **({"after": after} if after else {})}).json()
            total += sum(Decimal(r["amount"]) for r in page["data"])
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert total == spent
    with stack.admin() as admin:
        assert admin.get("/admin/v1/audit").json()["ok"] is True


def test_revoking_a_key_releases_its_open_runs(stack) -> None:
    c = make_customer(stack, wallet="1.00")
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "orphan", "budget": {"wallet": "0.90"}}).json()
    assert Decimal(c.balance()["buckets"]["wallet"]["held"]) == Decimal("0.90")
    with stack.admin() as admin:
        assert admin.post(f"/admin/v1/keys/{c.key_id}/revoke").status_code == 200
        account = admin.get(f"/admin/v1/accounts/{c.account_id}").json()
    assert Decimal(account["buckets"]["wallet"]["held"]) == 0
    assert Decimal(account["buckets"]["wallet"]["available"]) == Decimal("1.00")
    assert run["id"].startswith("run_")


def test_ids_with_control_characters_in_the_path_are_404_not_500(stack, customer: Customer) -> None:
    key = {"authorization": f"Bearer {customer.secret}"}
    cases = [
        ("GET", "/v1/receipts/rcpt_ab%00cd", key, "receipt_id"),
        ("GET", "/v1/runs/run_%01x", key, "run_id"),
        ("POST", "/v1/runs/run_%00x/close", key, "run_id"),
        ("GET", "/admin/v1/receipts/rcpt_%00x", None, "receipt_id"),
        ("GET", "/admin/v1/accounts/acct%00x", None, "account_id"),
        ("GET", "/admin/v1/accounts/acct%00x/statement", None, "account_id"),
        ("GET", "/admin/v1/accounts/acct%1bx/receipts", None, "account_id"),
        ("POST", "/admin/v1/keys/key%00x/revoke", None, "key_id"),
    ]
    with stack.admin() as admin, httpx.Client(base_url=stack.url, timeout=30) as client:
        for method, path, headers, param in cases:
            send = admin if headers is None else client
            resp = send.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert resp.status_code == 404, (path, resp.status_code, resp.text)
            assert resp.json()["error"] == {**resp.json()["error"], "code": "not_found", "param": param}, resp.text
        assert admin.get("/admin/v1/audit").json()["ok"]


def test_a_request_that_is_not_valid_http_gets_an_openai_shaped_400(stack) -> None:
    """uvicorn's parser refuses a control character in a header before the app sees it; the
    edge answers that with the same JSON error shape as every other error."""
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\x01\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        data = b""
        while chunk := conn.recv(65536):  # the edge closes the connection after the answer
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "invalid_request"
