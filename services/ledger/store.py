"""The asyncpg adapter: loads and locks the rows a batch of operations touches into a
`core.Book`, writes back what the book changed, and answers the read-only queries.

Concurrency: optimistic. A batch reads everything in one statement (one snapshot, no lock),
the core applies the operations in memory, and one statement writes the result, each UPDATE
conditional on the row still holding what was read, and commits. Any difference (another
ledger replica, a key revoked meanwhile) fails the whole statement and the writer re-reads
and re-applies the batch. Within one ledger process the writers are sharded by account, so
such conflicts come only from outside and are rare.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from tokenforge.ledger import core
from tokenforge.ledger.core import (
    AdjustmentRow,
    AdjustOp,
    Book,
    BucketRow,
    CloseRunOp,
    CreateRunOp,
    ExpireHoldOp,
    HoldOp,
    HoldRow,
    KeyLimitsNano,
    KeyRow,
    Op,
    ReceiptRow,
    RefundOp,
    RefundRow,
    ReleaseOp,
    RunRow,
    SettleOp,
    TopUpOp,
    TopUpRow,
)
from tokenforge.money import Bucket, format_nano

W, C = Bucket.WALLET, Bucket.CREDIT


def _b(text: str | None) -> Bucket | None:
    return None if text is None else Bucket(text)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute("SET TIME ZONE 'UTC'")


# Session settings of the writers' connections. They are sent at connect time (startup
# parameters), so they are the session's defaults: `RESET ALL`, which asyncpg's pool runs on
# every release, keeps them (a `SET` in the pool's `init` was undone after the first batch).
#
# - plan_cache_mode: the batch statements run thousands of times a second with array
#   parameters; a custom plan per execution cost ~2 ms of planning each (measured), the
#   generic plan is the same index lookups.
# - enable_seqscan: every table the batch statements touch is found through a unique index
#   (request id, idempotency key, primary key). A generic plan is made once, possibly while a
#   table is still small (a fresh database, or statistics taken before a burst), and then kept:
#   measured, the batch read then scanned all of `receipts` and `holds` on every batch (about
#   800 rows read per hold + capture pair after 10 s on the hot account, PostgreSQL CPU per
#   pair 0.56 ms against 0.30 ms on spread accounts whose tables had statistics).
# - enable_mergejoin, enable_hashjoin: for the same reason the conditional UPDATEs (`FROM
#   unnest(...) WHERE table.key = u.key`) were planned as a merge join over a full index scan
#   of `holds` (perf on the writer's backend: 18-23 % of its CPU in heap_hot_search_buffer
#   under ExecMergeJoin/IndexNext). A batch touches at most a few hundred rows, each by a
#   unique key: a nested loop of index lookups is the right plan at any table size.
WRITER_SETTINGS = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_mergejoin": "off",
    "enable_hashjoin": "off",
}


async def init_writer_connection(conn: asyncpg.Connection) -> None:
    await init_connection(conn)


async def create_pool(url: str, *, min_size: int, max_size: int, writer: bool = False) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=init_writer_connection if writer else init_connection,
        command_timeout=60,
        server_settings=WRITER_SETTINGS if writer else None,
    )
    assert pool is not None
    return pool


# ---------------------------------------------------------------------------------------------
# Loading a book


_KEY_COLS = """id, account_id, name, revoked, wallet_total_nano, wallet_daily_nano,
    credit_total_nano, credit_daily_nano, spent_wallet_nano, spent_credit_nano,
    held_wallet_nano, held_credit_nano, day, day_wallet_nano, day_credit_nano"""

_RUN_COLS = """id, key_id, account_id, name, status, budget_wallet_nano, budget_credit_nano,
    reserved_wallet_nano, reserved_credit_nano, spent_wallet_nano, spent_credit_nano,
    expires_at, created_at, closed_at"""

_HOLD_COLS = """id, request_id, bucket, account_id, key_id, run_id, run_funded, amount_nano,
    state, captured_nano, released_nano, ttl_s, expires_at, created_at, closed_at"""

_RECEIPT_COLS = """id, request_id, key_id, account_id, run_id, run_step, status, bucket, rated_nano,
    amount_nano, uncollected_nano, held_nano, released_nano, refunded_nano, created_at, unsettled"""

_REFUND_COLS = "id, idempotency_key, receipt_id, account_id, bucket, amount_nano, reason, created_at"

_ADJUSTMENT_COLS = "id, idempotency_key, account_id, bucket, direction, amount_nano, reason, created_at"


def _key_row(r: asyncpg.Record) -> KeyRow:
    return KeyRow(
        id=r["id"],
        account_id=r["account_id"],
        name=r["name"],
        revoked=r["revoked"],
        limits=KeyLimitsNano(
            r["wallet_total_nano"], r["wallet_daily_nano"], r["credit_total_nano"], r["credit_daily_nano"]
        ),
        spent={W: r["spent_wallet_nano"], C: r["spent_credit_nano"]},
        held={W: r["held_wallet_nano"], C: r["held_credit_nano"]},
        day=r["day"],
        day_spent={W: r["day_wallet_nano"], C: r["day_credit_nano"]},
    )


def _run_row(r: asyncpg.Record) -> RunRow:
    return RunRow(
        id=r["id"],
        key_id=r["key_id"],
        account_id=r["account_id"],
        name=r["name"],
        status=r["status"],
        budget={W: r["budget_wallet_nano"], C: r["budget_credit_nano"]},
        reserved={W: r["reserved_wallet_nano"], C: r["reserved_credit_nano"]},
        spent={W: r["spent_wallet_nano"], C: r["spent_credit_nano"]},
        expires_at=r["expires_at"],
        created_at=r["created_at"],
        closed_at=r["closed_at"],
    )


def _hold_row(r: asyncpg.Record) -> HoldRow:
    return HoldRow(
        id=r["id"],
        request_id=r["request_id"],
        bucket=Bucket(r["bucket"]),
        account_id=r["account_id"],
        key_id=r["key_id"],
        run_id=r["run_id"],
        run_funded=r["run_funded"],
        amount_nano=r["amount_nano"],
        state=r["state"],
        captured_nano=r["captured_nano"],
        released_nano=r["released_nano"],
        ttl_s=r["ttl_s"],
        expires_at=r["expires_at"],
        created_at=r["created_at"],
        closed_at=r["closed_at"],
    )


@dataclass
class Snapshot:
    """The values a batch read, to check at write time that nobody changed them since."""

    buckets: dict[tuple[str, Bucket], tuple[int, int]]
    keys: dict[str, tuple[Any, ...]]
    holds: dict[tuple[str, Bucket], str]
    runs: dict[str, tuple[Any, ...]]
    receipts_refunded: dict[str, int]  # receipt id → refunded_nano, of receipts refunds name


def key_version(k: KeyRow) -> tuple[Any, ...]:
    return (k.revoked, k.spent[W], k.spent[C], k.held[W], k.held[C], k.day, k.day_spent[W], k.day_spent[C])


def run_version(r: RunRow) -> tuple[Any, ...]:
    return (r.status, r.reserved[W], r.reserved[C], r.spent[W], r.spent[C])


def _ts(value: Any) -> Any:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _json_rows(text: str | None) -> list[dict[str, Any]]:
    return orjson.loads(text) if text else []


_LOAD_SQL = f"""
WITH h AS (SELECT {_HOLD_COLS} FROM holds
            WHERE request_id = ANY($2::text[]) AND account_id = ANY($1::text[])),
     r AS (SELECT {_RUN_COLS} FROM runs
            WHERE id IN (SELECT unnest($3::text[]) UNION SELECT run_id FROM h)
              AND account_id = ANY($1::text[]))
