"""Process faults under load, through the whole stack with the official `openai` client.

Each test builds its own stack from separate processes (simulator, ledger, metering, router,
edge; `tokenforge up` stops everything when one child dies, so it cannot be used to kill one)
on a fresh database of one embedded PostgreSQL, with short holds (TF_HOLD_TTL_MAX_S) and a
fast reaper, then kills, stops or freezes one process mid-load and checks the money:
conservation (the audit), nothing held once holds expire, at most one receipt per request
and every receipt consistent with its own attempts, no balance overshoot, and OpenAI-shaped
errors for the clients. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.integration._procs_metering import ServiceProc, start_service, start_sim
from tokenforge.stack import free_port

HOLD_TTL_S = 4  # the ledger caps every hold at this (TF_HOLD_TTL_MAX_S)
START_TIMEOUT_S = 30.0
ADMIN_TOKEN = "tf-admin-faults-" + secrets.token_hex(4)
NANO = Decimal("0.000000001")

CATALOG = """\
channels:
  - {id: cheap-a, route: routed, base_url: "${TF_SIM_URL}/v1", api_key_env: CHEAP_A_KEY, timeout_s: 10, retries: 0}
  - {id: cheap-b, route: routed, base_url: "${TF_SIM_URL}/v1", api_key_env: CHEAP_B_KEY, timeout_s: 10, retries: 0}
  - {id: cheap-r, route: routed, base_url: "${TF_SIM_URL}/v1", api_key_env: CHEAP_A_KEY, timeout_s: 10, retries: 1}
