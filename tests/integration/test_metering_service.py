"""The metering gRPC service as a real process: `tokenforge serve metering`."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from tests.integration._procs_metering import ServiceProc, start_metering, start_service
from tokenforge.errors import from_rpc_error
from tokenforge.metering import tokens
from tokenforge.rpc import client_channel, wait_healthy
from tokenforge.v1 import common_pb2, metering_pb2, metering_pb2_grpc

WALLET, CREDIT = common_pb2.BUCKET_WALLET, common_pb2.BUCKET_CREDIT
MESSAGES = [
    {"role": "system", "content": "You are a careful research assistant."},
    {"role": "user", "content": "Summarise the market data for Q3.", "name": "analyst"},
]


@pytest.fixture(scope="module")
def metering() -> Iterator[ServiceProc]:
    proc = start_metering()  # the bundled demo catalog
    try:
        yield proc
    finally:
        assert proc.stop() == 0


@pytest_asyncio.fixture(loop_scope="session")
async def stub(metering: ServiceProc) -> AsyncIterator[metering_pb2_grpc.MeteringServiceStub]:
    await wait_healthy(metering.address, timeout_s=10)
    async with client_channel(metering.address) as channel:
        yield metering_pb2_grpc.MeteringServiceStub(channel)


async def expect_error(call: object, code: str, param: str | None, status: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == status
    err = from_rpc_error(info.value)
    assert (err.code, err.param) == (code, param)
    return err.message


async def test_quote_counts_the_prompt_and_holds_the_worst_case(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    raw = json.dumps(MESSAGES).encode()
    prompt = tokens.count_messages(MESSAGES, "o200k_base")
    q = await stub.Quote(metering_pb2.QuoteRequest(
        model="gpt-4o-mini", channel_id="cheap-a", messages_json=raw, max_tokens=100))
    assert (q.prompt_tokens, q.max_output_tokens, q.bucket) == (prompt, 100, WALLET)
    assert q.amount_nano == prompt * 1200 + 100 * 4800  # 1.20 / 4.80 per 1M: exact in nano

    # no max_tokens: the model's output cap; the direct channel holds Credit
    q = await stub.Quote(metering_pb2.QuoteRequest(model="gpt-4o-mini", channel_id="openai-direct", messages_json=raw))
    assert (q.max_output_tokens, q.bucket) == (4096, CREDIT)
    assert q.amount_nano == prompt * 150 + 4096 * 600


async def test_quote_errors(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    NF, INV = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(stub.Quote(metering_pb2.QuoteRequest(model="gpt-9", channel_id="cheap-a")),
                       "model_not_found", "model", NF)
    message = await expect_error(stub.Quote(metering_pb2.QuoteRequest(model="gpt-4o", channel_id="cheap-b")),
                                 "invalid_request", "channel_id", INV)
    assert "cheap-a, openai-direct" in message
    await expect_error(stub.Quote(metering_pb2.QuoteRequest(
        model="gpt-4o", channel_id="cheap-a", messages_json=b"{not json")), "invalid_request", "messages", INV)
    await expect_error(stub.Quote(metering_pb2.QuoteRequest(
        model="gpt-4o", channel_id="cheap-a", messages_json=b"[]", max_tokens=-5)), "invalid_request", "max_tokens", INV)


async def test_rate_is_exact_with_comparison_and_price(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    r = await stub.Rate(metering_pb2.RateRequest(
        model="gpt-4o-mini", channel_id="cheap-b", compare_channel_id="cheap-a",
        usage=common_pb2.Usage(input_tokens=1200, output_tokens=300)))
    assert (r.amount_nano, r.bucket) == (3_840_000, WALLET)  # SPEC §5's receipt: "0.003840"
    assert (r.compare_amount_nano, r.compare_bucket) == (2_880_000, WALLET)  # "0.002880"
    assert (r.price.input_nano, r.price.output_nano, r.price.cached_input_nano) == (
        1_600_000_000, 6_400_000_000, 800_000_000)
    assert r.price.bucket == WALLET

    cached = await stub.Rate(metering_pb2.RateRequest(
        model="gpt-4o-mini", channel_id="openai-direct",
        usage=common_pb2.Usage(input_tokens=1000, output_tokens=200, cached_input_tokens=640, reasoning_tokens=50)))
    # uncached 360 at 0.15, cached 640 at 0.075, output 200 (reasoning included) at 0.60 per 1M
    assert (cached.amount_nano, cached.bucket) == (360 * 150 + 640 * 75 + 200 * 600, CREDIT)
    assert (cached.compare_amount_nano, cached.compare_bucket) == (0, common_pb2.BUCKET_UNSPECIFIED)


@pytest.mark.parametrize(
    "usage",
    [
        common_pb2.Usage(input_tokens=10, output_tokens=5, cached_input_tokens=64),
        common_pb2.Usage(input_tokens=10, output_tokens=5, reasoning_tokens=8),
        common_pb2.Usage(input_tokens=-1, output_tokens=5),
    ],
    ids=["cached>input", "reasoning>output", "negative"],
)
async def test_rate_rejects_contradictory_usage(stub: metering_pb2_grpc.MeteringServiceStub, usage: common_pb2.Usage) -> None:
    await expect_error(stub.Rate(metering_pb2.RateRequest(model="gpt-4o-mini", channel_id="cheap-a", usage=usage)),
                       "invalid_request", "usage", grpc.StatusCode.INVALID_ARGUMENT)


async def test_count_tokens(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    r = await stub.CountTokens(metering_pb2.CountTokensRequest(model="gpt-4o", text="hello world"))
    assert r.tokens == 2
    r = await stub.CountTokens(metering_pb2.CountTokensRequest(model="gpt-4o", messages_json=json.dumps(MESSAGES).encode()))
    assert r.tokens == tokens.count_messages(MESSAGES)
    r = await stub.CountTokens(metering_pb2.CountTokensRequest(model="gpt-4o", text=""))
    assert r.tokens == 0
    await expect_error(stub.CountTokens(metering_pb2.CountTokensRequest(model="x", text="a")),
                       "model_not_found", "model", grpc.StatusCode.NOT_FOUND)


def balances(wallet_nano: int, credit_nano: int) -> common_pb2.Balances:
    return common_pb2.Balances(
        wallet=common_pb2.BucketBalance(unit="CNY", balance_nano=wallet_nano, available_nano=wallet_nano),
        credit=common_pb2.BucketBalance(unit="CREDIT", balance_nano=credit_nano, available_nano=credit_nano),
    )


async def test_estimate_run(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    plan = [
        metering_pb2.PlanStep(model="gpt-4o-mini", calls=20, input_tokens=2000, output_tokens=500, step="market data"),
        metering_pb2.PlanStep(model="gpt-4o", calls=5, input_tokens=4000, output_tokens=1000, step="analysis"),
    ]
    r = await stub.EstimateRun(metering_pb2.EstimateRunRequest(
        plan=plan, route_policy=common_pb2.ROUTE_POLICY_ROUTED, balances=balances(200_000_000, 0),
        budget_wallet_nano=100_000_000))
    mini_a = 2000 * 1200 + 500 * 4800
    mini_b = 2000 * 1600 + 500 * 6400
    big_a = 4000 * 20_000 + 1000 * 80_000
    assert (r.wallet.low_nano, r.wallet.expected_nano, r.wallet.high_nano) == (
        20 * mini_a + 5 * big_a, 20 * mini_a + 5 * big_a, 20 * mini_b + 5 * big_a)
    assert (r.credit.low_nano, r.credit.expected_nano, r.credit.high_nano) == (0, 0, 0)
    codes = [w.code for w in r.warnings]
    # high 1.08 CNY > available 0.2; budget 0.1 < expected 0.9; cheap-b costs more than cheap-a
    assert codes == ["fallback_may_cost_more", "insufficient_balance", "budget_below_estimate"]

    r = await stub.EstimateRun(metering_pb2.EstimateRunRequest(
        plan=plan, route_policy=common_pb2.ROUTE_POLICY_AUTO, allowed_models=["gpt-4o", "gpt-4o-mini"]))
    assert r.credit.high_nano == 20 * (2000 * 150 + 500 * 600) + 5 * (4000 * 2500 + 1000 * 10_000)
    assert r.credit.expected_nano == 0

    bad = [*plan, metering_pb2.PlanStep(model="gpt-5", calls=1)]
    await expect_error(stub.EstimateRun(metering_pb2.EstimateRunRequest(plan=bad, route_policy=common_pb2.ROUTE_POLICY_AUTO)),
                       "model_not_found", "plan[2].model", grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.EstimateRun(metering_pb2.EstimateRunRequest(plan=plan)),
                       "invalid_request", "route_policy", grpc.StatusCode.INVALID_ARGUMENT)


async def test_concurrent_quotes_and_rates(stub: metering_pb2_grpc.MeteringServiceStub) -> None:
    """The hot path under load: every answer exact; prints the throughput seen."""
    raw = json.dumps(MESSAGES).encode()
    prompt = tokens.count_messages(MESSAGES)
    usage = common_pb2.Usage(input_tokens=1200, output_tokens=300, cached_input_tokens=200)

    async def one(i: int) -> None:
        q = await stub.Quote(metering_pb2.QuoteRequest(
            model="gpt-4o-mini", channel_id="cheap-a", messages_json=raw, max_tokens=i + 1))
        assert q.amount_nano == prompt * 1200 + (i + 1) * 4800
        r = await stub.Rate(metering_pb2.RateRequest(model="gpt-4o-mini", channel_id="cheap-a", usage=usage))
        assert r.amount_nano == 1000 * 1200 + 200 * 600 + 300 * 4800

    started = time.perf_counter()
    n = 1000
    for batch in range(0, n, 64):
        await asyncio.gather(*(one(i) for i in range(batch, min(batch + 64, n))))
    elapsed = time.perf_counter() - started
    print(f"\nmetering: {n} Quote+Rate pairs in {elapsed:.2f} s = {2 * n / elapsed:.0f} calls/s (64 in flight)")


def test_bad_catalog_stops_start_up_naming_file_entry_and_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "channels:\n"
        "  - {id: a, route: routed, base_url: 'http://127.0.0.1:1/v1', api_key_env: K}\n"
        "models:\n"
        "  - name: m\n"
        "    channels:\n"
        "      - {channel: b, upstream_model: u, price: {input: '1', output: '2'}}\n",
        encoding="utf-8",
    )
    with pytest.raises(RuntimeError) as info:
        start_service("metering", {"TF_CATALOG": str(path), "TF_METERING_ADDR": "127.0.0.1:0"},
                      r"metering ready on (\S+)", timeout_s=20)
    message = str(info.value)
    assert "exit 2" in message
    assert f"{path}: model 'm', channels[0]: field `channel`: unknown channel 'b'" in message
