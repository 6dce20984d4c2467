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
