"""The ledger's rules without a database: a Book built by hand, operations applied to it."""

from __future__ import annotations

import datetime as dt
import itertools
import json

import pytest

from tokenforge.errors import TFError
from tokenforge.ledger.core import (
    AdjustOp,
    AdjustResult,
    Book,
    BucketRow,
    CloseRunOp,
    CreateRunOp,
    ExpireHoldOp,
    HoldOp,
    KeyLimitsNano,
    KeyRow,
    Policy,
    RefundOp,
    ReleaseOp,
    SettleOp,
    TopUpOp,
    new_id,
    rfc3339,
)
from tokenforge.money import Bucket

W, C = Bucket.WALLET, Bucket.CREDIT
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
ACCT = "acct_a"
KEY = "key_a"


def book(wallet: int = 1000, credit: int = 0, limits: KeyLimitsNano | None = None) -> Book:
    counter = itertools.count(1)
    b = Book(now=NOW, policy=Policy(600, 3600, 86400), id_factory=lambda p: f"{p}_{next(counter)}")
    b.buckets[(ACCT, W)] = BucketRow(ACCT, W, wallet, 0)
    b.buckets[(ACCT, C)] = BucketRow(ACCT, C, credit, 0)
    b.keys[KEY] = KeyRow(KEY, ACCT, "k", False, limits or KeyLimitsNano(), {W: 0, C: 0}, {W: 0, C: 0}, None, {W: 0, C: 0})
    return b


def conserved(b: Book, initial: int, bucket: Bucket = W) -> None:
    """Postings balance; kept figures match them; money in = balance + charges.

    `initial` is the balance the book started with (set by hand, without a posting).
    """
    sums: dict[str, int] = {}
    for t in b.transfers:
        if t.bucket is bucket:
            sums[t.src] = sums.get(t.src, 0) - t.amount_nano
            sums[t.dst] = sums.get(t.dst, 0) + t.amount_nano
    assert sum(sums.values()) == 0
    row = b.buckets[(ACCT, bucket)]
    topped_up = -sums.get("funding", 0)
    charged = sum(r.amount_nano for r in b.new_receipts if r.bucket is bucket)
    uncollected = sum(r.uncollected_nano for r in b.new_receipts if r.bucket is bucket)
    assert sums.get("customer", 0) == row.available_nano - initial
    assert sums.get("holds", 0) == row.held_nano
    assert sums.get("revenue", 0) == charged + uncollected
    assert -sums.get("uncollected", 0) == uncollected
    assert initial + topped_up == row.balance_nano + charged


def test_ids_and_times() -> None:
    assert new_id("hold").startswith("hold_") and len(new_id("hold")) == 17
    assert new_id("x") != new_id("x")
    assert rfc3339(NOW) == "2030-01-01T12:00:00.000Z"


def test_hold_checks_then_mutates() -> None:
    b = book(wallet=1000, limits=KeyLimitsNano(wallet_total=700))
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "r1", KEY, W, 701))
    assert e.value.code == "key_budget_exceeded"
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "r1", KEY, C, 1))
    assert e.value.code == "insufficient_balance"
    assert b.transfers == [] and not b.holds
    res = b.apply(HoldOp(ACCT, "r1", KEY, W, 600, ttl_s=30))
    assert res.expires_at == NOW + dt.timedelta(seconds=30) and not res.replayed
    assert b.buckets[(ACCT, W)].held_nano == 600 and b.keys[KEY].held[W] == 600
    assert b.apply(HoldOp(ACCT, "r1", KEY, W, 600)).replayed
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "r1", KEY, W, 601))
    assert e.value.code == "conflict"
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "r2", KEY, W, 101))  # 600 held + 101 > cap 700
    assert e.value.code == "key_budget_exceeded"


@pytest.mark.parametrize("amount", [0, -1])
def test_hold_amount_must_be_positive(amount: int) -> None:
    with pytest.raises(TFError) as e:
        book().apply(HoldOp(ACCT, "r", KEY, W, amount))
    assert (e.value.code, e.value.param) == ("invalid_request", "amount_nano")


