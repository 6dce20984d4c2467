"""Faults against the limits: key spend limits and run budgets under kill -9 / restarts, a
real PostgreSQL restart mid-load, and receipts' attempts against the exported trace.

Reuses the stack and money checks of test_faults_adversarial.py (one process per service on
a fresh database of one embedded PostgreSQL, short holds, a fast reaper). Every wait is
bounded; money is asserted to the nano.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.e2e.test_faults_adversarial import (
    MIX,
    STREAMING,
    Cust,
    Stack,
    _terminate_backends,
    all_receipts,
    audit_ok,
    build_stack,
    check_attempts_match_upstream,
    check_money,
    check_upstream_receipts,
    load,
    new_customer,
    openai_error_shape,
    running,
    sanity_after,
    wait_until,
)
from tests.otlp_receiver import Receiver

REFUSALS = {"key_budget_exceeded", "run_budget_exceeded", "insufficient_balance"}

# ---- the stack: test_faults_adversarial's (its catalog, build_stack and running) -----------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tokenforge.pg import start_embedded

    server = start_embedded(tmp_path_factory.mktemp("faults-limits-pg"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(pg: Any, tmp_path: pathlib.Path) -> Iterator[Stack]:
    with running(build_stack(pg, tmp_path)) as s:
        yield s


# ---- a load that keeps pressing on the limits -----------------------------------------------------


@dataclass
class Result:
    kind: str  # ok | refused | error | stream_error
    model: str
    run: bool
    receipt_id: str | None = None
    code: str | None = None
    detail: Any = None


def call(c: Cust, model: str, stream: bool, run_id: str | None = None, max_tokens: int = 40,
         timeout: float = 30.0) -> Result:
    client = c.openai(timeout)
    headers = {"X-TF-Run-Id": run_id, "X-TF-Run-Step": "faults"} if run_id else None
    msgs = [{"role": "user", "content": "Tell me about tokens and holds."}]
    in_run = run_id is not None
    try:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                    model=model, messages=msgs, max_tokens=max_tokens, stream=True, extra_headers=headers,
                    stream_options={"include_usage": True}) as raw:
                rid = raw.headers.get("x-tf-receipt-id")
                try:
                    for _chunk in raw.parse():
                        pass
                except openai.APIError as exc:
                    openai_error_shape(exc)
                    return Result("stream_error", model, in_run, rid, detail=exc)
                return Result("ok", model, in_run, rid)
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=msgs, max_tokens=max_tokens, extra_headers=headers)
        raw.parse()
        return Result("ok", model, in_run, raw.headers.get("x-tf-receipt-id"))
    except openai.APIStatusError as exc:
        if exc.status_code == 402:
            body = exc.response.json()
            assert set(body) == {"error"} and body["error"]["type"] == "insufficient_quota", body
            assert body["error"]["code"] in REFUSALS and body["error"]["message"], body
            assert exc.response.headers.get("x-tf-receipt-id") is None, "a refusal has no receipt"
            return Result("refused", model, in_run, code=body["error"]["code"], detail=exc)
        openai_error_shape(exc)
        return Result("error", model, in_run, exc.response.headers.get("x-tf-receipt-id"), detail=exc)
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        openai_error_shape(exc)
        return Result("error", model, in_run, detail=exc)


@dataclass
class Driver:
    """`workers` threads sending requests one after another until stopped."""

    c: Cust
    workers: int
    run_id: str | None = None  # every other worker sends its requests in this run
    mix: list[tuple[str, bool]] = field(default_factory=lambda: list(MIX))
    results: list[Result] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        self.futures = [self.pool.submit(self._work, i) for i in range(self.workers)]

    def _work(self, i: int) -> None:
        n = 0
        run_id = self.run_id if self.run_id and i % 2 == 0 else None
        while not self.stop_event.is_set():
            model, stream = self.mix[(i + n) % len(self.mix)]
            n += 1
            r = call(self.c, model, stream, run_id)
            with self.lock:
                self.results.append(r)
            if r.kind in ("refused", "error"):
                self.stop_event.wait(0.05)  # pacing (not a synchronisation): no busy loop on refusals

    def count(self, kind: str, run: bool | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.results if r.kind == kind and (run is None or r.run == run))

    def finish(self, timeout_s: float = 40.0) -> list[Result]:
        self.stop_event.set()
        done, pending = concurrent.futures.wait(self.futures, timeout=timeout_s)
        assert not pending, "requests still running after the drivers were stopped"
        for f in done:
            f.result()  # an assertion inside a worker fails the test here
        self.pool.shutdown(wait=False)
        return list(self.results)


def create_run(c: Cust, budget: str) -> str:
    with c.http() as http:
        resp = http.post("/v1/runs", json={"name": "faults", "budget": {"wallet": budget}})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def key_spent(c: Cust) -> Decimal:
    with c.http() as http:
        resp = http.get("/v1/balance")
    assert resp.status_code == 200, resp.text
    return Decimal(resp.json()["key"]["spent"]["wallet"])


def close_run(c: Cust, run_id: str) -> dict[str, Any]:
    with c.http() as http:
        assert http.post(f"/v1/runs/{run_id}/close").status_code == 200
        resp = http.get(f"/v1/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _expired(r: dict[str, Any]) -> bool:
    return any(h["state"] == "expired" for h in r["holds"])


def warm_up(s: Stack) -> None:
    """Build the openai client's stream chunk models once, on this thread: it builds them
    lazily, and many threads doing that at once can fail inside pydantic (a client-side race
    that has nothing to do with the stack)."""
    from openai._models import construct_type
    from openai.types.chat import ChatCompletionChunk

    construct_type(type_=ChatCompletionChunk, value={
        "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})


def check_limits(s: Stack, c: Cust, limit: Decimal, results: list[Result],
                 run_id: str | None = None, budget: Decimal | None = None) -> list[dict[str, Any]]:
    """After the load: the money adds up (check_money), the key's spend (what it paid, and
    what it owed but could not pay) never passed its limit, nor the run's its budget, and the
    key's own spend counter is exactly the sum of its receipts."""
    report = close_run(c, run_id) if run_id else None
    receipts = check_money(s, c)
    paid = sum((Decimal(r["amount"]) for r in receipts), Decimal(0))
    owed = sum((Decimal(r["uncollected"]) for r in receipts), Decimal(0))
    assert key_spent(c) == paid, (key_spent(c), paid)
    assert paid <= limit, f"key spend {paid} passed its limit {limit}"
    # Cost beyond the hold is uncollected only when the hold expired before the settlement
    # came (a hold is the worst case); what is owed then never counts as the key's spend.
    for r in receipts:
        if Decimal(r["uncollected"]):
            assert [h["state"] for h in r["holds"] if h["bucket"] == r["bucket"]] == ["expired"], r
    assert owed >= 0 and paid + sum((Decimal(r["uncollected"]) for r in receipts if not _expired(r)), Decimal(0)) <= limit
    if run_id is not None:
        assert budget is not None and report is not None
        in_run = [r for r in receipts if (r.get("run") or {}).get("id") == run_id]
        run_paid = sum((Decimal(r["amount"]) for r in in_run), Decimal(0))
        run_owed = sum((Decimal(r["uncollected"]) for r in in_run), Decimal(0))
        assert run_paid <= budget, f"run spend {run_paid} passed its budget {budget}"
        assert run_paid + sum((Decimal(r["uncollected"]) for r in in_run if not _expired(r)), Decimal(0)) <= budget
        totals = report["totals"]["wallet"]
        assert (Decimal(totals["amount"]), Decimal(totals["uncollected"])) == (run_paid, run_owed), report
        assert Decimal(report["reserved"]["wallet"]) == 0 and report["status"] == "closed", report
        assert all(r.run for r in results if r.code == "run_budget_exceeded")
    by_id = {r["id"]: r for r in receipts}
    for res in results:
        if res.kind == "ok":
            assert res.receipt_id in by_id, res
            assert by_id[res.receipt_id]["status"] == "settled", by_id[res.receipt_id]
            assert (by_id[res.receipt_id].get("run") or {}).get("id") == (run_id if res.run else None)
    return receipts


