"""A hypothesis state machine over the ledger's writers (in-process, real PostgreSQL).

Random top-ups, holds (also in the other bucket, as a fallback does), captures above and
below the hold, failed settlements, releases, expiries (a fake clock that may cross UTC
midnight), refunds (partial, too large, replayed), adjustments (credits, debits beyond what is
available), replays and concurrent bursts, over two accounts with capped and uncapped keys.
A plain model predicts every result; after every step the database must match the model and
conservation must hold per unit: top-ups + net adjustments = balances + charges - refunds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import urllib.parse
from dataclasses import dataclass, field

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenforge.errors import TFError
from tokenforge.ledger import core, migrations, store
from tokenforge.ledger.core import (
    AdjustOp,
    AdjustResult,
    HoldOp,
    HoldResult,
    KeyLimitsNano,
    Policy,
    RefundOp,
    RefundResult,
    ReleaseOp,
    SettleOp,
    SettleResult,
    TopUpOp,
)
from tokenforge.ledger.server import reap_once
from tokenforge.ledger.writer import WriterGroup
from tokenforge.money import Bucket

W, C = Bucket.WALLET, Bucket.CREDIT
TTLS = [1, 60, 300]
START = dt.datetime(2030, 1, 1, 23, 50, tzinfo=dt.UTC)


class Env:
    """One event loop, database and writer group for the whole test (not per example)."""

    def __init__(self, server_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.server_url = server_url
        self.now = START
        self.dbname = "tf_ledger_sm_" + secrets.token_hex(4)
        self.run(self._start())

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    async def _start(self) -> None:
        conn = await asyncpg.connect(self.server_url)
        await conn.execute(f'CREATE DATABASE "{self.dbname}"')
        await conn.close()
        parts = urllib.parse.urlsplit(self.server_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path="/" + self.dbname))
        conn = await asyncpg.connect(self.url)
        await migrations.migrate(conn)
        await conn.close()
        self.pool = await store.create_pool(self.url, min_size=2, max_size=4)
        self.writers = WriterGroup(self.pool, Policy(60, 300, 3600), 2, clock=lambda: self.now)
        self.writers.start()

    async def _stop(self) -> None:
        await self.writers.stop()
        await self.pool.close()
        conn = await asyncpg.connect(self.server_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        await conn.close()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.close()


ENV: Env | None = None


@dataclass
class MKey:
    id: str
    account_id: str
    caps: dict[Bucket, tuple[int, int]]  # (total, daily)
    spent: dict[Bucket, int] = field(default_factory=lambda: {W: 0, C: 0})
    held: dict[Bucket, int] = field(default_factory=lambda: {W: 0, C: 0})
    day: dt.date | None = None
    day_spent: dict[Bucket, int] = field(default_factory=lambda: {W: 0, C: 0})

    def room(self, bucket: Bucket, today: dt.date) -> int | None:
        total, daily = self.caps[bucket]
        rooms = []
        if total:
            rooms.append(total - self.spent[bucket] - self.held[bucket])
        if daily:
            rooms.append(daily - (self.day_spent[bucket] if self.day == today else 0) - self.held[bucket])
        return max(min(rooms), 0) if rooms else None

    def add_spent(self, bucket: Bucket, amount: int, today: dt.date) -> None:
        if self.day != today:
            self.day, self.day_spent = today, {W: 0, C: 0}
        self.spent[bucket] += amount
        self.day_spent[bucket] += amount


@dataclass
class MHold:
    key: MKey
    bucket: Bucket
    amount: int
    expires_at: dt.datetime
    state: str = "active"
    hold_id: str = ""


@dataclass
class MRequest:
    id: str
    key: MKey
    holds: dict[Bucket, MHold] = field(default_factory=dict)
    settled: SettleResult | None = None
    settle_args: tuple | None = None
    refunded: int = 0


amounts = st.integers(min_value=1, max_value=5_000)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert ENV is not None
        self.env = ENV
        self.balance: dict[tuple[str, Bucket], int] = {}
        self.held: dict[tuple[str, Bucket], int] = {}
        self.topups: dict[str, int] = {"CNY": 0, "CREDIT": 0}
        self.charged: dict[str, int] = {"CNY": 0, "CREDIT": 0}
        self.refunded: dict[str, int] = {"CNY": 0, "CREDIT": 0}
        self.adjusted: dict[str, int] = {"CNY": 0, "CREDIT": 0}  # credits - debits
        self.refund_log: list[tuple[RefundOp, RefundResult]] = []
        self.keys: list[MKey] = []
        self.requests: list[MRequest] = []
        self.topup_log: list[TopUpOp] = []

    # -- helpers ------------------------------------------------------------------------------

    def submit(self, op):  # type: ignore[no-untyped-def]
        try:
            return self.env.run(self.env.writers.submit(op))
        except TFError as err:
            return err

    def submit_all(self, ops):  # type: ignore[no-untyped-def]
        async def go():  # type: ignore[no-untyped-def]
            return await asyncio.gather(*(self.env.writers.submit(op) for op in ops), return_exceptions=True)

        return self.env.run(go())

    @property
    def today(self) -> dt.date:
        return self.env.now.date()

    def available(self, account_id: str, bucket: Bucket) -> int:
        return self.balance[(account_id, bucket)] - self.held[(account_id, bucket)]

    def expect_hold(self, req: MRequest, bucket: Bucket, amount: int, ttl: int, result) -> None:  # type: ignore[no-untyped-def]
        key = req.key
        room = key.room(bucket, self.today)
        if room is not None and room < amount:
            assert isinstance(result, TFError) and result.code == "key_budget_exceeded", result
            return
        if self.available(key.account_id, bucket) < amount:
            assert isinstance(result, TFError) and result.code == "insufficient_balance", result
            return
        assert isinstance(result, HoldResult) and not result.replayed, result
        hold = MHold(key, bucket, amount, self.env.now + dt.timedelta(seconds=ttl), hold_id=result.hold_id)
        assert result.expires_at == hold.expires_at
        req.holds[bucket] = hold
        self.held[(key.account_id, bucket)] += amount
        key.held[bucket] += amount

    def model_release(self, hold: MHold, state: str) -> int:
        assert hold.state == "active"
        hold.state = state
        self.held[(hold.key.account_id, hold.bucket)] -= hold.amount
        hold.key.held[hold.bucket] -= hold.amount
        return hold.amount

    # -- set-up -------------------------------------------------------------------------------

    @initialize(caps=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)), min_size=2, max_size=2))
    def setup(self, caps: list[tuple[int, int]]) -> None:
        async def make() -> list[tuple[str, str]]:
            out = []
            async with self.env.pool.acquire() as conn:
                for i in range(2):
                    account_id = core.new_id("acct")
                    await store.create_account(conn, account_id, f"sm-{i}")
                    capped = await store.create_key(
                        conn, key_id=core.new_id("key"), account_id=account_id, name="capped",
                        secret=secrets.token_urlsafe(16), prefix="sk", route_policy="auto",
                        allowed_models=[], limits=KeyLimitsNano(caps[i][0], caps[i][1], 0, 0),
                    )
                    free = await store.create_key(
                        conn, key_id=core.new_id("key"), account_id=account_id, name="free",
                        secret=secrets.token_urlsafe(16), prefix="sk", route_policy="auto",
                        allowed_models=[], limits=KeyLimitsNano(),
                    )
                    out.append((account_id, capped.id))
                    out.append((account_id, free.id))
            return out

        for i, (account_id, key_id) in enumerate(self.env.run(make())):
            cap = caps[i // 2] if i % 2 == 0 else (0, 0)
            self.keys.append(MKey(key_id, account_id, {W: cap, C: (0, 0)}))
            for b in Bucket:
                self.balance.setdefault((account_id, b), 0)
                self.held.setdefault((account_id, b), 0)

    # -- rules --------------------------------------------------------------------------------

    @rule(k=st.integers(0, 3), bucket=st.sampled_from(Bucket), amount=st.integers(1, 20_000))
    def top_up(self, k: int, bucket: Bucket, amount: int) -> None:
        account_id = self.keys[k].account_id
        op = TopUpOp(account_id, bucket, amount, "sm-" + secrets.token_hex(6))
        result = self.submit(op)
        assert not isinstance(result, TFError) and not result.replayed
        self.balance[(account_id, bucket)] += amount
        self.topups[bucket.unit] += amount
        self.topup_log.append(op)

    @precondition(lambda self: self.topup_log)
    @rule(i=st.integers(0, 1000), different=st.booleans())
    def replay_top_up(self, i: int, different: bool) -> None:
        op = self.topup_log[i % len(self.topup_log)]
        if different:
            op = TopUpOp(op.account_id, op.bucket, op.amount_nano + 1, op.idempotency_key)
        result = self.submit(op)
        if different:
            assert isinstance(result, TFError) and result.code == "conflict"
        else:
            assert not isinstance(result, TFError) and result.replayed

    @rule(k=st.integers(0, 3), bucket=st.sampled_from(Bucket), amount=amounts, ttl=st.sampled_from(TTLS))
    def hold(self, k: int, bucket: Bucket, amount: int, ttl: int) -> None:
        req = MRequest("smr-" + secrets.token_hex(6), self.keys[k])
        result = self.submit(HoldOp(req.key.account_id, req.id, req.key.id, bucket, amount, None, ttl))
        self.expect_hold(req, bucket, amount, ttl, result)
        if req.holds:
            self.requests.append(req)

    @rule(k=st.integers(0, 3), bucket=st.sampled_from(Bucket),
          sizes=st.lists(amounts, min_size=2, max_size=12), ttl=st.sampled_from(TTLS))
    def burst_of_holds(self, k: int, bucket: Bucket, sizes: list[int], ttl: int) -> None:
        """Concurrent holds on one account: one batch, applied in submission order."""
        reqs = [MRequest("smb-" + secrets.token_hex(6), self.keys[k]) for _ in sizes]
        results = self.submit_all(
            [HoldOp(r.key.account_id, r.id, r.key.id, bucket, a, None, ttl) for r, a in zip(reqs, sizes, strict=True)]
        )
        for req, amount, result in zip(reqs, sizes, results, strict=True):
            self.expect_hold(req, bucket, amount, ttl, result)
            if req.holds:
                self.requests.append(req)

    def _active(self) -> list[MRequest]:
        return [r for r in self.requests if r.settled is None and any(h.state == "active" for h in r.holds.values())]

    @precondition(lambda self: self._active())
    @rule(i=st.integers(0, 1000), amount=amounts, ttl=st.sampled_from(TTLS))
    def fallback_hold(self, i: int, amount: int, ttl: int) -> None:
        req = self._active()[i % len(self._active())]
        missing = [b for b in Bucket if b not in req.holds]
        if not missing:
            return
        bucket = missing[0]
        result = self.submit(HoldOp(req.key.account_id, req.id, req.key.id, bucket, amount, None, ttl))
        self.expect_hold(req, bucket, amount, ttl, result)

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 1000), different=st.booleans())
    def replay_hold(self, i: int, different: bool) -> None:
        req = self.requests[i % len(self.requests)]
        bucket, hold = next(iter(req.holds.items()))
        amount = hold.amount + (1 if different else 0)
        result = self.submit(HoldOp(req.key.account_id, req.id, req.key.id, bucket, amount, None, 60))
        if different:
            assert isinstance(result, TFError) and result.code == "conflict"
        else:
            assert isinstance(result, HoldResult) and result.replayed and result.hold_id == hold.hold_id

    @precondition(lambda self: [r for r in self.requests if r.settled is None])
    @rule(i=st.integers(0, 1000), pick=st.integers(0, 1), factor=st.sampled_from([0, 0.3, 1, 1.7, 3]), failed=st.booleans(),
          then_refund=st.sampled_from([None, None, 0.5, 1, 1.2]))
    def settle(self, i: int, pick: int, factor: float, failed: bool, then_refund: float | None) -> None:
        open_reqs = [r for r in self.requests if r.settled is None]
        req = open_reqs[i % len(open_reqs)]
        key = req.key
        buckets = list(req.holds)
        pay_bucket = None if failed else buckets[pick % len(buckets)]
        pay = req.holds.get(pay_bucket) if pay_bucket else None
        rated = 0 if pay is None else int(pay.amount * factor)
        status = "failed" if pay is None else "settled"
        args = (pay_bucket, rated, status)
        result = self.submit(SettleOp(key.account_id, req.id, key.id, pay_bucket, rated, status, {"n": 1}))
        if pay is not None and pay.state == "released":
            assert isinstance(result, TFError) and result.code == "invalid_request", result
            return
        assert isinstance(result, SettleResult) and not result.replayed, result
        amount = uncollected = 0
        if pay is not None:
            account_bucket = (key.account_id, pay.bucket)
            active = pay.state == "active"
            from_hold = min(rated, pay.amount) if active else 0
            extra = rated - from_hold
            room = self.available(*account_bucket)
            key_room = key.room(pay.bucket, self.today)
            if key_room is not None:
                room = min(room, key_room)
            from_extra = min(extra, max(room, 0))
            uncollected = extra - from_extra
            amount = from_hold + from_extra
            if active:
                self.model_release(pay, "captured")
            self.balance[account_bucket] -= amount
            key.add_spent(pay.bucket, amount, self.today)
            self.charged[pay.bucket.unit] += amount
        for h in req.holds.values():
            if h.state == "active":
                self.model_release(h, "released")
        assert (result.amount_nano, result.uncollected_nano) == (amount, uncollected)
        assert amount + uncollected == rated
        req.settled = result
        req.settle_args = args
        if then_refund is not None and result.amount_nano > 0:
            self._refund(req, then_refund, 0)

    @precondition(lambda self: [r for r in self.requests if r.settled is not None])
    @rule(i=st.integers(0, 1000))
    def replay_settle(self, i: int) -> None:
        done = [r for r in self.requests if r.settled is not None]
        req = done[i % len(done)]
        assert req.settle_args is not None and req.settled is not None
        bucket, rated, status = req.settle_args
        result = self.submit(SettleOp(req.key.account_id, req.id, req.key.id, bucket, rated, status, {}))
        assert isinstance(result, SettleResult) and result.replayed
        assert (result.receipt_id, result.amount_nano) == (req.settled.receipt_id, req.settled.amount_nano)

    @precondition(lambda self: [r for r in self.requests if r.settled is None])
    @rule(i=st.integers(0, 1000))
    def release(self, i: int) -> None:
        open_reqs = [r for r in self.requests if r.settled is None]
        req = open_reqs[i % len(open_reqs)]
        bucket, hold = next(iter(req.holds.items()))
        result = self.submit(ReleaseOp(req.key.account_id, req.id, bucket))
        assert not isinstance(result, TFError), result
        if hold.state == "active":
            assert (result.released_nano, result.replayed) == (hold.amount, False)
            self.model_release(hold, "released")
        else:
            assert result.replayed

    def _refundable(self) -> list[MRequest]:
        return [r for r in self.requests if r.settled is not None and r.settled.amount_nano > 0]

    @precondition(lambda self: self._refundable())
    @rule(i=st.integers(0, 1000), share=st.sampled_from([0.1, 0.5, 1, 1.2]), extra=st.sampled_from([0, 1]))
    def refund(self, i: int, share: float, extra: int) -> None:
        self._refund(self._refundable()[i % len(self._refundable())], share, extra)

    def _refund(self, req: MRequest, share: float, extra: int) -> None:
        assert req.settled is not None and req.settle_args is not None
        collected = req.settled.amount_nano
        amount = max(int(collected * share), 1) + extra
        op = RefundOp(req.key.account_id, req.settled.receipt_id, amount, "smf-" + secrets.token_hex(6))
        result = self.submit(op)
        if amount > collected - req.refunded:
            assert isinstance(result, TFError) and (result.code, result.param) == ("invalid_request", "amount_nano")
            return
        assert isinstance(result, RefundResult) and not result.replayed, result
        bucket = req.settle_args[0]
        req.refunded += amount
        assert (result.receipt_amount_nano, result.receipt_refunded_nano) == (collected, req.refunded)
        self.balance[(req.key.account_id, bucket)] += amount
        self.refunded[bucket.unit] += amount
        self.refund_log.append((op, result))

    @precondition(lambda self: self.refund_log)
    @rule(i=st.integers(0, 1000), different=st.booleans())
    def replay_refund(self, i: int, different: bool) -> None:
        op, first = self.refund_log[i % len(self.refund_log)]
        if different:
            op = RefundOp(op.account_id, op.receipt_id, op.amount_nano + 1, op.idempotency_key)
        result = self.submit(op)
        if different:
            assert isinstance(result, TFError) and result.code == "conflict"
        else:
            assert isinstance(result, RefundResult) and result.replayed and result.refund.id == first.refund.id

    @rule(k=st.integers(0, 3), bucket=st.sampled_from(Bucket), debit=st.booleans(), amount=st.integers(1, 20_000))
    def adjust(self, k: int, bucket: Bucket, debit: bool, amount: int) -> None:
        account_id = self.keys[k].account_id
        op = AdjustOp(account_id, bucket, "debit" if debit else "credit", amount, "sm", "sma-" + secrets.token_hex(6))
        result = self.submit(op)
        if debit and self.available(account_id, bucket) < amount:
            assert isinstance(result, TFError) and result.code == "insufficient_balance", result
            return
        assert isinstance(result, AdjustResult) and not result.replayed, result
        assert self.submit(op) == AdjustResult(result.adjustment, replayed=True)
        signed = -amount if debit else amount
        self.balance[(account_id, bucket)] += signed
        self.adjusted[bucket.unit] += signed

    @rule(seconds=st.sampled_from([0, 1, 2, 30, 90, 400]))
    def time_passes_and_reaper_runs(self, seconds: int) -> None:
        self.env.now += dt.timedelta(seconds=seconds)
        self.env.run(reap_once(self.env.pool, self.env.writers, self.env.now))
        for req in self.requests:
            for hold in req.holds.values():
                if hold.state == "active" and hold.expires_at <= self.env.now:
                    self.model_release(hold, "expired")

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def database_matches_model_and_conserves(self) -> None:
        if not self.keys:
            return
        accounts = sorted({k.account_id for k in self.keys})

        async def read():  # type: ignore[no-untyped-def]
            async with self.env.pool.acquire() as conn:
                buckets = await conn.fetch(
                    "SELECT account_id, bucket, balance_nano, held_nano FROM buckets WHERE account_id = ANY($1)", accounts
                )
                charged = await conn.fetch(
                    """SELECT bucket, sum(amount_nano) AS s, sum(refunded_nano) AS refunded FROM receipts
                        WHERE account_id = ANY($1) AND bucket IS NOT NULL GROUP BY bucket""", accounts
                )
                journal = await conn.fetch(
                    """SELECT account_id, bucket,
                              coalesce(sum(amount_nano) FILTER (WHERE ledger_account = 'customer'), 0) AS avail,
                              coalesce(sum(amount_nano) FILTER (WHERE ledger_account = 'holds'), 0) AS held
                         FROM postings WHERE account_id = ANY($1) GROUP BY account_id, bucket""", accounts
                )
            return buckets, charged, journal

        buckets, charged, journal = self.env.run(read())
        db_charged = {Bucket(r["bucket"]).unit: int(r["s"]) for r in charged}
        db_refunded = {Bucket(r["bucket"]).unit: int(r["refunded"]) for r in charged}
        balances = {"CNY": 0, "CREDIT": 0}
        for r in buckets:
            key = (r["account_id"], Bucket(r["bucket"]))
            assert (r["balance_nano"], r["held_nano"]) == (self.balance[key], self.held[key]), key
            assert 0 <= r["held_nano"] <= r["balance_nano"]
            balances[key[1].unit] += r["balance_nano"]
        for r in journal:
            key = (r["account_id"], Bucket(r["bucket"]))
            assert (r["avail"], r["held"]) == (self.balance[key] - self.held[key], self.held[key]), key
        for unit in ("CNY", "CREDIT"):
            assert db_charged.get(unit, 0) == self.charged[unit]
            assert db_refunded.get(unit, 0) == self.refunded[unit]
            assert self.topups[unit] + self.adjusted[unit] == balances[unit] + self.charged[unit] - self.refunded[unit], unit
        for k in self.keys:
            for b in Bucket:
                total, daily = k.caps[b]
                if total:
                    assert k.spent[b] + k.held[b] <= total


@pytest.fixture(scope="module")
def sm_env(pg_server_url: str):  # type: ignore[no-untyped-def]
    global ENV
    ENV = Env(pg_server_url)
    try:
        yield ENV
    finally:
        ENV.close()
        ENV = None


def test_ledger_state_machine(sm_env: Env) -> None:
    async def audit() -> list[str]:
        async with sm_env.pool.acquire() as conn:
            problems, _ = await store.audit(conn)
        return problems

    LedgerMachine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    LedgerMachine.TestCase().runTest()
    assert sm_env.run(audit()) == []
