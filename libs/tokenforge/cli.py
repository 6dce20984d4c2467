"""tokenforge: run the gateway (`up`), manage accounts, keys and money (`admin`), read receipts and run reports."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys

SERVICES = {
    "ledger": "tokenforge.ledger.server",
    "metering": "tokenforge.metering.server",
    "router": "tokenforge.router.server",
    "edge": "tokenforge.edge.server",
    "sim-upstream": "tokenforge.sim_upstream.server",
}


def _serve(name: str) -> int:
    from tokenforge.config import Settings

    module = importlib.import_module(SERVICES[name])
    settings = Settings.from_env()
    return int(module.run(settings) or 0)


def _main(argv: list[str] | None = None) -> int:
    for noisy in ("pgserver", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    parser = argparse.ArgumentParser(prog="tokenforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack on this machine")
    up.add_argument("--catalog", help="catalog YAML (default: the bundled demo catalog)")
    up.add_argument("--data-dir", default="./.tokenforge", help="data folder (default ./.tokenforge)")
    up.add_argument("--http-port", type=int, default=8080, help="edge HTTP port (default 8080)")

    serve = sub.add_parser("serve", help="run one service alone (addresses from TF_* variables)")
    serve.add_argument("service", choices=sorted(SERVICES))

    admin = sub.add_parser("admin", help="accounts, top-ups, keys, balances, audit")
    from tokenforge import admin_cli

    admin_cli.add_arguments(admin)

    receipt = sub.add_parser("receipt", help="print a receipt")
    receipt.add_argument("id")
    admin_cli.add_connection_arguments(receipt)

    run = sub.add_parser("run", help="runs")
    run_sub = run.add_subparsers(dest="run_command", required=True)
    report = run_sub.add_parser("report", help="print a run report")
    report.add_argument("id")
    admin_cli.add_connection_arguments(report)

    demo = sub.add_parser("demo", help="run the research-agent example against a running stack")
    admin_cli.add_connection_arguments(demo)

    ns = parser.parse_args(argv)
    if ns.command == "serve":
        return _serve(ns.service)
    if ns.command == "up":
        from tokenforge import stack

        return stack.up(catalog=ns.catalog, data_dir=ns.data_dir, http_port=ns.http_port)
    if ns.command == "admin":
        return admin_cli.run_admin(ns)
    if ns.command == "receipt":
        return admin_cli.show_receipt(ns)
    if ns.command == "run":
        return admin_cli.show_run_report(ns)
    if ns.command == "demo":
        from tokenforge import demo as demo_mod

        return asyncio.run(demo_mod.main(ns)) or 0
    parser.error("unknown command")
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`tokenforge receipt ID --json | head`): stop quietly, and keep
        # Python from reporting the same error again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
