"""`tokenforge admin|receipt|run report`: talk to a running stack's edge over HTTP."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import urllib.parse
import uuid
from typing import Any

import httpx

from tokenforge.terminal import printable_lines

DEFAULT_EDGE_URL = "http://127.0.0.1:8080"
EDGE_URL_FILE = "edge-url"  # written by `tokenforge up` in its data folder


def add_connection_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The options every command that talks to a stack takes. With `suppress`, a repeat on a
    subcommand: given there it wins, absent it leaves the value given before the subcommand."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=default(None),
                        help="the edge URL (default $TF_EDGE_URL, else the one `up` wrote to DATA_DIR/edge-url, "
                             f"else {DEFAULT_EDGE_URL})")
    parser.add_argument("--admin-token", default=default(None),
                        help="admin token (default $TF_ADMIN_TOKEN or DATA_DIR/admin-token)")
    parser.add_argument("--data-dir", default=default("./.tokenforge"), help="where `up` wrote admin-token")
    # None when not given, so that a flag given can win over an exported TOKENFORGE_API_KEY
    # (`_api_key` reads the variable only then).
    parser.add_argument("--api-key", default=default(None),
                        help="an API key, for commands a key may run itself (default $TOKENFORGE_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print raw JSON")


def add_arguments(admin: argparse.ArgumentParser) -> None:
    add_connection_arguments(admin)
    conn = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(conn, suppress=True)
    sub = admin.add_subparsers(dest="admin_command", required=True)
    acct = sub.add_parser("account", help="accounts")
    acct_sub = acct.add_subparsers(dest="action", required=True)
    create = acct_sub.add_parser("create", parents=[conn])
    create.add_argument("name")
    show = acct_sub.add_parser("show", parents=[conn])
    show.add_argument("account_id")

    topup = sub.add_parser("topup", help="add money to a bucket", parents=[conn])
    topup.add_argument("account_id")
    topup.add_argument("bucket", choices=["wallet", "credit"])
    topup.add_argument("amount", help='a decimal string, e.g. "10.00"')
    topup.add_argument("--idempotency-key", default=None)

    refund = sub.add_parser("refund", help="give back all or part of what a receipt collected", parents=[conn])
    refund.add_argument("receipt_id")
    refund.add_argument("--amount", required=True, help='a decimal string, e.g. "0.01"')
    refund.add_argument("--idempotency-key", required=True,
                        help="required: running the command again with the same key refunds once")
    refund.add_argument("--reason", default=None)

    adjust = sub.add_parser("adjust", help="credit or debit a bucket, with a reason", parents=[conn])
    adjust.add_argument("account_id")
    adjust.add_argument("--bucket", required=True, choices=["wallet", "credit"])
    adjust.add_argument("--amount", required=True, help='a positive decimal string, e.g. "1.00"')
    adjust.add_argument("--direction", required=True, choices=["credit", "debit"],
                        help="credit adds to the bucket, debit takes from its available balance")
    adjust.add_argument("--reason", required=True)
    adjust.add_argument("--idempotency-key", required=True,
                        help="required: running the command again with the same key adjusts once")

    key = sub.add_parser("key", help="API keys")
    key_sub = key.add_subparsers(dest="action", required=True)
    kc = key_sub.add_parser("create", parents=[conn])
    kc.add_argument("--account", required=True)
    kc.add_argument("--name", required=True)
    kc.add_argument("--route-policy", choices=["routed", "direct", "auto"], default="routed")
    kc.add_argument("--allowed-models", default="", help="comma-separated")
    kc.add_argument("--wallet-daily", default=None)
    kc.add_argument("--wallet-total", default=None)
    kc.add_argument("--credit-daily", default=None)
    kc.add_argument("--credit-total", default=None)
    kr = key_sub.add_parser("revoke", parents=[conn])
    kr.add_argument("key_id")
    kl = key_sub.add_parser("list", parents=[conn])
    kl.add_argument("--account", required=True)

    bal = sub.add_parser("balances", help="an account's buckets", parents=[conn])
    bal.add_argument("account_id")
    sub.add_parser("audit", help="check every balance against its postings", parents=[conn])
    st = sub.add_parser("statement", help="an account's statement", parents=[conn])
    st.add_argument("account_id")
    st.add_argument("--limit", type=int, default=50)
    st.add_argument("--after", default="")


def _admin_token(ns: argparse.Namespace) -> str:
    if ns.admin_token:
        return str(ns.admin_token)
    if os.environ.get("TF_ADMIN_TOKEN"):
        return os.environ["TF_ADMIN_TOKEN"]
    path = pathlib.Path(ns.data_dir) / "admin-token"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit("no admin token: pass --admin-token, set TF_ADMIN_TOKEN, or run from the folder where `tokenforge up` ran")


def edge_url(ns: argparse.Namespace) -> str:
    """--url, else $TF_EDGE_URL, else the URL the `up` of --data-dir printed, else the default."""
    if getattr(ns, "url", None):
        return str(ns.url).rstrip("/")
    if os.environ.get("TF_EDGE_URL"):
        return os.environ["TF_EDGE_URL"].rstrip("/")
    path = pathlib.Path(ns.data_dir) / EDGE_URL_FILE
    if path.exists():
        return path.read_text().strip().rstrip("/")
    return DEFAULT_EDGE_URL


def _api_key(ns: argparse.Namespace) -> str | None:
    return ns.api_key or os.environ.get("TOKENFORGE_API_KEY") or None


def _seg(value: str) -> str:
    """An id as ONE path segment: quoted, so `/`, `..`, `?` or `#` in it can never steer a
    request to another endpoint (an "account id" of `../receipts/rcpt_x/refunds?` made
    `admin adjust` post its body to that receipt's refunds)."""
    if value in ("", ".", ".."):  # a path step, not an id: it would still move the request
        raise SystemExit(f"not an id: {value!r}")
    return urllib.parse.quote(value, safe="")


def _request(ns: argparse.Namespace, method: str, path: str, body: Any = None, *, admin: bool = True) -> Any:
    token = _admin_token(ns) if admin else _api_key(ns)
    if not token:
        raise SystemExit("this command needs --api-key (or TOKENFORGE_API_KEY)")
    url = edge_url(ns)
    try:
        resp = httpx.request(method, url + path, json=body,
                             headers={"authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach the edge at {url}: {exc}. Is `tokenforge up` running? Pass --url "
                         "(or set TF_EDGE_URL) with the edge URL it printed.") from None
    try:
        data = resp.json()
    except ValueError:  # not our JSON (a proxy's page, a plain-text 500): say what came back
        raise SystemExit(f"error {resp.status_code}: {resp.text[:300]}") from None
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise SystemExit(f"error {resp.status_code} {err.get('code')}: {err.get('message')}")
    return data


def _print(ns: argparse.Namespace, data: Any, text: str | None = None) -> None:
    if ns.json or text is None:
        print(json.dumps(data, indent=2))
    else:
        print(text)


def _balances_text(data: dict[str, Any]) -> str:
    lines = [f"account {data['id']} ({data['name']})", f"{'bucket':8} {'unit':7} {'balance':>18} {'held':>18} {'available':>18}"]
    for name, b in data["buckets"].items():
        lines.append(f"{name:8} {b['unit']:7} {b['balance']:>18} {b['held']:>18} {b['available']:>18}")
    return "\n".join(lines)


def _bucket_line(data: dict[str, Any]) -> str:
    b = data["balance"]
    return f"{data['bucket']} now: balance {b['balance']}  held {b['held']}  available {b['available']} {b['unit']}"


def _refund_text(data: dict[str, Any]) -> str:
    r = data["receipt"]
    return "\n".join([
        f"{'replayed: ' if data['replayed'] else ''}refund {data['id']}: {data['amount']} {data['unit']} "
        f"back to {data['account_id']}/{data['bucket']} from receipt {data['receipt_id']}",
        f"receipt collected {r['amount']}, refunded {r['refunded']}, refundable {r['refundable']}",
        _bucket_line(data),
    ])


def _adjustment_text(data: dict[str, Any]) -> str:
    sign = "+" if data["direction"] == "credit" else "-"
    return "\n".join([
        f"{'replayed: ' if data['replayed'] else ''}adjustment {data['id']}: {data['direction']} "
        f"{sign}{data['amount']} {data['unit']} on {data['account_id']}/{data['bucket']} ({data['reason']})",
        _bucket_line(data),
    ])


def run_admin(ns: argparse.Namespace) -> int:
    cmd = ns.admin_command
    if cmd == "account" and ns.action == "create":
        data = _request(ns, "POST", "/admin/v1/accounts", {"name": ns.name})
        _print(ns, data, f"created account {data['id']}")
    elif cmd in ("account", "balances"):
        data = _request(ns, "GET", f"/admin/v1/accounts/{_seg(ns.account_id)}")
        _print(ns, data, _balances_text(data))
    elif cmd == "topup":
        body = {"bucket": ns.bucket, "amount": ns.amount, "idempotency_key": ns.idempotency_key or uuid.uuid4().hex}
        data = _request(ns, "POST", f"/admin/v1/accounts/{_seg(ns.account_id)}/topups", body)
        _print(ns, data, _balances_text(data))
    elif cmd == "refund":
        body = {"amount": ns.amount, "idempotency_key": ns.idempotency_key}
        if ns.reason is not None:
            body["reason"] = ns.reason
        data = _request(ns, "POST", f"/admin/v1/receipts/{_seg(ns.receipt_id)}/refunds", body)
        _print(ns, data, _refund_text(data))
    elif cmd == "adjust":
        body = {"bucket": ns.bucket, "amount": ns.amount, "direction": ns.direction, "reason": ns.reason,
                "idempotency_key": ns.idempotency_key}
        data = _request(ns, "POST", f"/admin/v1/accounts/{_seg(ns.account_id)}/adjustments", body)
        _print(ns, data, _adjustment_text(data))
    elif cmd == "key" and ns.action == "create":
        limits: dict[str, dict[str, str]] = {}
        for bucket in ("wallet", "credit"):
            for period in ("daily", "total"):
                value = getattr(ns, f"{bucket}_{period}")
                if value:
                    limits.setdefault(bucket, {})[period] = value
        body = {"account_id": ns.account, "name": ns.name, "route_policy": ns.route_policy,
                "allowed_models": [m for m in ns.allowed_models.split(",") if m], "limits": limits}
        data = _request(ns, "POST", "/admin/v1/keys", body)
        _print(ns, data, f"created key {data['id']} ({data['route_policy']})\nsecret (shown once): {data['key']}")
    elif cmd == "key" and ns.action == "revoke":
        data = _request(ns, "POST", f"/admin/v1/keys/{_seg(ns.key_id)}/revoke")
        _print(ns, data, f"revoked key {data['id']}")
    elif cmd == "key" and ns.action == "list":
        data = _request(ns, "GET", f"/admin/v1/keys?account_id={_seg(ns.account)}")
        rows = [f"{k['id']:20} {k['name']:20} {k['route_policy']:7} {'revoked' if k['revoked'] else 'active'}" for k in data["data"]]
        _print(ns, data, "\n".join(rows) or "no keys")
    elif cmd == "audit":
        data = _request(ns, "GET", "/admin/v1/audit")
        _print(ns, data, ("ok" if data["ok"] else "PROBLEMS:\n" + "\n".join(data["problems"])) + f" ({data['accounts_checked']} account{'' if data['accounts_checked'] == 1 else 's'} checked)")
        return 0 if data["ok"] else 1
    elif cmd == "statement":
        data = _request(ns, "GET", f"/admin/v1/accounts/{_seg(ns.account_id)}/statement?limit={ns.limit}&after={urllib.parse.quote(str(ns.after), safe='')}")
        head = f"{'at':32} {'kind':12} {'bucket':7} {'amount':>18} {'balance':>18} receipt"
        rows = [f"{e['at']:32} {e['kind']:12} {e['bucket'] or '':7} {e['amount']:>18} {e['balance']:>18} {e['receipt_id'] or ''}" for e in data["data"]]
        _print(ns, data, "\n".join([head, *rows]) if rows else "no entries")
    return 0


_ATTEMPT_COLUMNS = (  # (header, field, right-aligned)
    ("#", "n", True), ("channel", "channel", False), ("role", "role", False),
    ("route", "route", False), ("upstream model", "upstream_model", False),
    ("outcome", "outcome", False), ("ms", "duration_ms", True), ("charged", "charged", True),
)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _attempt_rows(attempts: list[dict[str, Any]]) -> list[str]:
    """The attempt chain as a table whose columns are as wide as their longest cell, so a
    long channel or upstream model name does not push the rest out of line."""
    cells = [[_cell(a.get(field)) for _, field, _ in _ATTEMPT_COLUMNS] for a in attempts]
    widths = [max([len(head)] + [len(row[i]) for row in cells]) for i, (head, _, _) in enumerate(_ATTEMPT_COLUMNS)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                        for v, w, (_, _, right) in zip(values, widths, _ATTEMPT_COLUMNS, strict=True)).rstrip()

    rows = [line([head for head, _, _ in _ATTEMPT_COLUMNS])]
    for a, row in zip(attempts, cells, strict=True):
        rows.append(line(row))
        if a.get("error"):
            rows.append(f"   └ {a['error']}")
    return rows


def _fallback_line(fb: dict[str, Any]) -> str:
    if fb.get("primary_price_amount") is None:  # nothing was rated: no answer to compare
        return f"fallback from {fb['primary_channel']}: a backup was tried; no answer was priced"
    extra = fb.get("extra_cost")
    return (f"fallback from {fb['primary_channel']}: primary would have cost {fb['primary_price_amount']} "
            f"{fb['primary_unit']}, extra " + (extra if extra is not None else "n/a (paid in another unit)"))


def receipt_text(r: dict[str, Any]) -> str:
    lines = [
        f"receipt {r['id']}  {r['status']}  {r.get('created_at', '')}",
        f"key {r['key']['id']} ({r['key']['name']})  account {r['account_id']}  policy {r['route_policy']}",
        f"model asked {r['requested_model']}  trace {r['trace_id']}",
    ]
    if r.get("run"):
        lines.append(f"run {r['run']['id']}  step {r['run'].get('step') or '-'}")
    lines.extend(_attempt_rows(r["attempts"]))
    u = r.get("usage")
    if u:
        lines.append(f"tokens in {u['input_tokens']} (cached {u['cached_input_tokens']}) out {u['output_tokens']}  [{r.get('usage_source') or 'upstream'}]")
    if r.get("price"):
        p = r["price"]
        lines.append(f"price per 1M: input {p['input']} output {p['output']} cached {p['cached_input']} {p['unit']}")
    lines.append(f"amount {r['amount']} {r.get('unit') or ''} from {r.get('bucket') or '-'}  held {r.get('held')}  released {r.get('released')}  uncollected {r.get('uncollected')}")
    if r.get("refunded") not in (None, "0"):
        lines.append(f"refunded {r['refunded']} {r.get('unit') or ''}")
    fb = r.get("fallback") or {}
    if fb.get("used"):
        lines.append(_fallback_line(fb))
    error = r.get("error")
    if isinstance(error, dict):  # why the request has no charge of its own (e.g. `unsettled`)
        lines.append(f"error {error.get('code') or '-'}: {error.get('message') or ''}")
    return "\n".join(lines)


def show_receipt(ns: argparse.Namespace) -> int:
    """As the key (it sees its own receipts) or as the admin (any receipt). A flag given wins
    over the environment: an admin who exported their own key reads any receipt with
    --admin-token; with neither flag, an exported key is used before the admin token."""
    if ns.api_key and ns.admin_token:
        raise SystemExit("tokenforge receipt: pass --api-key or --admin-token, not both")
    if ns.api_key or (not ns.admin_token and _api_key(ns)):
        data = _request(ns, "GET", f"/v1/receipts/{_seg(ns.id)}", admin=False)
    else:
        data = _request(ns, "GET", f"/admin/v1/receipts/{_seg(ns.id)}")
    # a receipt carries client and upstream text (step, key name, error messages): made printable
    _print(ns, data, printable_lines(receipt_text(data)))
    return 0


def show_run_report(ns: argparse.Namespace) -> int:
    from tokenforge.report import report_text

    if ns.admin_token and not ns.api_key:
        # Not silently swapped for an exported key: say what reads a run.
        raise SystemExit("tokenforge run report: a run is read with the API key that owns it; the admin "
                         "token cannot read runs. Pass --api-key (default $TOKENFORGE_API_KEY).")
    data = _request(ns, "GET", f"/v1/runs/{_seg(ns.id)}", admin=False)
    _print(ns, data, report_text(data))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
