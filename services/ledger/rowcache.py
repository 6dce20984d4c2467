"""What a writer last committed, per account, so that a batch of holds and settlements can
skip its read round trip (writer.py, step 1) and go straight to the conditional write.

Why it is exact: the cache is only ever a guess. A batch taken from it marks every row it
used as changed, so the write's compare-and-set checks all of them against the database (the
bucket, the key, the run, the request's holds: each UPDATE applies only if the row still holds
the values the batch started from). A request it believes has no hold yet is checked in the
same statement (`write_book(fresh_requests=...)`: no hold of that request may exist), a
request it believes it knows must have the holds it knows of and no other (`known_holds`:
another process may have held it in the other bucket, with another key or from another run,
changing no row the batch uses), and a settlement's receipt is guarded by its unique request
id. If anything differs — another ledger process, a key revoked by an admin, a restart that
emptied the cache — the statement fails as a whole, nothing is written, and the batch is read
and applied the usual way.

A batch goes this way only if every operation is a hold or a settlement whose rows are all
here, and only if every operation succeeds as a first application: a refusal, a conflict or
a replay is answered only after a fresh read, so no answer other than success rests on the
cache.

What is kept: the account's bucket rows, its keys and open runs, and the holds of requests that
still have only active holds, all of them (a request whose holds were read from the database,
or whose first hold this writer made after checking there was none). A request leaves once
any of its holds closes, so a settled request is always read (its replay needs the receipt).
Bounded: the least recently used account goes first, and a request or an open run beyond
the per-account bound is simply not kept (a run leaves when it closes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenforge.ledger.core import (
    HOLD_ACTIVE,
    RUN_OPEN,
    Book,
    BucketRow,
    HoldOp,
    HoldRow,
    KeyRow,
    Op,
    RunRow,
    SettleOp,
)
from tokenforge.ledger.store import Snapshot, key_version, run_version
from tokenforge.money import Bucket

MAX_ACCOUNTS = 4096
MAX_REQUESTS_PER_ACCOUNT = 1024
MAX_RUNS_PER_ACCOUNT = 1024


@dataclass
class _Account:
    buckets: dict[Bucket, tuple[int, int]] = field(default_factory=dict)  # balance, held
    keys: dict[str, KeyRow] = field(default_factory=dict)
    runs: dict[str, RunRow] = field(default_factory=dict)
    requests: dict[str, list[HoldRow]] = field(default_factory=dict)  # all of a request's holds


@dataclass(slots=True)
class Planned:
    """A batch's book built from the cache, its snapshot, and the requests believed fresh."""

    book: Book
    snap: Snapshot
    fresh_requests: list[str]
    known_holds: list[tuple[str, str]]  # (request id, account id) of each hold taken from the cache


def _copy_key(k: KeyRow) -> KeyRow:
    return KeyRow(k.id, k.account_id, k.name, k.revoked, k.limits, dict(k.spent), dict(k.held), k.day,
                  dict(k.day_spent))


def _copy_run(r: RunRow) -> RunRow:
    return RunRow(r.id, r.key_id, r.account_id, r.name, r.status, dict(r.budget), dict(r.reserved),
                  dict(r.spent), r.expires_at, r.created_at, r.closed_at, r.estimate_json)


def _copy_hold(h: HoldRow) -> HoldRow:
    return HoldRow(h.id, h.request_id, h.bucket, h.account_id, h.key_id, h.run_id, h.run_funded,
                   h.amount_nano, h.state, h.captured_nano, h.released_nano, h.ttl_s, h.expires_at,
                   h.created_at, h.closed_at)


