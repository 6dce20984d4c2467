"""Group commit: every money movement goes through a writer that gathers the operations
waiting at that moment into ONE database transaction (one WAL flush), while each operation
keeps its own result, idempotency and no-overshoot check.

Why this is exact: a batch first locks the bucket rows of every account it touches (FOR
UPDATE, sorted), then loads the holds, runs, keys, receipts and top-ups involved, and applies
the operations one after another to that in-memory state (`core.Book`). Each operation sees
the effect of the ones before it — a second hold on the hot account sees the first one's
reservation, a replay sees the hold made earlier in the same batch — exactly as if they had
committed one by one in that order. Nobody else can change those rows until the batch
commits, because everything that moves money locks the same rows first. A refused operation
changes nothing in the book (core checks before it mutates), so it does not disturb the rest.
Results are handed out only after COMMIT returns: nobody is told "held" for a hold that is not
durable. If the transaction fails as a whole (a database error, not a business refusal), every
operation of the batch is retried alone, so one bad operation cannot fail its neighbours.

Why it is fast: one fsync costs ~3 ms here; at one commit per operation a hot row tops out at a
few hundred operations per second because each commit holds the row lock through its flush.
While one batch is committing the next one queues up, so the batch size grows with load and
the cost per operation falls (64 concurrent clients → batches of tens of operations).

Sharding: several writers run side by side, each with its own connection; an operation goes to
the writer chosen by its account id, so two writers never contend for the same rows (no lock
waits, no deadlocks between them) and their flushes overlap. One account's operations always
go through one writer, in arrival order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from tokenforge.errors import TFError
from tokenforge.ledger import store
from tokenforge.ledger.core import Book, Op, Policy, Result

log = logging.getLogger("tokenforge.ledger.writer")

MAX_BATCH_OPS = 512
MAX_QUEUE_OPS = 20_000


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class _Pending:
    op: Op
    future: asyncio.Future[Result]


@dataclass
class BatchStats:
    batches: int = 0
    ops: int = 0
    retried_alone: int = 0
    max_batch: int = 0


class Writer:
    """One writer: a queue, a task, and a connection from `pool` per batch."""

    def __init__(self, pool: asyncpg.Pool, policy: Policy, clock: Callable[[], dt.datetime] = _utcnow):
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(MAX_QUEUE_OPS)
        self._task: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(TFError("unavailable", "the ledger is stopping"))

    async def submit(self, op: Op) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(op, future))
        except asyncio.QueueFull:
            raise TFError("unavailable", "the ledger is overloaded; retry shortly") from None
        # A caller that goes away cancels `future`; the writer skips futures already done, and
        # the operation itself still commits (a replay by request id returns its result).
        return await future

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < MAX_BATCH_OPS and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        self.stats.batches += 1
        self.stats.ops += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        try:
            outcomes = await self._commit([p.op for p in batch])
        except Exception as exc:  # a database failure, or a bug: never let the writer die
            if len(batch) == 1:
                log.warning("ledger operation %r failed: %r", batch[0].op, exc, exc_info=not isinstance(exc, asyncpg.PostgresError | OSError))
                _resolve(batch[0], _as_tferror(exc))
                return
            log.warning("batch of %d failed (%r); retrying each alone", len(batch), exc)
            self.stats.retried_alone += len(batch)
            for pending in batch:
                await self._run_batch([pending])
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            _resolve(pending, outcome)

    async def _commit(self, ops: list[Op]) -> list[Result | TFError]:
        """Apply `ops` in order in one transaction; returns each one's result or refusal."""
        async with self._pool.acquire() as conn, conn.transaction():
            book = Book(now=self._clock(), policy=self._policy)
            await store.load_book(conn, ops, book)
            outcomes: list[Result | TFError] = []
            for op in ops:
                try:
                    outcomes.append(book.apply(op))
                except TFError as err:
                    outcomes.append(err)
            await store.write_book(conn, book)
        return outcomes


def _as_tferror(exc: BaseException) -> TFError:
    if isinstance(exc, asyncpg.PostgresError | OSError | asyncpg.InterfaceError):
        return TFError("unavailable", "the ledger's database failed; retry the operation")
    return TFError("internal_error", "the ledger failed to apply the operation")


def _resolve(pending: _Pending, outcome: Result | TFError) -> None:
    if pending.future.done():
        return
    if isinstance(outcome, TFError):
        pending.future.set_exception(outcome)
    else:
        pending.future.set_result(outcome)


class WriterGroup:
    """Writers sharded by account id."""

    def __init__(self, pool: asyncpg.Pool, policy: Policy, n_writers: int, clock: Callable[[], dt.datetime] = _utcnow):
        assert 1 <= n_writers <= 64
        self.writers = [Writer(pool, policy, clock) for _ in range(n_writers)]

    def start(self) -> None:
        for w in self.writers:
            w.start()

    async def stop(self) -> None:
        for w in self.writers:
            await w.stop()

    def for_account(self, account_id: str) -> Writer:
        return self.writers[zlib.crc32(account_id.encode()) % len(self.writers)]

    async def submit(self, op: Op) -> Result:
        return await self.for_account(op.account_id).submit(op)
