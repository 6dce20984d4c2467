"""Refunds and adjustments under attack, over gRPC against real PostgreSQL: text the database
cannot store is the caller's mistake (never a 503 that invites endless retries, never a 500),
and a mix of holds, settles, settle replays, refunds, credits and debits on a few accounts at
once (large enough for the writer to split its batches) keeps every invariant: the audit, no
available balance below zero, and every statement row's running balance equal to the sum of
the postings up to it."""

from __future__ import annotations

import asyncio
import random
import secrets

import asyncpg
import grpc
import pytest

from tokenforge.v1 import ledger_pb2 as L

from .conftest import audit_ok, expect_error, new_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET, CREDIT = 1, 2
ONE = 1_000_000_000
S = grpc.StatusCode
CREDIT_DIR, DEBIT_DIR = L.ADJUSTMENT_DIRECTION_CREDIT, L.ADJUSTMENT_DIRECTION_DEBIT


def param(exc: grpc.aio.AioRpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get("tf-error-param")  # type: ignore[return-value]


async def settled(stub, key_id: str, bucket: int, rated_nano: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    rid = "req_" + secrets.token_hex(6)
    await stub.Hold(L.HoldRequest(request_id=rid, key_id=key_id, bucket=bucket, amount_nano=rated_nano))
    s = await stub.Settle(L.SettleRequest(request_id=rid, key_id=key_id, bucket=bucket, rated_nano=rated_nano,
                                          status="settled", receipt_json=b"{}"))
    return rid, s.receipt_id


async def test_nul_in_idempotency_keys_and_ids_is_the_callers_mistake(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    _, receipt_id = await settled(stub, c.key_id, WALLET, 1_000_000)
    for call in (
        stub.Refund(L.RefundRequest(receipt_id=receipt_id, amount_nano=1, idempotency_key="k\x00")),
        stub.Adjust(L.AdjustRequest(account_id=c.account_id, bucket=WALLET, amount_nano=1, direction=CREDIT_DIR,
                                    reason="r", idempotency_key="k\x00")),
        stub.TopUp(L.TopUpRequest(account_id=c.account_id, bucket=WALLET, amount_nano=1, idempotency_key="k\x00")),
    ):
        err = await expect_error(call, S.INVALID_ARGUMENT, "invalid_request")
        assert param(err) == "idempotency_key"
    err = await expect_error(stub.Refund(L.RefundRequest(receipt_id="rcpt_a\x00bcdefgh", amount_nano=1,
                                                         idempotency_key=secrets.token_hex(6))),
                             S.NOT_FOUND, "not_found")
    assert param(err) == "receipt_id"
    err = await expect_error(stub.Adjust(L.AdjustRequest(account_id="acct_\x00", bucket=WALLET, amount_nano=1,
                                                         direction=CREDIT_DIR, reason="r",
                                                         idempotency_key=secrets.token_hex(6))),
                             S.NOT_FOUND, "not_found")
    assert param(err) == "account_id"
    account = await stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))
    assert account.balances.wallet.balance_nano == ONE - 1_000_000
    await audit_ok(stub)


async def test_refunds_adjustments_holds_and_replays_at_once_keep_statements_and_audit(stub, ledger) -> None:
    rng = random.Random(20261203)
    customers = [await new_customer(stub, wallet_nano=ONE, credit_nano=ONE) for _ in range(4)]
    receipts = []  # (customer, request id, bucket, receipt id), each collected 40_000_000
    for c in customers:
        for bucket in (WALLET, CREDIT):
            for _ in range(3):
                rid, receipt_id = await settled(stub, c.key_id, bucket, 40_000_000)
                receipts.append((c, rid, bucket, receipt_id))

    async def one() -> None:
        kind = rng.choice(["hold_settle", "refund", "debit", "credit", "settle_replay"])
        c, bucket = rng.choice(customers), rng.choice((WALLET, CREDIT))
        try:
            if kind == "hold_settle":
                rid, amount = "req_" + secrets.token_hex(6), rng.randint(1, 200_000_000)
                await stub.Hold(L.HoldRequest(request_id=rid, key_id=c.key_id, bucket=bucket, amount_nano=amount))
                await stub.Settle(L.SettleRequest(
                    request_id=rid, key_id=c.key_id, bucket=bucket, rated_nano=rng.randint(0, 2 * amount),
                    status=rng.choice(["settled", "partial", "cancelled"]), receipt_json=b"{}"))
            elif kind == "refund":
                _, _, _, receipt_id = rng.choice(receipts)
                await stub.Refund(L.RefundRequest(receipt_id=receipt_id, amount_nano=rng.randint(1, 15_000_000),
                                                  idempotency_key=secrets.token_hex(8)))
            elif kind == "settle_replay":
                rc, rid, rb, receipt_id = rng.choice(receipts)
                again = await stub.Settle(L.SettleRequest(request_id=rid, key_id=rc.key_id, bucket=rb,
                                                          rated_nano=40_000_000, status="settled", receipt_json=b"{}"))
                assert again.replayed and again.receipt_id == receipt_id
            else:
                await stub.Adjust(L.AdjustRequest(
                    account_id=c.account_id, bucket=bucket, amount_nano=rng.randint(1, 300_000_000),
                    direction=DEBIT_DIR if kind == "debit" else CREDIT_DIR, reason="r",
                    idempotency_key=secrets.token_hex(8)))
        except grpc.aio.AioRpcError as exc:
            # Refusals only: short of balance, or more than a receipt has left to refund.
            assert exc.code() in (S.FAILED_PRECONDITION, S.INVALID_ARGUMENT), (kind, exc.code(), exc.details())

    for _ in range(3):
        await asyncio.gather(*(one() for _ in range(300)))
    await audit_ok(stub)

    conn = await asyncpg.connect(ledger.database_url)
    try:
        for c in customers:
            for bucket, name in ((WALLET, "wallet"), (CREDIT, "credit")):
                row = await conn.fetchrow("SELECT balance_nano, held_nano FROM buckets WHERE account_id = $1 "
                                          "AND bucket = $2", c.account_id, name)
                assert 0 <= row["held_nano"] <= row["balance_nano"]
                for who in ({"account_id": c.account_id}, {"key_id": c.key_id}):
                    entries, after = [], ""
                    for _page in range(100):
                        st = await stub.GetStatement(L.GetStatementRequest(bucket=bucket, limit=100, after=after, **who))
                        entries += list(st.entries)
                        if not st.has_more:
                            break
                        after = st.last_id
                    running = 0
                    for e in entries:
                        running += e.amount_nano
                        assert e.balance_nano == running, (who, name, e)
                    if "account_id" in who:
                        assert running == row["balance_nano"]
    finally:
        await conn.close()
    for _, _, _, receipt_id in receipts:
        body = await stub.GetReceipt(L.GetReceiptRequest(receipt_id=receipt_id))
        assert body.receipt_json
