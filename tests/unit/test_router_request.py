"""The router's request validation and what it sends upstream (pure)."""

from __future__ import annotations

import json

import pytest

from tokenforge.errors import TFError
from tokenforge.router.request import parse_chat_request, upstream_body


def _req(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(json.dumps(body).encode())


def test_both_output_caps_given_the_smaller_binds_and_is_all_upstream_sees() -> None:
    req = _req(max_completion_tokens=1, max_tokens=4000)
    assert req.max_tokens == 1
    body = upstream_body(req, "up", 4096)
    assert body["max_tokens"] == body["max_completion_tokens"] == 1


def test_no_cap_given_gets_the_model_cap_and_streams_always_ask_for_usage() -> None:
    req = _req(stream=True)
    body = upstream_body(req, "up-model", 4096)
    assert body["max_tokens"] == 4096 and body["model"] == "up-model"
    assert body["stream_options"] == {"include_usage": True}
    assert req.include_usage is False  # the client did not ask: it will not get the usage chunk


def test_tool_schemas_count_in_the_quote() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    req = _req(tools=tools)
    assert len(req.quote_json) > len(req.messages_json)
    assert json.loads(json.loads(req.quote_json)[-1]["content"])["tools"] == tools


@pytest.mark.parametrize(("raw", "param"), [
    (b"{", None), (b"[]", None), (b'{"messages": []}', "model"),
    (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
])
def test_bad_bodies_name_the_field(raw: bytes, param: str | None) -> None:
    with pytest.raises(TFError) as info:
        parse_chat_request(raw)
    assert info.value.code == "invalid_request" and info.value.param == param
