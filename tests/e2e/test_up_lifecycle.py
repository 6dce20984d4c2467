"""`tokenforge up` on its own data dir: prints the URL and token, keeps data across restarts,
and leaves no process behind when stopped."""

from __future__ import annotations

import uuid

import psutil

from tests.stackproc import start_stack


def test_up_restart_keeps_data_and_stop_leaves_nothing(tmp_path) -> None:
    data_dir = tmp_path / "data"
    first = start_stack(data_dir)
    try:
        assert first.url.startswith("http://127.0.0.1:")
        assert first.admin_token.startswith("tf-admin-")
        assert (data_dir / "admin-token").read_text().strip() == first.admin_token
        with first.admin() as admin:
            acct = admin.post("/admin/v1/accounts", json={"name": "keeper"}).json()
            admin.post(f"/admin/v1/accounts/{acct['id']}/topups",
                       json={"bucket": "wallet", "amount": "3.50", "idempotency_key": uuid.uuid4().hex})
        children = first.children()
        assert len(children) >= 5
    finally:
        assert first.stop() == 0
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (data_dir / "pg" / "postmaster.pid").exists()

    second = start_stack(data_dir)
    try:
        assert second.admin_token == first.admin_token
        with second.admin() as admin:
            again = admin.get(f"/admin/v1/accounts/{acct['id']}").json()
        assert again["buckets"]["wallet"]["balance"] == "3.500000"
    finally:
        assert second.stop() == 0


def test_a_killed_up_leaves_postgres_that_the_next_up_adopts_and_stops(tmp_path) -> None:
    import os
    import signal

    data_dir = tmp_path / "data"
    first = start_stack(data_dir)
    children = first.children()
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    # Our services die with `up` (parent-death signal); PostgreSQL is a daemon and stays.
    for p in children:
        try:
            p.wait(10)
        except psutil.NoSuchProcess:
            pass
    second = start_stack(data_dir)
    assert second.stop() == 0
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    try:
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


def test_up_stops_when_its_postgres_dies(tmp_path) -> None:
    import os
    import signal

    data_dir = tmp_path / "data"
    stack = start_stack(data_dir)
    pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    assert stack.proc.wait(30) == 1  # noticed within its 0.5 s watch, then stopped everything


def test_up_restarts_a_killed_service_on_its_port_and_the_stack_serves_again(tmp_path) -> None:
    """kill -9 the router (then the edge) under `up`: each comes back on its own port, `up`
    says so, and a paid request goes through and is settled afterwards."""
    import os
    import signal

    import openai

    stack = start_stack(tmp_path / "data")
    try:
        with stack.admin() as admin:
            acct = admin.post("/admin/v1/accounts", json={"name": "survivor"}).json()
            admin.post(f"/admin/v1/accounts/{acct['id']}/topups",
                       json={"bucket": "wallet", "amount": "1.00", "idempotency_key": uuid.uuid4().hex}).raise_for_status()
            key = admin.post("/admin/v1/keys", json={"account_id": acct["id"], "name": "k",
                                                     "route_policy": "routed"}).json()["key"]
        for name in ("router", "edge"):
            victim = _service_child(stack, name)
            os.kill(victim.pid, signal.SIGKILL)
            line = stack.wait_for_line(f"{name} was killed by SIGKILL; restarting it")
            assert "1 of at most 5 restarts within 60 s" in line
            stack.wait_for_line(f"{name} is back in")
            assert _service_child(stack, name).pid != victim.pid
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "still there?"}], max_tokens=8)
        assert raw.http_response.status_code == 200
        receipt_id = raw.headers["x-tf-receipt-id"]
        with stack.admin() as admin:
            receipt = admin.get(f"/admin/v1/receipts/{receipt_id}").json()
        assert receipt["status"] == "settled" and receipt["amount"] == raw.headers["x-tf-amount"]
        assert stack.proc.poll() is None  # still up
    finally:
        assert stack.stop() == 0


def _service_child(stack, name: str) -> psutil.Process:
    for p in stack.children():
        try:
            if p.cmdline()[-2:] == ["serve", name]:
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no `serve {name}` child under `up`")


def test_a_second_up_on_the_same_data_dir_is_refused_and_harms_nothing(tmp_path) -> None:
    import subprocess
    import sys

    import httpx

    data_dir = tmp_path / "data"
    first = start_stack(data_dir)
    try:
        second = subprocess.run([sys.executable, "-m", "tokenforge.cli", "up", "--data-dir", str(data_dir),
                                 "--http-port", "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another `tokenforge up` is using" in second.stderr + second.stdout
        assert "tokenforge stopped" not in second.stdout  # it never started anything
        assert httpx.get(first.url + "/health").status_code == 200
    finally:
        assert first.stop() == 0
    assert not (data_dir / "up.lock").exists()


def test_a_second_up_on_a_taken_http_port_is_refused_before_it_starts_anything(tmp_path) -> None:
    import subprocess
    import sys

    import httpx

    first = start_stack(tmp_path / "first")
    port = int(first.url.rsplit(":", 1)[1])
    other = tmp_path / "other"
    try:
        second = subprocess.run([sys.executable, "-m", "tokenforge.cli", "up", "--data-dir", str(other),
                                 "--http-port", str(port)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "tokenforge is up" not in second.stdout
        assert "admin token" not in second.stdout
        assert f"port {port} is already in use" in second.stderr
        assert "--http-port" in second.stderr
        assert "tokenforge stopped" not in second.stdout  # it never started anything
        assert not (other / "pg").exists()
        assert not (other / "admin-token").exists()
        assert httpx.get(first.url + "/health").status_code == 200
    finally:
        assert first.stop() == 0


def test_readiness_is_not_fooled_by_another_program_answering_on_the_edge_port(tmp_path) -> None:
    """Someone else's server answers /health on the port while our edge (here a live process
    that never listens) has not bound it: `up` must not call that ready."""
    import http.server
    import subprocess
    import sys
    import threading

    import pytest

    from tokenforge.stack import Child, Stack

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args: object) -> None:
            pass

    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    silent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        stack = Stack(catalog=None, data_dir=str(tmp_path), http_port=port)
        stack.children.append(Child("edge", silent, tmp_path / "edge.log"))
        with pytest.raises(SystemExit, match="not healthy within 1 s: edge"):
            stack.wait_healthy({}, timeout_s=1.0)
        assert silent.poll() is None  # refused while our edge was alive: the answer was not its
    finally:
        silent.kill()
        silent.wait()
        foreign.shutdown()
        foreign.server_close()


def test_a_malformed_setting_is_refused_on_the_terminal_before_anything_starts(tmp_path) -> None:
    import os
    import subprocess
    import sys

    data_dir = tmp_path / "data"
    env = dict(os.environ, TF_REQUEST_DEADLINE_S="two minutes")
    done = subprocess.run([sys.executable, "-m", "tokenforge.cli", "up", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "tokenforge up: TF_REQUEST_DEADLINE_S must be a number, got 'two minutes'" in done.stderr
    assert "tokenforge is up" not in done.stdout
    assert not data_dir.exists()  # no folder, no PostgreSQL, no token


def test_a_risky_setting_is_a_warning_on_the_terminal_and_the_stack_still_starts(tmp_path) -> None:
    stack = start_stack(tmp_path / "data", env={"TF_HOLD_TTL_MAX_S": "90", "TF_REQUEST_DEADLINE_S": "60"})
    try:
        assert "tokenforge up: warning: TF_HOLD_TTL_MAX_S (90 s) is shorter than" in "\n".join(stack.lines)
    finally:
        assert stack.stop() == 0