# ---- 1. no overshoot under faults ------------------------------------------------------------------


def _limited_customers(s: Stack) -> tuple[Cust, Cust, str]:
    # A: a daily limit under its total limit; B: a total limit, and a run with a budget of
    # its own inside it. Each request holds ~0.00021-0.00028 and costs ~0.00013.
    a = new_customer(s, limits={"wallet": {"total": "0.0060", "daily": "0.0030"}})
    b = new_customer(s, limits={"wallet": {"total": "0.0035"}})
    run_id = create_run(b, "0.0012")
    return a, b, run_id


def _press(s: Stack, fault: Any) -> tuple[Cust, Cust, str, list[Result], list[Result]]:
    """Both limited customers under load; `fault()` once they spend; the load continues until
    both have hit their limits after the fault (or a bounded time)."""
    warm_up(s)
    a, b, run_id = _limited_customers(s)
    da, db = Driver(a, 8), Driver(b, 8, run_id)
    try:
        wait_until("requests settled before the fault", lambda: da.count("ok") >= 2 and db.count("ok") >= 2,
                   timeout_s=20, every_s=0.02)
        fault()
        refused_before = (da.count("refused"), db.count("refused", run=True), db.count("refused", run=False))
        wait_until("every limit reached after the fault",
                   lambda: da.count("refused") > refused_before[0] and db.count("refused", run=True) > refused_before[1]
                   and db.count("refused", run=False) > refused_before[2], timeout_s=30, every_s=0.05)
    finally:
        ra, rb = da.finish(), db.finish()
    return a, b, run_id, ra, rb


