"""Issue 2: a real OpenAI client request routed, held, charged and receipted in PostgreSQL."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import Customer, make_customer

PRICE_IN = Decimal("1.20")
PRICE_OUT = Decimal("4.80")
PRICE_CACHED = Decimal("0.60")
M = Decimal(1_000_000)
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")

RECEIPT_FIELDS = {
    "id", "created_at", "trace_id", "key", "account_id", "run", "route_policy", "requested_model",
    "status", "final_attempt", "attempts", "usage", "price", "amount", "unit", "bucket", "held",
    "released", "uncollected", "fallback",
}
ATTEMPT_FIELDS = {
    "n", "span_id", "channel", "role", "route", "upstream_model", "response_model", "started_at",
    "duration_ms", "outcome", "http_status", "error", "upstream_may_bill", "usage", "charged",
}


def test_chat_completion_is_held_charged_and_receipted(customer: Customer) -> None:
    before = customer.balance()
    assert Decimal(before["buckets"]["wallet"]["balance"]) == Decimal("10.00")

    raw = customer.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Give me three facts about the moon."}],
        max_tokens=64,
    )
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0

    expected = (usage.prompt_tokens * PRICE_IN + usage.completion_tokens * PRICE_OUT) / M
    after = customer.balance()
    wallet = after["buckets"]["wallet"]
    assert Decimal(wallet["balance"]) == Decimal("10.00") - expected
    assert Decimal(wallet["held"]) == 0
    assert Decimal(wallet["available"]) == Decimal(wallet["balance"])
    assert Decimal(after["key"]["spent"]["wallet"]) == expected
    assert Decimal(after["buckets"]["credit"]["balance"]) == 0

    receipt_id = raw.headers["x-tf-receipt-id"]
    assert Decimal(raw.headers["x-tf-amount"]) == expected
    assert raw.headers["x-tf-unit"] == "CNY"
    assert raw.headers["x-tf-attempts"] == "1"

    with customer.client() as c:
        resp = c.get(f"/v1/receipts/{receipt_id}")
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert RECEIPT_FIELDS <= set(r), RECEIPT_FIELDS - set(r)
    assert r["id"] == receipt_id
    assert HEX32.match(r["trace_id"])
    assert r["key"] == {"id": customer.key_id, "name": "test-bot"}
    assert r["account_id"] == customer.account_id
    assert r["run"] is None
    assert r["route_policy"] == "routed"
    assert r["requested_model"] == "gpt-4o-mini"
    assert r["status"] == "settled"
    assert r["final_attempt"] == 1
    assert len(r["attempts"]) == 1
    a = r["attempts"][0]
    assert ATTEMPT_FIELDS <= set(a), ATTEMPT_FIELDS - set(a)
    assert a["n"] == 1 and HEX16.match(a["span_id"])
    assert (a["channel"], a["role"], a["route"]) == ("cheap-a", "primary", "routed")
    assert a["upstream_model"] == "gpt-4o-mini-compat"
    assert a["response_model"] == "gpt-4o-mini-compat"
    assert a["outcome"] == "success" and a["http_status"] == 200 and a["error"] is None
    assert a["upstream_may_bill"] is True
    assert a["usage"] == {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                          "cached_input_tokens": 0}
    assert a["usage_source"] == "upstream"
    assert Decimal(a["charged"]) == expected
    assert isinstance(a["duration_ms"], int) and a["duration_ms"] >= 0
    assert r["usage"] == a["usage"]
    assert r["price"] == {"unit": "CNY", "input": "1.20", "output": "4.80", "cached_input": "0.60"}
    assert Decimal(r["amount"]) == expected
    assert (r["unit"], r["bucket"]) == ("CNY", "wallet")
    held = Decimal(r["held"])
    # The hold covered the prompt plus max_tokens at the primary's price, rounded up to 1e-9.
    assert held >= (usage.prompt_tokens * PRICE_IN + 64 * PRICE_OUT) / M
    assert Decimal(r["released"]) == held - expected
    assert Decimal(r["uncollected"]) == 0
    assert r["fallback"]["used"] is False
    assert r["fallback"]["primary_channel"] == "cheap-a"


def test_balance_too_small_for_the_hold_is_402_and_moves_nothing(stack) -> None:
    poor = make_customer(stack, wallet="0.000010")
    before = poor.balance()
    with pytest.raises(openai.APIStatusError) as info:
        poor.openai().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=1000)
    assert info.value.status_code == 402
    assert info.value.body["code"] == "insufficient_balance"
    assert poor.balance() == before


def test_unknown_key_is_401(stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-tf-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_missing_key_is_401(stack) -> None:
    resp = httpx.post(stack.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', 400, "invalid_request", None),
        (json.dumps({"model": "gpt-4o-mini"}).encode(), 400, "invalid_request", "messages"),
        (json.dumps({"model": "gpt-4o-mini", "messages": "hi"}).encode(), 400, "invalid_request", "messages"),
        (json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).encode(),
         400, "invalid_request", "max_tokens"),
        (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).encode(),
         404, "model_not_found", "model"),
        (json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}).encode(),
         413, "request_too_large", None),
    ],
    ids=["malformed-json", "messages-missing", "messages-wrong-type", "negative-max-tokens", "unknown-model", "too-large"],
)
def test_bad_input_gets_openai_errors_and_moves_nothing(customer: Customer, body: bytes, status: int, code: str, param: str | None) -> None:
    before = customer.balance()
    with customer.client() as c:
        resp = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"] and err["type"]
    assert customer.balance() == before


def test_models_lists_what_the_key_may_use(customer: Customer) -> None:
    ids = [m.id for m in customer.openai().models.list().data]
    assert "gpt-4o-mini" in ids and "m-mixed" in ids
    assert "m-directonly" not in ids  # a routed key cannot use a model served only directly


def test_receipts_of_another_key_are_invisible(stack, customer: Customer) -> None:
    raw = customer.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    receipt_id = raw.headers["x-tf-receipt-id"]
    other = make_customer(stack)
    with other.client() as c:
        assert c.get(f"/v1/receipts/{receipt_id}").status_code == 404


def test_a_receipt_cursor_of_another_key_is_refused_like_an_unknown_one(stack, customer: Customer) -> None:
    raw = customer.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    theirs = raw.headers["x-tf-receipt-id"]
    other = make_customer(stack)
    with other.client() as c:
        foreign = c.get(f"/v1/receipts?after={theirs}")
        unknown = c.get("/v1/receipts?after=rcpt_doesnotexist")
    assert foreign.status_code == unknown.status_code == 400
    assert foreign.json()["error"]["param"] == unknown.json()["error"]["param"] == "after"


def test_a_key_may_only_allow_models_the_catalog_has(stack) -> None:
    c = make_customer(stack)
    with stack.admin() as admin:
        bad = admin.post("/admin/v1/keys", json={"account_id": c.account_id, "name": "typo",
                                                 "allowed_models": ["gpt-4o-mini", "gpt-4o-mnii"]})
        assert bad.status_code == 400, bad.text
        err = bad.json()["error"]
        assert err["code"] == "invalid_request" and err["param"] == "allowed_models"
        assert "gpt-4o-mnii" in err["message"] and "gpt-4o-mini" in err["message"].split("The catalog has:")[1]
        keys = admin.get("/admin/v1/keys", params={"account_id": c.account_id}).json()["data"]
        assert [k["id"] for k in keys] == [c.key_id]  # nothing was created
        good = admin.post("/admin/v1/keys", json={"account_id": c.account_id, "name": "mini-only",
                                                  "allowed_models": ["gpt-4o-mini"]})
        assert good.status_code == 201, good.text
        assert good.json()["allowed_models"] == ["gpt-4o-mini"]
