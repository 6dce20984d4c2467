"""What the client gets of each upstream chunk (pure)."""

from __future__ import annotations

import json

from tokenforge.router.request import parse_chat_request
from tokenforge.router.stream_state import StreamState


def _req(include_usage: bool):
    body = {"model": "catalog-name", "stream": True, "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": include_usage}}
    return parse_chat_request(json.dumps(body).encode())


CHUNK = {"model": "upstream-name", "choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None}
USAGE = {"model": "upstream-name", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def test_the_usage_chunk_reaches_only_a_client_that_asked() -> None:
    quiet, asked = StreamState(), StreamState()
    assert json.loads(quiet.take(dict(CHUNK), _req(False))) == {"model": "catalog-name", "choices": CHUNK["choices"]}
    assert quiet.take(dict(USAGE), _req(False)) is None
    assert quiet.usage_raw == USAGE["usage"]  # billed all the same
    assert json.loads(asked.take(dict(USAGE), _req(True)))["usage"] == USAGE["usage"]


def test_text_and_the_answering_model_are_kept_for_the_receipt() -> None:
    state = StreamState()
    state.take(dict(CHUNK), _req(False))
    state.take({"model": "upstream-name", "choices": [{"index": 0, "delta": {"content": "lo"}}]}, _req(False))
    assert state.text() == "Hello" and state.response_model == "upstream-name"
