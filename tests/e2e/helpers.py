"""Small helpers for end-to-end money checks."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from tests.conftest import Customer

M = Decimal(1_000_000)


def cost(usage: dict[str, int], price_in: str, price_out: str, price_cached: str | None = None) -> Decimal:
    cached = usage.get("cached_input_tokens", 0)
    p_cached = Decimal(price_cached if price_cached is not None else price_in)
    return ((usage["input_tokens"] - cached) * Decimal(price_in) + cached * p_cached
            + usage["output_tokens"] * Decimal(price_out)) / M


def receipt(customer: Customer, receipt_id: str) -> dict[str, Any]:
    with customer.client() as c:
        resp = c.get(f"/v1/receipts/{receipt_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_receipt(customer: Customer, receipt_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """A receipt settled in the background (a client that went away): poll, bounded."""
    deadline = time.monotonic() + timeout_s
    with customer.client() as c:
        while True:
            resp = c.get(f"/v1/receipts/{receipt_id}")
            if resp.status_code == 200:
                return resp.json()
            assert resp.status_code == 404, resp.text
            assert time.monotonic() < deadline, f"receipt {receipt_id} not written within {timeout_s} s"
            time.sleep(0.05)


def chat(customer: Customer, model: str, content: str = "Tell me about tokens.", **kw: Any):
    """A raw chat completion through the official client: (parsed, headers)."""
    raw = customer.openai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=kw.pop("max_tokens", 32), **kw)
    return raw.parse(), raw.headers