SELECT
  (SELECT json_agg(t) FROM (SELECT account_id, bucket, balance_nano, held_nano FROM buckets
                             WHERE account_id = ANY($1::text[])) t) AS buckets,
  (SELECT json_agg(h) FROM h) AS holds,
  (SELECT json_agg(r) FROM r) AS runs,
  (SELECT json_agg(t) FROM (SELECT {_KEY_COLS} FROM keys
                             WHERE id IN (SELECT unnest($4::text[]) UNION SELECT key_id FROM h
                                          UNION SELECT key_id FROM r)
                               AND account_id = ANY($1::text[])) t) AS keys,
  (SELECT json_agg(t) FROM (SELECT {_RECEIPT_COLS}
                              FROM receipts WHERE request_id = ANY($5::text[])) t) AS receipts,
  (SELECT json_agg(t) FROM (SELECT id, idempotency_key, account_id, bucket, amount_nano, created_at
                              FROM topups WHERE idempotency_key = ANY($6::text[])) t) AS topups
"""

# Only a batch with a refund or an adjustment reads these (a second prepared statement: the
# hot path's read stays as it was).
_LOAD_ADMIN_SQL = _LOAD_SQL + f""",
  (SELECT json_agg(t) FROM (SELECT {_RECEIPT_COLS}
                              FROM receipts WHERE id = ANY($7::text[])) t) AS receipts_by_id,
  (SELECT json_agg(t) FROM (SELECT {_REFUND_COLS}
                              FROM refunds WHERE idempotency_key = ANY($8::text[])) t) AS refunds,
  (SELECT json_agg(t) FROM (SELECT {_ADJUSTMENT_COLS}
                              FROM adjustments WHERE idempotency_key = ANY($9::text[])) t) AS adjustments
"""


def _receipt_row(r: dict[str, Any]) -> ReceiptRow:
    return ReceiptRow(
        id=r["id"],
        request_id=r["request_id"],
        key_id=r["key_id"],
        account_id=r["account_id"],
        run_id=r["run_id"],
        run_step=r["run_step"],
        status=r["status"],
        bucket=_b(r["bucket"]),
        rated_nano=r["rated_nano"],
        amount_nano=r["amount_nano"],
        uncollected_nano=r["uncollected_nano"],
        held_nano=r["held_nano"],
        released_nano=r["released_nano"],
        created_at=_ts(r["created_at"]),
        refunded_nano=r["refunded_nano"],
        unsettled=r["unsettled"],
    )


async def load_book(conn: asyncpg.Connection, ops: Sequence[Op], book: Book) -> Snapshot:
    """Read everything `ops` may touch into `book`, in ONE statement (so one consistent
    snapshot, one round trip, no lock held). `write_book` later checks nothing changed."""
    account_ids: set[str] = set()
    request_ids: set[str] = set()
    settle_ids: list[str] = []
    key_ids: set[str] = set()
    run_ids: set[str] = set()
    topup_keys: list[str] = []
    refund_receipt_ids: list[str] = []
    refund_keys: list[str] = []
    adjustment_keys: list[str] = []
    for op in ops:
        account_ids.add(op.account_id)
        if isinstance(op, HoldOp | SettleOp):
            request_ids.add(op.request_id)
            key_ids.add(op.key_id)
            if op.run_id:
                run_ids.add(op.run_id)
            if isinstance(op, SettleOp):
                settle_ids.append(op.request_id)
        elif isinstance(op, ReleaseOp):
            request_ids.add(op.request_id)
        elif isinstance(op, ExpireHoldOp):  # the last hold's expiry writes a receipt if none exists
            request_ids.add(op.request_id)
            settle_ids.append(op.request_id)
        elif isinstance(op, TopUpOp):
            topup_keys.append(op.idempotency_key)
        elif isinstance(op, CreateRunOp):
            key_ids.add(op.key_id)
        elif isinstance(op, CloseRunOp):
            run_ids.add(op.run_id)
        elif isinstance(op, RefundOp):
            refund_receipt_ids.append(op.receipt_id)
            refund_keys.append(op.idempotency_key)
        elif isinstance(op, AdjustOp):
            adjustment_keys.append(op.idempotency_key)

    args = [list(account_ids), list(request_ids), list(run_ids), list(key_ids), settle_ids, topup_keys]
    admin = bool(refund_keys or adjustment_keys)
    if admin:
        row = await conn.fetchrow(_LOAD_ADMIN_SQL, *args, refund_receipt_ids, refund_keys, adjustment_keys)
    else:
        row = await conn.fetchrow(_LOAD_SQL, *args)
    assert row is not None
    snap = Snapshot({}, {}, {}, {}, {})
    for r in _json_rows(row["buckets"]):
        bucket = Bucket(r["bucket"])
        book.buckets[(r["account_id"], bucket)] = BucketRow(r["account_id"], bucket, r["balance_nano"], r["held_nano"])
        snap.buckets[(r["account_id"], bucket)] = (r["balance_nano"], r["held_nano"])
    for r in _json_rows(row["holds"]):
        for col in ("expires_at", "created_at", "closed_at"):
            r[col] = _ts(r[col])
        hold = _hold_row(r)
        book.holds[(hold.request_id, hold.bucket)] = hold
        snap.holds[(hold.request_id, hold.bucket)] = hold.state
    for r in _json_rows(row["runs"]):
        for col in ("expires_at", "created_at", "closed_at"):
            r[col] = _ts(r[col])
        run = _run_row(r)
        book.runs[run.id] = run
        snap.runs[run.id] = run_version(run)
    for r in _json_rows(row["keys"]):
        if r["day"] is not None:
            r["day"] = dt.date.fromisoformat(r["day"])
        key = _key_row(r)
        book.keys[key.id] = key
        snap.keys[key.id] = key_version(key)
    for r in _json_rows(row["receipts"]):
        book.receipts[r["request_id"]] = _receipt_row(r)
    for r in _json_rows(row["topups"]):
        book.topups[r["idempotency_key"]] = TopUpRow(
            r["id"], r["idempotency_key"], r["account_id"], Bucket(r["bucket"]), r["amount_nano"],
            _ts(r["created_at"]),
        )
    if admin:
        _load_admin(row, book, snap)
    return snap


def _load_admin(row: asyncpg.Record, book: Book, snap: Snapshot) -> None:
    """The receipts refunds name, and earlier refunds and adjustments by idempotency key."""
    loaded = {r.id: r for r in book.receipts.values()}
    for r in _json_rows(row["receipts_by_id"]):
        # One object per receipt, also when a settle replay of the batch loaded it too.
        receipt = loaded.get(r["id"]) or _receipt_row(r)
        book.receipts_by_id[receipt.id] = receipt
        snap.receipts_refunded[receipt.id] = receipt.refunded_nano
    for r in _json_rows(row["refunds"]):
        book.refunds[r["idempotency_key"]] = RefundRow(
            r["id"], r["idempotency_key"], r["receipt_id"], r["account_id"], Bucket(r["bucket"]),
            r["amount_nano"], r["reason"], _ts(r["created_at"]),
        )
    for r in _json_rows(row["adjustments"]):
        book.adjustments[r["idempotency_key"]] = AdjustmentRow(
            r["id"], r["idempotency_key"], r["account_id"], Bucket(r["bucket"]), r["direction"],
            r["amount_nano"], r["reason"], _ts(r["created_at"]),
        )


# ---------------------------------------------------------------------------------------------
# Writing a book back: ONE statement (data-modifying CTEs over unnest()ed arrays), whatever the
# batch size: one round trip instead of one per table, which matters on a busy 2-core machine
# where every round trip is also a pair of context switches.


class _Writes:
    """Collects `WITH name AS (sql)` parts and their array parameters.

    A part with `expect=True` is a conditional UPDATE (`... RETURNING 1`) that must touch one
    row per input row: fewer means a row changed since the batch read it, and the statement
    fails as a whole (ledger_check raises serialization_failure), so nothing is written.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []
        self.checks: list[tuple[str, int]] = []

    def add(
        self, name: str, sql: str, types: Sequence[str], rows: Sequence[Any], *getters: Any, expect: bool = False,
        absent: bool = False,
    ) -> None:
        """`expect`: the part must return one row per input row; `absent`: it must return none."""
        if not rows:
            return
        assert len(types) == len(getters)
        first = len(self.args) + 1
        params = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))
        self.parts.append(f"{name} AS ({sql.replace('{params}', params)})")
        self.args.extend(_cols(rows, *getters))
        if expect:
            self.checks.append((name, len(rows)))
        elif absent:
            self.checks.append((name, 0))

    def statement(self) -> str | None:
        if not self.parts:
            return None
        # The expected counts are parameters, not literals: the statement's text then depends
        # only on which tables the batch touches, so its prepared plan is reused.
        conds = []
        for name, n in self.checks:
            self.args.append(n)
            conds.append(f"(SELECT count(*) FROM {name}) = ${len(self.args)}::bigint")
        return "WITH " + ",\n".join(self.parts) + f"\nSELECT ledger_check({' AND '.join(conds) or 'true'})"


