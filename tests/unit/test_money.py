from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenforge.money import (
    MoneyError,
    format_nano,
    hold_nano,
    parse_amount_nano,
    rate_nano,
)


def test_parse_and_format_round_trip() -> None:
    assert parse_amount_nano("10.00") == 10_000_000_000
    assert parse_amount_nano("0.000000001") == 1
    assert format_nano(10_000_000_000) == "10.000000"
    assert format_nano(2_880_000) == "0.002880"
    assert format_nano(150) == "0.00000015"
    assert format_nano(0) == "0"
    assert format_nano(-720_000) == "-0.000720"


@pytest.mark.parametrize("bad", ["-1", "abc", "1e400", "NaN", "0.0000000001", 1.5, True, None,
                                 "1_000", "1e2", "+1", " 1", "١", ".5", "5.", "-0.5", ""])
def test_parse_refuses_what_is_not_exact_money(bad: object) -> None:
    with pytest.raises(MoneyError):
        parse_amount_nano(bad)


def test_zero_can_be_refused() -> None:
    with pytest.raises(MoneyError):
        parse_amount_nano("0", allow_zero=False)


prices = st.integers(min_value=0, max_value=200_000_000_000)
tokens = st.integers(min_value=0, max_value=2_000_000)


@given(tokens, tokens, st.data(), prices, prices, prices)
def test_rating_is_the_exact_cost_rounded_once(inp: int, out: int, data: st.DataObject, pi: int, po: int, pc: int) -> None:
    cached = data.draw(st.integers(min_value=0, max_value=inp))
    exact = (Decimal(inp - cached) * pi + Decimal(cached) * pc + Decimal(out) * po) / 1_000_000
    kwargs = dict(input_tokens=inp, output_tokens=out, cached_input_tokens=cached,
                  input_price_nano=pi, output_price_nano=po, cached_input_price_nano=pc)
    assert rate_nano(**kwargs) == int(exact.to_integral_value(rounding=ROUND_HALF_UP))
    assert hold_nano(**kwargs) >= exact
    assert hold_nano(**kwargs) - exact < 1
