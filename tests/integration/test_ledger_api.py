"""The ledger over gRPC against real PostgreSQL: accounts, top-ups, keys, holds, settlement,
receipts, statements, and refusals that move nothing."""

from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import grpc
import pytest

from tokenforge.v1 import ledger_pb2 as L

from .conftest import audit_ok, expect_error, new_customer

pytestmark = pytest.mark.asyncio(loop_scope="session")

WALLET, CREDIT = 1, 2
ONE = 1_000_000_000  # one unit in nano
S = grpc.StatusCode


def rid() -> str:
    return "req_" + secrets.token_hex(6)


def receipt_json(**extra: object) -> bytes:
    body = {
        "trace_id": "0" * 32,
        "route_policy": "auto",
        "requested_model": "gpt-4o-mini",
        "final_attempt": 1,
        "attempts": [{"n": 1, "channel": "cheap-a", "route": "routed", "outcome": "success", "duration_ms": 12}],
        **extra,
    }
    return json.dumps(body).encode()


async def balances(stub, account_id: str) -> L.Account:
    return await stub.GetAccount(L.GetAccountRequest(account_id=account_id))


async def test_account_topup_and_replay(stub) -> None:
    account = await stub.CreateAccount(L.CreateAccountRequest(name="acme"))
    assert account.id.startswith("acct_") and len(account.id) == 17
    assert account.balances.wallet.unit == "CNY" and account.balances.credit.unit == "CREDIT"
    req = L.TopUpRequest(account_id=account.id, bucket=WALLET, amount_nano=10 * ONE, idempotency_key=rid())
    first = await stub.TopUp(req)
    again = await stub.TopUp(req)
    assert not first.replayed and again.replayed and again.topup_id == first.topup_id
    assert again.balances.wallet.balance_nano == 10 * ONE
    # same idempotency key, different parameters
    changed = L.TopUpRequest(account_id=account.id, bucket=WALLET, amount_nano=11 * ONE, idempotency_key=req.idempotency_key)
    await expect_error(stub.TopUp(changed), S.ALREADY_EXISTS, "conflict")
    for bad, param in (
        (L.TopUpRequest(account_id=account.id, bucket=WALLET, amount_nano=0, idempotency_key=rid()), "amount_nano"),
        (L.TopUpRequest(account_id=account.id, bucket=WALLET, amount_nano=-5, idempotency_key=rid()), "amount_nano"),
        (L.TopUpRequest(account_id=account.id, bucket=0, amount_nano=5, idempotency_key=rid()), "bucket"),
        (L.TopUpRequest(account_id=account.id, bucket=7, amount_nano=5, idempotency_key=rid()), "bucket"),
        (L.TopUpRequest(account_id=account.id, bucket=WALLET, amount_nano=5, idempotency_key=""), "idempotency_key"),
    ):
        err = await expect_error(stub.TopUp(bad), S.INVALID_ARGUMENT, "invalid_request")
        assert ("tf-error-param", param) in tuple(err.trailing_metadata())
    await expect_error(
        stub.TopUp(L.TopUpRequest(account_id="acct_nope", bucket=WALLET, amount_nano=5, idempotency_key=rid())),
        S.NOT_FOUND, "not_found",
    )
    assert (await balances(stub, account.id)).balances.wallet.balance_nano == 10 * ONE


