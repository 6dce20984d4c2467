"""The ledger's rules: pure Python, no I/O.

A `Book` is the slice of ledger state one batch of operations touches (bucket rows, keys,
runs, holds, top-ups, receipts, refunds and adjustments, loaded by the store). `apply()` runs one
operation against it: it checks everything first and raises `TFError` before changing
anything, so a refused operation leaves the book exactly as it was; an accepted one mutates
the in-memory rows and appends what must be written (transfers, new rows) to the book.
Operations of one batch are applied in order, so each sees the effect of the ones before it:
that is what keeps idempotency and the no-overshoot checks exact under group commit.

Money model (nano-units, int). For one customer bucket:
  balance = available + held          (balance never < 0, held never > balance)
  held    = Σ active request holds drawn from available + Σ open runs' reservations
A run-funded hold is carved out of its run's reservation, so it moves nothing between
`customer` and `holds`. Every movement is a `Transfer` from one ledger account to another of
the same unit (a balanced pair of postings); see migrations/0001_init.sql.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenforge.errors import TFError
from tokenforge.money import Bucket, format_nano

MAX_NANO = 2**63 - 1
RECEIPT_STATUSES = ("settled", "failed", "partial", "cancelled")
ROUTE_POLICIES = ("routed", "direct", "auto")
MAX_REQUEST_ID_CHARS = 200
MAX_NAME_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_REASON_CHARS = 500
ADJUST_CREDIT = "credit"  # funding → customer
ADJUST_DEBIT = "debit"  # customer → funding
ADJUST_DIRECTIONS = (ADJUST_CREDIT, ADJUST_DEBIT)

# Ledger accounts (per unit; see the migration).
CUSTOMER = "customer"
HOLDS = "holds"
REVENUE = "revenue"
FUNDING = "funding"
UNCOLLECTED = "uncollected"

HOLD_ACTIVE = "active"
HOLD_CAPTURED = "captured"
HOLD_RELEASED = "released"
HOLD_EXPIRED = "expired"

RUN_OPEN = "open"
RUN_CLOSED = "closed"
RUN_EXPIRED = "expired"


_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_RANDOM_CHUNK = 4096
_random_pool = b""


def new_id(prefix: str) -> str:
    """`prefix_` + 12 lowercase base32 characters (60 random bits from os.urandom).

    The random bytes are read 4 KiB at a time: one getrandom call per 512 ids instead of one
    per id (a batch of settles makes two ids per operation)."""
    global _random_pool
    if len(_random_pool) < 8:
        _random_pool = os.urandom(_RANDOM_CHUNK)
    n = int.from_bytes(_random_pool[:8], "big") >> 4
    _random_pool = _random_pool[8:]
    chars = []
    for _ in range(12):
        chars.append(_B32[n & 31])
        n >>= 5
    return f"{prefix}_{''.join(chars)}"


def rfc3339(at: dt.datetime) -> str:
    """UTC timestamp, millisecond precision: 2026-12-03T10:00:00.123Z."""
    if at.utcoffset():
        at = at.astimezone(dt.UTC)
    return at.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def parse_bucket(value: int, *, param: str = "bucket", allow_unspecified: bool = False) -> Bucket | None:
    if value == 0 and allow_unspecified:
        return None
    try:
        return Bucket.from_pb(value)
    except ValueError:
        raise TFError("invalid_request", f"{param} must be wallet or credit", param) from None


def check_amount(amount_nano: int, param: str) -> None:
    if amount_nano <= 0:
        raise TFError("invalid_request", f"{param} must be greater than zero", param)
    if amount_nano > MAX_NANO:
        raise TFError("invalid_request", f"{param} is too large", param)


def check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
        raise TFError(
            "invalid_request",
            f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters",
            "request_id",
        )


_RECEIPT_ID_RE = re.compile(r"^rcpt_[A-Za-z0-9]{8,64}$")


def check_receipt_id(receipt_id: str) -> None:
    """A receipt id the caller chose: rcpt_ and 8 to 64 letters or digits."""
    if not _RECEIPT_ID_RE.match(receipt_id):
        raise TFError("invalid_request", "receipt_id must be rcpt_ followed by 8 to 64 letters or digits", "receipt_id")


def check_name(name: str, param: str = "name") -> None:
    if not name or len(name) > MAX_NAME_CHARS:
        raise TFError("invalid_request", f"{param} must be 1 to {MAX_NAME_CHARS} characters", param)


def check_idempotency_key(key: str) -> None:
    if not key:
        raise TFError("invalid_request", "idempotency_key is required", "idempotency_key")
    if "\x00" in key:
        # PostgreSQL text cannot hold NUL: the write would fail as a database error (503, and
        # a retry that can never succeed) after failing the batch it was in.
        raise TFError("invalid_request", "idempotency_key must not contain NUL characters", "idempotency_key")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise TFError(
            "invalid_request", f"idempotency_key may be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            "idempotency_key",
        )


def check_reason(reason: str, *, required: bool) -> None:
    """A refund's or adjustment's reason: printable text, at most MAX_REASON_CHARS."""
    if required and not reason.strip():
        raise TFError("invalid_request", "reason is required: say why the money moves", "reason")
    if len(reason) > MAX_REASON_CHARS:
        raise TFError("invalid_request", f"reason may be at most {MAX_REASON_CHARS} characters", "reason")
    if reason and not reason.isprintable():
        raise TFError("invalid_request", "reason must be printable text (no control characters)", "reason")


# ---------------------------------------------------------------------------------------------
# Rows (the store loads them; apply() mutates them)


@dataclass(slots=True)
class BucketRow:
    account_id: str
    bucket: Bucket
    balance_nano: int
    held_nano: int
    dirty: bool = False

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.held_nano


@dataclass(slots=True)
class KeyLimitsNano:
    wallet_total: int = 0
    wallet_daily: int = 0
    credit_total: int = 0
    credit_daily: int = 0

    def caps(self, bucket: Bucket) -> tuple[int, int]:
        if bucket is Bucket.WALLET:
            return self.wallet_total, self.wallet_daily
        return self.credit_total, self.credit_daily


@dataclass(slots=True)
class KeyRow:
    id: str
    account_id: str
    name: str
    revoked: bool
    limits: KeyLimitsNano
    spent: dict[Bucket, int]
    held: dict[Bucket, int]
    day: dt.date | None
    day_spent: dict[Bucket, int]
    dirty: bool = False

    def room_nano(self, bucket: Bucket, today: dt.date) -> int | None:
        """How much more this key may commit (spend + hold) in `bucket`; None: no limit.

        Active holds count against the daily cap whatever day they were taken: a cap is
        never passed, at the price of being conservative around midnight.
        """
        total_cap, daily_cap = self.limits.caps(bucket)
        room: int | None = None
        if total_cap:
            room = total_cap - self.spent[bucket] - self.held[bucket]
        if daily_cap:
            spent_today = self.day_spent[bucket] if self.day == today else 0
            daily_room = daily_cap - spent_today - self.held[bucket]
            room = daily_room if room is None else min(room, daily_room)
        return None if room is None else max(room, 0)

    def add_spent(self, bucket: Bucket, amount_nano: int, today: dt.date) -> None:
        if self.day != today:
            self.day = today
            self.day_spent = {Bucket.WALLET: 0, Bucket.CREDIT: 0}
        self.spent[bucket] += amount_nano
        self.day_spent[bucket] += amount_nano
        self.dirty = True


@dataclass(slots=True)
class RunRow:
    id: str
    key_id: str
    account_id: str
    name: str
    status: str
    budget: dict[Bucket, int]
    reserved: dict[Bucket, int]
    spent: dict[Bucket, int]
    expires_at: dt.datetime
    created_at: dt.datetime
    closed_at: dt.datetime | None = None
    estimate_json: str | None = None
    dirty: bool = False
    new: bool = False


@dataclass(slots=True)
class HoldRow:
    id: str
    request_id: str
    bucket: Bucket
    account_id: str
    key_id: str
    run_id: str | None
    run_funded: bool
    amount_nano: int
    state: str
    captured_nano: int
    released_nano: int
    ttl_s: int
    expires_at: dt.datetime
    created_at: dt.datetime
    closed_at: dt.datetime | None = None
    # The receipt the router drafted for the request never settled (JSON text, written with a
    # new hold; rows read back leave it out: only the reaper reads it, see ExpireHoldOp).
    unsettled_receipt: str | None = None
    dirty: bool = False
    new: bool = False


@dataclass(slots=True)
class TopUpRow:
    id: str
    idempotency_key: str
    account_id: str
    bucket: Bucket
    amount_nano: int
    created_at: dt.datetime


@dataclass(slots=True)
class ReceiptRow:
    id: str
    request_id: str
    key_id: str
    account_id: str
    run_id: str | None
    run_step: str | None
    status: str
    bucket: Bucket | None
    rated_nano: int
    amount_nano: int
    uncollected_nano: int
    held_nano: int
    released_nano: int
    created_at: dt.datetime
    body_json: str = ""
    refunded_nano: int = 0  # Σ refunds of this receipt; never above amount_nano
    # Written by the reaper for a request whose holds expired unsettled (nothing charged); a
    # later Settle replaces it (`replaces` on the new row: the store updates instead of inserting).
    unsettled: bool = False
    replaces: bool = False
    dirty: bool = False  # refunded_nano changed (an existing receipt; new ones are inserted)


@dataclass(slots=True)
class RefundRow:
    id: str
    idempotency_key: str
    receipt_id: str
    account_id: str
    bucket: Bucket
    amount_nano: int
    reason: str
    created_at: dt.datetime


@dataclass(slots=True)
class AdjustmentRow:
    id: str
    idempotency_key: str
    account_id: str
    bucket: Bucket
    direction: str  # ADJUST_CREDIT | ADJUST_DEBIT
    amount_nano: int
    reason: str
    created_at: dt.datetime


@dataclass(slots=True)
class Transfer:
    at: dt.datetime
    kind: str
    unit: str
    src: str
    dst: str
    amount_nano: int
    account_id: str
    bucket: Bucket
    key_id: str | None
    ref: str | None
    receipt_id: str | None
    balance_after_nano: int


# ---------------------------------------------------------------------------------------------
# Operations and their results


@dataclass(frozen=True, slots=True)
class HoldOp:
    account_id: str
    request_id: str
    key_id: str
    bucket: Bucket
    amount_nano: int
    run_id: str | None = None
    ttl_s: int = 0
    unsettled_receipt: str | None = None  # JSON object text: the receipt if never settled


@dataclass(frozen=True, slots=True)
class ReleaseOp:
    account_id: str
    request_id: str
    bucket: Bucket


@dataclass(frozen=True, slots=True)
class ExpireHoldOp:
    account_id: str
    request_id: str
    bucket: Bucket
    unsettled_receipt: str | None = None  # the hold's, as the reaper read it


@dataclass(frozen=True, slots=True)
class SettleOp:
    account_id: str
    request_id: str
    key_id: str
    bucket: Bucket | None
    rated_nano: int
    status: str
    receipt: dict[str, Any]
    run_id: str | None = None
    run_step: str | None = None
    receipt_id: str | None = None  # chosen by the router at admission; None: the ledger makes one
    receipt_bytes: int = 0  # the receipt JSON's size as received: the writer bounds a batch by it


@dataclass(frozen=True, slots=True)
class TopUpOp:
    account_id: str
    bucket: Bucket
    amount_nano: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class CreateRunOp:
    account_id: str
    key_id: str
    name: str
    budget_wallet_nano: int
    budget_credit_nano: int
    estimate_json: str | None
    ttl_s: int


@dataclass(frozen=True, slots=True)
class CloseRunOp:
    account_id: str
    run_id: str
    key_id: str | None
    expire: bool = False  # from the reaper: only if past its expiry


@dataclass(frozen=True, slots=True)
class RefundOp:
    """Give back part or all of what a receipt collected: revenue → customer, its bucket."""

    account_id: str  # the receipt's account (the server looks it up)
    receipt_id: str
    amount_nano: int
    idempotency_key: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AdjustOp:
    """Credit (funding → customer) or debit (customer → funding) a bucket, with a reason."""

    account_id: str
    bucket: Bucket
    direction: str
    amount_nano: int
    reason: str
    idempotency_key: str


Op = HoldOp | ReleaseOp | ExpireHoldOp | SettleOp | TopUpOp | CreateRunOp | CloseRunOp | RefundOp | AdjustOp


@dataclass(frozen=True, slots=True)
class HoldResult:
    hold_id: str
    amount_nano: int
    expires_at: dt.datetime
    replayed: bool


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    released_nano: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class SettleResult:
    receipt_id: str
    amount_nano: int
    uncollected_nano: int
    held_nano: int
    released_nano: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class TopUpResult:
    topup_id: str
    account_id: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class RunResult:
    run_id: str
    status: str


@dataclass(frozen=True, slots=True)
class RefundResult:
    refund: RefundRow
    receipt_amount_nano: int  # what the receipt collected
    receipt_refunded_nano: int  # Σ its refunds after this one (now, on a replay)
    replayed: bool


@dataclass(frozen=True, slots=True)
class AdjustResult:
    adjustment: AdjustmentRow
    replayed: bool


Result = HoldResult | ReleaseResult | SettleResult | TopUpResult | RunResult | RefundResult | AdjustResult | None


@dataclass(frozen=True, slots=True)
class Policy:
    hold_ttl_s: int
    hold_ttl_max_s: int
    run_ttl_s: int

    def hold_ttl(self, ttl_s: int) -> int:
        if ttl_s < 0:
            raise TFError("invalid_request", "ttl_s must not be negative", "ttl_s")
        return min(ttl_s or self.hold_ttl_s, self.hold_ttl_max_s)

    def run_ttl(self, ttl_s: int) -> int:
        if ttl_s < 0:
            raise TFError("invalid_request", "ttl_s must not be negative", "ttl_s")
        return min(ttl_s or self.run_ttl_s, max(self.run_ttl_s, self.hold_ttl_max_s))


# ---------------------------------------------------------------------------------------------
# The book


@dataclass
class Book:
    """State loaded (and locked) for one batch, plus what the batch will write."""

    now: dt.datetime
    policy: Policy
    buckets: dict[tuple[str, Bucket], BucketRow] = field(default_factory=dict)
    keys: dict[str, KeyRow] = field(default_factory=dict)
    runs: dict[str, RunRow] = field(default_factory=dict)
    holds: dict[tuple[str, Bucket], HoldRow] = field(default_factory=dict)
    topups: dict[str, TopUpRow] = field(default_factory=dict)
    receipts: dict[str, ReceiptRow] = field(default_factory=dict)  # by request id
    receipts_by_id: dict[str, ReceiptRow] = field(default_factory=dict)  # receipts refunds name
    refunds: dict[str, RefundRow] = field(default_factory=dict)  # by idempotency key
    adjustments: dict[str, AdjustmentRow] = field(default_factory=dict)  # by idempotency key
    id_factory: Callable[[str], str] = new_id
    # outputs
    transfers: list[Transfer] = field(default_factory=list)
    new_topups: list[TopUpRow] = field(default_factory=list)
    new_receipts: list[ReceiptRow] = field(default_factory=list)
    new_refunds: list[RefundRow] = field(default_factory=list)
    new_adjustments: list[AdjustmentRow] = field(default_factory=list)

    @property
    def today(self) -> dt.date:
        return self.now.date()

    # -- helpers ------------------------------------------------------------------------------

    def bucket_row(self, account_id: str, bucket: Bucket) -> BucketRow:
        row = self.buckets.get((account_id, bucket))
        if row is None:
            raise TFError("not_found", f"no account {account_id}", "account_id")
        return row

    def _move(
        self,
        kind: str,
        row: BucketRow,
        src: str,
        dst: str,
        amount_nano: int,
        *,
        key_id: str | None,
        ref: str | None,
        receipt_id: str | None = None,
    ) -> None:
        """Record one transfer; the caller has already updated `row`."""
        assert amount_nano > 0
        assert 0 <= row.held_nano <= row.balance_nano <= MAX_NANO, row
        row.dirty = True
        self.transfers.append(
            Transfer(
                at=self.now,
                kind=kind,
                unit=row.bucket.unit,
                src=src,
                dst=dst,
                amount_nano=amount_nano,
                account_id=row.account_id,
                bucket=row.bucket,
                key_id=key_id,
                ref=ref,
                receipt_id=receipt_id,
                balance_after_nano=row.balance_nano,
            )
        )

    def _free_hold(self, hold: HoldRow, amount_nano: int, kind: str, receipt_id: str | None) -> None:
        """Give `amount_nano` of an active hold back: to its run's reservation while the run
        is open and funded it, else to the bucket's available balance."""
        if amount_nano == 0:
            return
        run = self.runs.get(hold.run_id) if hold.run_funded and hold.run_id else None
        if run is not None and run.status == RUN_OPEN:
            run.reserved[hold.bucket] += amount_nano
            run.dirty = True
            return
        row = self.bucket_row(hold.account_id, hold.bucket)
        key = self.keys[hold.key_id]
        row.held_nano -= amount_nano
        key.held[hold.bucket] -= amount_nano
        key.dirty = True
        assert key.held[hold.bucket] >= 0
        self._move(kind, row, HOLDS, CUSTOMER, amount_nano, key_id=hold.key_id, ref=hold.id,
                   receipt_id=receipt_id)

    def _close_hold(self, hold: HoldRow, state: str, captured_nano: int) -> int:
        """Mark an active hold done; returns what it released."""
        assert hold.state == HOLD_ACTIVE
        released = hold.amount_nano - captured_nano
        assert released >= 0
        hold.state = state
        hold.captured_nano = captured_nano
        hold.released_nano = released
        hold.closed_at = self.now
        hold.dirty = True
        return released

    # -- operations ---------------------------------------------------------------------------

    def apply(self, op: Op) -> Result:
        method = _APPLY.get(type(op))
        if method is None:
            raise AssertionError(f"unknown op {op!r}")
        return method(self, op)

    def top_up(self, op: TopUpOp) -> TopUpResult:
        check_amount(op.amount_nano, "amount_nano")
        check_idempotency_key(op.idempotency_key)
        seen = self.topups.get(op.idempotency_key)
        if seen is not None:
            if (seen.account_id, seen.bucket, seen.amount_nano) != (op.account_id, op.bucket, op.amount_nano):
                raise TFError(
                    "conflict",
                    "this idempotency_key was used for a different top-up",
                    "idempotency_key",
                )
            return TopUpResult(seen.id, seen.account_id, replayed=True)
        row = self.bucket_row(op.account_id, op.bucket)
        if row.balance_nano + op.amount_nano > MAX_NANO:
            raise TFError("invalid_request", "the balance would be too large", "amount_nano")
        topup = TopUpRow(
            id=self.id_factory("topup"),
            idempotency_key=op.idempotency_key,
            account_id=op.account_id,
            bucket=op.bucket,
            amount_nano=op.amount_nano,
            created_at=self.now,
        )
        row.balance_nano += op.amount_nano
        self._move("topup", row, FUNDING, CUSTOMER, op.amount_nano, key_id=None, ref=topup.id)
        self.topups[op.idempotency_key] = topup
        self.new_topups.append(topup)
        return TopUpResult(topup.id, topup.account_id, replayed=False)

    def refund(self, op: RefundOp) -> RefundResult:
        """Give back `amount_nano` of what a receipt collected, to the bucket that paid it.

        The receipt's refunded total never passes what it collected (here, in the store's
        compare-and-set write, and by a CHECK in the database). A key's spend counters are
        not lowered: key limits cap gross spend, and a refund does not reopen them."""
        check_amount(op.amount_nano, "amount_nano")
        check_idempotency_key(op.idempotency_key)
        check_reason(op.reason, required=False)
        seen = self.refunds.get(op.idempotency_key)
        if seen is not None:
            if (seen.receipt_id, seen.amount_nano, seen.reason) != (op.receipt_id, op.amount_nano, op.reason):
                raise TFError("conflict", "this idempotency_key was used for a different refund", "idempotency_key")
            receipt = self.receipts_by_id.get(seen.receipt_id)
            assert receipt is not None, "a refund's receipt is loaded with it"
            return RefundResult(seen, receipt.amount_nano, receipt.refunded_nano, replayed=True)
        receipt = self.receipts_by_id.get(op.receipt_id)
        if receipt is None or receipt.account_id != op.account_id:
            raise TFError("not_found", f"no receipt {op.receipt_id}", "receipt_id")
        if receipt.bucket is None or receipt.amount_nano == 0:
            raise TFError(
                "invalid_request", f"receipt {receipt.id} collected nothing, so nothing can be refunded", "amount_nano"
            )
        left = receipt.amount_nano - receipt.refunded_nano
        assert left >= 0, receipt
        if op.amount_nano > left:
            raise TFError(
                "invalid_request",
                f"receipt {receipt.id} collected {format_nano(receipt.amount_nano)} {receipt.bucket.unit} and "
                f"{format_nano(receipt.refunded_nano)} was refunded already; at most {format_nano(left)} "
                "can still be refunded",
                "amount_nano",
            )
        row = self.bucket_row(receipt.account_id, receipt.bucket)
        if row.balance_nano + op.amount_nano > MAX_NANO:
            raise TFError("invalid_request", "the balance would be too large", "amount_nano")
        refund = RefundRow(
            id=self.id_factory("rfnd"),
            idempotency_key=op.idempotency_key,
            receipt_id=receipt.id,
            account_id=receipt.account_id,
            bucket=receipt.bucket,
            amount_nano=op.amount_nano,
            reason=op.reason,
            created_at=self.now,
        )
        receipt.refunded_nano += op.amount_nano
        receipt.dirty = True
        assert 0 < receipt.refunded_nano <= receipt.amount_nano
        row.balance_nano += op.amount_nano
        self._move("refund", row, REVENUE, CUSTOMER, op.amount_nano, key_id=receipt.key_id, ref=refund.id,
                   receipt_id=receipt.id)
        self.refunds[op.idempotency_key] = refund
        self.new_refunds.append(refund)
        return RefundResult(refund, receipt.amount_nano, receipt.refunded_nano, replayed=False)

    def adjust(self, op: AdjustOp) -> AdjustResult:
        """Credit or debit a bucket's available balance against `funding`, with a reason. A
        debit never takes the available balance (balance − held) below zero."""
        check_amount(op.amount_nano, "amount_nano")
        if op.direction not in ADJUST_DIRECTIONS:
            raise TFError("invalid_request", "direction must be credit or debit", "direction")
        check_reason(op.reason, required=True)
        check_idempotency_key(op.idempotency_key)
        seen = self.adjustments.get(op.idempotency_key)
        if seen is not None:
            if (seen.account_id, seen.bucket, seen.direction, seen.amount_nano, seen.reason) != (
                op.account_id, op.bucket, op.direction, op.amount_nano, op.reason,
            ):
                raise TFError("conflict", "this idempotency_key was used for a different adjustment", "idempotency_key")
            return AdjustResult(seen, replayed=True)
        row = self.bucket_row(op.account_id, op.bucket)
        if op.direction == ADJUST_CREDIT:
            if row.balance_nano + op.amount_nano > MAX_NANO:
                raise TFError("invalid_request", "the balance would be too large", "amount_nano")
        elif row.available_nano < op.amount_nano:
            raise TFError(
                "insufficient_balance",
                f"the {op.bucket.value} has {format_nano(row.available_nano)} {op.bucket.unit} available; "
                f"a debit of {format_nano(op.amount_nano)} would take it below zero",
                "amount_nano",
            )
        adjustment = AdjustmentRow(
            id=self.id_factory("adj"),
            idempotency_key=op.idempotency_key,
            account_id=op.account_id,
            bucket=op.bucket,
            direction=op.direction,
            amount_nano=op.amount_nano,
            reason=op.reason,
            created_at=self.now,
        )
        if op.direction == ADJUST_CREDIT:
            row.balance_nano += op.amount_nano
            self._move("adjustment", row, FUNDING, CUSTOMER, op.amount_nano, key_id=None, ref=adjustment.id)
        else:
            row.balance_nano -= op.amount_nano
            self._move("adjustment", row, CUSTOMER, FUNDING, op.amount_nano, key_id=None, ref=adjustment.id)
        self.adjustments[op.idempotency_key] = adjustment
        self.new_adjustments.append(adjustment)
        return AdjustResult(adjustment, replayed=False)

    def _key(self, key_id: str, account_id: str) -> KeyRow:
        key = self.keys.get(key_id)
        if key is None or key.account_id != account_id:
            raise TFError("not_found", f"no key {key_id}", "key_id")
        return key

    def hold(self, op: HoldOp) -> HoldResult:
        check_request_id(op.request_id)
        check_amount(op.amount_nano, "amount_nano")
        ttl_s = self.policy.hold_ttl(op.ttl_s)
        seen = self.holds.get((op.request_id, op.bucket))
        if seen is not None:
            if (seen.key_id, seen.amount_nano, seen.run_id) != (op.key_id, op.amount_nano, op.run_id):
                raise TFError(
                    "conflict",
                    f"request {op.request_id} already has a different hold in {op.bucket.value}",
                    "request_id",
                )
            return HoldResult(seen.id, seen.amount_nano, seen.expires_at, replayed=True)
        key = self._key(op.key_id, op.account_id)
        if key.revoked:
            raise TFError("invalid_api_key", "this API key has been revoked", "key_id")
        row = self.bucket_row(key.account_id, op.bucket)

        run: RunRow | None = None
        if op.run_id:
            run = self.runs.get(op.run_id)
            if run is None or run.key_id != key.id:
                raise TFError("not_found", f"no run {op.run_id}", "run_id")
            if run.status != RUN_OPEN:
                raise TFError("invalid_request", f"run {run.id} is {run.status}", "run_id")
        funded = run is not None and run.budget[op.bucket] > 0

        if funded:
            assert run is not None
            # The reservation already passed the key's limits and the balance check.
            if run.reserved[op.bucket] < op.amount_nano:
                raise TFError(
                    "run_budget_exceeded",
                    f"run {run.id} has {format_nano(run.reserved[op.bucket])} {op.bucket.unit} "
                    f"of its budget left; this request needs up to {format_nano(op.amount_nano)} "
                    f"{op.bucket.unit} (its prompt and `max_tokens` at the channel's price: a lower "
                    "`max_tokens` needs less)",
                )
        else:
            room = key.room_nano(op.bucket, self.today)
            if room is not None and room < op.amount_nano:
                raise TFError(
                    "key_budget_exceeded",
                    f"this key's {op.bucket.value} limit leaves {format_nano(room)} "
                    f"{op.bucket.unit}; this request needs up to {format_nano(op.amount_nano)} "
                    f"{op.bucket.unit} (its prompt and `max_tokens` at the channel's price: a lower "
                    "`max_tokens` needs less)",
                )
            if row.available_nano < op.amount_nano:
                raise TFError(
                    "insufficient_balance",
                    f"the {op.bucket.value} has {format_nano(row.available_nano)} "
                    f"{op.bucket.unit} available; this request needs up to "
                    f"{format_nano(op.amount_nano)} {op.bucket.unit}. Top up the {op.bucket.value}, "
                    "or ask for a lower `max_tokens`.",
                )

        hold = HoldRow(
            id=self.id_factory("hold"),
            request_id=op.request_id,
            bucket=op.bucket,
            account_id=key.account_id,
            key_id=key.id,
            run_id=op.run_id or None,
            run_funded=funded,
            amount_nano=op.amount_nano,
            state=HOLD_ACTIVE,
            captured_nano=0,
            released_nano=0,
            ttl_s=ttl_s,
            expires_at=self.now + dt.timedelta(seconds=ttl_s),
            created_at=self.now,
            unsettled_receipt=op.unsettled_receipt,
            new=True,
        )
        if funded:
            assert run is not None
            run.reserved[op.bucket] -= op.amount_nano
            run.dirty = True
        else:
            row.held_nano += op.amount_nano
            key.held[op.bucket] += op.amount_nano
            self._move("hold", row, CUSTOMER, HOLDS, op.amount_nano, key_id=key.id, ref=hold.id)
        # Written back even when unchanged: the store's write is conditional on these rows being
        # as read, so a key revoked (or a run closed) meanwhile undoes and retries the batch.
        key.dirty = True
        if run is not None:
            run.dirty = True
        self.holds[(op.request_id, op.bucket)] = hold
        return HoldResult(hold.id, hold.amount_nano, hold.expires_at, replayed=False)

    def release(self, op: ReleaseOp) -> ReleaseResult:
        check_request_id(op.request_id)
        hold = self.holds.get((op.request_id, op.bucket))
        if hold is None:
            raise TFError(
                "not_found", f"no hold for request {op.request_id} in {op.bucket.value}", "request_id"
            )
        if hold.state != HOLD_ACTIVE:
            return ReleaseResult(hold.released_nano, replayed=True)
        released = self._close_hold(hold, HOLD_RELEASED, 0)
        self._free_hold(hold, released, "release", None)
        return ReleaseResult(released, replayed=False)

    def expire_hold(self, op: ExpireHoldOp) -> ReleaseResult | None:
        hold = self.holds.get((op.request_id, op.bucket))
        if hold is None or hold.state != HOLD_ACTIVE or hold.expires_at > self.now:
            return None
        released = self._close_hold(hold, HOLD_EXPIRED, 0)
        receipt = self._unsettled_receipt(hold, op.unsettled_receipt)
        self._free_hold(hold, released, "expiry", receipt.id if receipt is not None else None)
        return ReleaseResult(released, replayed=False)

    def _unsettled_receipt(self, hold: HoldRow, draft_json: str | None) -> ReceiptRow | None:
        """The last active hold of a request nobody settled has just expired: its router died
        (or gave up on an unreachable ledger) after the request may have reached an upstream.
        Every such request gets a receipt: a `failed` one charging nothing, from the draft
        the router sent with the hold, saying why. None while another hold of the request is
        active (its expiry writes it) or when the request already has a receipt."""
        if hold.request_id in self.receipts:
            return None
        holds = [h for b in Bucket if (h := self.holds.get((hold.request_id, b))) is not None]
        if any(h.state == HOLD_ACTIVE for h in holds):
            return None
        key = self.keys[hold.key_id]
        try:
            draft = orjson.loads(draft_json) if draft_json else {}
        except ValueError:  # checked at Hold; a row written by hand must not stop the reaper
            draft = {}
        if not isinstance(draft, dict):
            draft = {}
        receipt_id = draft.get("id")
        if not (isinstance(receipt_id, str) and _RECEIPT_ID_RE.match(receipt_id)):
            receipt_id = self.id_factory("rcpt")
        run = draft.get("run")
        step = run.get("step") if isinstance(run, dict) else None
        display = max(holds, key=lambda h: h.created_at)
        receipt = ReceiptRow(
            id=receipt_id,
            request_id=hold.request_id,
            key_id=key.id,
            account_id=key.account_id,
            run_id=next((h.run_id for h in holds if h.run_id), None),
            run_step=step if isinstance(step, str) and step else None,
            status="failed",
            bucket=None,
            rated_nano=0,
            amount_nano=0,
            uncollected_nano=0,
            held_nano=display.amount_nano,
            released_nano=display.released_nano,
            created_at=self.now,
            unsettled=True,
        )
        trace = draft.get("trace_id")
        where = f" Its attempts, if any reached an upstream, are in trace {trace}." if isinstance(trace, str) else ""
        draft.update(
            status="failed",
            final_attempt=0,
            attempts=[],
            usage=None,
            usage_source=None,
            price=None,
            error={
                "code": "unsettled",
                "message": (
                    f"The router did not settle this request before its hold expired at "
                    f"{rfc3339(hold.expires_at)}; nothing was charged.{where}"
                ),
            },
        )
        receipt.body_json = _receipt_body(draft, receipt, key, display, holds)
        self.receipts[hold.request_id] = receipt
        self.new_receipts.append(receipt)
        return receipt

    def settle(self, op: SettleOp) -> SettleResult:
        check_request_id(op.request_id)
        if op.status not in RECEIPT_STATUSES:
            raise TFError("invalid_request", f"status must be one of {', '.join(RECEIPT_STATUSES)}", "status")
        if op.rated_nano < 0 or op.rated_nano > MAX_NANO:
            raise TFError("invalid_request", "rated_nano must not be negative", "rated_nano")
        if op.bucket is None and op.rated_nano > 0:
            raise TFError("invalid_request", "a charge needs the bucket that pays", "bucket")
        if op.status == "failed" and op.rated_nano > 0:
            raise TFError("invalid_request", "a failed request is not charged", "rated_nano")

        seen = self.receipts.get(op.request_id)
        if seen is not None and seen.unsettled:
            # The reaper gave up on this request and wrote a `failed` receipt; its router was
            # only late. The real settlement replaces it (same id): the holds have expired, so
            # the charge comes from the available balance, any shortfall left uncollected.
            pass
        elif seen is not None:
            if (seen.key_id, seen.bucket, seen.rated_nano, seen.status) != (
                op.key_id, op.bucket, op.rated_nano, op.status,
            ):
                raise TFError(
                    "conflict", f"request {op.request_id} was already settled differently", "request_id"
                )
            return SettleResult(
                seen.id, seen.amount_nano, seen.uncollected_nano, seen.held_nano,
                seen.released_nano, replayed=True,
            )

        holds = [h for b in Bucket if (h := self.holds.get((op.request_id, b))) is not None]
        if not holds:
            raise TFError("not_found", f"no hold for request {op.request_id}", "request_id")
        for h in holds:
            if h.key_id != op.key_id:
                raise TFError("invalid_request", "the request's holds belong to another key", "key_id")
        key = self._key(op.key_id, op.account_id)
        run_id = next((h.run_id for h in holds if h.run_id), None)
        if op.run_id and run_id and op.run_id != run_id:
            raise TFError("invalid_request", f"the request's holds belong to run {run_id}", "run_id")

        pay = self.holds.get((op.request_id, op.bucket)) if op.bucket is not None else None
        if op.bucket is not None and pay is None:
            raise TFError("invalid_request", f"request {op.request_id} has no hold in {op.bucket.value}", "bucket")
        if pay is not None and pay.state in (HOLD_RELEASED, HOLD_CAPTURED):
            raise TFError(
                "invalid_request",
                f"the {pay.bucket.value} hold of request {op.request_id} was already {pay.state}",
                "request_id",
            )

        receipt_id = seen.id if seen is not None else (op.receipt_id or self.id_factory("rcpt"))
        amount = uncollected = 0
        display = pay or max(holds, key=lambda h: h.created_at)
        held_shown = display.amount_nano
        released_shown = 0
        if pay is not None:
            amount, uncollected, released_shown = self._capture(pay, key, op.rated_nano, receipt_id)
        for h in holds:
            if h.state == HOLD_ACTIVE:
                released = self._close_hold(h, HOLD_RELEASED, 0)
                self._free_hold(h, released, "release", receipt_id)
                if h is display:
                    released_shown = released
        if display.state == HOLD_EXPIRED:
            released_shown = display.released_nano

        receipt = ReceiptRow(
            id=receipt_id,
            request_id=op.request_id,
            key_id=key.id,
            account_id=key.account_id,
            run_id=run_id,
            run_step=op.run_step or None,
            status=op.status,
            bucket=op.bucket,
            rated_nano=op.rated_nano,
            amount_nano=amount,
            uncollected_nano=uncollected,
            held_nano=held_shown,
            released_nano=released_shown,
            created_at=self.now,
        )
        if seen is not None:
            # Stored: update it in place. Written by an expiry earlier in this same batch: it is
            # not stored yet, so this one is inserted instead (an UPDATE in the same statement
            # would not see the row its sibling INSERT adds).
            fresh = [r for r in self.new_receipts if r is not seen]
            receipt.replaces = len(fresh) == len(self.new_receipts)
            self.new_receipts[:] = fresh
        receipt.body_json = _receipt_body(op.receipt, receipt, key, display, holds)
        self.receipts[op.request_id] = receipt
        self.new_receipts.append(receipt)
        return SettleResult(receipt.id, amount, uncollected, held_shown, released_shown, replayed=False)

    def _capture(self, hold: HoldRow, key: KeyRow, rated_nano: int, receipt_id: str) -> tuple[int, int, int]:
        """Charge `rated_nano` against `hold`: from the hold, then (only if the cost exceeds
        it) from the available balance or, for a run-funded hold, the run's reservation; the
        rest is uncollected. Returns (amount charged, uncollected, released)."""
        row = self.bucket_row(hold.account_id, hold.bucket)
        run = self.runs.get(hold.run_id) if hold.run_id else None
        active = hold.state == HOLD_ACTIVE  # else expired: nothing left in the hold
        from_hold = min(rated_nano, hold.amount_nano) if active else 0
        extra = rated_nano - from_hold
        if hold.run_funded:
            room = run.reserved[hold.bucket] if run is not None and run.status == RUN_OPEN else 0
        else:
            key_room = key.room_nano(hold.bucket, self.today)
            # the hold being captured already counts against the key's room
            room = row.available_nano if key_room is None else min(row.available_nano, key_room)
        from_extra = min(extra, max(room, 0))
        uncollected = extra - from_extra
        ref = hold.id

        if from_hold:
            row.balance_nano -= from_hold
            row.held_nano -= from_hold
            key.held[hold.bucket] -= from_hold
            self._move("capture", row, HOLDS, REVENUE, from_hold, key_id=key.id, ref=ref, receipt_id=receipt_id)
        if from_extra:
            if hold.run_funded:
                assert run is not None
                run.reserved[hold.bucket] -= from_extra
                run.dirty = True
                row.balance_nano -= from_extra
                row.held_nano -= from_extra
                key.held[hold.bucket] -= from_extra
                self._move("capture", row, HOLDS, REVENUE, from_extra, key_id=key.id, ref=ref, receipt_id=receipt_id)
            else:
                row.balance_nano -= from_extra
                self._move("capture", row, CUSTOMER, REVENUE, from_extra, key_id=key.id, ref=ref, receipt_id=receipt_id)
        if uncollected:
            row.dirty = True
            self._move("uncollected", row, UNCOLLECTED, REVENUE, uncollected, key_id=key.id, ref=ref,
                       receipt_id=receipt_id)
        charged = from_hold + from_extra
        if charged:
            key.add_spent(hold.bucket, charged, self.today)
            if run is not None:
                run.spent[hold.bucket] += charged
                run.dirty = True
        assert key.held[hold.bucket] >= 0
        released = 0
        if active:
            released = self._close_hold(hold, HOLD_CAPTURED, from_hold)
            self._free_hold(hold, released, "release", receipt_id)
        else:
            hold.dirty = True
        return charged, uncollected, released

    def create_run(self, op: CreateRunOp) -> RunResult:
        check_name(op.name)
        budgets = {Bucket.WALLET: op.budget_wallet_nano, Bucket.CREDIT: op.budget_credit_nano}
        for bucket, budget in budgets.items():
            if budget < 0 or budget > MAX_NANO:
                raise TFError("invalid_request", "a budget must not be negative", f"budget_{bucket.value}_nano")
        ttl_s = self.policy.run_ttl(op.ttl_s)
        key = self._key(op.key_id, op.account_id)
        if key.revoked:
            raise TFError("invalid_api_key", "this API key has been revoked", "key_id")
        for bucket, budget in budgets.items():
            if not budget:
                continue
            room = key.room_nano(bucket, self.today)
            if room is not None and room < budget:
                raise TFError(
                    "key_budget_exceeded",
                    f"this key's {bucket.value} limit leaves {format_nano(room)} {bucket.unit}; "
                    f"the run's budget is {format_nano(budget)}",
                )
            row = self.bucket_row(key.account_id, bucket)
            if row.available_nano < budget:
                raise TFError(
                    "insufficient_balance",
                    f"the {bucket.value} has {format_nano(row.available_nano)} {bucket.unit} "
                    f"available; the run's budget is {format_nano(budget)}",
                )
        run = RunRow(
            id=self.id_factory("run"),
            key_id=key.id,
            account_id=key.account_id,
            name=op.name,
            status=RUN_OPEN,
            budget=dict(budgets),
            reserved=dict(budgets),
            spent={Bucket.WALLET: 0, Bucket.CREDIT: 0},
            expires_at=self.now + dt.timedelta(seconds=ttl_s),
            created_at=self.now,
            estimate_json=op.estimate_json,
            new=True,
        )
        for bucket, budget in budgets.items():
            if budget:
                row = self.bucket_row(key.account_id, bucket)
                row.held_nano += budget
                key.held[bucket] += budget
                key.dirty = True
                self._move("run_hold", row, CUSTOMER, HOLDS, budget, key_id=key.id, ref=run.id)
        self.runs[run.id] = run
        return RunResult(run.id, run.status)

    def close_run(self, op: CloseRunOp) -> RunResult | None:
        run = self.runs.get(op.run_id)
        if run is None or (op.key_id and run.key_id != op.key_id):
            if op.expire:
                return None
            raise TFError("not_found", f"no run {op.run_id}", "run_id")
        if run.status != RUN_OPEN:
            return RunResult(run.id, run.status)
        if op.expire and run.expires_at > self.now:
            return None
        key = self.keys[run.key_id]
        for bucket in Bucket:
            reserved = run.reserved[bucket]
            if reserved:
                row = self.bucket_row(run.account_id, bucket)
                row.held_nano -= reserved
                key.held[bucket] -= reserved
                key.dirty = True
                run.reserved[bucket] = 0
                self._move("run_release", row, HOLDS, CUSTOMER, reserved, key_id=key.id, ref=run.id)
        run.status = RUN_EXPIRED if op.expire else RUN_CLOSED
        run.closed_at = self.now
        run.dirty = True
        return RunResult(run.id, run.status)