_RECEIPT_GETTERS = (
    lambda r: r.id, lambda r: r.request_id, lambda r: r.key_id, lambda r: r.account_id,
    lambda r: r.run_id, lambda r: r.run_step, lambda r: r.status,
    lambda r: r.bucket.value if r.bucket else None, lambda r: r.rated_nano,
    lambda r: r.amount_nano, lambda r: r.uncollected_nano, lambda r: r.held_nano,
    lambda r: r.released_nano, lambda r: r.created_at, lambda r: r.body_json, lambda r: r.unsettled,
)


def _cols(rows: Iterable[Any], *getters: Any) -> list[list[Any]]:
    out: list[list[Any]] = [[] for _ in getters]
    for row in rows:
        for i, get in enumerate(getters):
            out[i].append(get(row))
    return out


async def write_book(conn: asyncpg.Connection, book: Book, snap: Snapshot, fresh_requests: Sequence[str] = (),
                     known_holds: Sequence[tuple[str, str]] = ()) -> None:
    """Write what the batch changed in ONE statement, committed on its own (autocommit).

    Every updated row is updated only if it still holds the values the batch read (`snap`);
    rows the batch created are protected by unique keys (request id + bucket, receipt per
    request, the idempotency keys of top-ups, refunds and adjustments); no request of
    `fresh_requests` may have a hold yet (a batch that did not read them believes so), and the
    requests of `known_holds` ((request id, account id), one per hold the batch took from the
    row cache) have no hold in that account besides those. Any check failing raises, and the
    batch is re-read and re-applied by the writer.
    """
    w = _Writes()
    w.add("fresh_requests", "SELECT 1 FROM holds WHERE request_id = ANY({params})", ["text"], fresh_requests,
          lambda r: r, absent=True)
    w.add("known_holds",
          """SELECT 1 FROM holds WHERE (request_id, account_id) IN
               (SELECT DISTINCT r, a FROM unnest({params}) AS u(r, a))""",
          ["text", "text"], known_holds, lambda k: k[0], lambda k: k[1], expect=True)
    w.add(
        "new_runs",
        """INSERT INTO runs (id, key_id, account_id, name, status, budget_wallet_nano,
               budget_credit_nano, reserved_wallet_nano, reserved_credit_nano, spent_wallet_nano,
               spent_credit_nano, estimate, expires_at, created_at, closed_at)
           SELECT * FROM unnest({params})""",
        ["text", "text", "text", "text", "text", "bigint", "bigint", "bigint", "bigint", "bigint",
         "bigint", "jsonb", "timestamptz", "timestamptz", "timestamptz"],
        [r for r in book.runs.values() if r.new],
        lambda r: r.id, lambda r: r.key_id, lambda r: r.account_id, lambda r: r.name,
        lambda r: r.status, lambda r: r.budget[W], lambda r: r.budget[C], lambda r: r.reserved[W],
        lambda r: r.reserved[C], lambda r: r.spent[W], lambda r: r.spent[C],
        lambda r: r.estimate_json, lambda r: r.expires_at, lambda r: r.created_at,
        lambda r: r.closed_at,
    )
    w.add(
        "runs_changed",
        """UPDATE runs SET status = u.status, reserved_wallet_nano = u.rw,
               reserved_credit_nano = u.rc, spent_wallet_nano = u.sw, spent_credit_nano = u.sc,
               closed_at = u.closed_at
             FROM unnest({params}) AS u(id, status, rw, rc, sw, sc, closed_at,
                                        o_status, o_rw, o_rc, o_sw, o_sc)
            WHERE runs.id = u.id AND runs.status = u.o_status
              AND runs.reserved_wallet_nano = u.o_rw AND runs.reserved_credit_nano = u.o_rc
              AND runs.spent_wallet_nano = u.o_sw AND runs.spent_credit_nano = u.o_sc
            RETURNING 1""",
        ["text", "text", "bigint", "bigint", "bigint", "bigint", "timestamptz",
         "text", "bigint", "bigint", "bigint", "bigint"],
        [r for r in book.runs.values() if r.dirty and not r.new],
        lambda r: r.id, lambda r: r.status, lambda r: r.reserved[W], lambda r: r.reserved[C],
        lambda r: r.spent[W], lambda r: r.spent[C], lambda r: r.closed_at,
        lambda r: snap.runs[r.id][0], lambda r: snap.runs[r.id][1], lambda r: snap.runs[r.id][2],
        lambda r: snap.runs[r.id][3], lambda r: snap.runs[r.id][4],
        expect=True,
    )
    w.add(
        "new_topups",
        """INSERT INTO topups (id, idempotency_key, account_id, bucket, amount_nano, created_at)
           SELECT * FROM unnest({params})""",
        ["text", "text", "text", "text", "bigint", "timestamptz"],
        book.new_topups,
        lambda t: t.id, lambda t: t.idempotency_key, lambda t: t.account_id,
        lambda t: t.bucket.value, lambda t: t.amount_nano, lambda t: t.created_at,
    )
    w.add(
        "new_holds",
        f"INSERT INTO holds ({_HOLD_COLS}, unsettled_receipt) SELECT * FROM unnest({{params}})",
        ["text", "text", "text", "text", "text", "text", "bool", "bigint", "text", "bigint",
         "bigint", "int", "timestamptz", "timestamptz", "timestamptz", "text"],
        [h for h in book.holds.values() if h.new],
        lambda h: h.id, lambda h: h.request_id, lambda h: h.bucket.value, lambda h: h.account_id,
        lambda h: h.key_id, lambda h: h.run_id, lambda h: h.run_funded, lambda h: h.amount_nano,
        lambda h: h.state, lambda h: h.captured_nano, lambda h: h.released_nano,
        lambda h: h.ttl_s, lambda h: h.expires_at, lambda h: h.created_at, lambda h: h.closed_at,
        lambda h: h.unsettled_receipt,
    )
    w.add(
        "holds_changed",
        """UPDATE holds SET state = u.state, captured_nano = u.captured,
               released_nano = u.released, closed_at = u.closed_at
             FROM unnest({params}) AS u(request_id, bucket, state, captured, released, closed_at, o_state)
            WHERE holds.request_id = u.request_id AND holds.bucket = u.bucket
              AND holds.state = u.o_state
            RETURNING 1""",
        ["text", "text", "text", "bigint", "bigint", "timestamptz", "text"],
        [h for h in book.holds.values() if h.dirty and not h.new],
        lambda h: h.request_id, lambda h: h.bucket.value, lambda h: h.state,
        lambda h: h.captured_nano, lambda h: h.released_nano, lambda h: h.closed_at,
        lambda h: snap.holds[(h.request_id, h.bucket)],
        expect=True,
    )
    w.add(
        "buckets_changed",
        """UPDATE buckets SET balance_nano = u.balance, held_nano = u.held
             FROM unnest({params}) AS u(account_id, bucket, balance, held, o_balance, o_held)
            WHERE buckets.account_id = u.account_id AND buckets.bucket = u.bucket
              AND buckets.balance_nano = u.o_balance AND buckets.held_nano = u.o_held
            RETURNING 1""",
        ["text", "text", "bigint", "bigint", "bigint", "bigint"],
        [b for b in book.buckets.values() if b.dirty],
        lambda b: b.account_id, lambda b: b.bucket.value, lambda b: b.balance_nano,
        lambda b: b.held_nano, lambda b: snap.buckets[(b.account_id, b.bucket)][0],
        lambda b: snap.buckets[(b.account_id, b.bucket)][1],
        expect=True,
    )
    w.add(
        "keys_changed",
        """UPDATE keys SET spent_wallet_nano = u.sw, spent_credit_nano = u.sc,
               held_wallet_nano = u.hw, held_credit_nano = u.hc, day = u.day,
               day_wallet_nano = u.dw, day_credit_nano = u.dc
             FROM unnest({params}) AS u(id, sw, sc, hw, hc, day, dw, dc,
                                        o_revoked, o_sw, o_sc, o_hw, o_hc, o_day, o_dw, o_dc)
            WHERE keys.id = u.id AND keys.revoked = u.o_revoked
              AND keys.spent_wallet_nano = u.o_sw AND keys.spent_credit_nano = u.o_sc
              AND keys.held_wallet_nano = u.o_hw AND keys.held_credit_nano = u.o_hc
              AND keys.day IS NOT DISTINCT FROM u.o_day
              AND keys.day_wallet_nano = u.o_dw AND keys.day_credit_nano = u.o_dc
            RETURNING 1""",
        ["text", "bigint", "bigint", "bigint", "bigint", "date", "bigint", "bigint",
         "bool", "bigint", "bigint", "bigint", "bigint", "date", "bigint", "bigint"],
        [k for k in book.keys.values() if k.dirty],
        lambda k: k.id, lambda k: k.spent[W], lambda k: k.spent[C], lambda k: k.held[W],
        lambda k: k.held[C], lambda k: k.day, lambda k: k.day_spent[W], lambda k: k.day_spent[C],
        *[(lambda k, i=i: snap.keys[k.id][i]) for i in range(8)],
        expect=True,
    )
    w.add(
        "new_receipts",
        """INSERT INTO receipts (id, request_id, key_id, account_id, run_id, run_step, status,
               bucket, rated_nano, amount_nano, uncollected_nano, held_nano, released_nano,
               created_at, body, unsettled)
           SELECT * FROM unnest({params})""",
        ["text", "text", "text", "text", "text", "text", "text", "text", "bigint", "bigint",
         "bigint", "bigint", "bigint", "timestamptz", "jsonb", "bool"],
        [r for r in book.new_receipts if not r.replaces],
        *_RECEIPT_GETTERS,
    )
    # A late Settle replaces the reaper's `failed` receipt of an unsettled request, only if it
    # is still that one (another ledger process may have replaced it meanwhile).
    w.add(
        "receipts_replaced",
        """UPDATE receipts SET run_id = u.run_id, run_step = u.run_step, status = u.status,
               bucket = u.bucket, rated_nano = u.rated_nano, amount_nano = u.amount_nano,
               uncollected_nano = u.uncollected_nano, held_nano = u.held_nano,
               released_nano = u.released_nano, created_at = u.created_at, body = u.body,
               unsettled = u.unsettled
             FROM unnest({params}) AS u(id, request_id, key_id, account_id, run_id, run_step,
                  status, bucket, rated_nano, amount_nano, uncollected_nano, held_nano,
                  released_nano, created_at, body, unsettled)
            WHERE receipts.id = u.id AND receipts.request_id = u.request_id AND receipts.unsettled
            RETURNING 1""",
        ["text", "text", "text", "text", "text", "text", "text", "text", "bigint", "bigint",
         "bigint", "bigint", "bigint", "timestamptz", "jsonb", "bool"],
        [r for r in book.new_receipts if r.replaces],
        *_RECEIPT_GETTERS,
        expect=True,
    )
    # A refund raises its receipt's refunded total only if nobody else did meanwhile (another
    # ledger process): compare-and-set like every other row; the CHECK refunded_nano <=
    # amount_nano in the table is the last line of defence. The receipt's JSON shows the total.
    w.add(
        "receipts_refunded",
        """UPDATE receipts SET refunded_nano = u.refunded,
               body = jsonb_set(body, '{refunded}', to_jsonb(u.refunded_text))
             FROM unnest({params}) AS u(id, refunded, refunded_text, o_refunded)
            WHERE receipts.id = u.id AND receipts.refunded_nano = u.o_refunded
            RETURNING 1""",
        ["text", "bigint", "text", "bigint"],
        [r for r in book.receipts_by_id.values() if r.dirty],
        lambda r: r.id, lambda r: r.refunded_nano, lambda r: format_nano(r.refunded_nano),
        lambda r: snap.receipts_refunded[r.id],
        expect=True,
    )
    w.add(
        "new_refunds",
        f"INSERT INTO refunds ({_REFUND_COLS}) SELECT * FROM unnest({{params}})",
        ["text", "text", "text", "text", "text", "bigint", "text", "timestamptz"],
        book.new_refunds,
        lambda r: r.id, lambda r: r.idempotency_key, lambda r: r.receipt_id, lambda r: r.account_id,
        lambda r: r.bucket.value, lambda r: r.amount_nano, lambda r: r.reason, lambda r: r.created_at,
    )
    w.add(
        "new_adjustments",
        f"INSERT INTO adjustments ({_ADJUSTMENT_COLS}) SELECT * FROM unnest({{params}})",
        ["text", "text", "text", "text", "text", "bigint", "text", "timestamptz"],
        book.new_adjustments,
        lambda a: a.id, lambda a: a.idempotency_key, lambda a: a.account_id, lambda a: a.bucket.value,
        lambda a: a.direction, lambda a: a.amount_nano, lambda a: a.reason, lambda a: a.created_at,
    )
    # WITH ORDINALITY + ORDER BY: ids follow the order in which the batch applied operations.
    w.add(
        "new_transfers",
        """INSERT INTO transfers (at, kind, unit, src, dst, amount_nano, account_id, bucket,
               key_id, ref, receipt_id, balance_after_nano)
           SELECT at, kind, unit, src, dst, amount_nano, account_id, bucket, key_id, ref,
                  receipt_id, balance_after_nano
             FROM unnest({params}) WITH ORDINALITY AS t(at, kind, unit, src, dst, amount_nano,
                  account_id, bucket, key_id, ref, receipt_id, balance_after_nano, n)
            ORDER BY n""",
        ["timestamptz", "text", "text", "text", "text", "bigint", "text", "text", "text", "text",
         "text", "bigint"],
        book.transfers,
        lambda t: t.at, lambda t: t.kind, lambda t: t.unit, lambda t: t.src, lambda t: t.dst,
        lambda t: t.amount_nano, lambda t: t.account_id, lambda t: t.bucket.value,
        lambda t: t.key_id, lambda t: t.ref, lambda t: t.receipt_id,
        lambda t: t.balance_after_nano,
    )
    sql = w.statement()
    if sql is not None:
        await conn.fetchval(sql, *w.args)


