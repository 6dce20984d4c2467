"""`tokenforge up`: the whole stack on one machine.

PostgreSQL (embedded, unless TF_DATABASE_URL is set), then the simulator, ledger, metering,
router and edge as child processes on loopback. Internal ports are picked free so two stacks
run side by side; only the edge's port is fixed, and `up` refuses to start when it is taken.
A child is ready when it is alive, itself listens on its port and answers there, so another
program on the same port cannot pass for it. A child that dies while the stack runs is
started again on the same port, at most RESTART_LIMIT times in RESTART_WINDOW_S for each
service; one that keeps dying, or does not come back healthy, stops the stack (exit 1).
Ctrl-C or SIGTERM stops every child, then PostgreSQL, and leaves no process behind.
Children also get SIGTERM if `up` itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from tokenforge import GRPC_EXPERIMENTS
from tokenforge.admin_cli import EDGE_URL_FILE
from tokenforge.catalog import CatalogError, bundled_catalog_path, load_catalog
from tokenforge.config import Settings

HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
START_ORDER = ("sim-upstream", "ledger", "metering", "router", "edge")
STOP_WAVES = (("edge",), ("router",), ("metering", "ledger", "sim-upstream"))
PR_SET_PDEATHSIG = 1
LOCK_FILE = "up.lock"
INTERNAL_PORTS = ("ledger", "metering", "router", "sim-upstream")
# A crash-looping service is not hidden: its sixth death within a minute stops the stack.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path


class RestartBudget:
    """How many times one service may be started again: at most `limit` restarts within
    any `window_s`. Times are the caller's monotonic seconds, so it is tested without a clock."""

    def __init__(self, limit: int = RESTART_LIMIT, window_s: float = RESTART_WINDOW_S) -> None:
        assert limit >= 0 and window_s > 0
        self.limit = limit
        self.window_s = window_s
        self._restarts_s: deque[float] = deque(maxlen=limit + 1)

    def take(self, now_s: float) -> bool:
        """Spend one restart at `now_s`; False when the window's are all spent."""
        while self._restarts_s and now_s - self._restarts_s[0] >= self.window_s:
            self._restarts_s.popleft()
        if len(self._restarts_s) >= self.limit:
            return False
        self._restarts_s.append(now_s)
        return True

    def used(self) -> int:
        return len(self._restarts_s)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bind_loopback(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As the edge (uvicorn) binds: a port left in TIME_WAIT by a stopped stack is free to
    # use, one with a listener on it is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_ports(http_port: int) -> dict[str, int]:
    """The edge's port, checked free, and a free port for each internal service, all held
    at once while picking so that none repeats another or the edge's. Raises SystemExit
    naming the port when the edge's is taken."""
    if not 1 <= http_port <= 65535:
        raise SystemExit(f"tokenforge up: --http-port must be from 1 to 65535, not {http_port}")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_bind_loopback(http_port))
        except OSError as exc:
            reason = (f"port {http_port} is already in use (another `tokenforge up`, or another program)"
                      if exc.errno == errno.EADDRINUSE else f"cannot listen on port {http_port}: {exc.strerror}")
            raise SystemExit(f"tokenforge up: {reason}; stop what holds it, or choose another "
                             f"port with --http-port PORT") from None
        ports = {"edge": http_port}
        for name in INTERNAL_PORTS:
            ports[name] = held.enter_context(_bind_loopback(0)).getsockname()[1]
        return ports


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a listening socket on `port`. No two of our
    servers share a port (gRPC's SO_REUSEPORT is off), so an answer there then is its."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when `up` dies, whatever killed it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def admin_token_for(data_dir: pathlib.Path) -> str:
    token = os.environ.get("TF_ADMIN_TOKEN", "")
    if token:
        return token
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = "tf-admin-" + secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def _grpc_healthy(addr: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def _http_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:  # noqa: S310 - loopback only
            return resp.status == 200
    except OSError:
        return False


class Stack:
    def __init__(self, *, catalog: str | None, data_dir: str, http_port: int) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.http_port = http_port
        self.catalog_path = str(pathlib.Path(catalog).resolve()) if catalog else str(bundled_catalog_path())
        self.ports = {"edge": http_port}  # the internal ones are picked in start()
        self.children: list[Child] = []
        self.pg = None
        self.stopping = threading.Event()
        self.env: dict[str, str] = {}
        self._lock_fd: int | None = None

    def _env(self, ports: dict[str, int]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TF_LEDGER_ADDR=f"127.0.0.1:{ports['ledger']}",
            TF_METERING_ADDR=f"127.0.0.1:{ports['metering']}",
            TF_ROUTER_ADDR=f"127.0.0.1:{ports['router']}",
            TF_SIM_HOST="127.0.0.1",
            TF_SIM_PORT=str(ports["sim-upstream"]),
            TF_SIM_URL=f"http://127.0.0.1:{ports['sim-upstream']}",
            TF_EDGE_HOST="127.0.0.1",
            TF_EDGE_PORT=str(ports["edge"]),
            TF_CATALOG=self.catalog_path,
            PYTHONUNBUFFERED="1",
        )
        # the children set it themselves too (tokenforge/__init__.py); this passes ours on
        env.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
        return env

    def _lock_data_dir(self) -> None:
        """One `up` per data folder: a second one would share (and then stop) the first's
        PostgreSQL. The lock dies with the process; the file is removed on a clean stop."""
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(f"tokenforge up: another `tokenforge up` is using {self.data_dir}; "
                             "stop it first, or pass another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock_data_dir(self) -> None:
        if self._lock_fd is not None:
            (self.data_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self) -> dict[str, str]:
        # The services read these TF_* values too; a malformed one stops us here, before
        # anything starts, and said on the terminal rather than in a service's log.
        try:
            settings = Settings.from_env(dict(os.environ))
        except SystemExit as exc:
            raise SystemExit(f"tokenforge up: {exc}") from None
        for warning in settings.warnings():
            print(f"tokenforge up: warning: {warning}", file=sys.stderr, flush=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self.ports = reserve_ports(self.http_port)  # before anything starts: a taken port stops us here
        (self.data_dir / "logs").mkdir(exist_ok=True)
        env = self._env(self.ports)
        try:
            load_catalog(self.catalog_path, env)
        except CatalogError as exc:
            raise SystemExit(f"tokenforge up: bad catalog: {exc}") from None
        env["TF_ADMIN_TOKEN"] = admin_token_for(self.data_dir)
        if not env.get("TF_DATABASE_URL"):
            from tokenforge.pg import start_embedded

            self.pg = start_embedded(self.data_dir / "pg")
            env["TF_DATABASE_URL"] = self.pg.url
        self.env = env
        for name in START_ORDER:
            self.children.append(self._spawn(name))
        return env

    def _spawn(self, name: str) -> Child:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenforge.cli", "serve", name],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log_file.close()
        return Child(name, proc, log_path)

    def restart(self, dead: Child) -> Child:
        """Start `dead`'s service again on its port and wait until it is healthy. Its log
        goes on in the same file. Raises SystemExit when it does not come back."""
        assert dead.proc.poll() is not None
        child = self._spawn(dead.name)
        self.children[self.children.index(dead)] = child
        self.wait_healthy(self.env, only=[child])
        return child

    def wait_healthy(self, env: dict[str, str], timeout_s: float = HEALTH_TIMEOUT_S,
                     only: list[Child] | None = None) -> None:
        probes: dict[str, Callable[[], bool]] = {
            "sim-upstream": lambda: _http_healthy(f"{env['TF_SIM_URL']}/health"),
            "ledger": lambda: _grpc_healthy(env["TF_LEDGER_ADDR"]),
            "metering": lambda: _grpc_healthy(env["TF_METERING_ADDR"]),
            "router": lambda: _grpc_healthy(env["TF_ROUTER_ADDR"]),
            "edge": lambda: _http_healthy(f"http://127.0.0.1:{self.http_port}/health"),
        }
        pending = {c.name: c for c in (self.children if only is None else only)}
        deadline = time.monotonic() + timeout_s
        while pending:
            for name, child in list(pending.items()):
                code = child.proc.poll()
                if code is not None:
                    tail = child.log_path.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"tokenforge up: {name} {describe_exit(code)} while starting:\n{tail}")
                # Ours only if the child itself listens there: another stack's edge on a taken
                # port answers /health too.
                if listens_on(child.proc.pid, self.ports[name]) and probes[name]():
                    del pending[name]
            if self.stopping.is_set():
                raise SystemExit("tokenforge up: stopped while starting")
            if time.monotonic() > deadline:
                raise SystemExit(f"tokenforge up: not healthy within {timeout_s:.0f} s: {', '.join(pending)} (logs in {self.data_dir / 'logs'})")
            if pending:
                self.stopping.wait(0.05)

    def stop(self) -> None:
        """Stop in dependency order: the edge stops taking requests, the router finishes and
        settles what is in flight (the ledger, metering and the simulator still up), then
        the rest, then PostgreSQL."""
        by_name = {c.name: c for c in self.children}
        for wave in STOP_WAVES:
            batch = [by_name[n] for n in wave if n in by_name]
            for child in batch:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for child in batch:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        self._unlock_data_dir()

    def database_alive(self) -> bool:
        return self.pg is None or self.pg.alive()


def up(*, catalog: str | None, data_dir: str, http_port: int) -> int:
    stack = Stack(catalog=catalog, data_dir=data_dir, http_port=http_port)

    def on_signal(signum: int, frame: object) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        env = stack.start()
        stack.wait_healthy(env)
        elapsed = time.monotonic() - started
        token = env["TF_ADMIN_TOKEN"]
        # the CLI run from this folder finds the edge without --url
        (stack.data_dir / EDGE_URL_FILE).write_text(f"http://127.0.0.1:{stack.http_port}\n")
        print(f"tokenforge is up in {elapsed:.1f} s", flush=True)
        print(f"edge: http://127.0.0.1:{stack.http_port}", flush=True)
        print(f"admin token: {token}", flush=True)
        print(f"router gRPC: {env['TF_ROUTER_ADDR']}", flush=True)
        print(f"logs: {stack.data_dir / 'logs'}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        return_code = 0
        budgets = {c.name: RestartBudget() for c in stack.children}
        while not stack.stopping.wait(0.5):
            if not stack.database_alive():
                print("tokenforge up: PostgreSQL stopped; stopping", file=sys.stderr, flush=True)
                return_code = 1
                break
            if not _restart_the_dead(stack, budgets):
                return_code = 1
                break
    except SystemExit as exc:
        print(exc, file=sys.stderr, flush=True)
        return_code = 1
    finally:
        started_something = bool(stack.children) or stack.pg is not None
        stack.stop()
    if started_something:  # not after a refusal (another up holds the data folder)
        print("tokenforge stopped", flush=True)
    return return_code


def _restart_the_dead(stack: Stack, budgets: dict[str, RestartBudget]) -> bool:
    """Start again each child that died, within its budget. False when one is out of
    restarts or did not come back healthy: the stack stops."""
    for child in [c for c in stack.children if c.proc.poll() is not None]:
        budget = budgets[child.name]
        how = describe_exit(child.proc.returncode)
        if not budget.take(time.monotonic()):
            print(f"tokenforge up: {child.name} {how} again, after {budget.limit} restarts within "
                  f"{budget.window_s:.0f} s; stopping (see {child.log_path})", file=sys.stderr, flush=True)
            return False
        print(f"tokenforge up: {child.name} {how}; restarting it ({budget.used()} of at most "
              f"{budget.limit} restarts within {budget.window_s:.0f} s; see {child.log_path})",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            fresh = stack.restart(child)
        except SystemExit as exc:
            if stack.stopping.is_set():
                return True  # Ctrl-C while it was starting: a clean stop, not a failure
            print(exc, file=sys.stderr, flush=True)
            return False
        print(f"tokenforge up: {child.name} is back in {time.monotonic() - started:.1f} s "
              f"(pid {fresh.proc.pid})", file=sys.stderr, flush=True)
    return True
