"""Deterministic answers and exact usage for the simulated upstream.

The same prompt always gets the same text. Every word of the vocabulary is one token (with
its leading space) in both encodings, so an answer of N words is N tokens, a stream of N
content chunks delivers N tokens, and the usage we report equals what tiktoken counts for the
text — checked once per distinct answer, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tokenforge.metering import tokens

_CANDIDATE_WORDS = (
    "the market data shows steady growth across all regions with strong demand for new "
    "products and services while costs remain stable over time as teams focus on quality "
    "results in every quarter of this year our model can help you plan next steps based "
    "on recent trends risk analysis summary report price value sales customer revenue "
    "cost team plan work time first last good great small large high low fast slow open "
    "close early late simple clear short long"
).split()
CACHE_ENTRIES = 8_192


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Words that are one token in every supported encoding, both with a leading space (inside
    a sentence) and capitalised without one (first word)."""
    words = []
    for word in dict.fromkeys(_CANDIDATE_WORDS):
        forms = (" " + word, word.capitalize())
        if all(
            len(tokens.encoding(name).encode_ordinary(form)) == 1
            for name in tokens.ENCODINGS
            for form in forms
        ):
            words.append(" " + word)
    assert len(words) >= 32, "the vocabulary needs enough single-token words"
    return tuple(words)


@dataclass(frozen=True, slots=True)
class Answer:
    pieces: tuple[str, ...]  # one token each; the stream sends one per chunk
    text: str
    completion_tokens: int  # visible text only (reasoning is added on top)


def prompt_key(messages: list[Any]) -> bytes:
    """A stable digest of the prompt: same messages, same key, whatever the JSON spacing."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@functools.lru_cache(maxsize=CACHE_ENTRIES)
def answer(key: bytes, length: int, encoding_name: str) -> Answer:
    """The answer of `length` tokens to the prompt with digest `key`."""
    words = vocabulary()
    pieces: list[str] = []
    seed = key
    while len(pieces) < length:
        seed = hashlib.blake2b(seed, digest_size=64).digest()
        pieces.extend(words[b % len(words)] for b in seed)
    pieces = pieces[:length]
    if pieces:
        pieces[0] = pieces[0][1:].capitalize()
    text = "".join(pieces)
    counted = tokens.count_text(text, encoding_name)
    assert counted == length, (counted, length)
    return Answer(tuple(pieces), text, counted)


def prompt_tokens(messages: list[Any], encoding_name: str) -> int:
    """Prompt tokens, counted exactly as metering counts them."""
    return tokens.count_messages(messages, encoding_name)
