"""Runs: a named group of requests with a pre-flight estimate, an optional budget held up
front, and a report. The router validates and orchestrates; metering estimates; the ledger
holds the budget and builds the report from the run's receipts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenforge.errors import TFError
from tokenforge.money import MoneyError, format_nano, parse_amount_nano
from tokenforge.router.clients import Backends
from tokenforge.router.keys import KeyInfo
from tokenforge.v1 import common_pb2, ledger_pb2, metering_pb2

POLICY_TO_PB = {"routed": common_pb2.ROUTE_POLICY_ROUTED, "direct": common_pb2.ROUTE_POLICY_DIRECT,
                "auto": common_pb2.ROUTE_POLICY_AUTO}
MAX_PLAN_STEPS = 1_000
MAX_CALLS = 10_000_000
MAX_TOKENS_PER_CALL = 10_000_000
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class RunRequest:
    name: str
    budget_wallet_nano: int
    budget_credit_nano: int
    plan: tuple[metering_pb2.PlanStep, ...]


def _invalid(message: str, param: str | None) -> TFError:
    return TFError("invalid_request", message, param)


def _count(value: Any, param: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _invalid(f"`{param}` must be an integer from {minimum} to {maximum}.", param)
    return value


def parse_run_request(raw: bytes) -> RunRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid("We could not parse the JSON body of your request. Send valid JSON.", None) from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise _invalid(f"`name` is required: a string of 1 to {MAX_NAME_CHARS} characters.", "name")
    if not name.isprintable():
        raise _invalid("`name` must be printable text: no control characters (tabs, newlines, escapes).", "name")

    budgets = {"wallet": 0, "credit": 0}
    budget = body.get("budget")
    if budget is not None:
        if not isinstance(budget, dict):
            raise _invalid('`budget` must be an object like {"wallet": "5.00", "credit": "2.00"}.', "budget")
        for bucket, value in budget.items():
            param = f"budget.{bucket}"
            if bucket not in budgets:
                raise _invalid("`budget` may name `wallet` and `credit` only.", param)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _invalid(f'`{param}` must be a decimal string such as "5.00" (not a JSON number).', param)
            try:
                budgets[bucket] = parse_amount_nano(value, allow_zero=False)
            except MoneyError as exc:
                raise _invalid(f"`{param}` {exc}.", param) from None

    steps: list[metering_pb2.PlanStep] = []
    plan = body.get("plan")
    if plan is not None:
        if not isinstance(plan, list) or len(plan) > MAX_PLAN_STEPS:
            raise _invalid(f"`plan` must be an array of at most {MAX_PLAN_STEPS} steps.", "plan")
        for i, item in enumerate(plan):
            where = f"plan[{i}]"
            if not isinstance(item, dict):
                raise _invalid(f"`{where}` must be an object.", where)
            model = item.get("model")
            if not isinstance(model, str) or not model:
                raise _invalid(f"`{where}.model` is required.", f"{where}.model")
            step = item.get("step", "")
            if not isinstance(step, str) or len(step) > MAX_NAME_CHARS:
                raise _invalid(f"`{where}.step` must be a string of at most {MAX_NAME_CHARS} characters.",
                               f"{where}.step")
            if not step.isprintable():
                raise _invalid(f"`{where}.step` must be printable text: no control characters (tabs, newlines, "
                               "escapes).", f"{where}.step")
            steps.append(metering_pb2.PlanStep(
                model=model,
                calls=_count(item.get("calls"), f"{where}.calls", 1, MAX_CALLS),
                input_tokens=_count(item.get("input_tokens"), f"{where}.input_tokens", 0, MAX_TOKENS_PER_CALL),
                output_tokens=_count(item.get("output_tokens"), f"{where}.output_tokens", 0, MAX_TOKENS_PER_CALL),
                step=step,
            ))
    return RunRequest(name.strip(), budgets["wallet"], budgets["credit"], tuple(steps))


def _bucket_estimate(e: metering_pb2.BucketEstimate) -> dict[str, str]:
    return {"low": format_nano(e.low_nano), "expected": format_nano(e.expected_nano), "high": format_nano(e.high_nano)}


def _balances(b: common_pb2.Balances) -> dict[str, Any]:
    def one(x: common_pb2.BucketBalance, unit: str) -> dict[str, str]:
        return {"unit": x.unit or unit, "balance": format_nano(x.balance_nano), "held": format_nano(x.held_nano),
                "available": format_nano(x.available_nano)}

    return {"id": b.account_id, "name": b.name,
            "buckets": {"wallet": one(b.wallet, "CNY"), "credit": one(b.credit, "CREDIT")}}


async def create_run(backends: Backends, key: KeyInfo, raw: bytes) -> bytes:
    req = parse_run_request(raw)
    kb = await backends.call(backends.ledger.GetKeyBalance, ledger_pb2.GetKeyBalanceRequest(key_id=key.id))
    est = await backends.call(backends.metering.EstimateRun, metering_pb2.EstimateRunRequest(
        plan=req.plan,
        route_policy=POLICY_TO_PB[key.route_policy],
        allowed_models=key.allowed_models,
        balances=kb.balances,
        budget_wallet_nano=req.budget_wallet_nano,
        budget_credit_nano=req.budget_credit_nano,
    ))
    estimate = {"wallet": _bucket_estimate(est.wallet), "credit": _bucket_estimate(est.credit)}
    warnings = [{"code": w.code, "message": w.message} for w in est.warnings]
    budget = {
        "wallet": format_nano(req.budget_wallet_nano) if req.budget_wallet_nano else None,
        "credit": format_nano(req.budget_credit_nano) if req.budget_credit_nano else None,
    }
    plan = [{"model": s.model, "calls": s.calls, "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
             "step": s.step or None} for s in req.plan]
    stored = {"estimate": estimate, "warnings": warnings, "plan": plan}
    run = await backends.call(backends.ledger.CreateRun, ledger_pb2.CreateRunRequest(
        key_id=key.id,
        name=req.name,
        budget_wallet_nano=req.budget_wallet_nano,
        budget_credit_nano=req.budget_credit_nano,
        estimate_json=json.dumps(stored).encode(),
    ))
    after = await backends.call(backends.ledger.GetKeyBalance, ledger_pb2.GetKeyBalanceRequest(key_id=key.id))
    body = {
        "id": run.id,
        "object": "run",
        "name": req.name,
        "status": run.status or "open",
        "budget": budget,
        "estimate": estimate,
        "balances": _balances(after.balances),
        "warnings": warnings,
        "plan": plan,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def get_run(backends: Backends, key: KeyInfo, run_id: str) -> bytes:
    run = await backends.call(backends.ledger.GetRun, ledger_pb2.GetRunRequest(run_id=run_id, key_id=key.id))
    return bytes(run.report_json)


async def close_run(backends: Backends, key: KeyInfo, run_id: str) -> bytes:
    run = await backends.call(backends.ledger.CloseRun, ledger_pb2.CloseRunRequest(run_id=run_id, key_id=key.id))
    return bytes(run.report_json)
