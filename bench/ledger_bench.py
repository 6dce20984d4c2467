"""Ledger benchmark: hold + capture pairs per second through the ledger's gRPC API.

    python bench/ledger_bench.py [--seconds 10] [--clients 64] [--accounts 1000] [--procs 1]
                                 [--writers 1] [--cases hot,spread,noop]

Starts PostgreSQL (embedded, in a temporary folder, unless TF_DATABASE_URL is set: then a
fresh database is made on that server and dropped afterwards) and a real ledger process
(`tokenforge serve ledger`), then runs, for (a) one hot account and (b) 1,000 accounts:

  ledger   --clients concurrent clients, each doing Hold then Settle (a receipt is written)
           through gRPC, for --seconds: once with one unary call per operation, once
           coalesced (the router's way: `Batch` calls carrying what was asked in one turn);
  direct   the same number of concurrent asyncpg connections doing the same bookkeeping on the
           ledger's own tables (hold row, key usage, journal transfers, receipt), one statement
           per commit: a hold statement, then a capture statement (no idempotency reads, no
           limit checks, no gRPC).

and (`noop`) the same calls against a gRPC server that does nothing, both ways: the ceiling
of Python gRPC alone on this machine. `--cases` picks among `hot`, `spread` and `noop`; the
whole run takes about 8 × --seconds plus seeding (a minute and a half by default).

It prints pairs/s, p50 and p99 of a pair's latency, CPU per pair by process, and
ledger/direct as ratios. Durability
is as configured by PostgreSQL (synchronous_commit on, fsync on): nothing is switched off.
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import pathlib
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import asyncpg

ONE = 1_000_000_000
HOLD_NANO = 20_000_000  # 0.02
RATED_NANO = 2_880_000  # 0.00288
RECEIPT = json.dumps(
    {
        "trace_id": "0" * 32,
        "route_policy": "routed",
        "requested_model": "gpt-4o-mini",
        "final_attempt": 1,
        "attempts": [
            {"n": 1, "span_id": "0" * 16, "channel": "cheap-a", "role": "primary", "route": "routed",
             "upstream_model": "gpt-4o-mini-compat", "response_model": "gpt-4o-mini", "outcome": "success",
             "http_status": 200, "error": None, "upstream_may_bill": True, "duration_ms": 840,
             "usage": {"input_tokens": 1200, "output_tokens": 300, "cached_input_tokens": 0},
             "usage_source": "upstream", "charged": "0.002880"}
        ],
        "usage": {"input_tokens": 1200, "output_tokens": 300, "cached_input_tokens": 0},
        "price": {"unit": "CNY", "input": "1.20", "output": "4.80", "cached_input": "0.60"},
        "fallback": {"used": False},
    }
).encode()


@dataclass
class Result:
    pairs: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: dict[str, float] | None = None  # CPU seconds used, per component

    def cpu_ms_per_pair(self) -> str:
        if not self.cpu_s or not self.pairs:
            return ""
        parts = [f"{name} {secs * 1000 / self.pairs:.2f}" for name, secs in self.cpu_s.items()]
        total = sum(self.cpu_s.values()) * 1000 / self.pairs
        return f"CPU ms/pair: {', '.join(parts)}, total {total:.2f} (2 idle cores would allow {2000 / total:.0f} pairs/s)"

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return statistics.quantiles(self.latencies_ms, n=100)[int(q) - 1]


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children_cpu_s(parent_pid: int) -> float:
    """CPU seconds of the live children of `parent_pid` (PostgreSQL backends of one server)."""
    total = 0.0
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent_pid:
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


class CpuMeter:
    """CPU used by the ledger process and the PostgreSQL server (if we know its pid)."""

    def __init__(self, ledger_pid: int | None, postmaster_pid: int | None) -> None:
        self.ledger_pid = ledger_pid
        self.postmaster_pid = postmaster_pid

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.ledger_pid:
            out["ledger"] = proc_cpu_s(self.ledger_pid)
        if self.postmaster_pid:
            out["postgres"] = proc_cpu_s(self.postmaster_pid) + children_cpu_s(self.postmaster_pid)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# gRPC clients (optionally spread over several processes so the client is not the bottleneck)


async def _grpc_clients(addr: str, keys: list[str], clients: int, seconds: float, offset: int,
                        coalesce: bool) -> tuple[int, list[float]]:
    from tokenforge.batching import Coalescer
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    latencies: list[float] = []
    pairs = 0
    async with client_channel(addr) as channel:
        stub: Any = ledger_pb2_grpc.LedgerServiceStub(channel)
        if coalesce:
            # what the router does: the calls of one event-loop turn share one Batch RPC
            batcher = Coalescer(stub.Batch, L.LedgerCall, L.LedgerBatchRequest)

            class _Stub:
                @staticmethod
                async def Hold(request: Any) -> Any:
                    return await batcher.call("hold", request, None, 10.0)

                @staticmethod
                async def Settle(request: Any) -> Any:
                    return await batcher.call("settle", request, None, 10.0)

            stub = _Stub()
        deadline = time.perf_counter() + seconds
        prefix = secrets.token_hex(4)

        async def client(i: int) -> None:
            nonlocal pairs
            n = 0
            while time.perf_counter() < deadline:
                key = keys[(offset + i + n * clients) % len(keys)]
                rid = f"b{prefix}-{i}-{n}"
                n += 1
                t0 = time.perf_counter()
                await stub.Hold(L.HoldRequest(request_id=rid, key_id=key, bucket=1, amount_nano=HOLD_NANO))
                await stub.Settle(L.SettleRequest(request_id=rid, key_id=key, bucket=1, rated_nano=RATED_NANO,
                                                  status="settled", receipt_json=RECEIPT))
                latencies.append((time.perf_counter() - t0) * 1000)
                pairs += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return pairs, latencies


def _grpc_proc(addr: str, keys: list[str], clients: int, seconds: float, offset: int, coalesce: bool,
               out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import resource

    pairs, lat = asyncio.run(_grpc_clients(addr, keys, clients, seconds, offset, coalesce))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((pairs, lat, usage.ru_utime + usage.ru_stime))


def run_grpc(addr: str, keys: list[str], clients: int, seconds: float, procs: int, meter: CpuMeter | None = None,
             coalesce: bool = False) -> Result:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(target=_grpc_proc, args=(addr, keys, n, seconds, sum(per[:i]), coalesce, out)) for i, n in enumerate(per)
    ]
    before = meter.read() if meter else {}
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 120) for _ in workers]
    elapsed = time.perf_counter() - t0
    after = meter.read() if meter else {}
    for w in workers:
        w.join(30)
    pairs = sum(r[0] for r in results)
    lat = [x for r in results for x in r[1]]
    cpu = {name: after[name] - before[name] for name in after}
    cpu["client"] = sum(r[2] for r in results)
    # time of the measured loops, not of process start-up
    return Result(pairs, min(elapsed, seconds + 0.5), lat, cpu)


# ---------------------------------------------------------------------------------------------
# the gRPC layer alone: a server whose Hold and Settle do nothing, to show this machine's ceiling


def noop_server(addr: str) -> None:
    import grpc

    from tokenforge.rpc import install_uvloop
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    class Noop(ledger_pb2_grpc.LedgerServiceServicer):
        async def Hold(self, request, context):  # type: ignore[no-untyped-def]
            return L.HoldResponse(hold_id="hold_noop", amount_nano=request.amount_nano)

        async def Settle(self, request, context):  # type: ignore[no-untyped-def]
            return L.SettleResponse(receipt_id="rcpt_noop", amount_nano=request.rated_nano)

        async def Batch(self, request, context):  # type: ignore[no-untyped-def]
            outcomes = []
            for call in request.calls:
                if call.WhichOneof("call") == "hold":
                    outcomes.append(L.LedgerOutcome(hold=L.HoldResponse(hold_id="hold_noop", amount_nano=call.hold.amount_nano)))
                else:
                    outcomes.append(L.LedgerOutcome(settle=L.SettleResponse(receipt_id="rcpt_noop", amount_nano=call.settle.rated_nano)))
            return L.LedgerBatchResponse(outcomes=outcomes)

    async def main() -> None:
        server = grpc.aio.server()
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(Noop(), server)
        server.add_insecure_port(addr)
        await server.start()
        await server.wait_for_termination()

    install_uvloop()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# the same work straight through asyncpg, one statement per commit


# The same bookkeeping as the ledger's (hold row, key usage, journal, receipt), on the ledger's
# own tables, one statement per commit: what a straightforward implementation would send.
_DIRECT_HOLD = """
WITH b AS (UPDATE buckets SET held_nano = held_nano + $3
            WHERE account_id = $1 AND bucket = 'wallet' AND balance_nano - held_nano >= $3
            RETURNING balance_nano),
     k AS (UPDATE keys SET held_wallet_nano = held_wallet_nano + $3
            WHERE id = $2 AND EXISTS (SELECT 1 FROM b) RETURNING 1),
     h AS (INSERT INTO holds (id, request_id, bucket, account_id, key_id, run_funded, amount_nano,
                              state, ttl_s, expires_at, created_at)
           SELECT $4, $5, 'wallet', $1, $2, false, $3, 'active', 600, now() + interval '600 s', now()
             FROM b RETURNING 1),
     t AS (INSERT INTO transfers (at, kind, unit, src, dst, amount_nano, account_id, bucket, key_id,
                                  ref, balance_after_nano)
           SELECT now(), 'hold', 'CNY', 'customer', 'holds', $3, $1, 'wallet', $2, $4, balance_nano
             FROM b RETURNING 1)
