"""Settings from TF_* environment variables, read once at process start.

Business logic never reads the environment: each service builds a `Settings` in its entry
point and passes the values it needs down.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


def _int(env: dict[str, str], name: str, default: int, *, low: int, high: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise SystemExit(f"{name} must be {span}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, *, above: float | None = None,
           low: float | None = None) -> float:
    """A number; `above` is an exclusive lower bound, `low` an inclusive one."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value):
        raise SystemExit(f"{name} must be a finite number, got {raw!r}")
    if above is not None and value <= above:
        raise SystemExit(f"{name} must be more than {above:g}, got {raw}")
    if low is not None and value < low:
        raise SystemExit(f"{name} must be at least {low:g}, got {raw}")
    return value


@dataclass(frozen=True)
class Settings:
    ledger_addr: str
    metering_addr: str
    router_addr: str
    edge_host: str
    edge_port: int
    sim_host: str
    sim_port: int
    database_url: str
    catalog_path: str
    admin_token: str
    max_body_bytes: int
    hold_ttl_s: int
    hold_ttl_max_s: int
    key_cache_ttl_s: float
    request_deadline_s: float
    db_pool_size: int
    # How long past the request deadline the edge waits for the router's answer: the router
    # itself ends every request by its deadline, then may keep rating (15 s) and settling
    # (30 s) while metering or the ledger restarts. Only a router that is stuck passes it.
    router_grace_s: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        return cls(
            ledger_addr=e.get("TF_LEDGER_ADDR", "127.0.0.1:50061"),
            metering_addr=e.get("TF_METERING_ADDR", "127.0.0.1:50062"),
            router_addr=e.get("TF_ROUTER_ADDR", "127.0.0.1:50063"),
            edge_host=e.get("TF_EDGE_HOST", "127.0.0.1"),
            edge_port=_int(e, "TF_EDGE_PORT", 8080, low=0, high=65535),
            sim_host=e.get("TF_SIM_HOST", "127.0.0.1"),
            sim_port=_int(e, "TF_SIM_PORT", 9101, low=0, high=65535),
            database_url=e.get("TF_DATABASE_URL", ""),
            catalog_path=e.get("TF_CATALOG", ""),
            admin_token=e.get("TF_ADMIN_TOKEN", ""),
            max_body_bytes=_int(e, "TF_MAX_BODY_BYTES", 4 * 1024 * 1024, low=1024),
            hold_ttl_s=_int(e, "TF_HOLD_TTL_S", 600, low=1),
            hold_ttl_max_s=_int(e, "TF_HOLD_TTL_MAX_S", 86_400, low=1),
            key_cache_ttl_s=_float(e, "TF_KEY_CACHE_TTL_S", 1.0, low=0),
            request_deadline_s=_float(e, "TF_REQUEST_DEADLINE_S", 120.0, above=0),
            db_pool_size=_int(e, "TF_DB_POOL_SIZE", 8, low=1),
            router_grace_s=_float(e, "TF_EDGE_ROUTER_GRACE_S", 60.0, low=0),
        )

    def warnings(self) -> list[str]:
        """Settings that work but may cost someone money; `up` prints them where the operator
        looks (its terminal), the ledger logs them."""
        found = []
        # The router asks for holds that outlive the request's deadline by a minute, time to
        # rate and settle through a restart of metering or the ledger. A shorter cap lets a
        # hold expire first; the late settlement then takes what the balance allows and
        # records the rest as uncollected.
        if self.hold_ttl_max_s < self.request_deadline_s + 60:
            found.append(f"TF_HOLD_TTL_MAX_S ({self.hold_ttl_max_s} s) is shorter than TF_REQUEST_DEADLINE_S + 60 s "
                         f"({self.request_deadline_s + 60:g} s): a hold may expire before its request settles, "
                         "and what the balance cannot cover then is recorded as uncollected")
        return found