async def test_keys_are_hashed_authenticated_and_revocable(stub, ledger) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    assert c.secret.startswith("sk-tf-") and len(c.secret) > 40
    key = await stub.AuthenticateKey(L.AuthenticateKeyRequest(secret=c.secret))
    assert key.id == c.key_id and key.account_id == c.account_id and c.secret.startswith(key.prefix)
    assert key.id.startswith("key_") and len(key.id) == 16
    conn = await asyncpg.connect(ledger.database_url)
    try:
        dump = await conn.fetchval("SELECT string_agg(k::text, '') FROM keys k")
    finally:
        await conn.close()
    assert c.secret not in dump and c.secret[6:] not in dump
    await expect_error(
        stub.AuthenticateKey(L.AuthenticateKeyRequest(secret=c.secret + "x")), S.UNAUTHENTICATED, "invalid_api_key"
    )
    await expect_error(stub.AuthenticateKey(L.AuthenticateKeyRequest(secret="")), S.UNAUTHENTICATED, "invalid_api_key")
    listed = await stub.ListKeys(L.ListKeysRequest(account_id=c.account_id))
    assert [k.id for k in listed.keys] == [c.key_id]
    # a hold works, then revocation stops the next hold at once
    await stub.Hold(L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=1000))
    revoked = await stub.RevokeKey(L.RevokeKeyRequest(key_id=c.key_id))
    assert revoked.revoked
    await expect_error(stub.AuthenticateKey(L.AuthenticateKeyRequest(secret=c.secret)), S.UNAUTHENTICATED, "invalid_api_key")
    await expect_error(
        stub.Hold(L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=1000)),
        S.UNAUTHENTICATED, "invalid_api_key",
    )
    await expect_error(stub.RevokeKey(L.RevokeKeyRequest(key_id="key_nope")), S.NOT_FOUND, "not_found")
    await expect_error(
        stub.CreateKey(L.CreateKeyRequest(account_id=c.account_id, name="x", route_policy=0)),
        S.INVALID_ARGUMENT, "invalid_request",
    )
    await expect_error(
        stub.CreateKey(L.CreateKeyRequest(account_id=c.account_id, name="x", route_policy=1,
                                          limits=L.KeyLimits(wallet_daily_nano=-1))),
        S.INVALID_ARGUMENT, "invalid_request",
    )


async def test_hold_capture_release_and_receipt(stub) -> None:
    c = await new_customer(stub, wallet_nano=10 * ONE)
    r = rid()
    hold = await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=ONE // 10))
    assert hold.hold_id.startswith("hold_") and not hold.replayed and hold.expires_at.endswith("Z")
    again = await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=ONE // 10))
    assert again.replayed and again.hold_id == hold.hold_id
    await expect_error(
        stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=ONE // 5)),
        S.ALREADY_EXISTS, "conflict",
    )
    acct = await balances(stub, c.account_id)
    assert acct.balances.wallet.held_nano == ONE // 10
    assert acct.balances.wallet.available_nano == 10 * ONE - ONE // 10

    settle = L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=2_880_000,
                             status="settled", receipt_json=receipt_json())
    first = await stub.Settle(settle)
    assert (first.amount_nano, first.uncollected_nano, first.held_nano, first.released_nano) == (
        2_880_000, 0, ONE // 10, ONE // 10 - 2_880_000)
    replay = await stub.Settle(settle)
    assert replay.replayed and replay.receipt_id == first.receipt_id and replay.amount_nano == first.amount_nano
    changed = L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1, status="settled")
    await expect_error(stub.Settle(changed), S.ALREADY_EXISTS, "conflict")
    acct = await balances(stub, c.account_id)
    assert acct.balances.wallet.balance_nano == 10 * ONE - 2_880_000
    assert acct.balances.wallet.held_nano == 0

    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=first.receipt_id, key_id=c.key_id))).receipt_json)
    assert body["id"] == first.receipt_id and body["status"] == "settled"
    assert (body["amount"], body["unit"], body["bucket"]) == ("0.002880", "CNY", "wallet")
    assert (body["held"], body["released"], body["uncollected"]) == ("0.100000", "0.097120", "0")
    assert body["key"]["id"] == c.key_id and body["account_id"] == c.account_id
    assert body["requested_model"] == "gpt-4o-mini" and body["created_at"].endswith("Z")
    # release after settlement is an idempotent no-op
    rel = await stub.Release(L.ReleaseRequest(request_id=r, bucket=WALLET))
    assert rel.replayed

    kb = await stub.GetKeyBalance(L.GetKeyBalanceRequest(key_id=c.key_id))
    assert kb.spent_wallet_nano == 2_880_000 and kb.spent_credit_nano == 0 and kb.key.id == c.key_id

    # plain release, idempotent
    r2 = rid()
    await stub.Hold(L.HoldRequest(request_id=r2, key_id=c.key_id, bucket=WALLET, amount_nano=5000))
    rel = await stub.Release(L.ReleaseRequest(request_id=r2, bucket=WALLET))
    assert (rel.released_nano, rel.replayed) == (5000, False)
    rel = await stub.Release(L.ReleaseRequest(request_id=r2, bucket=WALLET))
    assert (rel.released_nano, rel.replayed) == (5000, True)
    # capture on a released hold: refused, nothing moved
    before = await balances(stub, c.account_id)
    await expect_error(
        stub.Settle(L.SettleRequest(request_id=r2, key_id=c.key_id, bucket=WALLET, rated_nano=10, status="settled")),
        S.INVALID_ARGUMENT, "invalid_request",
    )
    assert await balances(stub, c.account_id) == before
    await audit_ok(stub)


