"""Group commit: every money movement goes through a writer that gathers the operations
waiting at that moment into ONE database transaction (one WAL flush), while each operation
keeps its own result, idempotency and no-overshoot check.

How a batch runs (two round trips, whatever its size):
1. One statement reads everything the operations may touch: the accounts' bucket rows, the
   holds of their request ids, the keys, runs, receipts and top-ups involved (and, in a batch
   with a refund or an adjustment, the receipts refunded and earlier refunds and adjustments
   by idempotency key). One statement is one snapshot, so the reads agree with each other.
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
A batch of holds and settlements on accounts the writer has just written may skip step 1:
`rowcache.py` keeps what the writer last committed, and step 3's compare-and-set then checks
every row the batch used (that module says why this is exact).
Results are handed out only after the commit returns: nobody is told "held" for a hold that is
not durable. If the write fails for another reason (a database error, a bug), every operation
of the batch is retried alone, so one bad operation cannot fail its neighbours.

Why not lock and then read (SELECT ... FOR UPDATE inside a transaction)? That needs BEGIN,
the locking read, the other reads, the write and COMMIT: five or more round trips while the
hot account's lock is held. On a busy 2-core machine each round trip also waits to be
scheduled; measured, such a batch took 25-50 ms, and the hot account was capped by it.

Why it is fast: at one commit per operation a hot row tops out at a few hundred operations per
second, because each commit holds the row lock through its flush and its round trips (the
field notes measured ~3 ms per fsync; `pg_test_fsync` gave ~0.1 ms on the session-2 machine,
and one-statement-per-commit still ran at 440-590 hot pairs/s there).
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
from tokenforge.ledger.rowcache import RowCache

log = logging.getLogger("tokenforge.ledger.writer")

MAX_BATCH_OPS = 512
MAX_BATCH_BYTES = 8 * 1024 * 1024  # receipts of one batch (each up to 1 MiB): one statement stays small
MAX_QUEUE_OPS = 20_000
MAX_CONFLICT_RETRIES = 8
MAX_IN_FLIGHT = 2  # batches of one writer in the database at once (on different accounts)
SPLIT_MIN_OPS = 16  # a batch this large over several accounts is split in two


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
    max_in_flight: int = 0  # most batches in the database at once
    from_cache: int = 0  # batches written without a read (rowcache.py)
    cache_stale: int = 0  # ... of which the write found a row changed: read and applied again


class Writer:
    """One writer: a queue, a task, and its own connections taken from `pool` and kept.

    Two batches may be in flight at once when they touch different accounts: while one
    commits (PostgreSQL's work) the next is read and applied (Python's work), so the two
    cores overlap. A batch that shares an account with one in flight waits for it and, while
    it waits, takes in what has queued since; so one account's operations are never in two
    transactions at once and are applied in arrival order (a hot account gets one large batch
    at a time, as before). Correctness does not depend on this: the compare-and-set write
    would catch any overlap; the footprint check only avoids losing such races.

    The writer keeps one connection: that saves a pool acquire and release per batch (the
    release runs asyncpg's reset query, `RESET ALL` and three more statements: one more round
    trip per batch). A second batch in flight borrows a connection from the pool and gives it
    back, so a pool shared with others is never held beyond one connection per writer when
    idle. A connection goes back to the pool when the writer stops, and after a failed batch
    (the pool's reset, or a new connection, puts it in a known state).
    """

    def __init__(self, pool: asyncpg.Pool, policy: Policy, clock: Callable[[], dt.datetime] = _utcnow,
                 max_in_flight: int = MAX_IN_FLIGHT, row_cache: bool = True):
        assert max_in_flight >= 1
        self._pool = pool
        self._cache = RowCache() if row_cache else None
        self._policy = policy
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(MAX_QUEUE_OPS)
        self._task: asyncio.Task[None] | None = None
        self._kept: asyncpg.Connection | None = None
        self._kept_busy = False
        self._carry: _Pending | None = None  # taken from the queue; starts the next batch
        self._max_in_flight = max_in_flight
        self._in_flight: dict[asyncio.Task[None], frozenset[str]] = {}  # batch → its accounts
        self.stats = BatchStats()

    async def _connection(self) -> asyncpg.Connection:
        """A connection for one batch: the kept one if it is free, else one borrowed."""
        if self._kept_busy:
            return await self._pool.acquire()
        self._kept_busy = True
        try:
            if self._kept is not None and not _usable(self._kept):
                stale, self._kept = self._kept, None
                await self._release(stale)
            if self._kept is None:
                self._kept = await self._pool.acquire()
        except BaseException:
            self._kept_busy = False
            raise
        return self._kept

    async def _done_with(self, conn: asyncpg.Connection, ok: bool) -> None:
        """Keep the kept connection after a good batch; give back everything else."""
        if conn is self._kept:
            self._kept_busy = False
            if ok:
                return
            self._kept = None
        await self._release(conn)

    async def _release(self, conn: asyncpg.Connection) -> None:
        try:
            await self._pool.release(conn)
        except Exception:  # noqa: BLE001 - the pool closes a connection it cannot reset
            log.debug("releasing a writer connection failed", exc_info=True)

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
        if self._in_flight:  # let the batches already sent to the database finish
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._kept is not None:
            conn, self._kept = self._kept, None
            await self._release(conn)
        if self._cache is not None:
            self._cache.clear()
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

    def _take_queued(self, batch: list[_Pending]) -> None:
        """Add what is queued to `batch`, up to MAX_BATCH_OPS operations and MAX_BATCH_BYTES of
        receipts; an operation that does not fit is carried over to start the next batch."""
        size = sum(_bytes(p) for p in batch)
        while len(batch) < MAX_BATCH_OPS and self._carry is None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if size + _bytes(pending) > MAX_BATCH_BYTES:
                self._carry = pending
                break
            batch.append(pending)
            size += _bytes(pending)

    async def _next(self) -> _Pending:
        if self._carry is not None:
            pending, self._carry = self._carry, None
            return pending
        return await self._queue.get()

    async def _run(self) -> None:
        batch: list[_Pending] = []  # taken from the queue, not yet in flight
        try:
            while True:
                batch = [await self._next()]
                self._take_queued(batch)
                while True:
                    accounts = frozenset(p.op.account_id for p in batch)
                    blocking = [t for t, acc in self._in_flight.items() if acc & accounts]
                    if not blocking and len(self._in_flight) < self._max_in_flight:
                        break
                    await asyncio.wait(blocking or list(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    self._take_queued(batch)
                # A large batch over many accounts goes as several on different connections: one
                # is applied in Python while PostgreSQL works on the others.
                n_parts = min(self._max_in_flight - len(self._in_flight), len(batch) // SPLIT_MIN_OPS)
                parts = _split_by_account(batch, n_parts) if n_parts >= 2 else [batch]
                for part in parts:
                    task = asyncio.get_running_loop().create_task(self._run_batch(part))
                    self._in_flight[task] = frozenset(p.op.account_id for p in part)
                    task.add_done_callback(self._batch_done)
                batch = []
                self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._in_flight))
        except asyncio.CancelledError:
            # Stopped while a batch waited for one in flight: it never reached the database;
            # its callers get an answer instead of waiting forever.
            if self._carry is not None:
                batch.append(self._carry)
                self._carry = None
            _hand_back([(p, TFError("unavailable", "the ledger is stopping")) for p in batch])
            raise

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:  # _run_batch never raises
            log.error("a ledger batch failed unexpectedly", exc_info=task.exception())

    async def _run_batch(self, batch: list[_Pending]) -> None:
        self.stats.batches += 1
        self.stats.ops += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        started = time.perf_counter()
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._connection()
            outcomes = await self._commit(conn, [p.op for p in batch])
            self.stats.busy_s += time.perf_counter() - started
        except Exception as exc:  # a database failure, or a bug: never let the writer die
            if self._cache is not None:
                self._cache.forget({p.op.account_id for p in batch})
            if conn is not None:
                await self._done_with(conn, ok=False)  # the pool resets it, or replaces a broken one
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
        await self._done_with(conn, ok=True)

    async def _commit(self, conn: asyncpg.Connection, ops: list[Op]) -> list[Result | TFError]:
        """Apply `ops` in order; returns each one's result or refusal once written."""
        if self._cache is not None:
            results = await self._commit_from_cache(conn, ops)
            if results is not None:
                return results
        for _ in range(MAX_CONFLICT_RETRIES):
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
            if self._cache is not None:
                self._cache.remember(ops, book)
            return outcomes
        raise TFError("unavailable", "the ledger's rows kept changing under the batch; retry")

    async def _commit_from_cache(self, conn: asyncpg.Connection, ops: list[Op]) -> list[Result | TFError] | None:
        """The batch applied to what this writer last committed, without reading (rowcache.py
        says why that is exact); None: it needs the read after all, nothing was written."""
        assert self._cache is not None
        book = Book(now=self._clock(), policy=self._policy)
        planned = self._cache.plan(ops, book)
        if planned is None:
            return None
        results: list[Result | TFError] = []
        try:
            for op in ops:
                result = book.apply(op)
                if getattr(result, "replayed", False):
                    return None  # a replay is answered from the database's rows
                results.append(result)
        except Exception:  # noqa: BLE001 - a refusal (or a cached row that is wrong) is decided on a fresh read
            return None
        RowCache.mark_all_used(book)
        try:
            await store.write_book(conn, book, planned.snap, planned.fresh_requests, planned.known_holds)
        except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
            self._cache.forget({op.account_id for op in ops})
            self.stats.cache_stale += 1
            return None
        self._cache.remember(ops, book)
        self.stats.from_cache += 1
        return results


def _usable(conn: asyncpg.Connection) -> bool:
    """False for a connection that closed, and for one asyncpg already took back: when the
    server ends an idle session (a restart, a failover, pg_terminate_backend), the pool
    releases it by itself and every method of our proxy, `is_closed()` included, raises."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _bytes(pending: _Pending) -> int:
    return getattr(pending.op, "receipt_bytes", 0)


def _split_by_account(batch: list[_Pending], n: int) -> list[list[_Pending]]:
    """Up to `n` batches of about equal size with no account in two of them; each account's
    operations stay together and in arrival order. One account only: the batch as it is."""
    by_account: dict[str, list[_Pending]] = {}
    for pending in batch:
        by_account.setdefault(pending.op.account_id, []).append(pending)
    if len(by_account) < 2:
        return [batch]
    parts: list[list[_Pending]] = [[] for _ in range(min(n, len(by_account)))]
    for ops in by_account.values():
        min(parts, key=len).extend(ops)
    return parts


def _as_tferror(exc: BaseException) -> TFError:
    if isinstance(exc, TFError):
        return exc
    # InternalClientError: a connection the server has just ended but whose socket asyncpg has
    # not seen close yet refuses the next statement with it ("cannot switch to state ...").
    if isinstance(exc, asyncpg.PostgresError | OSError | asyncpg.InterfaceError | asyncpg.InternalClientError):
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

    def __init__(self, pool: asyncpg.Pool, policy: Policy, n_writers: int, clock: Callable[[], dt.datetime] = _utcnow,
                 row_cache: bool = True):
        assert 1 <= n_writers <= 64
        self.pool = pool
        self.writers = [Writer(pool, policy, clock, row_cache=row_cache) for _ in range(n_writers)]

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

    def __init__(self, database_url: str, policy: Policy, n_writers: int, clock: Callable[[], dt.datetime] = _utcnow,
                 row_cache: bool = True):
        self._url = database_url
        self._row_cache = row_cache
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

        size = self._n * MAX_IN_FLIGHT
        self._pool = await store.create_pool(self._url, min_size=size, max_size=size, writer=True)
        self._group = WriterGroup(self._pool, self._policy, self._n, self._clock, self._row_cache)
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
