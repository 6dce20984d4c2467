"""The research agent's closing hint: how to open the run's report page, with the run's own key."""

from __future__ import annotations

from tokenforge.examples.research_agent import report_page_hint

URL = "http://127.0.0.1:8080"


def test_the_hint_names_the_runs_key_and_shows_the_secret_only_when_asked() -> None:
    shown = report_page_hint(URL, "run_1", "key_7", secret="sk-tf-abc")
    assert f"{URL}/v1/runs/run_1/report.html" in shown
    assert "key_7" in shown
    assert "\n  export TF_RUN_KEY=sk-tf-abc\n" in shown
    assert 'curl -fsS -H "Authorization: Bearer $TF_RUN_KEY"' in shown
    assert "$KEY" not in shown

    hidden = report_page_hint(URL, "run_1", "key_7", secret=None)
    assert "sk-tf-" not in hidden
    assert "export TF_RUN_KEY=" in hidden and "--api-key" in hidden
    assert "$TF_RUN_KEY" in hidden and "$KEY" not in hidden
