"""Issue 5: each accounting edge of cheap routing, asserted to the last digit on the receipt."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import Customer, make_customer
from tests.e2e.helpers import chat, cost, receipt, wait_receipt


def test_primary_timeout_falls_back_and_charges_the_backup_once(customer: Customer) -> None:
    completion, headers = chat(customer, "m-timeout")
    r = receipt(customer, headers["x-tf-receipt-id"])
    assert headers["x-tf-attempts"] == "2"
    assert [(a["channel"], a["role"], a["outcome"]) for a in r["attempts"]] == [
        ("slow-a", "primary", "timeout"), ("cheap-b", "backup", "success")]
    first, second = r["attempts"]
    assert first["upstream_may_bill"] is True and first["charged"] == "0" and first["usage"] is None
    assert first["http_status"] is None and "0.5 s" in first["error"]
    assert 450 <= first["duration_ms"] < 2000
    usage = second["usage"]
    expected = cost(usage, "1.60", "6.40")
    assert Decimal(r["amount"]) == expected == Decimal(second["charged"])
    assert r["final_attempt"] == 2
    primary = cost(usage, "1.00", "2.00")
    assert (r["fallback"]["used"], r["fallback"]["primary_channel"], r["fallback"]["primary_unit"]) == (True, "slow-a", "CNY")
    assert r["error"] is None  # settled: a whole answer
    assert Decimal(r["fallback"]["primary_price_amount"]) == primary
    assert Decimal(r["fallback"]["extra_cost"]) == expected - primary
    assert customer.wallet() == Decimal("10.00") - expected
    assert completion.usage.prompt_tokens == usage["input_tokens"]


def test_500_is_retried_on_the_same_channel(customer: Customer) -> None:
    _, headers = chat(customer, "m-500")
    r = receipt(customer, headers["x-tf-receipt-id"])
    assert [(a["channel"], a["role"], a["outcome"], a["http_status"]) for a in r["attempts"]] == [
        ("cheap-a", "primary", "http_error", 500), ("cheap-a", "primary", "success", 200)]
    assert r["attempts"][0]["upstream_may_bill"] is False
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")
    assert r["fallback"]["used"] is False
    assert customer.wallet() == Decimal("10.00") - Decimal(r["amount"])


def test_429_honours_retry_after(customer: Customer) -> None:
    _, headers = chat(customer, "m-429")
    r = receipt(customer, headers["x-tf-receipt-id"])
    first, second = r["attempts"]
    assert (first["outcome"], first["http_status"], second["outcome"]) == ("rate_limited", 429, "success")
    from datetime import datetime

    t1 = datetime.fromisoformat(first["started_at"].replace("Z", "+00:00"))
    t2 = datetime.fromisoformat(second["started_at"].replace("Z", "+00:00"))
    assert (t2 - t1).total_seconds() >= 1.0  # Retry-After: 1
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")


def test_all_channels_failing_is_502_with_a_failed_receipt_and_nothing_charged(customer: Customer) -> None:
    before = customer.balance()
    with pytest.raises(openai.APIStatusError) as info:
        chat(customer, "m-down")
    err = info.value
    assert err.status_code == 502 and err.body["code"] == "upstream_error"
    assert err.response.headers["x-tf-attempts"] == "4"
    r = receipt(customer, err.response.headers["x-tf-receipt-id"])
    assert (err.response.headers["x-tf-amount"], err.response.headers["x-tf-unit"]) == ("0", "CNY")
    assert err.response.headers["x-tf-trace-id"] == r["trace_id"]
    assert r["status"] == "failed"
    assert [(a["channel"], a["role"], a["http_status"]) for a in r["attempts"]] == [
        ("cheap-a", "primary", 500), ("cheap-a", "primary", 500), ("cheap-b", "backup", 503), ("cheap-b", "backup", 503)]
    assert r["final_attempt"] == 4
    assert r["error"] == {"code": "upstream_error", "message": err.body["message"]}  # what the client got
    assert r["fallback"]["used"] is True and r["fallback"]["primary_price_amount"] is None  # a backup was tried
    assert all(a["charged"] == "0" for a in r["attempts"])
    assert Decimal(r["amount"]) == 0 and Decimal(r["released"]) == Decimal(r["held"]) > 0
    assert customer.balance() == before


def test_upstream_400_is_not_retried_and_reaches_the_client(customer: Customer) -> None:
    before = customer.balance()
    with pytest.raises(openai.BadRequestError) as info:
        chat(customer, "m-400")
    assert info.value.body["code"] == "invalid_request"
    assert "upstream" in info.value.body["message"]
    r = receipt(customer, info.value.response.headers["x-tf-receipt-id"])
    assert [(a["channel"], a["outcome"], a["http_status"]) for a in r["attempts"]] == [("cheap-a", "http_error", 400)]
    assert r["status"] == "failed"
    assert r["error"] == {"code": "invalid_request", "message": info.value.body["message"]}
    assert customer.balance() == before


def test_upstream_401_is_the_channels_fault_retried_then_fallen_back(customer: Customer) -> None:
    raw = customer.openai().chat.completions.with_raw_response.create(
        model="m-401", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    r = receipt(customer, raw.headers["x-tf-receipt-id"])
    assert [(a["channel"], a["outcome"], a["http_status"]) for a in r["attempts"]] == [
        ("cheap-a", "http_error", 401), ("cheap-a", "http_error", 401), ("cheap-b", "success", 200)]
    assert r["status"] == "settled" and r["error"] is None
    assert Decimal(r["amount"]) == cost(r["usage"], "1.60", "6.40") > 0  # at the backup's price, once
    assert customer.wallet() == Decimal("10.00") - Decimal(r["amount"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_free_model_is_served_with_a_receipt_and_charges_nothing(customer: Customer, stream: bool) -> None:
    before = customer.balance()
    body = {"model": "m-free", "messages": [{"role": "user", "content": "free?"}], "max_tokens": 8, "stream": stream}
    with customer.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        resp.read()
        receipt_id = resp.headers["x-tf-receipt-id"]
    r = wait_receipt(customer, receipt_id)
    assert r["status"] == "settled" and r["usage"]["output_tokens"] > 0
    assert r["amount"] == "0" and r["bucket"] is None
    # the smallest unit was held for it, and went back
    assert (r["held"], r["released"]) == ("0.000000001", "0.000000001")
    assert customer.balance() == before


def test_routed_key_never_reaches_a_direct_channel(stack) -> None:
    routed = make_customer(stack, wallet="10.00", credit="10.00", route_policy="routed")
    with pytest.raises(openai.APIStatusError) as info:
        chat(routed, "m-mixed")
    r = receipt(routed, info.value.response.headers["x-tf-receipt-id"])
    assert {a["route"] for a in r["attempts"]} == {"routed"}
    assert Decimal(routed.balance()["buckets"]["credit"]["balance"]) == Decimal("10.00")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(routed, "m-directonly")
    assert denied.value.body["code"] == "route_not_allowed"


def test_direct_key_never_reaches_a_routed_channel(stack) -> None:
    direct = make_customer(stack, wallet="10.00", credit="10.00", route_policy="direct")
    _, headers = chat(direct, "m-mixed")
    r = receipt(direct, headers["x-tf-receipt-id"])
    assert [(a["channel"], a["role"], a["route"]) for a in r["attempts"]] == [("openai-direct", "primary", "direct")]
    assert (r["bucket"], r["unit"]) == ("credit", "CREDIT")
    assert Decimal(r["amount"]) == cost(r["usage"], "0.15", "0.60")
    bal = direct.balance()["buckets"]
    assert Decimal(bal["wallet"]["balance"]) == Decimal("10.00")
    assert Decimal(bal["credit"]["balance"]) == Decimal("10.00") - Decimal(r["amount"])


def test_auto_falls_back_to_direct_and_credit_pays(stack) -> None:
    auto = make_customer(stack, wallet="10.00", credit="10.00", route_policy="auto")
    _, headers = chat(auto, "m-mixed")
    r = receipt(auto, headers["x-tf-receipt-id"])
    assert [(a["channel"], a["route"], a["outcome"]) for a in r["attempts"]] == [
        ("cheap-a", "routed", "http_error"), ("cheap-a", "routed", "http_error"), ("openai-direct", "direct", "success")]
    assert (r["bucket"], r["unit"], r["price"]["unit"]) == ("credit", "CREDIT", "CREDIT")
    amount = cost(r["usage"], "0.15", "0.60")
    assert Decimal(r["amount"]) == amount
    assert r["fallback"]["used"] is True and r["fallback"]["primary_unit"] == "CNY"
    assert r["fallback"]["extra_cost"] is None  # crossed from CNY to CREDIT
    assert Decimal(r["fallback"]["primary_price_amount"]) == cost(r["usage"], "1.20", "4.80")
    bal = auto.balance()["buckets"]
    assert Decimal(bal["wallet"]["balance"]) == Decimal("10.00") and Decimal(bal["wallet"]["held"]) == 0
    assert Decimal(bal["credit"]["balance"]) == Decimal("10.00") - amount and Decimal(bal["credit"]["held"]) == 0


def test_auto_does_not_fall_back_to_direct_without_credit(stack) -> None:
    auto = make_customer(stack, wallet="10.00", credit=None, route_policy="auto")
    with pytest.raises(openai.APIStatusError) as info:
        chat(auto, "m-mixed")
    assert info.value.status_code == 502
    assert "Fallbacks not tried: openai-direct (insufficient_balance in credit)." in info.value.body["message"]
    r = receipt(auto, info.value.response.headers["x-tf-receipt-id"])
    assert {a["route"] for a in r["attempts"]} == {"routed"}
    assert r["error"]["message"] == info.value.body["message"]
    assert auto.wallet() == Decimal("10.00")


def test_missing_usage_is_counted_locally_and_marked_estimated(customer: Customer) -> None:
    completion, headers = chat(customer, "m-nousage")
    r = receipt(customer, headers["x-tf-receipt-id"])
    assert r["usage_source"] == "estimated" and r["attempts"][0]["usage_source"] == "estimated"
    # The simulator's answer for this prompt has 24 tokens; the prompt counts as OpenAI counts it.
    assert r["usage"]["output_tokens"] == 24
    assert r["usage"]["input_tokens"] > 4
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")
    # the client gets the usage it was billed for
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        r["usage"]["input_tokens"], 24, r["usage"]["input_tokens"] + 24)


def stream_with_usage(customer: Customer, model: str) -> tuple[str, list]:
    """A 12-token story streamed with `include_usage`: its receipt id and every chunk."""
    stream = customer.openai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Stream me a story."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True})
    return stream.headers["x-tf-receipt-id"], list(stream.parse())


def test_a_stream_without_upstream_usage_gives_the_client_the_billed_usage(customer: Customer) -> None:
    receipt_id, chunks = stream_with_usage(customer, "m-nousage")
    last = chunks[-1]
    assert not last.choices and last.usage is not None and last.model == "m-nousage"
    assert last.id == chunks[0].id
    r = receipt(customer, receipt_id)
    assert r["status"] == "settled" and r["usage_source"] == "estimated"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (r["usage"]["input_tokens"], r["usage"]["output_tokens"])
    assert r["usage"]["output_tokens"] == 12
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")
    assert sum(1 for c in chunks if c.usage is not None) == 1


def test_cached_tokens_are_priced_at_the_cached_price(customer: Customer) -> None:
    completion, headers = chat(customer, "m-cached")
    r = receipt(customer, headers["x-tf-receipt-id"])
    assert r["usage"]["cached_input_tokens"] == 4
    assert completion.usage.completion_tokens_details.reasoning_tokens == 3
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80", "0.60")
    assert r["usage"]["output_tokens"] == completion.usage.completion_tokens  # reasoning is inside output


def test_the_model_that_answered_is_on_the_receipt(customer: Customer) -> None:
    completion, headers = chat(customer, "m-renamed")
    assert completion.model == "m-renamed"
    a = receipt(customer, headers["x-tf-receipt-id"])["attempts"][0]
    assert (a["upstream_model"], a["response_model"]) == ("gpt-4o-mini-compat+respond_model=gpt-4o-mini-2024-07-18",
                                                          "gpt-4o-mini-2024-07-18")


def test_streaming_with_usage(customer: Customer) -> None:
    receipt_id, chunks = stream_with_usage(customer, "gpt-4o-mini")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and all(c.model == "gpt-4o-mini" for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    r = receipt(customer, receipt_id)
    assert r["status"] == "settled" and r["usage_source"] == "upstream"
    assert r["usage"]["output_tokens"] == usage.completion_tokens == 12
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")
    assert customer.wallet() == Decimal("10.00") - Decimal(r["amount"])


def test_streaming_without_include_usage_still_bills_upstream_usage(customer: Customer) -> None:
    stream = customer.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream."}], max_tokens=6, stream=True)
    chunks = list(stream.parse())
    assert all(c.usage is None for c in chunks)
    r = receipt(customer, stream.headers["x-tf-receipt-id"])
    assert r["usage_source"] == "upstream" and r["usage"]["output_tokens"] == 6


def test_client_disconnect_mid_stream_is_cancelled_and_charged_for_what_was_generated(customer: Customer) -> None:
    body = {"model": "m-slowstream", "messages": [{"role": "user", "content": "A long story please."}],
            "max_tokens": 60, "stream": True}
    received = 0
    with customer.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        receipt_id = resp.headers["x-tf-receipt-id"]
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received >= 4:
                break  # the client goes away mid-stream
    r = wait_receipt(customer, receipt_id)
    assert r["status"] == "cancelled"
    assert r["error"]["code"] == "cancelled" and "during the stream" in r["error"]["message"]
    a = r["attempts"][0]
    assert a["outcome"] == "cancelled" and a["upstream_may_bill"] is True
    # Cancelled within about a second of the disconnect: far fewer than the 60 chunks at 150 ms.
    assert a["duration_ms"] < 4 * 150 + 1500
    assert 3 <= r["usage"]["output_tokens"] < 60
    assert r["usage_source"] == "estimated"
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80") > 0
    assert customer.wallet() == Decimal("10.00") - Decimal(r["amount"])
    assert Decimal(customer.balance()["buckets"]["wallet"]["held"]) == 0


def test_stream_broken_by_the_upstream_is_partial(customer: Customer) -> None:
    body = {"model": "m-break", "messages": [{"role": "user", "content": "Break, please."}], "max_tokens": 20, "stream": True}
    with customer.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        receipt_id = resp.headers["x-tf-receipt-id"]
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert "error" in json.loads(events[-1])
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1] if json.loads(e).get("choices")]
    assert len([x for x in contents if x]) == 3
    r = receipt(customer, receipt_id)
    assert r["status"] == "partial"
    assert r["error"] == {"code": "upstream_error", "message": json.loads(events[-1])["error"]["message"]}
    assert [(a["channel"], a["outcome"]) for a in r["attempts"]] == [("cheap-a", "stream_error")]  # no retry after output
    assert r["usage"]["output_tokens"] == 3 and r["usage_source"] == "estimated"
    assert Decimal(r["amount"]) == cost(r["usage"], "1.20", "4.80")
    assert customer.wallet() == Decimal("10.00") - Decimal(r["amount"])


def test_grpc_stub_gets_the_same_rules(stack, customer: Customer) -> None:
    """Internal platforms call the router's gRPC API directly with the key in metadata."""
    import grpc

    from tokenforge.v1 import router_pb2, router_pb2_grpc

    addr = next(line.split(": ", 1)[1] for line in stack.lines if line.startswith("router gRPC: "))
    with grpc.insecure_channel(addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        resp = stub.ChatCompletion(router_pb2.ChatCompletionRequest(body_json=body.encode()),
                                   metadata=(("authorization", f"Bearer {customer.secret}"),), timeout=30)
        assert json.loads(resp.body_json)["model"] == "gpt-4o-mini"
        assert resp.settlement.receipt_id.startswith("rcpt_") and resp.settlement.unit == "CNY"
        with pytest.raises(grpc.RpcError) as info:
            stub.ChatCompletion(router_pb2.ChatCompletionRequest(body_json=b"{}"),
                                metadata=(("authorization", f"Bearer {customer.secret}"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(info.value.trailing_metadata())["tf-error-code"] == "invalid_request"
        with pytest.raises(grpc.RpcError) as info:
            stub.ChatCompletion(router_pb2.ChatCompletionRequest(body_json=body.encode()),
                                metadata=(("authorization", "Bearer nope"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_key_is_refused_within_the_cache_bound(stack, customer: Customer) -> None:
    chat(customer, "gpt-4o-mini")
    with stack.admin() as admin:
        assert admin.post(f"/admin/v1/keys/{customer.key_id}/revoke").status_code == 200
    # Taking a hold re-checks the key: the very next request is refused, cache or not.
    with pytest.raises(openai.AuthenticationError):
        chat(customer, "gpt-4o-mini")
    with httpx.Client(base_url=stack.url) as c:
        resp = c.get("/v1/balance", headers={"authorization": f"Bearer {customer.secret}"})
    assert resp.status_code == 401


def test_an_upstream_that_outruns_the_hold_is_charged_what_the_balance_allows(stack) -> None:
    """m-cached reports 3 reasoning tokens on top of max_tokens=1: the cost passes the hold."""
    rich = make_customer(stack)
    _, headers = chat(rich, "m-cached", max_tokens=1)
    r = receipt(rich, headers["x-tf-receipt-id"])
    held, cost_full = Decimal(r["held"]), Decimal(r["amount"])
    assert cost_full > held and Decimal(r["uncollected"]) == 0  # the rest came from the balance

    poor = make_customer(stack, wallet=str(held))
    _, headers = chat(poor, "m-cached", max_tokens=1)
    r = receipt(poor, headers["x-tf-receipt-id"])
    assert Decimal(r["amount"]) == held
    assert Decimal(r["uncollected"]) == cost_full - held
    assert Decimal(r["attempts"][-1]["charged"]) == held  # what the bucket paid, not the rating
    assert poor.wallet() == 0