def test_ttl_default_and_cap() -> None:
    b = book()
    assert b.apply(HoldOp(ACCT, "a", KEY, W, 1)).expires_at == NOW + dt.timedelta(seconds=600)
    assert b.apply(HoldOp(ACCT, "b", KEY, W, 1, ttl_s=10**6)).expires_at == NOW + dt.timedelta(seconds=3600)


def test_revoked_key_cannot_hold() -> None:
    b = book()
    b.keys[KEY].revoked = True
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "r", KEY, W, 1))
    assert e.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("wallet", "hold", "rated", "amount", "uncollected", "released"),
    [
        (1000, 600, 200, 200, 0, 400),  # under the hold
        (1000, 600, 600, 600, 0, 0),  # exactly the hold
        (1000, 600, 900, 900, 0, 0),  # above: the rest from available
        (1000, 600, 1500, 1000, 500, 0),  # above what the bucket has: uncollected
        (1000, 600, 0, 0, 0, 600),  # an explicit zero
    ],
)
def test_settle_amounts(wallet: int, hold: int, rated: int, amount: int, uncollected: int, released: int) -> None:
    b = book(wallet=wallet)
    b.apply(HoldOp(ACCT, "r", KEY, W, hold))
    res = b.apply(SettleOp(ACCT, "r", KEY, W, rated, "settled", {"requested_model": "m"}))
    assert (res.amount_nano, res.uncollected_nano, res.released_nano, res.held_nano) == (amount, uncollected, released, hold)
    row = b.buckets[(ACCT, W)]
    assert row.balance_nano == wallet - amount and row.held_nano == 0 and row.balance_nano >= 0
    assert b.keys[KEY].spent[W] == amount and b.keys[KEY].held[W] == 0
    body = json.loads(b.new_receipts[0].body_json)
    assert body["requested_model"] == "m" and body["key"] == {"id": KEY, "name": "k"}
    assert body["bucket"] == ("wallet" if rated else None)
    conserved(b, wallet)
    replay = b.apply(SettleOp(ACCT, "r", KEY, W, rated, "settled", {}))
    assert replay.replayed and replay.receipt_id == res.receipt_id and len(b.new_receipts) == 1


def test_overage_respects_key_cap() -> None:
    b = book(wallet=1000, limits=KeyLimitsNano(wallet_total=700))
    b.apply(HoldOp(ACCT, "r", KEY, W, 600))
    res = b.apply(SettleOp(ACCT, "r", KEY, W, 900, "settled", {}))
    assert (res.amount_nano, res.uncollected_nano) == (700, 200)
    assert b.keys[KEY].spent[W] == 700


def test_settle_releases_the_other_bucket_and_failed_settles() -> None:
    b = book(wallet=1000, credit=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 300))
    b.apply(HoldOp(ACCT, "r", KEY, C, 400))
    res = b.apply(SettleOp(ACCT, "r", KEY, C, 100, "settled", {}))
    assert (res.amount_nano, res.released_nano) == (100, 300)
    assert b.buckets[(ACCT, W)].held_nano == 0 and b.buckets[(ACCT, C)].held_nano == 0
    assert b.holds[("r", W)].state == "released" and b.holds[("r", C)].state == "captured"

    b.apply(HoldOp(ACCT, "f", KEY, W, 50))
    failed = b.apply(SettleOp(ACCT, "f", KEY, None, 0, "failed", {}))
    assert (failed.amount_nano, failed.held_nano, failed.released_nano) == (0, 50, 50)
    body = json.loads(b.new_receipts[-1].body_json)
    assert body["bucket"] is None and body["unit"] == "CNY" and body["status"] == "failed"


@pytest.mark.parametrize(
    ("bucket", "rated", "status", "word"),
    [
        (None, 5, "settled", "invalid_request"),
        (W, 5, "failed", "invalid_request"),
        (W, -1, "settled", "invalid_request"),
        (W, 1, "paid", "invalid_request"),
        (C, 1, "settled", "invalid_request"),  # no hold in credit
    ],
)
def test_settle_refusals_move_nothing(bucket, rated, status, word) -> None:  # type: ignore[no-untyped-def]
    b = book()
    b.apply(HoldOp(ACCT, "r", KEY, W, 100))
    before = (b.buckets[(ACCT, W)].balance_nano, b.buckets[(ACCT, W)].held_nano, len(b.transfers))
    with pytest.raises(TFError) as e:
        b.apply(SettleOp(ACCT, "r", KEY, bucket, rated, status, {}))
    assert e.value.code == word
    assert (b.buckets[(ACCT, W)].balance_nano, b.buckets[(ACCT, W)].held_nano, len(b.transfers)) == before


