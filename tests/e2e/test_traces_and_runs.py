"""Issue 4: receipts are traces; runs with estimates, budgets and reports."""

from __future__ import annotations

import concurrent.futures
import json
from decimal import Decimal

import openai

from tests.conftest import Customer, make_customer
from tests.e2e.helpers import chat, receipt
from tests.otlp_receiver import Receiver

SERVER, CLIENT = 2, 3  # OTLP span kinds


def test_receipt_attempts_are_the_trace_attempt_spans(customer: Customer, otlp: Receiver) -> None:
    _, headers = chat(customer, "m-500")
    r = receipt(customer, headers["x-tf-receipt-id"])
    assert headers["x-tf-trace-id"] == r["trace_id"]

    def complete(spans: list) -> bool:
        names = {s.name for s in spans}
        # every process exports on its own schedule: wait for each span the test reads
        return (sum("tf.attempt" in s.attributes for s in spans) == 2 and "tokenforge.v1.LedgerService/Settle" in names
                and "POST /v1/chat/completions" in names and "chat m-500" in names
                and any(n.endswith("/ChatCompletion") for n in names))

    spans = otlp.wait_for(r["trace_id"], complete)
    by_id = {s.span_id: s for s in spans}
    attempts = sorted((s for s in spans if "tf.attempt" in s.attributes), key=lambda s: s.attributes["tf.attempt"])
    assert [s.span_id for s in attempts] == [a["span_id"] for a in r["attempts"]]
    assert [s.attributes["tf.outcome"] for s in attempts] == [a["outcome"] for a in r["attempts"]]
    request_span = by_id[attempts[0].parent_span_id]
    assert request_span.name == "chat m-500" and request_span.service == "tokenforge-router"
    assert all(s.parent_span_id == request_span.span_id for s in attempts)
    # edge → router → (ledger, metering), all in this one trace
    router_server = by_id[request_span.parent_span_id]
    assert router_server.name == "tokenforge.v1.Router/ChatCompletion" or router_server.name.endswith("/ChatCompletion")
    assert by_id[router_server.parent_span_id].name == "POST /v1/chat/completions"
    services = {s.service for s in spans}
    assert {"tokenforge-edge", "tokenforge-router", "tokenforge-ledger", "tokenforge-metering"} <= services

    first, second = attempts
    assert first.kind == CLIENT
    for s in attempts:
        a = s.attributes
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4o-mini+fail=500x1"
        assert a["server.address"] == "127.0.0.1" and isinstance(a["server.port"], int)
        assert (a["tf.key_id"], a["tf.channel"], a["tf.route"], a["tf.role"], a["tf.bucket"]) == (
            customer.key_id, "cheap-a", "routed", "primary", "wallet")
    assert first.attributes["error.type"] == "http_error" and first.attributes["tf.charged"] == "0"
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["gen_ai.usage.input_tokens"] == r["usage"]["input_tokens"]
    assert second.attributes["gen_ai.usage.output_tokens"] == r["usage"]["output_tokens"]
    assert Decimal(second.attributes["tf.charged"]) == Decimal(r["amount"])
    # Token usage sits on attempt spans only; no secret or prompt text anywhere.
    assert not any("gen_ai.usage.input_tokens" in s.attributes for s in spans if "tf.attempt" not in s.attributes)
    blob = json.dumps([s.attributes for s in spans])
    assert customer.secret not in blob and "Tell me about tokens" not in blob


def _plan(calls: int = 10) -> list[dict]:
    return [{"model": "gpt-4o-mini", "calls": calls, "input_tokens": 1000, "output_tokens": 500, "step": "research"}]


def test_run_estimate_and_warnings(stack) -> None:
    rich = make_customer(stack, wallet="10.00")
    with rich.client() as c:
        resp = c.post("/v1/runs", json={"name": "market study", "plan": _plan()})
    assert resp.status_code == 201, resp.text
    run = resp.json()
    assert run["id"].startswith("run_")
    # 10 calls × (1000 in + 500 out): primary cheap-a 1.20/4.80, priciest routed cheap-b 1.60/6.40
    assert run["estimate"]["wallet"] == {"low": "0.036000", "expected": "0.036000", "high": "0.048000"}
    assert run["estimate"]["credit"] == {"low": "0", "expected": "0", "high": "0"}
    assert {w["code"] for w in run["warnings"]} == {"fallback_may_cost_more"}
    assert run["balances"]["buckets"]["wallet"]["available"] == "10.000000"

    poor = make_customer(stack, wallet="0.040")
    with poor.client() as c:
        run = c.post("/v1/runs", json={"name": "too big", "plan": _plan(), "budget": {"wallet": "0.030"}}).json()
    codes = {w["code"] for w in run["warnings"]}
    assert {"insufficient_balance", "budget_below_estimate", "fallback_may_cost_more"} <= codes
    assert all(w["message"] for w in run["warnings"])

    tight = make_customer(stack, wallet="0.080")  # high 0.048 fits, but is over half of it
    with tight.client() as c:
        run = c.post("/v1/runs", json={"name": "tight", "plan": _plan()}).json()
    codes = {w["code"] for w in run["warnings"]}
    assert "large_share_of_balance" in codes and "insufficient_balance" not in codes

    credit_only = make_customer(stack, wallet=None, credit="5.00", route_policy="auto")
    with credit_only.client() as c:
        run = c.post("/v1/runs", json={"name": "direct", "plan": [{"model": "m-directonly", "calls": 2,
                                                                   "input_tokens": 100, "output_tokens": 100}]}).json()
    assert "uses_credit" in {w["code"] for w in run["warnings"]}