async def test_cost_above_hold_takes_available_then_uncollected(stub) -> None:
    c = await new_customer(stub, wallet_nano=1000)
    r = rid()
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=600))
    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1500,
                                            status="settled", receipt_json=receipt_json()))
    # 600 from the hold, 400 from the available balance, 500 nobody could pay
    assert (res.amount_nano, res.uncollected_nano, res.released_nano) == (1000, 500, 0)
    acct = await balances(stub, c.account_id)
    assert acct.balances.wallet.balance_nano == 0 and acct.balances.wallet.held_nano == 0
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=res.receipt_id))).receipt_json)
    assert (body["amount"], body["uncollected"]) == ("0.000001", "0.0000005")
    await audit_ok(stub)


async def test_fallback_settles_in_credit_and_releases_wallet(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE, credit_nano=ONE)
    r = rid()
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=1000))
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=CREDIT, amount_nano=2000))
    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=CREDIT, rated_nano=700,
                                            status="settled", receipt_json=receipt_json()))
    assert (res.amount_nano, res.held_nano, res.released_nano) == (700, 2000, 1300)
    acct = await balances(stub, c.account_id)
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (ONE, 0)
    assert (acct.balances.credit.balance_nano, acct.balances.credit.held_nano) == (ONE - 700, 0)
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=res.receipt_id))).receipt_json)
    assert body["bucket"] == "credit" and body["unit"] == "CREDIT"
    assert {h["bucket"]: h["state"] for h in body["holds"]} == {"wallet": "released", "credit": "captured"}
    await audit_ok(stub)


async def test_failed_request_releases_everything(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    r = rid()
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=4000))
    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=0, rated_nano=0,
                                            status="failed", receipt_json=receipt_json()))
    assert (res.amount_nano, res.held_nano, res.released_nano) == (0, 4000, 4000)
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=res.receipt_id))).receipt_json)
    assert (body["status"], body["amount"], body["bucket"], body["held"], body["released"]) == (
        "failed", "0", None, "0.000004", "0.000004")
    acct = await balances(stub, c.account_id)
    assert (acct.balances.wallet.balance_nano, acct.balances.wallet.held_nano) == (ONE, 0)
    # settling a request that never had a hold is an error
    await expect_error(
        stub.Settle(L.SettleRequest(request_id=rid(), key_id=c.key_id, bucket=0, rated_nano=0, status="failed")),
        S.NOT_FOUND, "not_found",
    )


async def test_refusals_move_nothing(stub) -> None:
    c = await new_customer(stub, wallet_nano=1000, limits=L.KeyLimits(wallet_total_nano=500))
    before = await balances(stub, c.account_id)
    cases = [
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=0), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=-1), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=0, amount_nano=1), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=9, amount_nano=1), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id="", key_id=c.key_id, bucket=WALLET, amount_nano=1), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=1, ttl_s=-1), S.INVALID_ARGUMENT, "invalid_request"),
        (L.HoldRequest(request_id=rid(), key_id="key_unknown", bucket=WALLET, amount_nano=1), S.NOT_FOUND, "not_found"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=501), S.FAILED_PRECONDITION, "key_budget_exceeded"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=CREDIT, amount_nano=1), S.FAILED_PRECONDITION, "insufficient_balance"),
        (L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=1, run_id="run_unknown"), S.NOT_FOUND, "not_found"),
    ]
    for req, status, word in cases:
        await expect_error(stub.Hold(req), status, word)
    await expect_error(stub.Release(L.ReleaseRequest(request_id=rid(), bucket=WALLET)), S.NOT_FOUND, "not_found")
    await expect_error(stub.Release(L.ReleaseRequest(request_id=rid(), bucket=0)), S.INVALID_ARGUMENT, "invalid_request")
    r = rid()
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=100))
    held = await balances(stub, c.account_id)
    for req, status, word in [
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=-1, status="settled"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1, status="bogus"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=0, rated_nano=1, status="settled"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=CREDIT, rated_nano=1, status="settled"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1, status="failed"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1, status="settled", receipt_json=b"[1]"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1, status="settled", receipt_json=b"{nope"), S.INVALID_ARGUMENT, "invalid_request"),
        (L.SettleRequest(request_id=r, key_id="key_unknown", bucket=WALLET, rated_nano=1, status="settled"), S.NOT_FOUND, "not_found"),
    ]:
        await expect_error(stub.Settle(req), status, word)
    assert await balances(stub, c.account_id) == held
    await stub.Release(L.ReleaseRequest(request_id=r, bucket=WALLET))
    assert await balances(stub, c.account_id) == before
    await expect_error(stub.GetAccount(L.GetAccountRequest(account_id="acct_nope")), S.NOT_FOUND, "not_found")
    await expect_error(stub.GetReceipt(L.GetReceiptRequest(receipt_id="rcpt_nope")), S.NOT_FOUND, "not_found")
    await expect_error(stub.GetKeyBalance(L.GetKeyBalanceRequest(key_id="key_nope")), S.NOT_FOUND, "not_found")
    await audit_ok(stub)