def _check_pressed(s: Stack, a: Cust, b: Cust, run_id: str, ra: list[Result], rb: list[Result]) -> None:
    receipts_a = check_limits(s, a, Decimal("0.0030"), ra)
    receipts_b = check_limits(s, b, Decimal("0.0035"), rb, run_id, Decimal("0.0012"))
    assert {r.code for r in ra if r.kind == "refused"} == {"key_budget_exceeded"}
    assert {r.code for r in rb if r.kind == "refused" and r.run} == {"run_budget_exceeded"}
    assert {r.code for r in rb if r.kind == "refused" and not r.run} == {"key_budget_exceeded"}
    for receipts in (receipts_a, receipts_b):
        check_attempts_match_upstream(s, receipts)
    audit_ok(s)


def test_limits_hold_through_a_router_kill_9(stack: Stack) -> None:
    """A key with a daily limit, a key with a total limit and a run with a budget, pressed by
    16 clients while the router is killed (-9) and started again: the clients get answers,
    402s in OpenAI shape or OpenAI-shaped errors; once the dead router's holds expire nothing
    is held, and no key's spend (paid + uncollected) passed its limit, nor the run's its
    budget, to the nano."""
    def fault() -> None:
        stack.kill9("router")
        stack.start("router")

    a, b, run_id, ra, rb = _press(stack, fault)
    assert any(r.kind in ("error", "stream_error") for r in ra + rb), "the kill came too late to matter"
    _check_pressed(stack, a, b, run_id, ra, rb)


def test_limits_hold_through_a_ledger_kill_9(stack: Stack) -> None:
    """The same pressure while the ledger is killed (-9) and started again on its port: the
    router's settlement retries land once each, and the limits and the run's budget hold."""
    def fault() -> None:
        stack.kill9("ledger")
        stack.start("ledger")

    a, b, run_id, ra, rb = _press(stack, fault)
    _check_pressed(stack, a, b, run_id, ra, rb)
    check_upstream_receipts(stack, all_receipts(stack, a.account_id) + all_receipts(stack, b.account_id))


def test_limits_hold_when_postgres_backends_are_terminated(stack: Stack) -> None:
    """The same pressure while every ledger connection to PostgreSQL is terminated, three
    times: no limit or budget passed, one receipt per request that reached an upstream."""
    def fault() -> None:
        for _ in range(3):
            _terminate_backends(stack.database_url)
            time.sleep(0.3)  # spacing the faults out (not a synchronisation)

    a, b, run_id, ra, rb = _press(stack, fault)
    _check_pressed(stack, a, b, run_id, ra, rb)
    check_upstream_receipts(stack, all_receipts(stack, a.account_id) + all_receipts(stack, b.account_id))


# ---- 2. a real PostgreSQL restart mid-load ----------------------------------------------------------


def pg_stop(pg: Any, mode: str) -> None:
    """Stop the embedded PostgreSQL with its own pg_ctl (`fast`: a clean shutdown that ends
    every session; `immediate`: a crash, recovered from the WAL at the next start)."""
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-t", "30", "-m", mode, "stop"], pgdata=pg.pgdata, user=pg.server.system_user, timeout=40)
    assert not pg.alive()


def pg_start(pg: Any, socket_dir: pathlib.Path) -> None:
    """Start it again on the same data folder and socket (so the same URL), as pgserver does."""
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-t", "30", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(pg.pgdata / "log"), "start"],
           pgdata=pg.pgdata, user=pg.server.system_user, timeout=40)
    assert pg.alive()


@pytest.fixture
def pg_restart(pg: Any) -> Iterator[Any]:
    """stop(mode) / start(): a restart of the module's PostgreSQL, started again at the end
    whatever the test did."""
    socket_dir = pg.server.get_postmaster_info().socket_dir
    assert socket_dir is not None

    class Restart:
        @staticmethod
        def stop(mode: str) -> None:
            pg_stop(pg, mode)

        @staticmethod
        def start() -> None:
            pg_start(pg, socket_dir)

    try:
        yield Restart
    finally:
        if not pg.alive():
            pg_start(pg, socket_dir)


