"""Stack benchmark: the whole gateway against the simulator, side by side with the simulator alone.

    python bench/stack_bench.py [--requests 5000] [--clients 64] [--sequential 500]
                                [--streams 500] [--warmup 2000] [--profile DIR]

Starts its own stack (`tokenforge up` in a temporary data folder, the bundled demo catalog:
model `gpt-4o-mini` → channel `cheap-a` → the simulator with zero delay), makes an account
with a wallet top-up and a `routed` key, then in one run:

  (a) throughput: --requests non-streaming chat completions at --clients concurrent
      keep-alive clients, straight to the simulator and through the stack (edge → router →
      metering → ledger → PostgreSQL, every request held, rated and settled with a receipt):
      requests/s, p50, p99 and the ratio;
  (b) added latency at one client: --sequential requests one after another each way;
      p50/p99 of the stack minus straight;
  (c) time to first byte of a streaming completion, both ways, at one client (--streams).

Order: a warm-up (--warmup requests at --clients, to a steady state), a wait until the stack
is idle, then (b), (c) and (a) last, so that PostgreSQL's vacuum and checkpoint after the
burst are not billed to the one-client phases.

Afterwards it checks conservation: the wallet decreased by exactly the sum of the receipts'
amounts (paged through GET /admin/v1/accounts/{id}/receipts), nothing is held, one receipt per
request, and GET /admin/v1/audit is ok.

The load generator is deliberately lean because it shares the 2 cores with the stack: one
process, uvloop, a hand-written HTTP/1.1 keep-alive client over asyncio protocols with
httptools' parser (no httpx: its per-request cost would be a third of the stack's budget).
Its own CPU per request is printed, as is every stack process's CPU per request (psutil),
which is the cheapest profile of where the time goes. `--profile DIR` also records a py-spy
flame graph of each Python service during an extra throughput phase (py-spy slows what it
samples a little, so those figures are not the reported ones). `--export-spans` runs the
stack with OTLP/HTTP span export switched on (as a deployment with a collector would),
into a sink process that answers 200 and discards; without it the spans are recorded (the
router builds receipts from them) but not exported. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import urlsplit

import httptools
import psutil
import uvloop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stackproc import RunningStack, start_stack  # noqa: E402

MODEL = "gpt-4o-mini"                  # catalog model (bundled catalog)
UPSTREAM_MODEL = "gpt-4o-mini-compat"  # what the router sends to channel cheap-a
MAX_TOKENS = 16                        # the sim answers min(24, max_tokens) tokens
WALLET_TOPUP = "1000.00"
SERVICES = ("edge", "router", "metering", "ledger", "sim-upstream")
RECEIPT_PAGE = 100
QUIET_WAIT_S = 30.0      # at most this long for the stack to go idle after the warm-up
QUIET_WINDOW_S = 0.5
QUIET_CPU_SHARE = 0.05   # idle: the stack's processes together use under 5% of one core


def chat_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Summarise the market data for this quarter."}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


# ---- a lean HTTP/1.1 keep-alive client --------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; times the first body byte."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes, float]] | None = None
        self.body: list[bytes] = []
        self.first_body_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        if not self.first_body_s:
            self.first_body_s = time.perf_counter()
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), b"".join(self.body), self.first_body_s))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, raw: bytes) -> tuple[int, bytes, float]:
        assert self.transport is not None and self.waiter is None
        self.body = []
        self.first_body_s = 0.0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def raw_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connect(url: str) -> _Conn:
    parts = urlsplit(url)
    _, conn = await asyncio.get_running_loop().create_connection(_Conn, parts.hostname, parts.port)
    return conn


@dataclass
class Phase:
    name: str
    requests: int
    wall_s: float
    latencies_ms: list[float]
    ttfb_ms: list[float]
    errors: dict[int, int]
    loadgen_cpu_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies_ms if values is None else values)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(round(q / 100 * (len(data) - 1))))]


async def load(url: str, raw: bytes, n: int, clients: int) -> tuple[float, list[float], list[float], dict[int, int]]:
    conns = [await _connect(url) for _ in range(clients)]
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: dict[int, int] = {}
    remaining = n

    async def worker(conn: _Conn) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status, _body, first = await conn.request(raw)
            t1 = time.perf_counter()
            if status != 200:
                errors[status] = errors.get(status, 0) + 1
            latencies.append((t1 - t0) * 1000)
            ttfbs.append((first - t0) * 1000 if first else float("nan"))

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - started
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return wall, latencies, ttfbs, errors


# ---- an OTLP sink for --export-spans --------------------------------------------------------

SINK_CODE = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def start_sink() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SINK_CODE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{proc.stdout.readline().strip()}"


# ---- the stack's processes --------------------------------------------------------------------


def stack_processes(stack: RunningStack) -> dict[str, list[psutil.Process]]:
    """Each service's process, and PostgreSQL (its postmaster and backends)."""
    found: dict[str, list[psutil.Process]] = {name: [] for name in (*SERVICES, "postgres")}
    for child in stack.children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if len(cmd) >= 2 and cmd[-2] == "serve" and cmd[-1] in found:
            found[cmd[-1]].append(child)
    pgdata = str((stack.data_dir / "pg").resolve())
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and pgdata in " ".join(proc.info["cmdline"] or ()):
                found["postgres"].append(proc)
                found["postgres"] += proc.children(recursive=True)
        except psutil.Error:
            continue
    return found