async def test_receipts_are_private_to_their_key_and_paginated(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    other = await new_customer(stub, wallet_nano=ONE)
    ids = []
    for i in range(5):
        r = rid()
        await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=1000))
        res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=10 + i,
                                                status="settled", receipt_json=receipt_json()))
        ids.append(res.receipt_id)
    await expect_error(
        stub.GetReceipt(L.GetReceiptRequest(receipt_id=ids[0], key_id=other.key_id)), S.NOT_FOUND, "not_found"
    )
    page1 = await stub.ListReceipts(L.ListReceiptsRequest(key_id=c.key_id, limit=2))
    assert [x.id for x in page1.receipts] == ids[::-1][:2] and page1.has_more and page1.last_id == ids[3]
    page2 = await stub.ListReceipts(L.ListReceiptsRequest(key_id=c.key_id, limit=2, after=page1.last_id))
    page3 = await stub.ListReceipts(L.ListReceiptsRequest(key_id=c.key_id, limit=2, after=page2.last_id))
    assert [x.id for x in [*page2.receipts, *page3.receipts]] == ids[::-1][2:] and not page3.has_more
    by_account = await stub.ListReceipts(L.ListReceiptsRequest(account_id=c.account_id, limit=500))
    assert [x.id for x in by_account.receipts] == ids[::-1]
    assert not (await stub.ListReceipts(L.ListReceiptsRequest(key_id=other.key_id))).receipts

    stmt = await stub.GetStatement(L.GetStatementRequest(account_id=c.account_id, limit=3))
    assert [e.kind for e in stmt.entries] == ["topup", "capture", "capture"] and stmt.has_more
    rest = await stub.GetStatement(L.GetStatementRequest(account_id=c.account_id, after=stmt.last_id))
    entries = list(stmt.entries) + list(rest.entries)
    running = 0
    for e in entries:
        running += e.amount_nano
        assert e.balance_nano == running
    assert running == ONE - sum(10 + i for i in range(5))
    key_stmt = await stub.GetStatement(L.GetStatementRequest(key_id=c.key_id))
    assert [e.amount_nano for e in key_stmt.entries] == [-(10 + i) for i in range(5)]
    assert key_stmt.entries[-1].balance_nano == -sum(10 + i for i in range(5))


async def test_reaper_releases_expired_holds(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    r = rid()
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=1234, ttl_s=1))
    deadline = asyncio.get_running_loop().time() + 10
    while (await balances(stub, c.account_id)).balances.wallet.held_nano:
        assert asyncio.get_running_loop().time() < deadline, "hold not released by the reaper"
        await asyncio.sleep(0.1)
    rel = await stub.Release(L.ReleaseRequest(request_id=r, bucket=WALLET))
    assert (rel.released_nano, rel.replayed) == (1234, True)
    # settling after expiry still charges, from the available balance
    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1000,
                                            status="settled", receipt_json=receipt_json()))
    assert (res.amount_nano, res.uncollected_nano) == (1000, 0)
    await audit_ok(stub)


