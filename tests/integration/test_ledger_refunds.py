"""Refunds and adjustments over gRPC against real PostgreSQL: full, partial, over-refunds
refused, replays, conflicts, unknown and zero receipts, credits and debits, races of partial
refunds through one ledger and through two, and the database's last line of defence. Every
test ends with the audit: conservation holds after each."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import grpc
import pytest

from tokenforge.rpc import client_channel
from tokenforge.v1 import ledger_pb2 as L
from tokenforge.v1 import ledger_pb2_grpc

from .conftest import audit_ok, error_word, expect_error, new_customer, start_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET, CREDIT = 1, 2
CREDIT_DIR, DEBIT_DIR = L.ADJUSTMENT_DIRECTION_CREDIT, L.ADJUSTMENT_DIRECTION_DEBIT
ONE = 1_000_000_000
S = grpc.StatusCode


def key() -> str:
    return "idem-" + secrets.token_hex(6)


def param(exc: grpc.aio.AioRpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get("tf-error-param")  # type: ignore[return-value]


async def wallet(stub, account_id: str) -> L.BucketBalance:  # type: ignore[no-untyped-def]
    return (await stub.GetAccount(L.GetAccountRequest(account_id=account_id))).balances.wallet


async def settled_receipt(stub, key_id: str, rated_nano: int, *, status: str = "settled") -> L.SettleResponse:  # type: ignore[no-untyped-def]
    rid = "req_" + secrets.token_hex(6)
    await stub.Hold(L.HoldRequest(request_id=rid, key_id=key_id, bucket=WALLET, amount_nano=max(rated_nano, 1)))
    return await stub.Settle(L.SettleRequest(
        request_id=rid, key_id=key_id, bucket=WALLET if rated_nano else 0, rated_nano=rated_nano,
        status=status, receipt_json=b'{"requested_model": "m"}'))


async def test_refund_partial_replay_conflict_rest_and_over_refund(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    rc = await settled_receipt(stub, c.key_id, 150_000_000)
    assert (await wallet(stub, c.account_id)).balance_nano == ONE - 150_000_000

    k1 = key()
    first = await stub.Refund(L.RefundRequest(receipt_id=rc.receipt_id, amount_nano=50_000_000, idempotency_key=k1,
                                              reason="answer was cut off"))
    assert not first.replayed and first.refund.id.startswith("rfnd_")
    assert (first.refund.bucket, first.refund.amount_nano, first.refund.account_id) == (WALLET, 50_000_000, c.account_id)
    assert (first.refund.receipt_amount_nano, first.refund.receipt_refunded_nano) == (150_000_000, 50_000_000)
    assert first.balances.wallet.balance_nano == ONE - 100_000_000

    again = await stub.Refund(L.RefundRequest(receipt_id=rc.receipt_id, amount_nano=50_000_000, idempotency_key=k1,
                                              reason="answer was cut off"))
    assert again.replayed and again.refund.id == first.refund.id and again.refund.created_at == first.refund.created_at
    assert again.balances.wallet.balance_nano == ONE - 100_000_000
    err = await expect_error(stub.Refund(L.RefundRequest(receipt_id=rc.receipt_id, amount_nano=60_000_000,
                                                         idempotency_key=k1, reason="answer was cut off")),
                             S.ALREADY_EXISTS, "conflict")
    assert param(err) == "idempotency_key"

    rest = await stub.Refund(L.RefundRequest(receipt_id=rc.receipt_id, amount_nano=100_000_000, idempotency_key=key()))
    assert rest.refund.receipt_refunded_nano == 150_000_000 and rest.balances.wallet.balance_nano == ONE
    err = await expect_error(stub.Refund(L.RefundRequest(receipt_id=rc.receipt_id, amount_nano=1, idempotency_key=key())),
                             S.INVALID_ARGUMENT, "invalid_request")
    assert param(err) == "amount_nano" and "at most 0" in err.details()

    # The receipt shows the total; the key's spend still counts the gross charge (limits cap
    # gross spend, refunds do not reopen them).
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=rc.receipt_id))).receipt_json)
    assert (body["amount"], body["refunded"]) == ("0.150000", "0.150000")
    kb = await stub.GetKeyBalance(L.GetKeyBalanceRequest(key_id=c.key_id))
    assert kb.spent_wallet_nano == 150_000_000

    stmt = await stub.GetStatement(L.GetStatementRequest(account_id=c.account_id))
    assert [(e.kind, e.amount_nano) for e in stmt.entries] == [
        ("topup", ONE), ("capture", -150_000_000), ("refund", 50_000_000), ("refund", 100_000_000)]
    running = 0
    for e in stmt.entries:
        running += e.amount_nano
        assert e.balance_nano == running
    assert stmt.entries[-1].receipt_id == rc.receipt_id
    key_stmt = await stub.GetStatement(L.GetStatementRequest(key_id=c.key_id))
    assert [e.kind for e in key_stmt.entries] == ["capture", "refund", "refund"] and key_stmt.entries[-1].balance_nano == 0
    await audit_ok(stub)


async def test_refund_refusals_move_nothing(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    failed = await settled_receipt(stub, c.key_id, 0, status="failed")
    charged = await settled_receipt(stub, c.key_id, 1000)
    before = await wallet(stub, c.account_id)

    err = await expect_error(stub.Refund(L.RefundRequest(receipt_id=failed.receipt_id, amount_nano=1, idempotency_key=key())),
                             S.INVALID_ARGUMENT, "invalid_request")
    assert param(err) == "amount_nano" and "collected nothing" in err.details()
    err = await expect_error(stub.Refund(L.RefundRequest(receipt_id="rcpt_doesnotexist1", amount_nano=1, idempotency_key=key())),
                             S.NOT_FOUND, "not_found")
    assert param(err) == "receipt_id"
    for request, field in (
        (L.RefundRequest(receipt_id=charged.receipt_id, amount_nano=0, idempotency_key=key()), "amount_nano"),
        (L.RefundRequest(receipt_id=charged.receipt_id, amount_nano=-5, idempotency_key=key()), "amount_nano"),
        (L.RefundRequest(receipt_id=charged.receipt_id, amount_nano=1), "idempotency_key"),
        (L.RefundRequest(receipt_id=charged.receipt_id, amount_nano=1, idempotency_key=key(), reason="x" * 501), "reason"),
        (L.RefundRequest(receipt_id=charged.receipt_id, amount_nano=1001, idempotency_key=key()), "amount_nano"),
    ):
        err = await expect_error(stub.Refund(request), S.INVALID_ARGUMENT, "invalid_request")
        assert param(err) == field
    assert await wallet(stub, c.account_id) == before
    await audit_ok(stub)


async def test_adjustments_credit_debit_and_refusals(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    await stub.Hold(L.HoldRequest(request_id="req_" + secrets.token_hex(6), key_id=c.key_id, bucket=WALLET,
                                  amount_nano=400_000_000))
    k = key()
    credit = await stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=250_000_000,
                                               direction=CREDIT_DIR, reason="goodwill", idempotency_key=k))
    assert not credit.replayed and credit.adjustment.id.startswith("adj_")
    assert (credit.balances.wallet.balance_nano, credit.balances.wallet.available_nano) == (1_250_000_000, 850_000_000)
    replay = await stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=250_000_000,
                                               direction=CREDIT_DIR, reason="goodwill", idempotency_key=k))
    assert replay.replayed and replay.adjustment.id == credit.adjustment.id
    assert replay.balances.wallet.balance_nano == 1_250_000_000
    await expect_error(stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=250_000_000,
                                                   direction=DEBIT_DIR, reason="goodwill", idempotency_key=k)),
                       S.ALREADY_EXISTS, "conflict")

    # available is 0.85 (0.40 is held): a debit of 0.85 + 1 nano is refused, 0.85 is not
    err = await expect_error(stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=850_000_001,
                                                         direction=DEBIT_DIR, reason="mistaken top-up",
                                                         idempotency_key=key())),
                             S.FAILED_PRECONDITION, "insufficient_balance")
    assert param(err) == "amount_nano"
    debit = await stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=850_000_000,
                                              direction=DEBIT_DIR, reason="mistaken top-up", idempotency_key=key()))
    assert (debit.balances.wallet.balance_nano, debit.balances.wallet.held_nano, debit.balances.wallet.available_nano) == (
        400_000_000, 400_000_000, 0)

    base = dict(account_id=c.account_id, bucket=WALLET, amount_nano=1, direction=CREDIT_DIR, reason="r")
    for change, code, field in (
        ({"direction": 0}, "invalid_request", "direction"),
        ({"reason": ""}, "invalid_request", "reason"),
        ({"reason": "bad\x00"}, "invalid_request", "reason"),
        ({"amount_nano": 0}, "invalid_request", "amount_nano"),
        ({"bucket": 0}, "invalid_request", "bucket"),
        ({"account_id": "acct_nobody"}, "not_found", "account_id"),
    ):
        request = L.AdjustRequest(**{**base, **change, "idempotency_key": key()})  # type: ignore[arg-type]
        status = S.NOT_FOUND if code == "not_found" else S.INVALID_ARGUMENT
        err = await expect_error(stub.Adjust(request), status, code)
        assert param(err) == field
    await expect_error(stub.Adjust(L.AdjustRequest(**base)), S.INVALID_ARGUMENT, "invalid_request")  # no key
    assert (await wallet(stub, c.account_id)).balance_nano == 400_000_000

    stmt = await stub.GetStatement(L.GetStatementRequest(account_id=c.account_id))
    assert [(e.kind, e.amount_nano, e.balance_nano) for e in stmt.entries] == [
        ("topup", ONE, ONE), ("adjustment", 250_000_000, 1_250_000_000), ("adjustment", -850_000_000, 400_000_000)]
    await audit_ok(stub)


async def _refund_race(stubs: list, receipt_id: str, n: int, each_nano: int) -> tuple[int, dict[str, int]]:  # type: ignore[type-arg]
    async def one(i: int) -> str | None:
        try:
            await stubs[i % len(stubs)].Refund(
                L.RefundRequest(receipt_id=receipt_id, amount_nano=each_nano, idempotency_key=key()))
            return None
        except grpc.aio.AioRpcError as exc:
            return error_word(exc)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    refused: dict[str, int] = {}
    for word in results:
        if word:
            refused[word] = refused.get(word, 0) + 1
    return results.count(None), refused


async def test_fifty_concurrent_partial_refunds_never_pass_the_amount(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    rc = await settled_receipt(stub, c.key_id, 200_000_000)
    won, refused = await _refund_race([stub], rc.receipt_id, 50, 10_000_000)
    assert (won, refused) == (20, {"invalid_request": 30})
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=rc.receipt_id))).receipt_json)
    assert body["refunded"] == "0.200000"
    assert (await wallet(stub, c.account_id)).balance_nano == ONE
    await audit_ok(stub)


async def test_two_ledger_processes_racing_refunds_of_one_receipt(stub, ledger, tmp_path) -> None:
    """Two processes, two writers on the same rows: the compare-and-set write makes the
    loser re-read, so the receipt's refunds still add up to at most its amount."""
    second = await start_ledger(ledger.database_url, tmp_path / "ledger2.log")
    channel = client_channel(second.addr)
    try:
        other = ledger_pb2_grpc.LedgerServiceStub(channel)
        c = await new_customer(stub, wallet_nano=ONE)
        rc = await settled_receipt(stub, c.key_id, 300_000_000)
        won, refused = await _refund_race([stub, other], rc.receipt_id, 50, 7_000_000)
        assert (won, refused) == (42, {"invalid_request": 8})  # 42 × 0.007 = 0.294; 0.006 is left
        body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=rc.receipt_id))).receipt_json)
        assert body["refunded"] == "0.294000"
        assert (await wallet(stub, c.account_id)).balance_nano == ONE - 6_000_000
        await audit_ok(stub)
    finally:
        await channel.close()
        assert second.stop() == 0, second.log()[-3000:]


async def test_the_database_refuses_refunds_above_the_amount(stub, ledger) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    rc = await settled_receipt(stub, c.key_id, 1000)
    conn = await asyncpg.connect(ledger.database_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE receipts SET refunded_nano = amount_nano + 1 WHERE id = $1", rc.receipt_id)
    finally:
        await conn.close()
    await audit_ok(stub)
