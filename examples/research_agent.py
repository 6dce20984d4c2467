"""A research agent written against the official `openai` client, run as a tokenforge run.

It asks for a pre-flight estimate, prints the warnings and stops if the balance cannot cover
the high estimate, then runs its sections (market data, analysis, risks, summary) with
parallel calls — some of which hit the simulator's timeouts and fallbacks — and prints the
run report at the end.

    python examples/research_agent.py --url http://127.0.0.1:8080 --api-key sk-tf-…
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import Any

import httpx
from openai import APIStatusError, AsyncOpenAI
from tqdm import tqdm


@dataclass(frozen=True)
class Section:
    step: str
    model: str
    prompts: tuple[str, ...]
    max_tokens: int


TOPIC = "solid-state batteries for electric vehicles"
SECTIONS = (
    Section("market data", "gpt-4o-mini", tuple(
        f"List recent market figures on {TOPIC}: {aspect}." for aspect in
        ("market size", "leading manufacturers", "pilot production lines", "price per kWh")), 48),
    Section("analysis", "deepseek-r1", tuple(
        f"Analyse {TOPIC} in terms of {aspect}." for aspect in
        ("energy density", "manufacturing cost", "supply chain")), 64),
    Section("risks", "qwen-plus", tuple(
        f"What are the main {aspect} risks of {TOPIC}?" for aspect in ("technical", "commercial", "regulatory")), 48),
    Section("summary", "gpt-4o", (f"Summarise the outlook for {TOPIC} in five sentences.",), 96),
)


def plan() -> list[dict[str, Any]]:
    return [{"model": s.model, "calls": len(s.prompts), "input_tokens": 40, "output_tokens": s.max_tokens, "step": s.step}
            for s in SECTIONS]


async def _call(client: AsyncOpenAI, run_id: str, section: Section, prompt: str, bar: tqdm) -> tuple[str, str | None]:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=section.model,
            messages=[{"role": "system", "content": "You are a concise research analyst."},
                      {"role": "user", "content": prompt}],
            max_tokens=section.max_tokens,
            extra_headers={"X-TF-Run-Id": run_id, "X-TF-Run-Step": section.step},
        )
        raw.parse()
        return raw.headers.get("x-tf-receipt-id", ""), None
    except APIStatusError as exc:
        return exc.response.headers.get("x-tf-receipt-id", ""), f"{exc.status_code} {exc.body}"
    finally:
        bar.update(1)


async def research(url: str, api_key: str, *, budget_wallet: str | None = None, out: Any = sys.stdout,
                   show_secret: bool = False) -> dict[str, Any]:
    """Run the whole workflow; returns the run report. Raises SystemExit(2) when the balance
    cannot cover the high estimate. `show_secret`: the closing hint may print `api_key` (the
    caller printed it already)."""
    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        body: dict[str, Any] = {"name": f"research: {TOPIC}", "plan": plan()}
        if budget_wallet:
            body["budget"] = {"wallet": budget_wallet}  # held up front; calls past it are refused
        created = await http.post("/v1/runs", json=body)
        if created.status_code == 402:
            print(f"the run's budget cannot be held: {created.json()['error']['message']}", file=out)
            raise SystemExit(2)
        if created.status_code != 201:
            raise SystemExit(f"could not start the run: {created.status_code} {created.text}")
        run = created.json()
        est = run["estimate"]
        print(f"run {run['id']}: estimate wallet low {est['wallet']['low']}, expected {est['wallet']['expected']}, "
              f"high {est['wallet']['high']} CNY; credit at most {est['credit']['high']} CREDIT", file=out)
        for w in run["warnings"]:
            print(f"  warning {w['code']}: {w['message']}", file=out)
        if any(w["code"] == "insufficient_balance" for w in run["warnings"]):
            await http.post(f"/v1/runs/{run['id']}/close")
            print("the balance cannot cover the high estimate: not starting", file=out)
            raise SystemExit(2)

        client = AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)
        total = sum(len(s.prompts) for s in SECTIONS)
        failures = []
        with tqdm(total=total, desc="research", unit="call", file=out, disable=None) as bar:
            for section in SECTIONS:
                bar.set_postfix_str(section.step)
                results = await asyncio.gather(*(_call(client, run["id"], section, p, bar) for p in section.prompts))
                failures += [f"{section.step}: {err}" for _, err in results if err]
        await client.close()
        for failure in failures:
            print(f"  failed call: {failure}", file=out)
        closed = await http.post(f"/v1/runs/{run['id']}/close")
        closed.raise_for_status()
        report = (await http.get(f"/v1/runs/{run['id']}")).json()
    from tokenforge.report import report_text

    print(report_text(report), file=out)
    print("\n" + report_page_hint(url, run["id"], report.get("key_id", ""), secret=api_key if show_secret else None),
          file=out)
    return report


def report_page_hint(url: str, run_id: str, key_id: str, *, secret: str | None) -> str:
    """How to fetch the run's report page: with the key that ran the run, named in a variable
    of its own (a `$KEY` the user exported may be another key, and gets 404). The secret is
    shown only when the caller has shown it already (`tokenforge demo` prints its own key)."""
    page = f"{url}/v1/runs/{run_id}/report.html"
    value = secret if secret is not None else "'<the secret given to --api-key>'"
    return "\n".join([
        f"report page: {page}",
        f"  it opens only with the key that ran the run ({key_id or 'the agent key'}), not any other:",
        f"  export TF_RUN_KEY={value}",
        f'  curl -fsS -H "Authorization: Bearer $TF_RUN_KEY" {page} -o report.html',
        "  then open report.html",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--budget", default=None, help='a wallet budget for the run, e.g. "0.50"')
    ns = parser.parse_args()
    asyncio.run(research(ns.url, ns.api_key, budget_wallet=ns.budget))


if __name__ == "__main__":
    main()