def test_settle_without_hold_and_on_released_hold() -> None:
    b = book()
    with pytest.raises(TFError) as e:
        b.apply(SettleOp(ACCT, "nope", KEY, None, 0, "failed", {}))
    assert e.value.code == "not_found"
    b.apply(HoldOp(ACCT, "r", KEY, W, 100))
    assert b.apply(ReleaseOp(ACCT, "r", W)).released_nano == 100
    assert b.apply(ReleaseOp(ACCT, "r", W)).replayed
    with pytest.raises(TFError) as e:
        b.apply(SettleOp(ACCT, "r", KEY, W, 10, "settled", {}))
    assert e.value.code == "invalid_request"


def test_expiry_then_late_settlement_charges_available() -> None:
    b = book(wallet=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 100, ttl_s=5))
    assert b.apply(ExpireHoldOp(ACCT, "r", W)) is None  # not yet
    b.now = NOW + dt.timedelta(seconds=5)
    assert b.apply(ExpireHoldOp(ACCT, "r", W)).released_nano == 100
    assert b.buckets[(ACCT, W)].held_nano == 0
    res = b.apply(SettleOp(ACCT, "r", KEY, W, 80, "settled", {}))
    assert (res.amount_nano, res.uncollected_nano) == (80, 0)
    assert b.transfers[-1].kind == "capture" and b.transfers[-1].src == "customer"


DRAFT = json.dumps({
    "id": "rcpt_0123456789abcdef01234567", "trace_id": "ab" * 16, "request_id": "r",
    "key": {"id": KEY, "name": "k"}, "route_policy": "auto", "requested_model": "gpt-4o-mini",
    "run": {"id": "ignored", "step": "plan"}, "stream": True, "status": "failed",
    "final_attempt": 0, "attempts": [], "usage": None, "price": None,
    "fallback": {"used": False, "primary_channel": "cheap-a", "primary_unit": "CNY",
                 "primary_price_amount": None, "extra_cost": None},
})


def test_a_request_never_settled_gets_a_failed_receipt_when_its_last_hold_expires() -> None:
    """A router killed mid-request never settles: when the request's last hold expires, the
    receipt it drafted at admission is written (failed, nothing charged, saying why)."""
    b = book(wallet=1000, credit=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 100, ttl_s=5, unsettled_receipt=DRAFT))
    b.now = NOW + dt.timedelta(seconds=1)
    b.apply(HoldOp(ACCT, "r", KEY, C, 300, ttl_s=9, unsettled_receipt=DRAFT))  # an auto fallback
    b.now = NOW + dt.timedelta(seconds=5)
    assert b.apply(ExpireHoldOp(ACCT, "r", W, DRAFT)).released_nano == 100
    assert "r" not in b.receipts  # the credit hold is still active: its expiry writes it
    b.now = NOW + dt.timedelta(seconds=10)
    assert b.apply(ExpireHoldOp(ACCT, "r", C, DRAFT)).released_nano == 300
    receipt = b.receipts["r"]
    assert (receipt.id, receipt.status, receipt.unsettled) == ("rcpt_0123456789abcdef01234567", "failed", True)
    assert (receipt.amount_nano, receipt.rated_nano, receipt.held_nano, receipt.released_nano) == (0, 0, 300, 300)
    body = json.loads(receipt.body_json)
    assert body["status"] == "failed" and body["attempts"] == [] and body["final_attempt"] == 0
    assert (body["requested_model"], body["route_policy"], body["trace_id"]) == ("gpt-4o-mini", "auto", "ab" * 16)
    assert (body["amount"], body["bucket"], body["unit"], body["run"]) == ("0", None, "CREDIT", None)
    assert body["error"]["code"] == "unsettled"
    assert "2030-01-01T12:00:10.000Z" in body["error"]["message"] and "ab" * 16 in body["error"]["message"]
    assert [h["state"] for h in body["holds"]] == ["expired", "expired"]
    assert b.transfers[-1].kind == "expiry" and b.transfers[-1].receipt_id == receipt.id
    assert b.apply(ExpireHoldOp(ACCT, "r", C, DRAFT)) is None  # once
    assert [r.request_id for r in b.new_receipts] == ["r"]
    conserved(b, 1000, W)
    conserved(b, 1000, C)