class RowCache:
    def __init__(self, max_accounts: int = MAX_ACCOUNTS) -> None:
        self._max = max_accounts
        self._accounts: OrderedDict[str, _Account] = OrderedDict()

    def __len__(self) -> int:
        return len(self._accounts)

    def forget(self, account_ids: Sequence[str] | frozenset[str]) -> None:
        for account_id in account_ids:
            self._accounts.pop(account_id, None)

    def clear(self) -> None:
        self._accounts.clear()

    def plan(self, ops: Sequence[Op], book: Book) -> Planned | None:
        """Fill `book` from the cache for `ops`, or None if any op needs a read."""
        snap = Snapshot({}, {}, {}, {}, {})
        fresh: list[str] = []
        known: list[tuple[str, str]] = []
        for op in ops:
            if not isinstance(op, HoldOp | SettleOp):
                return None
            acc = self._accounts.get(op.account_id)
            key = acc.keys.get(op.key_id) if acc is not None else None
            if acc is None or key is None:
                return None
            holds = acc.requests.get(op.request_id)
            if isinstance(op, SettleOp) and holds is None:
                return None
            buckets = {h.bucket for h in holds or ()}
            if op.bucket is not None:
                buckets.add(op.bucket)
            run_ids = {h.run_id for h in holds or () if h.run_id}
            if op.run_id:
                run_ids.add(op.run_id)
            for bucket in buckets:
                values = acc.buckets.get(bucket)
                if values is None:
                    return None
                if (op.account_id, bucket) not in book.buckets:
                    book.buckets[(op.account_id, bucket)] = BucketRow(op.account_id, bucket, *values)
                    snap.buckets[(op.account_id, bucket)] = values
            for run_id in run_ids:
                run = acc.runs.get(run_id)
                if run is None:
                    return None
                if run_id not in book.runs:
                    book.runs[run_id] = _copy_run(run)
                    snap.runs[run_id] = run_version(run)
            if op.key_id not in book.keys:
                book.keys[op.key_id] = _copy_key(key)
                snap.keys[op.key_id] = key_version(key)
            if holds is None:
                if op.request_id not in fresh:
                    fresh.append(op.request_id)
            else:
                for h in holds:
                    if (h.request_id, h.bucket) not in book.holds:
                        book.holds[(h.request_id, h.bucket)] = _copy_hold(h)
                        snap.holds[(h.request_id, h.bucket)] = h.state
                        known.append((h.request_id, h.account_id))
                        if h.key_id not in book.keys:  # the hold's own key, for _free_hold
                            other = acc.keys.get(h.key_id)
                            if other is None:
                                return None
                            book.keys[h.key_id] = _copy_key(other)
                            snap.keys[h.key_id] = key_version(other)
        return Planned(book, snap, fresh, known)

    @staticmethod
    def mark_all_used(book: Book) -> None:
        """Every row a cached batch started from is written back, so the write's compare-and-set
        checks it: nothing the batch decided on is taken on trust."""
        for b in book.buckets.values():
            b.dirty = True
        for k in book.keys.values():
            k.dirty = True
        for r in book.runs.values():
            if not r.new:
                r.dirty = True
        for h in book.holds.values():
            if not h.new:
                h.dirty = True

    def remember(self, ops: Sequence[Op], book: Book) -> None:
        """After `book` committed: keep what it holds of the ops' accounts. `book` has every hold
        of each op's request: the read loads all of them, and a batch from the cache had them
        all or checked there were none."""
        for account_id in {op.account_id for op in ops}:
            if account_id in self._accounts:
                self._accounts.move_to_end(account_id)
            else:
                self._accounts[account_id] = _Account()
                while len(self._accounts) > self._max:
                    self._accounts.popitem(last=False)
        for (account_id, bucket), row in book.buckets.items():
            if (acc := self._accounts.get(account_id)) is not None:
                acc.buckets[bucket] = (row.balance_nano, row.held_nano)
        for key in book.keys.values():
            if (acc := self._accounts.get(key.account_id)) is not None:
                acc.keys[key.id] = _copy_key(key)
        for run in book.runs.values():
            if (acc := self._accounts.get(run.account_id)) is None:
                continue
            # Open runs only, and a bounded number: an account that keeps creating runs stays
            # warm and is never evicted. A closed run's late settlements read it.
            if run.status == RUN_OPEN and (run.id in acc.runs or len(acc.runs) < MAX_RUNS_PER_ACCOUNT):
                acc.runs[run.id] = _copy_run(run)
            else:
                acc.runs.pop(run.id, None)
        by_request: dict[str, list[HoldRow]] = {}
        for (request_id, _), hold in book.holds.items():
            by_request.setdefault(request_id, []).append(hold)
        for op in ops:
            request_id = getattr(op, "request_id", None)
            acc = self._accounts.get(op.account_id)
            if request_id is None or acc is None:
                continue
            holds = by_request.get(request_id, [])
            if holds and all(h.state == HOLD_ACTIVE and h.account_id == op.account_id for h in holds):
                if request_id in acc.requests or len(acc.requests) < MAX_REQUESTS_PER_ACCOUNT:
                    acc.requests[request_id] = [_copy_hold(h) for h in holds]
            else:  # settled, released or expired (or never held): the next op on it reads
                acc.requests.pop(request_id, None)
