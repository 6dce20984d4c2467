"""The `tokenforge admin|receipt|run report` commands against a running stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import make_customer
from tests.e2e.helpers import chat


def tf(stack, *args: str, api_key: str | None = None) -> str:
    cmd = [sys.executable, "-m", "tokenforge.cli", *args[:1]]
    conn = ["--url", stack.url, "--admin-token", stack.admin_token] + (["--api-key", api_key] if api_key else [])
    if args[0] == "run":
        cmd = [sys.executable, "-m", "tokenforge.cli", "run", "report", *args[2:], *conn]
    else:
        cmd += [*conn, *args[1:]] if args[0] == "admin" else [*args[1:], *conn]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_admin_commands_create_fund_and_inspect(stack) -> None:
    created = tf(stack, "admin", "account", "create", "cli-co")
    account_id = re.search(r"acct_\w+", created).group(0)
    shown = tf(stack, "admin", "topup", account_id, "wallet", "2.50")
    assert "2.500000" in shown
    key_out = tf(stack, "admin", "key", "create", "--account", account_id, "--name", "cli-bot", "--route-policy", "auto")
    key_id = re.search(r"key_\w+", key_out).group(0)
    assert "sk-tf-" in key_out
    listed = tf(stack, "admin", "key", "list", "--account", account_id)
    assert key_id in listed and "active" in listed
    balances = json.loads(tf(stack, "admin", "--json", "balances", account_id))
    assert balances["buckets"]["wallet"]["balance"] == "2.500000"
    assert "ok" in tf(stack, "admin", "audit")


def test_receipt_and_run_report_print_for_people(stack) -> None:
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "cli run"}).json()
    _, headers = chat(c, "m-timeout", extra_headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": "lookup"})
    text = tf(stack, "receipt", headers["x-tf-receipt-id"])
    assert "slow-a" in text and "timeout" in text and "cheap-b" in text and "fallback from slow-a" in text
    report = tf(stack, "run", "report", run["id"], api_key=c.secret)
    assert run["id"] in report and "lookup" in report and "Totals" in report


def test_connection_options_work_after_the_subcommand_too(stack) -> None:
    out = subprocess.run([sys.executable, "-m", "tokenforge.cli", "admin", "account", "create", "late-opts",
                          "--url", stack.url, "--admin-token", stack.admin_token],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"acct_\w+", out.stdout)
    assert "HTTP Request" not in out.stderr  # no client chatter


def _cli(*args: str, env_key: str, cwd) -> subprocess.CompletedProcess[str]:
    """The CLI with someone's own key exported, as an admin with a key of their own has it."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TF_ADMIN_TOKEN", "TOKENFORGE_API_KEY")}
    env["TOKENFORGE_API_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "tokenforge.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def test_a_flag_given_wins_over_an_exported_api_key(stack, tmp_path) -> None:
    owner, admin_own = make_customer(stack), make_customer(stack)
    with owner.client() as http:
        run = http.post("/v1/runs", json={"name": "whose run"}).json()
    _, headers = chat(owner, "gpt-4o-mini", extra_headers={"X-TF-Run-Id": run["id"]})
    receipt_id = headers["x-tf-receipt-id"]

    as_admin = _cli("receipt", receipt_id, "--url", stack.url, "--admin-token", stack.admin_token,
                    env_key=admin_own.secret, cwd=tmp_path)
    assert as_admin.returncode == 0, as_admin.stdout + as_admin.stderr
    assert f"receipt {receipt_id}" in as_admin.stdout and owner.key_id in as_admin.stdout

    as_owner = _cli("receipt", receipt_id, "--url", stack.url, "--api-key", owner.secret,
                    env_key=admin_own.secret, cwd=tmp_path)
    assert as_owner.returncode == 0, as_owner.stdout + as_owner.stderr
    assert f"receipt {receipt_id}" in as_owner.stdout

    # no flag: the exported key is used, and it does not own this receipt
    as_env_key = _cli("receipt", receipt_id, "--url", stack.url, env_key=admin_own.secret, cwd=tmp_path)
    assert as_env_key.returncode != 0
    assert "not_found" in as_env_key.stderr

    both = _cli("receipt", receipt_id, "--url", stack.url, "--admin-token", stack.admin_token,
                "--api-key", owner.secret, env_key=admin_own.secret, cwd=tmp_path)
    assert both.returncode != 0
    assert "not both" in both.stderr

    # a run is read with its own key; an admin token given is said to not do it, not
    # silently swapped for the exported key
    report = _cli("run", "report", run["id"], "--url", stack.url, "--admin-token", stack.admin_token,
                  env_key=admin_own.secret, cwd=tmp_path)
    assert report.returncode != 0
    assert "--api-key" in report.stderr and "admin token" in report.stderr
    report = _cli("run", "report", run["id"], "--url", stack.url, "--api-key", owner.secret,
                  env_key=admin_own.secret, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert run["id"] in report.stdout


def test_the_cli_finds_the_edge_that_up_started_in_its_data_folder(stack, tmp_path) -> None:
    import os

    from tokenforge.stack import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("TF_ADMIN_TOKEN", "TF_EDGE_URL", "TOKENFORGE_API_KEY")}
    assert (stack.data_dir / "edge-url").read_text().strip() == stack.url
    out = subprocess.run([sys.executable, "-m", "tokenforge.cli", "admin", "--data-dir", str(stack.data_dir), "audit"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout

    # Nothing there: the error says what to do, not only "connection refused".
    (tmp_path / "admin-token").write_text("tf-admin-x\n")
    (tmp_path / "edge-url").write_text(f"http://127.0.0.1:{free_port()}\n")
    out = subprocess.run([sys.executable, "-m", "tokenforge.cli", "admin", "--data-dir", str(tmp_path), "audit"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    assert "cannot reach the edge at http://127.0.0.1:" in out.stderr
    assert "Pass --url (or set TF_EDGE_URL) with the edge URL it printed." in out.stderr
