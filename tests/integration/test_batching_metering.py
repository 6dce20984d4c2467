"""The metering service's Batch RPC through the Coalescer, against a real
`tokenforge serve metering`: batched Quote/Rate answer exactly as their unary twins, and a bad
call fails alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.integration._procs_metering import ServiceProc, start_metering
from tests.integration.conftest import coalescer
from tokenforge.batching import Coalescer
from tokenforge.errors import TFError, from_rpc_error
from tokenforge.rpc import client_channel, wait_healthy
from tokenforge.v1 import common_pb2, metering_pb2, metering_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALL_TIMEOUT_S = 10.0
MESSAGES = json.dumps(
    [
        {"role": "system", "content": "You are a careful research assistant."},
        {"role": "user", "content": "Summarise the market data for Q3."},
    ]
).encode()


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


def coalescer_for(stub: metering_pb2_grpc.MeteringServiceStub, kind: str) -> Coalescer:
    return coalescer(stub, kind, metering_pb2.MeteringCall, metering_pb2.MeteringBatchRequest)


async def unary(stub: metering_pb2_grpc.MeteringServiceStub, field: str, request: Any) -> Any:
    """The unary twin's answer, or its error as the TFError a client rebuilds."""
    method = stub.Quote if field == "quote" else stub.Rate
    try:
        return await method(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc)


def usage(inp: int, out: int, cached: int = 0, reasoning: int = 0) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, reasoning_tokens=reasoning
    )


CALLS: list[tuple[str, Any]] = [
    (
        "quote",
        metering_pb2.QuoteRequest(
            model="gpt-4o-mini", channel_id="cheap-a", messages_json=MESSAGES, max_tokens=100
        ),
    ),
    (
        "quote",
        metering_pb2.QuoteRequest(
            model="gpt-4o-mini", channel_id="openai-direct", messages_json=MESSAGES
        ),
    ),
    (
        "quote",
        metering_pb2.QuoteRequest(
            model="gpt-4o-mini",
            channel_id="cheap-a",
            messages_json=MESSAGES,
            max_tokens=50,
            cover_channel_ids=["cheap-b"],
        ),
    ),
    (
        "rate",
        metering_pb2.RateRequest(
            model="gpt-4o-mini",
            channel_id="cheap-b",
            compare_channel_id="cheap-a",
            usage=usage(1200, 300),
        ),
    ),
    (
        "rate",
        metering_pb2.RateRequest(
            model="gpt-4o-mini",
            channel_id="openai-direct",
            usage=usage(1000, 200, cached=640, reasoning=50),
        ),
    ),
    # failures: each must fail exactly as its unary twin does
    ("quote", metering_pb2.QuoteRequest(model="gpt-9", channel_id="cheap-a")),
    ("quote", metering_pb2.QuoteRequest(model="gpt-4o", channel_id="cheap-b")),
    (
        "quote",
        metering_pb2.QuoteRequest(model="gpt-4o", channel_id="cheap-a", messages_json=b"{not json"),
    ),
    (
        "rate",
        metering_pb2.RateRequest(
            model="gpt-4o-mini", channel_id="cheap-a", usage=usage(10, 5, cached=64)
        ),
    ),
]


async def test_batched_quote_and_rate_answer_as_their_unary_twins(stub, kind) -> None:
    co = coalescer_for(stub, kind)
    batched = await asyncio.gather(
        *(co.call(f, r, None, CALL_TIMEOUT_S) for f, r in CALLS), return_exceptions=True
    )
    assert (co.stats.rpcs, co.stats.calls) == (1, len(CALLS))
    expected = [await unary(stub, f, r) for f, r in CALLS]
    for (field, _), got, want in zip(CALLS, batched, expected, strict=True):
        if isinstance(want, TFError):
            assert isinstance(got, TFError), (field, got)
            assert (got.code, got.param, got.message) == (want.code, want.param, want.message)
        else:
            assert type(got) is type(want) and got == want, (field, got, want)
    errors = [(e.code, e.param) for e in batched if isinstance(e, TFError)]
    assert errors == [
        ("model_not_found", "model"),
        ("invalid_request", "channel_id"),
        ("invalid_request", "messages"),
        ("invalid_request", "usage"),
    ]
    # a spot check of the numbers themselves (tests/integration/test_metering_service.py)
    assert (batched[3].amount_nano, batched[3].compare_amount_nano) == (3_840_000, 2_880_000)
    assert batched[4].amount_nano == 360 * 150 + 640 * 75 + 200 * 600


async def test_contradictory_usage_fails_alone_in_its_batch(stub, kind) -> None:
    co = coalescer_for(stub, kind)
    good = metering_pb2.RateRequest(
        model="gpt-4o-mini", channel_id="cheap-a", usage=usage(1200, 300, cached=200)
    )
    bad = [
        metering_pb2.RateRequest(
            model="gpt-4o-mini", channel_id="cheap-a", usage=usage(10, 5, cached=64)
        ),
        metering_pb2.RateRequest(
            model="gpt-4o-mini", channel_id="cheap-a", usage=usage(10, 5, reasoning=8)
        ),
    ]
    results = await asyncio.gather(
        co.call("rate", bad[0], None, CALL_TIMEOUT_S),
        co.call("rate", good, None, CALL_TIMEOUT_S),
        co.call("rate", bad[1], None, CALL_TIMEOUT_S),
        return_exceptions=True,
    )
    assert co.stats.rpcs == 1
    assert isinstance(results[1], metering_pb2.RateResponse)
    assert (results[1].amount_nano, results[1].bucket) == (
        1000 * 1200 + 200 * 600 + 300 * 4800,
        common_pb2.BUCKET_WALLET,
    )
    for failed in (results[0], results[2]):
        assert isinstance(failed, TFError), failed
        assert (failed.code, failed.param, failed.http_status) == ("invalid_request", "usage", 400)


async def test_raw_metering_batch_refuses_an_empty_call(stub) -> None:
    quote = metering_pb2.QuoteRequest(
        model="gpt-4o-mini", channel_id="cheap-a", messages_json=MESSAGES, max_tokens=1
    )
    response = await stub.Batch(
        metering_pb2.MeteringBatchRequest(
            calls=[metering_pb2.MeteringCall(quote=quote), metering_pb2.MeteringCall()]
        )
    )
    assert [o.WhichOneof("outcome") for o in response.outcomes] == ["quote", "error"]
    assert response.outcomes[0].quote == await stub.Quote(quote)
    err = response.outcomes[1].error
    assert (err.code, err.param) == ("invalid_request", "calls")
