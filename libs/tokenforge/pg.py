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
    pgdata: pathlib.Path

    def stop(self) -> None:
        self.server.cleanup()
        # pgserver stops only a server this process started; one left by a `tokenforge up`
        # that was killed (and adopted here) is stopped too, so nothing outlives `up`.
        if self.alive():
            from pgserver._commands import pg_ctl

            try:
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user)
            except Exception:  # noqa: BLE001 - best effort: report, do not mask the stop
                log.warning("could not stop PostgreSQL in %s", self.pgdata, exc_info=True)

    def alive(self) -> bool:
        """Whether the postmaster of this data folder is running."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        import psutil

        try:
            return psutil.Process(pid).is_running() and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


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
    return EmbeddedPostgres(server=server, url=server.get_uri(), pgdata=pgdata)