def _during_outage(c: Cust) -> None:
    """A request while PostgreSQL is down fails with an OpenAI-shaped 503, soon."""
    started = time.monotonic()
    try:
        c.openai(15).chat.completions.create(model="m-fast", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8)
    except openai.APIStatusError as exc:
        openai_error_shape(exc)
        assert exc.status_code == 503, exc.response.text
        assert exc.response.json()["error"]["code"] == "unavailable", exc.response.text
    else:
        raise AssertionError("a request was served while PostgreSQL was down")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_load(stack: Stack, pg_restart: Any, mode: str) -> None:
    """PostgreSQL itself is stopped (pg_ctl -m fast, or -m immediate: a crash) while 32
    requests are under way, stays down ~2 s, and is started again on the same data folder:
    requests during the outage fail with an OpenAI-shaped 503, the ledger reconnects by
    itself, every request that reached an upstream has exactly one receipt (the settlements
    in flight are neither lost nor doubled: the router asks again for 30 s), nothing stays
    held, and the money adds up to the nano."""

    warm_up(stack)
    c = new_customer(stack)
    STREAMING.reset()
    running = load(c, 32)
    wait_until("streams under way", lambda: STREAMING.n >= 6, every_s=0.01)
    pg_restart.stop(mode)
    try:
        down_until = time.monotonic() + 2.0  # the outage's length, not a synchronisation
        _during_outage(c)
        while time.monotonic() < down_until:
            time.sleep(0.05)
    finally:
        pg_restart.start()
    outcomes = running.result(timeout=60)
    sanity_after(stack, c)
    receipts = check_money(stack, c)
    by_request = check_upstream_receipts(stack, receipts)
    by_id = {r["id"]: r for r in receipts}
    for o in outcomes:
        if o.kind == "ok":
            r = by_id[o.receipt_id]
            assert r["status"] == "settled" and Decimal(r["amount"]) > 0, r
        if o.receipt_id is not None:
            assert o.receipt_id in by_id, o
    assert len(by_request) == len(receipts)  # the request refused during the outage has none
    assert all(stack.procs[n].proc.poll() is None for n in ("ledger", "router", "edge")), stack.logs()


def test_limits_hold_through_a_postgres_restart(stack: Stack, pg_restart: Any) -> None:
    """The limited keys and the run pressed while PostgreSQL crashes (-m immediate) and
    comes back: no limit or budget passed, one receipt per request that reached an upstream."""
    def fault() -> None:
        pg_restart.stop("immediate")
        try:
            _during_outage(stack_customer)
        finally:
            pg_restart.start()

    stack_customer = new_customer(stack)
    a, b, run_id, ra, rb = _press(stack, fault)
    _check_pressed(stack, a, b, run_id, ra, rb)
    check_upstream_receipts(stack, all_receipts(stack, a.account_id) + all_receipts(stack, b.account_id))


# ---- 3. receipts' attempts against the exported trace ------------------------------------------------


@pytest.fixture
def traced(pg: Any, tmp_path: pathlib.Path) -> Iterator[tuple[Stack, Receiver]]:
    """A stack whose services export their spans (OTLP/HTTP) to a receiver of this test."""
    receiver = Receiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    try:
        with running(build_stack(pg, tmp_path, env)) as s:
            yield s, receiver
    finally:
        receiver.close()


def _attempt_spans(receiver: Receiver, trace_id: str) -> list[Any]:
    with receiver.lock:
        spans = list(receiver.spans.get(trace_id, ()))
    return [sp for sp in spans if "tf.attempt" in sp.attributes]