SELECT count(*) FROM b"""

_DIRECT_CAPTURE = """
WITH hd AS (UPDATE holds SET state = 'captured', captured_nano = $3, released_nano = amount_nano - $3,
                             closed_at = now()
             WHERE request_id = $4 AND bucket = 'wallet' AND state = 'active' RETURNING id, amount_nano),
     b AS (UPDATE buckets SET balance_nano = balance_nano - $3,
                              held_nano = held_nano - (SELECT amount_nano FROM hd)
            WHERE account_id = $1 AND bucket = 'wallet' AND EXISTS (SELECT 1 FROM hd)
            RETURNING balance_nano),
     k AS (UPDATE keys SET held_wallet_nano = held_wallet_nano - (SELECT amount_nano FROM hd),
                           spent_wallet_nano = spent_wallet_nano + $3,
                           day = current_date, day_wallet_nano = CASE WHEN day = current_date
                                THEN day_wallet_nano + $3 ELSE $3 END
            WHERE id = $2 AND EXISTS (SELECT 1 FROM hd) RETURNING 1),
     r AS (INSERT INTO receipts (id, request_id, key_id, account_id, status, bucket, rated_nano,
                                 amount_nano, uncollected_nano, held_nano, released_nano, created_at, body)
           SELECT $5, $4, $2, $1, 'settled', 'wallet', $3, $3, 0, amount_nano, amount_nano - $3, now(),
                  $6::jsonb FROM hd RETURNING 1),
     t AS (INSERT INTO transfers (at, kind, unit, src, dst, amount_nano, account_id, bucket, key_id,
                                  ref, receipt_id, balance_after_nano)
           SELECT now(), 'capture', 'CNY', 'holds', 'revenue', $3, $1, 'wallet', $2, hd.id, $5, b.balance_nano
             FROM hd, b
           UNION ALL
           SELECT now(), 'release', 'CNY', 'holds', 'customer', hd.amount_nano - $3, $1, 'wallet', $2,
                  hd.id, $5, b.balance_nano
             FROM hd, b WHERE hd.amount_nano > $3
           RETURNING 1)
