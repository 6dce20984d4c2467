"""`tokenforge receipt`'s text: the attempt chain stays a table whatever the names' lengths."""

from tokenforge.admin_cli import receipt_text


def _receipt(attempts: list[dict]) -> dict:
    return {
        "id": "rcpt_1", "status": "settled", "created_at": "2026-12-04T00:00:00Z",
        "key": {"id": "key_1", "name": "ci"}, "account_id": "acct_1", "route_policy": "auto",
        "requested_model": "gpt-4o-mini", "trace_id": "ab" * 16, "attempts": attempts,
        "usage": None, "price": None, "amount": "0.000126", "unit": "CNY", "bucket": "wallet",
        "held": "0.01", "released": "0.009874", "uncollected": "0", "refunded": "0",
        "fallback": {"used": False}, "error": None,
    }


def _attempt(n: int, channel: str, model: str, outcome: str, charged: str, ms: int | None) -> dict:
    return {"n": n, "channel": channel, "role": "primary" if n == 1 else "backup", "route": "routed",
            "upstream_model": model, "outcome": outcome, "duration_ms": ms, "charged": charged}


def test_long_names_widen_their_column_and_every_row_stays_aligned():
    long_model = "qwen2.5-72b-instruct-awq-int4-with-a-very-long-deployment-name"
    text = receipt_text(_receipt([
        _attempt(1, "a-channel-whose-name-is-long", long_model, "timeout", "0", 30012) | {"error": "no answer in 30 s"},
        _attempt(2, "cheap-b", "gpt-4o-mini", "ok", "0.000126", 4),
    ]))
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#  channel"))
    header, first, error, second = lines[head:head + 4]
    assert error == "   └ no answer in 30 s"
    # each column starts where its header starts, in every row
    for column in ("role", "route", "upstream model", "outcome"):
        at = header.index(column)
        assert first[at - 1] == " " and first[at] != " ", (column, first)
        assert second[at - 1] == " " and second[at] != " ", (column, second)
    assert first[header.index("upstream model"):].startswith(long_model + " ")
    # right-aligned columns end where their header ends
    assert len(header) == len(first) == len(second)
    assert second.endswith(" 0.000126") and first.endswith(" 0")
    assert header.endswith("charged")


def test_a_missing_duration_and_model_print_a_dash():
    text = receipt_text(_receipt([_attempt(1, "cheap-a", "", "connect_error", "0", None)]))
    row = text.splitlines()[4]
    assert row.split() == ["1", "cheap-a", "primary", "routed", "-", "connect_error", "-", "0"]


def test_the_fallback_line_never_prints_none():
    crossed = _receipt([_attempt(1, "cheap-a", "m", "timeout", "0", 10), _attempt(2, "official", "m", "success", "0.00001575", 5)])
    crossed["fallback"] = {"used": True, "primary_channel": "cheap-a", "primary_unit": "CNY",
                           "primary_price_amount": "0.000056", "extra_cost": None}
    line = next(x for x in receipt_text(crossed).splitlines() if x.startswith("fallback"))
    assert line == "fallback from cheap-a: primary would have cost 0.000056 CNY, extra n/a (paid in another unit)"

    failed = _receipt([_attempt(1, "cheap-a", "m", "http_error", "0", 3), _attempt(2, "cheap-b", "m", "http_error", "0", 3)])
    failed["fallback"] = {"used": True, "primary_channel": "cheap-a", "primary_unit": "CNY",
                          "primary_price_amount": None, "extra_cost": None}
    text = receipt_text(failed)
    assert "None" not in text
    assert "fallback from cheap-a: a backup was tried; no answer was priced" in text

    same = _receipt([_attempt(2, "cheap-b", "m", "success", "0.002880", 5)])
    same["fallback"] = {"used": True, "primary_channel": "cheap-a", "primary_unit": "CNY",
                        "primary_price_amount": "0.002160", "extra_cost": "0.000720"}
    assert "fallback from cheap-a: primary would have cost 0.002160 CNY, extra 0.000720" in receipt_text(same)
