"""The router and a ledger in trouble: a ledger that restarts while a request is at the
upstream does not lose the request; a hold the ledger applies after the router gave up on it
is released, not left held until it expires.

Real processes: a ledger on a fixed port (restarted on it), metering, the simulator and a router,
talked to over the router's gRPC API as an internal service would. The upstream answers after
a delay; meanwhile the ledger is stopped (SIGTERM, it drains and exits) and kept down for a
while, then started again. The router's Settle finds the ledger unavailable, keeps asking
(idempotent by request id) and settles once the ledger is back: the client gets its answer
and its receipt, the wallet is charged exactly the receipt's amount, nothing stays held.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Iterator
from decimal import Decimal

import asyncpg
import grpc
import pytest

from tests.integration._procs_metering import ServiceProc, start_service, start_sim
from tokenforge.rpc import client_channel
from tokenforge.stack import free_port
from tokenforge.v1 import ledger_pb2 as L
from tokenforge.v1 import ledger_pb2_grpc, router_pb2, router_pb2_grpc

from .conftest import audit_ok, new_customer, start_ledger

pytestmark = pytest.mark.asyncio(loop_scope="session")

ONE = 1_000_000_000
UPSTREAM_DELAY_MS = 600
OUTAGE_AFTER_ANSWER_S = 1.5  # the ledger stays down this long after the upstream has answered
WAIT_S = 40.0

CATALOG = """\
channels:
  - {id: cheap-a, route: routed, base_url: "${TF_SIM_URL}/v1", api_key_env: CHEAP_A_KEY, timeout_s: 10, retries: 0}
models:
  - name: m-slow
    channels:
      - {channel: cheap-a, upstream_model: "gpt-4o-mini+delay_ms=UPSTREAM_DELAY_MS", price: {input: "1.20", output: "4.80"}}