SELECT count(*) FROM b"""


async def run_direct(url: str, customers: list[tuple[str, str]], clients: int, seconds: float, meter: CpuMeter | None = None) -> Result:
    import resource

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    before = meter.read() if meter else {}
    pool = await asyncpg.create_pool(url, min_size=clients, max_size=clients)
    assert pool is not None
    latencies: list[float] = []
    pairs = 0
    deadline = time.perf_counter() + seconds
    prefix = secrets.token_hex(4)
    body = RECEIPT.decode()

    async def client(i: int) -> None:
        nonlocal pairs
        n = 0
        while time.perf_counter() < deadline:
            account_id, key_id = customers[(i + n * clients) % len(customers)]
            rid = f"d{prefix}-{i}-{n}"
            n += 1
            t0 = time.perf_counter()
            async with pool.acquire() as conn:
                held = await conn.fetchval(_DIRECT_HOLD, account_id, key_id, HOLD_NANO, f"hold_{rid}", rid)
                assert held == 1
                captured = await conn.fetchval(_DIRECT_CAPTURE, account_id, key_id, RATED_NANO, rid, f"rcpt_{rid}", body)
                assert captured == 1
            latencies.append((time.perf_counter() - t0) * 1000)
            pairs += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    after = meter.read() if meter else {}
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    await pool.close()
    cpu = {name: after[name] - before[name] for name in after if name != "ledger"}
    cpu["client"] = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    return Result(pairs, elapsed, latencies, cpu)


# ---------------------------------------------------------------------------------------------
# set-up


async def make_database(server_url: str) -> tuple[str, str]:
    name = "tf_ledger_bench_" + secrets.token_hex(4)
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urllib.parse.urlsplit(server_url)
    return name, urllib.parse.urlunsplit(parts._replace(path="/" + name))


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def seed(addr: str, n_accounts: int) -> list[tuple[str, str]]:
    """Accounts with money and one key each; returns (account id, key id) pairs."""
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    async with client_channel(addr) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> tuple[str, str]:
            async with sem:
                account = await stub.CreateAccount(L.CreateAccountRequest(name=f"bench-{i}"))
                await stub.TopUp(L.TopUpRequest(account_id=account.id, bucket=1, amount_nano=1_000_000 * ONE,
                                                idempotency_key=f"bench-{account.id}"))
                key = await stub.CreateKey(L.CreateKeyRequest(account_id=account.id, name="bench", route_policy=1))
                return account.id, key.key.id

        return list(await asyncio.gather(*(one(i) for i in range(n_accounts))))


async def settle_database(url: str) -> None:
    """VACUUM ANALYZE between cases, so one case does not pay for the dead rows of the one
    before (autovacuum would otherwise run during the next measurement)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


