"""The embedded PostgreSQL (from the `pgserver` package) for one machine and for tests.

`pgserver` ships real PostgreSQL binaries; it runs the server over a Unix socket under the
data folder and stops it when `stop()` is called or this process exits.
"""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tokenforge.pg")


@dataclass
class EmbeddedPostgres:
    server: Any
    url: str

    def stop(self) -> None:
        self.server.cleanup()


def start_embedded(data_dir: str | os.PathLike[str]) -> EmbeddedPostgres:
    """Start (or reuse) PostgreSQL with its data under `data_dir`; returns its URL."""
    if "XDG_RUNTIME_DIR" not in os.environ:
        # pgserver keeps a short socket folder there when the data path is long.
        runtime = pathlib.Path(f"/tmp/tokenforge-runtime-{os.getuid()}")
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import pgserver

    pgdata = pathlib.Path(data_dir).resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return EmbeddedPostgres(server=server, url=server.get_uri())
