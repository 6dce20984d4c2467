"""No overshoot under concurrency: balance, a key's daily cap, a run's budget."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest

from tokenforge.v1 import ledger_pb2 as L

from .conftest import audit_ok, error_word, new_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET = 1
ONE = 1_000_000_000
DIME = ONE // 10
N_HOLDS = 200


async def _race(stub, key_id: str, account_id: str, *, run_id: str = "") -> tuple[list[str], dict[str, int], int]:
    """200 concurrent holds of 0.10 while another task keeps reading the balance.

    Returns the request ids that got a hold, the refusal words counted, and the lowest
    available balance read during the race.
    """
    done = asyncio.Event()
    lowest = [2**63]

    async def watch() -> None:
        while not done.is_set():
            acct = await stub.GetAccount(L.GetAccountRequest(account_id=account_id))
            lowest[0] = min(lowest[0], acct.balances.wallet.available_nano)
            assert acct.balances.wallet.held_nano <= acct.balances.wallet.balance_nano

    async def hold(i: int) -> tuple[str, str | None]:
        rid = f"race-{secrets.token_hex(4)}-{i}"
        try:
            await stub.Hold(L.HoldRequest(request_id=rid, key_id=key_id, bucket=WALLET, amount_nano=DIME, run_id=run_id))
            return rid, None
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            return rid, error_word(exc)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(hold(i) for i in range(N_HOLDS)))
    done.set()
    await asyncio.wait_for(watcher, 10)
    refusals: dict[str, int] = {}
    for _, word in results:
        if word:
            refusals[word] = refusals.get(word, 0) + 1
    return [rid for rid, word in results if word is None], refusals, lowest[0]


async def _capture_all(stub, key_id: str, rids: list[str], rated_nano: int) -> None:
    await asyncio.gather(*(
        stub.Settle(L.SettleRequest(request_id=rid, key_id=key_id, bucket=WALLET, rated_nano=rated_nano,
                                    status="settled", receipt_json=b"{}"))
        for rid in rids
    ))


async def test_hot_account_race_exactly_100_of_200(stub) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE)
    won, refusals, lowest = await _race(stub, c.key_id, c.account_id)
    assert len(won) == 100 and refusals == {"insufficient_balance": 100}
    assert lowest >= 0
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.held_nano, acct.balances.wallet.available_nano) == (10 * ONE, 0)
    await _capture_all(stub, c.key_id, won, DIME)
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (0, 0)
    await audit_ok(stub)


async def test_key_daily_cap_race_exactly_100_of_200(stub) -> None:
    c = await new_customer(stub, wallet_nano=100 * ONE, limits=L.KeyLimits(wallet_daily_nano=10 * ONE))
    won, refusals, lowest = await _race(stub, c.key_id, c.account_id)
    assert len(won) == 100 and refusals == {"key_budget_exceeded": 100}
    assert lowest == 90 * ONE
    await _capture_all(stub, c.key_id, won, DIME)
    kb = await stub.GetKeyBalance(L.GetKeyBalanceRequest(key_id=c.key_id))
    assert kb.spent_wallet_nano == 10 * ONE
    # the cap is reached: even the smallest hold is refused now
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Hold(L.HoldRequest(request_id="after-cap-" + secrets.token_hex(4), key_id=c.key_id,
                                      bucket=WALLET, amount_nano=1))
    assert error_word(info.value) == "key_budget_exceeded"
    await audit_ok(stub)


async def test_run_budget_race_exactly_100_of_200(stub) -> None:
    c = await new_customer(stub, wallet_nano=100 * ONE)
    run = await stub.CreateRun(L.CreateRunRequest(key_id=c.key_id, name="race", budget_wallet_nano=10 * ONE))
    won, refusals, _ = await _race(stub, c.key_id, c.account_id, run_id=run.id)
    assert len(won) == 100 and refusals == {"run_budget_exceeded": 100}
    await _capture_all(stub, c.key_id, won, DIME // 2)
    # half of each hold went back to the run: 100 more holds of 0.05 fit, not one more
    closed = await stub.CloseRun(L.CloseRunRequest(run_id=run.id, key_id=c.key_id))
    assert closed.status == "closed"
    acct = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (95 * ONE, 0)
    await audit_ok(stub)
