"""API keys as the router sees them, with a short-lived cache.

Revocation bound: a revoked key is refused by the ledger at the next hold in any case
(SPEC §7 rule 9); the cache only saves the authentication round trip, and its TTL
(TF_KEY_CACHE_TTL_S, 1 s by default) bounds how long a revoked key can still pass it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from tokenforge.errors import TFError
from tokenforge.v1 import ledger_pb2

POLICY_NAMES = {1: "routed", 2: "direct", 3: "auto"}
MAX_SECRET_CHARS = 256


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    account_id: str
    route_policy: str
    allowed_models: tuple[str, ...]

    @classmethod
    def from_pb(cls, key: ledger_pb2.Key) -> KeyInfo:
        return cls(
            id=key.id,
            name=key.name,
            account_id=key.account_id,
            route_policy=POLICY_NAMES.get(key.route_policy, "routed"),
            allowed_models=tuple(key.allowed_models),
        )


def secret_from_metadata(metadata: object) -> str:
    """The bearer secret from gRPC `authorization` metadata; 401 when it is missing."""
    value = ""
    for k, v in metadata or ():  # type: ignore[attr-defined]
        if k == "authorization" and isinstance(v, str):
            value = v
            break
    scheme, _, secret = value.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise TFError(
            "invalid_api_key",
            "Missing API key: send `Authorization: Bearer <your tokenforge key>`.",
        )
    secret = secret.strip()
    if len(secret) > MAX_SECRET_CHARS:
        raise TFError("invalid_api_key", "Incorrect API key provided.")
    return secret


class KeyCache:
    """secret digest → KeyInfo for at most `ttl_s`; bounded in size."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, KeyInfo]] = OrderedDict()

    @staticmethod
    def digest(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def get(self, digest: bytes) -> KeyInfo | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        fetched_at, key = entry
        if time.monotonic() - fetched_at > self._ttl_s:
            del self._entries[digest]
            return None
        return key

    def put(self, digest: bytes, key: KeyInfo) -> None:
        self._entries[digest] = (time.monotonic(), key)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