# ---------------------------------------------------------------------------------------------
# Read side and admin writes that move no money


@dataclass(frozen=True, slots=True)
class BucketBalance:
    bucket: Bucket
    balance_nano: int
    held_nano: int

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.held_nano


@dataclass(frozen=True, slots=True)
class AccountRecord:
    id: str
    name: str
    created_at: dt.datetime
    buckets: dict[Bucket, BucketBalance]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    account_id: str
    name: str
    prefix: str
    route_policy: str
    allowed_models: list[str]
    limits: KeyLimitsNano
    revoked: bool
    created_at: dt.datetime
    spent: dict[Bucket, int]


_KEY_RECORD_COLS = """id, account_id, name, prefix, route_policy, allowed_models,
    wallet_total_nano, wallet_daily_nano, credit_total_nano, credit_daily_nano, revoked,
    created_at, spent_wallet_nano, spent_credit_nano"""


def _key_record(r: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=r["id"],
        account_id=r["account_id"],
        name=r["name"],
        prefix=r["prefix"],
        route_policy=r["route_policy"],
        allowed_models=list(r["allowed_models"]),
        limits=KeyLimitsNano(
            r["wallet_total_nano"], r["wallet_daily_nano"], r["credit_total_nano"], r["credit_daily_nano"]
        ),
        revoked=r["revoked"],
        created_at=r["created_at"],
        spent={W: r["spent_wallet_nano"], C: r["spent_credit_nano"]},
    )


