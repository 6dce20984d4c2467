"""The run report page, rendered by a real headless browser (Debian's chromium), when one is
installed: every attempt is a bar, failed ones marked."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import make_customer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it where apt works)")
def test_report_page_renders_a_bar_per_attempt(stack, tmp_path) -> None:
    c = make_customer(stack)
    with c.client() as http:
        run = http.post("/v1/runs", json={"name": "page"}).json()
        for model, step in (("gpt-4o-mini", "intro"), ("m-timeout", "lookup"), ("m-500", "retry")):
            resp = http.post("/v1/chat/completions", headers={"X-TF-Run-Id": run["id"], "X-TF-Run-Step": step},
                             json={"model": model, "messages": [{"role": "user", "content": step}], "max_tokens": 8})
            assert resp.status_code == 200, resp.text
        html = http.get(f"/v1/runs/{run['id']}/report.html").text
    page = tmp_path / "report.html"
    page.write_text(html)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    bars = re.findall(r"class=\"bar (\w+)\"", dom)
    assert len(bars) == 5  # 1 + 2 (timeout, backup) + 2 (500, retry)
    assert bars.count("failed") == 2
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1300,900", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=60)
    assert shot.stat().st_size > 10_000