def test_no_unsettled_receipt_for_a_settled_request_or_from_a_bad_draft() -> None:
    b = book(wallet=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 100, ttl_s=5, unsettled_receipt=DRAFT))
    b.apply(SettleOp(ACCT, "r", KEY, W, 40, "settled", {}))
    b.now = NOW + dt.timedelta(seconds=5)
    assert b.apply(ExpireHoldOp(ACCT, "r", W, DRAFT)) is None  # captured: nothing to expire
    assert len(b.new_receipts) == 1 and not b.receipts["r"].unsettled
    # a draft that is not an object (or absent) still gives a receipt, with the ledger's own id
    for rid, draft in (("x", "[1]"), ("y", None), ("z", '{"id": "not-a-receipt-id"}')):
        b.apply(HoldOp(ACCT, rid, KEY, W, 10, ttl_s=5, unsettled_receipt=draft))
    b.now = NOW + dt.timedelta(seconds=10)
    for rid in ("x", "y", "z"):
        b.apply(ExpireHoldOp(ACCT, rid, W, None if rid == "y" else b.holds[(rid, W)].unsettled_receipt))
        receipt = b.receipts[rid]
        assert receipt.unsettled and receipt.id.startswith("rcpt_") and receipt.id != "not-a-receipt-id"
        assert json.loads(receipt.body_json)["key"] == {"id": KEY, "name": "k"}
    conserved(b, 1000)


def test_a_late_settlement_replaces_the_unsettled_receipt() -> None:
    """The router was only slow: its Settle after the expiry replaces the `failed` receipt
    (same id) and charges from the available balance; asked again, it is a replay."""
    b = book(wallet=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 100, ttl_s=5, unsettled_receipt=DRAFT))
    b.now = NOW + dt.timedelta(seconds=5)
    b.apply(ExpireHoldOp(ACCT, "r", W, DRAFT))
    first = b.receipts["r"]
    b.new_receipts.clear()  # that batch was written
    settle = SettleOp(ACCT, "r", KEY, W, 80, "settled", {"attempts": [{"n": 1}], "final_attempt": 1},
                      receipt_id="rcpt_0123456789abcdef01234567")
    res = b.apply(settle)
    assert (res.receipt_id, res.amount_nano, res.uncollected_nano, res.replayed) == (first.id, 80, 0, False)
    late = b.receipts["r"]
    assert late.replaces and not late.unsettled and late.status == "settled"
    assert b.new_receipts == [late]  # the store updates the row in place
    body = json.loads(late.body_json)
    assert body["amount"] == "0.00000008" and "error" not in body and body["attempts"] == [{"n": 1}]
    assert b.apply(settle).replayed
    with pytest.raises(TFError) as e:
        b.apply(SettleOp(ACCT, "r", KEY, W, 81, "settled", {}))
    assert e.value.code == "conflict"
    assert b.buckets[(ACCT, W)].balance_nano == 920


def test_an_expiry_and_a_late_settlement_in_one_batch_write_one_receipt() -> None:
    """The reaper's expiry and the late Settle met in one batch: the receipt the expiry wrote
    is not stored yet, so the settlement's is inserted in its place (an UPDATE would miss it)."""
    b = book(wallet=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 100, ttl_s=5, unsettled_receipt=DRAFT))
    b.now = NOW + dt.timedelta(seconds=5)
    b.apply(ExpireHoldOp(ACCT, "r", W, DRAFT))
    res = b.apply(SettleOp(ACCT, "r", KEY, W, 80, "settled", {}))
    assert res.receipt_id == "rcpt_0123456789abcdef01234567" and res.amount_nano == 80
    [only] = b.new_receipts
    assert (only.status, only.unsettled, only.replaces, only.amount_nano) == ("settled", False, False, 80)
    conserved(b, 1000)


