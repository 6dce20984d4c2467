"""Runs: a budget held up front, requests drawing from it, the report, closing."""

from __future__ import annotations

import json
import secrets

import grpc
import pytest

from tokenforge.money import parse_amount_nano
from tokenforge.v1 import ledger_pb2 as L

from .conftest import audit_ok, expect_error, new_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET, CREDIT = 1, 2
ONE = 1_000_000_000
S = grpc.StatusCode


def receipt(model: str, attempts: list[dict]) -> bytes:
    return json.dumps({
        "requested_model": model,
        "final_attempt": attempts[-1]["n"],
        "attempts": attempts,
        "fallback": {"used": len({a["channel"] for a in attempts}) > 1, "extra_cost": "0.000100"}
        if len({a["channel"] for a in attempts}) > 1 else {"used": False},
    }).encode()


def attempt(n: int, channel: str, outcome: str, route: str = "routed", ms: int = 100) -> dict:
    return {"n": n, "channel": channel, "route": route, "outcome": outcome, "duration_ms": ms}


async def call(stub, c, run_id: str, step: str, bucket: int, hold: int, rated: int, body: bytes) -> L.SettleResponse:
    rid = "run-req-" + secrets.token_hex(5)
    await stub.Hold(L.HoldRequest(request_id=rid, key_id=c.key_id, bucket=bucket, amount_nano=hold, run_id=run_id))
    return await stub.Settle(L.SettleRequest(request_id=rid, key_id=c.key_id, bucket=bucket, rated_nano=rated,
                                             status="settled", receipt_json=body, run_id=run_id, run_step=step))


async def test_run_budget_report_and_close(stub) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE, credit_nano=ONE)
    await expect_error(
        stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="too big", budget_wallet_nano=11 * ONE)),
        S.FAILED_PRECONDITION, "insufficient_balance",
    )
    estimate = {"wallet": {"low": "0.10", "expected": "0.20", "high": "0.50"}, "warnings": []}
    run = await stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="research", budget_wallet_nano=2 * ONE,
                                                  estimate_json=json.dumps(estimate).encode()))
    assert run.id.startswith("run_") and run.status == "open"
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.held_nano, acct.balances.wallet.available_nano) == (2 * ONE, 8 * ONE)

    r1 = await call(stub, c, run.id, "market data", WALLET, ONE // 10, 30_000_000,
                    receipt("gpt-4o-mini", [attempt(1, "cheap-a", "success", ms=300)]))
    r2 = await call(stub, c, run.id, "analysis", WALLET, ONE // 10, 45_000_000,
                    receipt("gpt-4o-mini", [attempt(1, "cheap-a", "timeout", ms=2000),
                                            attempt(2, "cheap-a", "timeout", ms=2000),
                                            attempt(3, "cheap-b", "success", ms=500)]))
    # credit has no run budget: the request is grouped in the run but drawn from the balance
    r3 = await call(stub, c, run.id, "analysis", CREDIT, ONE // 10, 7_000_000,
                    receipt("gpt-4o", [attempt(1, "openai-direct", "success", "direct", ms=900)]))
    # a request above the run's remaining budget is refused, and the router records it
    await expect_error(
        stub.Hold(L.HoldRequest(request_id="big-" + secrets.token_hex(4), key_id=c.key_id, bucket=WALLET,
                                amount_nano=2 * ONE, run_id=run.id)),
        S.FAILED_PRECONDITION, "run_budget_exceeded",
    )
    await stub.RecordRefusal(L.RecordRefusalRequest(run_id=run.id, key_id=c.key_id, code="run_budget_exceeded"))

    got = await stub.GetRun(L.GetRunRequest(run_id=run.id, key_id=c.key_id))
    report = json.loads(got.report_json)
    assert report["id"] == run.id and report["name"] == "research" and report["status"] == "open"
    assert report["budget"] == {"wallet": "2.000000", "credit": None}
    wallet, credit = report["totals"]["wallet"], report["totals"]["credit"]
    assert wallet["amount"] == "0.075000" and wallet["calls"] == 2 and wallet["attempts"] == 4
    assert wallet["failed_attempts"] == 2 and wallet["retries"] == 1 and wallet["fallbacks"] == 1
    assert wallet["extra_cost"] == "0.000100"
    assert credit["amount"] == "0.007000" and credit["calls"] == 1
    assert report["refused"] == 1
    assert report["receipts"] == [r1.receipt_id, r2.receipt_id, r3.receipt_id]
    steps = {(s["step"], s["unit"]): (s["amount"], s["calls"]) for s in report["by_step"]}
    assert steps == {("market data", "CNY"): ("0.030000", 1), ("analysis", "CNY"): ("0.045000", 1),
                     ("analysis", "CREDIT"): ("0.007000", 1)}
    assert {(m["model"], m["unit"]) for m in report["by_model"]} == {("gpt-4o-mini", "CNY"), ("gpt-4o", "CREDIT")}
    assert {r["route"] for r in report["by_route"]} == {"routed", "direct"}
    assert report["slowest"][0]["receipt_id"] == r2.receipt_id
    assert report["estimate"] == estimate
    # totals equal the receipts exactly
    listed = await stub.ListReceipts(L.ListReceiptsRequest(run_id=run.id, key_id=c.key_id, limit=100))
    by_unit: dict[str, int] = {}
    for r in listed.receipts:
        body = json.loads(r.receipt_json)
        by_unit[body["unit"]] = by_unit.get(body["unit"], 0) + parse_amount_nano(body["amount"])
        assert body["run"] == {"id": run.id, "step": body["run"]["step"]}
    assert by_unit == {"CNY": parse_amount_nano(wallet["amount"]), "CREDIT": parse_amount_nano(credit["amount"])}

    # another key does not see the run
    other = await new_customer(stub)
    await expect_error(stub.GetRun(L.GetRunRequest(run_id=run.id, key_id=other.key_id)), S.NOT_FOUND, "not_found")
    await expect_error(stub.CloseRun(L.CloseRunRequest(run_id=run.id, key_id=other.key_id)), S.NOT_FOUND, "not_found")
    await expect_error(
        stub.Hold(L.HoldRequest(request_id="x-" + secrets.token_hex(4), key_id=other.key_id, bucket=WALLET,
                                amount_nano=1, run_id=run.id)),
        S.NOT_FOUND, "not_found",
    )

    closed = await stub.CloseRun(L.CloseRunRequest(run_id=run.id, key_id=c.key_id))
    assert closed.status == "closed"
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert acct.balances.wallet.held_nano == 0
    assert acct.balances.wallet.balance_nano == 10 * ONE - 75_000_000
    assert acct.balances.credit.balance_nano == ONE - 7_000_000
    again = await stub.CloseRun(L.CloseRunRequest(run_id=run.id, key_id=c.key_id))
    assert again.status == "closed"
    await expect_error(
        stub.Hold(L.HoldRequest(request_id="late-" + secrets.token_hex(4), key_id=c.key_id, bucket=WALLET,
                                amount_nano=1, run_id=run.id)),
        S.INVALID_ARGUMENT, "invalid_request",
    )
    await audit_ok(stub)


