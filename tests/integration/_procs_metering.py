"""Real `tokenforge serve metering|sim-upstream` subprocesses for the integration tests.

Every wait is bounded: a service that does not print its ready line in time fails the test
with what it printed, and stopping escalates from SIGTERM to SIGKILL after a deadline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenforge.stack import free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class ServiceProc:
    proc: subprocess.Popen[str]
    address: str
    lines: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT_S)


def start_service(
    service: str, env: Mapping[str, str], ready: str, timeout_s: float = START_TIMEOUT_S
) -> ServiceProc:
    """Run `tokenforge serve SERVICE` and wait for a stdout line matching `ready`, whose first
    group is the address it serves on. Raises RuntimeError (with the output) otherwise."""
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenforge.cli", "serve", service],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    pattern = re.compile(ready)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.01))
        except queue.Empty:
            line = ""
        if line is None or remaining <= 0:
            running = ServiceProc(proc, "", seen)
            code = running.stop()
            raise RuntimeError(f"{service} did not start (exit {code}):\n" + "\n".join(seen))
        seen.append(line)
        match = pattern.search(line)
        if match:
            return ServiceProc(proc, match.group(1), seen)


def start_metering(env: Mapping[str, str] | None = None) -> ServiceProc:
    addr = f"127.0.0.1:{free_port()}"
    return start_service("metering", {"TF_METERING_ADDR": addr, **(env or {})}, r"metering ready on (\S+)")


def start_sim(env: Mapping[str, str] | None = None) -> ServiceProc:
    """The simulator on a port the kernel picks (TF_SIM_PORT=0): no race for a free port."""
    return start_service(
        "sim-upstream", {"TF_SIM_HOST": "127.0.0.1", "TF_SIM_PORT": "0", **(env or {})},
        r"sim-upstream ready on (http://\S+)",
    )