async def create_account(conn: asyncpg.Connection, account_id: str, name: str) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, $2)", account_id, name)
        await conn.execute(
            """INSERT INTO buckets (account_id, bucket, unit) VALUES
                   ($1, 'wallet', 'CNY'), ($1, 'credit', 'CREDIT')""",
            account_id,
        )


async def get_account(conn: asyncpg.Connection, account_id: str) -> AccountRecord | None:
    rows = await conn.fetch(
        """SELECT a.id, a.name, a.created_at, b.bucket, b.balance_nano, b.held_nano
             FROM accounts a JOIN buckets b ON b.account_id = a.id
            WHERE a.id = $1""",
        account_id,
    )
    if not rows:
        return None
    buckets = {
        Bucket(r["bucket"]): BucketBalance(Bucket(r["bucket"]), r["balance_nano"], r["held_nano"])
        for r in rows
    }
    return AccountRecord(rows[0]["id"], rows[0]["name"], rows[0]["created_at"], buckets)


async def create_key(
    conn: asyncpg.Connection,
    *,
    key_id: str,
    account_id: str,
    name: str,
    secret: str,
    prefix: str,
    route_policy: str,
    allowed_models: list[str],
    limits: KeyLimitsNano,
) -> KeyRecord:
    r = await conn.fetchrow(
        f"""INSERT INTO keys (id, account_id, name, secret_sha256, prefix, route_policy,
                allowed_models, wallet_total_nano, wallet_daily_nano, credit_total_nano,
                credit_daily_nano)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            RETURNING {_KEY_RECORD_COLS}""",
        key_id, account_id, name, secret_hash(secret), prefix, route_policy, allowed_models,
        limits.wallet_total, limits.wallet_daily, limits.credit_total, limits.credit_daily,
    )
    assert r is not None
    return _key_record(r)


