"""Quote and Rate against plain Decimal arithmetic on the catalog's price strings."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenforge.catalog import parse_catalog
from tokenforge.errors import TFError
from tokenforge.metering import core
from tokenforge.money import Bucket

PRICES = {
    "cheap-a": {"input": "1.20", "output": "4.80", "cached_input": "0.60"},
    "cheap-b": {"input": "1.6", "output": "6.4"},  # no cached price: cached tokens at input price
    "odd": {"input": "0.000000001", "output": "123.456789123", "cached_input": "0.333333333"},
    "direct": {"input": "0.15", "output": "0.60", "cached_input": "0.075"},
}
ROUTES = {"cheap-a": "routed", "cheap-b": "routed", "odd": "routed", "direct": "direct"}


def make_book() -> core.PriceBook:
    channels = [
        {"id": cid, "route": route, "base_url": "http://127.0.0.1:1/v1", "api_key_env": "K"}
        for cid, route in ROUTES.items()
    ]
    models = [
        {
            "name": "m",
            "max_output_tokens": 1000,
            "channels": [
                {"channel": cid, "upstream_model": f"up-{cid}", "price": price}
                for cid, price in PRICES.items()
            ],
        }
    ]
    return core.PriceBook(parse_catalog({"channels": channels, "models": models}, source="t.yaml", env={}))


BOOK = make_book()
NANO = Decimal("1e-9")


def decimal_cost(channel: str, inp: int, out: int, cached: int) -> Decimal:
    """The exact cost in units, from the price strings: each token priced once."""
    p = PRICES[channel]
    cached_price = Decimal(p.get("cached_input", p["input"]))
    return (
        (inp - cached) * Decimal(p["input"]) + cached * cached_price + out * Decimal(p["output"])
    ) / Decimal(1_000_000)


def to_nano(amount: Decimal, rounding: str) -> int:
    return int((amount / NANO).to_integral_value(rounding=rounding))


def test_spec_example_is_exact() -> None:
    r = core.rate(BOOK, "m", "cheap-b", core.Usage(1200, 300))
    assert r.amount_nano == 3_840_000  # 1200*1.6 + 300*6.4 = 3840 per 1M → 0.003840
    r = core.rate(BOOK, "m", "cheap-a", core.Usage(1200, 300))
    assert r.amount_nano == 2_880_000
    assert r.bucket is Bucket.WALLET


@settings(max_examples=300, deadline=None)
@given(
    channel=st.sampled_from(sorted(PRICES)),
    inp=st.integers(0, 5_000_000),
    out=st.integers(0, 5_000_000),
    data=st.data(),
)
def test_rate_matches_decimal_half_up(channel: str, inp: int, out: int, data: st.DataObject) -> None:
    cached = data.draw(st.integers(0, inp))
    reasoning = data.draw(st.integers(0, out))
    r = core.rate(BOOK, "m", channel, core.Usage(inp, out, cached, reasoning))
    assert r.amount_nano == to_nano(decimal_cost(channel, inp, out, cached), ROUND_HALF_UP)
    assert r.bucket is Bucket.for_route(ROUTES[channel])


@settings(max_examples=200, deadline=None)
@given(
    channel=st.sampled_from(sorted(PRICES)),
    prompt=st.integers(0, 2_000_000),
    max_tokens=st.integers(0, 100_000),
)
def test_quote_is_the_ceiling_of_the_worst_case(channel: str, prompt: int, max_tokens: int) -> None:
    q = core.quote(BOOK, "m", channel, prompt, max_tokens)
    output = max_tokens or 1000  # 0 → the model's cap
    assert q.max_output_tokens == output
    assert q.prompt_tokens == prompt
    assert q.amount_nano == to_nano(decimal_cost(channel, prompt, output, 0), ROUND_CEILING)
    # a hold always covers the charge of any usage within it
    assert q.amount_nano >= core.rate(BOOK, "m", channel, core.Usage(prompt, output)).amount_nano


def test_half_up_rounding_at_the_boundary() -> None:
    # One input token at "0.0005" per 1M costs 0.5 nano; one output token at "0.0004", 0.4 nano.
    book = core.PriceBook(parse_catalog({
        "channels": [{"id": "c", "route": "routed", "base_url": "http://x/v1", "api_key_env": "K"}],
        "models": [{"name": "m", "channels": [
            {"channel": "c", "upstream_model": "u", "price": {"input": "0.0005", "output": "0.0004"}}]}],
    }, source="t.yaml", env={}))
    assert core.rate(book, "m", "c", core.Usage(1, 0)).amount_nano == 1  # 0.5 → 1
    assert core.rate(book, "m", "c", core.Usage(0, 1)).amount_nano == 0  # 0.4 → 0
    assert core.quote(book, "m", "c", 0, 1).amount_nano == 1  # hold: 0.4 → ceiling 1
    # summed before rounding, once per receipt: 0.5 + 0.4 = 0.9 → 1, not 1 + 0
    assert core.rate(book, "m", "c", core.Usage(1, 1)).amount_nano == 1
    assert core.rate(book, "m", "c", core.Usage(2, 2)).amount_nano == 2  # 1.8 → 2


def test_cached_tokens_priced_once_at_cached_price() -> None:
    full = core.rate(BOOK, "m", "cheap-a", core.Usage(1000, 0)).amount_nano
    half_cached = core.rate(BOOK, "m", "cheap-a", core.Usage(1000, 0, cached_input_tokens=500)).amount_nano
    assert full == 1_200_000
    assert half_cached == 500 * 1200 + 500 * 600  # nano: tokens × price_nano / 1e6
    # without a cached price, cached tokens cost the input price
    assert core.rate(BOOK, "m", "cheap-b", core.Usage(1000, 0, 1000)).amount_nano == 1_600_000


def test_reasoning_tokens_are_part_of_output_not_extra() -> None:
    plain = core.rate(BOOK, "m", "cheap-a", core.Usage(0, 100)).amount_nano
    with_reasoning = core.rate(BOOK, "m", "cheap-a", core.Usage(0, 100, reasoning_tokens=60)).amount_nano
    assert plain == with_reasoning == 480_000


def test_rate_with_compare_channel_and_price() -> None:
    r = core.rate(BOOK, "m", "cheap-b", core.Usage(1200, 300), compare_channel_id="direct")
    assert (r.amount_nano, r.bucket) == (3_840_000, Bucket.WALLET)
    assert (r.compare_amount_nano, r.compare_bucket) == (360_000, Bucket.CREDIT)
    assert r.channel.price.input == 1_600_000_000
    assert r.channel.price.cached_input == 1_600_000_000


@pytest.mark.parametrize(
    "usage, fragment",
    [
        (core.Usage(10, 5, cached_input_tokens=11), "cached prompt tokens (11) exceed"),
        (core.Usage(10, 5, reasoning_tokens=6), "reasoning tokens (6) exceed"),
        (core.Usage(-1, 5), "`input_tokens` is negative"),
        (core.Usage(1, -5), "`output_tokens` is negative"),
        (core.Usage(1, 5, cached_input_tokens=-1), "`cached_input_tokens` is negative"),
        (core.Usage(1, 5, reasoning_tokens=-2), "`reasoning_tokens` is negative"),
        (core.Usage(core.MAX_TOKENS + 1, 0), "implausibly large"),
    ],
)
def test_contradictory_usage_is_invalid_request_on_usage(usage: core.Usage, fragment: str) -> None:
    with pytest.raises(TFError) as info:
        core.rate(BOOK, "m", "cheap-a", usage)
    assert info.value.code == "invalid_request"
    assert info.value.param == "usage"
    assert fragment in info.value.message


def test_unknown_model_and_channel() -> None:
    with pytest.raises(TFError) as info:
        core.quote(BOOK, "nope", "cheap-a", 1, 1)
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    with pytest.raises(TFError) as info:
        core.rate(BOOK, "m", "nope", core.Usage(1, 1))
    assert (info.value.code, info.value.param) == ("invalid_request", "channel_id")
    assert "cheap-a" in info.value.message  # says which channels exist
    with pytest.raises(TFError) as info:
        core.rate(BOOK, "m", "cheap-a", core.Usage(1, 1), compare_channel_id="nope")
    assert (info.value.code, info.value.param) == ("invalid_request", "compare_channel_id")
    with pytest.raises(TFError) as info:
        core.quote(BOOK, "m", "cheap-a", 1, -1)
    assert (info.value.code, info.value.param) == ("invalid_request", "max_tokens")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, None),
        ({}, None),
        ({"prompt_tokens": 10, "completion_tokens": 5}, core.Usage(10, 5)),
        (
            {
                "prompt_tokens": 100, "completion_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 64},
                "completion_tokens_details": {"reasoning_tokens": 8},
            },
            core.Usage(100, 50, 64, 8),
        ),
        ({"prompt_tokens": 7, "completion_tokens": 0, "prompt_tokens_details": None}, core.Usage(7, 0)),
        (
            {"input_tokens": 30, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 10},
             "output_tokens_details": {"reasoning_tokens": 3}},
            core.Usage(30, 9, 10, 3),
        ),
        ({"prompt_tokens": 40, "completion_tokens": 2, "prompt_cache_hit_tokens": 32}, core.Usage(40, 2, 32)),
        # Anthropic-style: cache reads are not part of input_tokens there; they become so here.
        (
            {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 3},
            core.Usage(28, 2, 20),
        ),
    ],
)
def test_normalise_usage_shapes(raw: object, expected: core.Usage | None) -> None:
    assert core.normalise_usage(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "12",
        {"prompt_tokens": "10", "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": 5.0},
        {"prompt_tokens": True, "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 11}},
        {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 9}},
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": [1]},
    ],
)
def test_normalise_usage_rejects_unreadable_or_contradictory(raw: object) -> None:
    with pytest.raises(TFError) as info:
        core.normalise_usage(raw)
    assert (info.value.code, info.value.param) == ("invalid_request", "usage")