def test_daily_cap_resets_at_utc_midnight() -> None:
    b = book(wallet=10_000, limits=KeyLimitsNano(wallet_daily=500))
    b.apply(HoldOp(ACCT, "a", KEY, W, 500))
    b.apply(SettleOp(ACCT, "a", KEY, W, 500, "settled", {}))
    with pytest.raises(TFError):
        b.apply(HoldOp(ACCT, "b", KEY, W, 1))
    b.now = dt.datetime(2030, 1, 2, 0, 0, 1, tzinfo=dt.UTC)
    assert not b.apply(HoldOp(ACCT, "b", KEY, W, 500)).replayed


def test_topup_idempotency() -> None:
    b = book(wallet=0)
    first = b.apply(TopUpOp(ACCT, W, 100, "t"))
    assert b.apply(TopUpOp(ACCT, W, 100, "t")).replayed and b.buckets[(ACCT, W)].balance_nano == 100
    assert not first.replayed
    with pytest.raises(TFError) as e:
        b.apply(TopUpOp(ACCT, W, 101, "t"))
    assert e.value.code == "conflict"
    with pytest.raises(TFError) as e:
        b.apply(TopUpOp(ACCT, W, 0, "u"))
    assert e.value.code == "invalid_request"


def test_run_budget_is_held_drawn_and_released() -> None:
    b = book(wallet=1000)
    with pytest.raises(TFError) as e:
        b.apply(CreateRunOp(ACCT, KEY, "big", 1001, 0, None, 0))
    assert e.value.code == "insufficient_balance"
    run = b.apply(CreateRunOp(ACCT, KEY, "r", 500, 0, None, 0))
    assert b.buckets[(ACCT, W)].held_nano == 500
    b.apply(HoldOp(ACCT, "q1", KEY, W, 300, run_id=run.run_id))
    with pytest.raises(TFError) as e:
        b.apply(HoldOp(ACCT, "q2", KEY, W, 201, run_id=run.run_id))
    assert e.value.code == "run_budget_exceeded"
    assert b.buckets[(ACCT, W)].held_nano == 500  # drawing moves nothing out of "holds"
    res = b.apply(SettleOp(ACCT, "q1", KEY, W, 100, "settled", {}))
    assert res.amount_nano == 100 and b.runs[run.run_id].reserved[W] == 400
    closed = b.apply(CloseRunOp(ACCT, run.run_id, KEY))
    assert closed.status == "closed"
    assert b.buckets[(ACCT, W)].held_nano == 0 and b.buckets[(ACCT, W)].balance_nano == 900
    assert b.keys[KEY].held[W] == 0 and b.keys[KEY].spent[W] == 100
    conserved(b, 1000)


# -- refunds and adjustments ---------------------------------------------------------------------


def settled_book(wallet: int = 1000, rated: int = 600) -> tuple[Book, str]:
    """A book with one settled receipt of `rated`, also known by id (as a refund loads it)."""
    b = book(wallet=wallet)
    b.apply(HoldOp(ACCT, "r", KEY, W, 600))
    res = b.apply(SettleOp(ACCT, "r", KEY, W, rated, "settled", {}))
    b.receipts_by_id[res.receipt_id] = b.receipts["r"]
    return b, res.receipt_id


def test_refund_partial_then_rest_then_nothing_left() -> None:
    b, rid = settled_book(rated=600)
    first = b.apply(RefundOp(ACCT, rid, 250, "k1", "wrong answer"))
    assert (first.receipt_amount_nano, first.receipt_refunded_nano, first.replayed) == (600, 250, False)
    assert b.buckets[(ACCT, W)].balance_nano == 1000 - 600 + 250
    t = b.transfers[-1]
    assert (t.kind, t.src, t.dst, t.amount_nano, t.receipt_id, t.ref, t.key_id) == (
        "refund", "revenue", "customer", 250, rid, first.refund.id, KEY)
    assert b.keys[KEY].spent[W] == 600  # limits cap gross spend: a refund does not reopen them
    with pytest.raises(TFError) as e:
        b.apply(RefundOp(ACCT, rid, 351, "k2"))
    assert (e.value.code, e.value.param) == ("invalid_request", "amount_nano")
    assert "at most 0.00000035 can still be refunded" in e.value.message
    b.apply(RefundOp(ACCT, rid, 350, "k3"))
    assert b.receipts_by_id[rid].refunded_nano == 600 and b.buckets[(ACCT, W)].balance_nano == 1000
    with pytest.raises(TFError) as e:
        b.apply(RefundOp(ACCT, rid, 1, "k4"))
    assert e.value.code == "invalid_request"
    assert [r.amount_nano for r in b.new_refunds] == [250, 350]


