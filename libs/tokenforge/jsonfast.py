"""JSON written on every request's path (receipt drafts, upstream request bodies, answers and
stream events): orjson, a C encoder several times faster than `json`, with `json` as the
fallback for what orjson refuses (an integer beyond 64 bits, from a client or an upstream,
which `json` writes exactly). Both write compact, valid JSON; orjson leaves non-ASCII text as
UTF-8 instead of escaping it.

Parsing stays with `json`: it keeps big integers exact (orjson turns them into floats), and
the request parsers rely on its hooks to refuse NaN and Infinity.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


__all__ = ["dumps"]