models:
  - name: m-slow
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+delay_ms=700", price: {input: "1.20", output: "4.80"}}
  - name: m-slowstream
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+chunk_delay_ms=60+tokens=24", price: {input: "1.20", output: "4.80"}}
  - name: m-fallback
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+fail=500", price: {input: "1.20", output: "4.80"}}
      - {channel: cheap-b, upstream_model: "gpt-4o-mini+delay_ms=500+chunk_delay_ms=40+tokens=16", price: {input: "1.60", output: "6.40"}}
  - name: m-retry
    channels:
      - {channel: cheap-r, upstream_model: "gpt-4o-mini+fail=503x1+delay_ms=300+chunk_delay_ms=30+tokens=12", price: {input: "1.20", output: "4.80"}}
  - name: m-break
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+chunk_delay_ms=40+tokens=24+break_after=5", price: {input: "1.20", output: "4.80"}}
  - name: m-fast
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini", price: {input: "1.20", output: "4.80"}}
  - name: m-hang
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+delay_ms=1000+chunk_delay_ms=1500+tokens=8", price: {input: "1.20", output: "4.80"}}
"""


# ---- the stack, one process per service ------------------------------------------------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tokenforge.pg import start_embedded

    server = start_embedded(tmp_path_factory.mktemp("faults-pg"))
    try:
        yield server
    finally:
        server.stop()


def _with_database(url: str, name: str) -> str:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@dataclass
class Stack:
    env: dict[str, str]
    database_url: str
    url: str
    procs: dict[str, ServiceProc] = field(default_factory=dict)

    def start(self, name: str) -> ServiceProc:
        if name == "edge":
            proc = _start_edge(self.env)
        elif name == "sim":
            proc = start_sim()
        else:
            proc = start_service(name, self.env, rf"{name} ready on (\S+)")
        self.procs[name] = proc
        return proc

    def kill9(self, name: str) -> None:
        p = self.procs[name].proc
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].proc.send_signal(sig)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)

    def stop(self) -> None:
        for name in ("edge", "router", "metering", "ledger", "sim"):
            proc = self.procs.get(name)
            if proc is not None:
                if proc.proc.poll() is None:
                    proc.proc.send_signal(signal.SIGCONT)  # a frozen one must hear the SIGTERM
                proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + "\n".join(p.lines[-60:]) for n, p in self.procs.items())


def _start_edge(env: dict[str, str]) -> ServiceProc:
    full_env = {**os.environ, **env}
    proc = subprocess.Popen([sys.executable, "-m", "tokenforge.cli", "serve", "edge"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    url = f"http://127.0.0.1:{env['TF_EDGE_PORT']}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return ServiceProc(proc, url, lines)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("edge did not start:\n" + "\n".join(lines))
        time.sleep(0.05)  # polling its health, bounded by the deadline


def _create_database(url: str, name: str) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())


def build_stack(pg: Any, tmp_path: pathlib.Path, extra_env: dict[str, str] | None = None) -> Stack:
    """A stack of separate processes on a fresh database (not started: see `running`)."""
    name = "tf_faults_" + secrets.token_hex(4)
    _create_database(pg.url, name)
    database_url = _with_database(pg.url, name)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    edge_port = free_port()
    env = {
        "TF_CATALOG": str(catalog),
        "CHEAP_A_KEY": "sk-sim-a",
        "CHEAP_B_KEY": "sk-sim-b",
        "TF_DATABASE_URL": database_url,
        "TF_LEDGER_ADDR": f"127.0.0.1:{free_port()}",
        "TF_METERING_ADDR": f"127.0.0.1:{free_port()}",
        "TF_ROUTER_ADDR": f"127.0.0.1:{free_port()}",
        "TF_EDGE_HOST": "127.0.0.1",
        "TF_EDGE_PORT": str(edge_port),
        "TF_ADMIN_TOKEN": ADMIN_TOKEN,
        "TF_HOLD_TTL_MAX_S": str(HOLD_TTL_S),
        "TF_LEDGER_REAP_INTERVAL_S": "0.2",
        "TF_REQUEST_DEADLINE_S": "20",
        "TF_KEY_CACHE_TTL_S": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    return Stack(env, database_url, f"http://127.0.0.1:{edge_port}")


@contextlib.contextmanager
def running(s: Stack) -> Iterator[Stack]:
    """The simulator, then the services in dependency order; all stopped afterwards."""
    try:
        sim = s.start("sim")
        s.env["TF_SIM_URL"] = sim.address
        for svc in ("ledger", "metering", "router", "edge"):
            s.start(svc)
        yield s
    finally:
        s.stop()


@pytest.fixture
def stack(pg: Any, tmp_path: pathlib.Path) -> Iterator[Stack]:
    with running(build_stack(pg, tmp_path)) as s:
        yield s


# ---- customers and checks ----------------------------------------------------------------------


@dataclass
class Cust:
    stack: Stack
    account_id: str
    key_id: str
    secret: str
    topped: Decimal

    def openai(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.stack.url + "/v1", api_key=self.secret, max_retries=0, timeout=timeout)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.stack.url, headers={"authorization": f"Bearer {self.secret}"}, timeout=30)


def new_customer(s: Stack, wallet: str = "10.00", **key_fields: Any) -> Cust:
    with s.admin() as admin:
        acct = admin.post("/admin/v1/accounts", json={"name": "faults"}).json()
        top = admin.post(f"/admin/v1/accounts/{acct['id']}/topups",
                         json={"bucket": "wallet", "amount": wallet, "idempotency_key": uuid.uuid4().hex})
        assert top.status_code == 201, top.text
        key = admin.post("/admin/v1/keys", json={"account_id": acct["id"], "name": "bot", "route_policy": "routed",
                                                 **key_fields})
        assert key.status_code == 201, key.text
    return Cust(s, acct["id"], key.json()["id"], key.json()["key"], Decimal(wallet))


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 20.0, every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(every_s)  # polling, bounded by the deadline


def account(s: Stack, account_id: str) -> dict[str, Any]:
    with s.admin() as admin:
        resp = admin.get(f"/admin/v1/accounts/{account_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def all_receipts(s: Stack, account_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = ""
    with s.admin() as admin:
        while True:
            page = admin.get(f"/admin/v1/accounts/{account_id}/receipts",
                             params={"limit": 100, **({"after": after} if after else {})}).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["last_id"]


def price(usage: dict[str, int], p_in: str, p_out: str) -> Decimal:
    return (usage["input_tokens"] * Decimal(p_in) + usage["output_tokens"] * Decimal(p_out)) / Decimal(1_000_000)


def upstream_tries(s: Stack) -> dict[str, int]:
    """How many tries the simulator got per request (the router's X-TF-Request-Id)."""
    log = httpx.get(s.env["TF_SIM_URL"] + "/sim/log", timeout=10).json()["data"]
    tries: dict[str, int] = {}
    for entry in log:
        tries[entry["request_id"]] = tries.get(entry["request_id"], 0) + 1
    return tries


def check_upstream_receipts(s: Stack, receipts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every request the simulator saw (by the router's X-TF-Request-Id) has exactly one
    receipt, listing as many attempts as the simulator got tries. Returns them by request id."""
    tries = upstream_tries(s)
    by_request = {r["request_id"]: r for r in receipts}
    missing = sorted(set(tries) - set(by_request))
    assert not missing, f"{len(missing)} of {len(tries)} requests reached the upstream and have no receipt"
    for rid, n in tries.items():
        assert len(by_request[rid]["attempts"]) == n, by_request[rid]
    return {rid: by_request[rid] for rid in tries}


def unsettled(r: dict[str, Any]) -> bool:
    """A receipt the ledger's reaper wrote for a request no router settled (it died)."""
    return (r.get("error") or {}).get("code") == "unsettled"


def check_attempts_match_upstream(s: Stack, receipts: list[dict[str, Any]]) -> None:
    """Each receipt's attempts match the tries the simulator got for its request; one its
    router never settled lists none (they are in the trace) and charges nothing."""
    tries = upstream_tries(s)
    for r in receipts:
        if unsettled(r):
            assert (r["status"], r["amount"], r["attempts"]) == ("failed", "0", []), r
        else:
            assert len(r["attempts"]) == tries.get(r["request_id"], 0), r


def audit_ok(s: Stack) -> None:
    with s.admin() as admin:
        audit = admin.get("/admin/v1/audit").json()
    assert audit["ok"] is True, audit


def check_money(s: Stack, c: Cust) -> list[dict[str, Any]]:
    """Once every hold has expired or closed: nothing held, conservation for this account
    (top-up = balance + Σ receipts' amounts, to the nano), one receipt per request id, each
    receipt consistent with its own attempts, and the global audit clean."""
    wait_until("every hold released, captured or expired",
               lambda: Decimal(account(s, c.account_id)["buckets"]["wallet"]["held"]) == 0, timeout_s=HOLD_TTL_S + 15)
    receipts = all_receipts(s, c.account_id)
    balance = Decimal(account(s, c.account_id)["buckets"]["wallet"]["balance"])
    assert balance >= 0
    charged = sum((Decimal(r["amount"]) for r in receipts), Decimal(0))
    assert c.topped == balance + charged, (c.topped, balance, charged)
    ids = [r["request_id"] for r in receipts]
    assert len(ids) == len(set(ids)), "two receipts for one request"
    for r in receipts:
        check_receipt(r)
    audit_ok(s)
    return receipts


def check_receipt(r: dict[str, Any]) -> None:
    assert r["status"] in ("settled", "failed", "partial", "cancelled"), r
    attempts = r["attempts"]
    assert [a["n"] for a in attempts] == list(range(1, len(attempts) + 1)), r
    charged = sum((Decimal(a["charged"]) for a in attempts if a.get("charged")), Decimal(0))
    amount, uncollected = Decimal(r["amount"]), Decimal(r["uncollected"])
    # an uncollected part is not charged: the final attempt shows what was paid (the ledger)
    assert amount == charged and uncollected >= 0, r
    if r["status"] == "failed":
        # an upstream that answered on a failed receipt is one whose answer could not be
        # priced: it says so, and nothing was charged for it
        assert amount == 0 and all(
            a["charged"] == "0" and (a["error"] or "").startswith("the upstream's answer could not be priced")
            for a in attempts if a["outcome"] == "success"), r
    if r["status"] == "settled":
        assert attempts and attempts[-1]["outcome"] == "success" and r["final_attempt"] == attempts[-1]["n"], r
    for h in r["holds"]:
        assert h["state"] in ("captured", "released", "expired"), r
        assert Decimal(h["captured"]) + Decimal(h["released"]) == Decimal(h["held"]), r


def openai_error_shape(exc: BaseException) -> None:
    """What a client must get when a request fails: an OpenAI-shaped error body."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.response.json()
        assert set(body["error"]) >= {"message", "type", "code"}, body
        assert exc.status_code in (402, 499, 500, 502, 503, 504), (exc.status_code, body)
    elif isinstance(exc, openai.APIError) and exc.body is not None:  # an error inside a stream
        assert isinstance(exc.body, dict) and "code" in exc.body or "error" in exc.body, exc.body
    else:
        assert isinstance(exc, openai.APIConnectionError | openai.APITimeoutError), repr(exc)


class Counter:
    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._n += 1

    def reset(self) -> None:
        with self._lock:
            self._n = 0

    @property
    def n(self) -> int:
        return self._n


STREAMING = Counter()  # streams that have received their first chunk


@dataclass
class Outcome:
    kind: str  # ok | error | stream_error
    receipt_id: str | None = None
    detail: Any = None


def one_request(c: Cust, model: str, stream: bool, max_tokens: int = 40, timeout: float = 30.0) -> Outcome:
    client = c.openai(timeout)
    msgs = [{"role": "user", "content": "Tell me about tokens and holds."}]
    try:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                    model=model, messages=msgs, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}) as raw:
                rid = raw.headers.get("x-tf-receipt-id")
                try:
                    for i, _chunk in enumerate(raw.parse()):
                        if i == 0:
                            STREAMING.add()
                except openai.APIError as exc:
                    openai_error_shape(exc)
                    return Outcome("stream_error", rid, exc)
                return Outcome("ok", rid)
        raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=max_tokens)
        raw.parse()
        return Outcome("ok", raw.headers.get("x-tf-receipt-id"))
    except (openai.APIStatusError, openai.APIConnectionError, openai.APITimeoutError) as exc:
        openai_error_shape(exc)
        rid = exc.response.headers.get("x-tf-receipt-id") if isinstance(exc, openai.APIStatusError) else None
        return Outcome("error", rid, exc)


MIX = [("m-slow", False), ("m-slowstream", True), ("m-fallback", False), ("m-fallback", True)]


def load(c: Cust, n: int, mix: list[tuple[str, bool]] = MIX, **kw: Any) -> concurrent.futures.Future[list[Outcome]]:
    pool = concurrent.futures.ThreadPoolExecutor(n)

    def run() -> list[Outcome]:
        futures = [pool.submit(one_request, c, *mix[i % len(mix)], **kw) for i in range(n)]
        return [f.result() for f in futures]

    outer = concurrent.futures.ThreadPoolExecutor(1)
    fut = outer.submit(run)
    fut.add_done_callback(lambda _: (pool.shutdown(wait=False), outer.shutdown(wait=False)))
    return fut


def wait_for_upstream(s: Stack, n: int) -> None:
    """Until the simulator has had `n` requests (it counts a request when it arrives; its log
    lists it only when answered)."""
    wait_until(f"{n} requests at the upstream",
               lambda: httpx.get(s.env["TF_SIM_URL"] + "/sim/log", timeout=5).json()["requests_total"] >= n,
               every_s=0.01)


def wait_held(s: Stack, c: Cust, at_least: Decimal) -> None:
    wait_until("requests in flight holding money",
               lambda: Decimal(account(s, c.account_id)["buckets"]["wallet"]["held"]) >= at_least, every_s=0.02)


def receipts_by_id(s: Stack, c: Cust) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in all_receipts(s, c.account_id)}


def sanity_after(s: Stack, c: Cust) -> None:
    """The stack serves a fresh request after the fault, billed to the nano."""
    before = Decimal(account(s, c.account_id)["buckets"]["wallet"]["balance"])
    raw = wait_until("a request served after the fault", lambda: _try_fast(c), timeout_s=20)
    after = Decimal(account(s, c.account_id)["buckets"]["wallet"]["balance"])
    assert before - after == Decimal(raw.headers["x-tf-amount"])


def _try_fast(c: Cust) -> Any:
    try:
        raw = c.openai(10).chat.completions.with_raw_response.create(
            model="m-fast", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        raw.parse()
        return raw
    except openai.APIStatusError as exc:
        assert exc.status_code == 503, exc.response.text
        return None


# ---- the scenarios ---------------------------------------------------------------------------


def test_router_kill_9_with_32_requests_in_flight(stack: Stack) -> None:
    """kill -9 the router while 32 requests (unary and streaming, some falling back) are at
    the upstream: every client gets an OpenAI-shaped error or its answer, a restarted router
    serves again, the holds the dead router left expire, and the money adds up to the nano.
    Every request that reached the upstream has exactly one receipt: those the dead router
    never settled get, when their hold expires, the `failed` receipt it drafted at admission
    (nothing charged, the error saying why), under the id a cut stream had already been told."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 32)
    wait_until("streams under way", lambda: STREAMING.n >= 8, every_s=0.01)
    stack.kill9("router")
    outcomes = running.result(timeout=40)
    stack.start("router")
    sanity_after(stack, c)
    receipts = check_money(stack, c)
    # every client got an answer or an OpenAI-shaped error (one_request checks the shape)
    assert [o.kind for o in outcomes].count("ok") < 32, "the kill came too late to matter"
    assert {o.kind for o in outcomes} <= {"ok", "error", "stream_error"}
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        if o.kind == "ok":
            assert o.receipt_id in by_id and by_id[o.receipt_id]["status"] == "settled"
    tries = upstream_tries(stack)
    by_request = {r["request_id"]: r for r in receipts}
    missing = sorted(set(tries) - set(by_request))
    assert not missing, f"{len(missing)} of {len(tries)} requests reached the upstream and have no receipt"
    by_reaper = {r["id"] for r in receipts if unsettled(r)}
    assert len(by_reaper) >= 8, "the streams under way at the kill were never settled"
    for r in receipts:
        if r["id"] in by_reaper:  # written by the ledger's reaper from the router's draft
            assert (r["status"], r["amount"], r["attempts"], r["final_attempt"]) == ("failed", "0", [], 0), r
            assert re.fullmatch(r"[0-9a-f]{32}", r["trace_id"]) and r["trace_id"] in r["error"]["message"], r
            assert r["requested_model"] in {m for m, _ in MIX} and r["key"]["id"] == c.key_id, r
            assert {h["state"] for h in r["holds"]} == {"expired"}, r
        else:  # settled by a live router: as many attempts as the simulator got tries
            assert len(r["attempts"]) == tries.get(r["request_id"], 0), r
    for o in outcomes:
        if o.kind == "stream_error":  # cut by the kill, after its receipt id was announced
            assert o.receipt_id in by_reaper, o
    # and the terminal receipt says why it charged nothing
    one = by_id[min(by_reaper)]
    shown = subprocess.run([sys.executable, "-m", "tokenforge.cli", "receipt", one["id"], "--url", stack.url,
                            "--admin-token", ADMIN_TOKEN], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"receipt {one['id']}  failed" in shown.stdout
    assert f"error unsettled: {one['error']['message']}" in shown.stdout


def test_router_sigterm_mid_stream(stack: Stack) -> None:
    """SIGTERM the router while streams are under way: streams that end within its grace
    period finish and settle; longer ones are cut with an OpenAI-shaped error event and are
    settled `partial` (the stream ended early; the client did not go away), charged for what
    was delivered, the attempt saying why. Found: a cut stream whose handler
    was waiting for its next upstream chunk started settling only after the router had
    exited, so it got no receipt and its hold just expired."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 16, mix=[("m-slowstream", True), ("m-hang", True), ("m-slow", False)])
    wait_until("streams under way", lambda: STREAMING.n >= 5, every_s=0.01)
    wait_for_upstream(stack, 16)  # a request not yet at the router when it stops is refused, not cut
    stack.signal("router", signal.SIGTERM)
    outcomes = running.result(timeout=40)
    assert stack.procs["router"].proc.wait(20) == 0
    old_router = stack.procs["router"]
    stack.start("router")
    sanity_after(stack, c)
    receipts = check_money(stack, c)
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        assert o.receipt_id in by_id, "\n".join(old_router.lines)
        r = by_id[o.receipt_id]  # every request has its receipt, the cut ones too
        if r["requested_model"] == "m-hang":  # longer than the router's 5 s grace: cut
            assert o.kind == "stream_error", o
            assert r["status"] == "partial" and r["usage_source"] == "estimated", r
            final = r["attempts"][-1]
            assert final["outcome"] == "stream_error", final
            assert final["error"] == "the router shut down before the stream ended", final
            generated = r["usage"]["output_tokens"]
            assert 0 < generated < 8, r  # charged for what was delivered before the cut
            assert Decimal(r["amount"]) == price(r["usage"], "1.20", "4.80"), r
        else:  # ended within the grace period: answered and settled in full
            assert o.kind == "ok" and r["status"] == "settled", (o, r)
            assert r["usage_source"] == "upstream" and Decimal(r["amount"]) == price(r["usage"], "1.20", "4.80"), r
    assert len(check_upstream_receipts(stack, receipts)) == 16 + 1  # and the one after the restart


def test_metering_kill_9_mid_load_still_settles_what_reached_an_upstream(stack: Stack) -> None:
    """kill -9 metering while requests are at the upstream, and start it again: each request
    that reached the upstream gets exactly one receipt, rated and charged to the nano (the
    router asks a restarted metering again), instead of a stream left with no receipt and
    its hold expiring (found), or an answered request settled as a free `cancelled` (found)."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 16, mix=[("m-slowstream", True), ("m-slow", False)])
    wait_until("streams under way", lambda: STREAMING.n >= 6, every_s=0.01)
    wait_for_upstream(stack, 16)  # the unary ones are not counted by STREAMING
    stack.kill9("metering")
    stack.start("metering")
    outcomes = running.result(timeout=60)
    receipts = check_money(stack, c)
    by_request = check_upstream_receipts(stack, receipts)
    assert len(by_request) == 16, "every request had reached the upstream before the kill"
    assert [o.kind for o in outcomes] == ["ok"] * 16, [repr(o.detail) for o in outcomes]
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        r = by_id[o.receipt_id]
        assert r["status"] == "settled" and r["usage_source"] == "upstream", r
        assert Decimal(r["amount"]) == price(r["usage"], "1.20", "4.80") > 0, r
    sanity_after(stack, c)


def test_metering_down_for_good_after_the_upstream_answered_still_leaves_one_receipt(stack: Stack) -> None:
    """Metering is killed and stays down while streams are under way: once the router has
    stopped asking it (RATE_RETRY_S), each request that reached the upstream still gets its
    one receipt, uncharged since its output could not be priced, and nothing stays held. The
    unary clients got a 503 naming their receipt, which is `failed` (nothing charged) and
    shows the upstream's answer that could not be priced."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 4, mix=[("m-slowstream", True), ("m-slow", False)])
    wait_until("streams under way", lambda: STREAMING.n >= 2, every_s=0.01)
    stack.kill9("metering")
    outcomes = running.result(timeout=50)
    streams, unary = outcomes[0::2], outcomes[1::2]
    assert [o.kind for o in streams] == ["ok", "ok"]  # the output was all delivered
    for o in unary:  # no answer: an OpenAI-shaped 503 (checked in one_request)
        assert o.kind == "error" and isinstance(o.detail, openai.APIStatusError) and o.detail.status_code == 503
    receipts = check_money(stack, c)
    by_request = check_upstream_receipts(stack, receipts)
    assert len(by_request) == 4
    assert sorted(r["status"] for r in receipts) == ["failed", "failed", "settled", "settled"]
    assert all(Decimal(r["amount"]) == 0 and r["usage"] is None for r in receipts)
    by_id = {r["id"]: r for r in receipts}
    for o in unary:
        r = by_id[o.receipt_id]  # the 503 names the receipt (X-TF-Receipt-Id)
        assert r["status"] == "failed", r
        final = r["attempts"][-1]
        assert final["outcome"] == "success" and final["http_status"] == 200 and final["charged"] == "0", final
        assert final["upstream_may_bill"] is True, final
        assert final["error"].startswith("the upstream's answer could not be priced"), final
    assert c.topped == Decimal(account(stack, c.account_id)["buckets"]["wallet"]["balance"])
    stack.start("metering")
    sanity_after(stack, c)


def _terminate_backends(database_url: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND backend_type = 'client backend'"""))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_postgres_backends_terminated_mid_load(stack: Stack) -> None:
    """Every ledger connection to PostgreSQL is terminated (a restart, a failover) while
    32 requests are under way, twice: the ledger reconnects, each request that reached the
    upstream is settled exactly once (no settlement lost or doubled), and the money adds up."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 32)
    wait_until("streams under way", lambda: STREAMING.n >= 4, every_s=0.01)
    assert _terminate_backends(stack.database_url) >= 1
    wait_until("more streams under way", lambda: STREAMING.n >= 8, every_s=0.01)
    _terminate_backends(stack.database_url)
    outcomes = running.result(timeout=60)
    receipts = check_money(stack, c)
    by_request = check_upstream_receipts(stack, receipts)
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        if o.kind == "ok":
            r = by_id[o.receipt_id]
            assert r["status"] == "settled" and Decimal(r["amount"]) > 0, r
    assert len(by_request) == len(receipts)
    sanity_after(stack, c)


def test_ledger_frozen_under_load(stack: Stack) -> None:
    """The ledger is stopped (SIGSTOP) for 3 s under load, then continued: requests wait or
    fail with an OpenAI-shaped error, each request that reached the upstream is settled
    exactly once, holds taken while it was frozen are released or captured, money adds up."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 32, mix=[*MIX, ("m-fast", False), ("m-fast", True)])
    wait_until("streams under way", lambda: STREAMING.n >= 4, every_s=0.01)
    stack.signal("ledger", signal.SIGSTOP)
    try:
        frozen_until = time.monotonic() + 3.0  # the fault's length, not a synchronisation
        while time.monotonic() < frozen_until:
            time.sleep(0.05)
    finally:
        stack.signal("ledger", signal.SIGCONT)
    outcomes = running.result(timeout=60)
    receipts = check_money(stack, c)
    check_upstream_receipts(stack, receipts)
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        if o.kind == "ok":
            r = by_id[o.receipt_id]
            assert r["status"] == "settled" and Decimal(r["amount"]) > 0, r
    sanity_after(stack, c)


def test_openai_client_timeouts_on_a_slow_upstream(stack: Stack) -> None:
    """The official client gives up (its own timeout) on slow upstreams, 8 at once: a call
    still waiting for output pays nothing; one cut after some output pays exactly for what
    was generated. Each is a `cancelled` receipt whose hold was released or captured at once
    (not left to expire), and the money adds up."""
    c = new_customer(stack)
    outcomes = load(c, 8, mix=[("m-hang", False), ("m-hang", True)], timeout=1.0).result(timeout=40)
    assert all(o.kind in ("error", "stream_error") for o in outcomes), outcomes
    for o in outcomes:
        assert isinstance(o.detail, openai.APITimeoutError | openai.APIConnectionError), repr(o.detail)
    receipts = wait_until("eight receipts", lambda: len(rs := all_receipts(stack, c.account_id)) == 8 and rs)
    for r in receipts:
        assert r["status"] == "cancelled", r
        assert [h["state"] for h in r["holds"]] in (["released"], ["captured"]), r  # not expired
        if r["usage"] is not None:  # a stream cut after some output: exactly that is charged
            assert r["stream"] and r["usage_source"] == "estimated", r
            assert Decimal(r["amount"]) == price(r["usage"], "1.20", "4.80"), r
        else:  # nothing generated yet (the client's read timed out first): nothing charged
            assert Decimal(r["amount"]) == 0, r
    check_money(stack, c)
    assert len(check_upstream_receipts(stack, receipts)) == 8


def test_ledger_kill_9_mid_load_then_restarted(stack: Stack) -> None:
    """kill -9 the ledger while 32 requests are under way and start it again on its port:
    the router keeps asking to settle, so each request that reached the upstream has
    exactly one receipt, none charged twice, nothing stays held, money adds up."""
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 32)
    wait_until("streams under way", lambda: STREAMING.n >= 6, every_s=0.01)
    stack.kill9("ledger")
    stack.start("ledger")
    outcomes = running.result(timeout=60)
    receipts = check_money(stack, c)
    check_upstream_receipts(stack, receipts)
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        if o.kind == "ok":
            assert by_id[o.receipt_id]["status"] == "settled"
    sanity_after(stack, c)


def test_a_frozen_router_does_not_hang_clients(stack: Stack) -> None:
    """The router is stopped (SIGSTOP): the edge waits for it no longer than the request
    deadline plus TF_EDGE_ROUTER_GRACE_S (here 1 + 1 s), then answers an OpenAI-shaped 503
    naming that wait, streaming or not, instead of holding the client until the client's own
    timeout. Once the router runs again, money adds up and requests are served."""
    c = new_customer(stack)
    stack.procs["edge"].stop()
    stack.env["TF_REQUEST_DEADLINE_S"] = "1"
    stack.env["TF_EDGE_ROUTER_GRACE_S"] = "1"
    stack.start("edge")
    assert _try_fast(c).status_code == 200
    stack.signal("router", signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = load(c, 2, mix=[("m-fast", False), ("m-fast", True)], timeout=60).result(timeout=30)
        waited = time.monotonic() - started
    finally:
        stack.signal("router", signal.SIGCONT)
    assert waited < 15, waited  # the edge's 2 s, not the client's 60 s
    for o in outcomes:
        assert o.kind == "error" and isinstance(o.detail, openai.APIStatusError), o
        assert o.detail.status_code == 503, o.detail
        assert "The router did not answer within 2 s" in o.detail.message, o.detail.message
    check_money(stack, c)
    sanity_after(stack, c)


def test_a_router_frozen_past_its_holds_settles_late_under_the_same_receipt_ids(stack: Stack) -> None:
    """The router is stopped (SIGSTOP) with 8 requests at the upstream for longer than their
    holds live: the reaper expires the holds and stores each request's drafted `failed`
    receipt. Continued, the router settles them late, and each receipt is replaced under the
    same id (the one a stream announced, the one a unary answer names): settled, charged in
    full from the available balance, one receipt per request, the money right to the nano."""
    c = new_customer(stack)
    running = load(c, 8, mix=[("m-slow", False), ("m-slowstream", True)])
    wait_for_upstream(stack, 8)
    stack.signal("router", signal.SIGSTOP)
    try:
        frozen = wait_until(
            "the reaper's receipts for the frozen router's requests",
            lambda: (rs if len(rs := [r for r in all_receipts(stack, c.account_id) if unsettled(r)]) == 8 else None),
            timeout_s=HOLD_TTL_S + 15, every_s=0.1)
    finally:
        stack.signal("router", signal.SIGCONT)
    for r in frozen:
        assert (r["status"], r["amount"], r["attempts"]) == ("failed", "0", []), r
    outcomes = running.result(timeout=60)
    receipts = check_money(stack, c)
    assert sorted(r["id"] for r in receipts) == sorted(r["id"] for r in frozen), "one receipt per request, same ids"
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        assert o.kind == "ok", o
        r = by_id[o.receipt_id]
        assert r["status"] == "settled" and r["error"] is None and r["usage_source"] == "upstream", r
        assert Decimal(r["amount"]) == price(r["usage"], "1.20", "4.80") > 0 and r["uncollected"] == "0", r
        assert {h["state"] for h in r["holds"]} == {"expired"}, r  # charged from the balance, not a hold
    check_attempts_match_upstream(stack, receipts)
    sanity_after(stack, c)