async def wait_ready_plain(addr: str) -> None:
    """Wait until a server without health checking accepts connections."""
    import grpc

    from tokenforge.rpc import client_channel

    async with client_channel(addr) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
    del grpc


async def wait_ready(addr: str) -> None:
    from tokenforge.rpc import wait_healthy

    await wait_healthy(addr, 30)


def fmt(r: Result) -> str:
    return f"{r.rate:8.0f} pairs/s   p50 {r.pct(50):7.1f} ms   p99 {r.pct(99):7.1f} ms   ({r.pairs} pairs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=1, help="client processes for the gRPC runs")
    ap.add_argument("--writers", type=int, default=1, help="TF_LEDGER_WRITERS for the ledger")
    ap.add_argument("--cases", default="hot,spread,noop", help="comma-separated cases among hot, spread, noop (default: all three)")
    ap.add_argument("--noop-server", metavar="ADDR", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.noop_server:
        noop_server(ns.noop_server)
        return 0

    tmp = tempfile.TemporaryDirectory(prefix="tf-bench-")
    pg = None
    server_url = os.environ.get("TF_DATABASE_URL")
    if not server_url:
        from tokenforge.pg import start_embedded

        pg = start_embedded(pathlib.Path(tmp.name) / "pg")
        server_url = pg.url
    dbname, url = asyncio.run(make_database(server_url))
    addr = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, TF_DATABASE_URL=url, TF_LEDGER_ADDR=addr, TF_LEDGER_WRITERS=str(ns.writers))
    log_path = pathlib.Path(os.environ.get("TF_BENCH_LEDGER_LOG", pathlib.Path(tmp.name) / "ledger.log"))
    script = pathlib.Path(sys.executable).parent / "tokenforge"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tokenforge.cli"]
    with log_path.open("wb") as log:
        ledger = subprocess.Popen([*cmd, "serve", "ledger"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_ready(addr))
        hot = asyncio.run(seed(addr, 1))
        spread = asyncio.run(seed(addr, ns.accounts))
        # the direct runs work on accounts of their own
        hot_direct = asyncio.run(seed(addr, 1))
        spread_direct = asyncio.run(seed(addr, ns.accounts))
        hot_keys = [k for _, k in hot]
        spread_keys = [k for _, k in spread]
        postmaster_pid = None
        if pg is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                postmaster_pid = int((pathlib.Path(tmp.name) / "pg" / "postmaster.pid").read_text().split()[0])
        meter = CpuMeter(ledger.pid, postmaster_pid)
        print(f"ledger bench: {ns.clients} concurrent clients, {ns.seconds:.0f} s per case, "
              f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} before), "
              f"writers={ns.writers}, client procs={ns.procs}")
        rows = []
        cases = set(ns.cases.split(","))
        for case, label, keys, direct_ids in (
            ("hot", "hot account ", hot_keys, hot_direct),
            ("spread", f"{ns.accounts} accounts", spread_keys, spread_direct),
        ):
            if case not in cases:
                continue
            asyncio.run(settle_database(url))
            u = run_grpc(addr, keys, ns.clients, ns.seconds, ns.procs, meter)
            asyncio.run(settle_database(url))
            g = run_grpc(addr, keys, ns.clients, ns.seconds, ns.procs, meter, coalesce=True)
            asyncio.run(settle_database(url))
            d = asyncio.run(run_direct(url, direct_ids, ns.clients, ns.seconds, meter))
            rows.append((label, g, d))
            print(f"{label:14s} ledger gRPC, one call per op {fmt(u)}")
            print(f"{'':14s}   {u.cpu_ms_per_pair()}")
            print(f"{'':14s} ledger gRPC, coalesced (Batch) {fmt(g)}")
            print(f"{'':14s}   {g.cpu_ms_per_pair()}")
            print(f"{'':14s} asyncpg 1 stmt/commit {fmt(d)}")
            print(f"{'':14s}   {d.cpu_ms_per_pair()}")
            print(f"{'':14s} ratio ledger (coalesced)/direct: throughput x{g.rate / d.rate:.2f}, "
                  f"p50 x{g.pct(50) / d.pct(50):.2f}, p99 x{g.pct(99) / d.pct(99):.2f}; "
                  f"one call per op/direct: x{u.rate / d.rate:.2f}")
        if "noop" in cases:
            noop_addr = f"127.0.0.1:{free_port()}"
            noop = subprocess.Popen([sys.executable, __file__, "--noop-server", noop_addr])
            try:
                asyncio.run(wait_ready_plain(noop_addr))
                n = run_grpc(noop_addr, hot_keys, ns.clients, ns.seconds, ns.procs, CpuMeter(noop.pid, None))
                nc = run_grpc(noop_addr, hot_keys, ns.clients, ns.seconds, ns.procs, CpuMeter(noop.pid, None),
                              coalesce=True)
            finally:
                noop.kill()
                noop.wait(10)
            print(f"{'gRPC ceiling':14s} no-op server, one call per op {fmt(n)}")
            print(f"{'':14s}   {n.cpu_ms_per_pair()}")
            print(f"{'':14s} no-op server, coalesced (Batch) {fmt(nc)}")
            print(f"{'':14s}   {nc.cpu_ms_per_pair()}")
            print(f"{'':14s} (the same calls against a server that does nothing: what Python gRPC alone")
            print(f"{'':14s}  allows on this machine; ledger (coalesced)/ceiling (coalesced): "
                  + ", ".join(f"{label.strip()} x{g.rate / nc.rate:.2f}" for label, g, _ in rows) + ")")
        audit = asyncio.run(_audit(addr))
        print(f"audit after the run: {'ok' if audit.ok else list(audit.problems)}")
    finally:
        ledger.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            ledger.wait(15)
        if ledger.poll() is None:
            ledger.kill()
        asyncio.run(drop_database(server_url, dbname))
        if pg is not None:
            pg.stop()
        tmp.cleanup()
    return 0


async def _audit(addr: str):  # type: ignore[no-untyped-def]
    from tokenforge.rpc import client_channel
    from tokenforge.v1 import ledger_pb2 as L
    from tokenforge.v1 import ledger_pb2_grpc

    async with client_channel(addr) as channel:
        return await ledger_pb2_grpc.LedgerServiceStub(channel).Audit(L.AuditRequest())


if __name__ == "__main__":
    sys.exit(main())