async def key_by_hash(conn: asyncpg.Connection, digest: bytes) -> tuple[KeyRecord, bytes] | None:
    r = await conn.fetchrow(
        f"SELECT {_KEY_RECORD_COLS}, secret_sha256 FROM keys WHERE secret_sha256 = $1", digest
    )
    return None if r is None else (_key_record(r), bytes(r["secret_sha256"]))


async def get_key(conn: asyncpg.Connection, key_id: str) -> KeyRecord | None:
    r = await conn.fetchrow(f"SELECT {_KEY_RECORD_COLS} FROM keys WHERE id = $1", key_id)
    return None if r is None else _key_record(r)


async def list_keys(conn: asyncpg.Connection, account_id: str) -> list[KeyRecord]:
    rows = await conn.fetch(
        f"SELECT {_KEY_RECORD_COLS} FROM keys WHERE account_id = $1 ORDER BY created_at, id",
        account_id,
    )
    return [_key_record(r) for r in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> KeyRecord | None:
    r = await conn.fetchrow(
        f"""UPDATE keys SET revoked = true, revoked_at = coalesce(revoked_at, now())
             WHERE id = $1 RETURNING {_KEY_RECORD_COLS}""",
        key_id,
    )
    return None if r is None else _key_record(r)


async def account_of_key(conn: asyncpg.Connection, key_id: str) -> str | None:
    return await conn.fetchval("SELECT account_id FROM keys WHERE id = $1", key_id)


async def account_of_request(conn: asyncpg.Connection, request_id: str) -> str | None:
    return await conn.fetchval(
        "SELECT account_id FROM holds WHERE request_id = $1 LIMIT 1", request_id
    )


async def account_of_receipt(conn: asyncpg.Connection, receipt_id: str) -> str | None:
    return await conn.fetchval("SELECT account_id FROM receipts WHERE id = $1", receipt_id)


async def account_of_run(conn: asyncpg.Connection, run_id: str) -> str | None:
    return await conn.fetchval("SELECT account_id FROM runs WHERE id = $1", run_id)


async def open_runs_of_key(conn: asyncpg.Connection, key_id: str) -> list[tuple[str, str]]:
    """(run id, account id) of the key's runs that are still open."""
    rows = await conn.fetch("SELECT id, account_id FROM runs WHERE key_id = $1 AND status = 'open'", key_id)
    return [(r["id"], r["account_id"]) for r in rows]


async def expired_holds(conn: asyncpg.Connection, now: dt.datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT account_id, request_id, bucket, unsettled_receipt FROM holds
            WHERE state = 'active' AND expires_at <= $1 ORDER BY expires_at LIMIT $2""",
        now,
        limit,
    )


async def receipt_id_taken(conn: asyncpg.Connection, receipt_id: str, request_id: str) -> bool:
    """Whether another request's receipt has this id."""
    return bool(await conn.fetchval(
        "SELECT 1 FROM receipts WHERE id = $1 AND request_id <> $2", receipt_id, request_id))


async def expired_runs(conn: asyncpg.Connection, now: dt.datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT account_id, id FROM runs
            WHERE status = 'open' AND expires_at <= $1 ORDER BY expires_at LIMIT $2""",
        now,
        limit,
    )


# -- receipts -----------------------------------------------------------------------------------


async def get_receipt(conn: asyncpg.Connection, receipt_id: str, key_id: str | None) -> str | None:
    if key_id:
        return await conn.fetchval(
            "SELECT body::text FROM receipts WHERE id = $1 AND key_id = $2", receipt_id, key_id
        )
    return await conn.fetchval("SELECT body::text FROM receipts WHERE id = $1", receipt_id)


async def list_receipts(
    conn: asyncpg.Connection,
    *,
    key_id: str | None,
    account_id: str | None,
    run_id: str | None,
    limit: int,
    after: str | None,
) -> tuple[list[tuple[str, str]], bool]:
    """Newest first; `after` is the id of the last receipt of the previous page."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("key_id", key_id), ("account_id", account_id), ("run_id", run_id)):
        if value:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    assert where, "at least one filter"
    if after:
        args.append(after)
        where.append(f"seq < coalesce((SELECT seq FROM receipts WHERE id = ${len(args)}), 0)")
    args.append(limit + 1)
    rows = await conn.fetch(
        f"""SELECT id, body::text AS body FROM receipts WHERE {' AND '.join(where)}
             ORDER BY seq DESC LIMIT ${len(args)}""",
        *args,
    )
    has_more = len(rows) > limit
    return [(r["id"], r["body"]) for r in rows[:limit]], has_more


async def receipt_exists(
    conn: asyncpg.Connection, receipt_id: str, *, key_id: str | None = None, account_id: str | None = None
) -> bool:
    """Whether the receipt exists (and belongs to the key / account, when given)."""
    return bool(await conn.fetchval(
        """SELECT 1 FROM receipts WHERE id = $1 AND ($2::text IS NULL OR key_id = $2)
             AND ($3::text IS NULL OR account_id = $3)""",
        receipt_id, key_id, account_id,
    ))


# -- statements ----------------------------------------------------------------------------------

STATEMENT_KINDS = ["topup", "capture", "uncollected", "refund", "adjustment"]


@dataclass(frozen=True, slots=True)
class StatementRow:
    id: int
    at: dt.datetime
    kind: str
    bucket: Bucket
    amount_nano: int
    balance_nano: int
    receipt_id: str | None
    key_id: str | None


async def statement(
    conn: asyncpg.Connection,
    *,
    key_id: str | None,
    account_id: str | None,
    bucket: Bucket | None,
    limit: int,
    after: int | None,
) -> tuple[list[StatementRow], bool]:
    """Entries that change a customer balance, oldest first.

    For an account the running balance is the bucket's balance after the entry (stored with
    the transfer). For a key it is the key's own running net (its charges only), so a key
    never sees what other keys of the account did.
    """
    buckets = [bucket.value] if bucket else ["wallet", "credit"]
    signed = """CASE WHEN kind = 'uncollected' THEN 0
                     WHEN dst = 'customer' THEN amount_nano ELSE -amount_nano END"""
    if key_id:
        rows = await conn.fetch(
            f"""SELECT * FROM (
                  SELECT id, at, kind, bucket, {signed} AS amount, receipt_id, key_id,
                         sum({signed}) OVER (PARTITION BY bucket ORDER BY id) AS running
                    FROM transfers
                   WHERE account_id = (SELECT account_id FROM keys WHERE id = $1)
                     AND key_id = $1 AND bucket = ANY($2::text[]) AND kind = ANY($3::text[])
                ) s WHERE id > $4 ORDER BY id LIMIT $5""",
            key_id, buckets, STATEMENT_KINDS, after or 0, limit + 1,
        )
    else:
        rows = await conn.fetch(
            f"""SELECT id, at, kind, bucket, {signed} AS amount, receipt_id, key_id,
                       balance_after_nano AS running
                  FROM transfers
                 WHERE account_id = $1 AND bucket = ANY($2::text[]) AND kind = ANY($3::text[])
                   AND id > $4
                 ORDER BY id LIMIT $5""",
            account_id, buckets, STATEMENT_KINDS, after or 0, limit + 1,
        )
    out = [
        StatementRow(
            r["id"], r["at"], r["kind"], Bucket(r["bucket"]), r["amount"], int(r["running"]),
            r["receipt_id"], r["key_id"],
        )
        for r in rows[:limit]
    ]
    return out, len(rows) > limit


# -- runs ------------------------------------------------------------------------------------------


async def get_run(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_RUN_COLS}, refused, estimate::text AS estimate FROM runs WHERE id = $1", run_id
    )


async def run_receipts(conn: asyncpg.Connection, run_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT body::text AS body FROM receipts WHERE run_id = $1 ORDER BY seq", run_id
    )
    return [r["body"] for r in rows]


async def record_refusal(conn: asyncpg.Connection, run_id: str, key_id: str | None) -> bool:
    if key_id:
        status = await conn.execute(
            "UPDATE runs SET refused = refused + 1 WHERE id = $1 AND key_id = $2", run_id, key_id
        )
    else:
        status = await conn.execute("UPDATE runs SET refused = refused + 1 WHERE id = $1", run_id)
    return status.endswith(" 1")


# -- audit ------------------------------------------------------------------------------------------


_UNIT = "CASE bucket WHEN 'wallet' THEN 'CNY' ELSE 'CREDIT' END"

# Per unit: what came in from outside (top-ups, and adjustments: credits minus debits).
_FUNDED_SQL = f"""
    SELECT unit, sum(topups) AS topups, sum(adjusted) AS adjusted FROM (
        SELECT {_UNIT} AS unit, amount_nano AS topups, 0 AS adjusted FROM topups
        UNION ALL
        SELECT {_UNIT}, 0, CASE direction WHEN 'credit' THEN amount_nano ELSE -amount_nano END
          FROM adjustments) x
     GROUP BY unit"""

# Per unit: receipts' collected charges and uncollected cost, and what was refunded of them.
_COLLECTED_SQL = f"""
    SELECT unit, sum(amount) AS amount, sum(unc) AS unc, sum(refunded) AS refunded FROM (
        SELECT {_UNIT} AS unit, amount_nano AS amount, uncollected_nano AS unc, 0 AS refunded
          FROM receipts WHERE bucket IS NOT NULL
        UNION ALL
        SELECT {_UNIT}, 0, 0, amount_nano FROM refunds) x
     GROUP BY unit"""


async def audit(conn: asyncpg.Connection) -> tuple[list[str], int]:
    """Every kept figure against the journal. Runs in one REPEATABLE READ snapshot."""
    problems: list[str] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        n_accounts = await conn.fetchval("SELECT count(*) FROM accounts")
        # 1. every journal transfer is a balanced pair within one unit (by construction) and the
        #    postings of each unit sum to zero.
        for r in await conn.fetch(
            "SELECT unit, sum(amount_nano) AS s FROM postings GROUP BY unit HAVING sum(amount_nano) <> 0"
        ):
            problems.append(f"postings of {r['unit']} sum to {r['s']}, not 0")
        # 2. kept bucket balances against postings
        for r in await conn.fetch(
            """WITH p AS (
                   SELECT account_id, bucket,
                          sum(amount_nano) FILTER (WHERE ledger_account = 'customer') AS avail,
                          sum(amount_nano) FILTER (WHERE ledger_account = 'holds') AS held
                     FROM postings GROUP BY account_id, bucket)
               SELECT b.account_id, b.bucket, b.balance_nano, b.held_nano,
                      coalesce(p.avail, 0) AS p_avail, coalesce(p.held, 0) AS p_held
                 FROM buckets b LEFT JOIN p USING (account_id, bucket)
                WHERE b.balance_nano - b.held_nano <> coalesce(p.avail, 0)
                   OR b.held_nano <> coalesce(p.held, 0)"""
        ):
            problems.append(
                f"{r['account_id']}/{r['bucket']}: kept balance {r['balance_nano']} held "
                f"{r['held_nano']}, postings say available {r['p_avail']} held {r['p_held']}"
            )
        # 3. held = active holds not drawn from a run + open runs' reservations + active
        #    run-funded holds
        for r in await conn.fetch(
            """WITH h AS (
                   SELECT account_id, bucket, sum(amount_nano) AS s FROM holds
                    WHERE state = 'active' GROUP BY account_id, bucket
                   UNION ALL
                   SELECT account_id, 'wallet', sum(reserved_wallet_nano) FROM runs
                    WHERE status = 'open' GROUP BY account_id
                   UNION ALL
                   SELECT account_id, 'credit', sum(reserved_credit_nano) FROM runs
                    WHERE status = 'open' GROUP BY account_id),
               t AS (SELECT account_id, bucket, sum(s) AS s FROM h GROUP BY account_id, bucket)
               SELECT b.account_id, b.bucket, b.held_nano, coalesce(t.s, 0) AS s
                 FROM buckets b LEFT JOIN t USING (account_id, bucket)
                WHERE b.held_nano <> coalesce(t.s, 0)"""
        ):
            problems.append(
                f"{r['account_id']}/{r['bucket']}: held {r['held_nano']} but holds and run "
                f"reservations add up to {r['s']}"
            )
        # 4. per unit: top-ups + net adjustments = -funding; receipts' charges + uncollected -
        #    refunds = revenue; uncollected = -uncollected postings.
        for r in await conn.fetch(
            f"""WITH t AS ({_FUNDED_SQL}),
                    f AS (SELECT unit, -sum(amount_nano) AS s FROM postings
                           WHERE ledger_account = 'funding' GROUP BY unit)
               SELECT coalesce(t.unit, f.unit) AS unit, coalesce(t.topups, 0) AS topups,
                      coalesce(t.adjusted, 0) AS adjusted, coalesce(f.s, 0) AS funding
                 FROM t FULL JOIN f USING (unit)
                WHERE coalesce(t.topups, 0) + coalesce(t.adjusted, 0) <> coalesce(f.s, 0)"""
        ):
            problems.append(
                f"{r['unit']}: top-ups {r['topups']} + net adjustments {r['adjusted']} but funding "
                f"postings {r['funding']}"
            )
        for r in await conn.fetch(
            f"""WITH r AS ({_COLLECTED_SQL}),
                    p AS (SELECT unit,
                                 sum(amount_nano) FILTER (WHERE ledger_account = 'revenue') AS rev,
                                 -sum(amount_nano) FILTER (WHERE ledger_account = 'uncollected') AS unc
                            FROM postings GROUP BY unit)
               SELECT coalesce(r.unit, p.unit) AS unit, coalesce(r.amount, 0) AS amount,
                      coalesce(r.unc, 0) AS unc, coalesce(r.refunded, 0) AS refunded,
                      coalesce(p.rev, 0) AS rev, coalesce(p.unc, 0) AS p_unc
                 FROM r FULL JOIN p USING (unit)
                WHERE coalesce(r.amount, 0) + coalesce(r.unc, 0) - coalesce(r.refunded, 0) <> coalesce(p.rev, 0)
                   OR coalesce(r.unc, 0) <> coalesce(p.unc, 0)"""
        ):
            problems.append(
                f"{r['unit']}: receipts charge {r['amount']} + uncollected {r['unc']} - refunds "
                f"{r['refunded']} but revenue postings {r['rev']} and uncollected postings {r['p_unc']}"
            )
        # 4b. each receipt's refunded total is the sum of its refunds (and never above what it
        #     collected: a CHECK in the table); each refund is in its receipt's bucket.
        for r in await conn.fetch(
            """WITH f AS (SELECT receipt_id, sum(refunds.amount_nano) AS s, bool_and(refunds.bucket = r.bucket) AS same
                            FROM refunds JOIN receipts r ON r.id = refunds.receipt_id
                           GROUP BY receipt_id)
               SELECT r.id, r.refunded_nano, r.amount_nano, coalesce(f.s, 0) AS s, f.same
                 FROM receipts r LEFT JOIN f ON f.receipt_id = r.id
                WHERE (r.refunded_nano > 0 OR f.s IS NOT NULL)
                  AND (r.refunded_nano <> coalesce(f.s, 0) OR r.refunded_nano > r.amount_nano
                       OR NOT coalesce(f.same, true))"""
        ):
            problems.append(
                f"receipt {r['id']}: refunded {r['refunded_nano']} of {r['amount_nano']} but its refunds "
                f"add up to {r['s']}" + ("" if r["same"] is not False else " (a refund in another bucket)")
            )
        # 4c. conservation from the kept figures alone, per unit: top-ups + net adjustments =
        #     balances (available + held) + collected charges - refunds.
        for r in await conn.fetch(
            f"""WITH t AS ({_FUNDED_SQL}),
                    r AS ({_COLLECTED_SQL}),
                    b AS (SELECT unit, sum(balance_nano) AS s FROM buckets GROUP BY unit)
               SELECT b.unit, coalesce(t.topups, 0) + coalesce(t.adjusted, 0) AS funded,
                      b.s AS balances, coalesce(r.amount, 0) AS amount, coalesce(r.refunded, 0) AS refunded
                 FROM b LEFT JOIN t USING (unit) LEFT JOIN r USING (unit)
                WHERE coalesce(t.topups, 0) + coalesce(t.adjusted, 0)
                      <> b.s + coalesce(r.amount, 0) - coalesce(r.refunded, 0)"""
        ):
            problems.append(
                f"{r['unit']}: top-ups + net adjustments {r['funded']} but balances {r['balances']} + "
                f"charges {r['amount']} - refunds {r['refunded']} differ (conservation)"
            )
        # 5. key usage against receipts and holds
        for r in await conn.fetch(
            """WITH s AS (SELECT key_id,
                             sum(amount_nano) FILTER (WHERE bucket = 'wallet') AS sw,
                             sum(amount_nano) FILTER (WHERE bucket = 'credit') AS sc
                        FROM receipts GROUP BY key_id),
                    h AS (SELECT key_id,
                             sum(amount_nano) FILTER (WHERE bucket = 'wallet') AS hw,
                             sum(amount_nano) FILTER (WHERE bucket = 'credit') AS hc
                        FROM holds WHERE state = 'active' GROUP BY key_id),
                    rr AS (SELECT key_id, sum(reserved_wallet_nano) AS hw,
                                  sum(reserved_credit_nano) AS hc
                             FROM runs WHERE status = 'open' GROUP BY key_id)
               SELECT k.id, k.spent_wallet_nano, k.spent_credit_nano, k.held_wallet_nano,
                      k.held_credit_nano, coalesce(s.sw, 0) AS sw, coalesce(s.sc, 0) AS sc,
                      coalesce(h.hw, 0) + coalesce(rr.hw, 0) AS hw,
                      coalesce(h.hc, 0) + coalesce(rr.hc, 0) AS hc
                 FROM keys k LEFT JOIN s ON s.key_id = k.id LEFT JOIN h ON h.key_id = k.id
                      LEFT JOIN rr ON rr.key_id = k.id
                WHERE k.spent_wallet_nano <> coalesce(s.sw, 0)
                   OR k.spent_credit_nano <> coalesce(s.sc, 0)
                   OR k.held_wallet_nano <> coalesce(h.hw, 0) + coalesce(rr.hw, 0)
                   OR k.held_credit_nano <> coalesce(h.hc, 0) + coalesce(rr.hc, 0)"""
        ):
            problems.append(
                f"key {r['id']}: spent {r['spent_wallet_nano']}/{r['spent_credit_nano']} held "
                f"{r['held_wallet_nano']}/{r['held_credit_nano']} but receipts say "
                f"{r['sw']}/{r['sc']} and holds {r['hw']}/{r['hc']}"
            )
        # 6. settled holds add up; no run spent past its budget
        for r in await conn.fetch(
            """SELECT id FROM holds
                WHERE state <> 'active' AND captured_nano + released_nano <> amount_nano"""
        ):
            problems.append(f"hold {r['id']}: captured + released <> amount")
        for r in await conn.fetch(
            """SELECT id FROM runs
                WHERE (budget_wallet_nano > 0 AND spent_wallet_nano > budget_wallet_nano)
                   OR (budget_credit_nano > 0 AND spent_credit_nano > budget_credit_nano)"""
        ):
            problems.append(f"run {r['id']}: spent past its budget")
    return problems, int(n_accounts)


def bucket_balances(rows: dict[Bucket, BucketBalance]) -> dict[Bucket, BucketBalance]:
    return {b: rows.get(b, BucketBalance(b, 0, 0)) for b in Bucket}


__all__ = ["core"]