async def test_run_funded_overage_and_hold_left_at_close(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    run = await stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="tight", budget_wallet_nano=1000))
    a, b = "ov-a-" + secrets.token_hex(4), "ov-b-" + secrets.token_hex(4)
    await stub.Hold(L.HoldRequest(request_id=a, key_id=c.key_id, bucket=WALLET, amount_nano=400, run_id=run.id))
    await stub.Hold(L.HoldRequest(request_id=b, key_id=c.key_id, bucket=WALLET, amount_nano=400, run_id=run.id))
    # cost 700 against a hold of 400: 300 more from the run's 200 left, 100 uncollected —
    # never from the balance outside the budget
    res = await stub.Settle(L.SettleRequest(request_id=a, key_id=c.key_id, bucket=WALLET, rated_nano=700,
                                            status="settled", receipt_json=b"{}", run_id=run.id))
    assert (res.amount_nano, res.uncollected_nano) == (600, 100)
    # closing the run while b is still in flight: b's hold stays until it settles
    await stub.CloseRun(L.CloseRunRequest(run_id=run.id, key_id=c.key_id))
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert acct.balances.wallet.held_nano == 400
    res_b = await stub.Settle(L.SettleRequest(request_id=b, key_id=c.key_id, bucket=WALLET, rated_nano=100,
                                              status="settled", receipt_json=b"{}", run_id=run.id))
    assert (res_b.amount_nano, res_b.released_nano) == (100, 300)
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (ONE - 700, 0)
    report = json.loads((await stub.GetRun(L.GetRunRequest(run_id=run.id))).report_json)
    assert report["totals"]["wallet"]["amount"] == "0.0000007"
    assert report["totals"]["wallet"]["uncollected"] == "0.0000001"
    await audit_ok(stub)


async def test_run_without_budget_groups_receipts(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    run = await stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="plain"))
    for i in range(3):
        await call(stub, c, run.id, f"s{i}", WALLET, 1000, 100 * (i + 1), receipt("m", [attempt(1, "x", "success")]))
    report = json.loads((await stub.GetRun(L.GetRunRequest(run_id=run.id))).report_json)
    assert report["totals"]["wallet"]["amount"] == "0.0000006" and report["totals"]["wallet"]["calls"] == 3
    assert report["budget"] == {"wallet": None, "credit": None}
    await expect_error(stub.GetRun(L.GetRunRequest(run_id="run_nope")), S.NOT_FOUND, "not_found")
    await expect_error(stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="")), S.INVALID_ARGUMENT, "invalid_request")
    await expect_error(
        stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="neg", budget_wallet_nano=-1)),
        S.INVALID_ARGUMENT, "invalid_request",
    )


async def test_an_expired_run_releases_its_budget(stub) -> None:
    import asyncio

    c = await new_customer(stub, wallet_nano=ONE)
    run = await stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="short", budget_wallet_nano=ONE // 2, ttl_s=1))
    deadline = asyncio.get_running_loop().time() + 10
    while (await stub.GetRun(L.GetRunRequest(run_id=run.id))).status != "expired":
        assert asyncio.get_running_loop().time() < deadline, "run not expired by the reaper"
        await asyncio.sleep(0.1)
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (ONE, 0)
    await audit_ok(stub)