def test_refund_replay_conflict_and_refusals_move_nothing() -> None:
    b, rid = settled_book()
    b.apply(RefundOp(ACCT, rid, 100, "k1"))
    n = len(b.transfers)
    again = b.apply(RefundOp(ACCT, rid, 100, "k1"))
    assert again.replayed and again.receipt_refunded_nano == 100 and len(b.transfers) == n
    for op in (RefundOp(ACCT, rid, 101, "k1"), RefundOp(ACCT, rid, 100, "k1", "other reason")):
        with pytest.raises(TFError) as e:
            b.apply(op)
        assert (e.value.code, e.value.param) == ("conflict", "idempotency_key")
    with pytest.raises(TFError) as e:
        b.apply(RefundOp(ACCT, "rcpt_unknown", 1, "k9"))
    assert (e.value.code, e.value.param) == ("not_found", "receipt_id")
    for op, param in ((RefundOp(ACCT, rid, 0, "k9"), "amount_nano"), (RefundOp(ACCT, rid, 1, ""), "idempotency_key"),
                      (RefundOp(ACCT, rid, 1, "k9", "x" * 501), "reason")):
        with pytest.raises(TFError) as e:
            b.apply(op)
        assert (e.value.code, e.value.param) == ("invalid_request", param)
    assert len(b.transfers) == n and b.receipts_by_id[rid].refunded_nano == 100


def test_refund_of_a_receipt_that_collected_nothing() -> None:
    b, rid = settled_book(rated=0)
    with pytest.raises(TFError) as e:
        b.apply(RefundOp(ACCT, rid, 1, "k"))
    assert (e.value.code, e.value.param) == ("invalid_request", "amount_nano")
    assert "collected nothing" in e.value.message


def test_adjust_credit_and_debit_within_available() -> None:
    b = book(wallet=1000)
    b.apply(HoldOp(ACCT, "r", KEY, W, 600))  # available 400
    credit = b.apply(AdjustOp(ACCT, W, "credit", 50, "goodwill", "a1"))
    assert not credit.replayed and b.buckets[(ACCT, W)].balance_nano == 1050
    assert (b.transfers[-1].src, b.transfers[-1].dst, b.transfers[-1].kind) == ("funding", "customer", "adjustment")
    with pytest.raises(TFError) as e:
        b.apply(AdjustOp(ACCT, W, "debit", 451, "mistaken top-up", "a2"))
    assert (e.value.code, e.value.param) == ("insufficient_balance", "amount_nano")
    debit = b.apply(AdjustOp(ACCT, W, "debit", 450, "mistaken top-up", "a3"))
    assert b.buckets[(ACCT, W)].available_nano == 0 and b.buckets[(ACCT, W)].held_nano == 600
    assert (b.transfers[-1].src, b.transfers[-1].dst, b.transfers[-1].key_id) == ("customer", "funding", None)
    assert b.apply(AdjustOp(ACCT, W, "debit", 450, "mistaken top-up", "a3")) == AdjustResult(debit.adjustment, True)
    with pytest.raises(TFError) as e:
        b.apply(AdjustOp(ACCT, W, "credit", 450, "mistaken top-up", "a3"))
    assert e.value.code == "conflict"
    for op, param in ((AdjustOp(ACCT, W, "up", 1, "r", "a9"), "direction"), (AdjustOp(ACCT, W, "credit", 1, " ", "a9"), "reason"),
                      (AdjustOp(ACCT, W, "credit", -1, "r", "a9"), "amount_nano")):
        with pytest.raises(TFError) as e:
            b.apply(op)
        assert (e.value.code, e.value.param) == ("invalid_request", param)
    assert len(b.new_adjustments) == 2
