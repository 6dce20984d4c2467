"""`tokenforge demo`: an account, a key and the research-agent example, against a running stack."""

from __future__ import annotations

import argparse
import io
import json
import sys
import uuid

import httpx

from tokenforge.admin_cli import _admin_token, edge_url


async def main(ns: argparse.Namespace) -> int:
    from tokenforge.examples.research_agent import research

    url = edge_url(ns)
    admin = {"authorization": f"Bearer {_admin_token(ns)}"}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=30) as http:
        acct = (await http.post("/admin/v1/accounts", json={"name": f"demo-{uuid.uuid4().hex[:6]}"})).json()
        if "id" not in acct:
            raise SystemExit(f"could not create the demo account: {acct}")
        for bucket, amount in (("wallet", "5.00"), ("credit", "1.00")):
            r = await http.post(f"/admin/v1/accounts/{acct['id']}/topups",
                                json={"bucket": bucket, "amount": amount, "idempotency_key": uuid.uuid4().hex})
            r.raise_for_status()
        key = (await http.post("/admin/v1/keys", json={"account_id": acct["id"], "name": "research-agent",
                                                       "route_policy": "auto"})).json()
    if ns.json:
        # One JSON document on stdout: who the demo made, and the run report (the story the
        # text mode prints as it goes is not part of it).
        story = io.StringIO()
        try:
            report = await research(url, key["key"], budget_wallet="1.00", out=story)
        except SystemExit:
            print(story.getvalue(), end="", file=sys.stderr)  # why it did not start
            raise
        print(json.dumps({"account_id": acct["id"], "key": {"id": key["id"], "secret": key["key"]},
                          "report": report}, indent=2))
        return 0
    print(f"demo account {acct['id']} (wallet 5.00 CNY, credit 1.00 CREDIT), key {key['id']} (policy auto)")
    # A fresh demo key: printed so the run report (terminal and page) can be opened with it.
    print(f"demo key secret: {key['key']}")
    await research(url, key["key"], budget_wallet="1.00", show_secret=True)
    return 0
