"""Scripted faults for the simulated upstream (pure: parsing and try counting).

Faults come from directives after a `+` in the requested model
(`gpt-4o-mini+fail=500x1+delay_ms=200`) or from the `X-Sim-Fault` header with the same
directives separated by `;` (`fail=500x1;delay_ms=200`); the header wins on a conflict.

| directive | effect |
|---|---|
| `delay_ms=N` | wait N ms before answering |
| `chunk_delay_ms=N` | (streaming) wait N ms before each content chunk |
| `timeout` / `timeout=xN` | never answer (first N tries): hang, using no CPU, until the client gives up (at most 600 s) |
| `fail=500` / `fail=503x2` | answer with that 5xx status (first N tries) |
| `status=400` / `status=404x1` | answer with that status, an OpenAI-shaped error (first N tries) |
| `rate_limit=1` / `rate_limit=1x2` | 429 with `Retry-After: 1` (first N tries) |
| `no_usage` | no `usage` in the body, nor the usage chunk of a stream |
| `break_after=N` | (streaming) close the connection abruptly after N content chunks |
| `respond_model=NAME` | the response's `model` is NAME |
| `cached=N` | report N cached prompt tokens (as given, even when contradictory) |
| `reasoning=N` | N reasoning tokens, part of the completion tokens |
| `tokens=N` | the natural answer length is N tokens (default 24) |

"First N tries" counts per request (the `X-TF-Request-Id` header the router sends, else the
request body) and per fault script, in a bounded LRU.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, replace

MAX_TIMEOUT_S = 600.0
MAX_DELAY_MS = 600_000
MAX_TOKENS = 8_192
DEFAULT_TOKENS = 24
TRY_MEMORY_ENTRIES = 100_000
ALWAYS = 1 << 62  # "first N tries" with N = always
DIRECTIVES = (
    "delay_ms", "chunk_delay_ms", "timeout", "fail", "status", "rate_limit", "no_usage",
    "break_after", "respond_model", "cached", "reasoning", "tokens",
)


class FaultError(ValueError):
    """A fault directive the simulator does not understand."""


@dataclass(frozen=True, slots=True)
class Faults:
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    timeout_tries: int = 0
    fail_status: int = 0
    fail_tries: int = 0
    rate_limit_after_s: int = 0
    rate_limit_tries: int = 0
    no_usage: bool = False
    break_after: int = -1  # -1: never
    respond_model: str = ""
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    tokens: int = DEFAULT_TOKENS

    @property
    def counts_tries(self) -> bool:
        return bool(self.timeout_tries or self.fail_tries or self.rate_limit_tries)


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FaultError(f"sim directive `{name}` needs an integer, got {text!r}") from None
    if not low <= value <= high:
        raise FaultError(f"sim directive `{name}` must be in [{low}, {high}], got {value}")
    return value


def _value_and_tries(name: str, text: str) -> tuple[str, int]:
    """`500x2` → ("500", 2); `500` → ("500", always)."""
    value, sep, count = text.partition("x")
    return value, (_int(name, count, 1, 1_000_000) if sep else ALWAYS)


def _apply(faults: Faults, directive: str) -> Faults:
    name, has_value, value = directive.strip().partition("=")
    name = name.strip()
    value = value.strip()
    if not name:
        return faults
    if name not in DIRECTIVES:
        raise FaultError(f"unknown sim directive `{name}`; known: {', '.join(DIRECTIVES)}")
    if name == "no_usage":
        return replace(faults, no_usage=True)
    if name == "timeout" and not has_value:
        return replace(faults, timeout_tries=ALWAYS)
    if not has_value or not value:
        raise FaultError(f"sim directive `{name}` needs a value (`{name}=...`)")
    if name == "timeout":
        if not value.startswith("x"):
            raise FaultError("sim directive `timeout` takes `xN` (first N tries), e.g. timeout=x1")
        return replace(faults, timeout_tries=_int(name, value[1:], 1, 1_000_000))
    if name in ("fail", "status"):
        status_text, tries = _value_and_tries(name, value)
        low = 500 if name == "fail" else 400
        status = _int(name, status_text, low, 599)
        return replace(faults, fail_status=status, fail_tries=tries)
    if name == "rate_limit":
        after_text, tries = _value_and_tries(name, value)
        return replace(faults, rate_limit_after_s=_int(name, after_text, 0, 3600), rate_limit_tries=tries)
    if name == "delay_ms":
        return replace(faults, delay_ms=_int(name, value, 0, MAX_DELAY_MS))
    if name == "chunk_delay_ms":
        return replace(faults, chunk_delay_ms=_int(name, value, 0, MAX_DELAY_MS))
    if name == "break_after":
        return replace(faults, break_after=_int(name, value, 0, MAX_TOKENS))
    if name == "respond_model":
        return replace(faults, respond_model=value)
    if name == "cached":
        return replace(faults, cached_tokens=_int(name, value, 0, 1_000_000_000))
    if name == "reasoning":
        return replace(faults, reasoning_tokens=_int(name, value, 0, 1_000_000_000))
    assert name == "tokens", name
    return replace(faults, tokens=_int(name, value, 0, MAX_TOKENS))


@functools.lru_cache(maxsize=4096)
def parse(model: str, header: str = "") -> tuple[str, Faults]:
    """The requested model → (upstream model without directives, faults); the header's
    directives are applied after the model's, so they win."""
    base, *directives = model.split("+")
    faults = Faults()
    for directive in directives:
        faults = _apply(faults, directive)
    for directive in header.split(";") if header else ():
        faults = _apply(faults, directive)
    return base.strip(), faults


class TryCounter:
    """How many times each request has been tried, in bounded memory (least recently used
    entries are forgotten first)."""

    def __init__(self, max_entries: int = TRY_MEMORY_ENTRIES) -> None:
        assert max_entries > 0
        self._max_entries = max_entries
        self._tries: OrderedDict[object, int] = OrderedDict()

    def next_try(self, key: object) -> int:
        """Record one more try of `key` and return its number (1 for the first)."""
        n = self._tries.pop(key, 0) + 1
        self._tries[key] = n
        if len(self._tries) > self._max_entries:
            self._tries.popitem(last=False)
        return n

    def __len__(self) -> int:
        return len(self._tries)
