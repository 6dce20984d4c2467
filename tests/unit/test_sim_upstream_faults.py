"""The simulator's pure parts: fault directives, try counting, deterministic answers."""

from __future__ import annotations

import pytest

from tokenforge.metering import tokens
from tokenforge.sim_upstream import answers, faults
from tokenforge.sim_upstream.faults import ALWAYS, Faults


@pytest.mark.parametrize(
    "model, header, expected_model, expected",
    [
        ("gpt-4o-mini", "", "gpt-4o-mini", Faults()),
        ("gpt-4o-mini+fail=500x1", "", "gpt-4o-mini", Faults(fail_status=500, fail_tries=1)),
        ("gpt-4o-mini+fail=503", "", "gpt-4o-mini", Faults(fail_status=503, fail_tries=ALWAYS)),
        ("m+timeout", "", "m", Faults(timeout_tries=ALWAYS)),
        ("m+timeout=x2", "", "m", Faults(timeout_tries=2)),
        ("m+delay_ms=200+chunk_delay_ms=5", "", "m", Faults(delay_ms=200, chunk_delay_ms=5)),
        ("m+rate_limit=1x2", "", "m", Faults(rate_limit_after_s=1, rate_limit_tries=2)),
        ("m+status=400", "", "m", Faults(fail_status=400, fail_tries=ALWAYS)),
        ("m+no_usage+break_after=3", "", "m", Faults(no_usage=True, break_after=3)),
        ("m+respond_model=gpt-4o-mini-2024-07-18", "", "m", Faults(respond_model="gpt-4o-mini-2024-07-18")),
        ("m+cached=64+reasoning=8+tokens=100", "", "m", Faults(cached_tokens=64, reasoning_tokens=8, tokens=100)),
        ("m+fail=500x1", "fail=502x3; delay_ms=7", "m", Faults(fail_status=502, fail_tries=3, delay_ms=7)),
        ("m", "no_usage;;", "m", Faults(no_usage=True)),
    ],
)
def test_directives(model: str, header: str, expected_model: str, expected: Faults) -> None:
    assert faults.parse(model, header) == (expected_model, expected)


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("m+explode", "unknown sim directive `explode`"),
        ("m+fail=200", "must be in [500, 599]"),
        ("m+status=abc", "needs an integer"),
        ("m+delay_ms", "needs a value"),
        ("m+timeout=3", "takes `xN`"),
        ("m+rate_limit=1x0", "must be in [1, 1000000]"),
        ("m+delay_ms=-1", "must be in [0"),
        ("m+tokens=100000", "must be in [0, 8192]"),
    ],
)
def test_bad_directives(model: str, fragment: str) -> None:
    with pytest.raises(faults.FaultError) as info:
        faults.parse(model)
    assert fragment in str(info.value)


def test_try_counter_is_bounded_lru() -> None:
    counter = faults.TryCounter(max_entries=2)
    assert [counter.next_try("a"), counter.next_try("a"), counter.next_try("b")] == [1, 2, 1]
    counter.next_try("a")  # a is now the most recent
    counter.next_try("c")  # evicts b
    assert len(counter) == 2
    assert counter.next_try("b") == 1
    assert counter.next_try("c") == 2


def test_answers_are_deterministic_and_exact() -> None:
    key = answers.prompt_key([{"role": "user", "content": "hi"}])
    same = answers.prompt_key([{"content": "hi", "role": "user"}])  # key order does not matter
    other = answers.prompt_key([{"role": "user", "content": "hello"}])
    assert key == same != other
    for name in tokens.ENCODINGS:
        for length in (0, 1, 5, 24, 300):
            a = answers.answer(key, length, name)
            assert a.completion_tokens == length == len(a.pieces)
            assert len(tokens.encoding(name).encode_ordinary(a.text)) == length
            assert "".join(a.pieces) == a.text
            # every streamed piece is one token on its own, so a broken stream's delivered
            # text counts exactly the chunks delivered
            assert all(tokens.count_text(p, name) == 1 for p in a.pieces)
    assert answers.answer(key, 24, "o200k_base").text != answers.answer(other, 24, "o200k_base").text
    assert answers.answer(key, 24, "o200k_base").text[0].isupper()
