"""Start `tokenforge up` as a real subprocess for tests, and stop it cleanly."""

from __future__ import annotations

import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from tokenforge.stack import free_port

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


@dataclass
class RunningStack:
    proc: subprocess.Popen[str]
    url: str
    admin_token: str
    data_dir: pathlib.Path
    lines: list[str] = field(default_factory=list)
    started_s: float = 0.0
    more: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def wait_for_line(self, needle: str, timeout_s: float = 60.0) -> str:
        """The next line `up` prints (stdout or stderr) that holds `needle`, within a bound."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.more.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"`up` printed no line with {needle!r} within {timeout_s:g} s; "
                                     "it printed:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"`up` exited ({self.proc.wait()}) before printing {needle!r}:\n"
                                     + "\n".join(self.lines))
            self.lines.append(line)
            if needle in line:
                return line

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin_token}"}, timeout=30)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_stack(data_dir: pathlib.Path, *, catalog: pathlib.Path | None = None,
                env: dict[str, str] | None = None) -> RunningStack:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenforge.cli", "up", "--data-dir", str(data_dir), "--http-port", str(port)]
    if catalog is not None:
        cmd += ["--catalog", str(catalog)]
    full_env = dict(os.environ)
    full_env.pop("TF_ADMIN_TOKEN", None)
    full_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    url = token = router = ""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (url and token and router):
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise RuntimeError("tokenforge up did not become ready in time:\n" + "\n".join(seen)) from None
        if line is None:
            raise RuntimeError(f"tokenforge up exited with {proc.wait()}:\n" + "\n".join(seen))
        seen.append(line)
        if line.startswith("edge: "):
            url = line.removeprefix("edge: ").strip()
        elif line.startswith("admin token: "):
            token = line.removeprefix("admin token: ").strip()
        elif line.startswith("router gRPC: "):
            router = line.removeprefix("router gRPC: ").strip()
    return RunningStack(proc, url, token, data_dir, seen, time.monotonic() - started, lines)
