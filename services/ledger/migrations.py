"""Schema migrations: plain versioned SQL files (migrations/0001_name.sql, ...) applied in
order at start-up, inside one transaction holding an advisory lock, so two ledger replicas
starting together apply each file exactly once. Applied versions are recorded in
`schema_migrations`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("tokenforge.ledger.migrations")

# Any constant shared by every replica; "tfledger" in ASCII.
ADVISORY_LOCK_ID = 0x74666C6564676572
_FILE_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("tokenforge.ledger").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1)), f"migration versions must be 1..n: {versions}"
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet applied; returns the names applied now."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            log.info("applying migration %s", migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.name)
    return applied_now
