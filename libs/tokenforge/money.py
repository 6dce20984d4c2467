"""Exact money: integer nano-units (1e-9 of a unit), never floats.

Scale: a price is given per 1,000,000 tokens; one token at a price of 0.001 per 1M costs 1e-9,
so every catalog price with at most 3 decimals prices one token exactly. Prices with up to 9
decimals are accepted; then one rounding happens, once per receipt (see `rate_nano`).

The rounding rule: the exact rational cost of a usage (every token class summed first) is
rounded half-up to a whole nano-unit, once per receipt. Holds round up (ceiling) so a hold is
never smaller than the cost it covers.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation
from enum import StrEnum

NANO_PER_UNIT = 1_000_000_000
TOKENS_PER_PRICE = 1_000_000
_NANO = Decimal(1) / NANO_PER_UNIT
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)


class Bucket(StrEnum):
    WALLET = "wallet"
    CREDIT = "credit"

    @property
    def unit(self) -> str:
        return BUCKET_UNIT[self]

    @property
    def route(self) -> str:
        return "routed" if self is Bucket.WALLET else "direct"

    @classmethod
    def for_route(cls, route: str) -> Bucket:
        if route == "routed":
            return cls.WALLET
        if route == "direct":
            return cls.CREDIT
        raise ValueError(f"unknown route {route!r}")

    def to_pb(self) -> int:
        return 1 if self is Bucket.WALLET else 2

    @classmethod
    def from_pb(cls, value: int) -> Bucket:
        if value == 1:
            return cls.WALLET
        if value == 2:
            return cls.CREDIT
        raise ValueError(f"unknown bucket enum {value}")


BUCKET_UNIT = {Bucket.WALLET: "CNY", Bucket.CREDIT: "CREDIT"}


class MoneyError(ValueError):
    """A money string that is not an exact, non-negative decimal."""


def parse_amount_nano(text: object, *, allow_zero: bool = True, max_decimals: int = 9) -> int:
    """Parse a decimal string ("0.000125") into nano-units. Floats are refused on purpose."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise MoneyError("must be a decimal string such as \"10.00\"")
    raw = str(text)
    # Only plain ASCII digits with an optional fraction: no signs, exponents, underscores,
    # spaces or other scripts' digits, all of which Decimal() would quietly accept.
    if not _PLAIN_DECIMAL.fullmatch(raw):
        if raw.lstrip().startswith("-") and _PLAIN_DECIMAL.fullmatch(raw.strip()[1:]):
            raise MoneyError(f"{text!r} is negative")
        raise MoneyError(f"{text!r} is not a plain decimal number such as \"10.00\"")
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:
        raise MoneyError(f"{text!r} is not a decimal number") from exc
    if not value.is_finite():
        raise MoneyError(f"{text!r} is not a finite number")
    if value < 0:
        raise MoneyError(f"{text!r} is negative")
    if value == 0 and not allow_zero:
        raise MoneyError("must be greater than zero")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > max_decimals:
        raise MoneyError(f"{text!r} has more than {max_decimals} decimals")
    nano = value * NANO_PER_UNIT
    assert nano == nano.to_integral_value()
    result = int(nano)
    if result >= 2**63:
        raise MoneyError(f"{text!r} is too large")
    return result


def format_nano(amount_nano: int) -> str:
    """Nano-units → decimal string: "0" for zero, else at least 6 decimals, at most 9."""
    if amount_nano == 0:
        return "0"
    sign = "-" if amount_nano < 0 else ""
    whole, frac = divmod(abs(amount_nano), NANO_PER_UNIT)
    frac_text = f"{frac:09d}".rstrip("0")
    if len(frac_text) < 6:
        frac_text = frac_text.ljust(6, "0")
    return f"{sign}{whole}.{frac_text}"


def format_price(price_nano_per_m: int) -> str:
    """A per-1M-token price → its catalog-style decimal ("1.20")."""
    whole, frac = divmod(price_nano_per_m, NANO_PER_UNIT)
    frac_text = f"{frac:09d}".rstrip("0")
    if len(frac_text) < 2:
        frac_text = frac_text.ljust(2, "0")
    return f"{whole}.{frac_text}"


def cost_exact(
    *,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    input_price_nano: int,
    output_price_nano: int,
    cached_input_price_nano: int,
) -> Decimal:
    """The exact cost in nano-units (possibly fractional) of one usage.

    Cached tokens are part of the input tokens and priced once, at the cached price.
    """
    assert 0 <= cached_input_tokens <= input_tokens, "cached tokens are part of input tokens"
    assert output_tokens >= 0
    uncached = input_tokens - cached_input_tokens
    numerator = (
        uncached * input_price_nano
        + cached_input_tokens * cached_input_price_nano
        + output_tokens * output_price_nano
    )
    return Decimal(numerator) / TOKENS_PER_PRICE


def rate_nano(**kwargs: int) -> int:
    """The charge for one usage, rounded once (half-up) to a whole nano-unit."""
    return int(cost_exact(**kwargs).to_integral_value(rounding=ROUND_HALF_UP))


def hold_nano(**kwargs: int) -> int:
    """A hold for a worst-case usage, rounded up so it always covers the cost."""
    return int(cost_exact(**kwargs).to_integral_value(rounding=ROUND_CEILING))


def to_decimal(amount_nano: int) -> Decimal:
    return Decimal(amount_nano) * _NANO