def test_run_input_errors_name_the_field(customer: Customer) -> None:
    with customer.client() as c:
        for body, param in (({}, "name"), ({"name": "x", "budget": {"wallet": -1}}, "budget.wallet"),
                            ({"name": "x", "plan": [{"model": "nope", "calls": 1, "input_tokens": 1, "output_tokens": 1}]}, "plan[0].model"),
                            ({"name": "x", "plan": [{"model": "gpt-4o-mini", "calls": 0, "input_tokens": 1, "output_tokens": 1}]}, "plan[0].calls")):
            resp = c.post("/v1/runs", json=body)
            assert resp.status_code in (400, 404), resp.text
            assert resp.json()["error"]["param"] == param
    assert customer.wallet() == Decimal("10.00")


def test_control_characters_in_run_names_and_steps_are_refused_as_such(customer: Customer) -> None:
    with customer.client() as c:
        for body, param in (({"name": "evil\u001b[31mred"}, "name"),
                            ({"name": "x", "plan": [{"model": "gpt-4o-mini", "step": "a\nb"}]}, "plan[0].step")):
            resp = c.post("/v1/runs", json=body)
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["param"] == param and "no control characters" in err["message"], err


def test_a_utf8_run_step_header_reaches_the_receipt_and_report_intact(customer: Customer) -> None:
    step = "schritt-ü 段"
    with customer.client() as c:
        run = c.post("/v1/runs", json={"name": "unicode"}).json()
        resp = c.post("/v1/chat/completions",
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                      headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step.encode("utf-8")})
        assert resp.status_code == 200, resp.text
        assert receipt(customer, resp.headers["x-tf-receipt-id"])["run"] == {"id": run["id"], "step": step}
        report = c.get(f"/v1/runs/{run['id']}").json()
        assert [s["step"] for s in report["by_step"]] == [step]
        bad = c.post("/v1/chat/completions",
                     json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                     headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": b"caf\xe9"})  # Latin-1, not UTF-8
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-tf-run-step", bad.text


def test_run_budget_is_never_passed_under_concurrency_and_the_report_adds_up(stack) -> None:
    c = make_customer(stack, wallet="10.00")
    budget = Decimal("0.000400")
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "race", "budget": {"wallet": str(budget)}}).json()
    assert Decimal(run["balances"]["buckets"]["wallet"]["held"]) == budget

    def one(i: int) -> tuple[int, str | None, str | None]:
        try:
            raw = c.openai().chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"step {i}"}], max_tokens=8,
                extra_headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": "even" if i % 2 == 0 else "odd"})
            return 200, raw.headers["x-tf-receipt-id"], None
        except openai.APIStatusError as exc:
            return exc.status_code, None, exc.body["code"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(24)))
    ok = [rid for status, rid, _ in results if status == 200]
    refused = [code for status, _, code in results if status != 200]
    assert ok and refused, results
    assert set(refused) == {"run_budget_exceeded"}

    with c.client() as http:
        report = http.get(f"/v1/runs/{run['id']}").json()
        amounts = [Decimal(receipt(c, rid)["amount"]) for rid in ok]
        assert sum(amounts) <= budget
        assert Decimal(report["totals"]["wallet"]["amount"]) == sum(amounts)
        assert report["totals"]["wallet"]["calls"] == len(ok)
        assert report["refused"] == len(refused)
        assert sorted(report["receipts"]) == sorted(ok)
        steps = {s["step"]: s for s in report["by_step"]}
        assert sum(Decimal(s["amount"]) for s in steps.values()) == sum(amounts)
        assert set(steps) == {"even", "odd"}
        page = http.get(f"/v1/runs/{run['id']}/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Attempts over time" in page.text and ok[0] in page.text
        closed = http.post(f"/v1/runs/{run['id']}/close").json()
        assert closed["status"] == "closed"
    bal = c.balance()["buckets"]["wallet"]
    assert Decimal(bal["held"]) == 0
    assert Decimal(bal["balance"]) == Decimal("10.00") - sum(amounts)


def test_runs_are_private_to_their_key(stack, customer: Customer) -> None:
    with customer.client() as http:
        run = http.post("/v1/runs", json={"name": "mine"}).json()
    other = make_customer(stack)
    with other.client() as http:
        assert http.get(f"/v1/runs/{run['id']}").status_code == 404


def test_receipts_do_not_depend_on_sampling(tmp_path) -> None:
    """Sampling at 0 %: nothing is exported, yet every receipt still has its attempt chain."""
    import time

    from tests.conftest import E2E_CATALOG
    from tests.stackproc import start_stack

    receiver = Receiver()
    stack = start_stack(tmp_path / "data", catalog=E2E_CATALOG, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    try:
        c = make_customer(stack)
        _, headers = chat(c, "m-500")
        r = receipt(c, headers["x-tf-receipt-id"])
        assert [a["outcome"] for a in r["attempts"]] == ["http_error", "success"]
        assert all(len(a["span_id"]) == 16 for a in r["attempts"])
        time.sleep(0.5)  # several export intervals: a sampled span would have arrived by now
        assert receiver.spans.get(r["trace_id"]) is None
    finally:
        stack.stop()
        receiver.close()