""".replace("UPSTREAM_DELAY_MS", str(UPSTREAM_DELAY_MS))


BODY = json.dumps({"model": "m-slow", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "Tell me about tokens."}]}).encode()


def start_router(env: dict[str, str], ledger_addr: str) -> ServiceProc:
    return start_service(
        "router",
        {**env, "TF_LEDGER_ADDR": ledger_addr, "TF_ROUTER_ADDR": f"127.0.0.1:{free_port()}"},
        r"router ready on (\S+)",
    )


@pytest.fixture
def services(tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    """The simulator and metering, and the environment a router needs (without its ledger)."""
    sim = start_sim()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    env = {"TF_CATALOG": str(catalog), "TF_SIM_URL": sim.address, "CHEAP_A_KEY": "sk-sim"}
    procs: list[ServiceProc] = [sim]
    try:
        metering_addr = f"127.0.0.1:{free_port()}"
        procs.append(start_service("metering", {**env, "TF_METERING_ADDR": metering_addr},
                                   r"metering ready on (\S+)"))
        yield {**env, "TF_METERING_ADDR": metering_addr}
    finally:
        for p in procs:
            p.stop()


async def test_a_ledger_restart_during_the_upstream_call_still_settles_exactly_once(
    services, fresh_database_url, tmp_path
) -> None:
    ledger_port = free_port()
    ledger = await start_ledger(fresh_database_url, tmp_path / "ledger-1.log", port=ledger_port)
    router = start_router(services, ledger.addr)
    try:
        async with client_channel(ledger.addr) as ledger_channel, client_channel(router.address) as router_channel:
            ledger_stub = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
            c = await new_customer(ledger_stub, wallet_nano=ONE)
            router_stub = router_pb2_grpc.RouterServiceStub(router_channel)
            started = time.monotonic()
            chat = asyncio.ensure_future(router_stub.ChatCompletion(
                router_pb2.ChatCompletionRequest(body_json=BODY),
                metadata=(("authorization", f"Bearer {c.secret}"),), timeout=WAIT_S))

            # The hold is taken before the upstream call: wait for it, then take the ledger down.
            held = 0
            while held == 0 and time.monotonic() - started < WAIT_S:
                held = (await ledger_stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet.held_nano
            assert held > 0
            assert not chat.done()
            assert ledger.stop() == 0
            down_at = time.monotonic()

            # Down through the upstream's answer and a while after it (several failed settles).
            back_at = started + UPSTREAM_DELAY_MS / 1000 + OUTAGE_AFTER_ANSWER_S
            await asyncio.sleep(max(0.0, back_at - time.monotonic()))  # the outage's length, not a sync
            assert not chat.done()
            ledger = await start_ledger(fresh_database_url, tmp_path / "ledger-2.log", port=ledger_port)

            response = await asyncio.wait_for(chat, WAIT_S)
            s = response.settlement
            assert s.status == "settled" and s.receipt_id and s.attempts == 1
            assert json.loads(response.body_json)["choices"][0]["message"]["content"]
            assert time.monotonic() - down_at > OUTAGE_AFTER_ANSWER_S

            receipt = json.loads((await ledger_stub.GetReceipt(L.GetReceiptRequest(receipt_id=s.receipt_id))).receipt_json)
            assert receipt["status"] == "settled" and receipt["amount"] == s.amount
            assert len(receipt["attempts"]) == 1 and receipt["attempts"][0]["outcome"] == "success"
            w = (await ledger_stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet
            assert w.held_nano == 0
            charged_nano = ONE - w.balance_nano
            assert charged_nano > 0 and Decimal(charged_nano) / ONE == Decimal(s.amount)
            page = await ledger_stub.ListReceipts(L.ListReceiptsRequest(account_id=c.account_id, limit=10))
            assert [r.id for r in page.receipts] == [s.receipt_id]  # exactly one receipt
            await audit_ok(ledger_stub)
    finally:
        router.stop()
        ledger.stop()


async def test_a_hold_applied_after_the_router_gave_up_is_released_soon(
    services, fresh_database_url, tmp_path
) -> None:
    """The ledger is slow to hold (its write waits for a row lock longer than the router's
    10 s call timeout): the client gets an error, and the hold the ledger applies after the
    lock goes is released by the router within seconds, not left until it expires (3 min)."""
    ledger = await start_ledger(fresh_database_url, tmp_path / "ledger.log")
    router = start_router(services, ledger.addr)
    blocker = await asyncpg.connect(fresh_database_url)
    try:
        async with client_channel(ledger.addr) as ledger_channel, client_channel(router.address) as router_channel:
            ledger_stub = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
            c = await new_customer(ledger_stub, wallet_nano=ONE)
            router_stub = router_pb2_grpc.RouterServiceStub(router_channel)
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM buckets WHERE account_id = $1 FOR UPDATE", c.account_id)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router_stub.ChatCompletion(
                    router_pb2.ChatCompletionRequest(body_json=BODY),
                    metadata=(("authorization", f"Bearer {c.secret}"),), timeout=WAIT_S)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await tx.rollback()  # the ledger's write goes through now: the hold is placed late

            async def wallet() -> L.Bucket:
                return (await ledger_stub.GetAccount(L.GetAccountRequest(account_id=c.account_id))).balances.wallet

            seen_held, released_after_s = False, None
            freed_at = time.monotonic()
            while time.monotonic() - freed_at < 20.0:
                held = (await wallet()).held_nano
                seen_held = seen_held or held > 0
                if seen_held and held == 0:
                    released_after_s = time.monotonic() - freed_at
                    break
                await asyncio.sleep(0.05)  # polling the balance, bounded by the loop's 20 s
            assert seen_held, "the ledger never applied the late hold (the scenario did not happen)"
            assert released_after_s is not None, "the late hold is still held after 20 s"
            w = await wallet()
            assert (w.balance_nano, w.held_nano) == (ONE, 0)  # nothing charged: no upstream call
            await audit_ok(ledger_stub)
    finally:
        await blocker.close()
        router.stop()
        ledger.stop()
