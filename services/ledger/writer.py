"""Group commit: every money movement goes through a writer that gathers the operations
waiting at that moment into ONE database transaction (one WAL flush), while each operation
keeps its own result, idempotency and no-overshoot check.

How a batch runs (two round trips, whatever its size):
1. One statement reads everything the operations may touch: the accounts' bucket rows, the
   holds of their request ids, the keys, runs, receipts and top-ups involved. One statement
   is one snapshot, so the reads agree with each other.
2. The pure core (`core.Book`) applies the operations one after another to that in-memory
   state. Each sees the effect of the ones before it — a second hold on the hot account sees
   the first one's reservation, a replay sees the hold made earlier in the same batch —
   exactly as if they had committed one by one in that order. A refused operation changes
   nothing (the core checks before it mutates), so it does not disturb the rest.
3. One statement writes every change and commits. Each UPDATE applies only if the row still
   holds the values read in step 1 (compare-and-set); new rows are guarded by unique keys.
   If anything changed meanwhile, the statement fails as a whole, nothing is written, and the
   batch goes back to step 1. So the result is the same as holding locks from 1 to 3, without
   holding a lock across round trips.
Results are handed out only after the commit returns: nobody is told "held" for a hold that is
not durable. If the write fails for another reason (a database error, a bug), every operation
of the batch is retried alone, so one bad operation cannot fail its neighbours.

Why not lock and then read (SELECT ... FOR UPDATE inside a transaction)? That needs BEGIN,
the locking read, the other reads, the write and COMMIT: five or more round trips while the
hot account's lock is held. On a busy 2-core machine each round trip also waits to be
scheduled; measured, such a batch took 25-50 ms, and the hot account was capped by it.

Why it is fast: one fsync costs ~3 ms here; at one commit per operation a hot row tops out at a
few hundred operations per second because each commit holds the row lock through its flush.
While one batch is committing the next one queues up, so the batch size grows with load and
the cost per operation falls (64 concurrent clients → batches of tens of operations).

Optionally a thread of its own (TF_LEDGER_WRITER_THREAD=1): the writers then run on an event
loop in a separate thread (`ThreadedWriterGroup`), so their round trips are not queued behind
every ready gRPC callback of the main loop. It lowers batch latency when there are idle cores;
on this 2-core machine it cost ~0.2 ms more CPU per hold + capture pair (GIL hand-offs) than
it saved, so it is off by default.

Sharding: several writers run side by side, each with its own connection; an operation goes to
the writer chosen by its account id, so two writers never work on the same rows (no conflicts
between them) and their flushes overlap. One account's operations always go through one
writer, in arrival order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
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
MAX_CONFLICT_RETRIES = 8


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
    busy_s: float = 0.0  # time spent inside batch transactions
    conflicts: int = 0  # batches re-read because a row changed under them


class Writer:
    """One writer: a queue, a task, and one connection taken from `pool` and kept.

    Keeping the connection saves a pool acquire and release per batch; the release ran
    asyncpg's reset query (`RESET ALL` and three more statements), one more round trip and
    statement per batch. The connection goes back to the pool when the writer stops, and after
    a failed batch (the pool's reset, or a new connection, puts it in a known state).
    """

    def __init__(self, pool: asyncpg.Pool, policy: Policy, clock: Callable[[], dt.datetime] = _utcnow):
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(MAX_QUEUE_OPS)
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.stats = BatchStats()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and self._conn.is_closed():
            await self._drop_connection()
        if self._conn is None:
            self._conn = await self._pool.acquire()
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._pool.release(conn)
            except Exception:  # noqa: BLE001 - the pool closes a connection it cannot reset
                log.debug("releasing the writer's connection failed", exc_info=True)

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
        await self._drop_connection()
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            _hand_back([(pending, TFError("unavailable", "the ledger is stopping"))])

    async def submit(self, op: Op) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.enqueue(_Pending(op, future))
        # A caller that goes away cancels `future`; the writer skips futures already done, and
        # the operation itself still commits (a replay by request id returns its result).
        return await future

    def enqueue(self, pending: _Pending) -> None:
        """Queue an operation; runs on the writer's loop (its future may live on another)."""
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            _hand_back([(pending, TFError("unavailable", "the ledger is overloaded; retry shortly"))])

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
        started = time.perf_counter()
        try:
            outcomes = await self._commit([p.op for p in batch])
            self.stats.busy_s += time.perf_counter() - started
        except Exception as exc:  # a database failure, or a bug: never let the writer die
            await self._drop_connection()
            if len(batch) == 1:
                log.warning("ledger operation %r failed: %r", batch[0].op, exc, exc_info=not isinstance(exc, asyncpg.PostgresError | OSError))
                _hand_back([(batch[0], _as_tferror(exc))])
                return
            log.warning("batch of %d failed (%r); retrying each alone", len(batch), exc)
            self.stats.retried_alone += len(batch)
            for pending in batch:
                await self._run_batch([pending])
            return
        _hand_back(list(zip(batch, outcomes, strict=True)))

    async def _commit(self, ops: list[Op]) -> list[Result | TFError]:
        """Apply `ops` in order; returns each one's result or refusal once written."""
        for _ in range(MAX_CONFLICT_RETRIES):
            conn = await self._connection()
            book = Book(now=self._clock(), policy=self._policy)
            snap = await store.load_book(conn, ops, book)
            outcomes: list[Result | TFError] = []
            for op in ops:
                try:
                    outcomes.append(book.apply(op))
                except TFError as err:
                    outcomes.append(err)
            try:
                await store.write_book(conn, book, snap)
            except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
                # Someone else changed what we read: read again and re-apply.
                self.stats.conflicts += 1
                continue
            return outcomes
        raise TFError("unavailable", "the ledger's rows kept changing under the batch; retry")


def _as_tferror(exc: BaseException) -> TFError:
    if isinstance(exc, TFError):
        return exc
    if isinstance(exc, asyncpg.PostgresError | OSError | asyncpg.InterfaceError):
        return TFError("unavailable", "the ledger's database failed; retry the operation")
    return TFError("internal_error", "the ledger failed to apply the operation")


def _resolve_all(items: list[tuple[_Pending, Result | TFError]]) -> None:
    for pending, outcome in items:
        if pending.future.done():  # the caller went away
            continue
        if isinstance(outcome, TFError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)


def _hand_back(items: list[tuple[_Pending, Result | TFError]]) -> None:
    """Resolve each future on its own loop: directly if that is this loop, else with one
    thread-safe call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Result | TFError]]] = {}
    for item in items:
        by_loop.setdefault(item[0].future.get_loop(), []).append(item)
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    for loop, group in by_loop.items():
        if loop is here:
            _resolve_all(group)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_resolve_all, group)


class WriterGroup:
    """Writers sharded by account id."""

    def __init__(self, pool: asyncpg.Pool, policy: Policy, n_writers: int, clock: Callable[[], dt.datetime] = _utcnow):
        assert 1 <= n_writers <= 64
        self.pool = pool
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


class ThreadedWriterGroup:
    """A `WriterGroup` on its own event loop in its own thread, with its own connections."""

    def __init__(self, database_url: str, policy: Policy, n_writers: int, clock: Callable[[], dt.datetime] = _utcnow):
        self._url = database_url
        self._policy = policy
        self._n = n_writers
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._group: WriterGroup | None = None
        self._pool: asyncpg.Pool | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="ledger-writers", daemon=True)

    @property
    def writers(self) -> list[Writer]:
        return self._group.writers if self._group is not None else []

    def _main(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:  # handed to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._teardown())
        loop.close()

    async def _setup(self) -> None:
        from tokenforge.ledger import store

        self._pool = await store.create_pool(self._url, min_size=self._n, max_size=self._n, writer=True)
        self._group = WriterGroup(self._pool, self._policy, self._n, self._clock)
        self._group.start()

    async def _teardown(self) -> None:
        if self._group is not None:
            await self._group.stop()
        if self._pool is not None:
            await self._pool.close()

    async def start(self) -> None:
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 60)
        if self._error is not None:
            raise self._error
        if self._group is None:
            raise TimeoutError("the ledger's writers did not start")

    async def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 30)

    async def submit(self, op: Op) -> Result:
        assert self._loop is not None and self._group is not None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._loop.call_soon_threadsafe(self._group.for_account(op.account_id).enqueue, _Pending(op, future))
        return await future
