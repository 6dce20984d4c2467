"""`tokenforge demo` runs the research-agent example to completion on the bundled catalog."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import make_customer
from tests.stackproc import start_stack


def test_demo_runs_to_completion_with_timeouts_retries_and_fallbacks(tmp_path) -> None:
    stack = start_stack(tmp_path / "data")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tokenforge.cli", "demo", "--url", stack.url, "--admin-token", stack.admin_token],
            capture_output=True, text=True, timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        assert "estimate wallet low" in text and "demo key secret: sk-tf-" in text
        for step in ("market data", "analysis", "risks", "summary"):
            assert step in text
        # the report's totals table: 11 calls, and the flaky/503 channels forced retries and fallbacks
        wallet_row = next(line for line in text.splitlines() if line.startswith("wallet "))
        cols = wallet_row.split()
        calls, attempts, failed, retries, fallbacks = (int(c) for c in cols[3:8])
        assert calls == 11 and failed == 6 and attempts == calls + failed
        assert retries == 3 and fallbacks == 3
        assert "report page:" in text and "failed call" not in text

        # The page hint names the key that owns the run (the demo's), and its two lines work as
        # printed for a user who has another key exported as $KEY.
        secret = re.search(r"demo key secret: (sk-tf-\S+)", text).group(1)
        run_id = re.search(r"^run (run_\w+):", text, re.MULTILINE).group(1)
        lines = [line.strip() for line in text.splitlines()]
        export = next(line for line in lines if line.startswith("export TF_RUN_KEY="))
        curl = next(line for line in lines if line.startswith("curl "))
        assert export == f"export TF_RUN_KEY={secret}"
        assert "$TF_RUN_KEY" in curl and "$KEY" not in text
        other = make_customer(stack)
        env = {k: v for k, v in os.environ.items() if k != "TF_RUN_KEY"} | {"KEY": other.secret}
        got = subprocess.run(["bash", "-c", f"{export}\n{curl}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 0, got.stdout + got.stderr
        assert run_id in (tmp_path / "report.html").read_text()

        # --json: one JSON document, the run report with the same figures as the text
        out = subprocess.run(
            [sys.executable, "-m", "tokenforge.cli", "demo", "--url", stack.url, "--admin-token", stack.admin_token,
             "--json"], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        doc = json.loads(out.stdout)
        assert doc["key"]["secret"].startswith("sk-tf-") and doc["account_id"].startswith("acct_")
        report = doc["report"]
        assert report["totals"]["wallet"]["calls"] == 11
        assert len(report["receipts"]) == 11
        assert {s["step"] for s in report["by_step"]} >= {"market data", "analysis", "risks", "summary"}

        # A balance that cannot cover the high estimate: the agent prints why and never starts.
        poor = make_customer(stack, wallet="0.001000", credit=None, route_policy="routed")
        out = subprocess.run([sys.executable, "-m", "tokenforge.examples.research_agent", "--url", stack.url,
                              "--api-key", poor.secret], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "warning insufficient_balance" in out.stdout and "not starting" in out.stdout
        with poor.client() as http:
            assert http.get("/v1/receipts").json()["data"] == []
        assert poor.balance()["buckets"]["wallet"]["held"] == "0"
    finally:
        assert stack.stop() == 0