async def test_a_request_never_settled_gets_the_receipt_drafted_with_its_hold(stub) -> None:
    """The router died after holding: when the hold expires, the receipt it drafted at
    admission is stored (failed, nothing charged, saying why); a Settle that comes later (the
    router was only slow) replaces it under the same id; one receipt per request throughout."""
    c = await new_customer(stub, wallet_nano=ONE)
    r, chosen = rid(), "rcpt_" + secrets.token_hex(12)
    draft = {"id": chosen, "trace_id": "f" * 32, "request_id": r, "route_policy": "routed",
             "requested_model": "gpt-4o-mini", "stream": True, "status": "failed", "final_attempt": 0,
             "attempts": []}
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=5000, ttl_s=1,
                                  unsettled_receipt_json=json.dumps(draft).encode()))
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        listed = await stub.ListReceipts(L.ListReceiptsRequest(key_id=c.key_id, limit=10))
        if listed.receipts:
            break
        assert asyncio.get_running_loop().time() < deadline, "no receipt after the hold expired"
        await asyncio.sleep(0.1)  # polling for the reaper's work, bounded
    assert [x.id for x in listed.receipts] == [chosen]
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=chosen, key_id=c.key_id))).receipt_json)
    assert (body["status"], body["amount"], body["held"], body["released"]) == ("failed", "0", "0.000005", "0.000005")
    assert (body["requested_model"], body["trace_id"], body["attempts"]) == ("gpt-4o-mini", "f" * 32, [])
    assert body["error"]["code"] == "unsettled" and "f" * 32 in body["error"]["message"]
    assert body["holds"] == [{"bucket": "wallet", "unit": "CNY", "held": "0.000005", "captured": "0",
                              "released": "0.000005", "state": "expired"}]
    assert (await balances(stub, c.account_id)).balances.wallet.balance_nano == ONE

    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1200,
                                            status="settled", receipt_json=receipt_json(), receipt_id=chosen))
    assert (res.receipt_id, res.amount_nano, res.uncollected_nano, res.replayed) == (chosen, 1200, 0, False)
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=chosen, key_id=c.key_id))).receipt_json)
    assert (body["status"], body["amount"], len(body["attempts"])) == ("settled", "0.0000012", 1)
    assert "error" not in body
    listed = await stub.ListReceipts(L.ListReceiptsRequest(key_id=c.key_id, limit=10))
    assert [x.id for x in listed.receipts] == [chosen]
    again = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=1200,
                                              status="settled", receipt_json=receipt_json(), receipt_id=chosen))
    assert again.replayed and again.amount_nano == 1200
    assert (await balances(stub, c.account_id)).balances.wallet.balance_nano == ONE - 1200
    await audit_ok(stub)


@pytest.mark.parametrize("draft", [b"[1]", b"{", b'{"id": 5}', b'{"id": "bogus id"}', b'{"a": "\\u0000"}',
                                   b'{"a": "' + b"x" * 17000 + b'"}', b'{"a": ' + b"[" * 300 + b"]" * 300 + b"}"])
async def test_a_bad_unsettled_receipt_is_refused_with_its_hold(stub, draft: bytes) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    err = await expect_error(
        stub.Hold(L.HoldRequest(request_id=rid(), key_id=c.key_id, bucket=WALLET, amount_nano=10,
                                unsettled_receipt_json=draft)),
        S.INVALID_ARGUMENT, "invalid_request",
    )
    assert "unsettled_receipt_json" in err.details(), err.details()
    assert (await balances(stub, c.account_id)).balances.wallet.held_nano == 0


async def test_receipt_id_chosen_by_the_router(stub) -> None:
    c = await new_customer(stub, wallet_nano=ONE)
    r, chosen = rid(), "rcpt_" + secrets.token_hex(12)
    await stub.Hold(L.HoldRequest(request_id=r, key_id=c.key_id, bucket=WALLET, amount_nano=1000))
    await expect_error(
        stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=10,
                                    status="settled", receipt_id="bogus id")),
        S.INVALID_ARGUMENT, "invalid_request",
    )
    res = await stub.Settle(L.SettleRequest(request_id=r, key_id=c.key_id, bucket=WALLET, rated_nano=10,
                                            status="settled", receipt_json=receipt_json(), receipt_id=chosen))
    assert res.receipt_id == chosen
    body = json.loads((await stub.GetReceipt(L.GetReceiptRequest(receipt_id=chosen, key_id=c.key_id))).receipt_json)
    assert body["id"] == chosen and body["amount"] == "0.00000001"