def cpu_snapshot(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, plist in procs.items():
        total = 0.0
        for p in plist:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        out[name] = total
    return out


def refresh_postgres(stack: RunningStack, procs: dict[str, list[psutil.Process]]) -> None:
    procs["postgres"] = stack_processes(stack)["postgres"]


# ---- setup and checks -------------------------------------------------------------------------


@dataclass
class Customer:
    account_id: str
    secret: str


def make_customer(stack: RunningStack) -> Customer:
    with stack.admin() as admin:
        acct = admin.post("/admin/v1/accounts", json={"name": f"bench-{uuid.uuid4().hex[:6]}"})
        acct.raise_for_status()
        account_id = acct.json()["id"]
        admin.post(f"/admin/v1/accounts/{account_id}/topups", json={
            "bucket": "wallet", "amount": WALLET_TOPUP, "idempotency_key": uuid.uuid4().hex}).raise_for_status()
        key = admin.post("/admin/v1/keys", json={"account_id": account_id, "name": "bench", "route_policy": "routed"})
        key.raise_for_status()
        return Customer(account_id, key.json()["key"])


def check_conservation(stack: RunningStack, customer: Customer, expected_receipts: int) -> list[str]:
    """The wallet decreased by exactly the sum of the receipts; nothing is held; audit ok."""
    problems: list[str] = []
    with stack.admin() as admin:
        acct = admin.get(f"/admin/v1/accounts/{customer.account_id}").json()
        wallet = acct["buckets"]["wallet"]
        total = Decimal(0)
        count = 0
        statuses: dict[str, int] = {}
        after = ""
        while True:
            params = {"limit": RECEIPT_PAGE} | ({"after": after} if after else {})
            page = admin.get(f"/admin/v1/accounts/{customer.account_id}/receipts", params=params).json()
            for r in page["data"]:
                assert r["bucket"] in ("wallet", None), r["bucket"]
                total += Decimal(r["amount"])
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
                count += 1
            if not page["has_more"]:
                break
            after = page["last_id"]
        audit = admin.get("/admin/v1/audit").json()
    spent = Decimal(WALLET_TOPUP) - Decimal(wallet["balance"])
    print(f"conservation: {count} receipts {statuses}, Σ amounts {total} CNY, wallet spent {spent} CNY, "
          f"held {wallet['held']}, audit ok={audit['ok']} "
          f"({audit['accounts_checked']} account{'' if audit['accounts_checked'] == 1 else 's'} checked)")
    if spent != total:
        problems.append(f"wallet spent {spent} != Σ receipts {total}")
    if Decimal(wallet["held"]) != 0:
        problems.append(f"held is {wallet['held']}, not 0")
    if count != expected_receipts:
        problems.append(f"{count} receipts for {expected_receipts} requests")
    if statuses.keys() - {"settled"}:
        problems.append(f"receipts not all settled: {statuses}")
    if not audit["ok"]:
        problems.append(f"audit: {audit['problems'][:5]}")
    return problems


# ---- the run ----------------------------------------------------------------------------------


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True)))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    for r in rows:
        print(fmt_row(r, widths))