# Each operation type → the Book method that applies it.
_APPLY: dict[type, Callable[[Book, Any], Result]] = {
    HoldOp: Book.hold,
    SettleOp: Book.settle,
    ReleaseOp: Book.release,
    ExpireHoldOp: Book.expire_hold,
    TopUpOp: Book.top_up,
    CreateRunOp: Book.create_run,
    CloseRunOp: Book.close_run,
    RefundOp: Book.refund,
    AdjustOp: Book.adjust,
}

def _receipt_body(
    draft: dict[str, Any], receipt: ReceiptRow, key: KeyRow, display: HoldRow, holds: list[HoldRow]
) -> str:
    """The stored receipt: the router's fields plus the money fields the ledger decides."""
    body = dict(draft)
    charged = receipt.amount_nano + receipt.uncollected_nano > 0
    unit_bucket = receipt.bucket or display.bucket
    body.update(
        id=receipt.id,
        created_at=rfc3339(receipt.created_at),
        key={**(body.get("key") if isinstance(body.get("key"), dict) else {}), "id": key.id, "name": key.name},
        account_id=key.account_id,
        run={"id": receipt.run_id, "step": receipt.run_step} if receipt.run_id else None,
        status=receipt.status,
        amount=format_nano(receipt.amount_nano),
        unit=unit_bucket.unit,
        bucket=receipt.bucket.value if receipt.bucket is not None and charged else None,
        held=format_nano(receipt.held_nano),
        released=format_nano(receipt.released_nano),
        uncollected=format_nano(receipt.uncollected_nano),
        refunded=format_nano(receipt.refunded_nano),  # raised by refunds (the store rewrites it)
        holds=[
            {
                "bucket": h.bucket.value,
                "unit": h.bucket.unit,
                "held": format_nano(h.amount_nano),
                "captured": format_nano(h.captured_nano),
                "released": format_nano(h.released_nano),
                "state": h.state,
            }
            for h in holds
        ],
    )
    body.setdefault("request_id", receipt.request_id)
    if receipt.uncollected_nano and isinstance(body.get("attempts"), list):
        # The final attempt was rated higher than the bucket could pay: it shows what was paid.
        for attempt in body["attempts"]:
            if isinstance(attempt, dict) and attempt.get("n") == body.get("final_attempt"):
                attempt["charged"] = format_nano(receipt.amount_nano)
    return orjson.dumps(body).decode()