def check_attempts_are_spans(receiver: Receiver, receipts: list[dict[str, Any]]) -> None:
    """Each receipt's attempts are its trace's exported attempt spans, one to one and in order:
    the same span ids, numbers, outcomes, HTTP statuses and charges; and no attempt span was
    exported for a request without a receipt."""
    for r in receipts:
        receiver.wait_for(r["trace_id"], lambda spans, r=r: sum("tf.attempt" in sp.attributes for sp in spans)
                          >= len(r["attempts"]), timeout_s=15)
    for r in receipts:
        spans = sorted(_attempt_spans(receiver, r["trace_id"]), key=lambda sp: sp.attributes["tf.attempt"])
        got = [(sp.span_id, sp.attributes["tf.attempt"], sp.attributes.get("tf.outcome"),
                sp.attributes.get("http.response.status_code"), sp.attributes.get("tf.charged", "0")) for sp in spans]
        want = [(a["span_id"], a["n"], a["outcome"], a["http_status"], a["charged"]) for a in r["attempts"]]
        if Decimal(r["uncollected"]):  # the receipt shows what was paid; the span what was rated
            got, want = [g[:4] for g in got], [w[:4] for w in want]
        assert got == want, (r["id"], r["status"], got, want)
    with receiver.lock:
        traces = {tid for tid, spans in receiver.spans.items() if any("tf.attempt" in sp.attributes for sp in spans)}
    assert traces <= {r["trace_id"] for r in receipts}, "attempt spans exported for a request without a receipt"


def test_receipt_attempts_match_exported_spans_through_faults(traced: tuple[Stack, Receiver]) -> None:
    """Retries, fallbacks, streams the upstream breaks, calls the client gives up on, a ledger
    killed (-9) and restarted (settlements asked again) and a router stopped (SIGTERM: streams
    cut, settled `partial`): every receipt's attempts are exactly the attempt spans its trace
    exported (span id, number, outcome, status, charge), one to one."""

    stack, receiver = traced
    warm_up(stack)
    c = new_customer(stack)
    # phase 1: retries, fallbacks, broken streams, client timeouts, a ledger kill -9
    outcomes = load(c, 4, mix=[("m-hang", False), ("m-hang", True)], timeout=0.8).result(timeout=30)
    assert all(o.kind in ("error", "stream_error") for o in outcomes), outcomes
    STREAMING.reset()
    running = load(c, 24, mix=[("m-retry", False), ("m-retry", True), ("m-fallback", False), ("m-fallback", True),
                               ("m-break", True), ("m-slowstream", True)])
    wait_until("streams under way", lambda: STREAMING.n >= 4, every_s=0.01)
    stack.kill9("ledger")
    stack.start("ledger")
    outcomes += running.result(timeout=60)
    # phase 2: the router stopped while streams run (cut at the end of its grace period)
    STREAMING.reset()
    running = load(c, 8, mix=[("m-hang", True), ("m-slowstream", True), ("m-retry", False), ("m-fallback", True)])
    wait_until("streams under way", lambda: STREAMING.n >= 3, every_s=0.01)
    stack.signal("router", signal.SIGTERM)
    outcomes += running.result(timeout=40)
    assert stack.procs["router"].proc.wait(20) == 0
    stack.start("router")
    sanity_after(stack, c)

    receipts = check_money(stack, c)
    check_upstream_receipts(stack, receipts)
    statuses = {r["status"] for r in receipts}
    assert {"settled", "partial", "cancelled"} <= statuses, statuses
    outcomes_seen = {a["outcome"] for r in receipts for a in r["attempts"]}
    assert {"success", "http_error", "stream_error", "cancelled"} <= outcomes_seen, outcomes_seen
    assert any(len(r["attempts"]) == 2 and r["requested_model"] == "m-retry" for r in receipts)
    assert any(r["fallback"] and r["fallback"].get("used") for r in receipts) or any(
        r["attempts"][-1]["role"] == "backup" for r in receipts)
    assert any(a.get("error") == "the router shut down before the stream ended" for r in receipts for a in r["attempts"])
    check_attempts_are_spans(receiver, receipts)
    assert {o.receipt_id for o in outcomes if o.receipt_id} <= {r["id"] for r in receipts}


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_holds_still_expire_after_a_postgres_restart(stack: Stack, pg_restart: Any, mode: str) -> None:
    """After PostgreSQL restarted (the ledger idle meanwhile), a router killed (-9) with
    requests in flight leaves holds that the ledger's reaper still expires: nothing stays held
    and the money adds up; the run's budget held by a dead router's requests comes back."""

    warm_up(stack)
    c = new_customer(stack)
    pg_restart.stop(mode)
    pg_restart.start()
    sanity_after(stack, c)
    STREAMING.reset()
    running = load(c, 16)
    wait_until("streams under way", lambda: STREAMING.n >= 4, every_s=0.01)
    stack.kill9("router")
    outcomes = running.result(timeout=40)
    assert any(o.kind != "ok" for o in outcomes)
    stack.start("router")
    receipts = check_money(stack, c)
    check_attempts_match_upstream(stack, receipts)
    assert all(stack.procs[n].proc.poll() is None for n in ("ledger", "router", "edge")), stack.logs()