class Bench:
    def __init__(self, stack: RunningStack, customer: Customer, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.sim_url = self._sim_url()
        auth = {"Authorization": f"Bearer {customer.secret}"}
        self.raw = {
            ("straight", False): raw_request(self.sim_url, "/v1/chat/completions", chat_body(UPSTREAM_MODEL, False), {}),
            ("stack", False): raw_request(stack.url, "/v1/chat/completions", chat_body(MODEL, False), auth),
            ("straight", True): raw_request(self.sim_url, "/v1/chat/completions", chat_body(UPSTREAM_MODEL, True), {}),
            ("stack", True): raw_request(stack.url, "/v1/chat/completions", chat_body(MODEL, True), auth),
        }
        self.url = {"straight": self.sim_url, "stack": stack.url}
        self.procs = stack_processes(stack)
        self.stack_requests = 0
        self.profile_dir = pathlib.Path(args.profile) if args.profile else pathlib.Path()
        if args.profile:
            self.profile_dir.mkdir(parents=True, exist_ok=True)

    def _sim_url(self) -> str:
        for child in self.stack.children():
            try:
                if child.cmdline()[-1] == "sim-upstream":
                    return child.environ()["TF_SIM_URL"]
            except (psutil.Error, IndexError, KeyError):
                continue
        raise SystemExit("cannot find the simulator's URL")

    async def phase(self, name: str, way: str, stream: bool, n: int, clients: int) -> Phase:
        refresh_postgres(self.stack, self.procs)
        before = cpu_snapshot(self.procs)
        cpu0 = time.process_time()
        wall, lat, ttfb, errors = await load(self.url[way], self.raw[(way, stream)], n, clients)
        loadgen = time.process_time() - cpu0
        after = cpu_snapshot(self.procs)
        if way == "stack":
            self.stack_requests += n
        if errors:
            print(f"  {name}: non-200 answers {errors}", file=sys.stderr)
        return Phase(name, n, wall, lat, ttfb, errors, loadgen, {k: after[k] - before.get(k, 0.0) for k in after})

    async def settle_down(self, limit_s: float = QUIET_WAIT_S) -> float:
        """Wait until the stack is idle (after a burst PostgreSQL keeps vacuuming and
        checkpointing for seconds, which would be billed to the next, sequential phase)."""
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            refresh_postgres(self.stack, self.procs)
            before = cpu_snapshot(self.procs)
            await asyncio.sleep(QUIET_WINDOW_S)
            busy = sum(cpu_snapshot(self.procs).values()) - sum(before.values())
            if busy / QUIET_WINDOW_S < QUIET_CPU_SHARE:
                break
        return time.monotonic() - started

    async def run(self) -> dict[str, Phase]:
        a = self.args
        # Warm both paths to a steady state: connections and pools at full size, HTTP/2
        # flow-control windows grown, caches and prepared statements filled.
        await self.phase("warm", "straight", False, a.warmup, a.clients)
        await self.phase("warm", "stack", False, a.warmup, a.clients)
        await self.phase("warm", "stack", True, 50, 1)
        results: dict[str, Phase] = {}
        # One client first, on an idle stack; the throughput burst last.
        waited = await self.settle_down()
        print(f"stack idle after {waited:.1f} s", flush=True)
        results["seq straight"] = await self.phase("seq straight", "straight", False, a.sequential, 1)
        results["seq stack"] = await self.phase("seq stack", "stack", False, a.sequential, 1)
        results["ttfb straight"] = await self.phase("ttfb straight", "straight", True, a.streams, 1)
        results["ttfb stack"] = await self.phase("ttfb stack", "stack", True, a.streams, 1)
        results["tput straight"] = await self.phase("tput straight", "straight", False, a.requests, a.clients)
        results["tput stack"] = await self.phase("tput stack", "stack", False, a.requests, a.clients)
        if a.profile:
            await self.profile(self.profile_dir)
        return results

    async def profile(self, out: pathlib.Path) -> None:
        """py-spy on every Python service while the stack is under load (`--profile-clients`)."""
        if shutil.which("py-spy") is None:
            raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
        seconds = max(3, int(self.args.requests / 400))
        spies = []
        for name in SERVICES:
            for p in self.procs[name]:
                for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
                    spies.append(await asyncio.create_subprocess_exec(
                        "py-spy", "record", "--pid", str(p.pid), "--rate", "200", "--duration", str(seconds),
                        "--nonblocking", "--format", fmt, "-o", str(out / f"{name}.{ext}"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + seconds
        clients = self.args.profile_clients or self.args.clients
        while time.monotonic() < deadline:
            await self.phase("profile", "stack", False, 50 * clients, clients)
        for spy in spies:
            await spy.wait()
        print(f"\npy-spy profiles in {out} (flame graphs *.svg, collapsed stacks *.txt)")


def report(results: dict[str, Phase], clients: int) -> None:
    s, t = results["tput straight"], results["tput stack"]
    rows = [
        [f"(a) {clients} clients, non-streaming", "straight", str(s.requests), f"{s.rate:,.0f}", f"{s.pct(50):.2f}", f"{s.pct(99):.2f}"],
        ["", "stack", str(t.requests), f"{t.rate:,.0f}", f"{t.pct(50):.2f}", f"{t.pct(99):.2f}"],
        ["", "stack/straight", "", f"{t.rate / s.rate:.3f}", f"{t.pct(50) / s.pct(50):.1f}x", f"{t.pct(99) / s.pct(99):.1f}x"],
    ]
    qs, qt = results["seq straight"], results["seq stack"]
    rows += [
        ["(b) 1 client, sequential", "straight", str(qs.requests), f"{qs.rate:,.0f}", f"{qs.pct(50):.2f}", f"{qs.pct(99):.2f}"],
        ["", "stack", str(qt.requests), f"{qt.rate:,.0f}", f"{qt.pct(50):.2f}", f"{qt.pct(99):.2f}"],
        ["", "added", "", "", f"{qt.pct(50) - qs.pct(50):.2f}", f"{qt.pct(99) - qs.pct(99):.2f}"],
    ]
    fs, ft = results["ttfb straight"], results["ttfb stack"]
    rows += [
        ["(c) streaming, 1 client: TTFB", "straight", str(fs.requests), "", f"{fs.pct(50, fs.ttfb_ms):.2f}", f"{fs.pct(99, fs.ttfb_ms):.2f}"],
        ["", "stack", str(ft.requests), "", f"{ft.pct(50, ft.ttfb_ms):.2f}", f"{ft.pct(99, ft.ttfb_ms):.2f}"],
        ["", "added", "", "", f"{ft.pct(50, ft.ttfb_ms) - fs.pct(50, fs.ttfb_ms):.2f}",
         f"{ft.pct(99, ft.ttfb_ms) - fs.pct(99, fs.ttfb_ms):.2f}"],
    ]
    print_table("results (latency in ms)", ["benchmark", "way", "requests", "req/s", "p50", "p99"], rows)

    names = ["loadgen", *SERVICES, "postgres"]
    cpu_rows = []
    for key in ("tput straight", "tput stack", "seq stack"):
        p = results[key]
        per = {"loadgen": p.loadgen_cpu_s, **p.cpu_s}
        cpu_rows.append([key, *[f"{per.get(n, 0.0) / p.requests * 1000:.2f}" for n in names],
                         f"{sum(per.get(n, 0.0) for n in names) / p.requests * 1000:.2f}"])
    print_table("CPU per request (ms) by process", ["phase", *names, "total"], cpu_rows)


async def amain(args: argparse.Namespace) -> int:
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="tf-bench-"))
    env = {"TF_KEY_CACHE_TTL_S": os.environ.get("TF_KEY_CACHE_TTL_S", "1")}
    sink = None
    if args.export_spans:
        sink, sink_url = start_sink()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink_url
        print(f"span export on: OTLP/HTTP to a discarding sink at {sink_url}", flush=True)
    print(f"starting the stack in {data_dir} …", flush=True)
    stack = start_stack(data_dir / "data", env=env)
    try:
        customer = make_customer(stack)
        bench = Bench(stack, customer, args)
        import importlib.util

        code = importlib.util.find_spec("tokenforge")
        print(f"edge {stack.url}, simulator {bench.sim_url}; python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run; "
              f"tokenforge from {pathlib.Path(code.origin).parent if code and code.origin else '?'}", flush=True)
        results = await bench.run()
        report(results, args.clients)
        problems = check_conservation(stack, customer, bench.stack_requests)
        if problems:
            print("CONSERVATION PROBLEMS:\n  " + "\n  ".join(problems))
            return 1
        t, q = results["tput stack"], results["seq stack"]
        added_p50 = q.pct(50) - results["seq straight"].pct(50)
        print(f"\ntargets: ≥400 settled req/s: {t.rate:,.0f} {'ok' if t.rate >= 400 else 'MISSED'}; "
              f"≤5 ms added p50 at one client: {added_p50:.2f} {'ok' if added_p50 <= 5 else 'MISSED'}")
        # Which kind of host this was: the same code met both targets where the simulator
        # alone served 22,000-24,000 requests/s, and missed them on hosts half as fast.
        print(f"(this host: the simulator alone served {results['tput straight'].rate:,.0f} requests/s at "
              f"{args.clients} clients; bench/README.md, 'Targets', has the figures by kind of host)")
        return 0
    finally:
        stack.stop()
        if sink is not None:
            sink.terminate()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--profile", metavar="DIR", help="also record py-spy profiles of each service")
    parser.add_argument("--profile-clients", type=int, default=0, metavar="N",
                        help="clients during the profile (default: --clients; 1 profiles the one-client path)")
    parser.add_argument("--export-spans", action="store_true", help="export spans over OTLP/HTTP (to a sink)")
    args = parser.parse_args()
    uvloop.install()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
