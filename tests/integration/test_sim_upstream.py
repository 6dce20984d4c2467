"""The simulated upstream as a real process, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration._procs_metering import ServiceProc, start_sim
from tokenforge.metering import tokens

LOG_WAIT_S = 5.0


@pytest.fixture(scope="module")
def sim() -> Iterator[ServiceProc]:
    proc = start_sim()
    try:
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.fixture
def client(sim: ServiceProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.address + "/v1", api_key="sk-sim", max_retries=0, timeout=10) as c:
        yield c


def prompt(text: str | None = None) -> list[dict[str, str]]:
    """A prompt unique to the test (fault tries are counted per prompt without a request id)."""
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text or uuid.uuid4().hex}]


def sim_log(sim: ServiceProc) -> list[dict[str, Any]]:
    return httpx.get(sim.address + "/sim/log", timeout=5).json()["data"]


def wait_for_log(sim: ServiceProc, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first log entry matching, polling until a deadline (the sim writes it on its own time)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        for entry in sim_log(sim):
            if match(entry):
                return entry
        assert time.monotonic() < deadline, "the simulator never logged the expected request"
        time.sleep(0.02)


def test_health_and_models(sim: ServiceProc, client: openai.OpenAI) -> None:
    assert httpx.get(sim.address + "/health", timeout=5).json() == {"status": "ok"}
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "gpt-4o"} <= ids


def test_completion_usage_is_exact_and_answers_are_deterministic(client: openai.OpenAI) -> None:
    messages = prompt("What moved the market today?")
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    text = first.choices[0].message.content
    assert text and text == second.choices[0].message.content
    assert first.model == "gpt-4o-mini"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.prompt_tokens == tokens.count_messages(messages, "o200k_base")
    assert first.usage.completion_tokens == tokens.count_text(text) == 24
    assert first.usage.total_tokens == first.usage.prompt_tokens + 24
    other = client.chat.completions.create(model="gpt-4o-mini", messages=prompt("Something else"))  # type: ignore[arg-type]
    assert other.choices[0].message.content != text


def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-4o", messages=prompt(), max_tokens=5)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert tokens.count_text(r.choices[0].message.content or "") == 5
    r = client.chat.completions.create(model="gpt-4o", messages=prompt(), max_completion_tokens=24)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"


def collect(stream: Any) -> tuple[list[str], list[Any], Any]:
    pieces, finishes, usage = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        if chunk.usage is not None:
            assert chunk.choices == []  # the usage chunk carries no choices
            usage = chunk.usage
    return pieces, finishes, usage


def test_streaming_with_and_without_usage(client: openai.OpenAI) -> None:
    messages = prompt()
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=10)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_tokens=10, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    pieces, finishes, usage = collect(stream)
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) == 10 and finishes == ["length"]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        plain.usage.prompt_tokens, 10)  # type: ignore[union-attr]
    pieces, finishes, usage = collect(
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))  # type: ignore[arg-type]
    assert usage is None and len(pieces) == 24 and finishes == ["stop"]


def test_stream_wire_format(sim: ServiceProc) -> None:
    body = {"model": "gpt-4o-mini", "messages": prompt(), "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", sim.address + "/v1/chat/completions", json=body, timeout=5) as r:
        assert r.headers["content-type"] == "text/event-stream"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["object"] == "chat.completion.chunk" and "usage" in p for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 2


def test_fail_first_try_then_succeed_per_request_id(client: openai.OpenAI) -> None:
    messages = prompt("same prompt, two requests")
    rid = {"X-TF-Request-Id": uuid.uuid4().hex}
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o-mini+fail=500x1", messages=messages, extra_headers=rid)  # type: ignore[arg-type]
    assert info.value.status_code == 500
    ok = client.chat.completions.create(model="gpt-4o-mini+fail=500x1", messages=messages, extra_headers=rid)  # type: ignore[arg-type]
    assert ok.model == "gpt-4o-mini"  # directives never leak into the response
    # another request id starts counting afresh
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini+fail=500x1", messages=messages,  # type: ignore[arg-type]
                                       extra_headers={"X-TF-Request-Id": uuid.uuid4().hex})


def test_openai_client_retry_recovers_from_a_scripted_500(sim: ServiceProc) -> None:
    # without a request id the tries are counted per prompt: the client's own retry succeeds
    with openai.OpenAI(base_url=sim.address + "/v1", api_key="k", max_retries=1, timeout=10) as c:
        r = c.chat.completions.create(model="gpt-4o-mini+fail=503x1", messages=prompt())  # type: ignore[arg-type]
    assert r.choices[0].message.content


def test_rate_limit_with_retry_after(client: openai.OpenAI) -> None:
    rid = {"X-TF-Request-Id": uuid.uuid4().hex}
    messages = prompt()
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini+rate_limit=1x2", messages=messages, extra_headers=rid)  # type: ignore[arg-type]
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "1"
    assert client.chat.completions.create(model="gpt-4o-mini+rate_limit=1x2", messages=messages, extra_headers=rid)  # type: ignore[arg-type]


def test_status_400_is_a_client_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini+status=400", messages=prompt())  # type: ignore[arg-type]
    assert info.value.status_code == 400


def test_timeout_hangs_until_the_client_gives_up(sim: ServiceProc, client: openai.OpenAI) -> None:
    rid = uuid.uuid4().hex
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(
            model="gpt-4o-mini+timeout", messages=prompt(), extra_headers={"X-TF-Request-Id": rid})  # type: ignore[arg-type]
    assert 0.5 <= time.monotonic() - started < 3
    entry = wait_for_log(sim, lambda e: e["request_id"] == rid)
    assert entry["outcome"] == "client_gave_up"
    # timeout=x1: only the first try hangs
    rid = uuid.uuid4().hex
    messages = prompt()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(
            model="gpt-4o-mini+timeout=x1", messages=messages, extra_headers={"X-TF-Request-Id": rid})  # type: ignore[arg-type]
    assert client.chat.completions.create(
        model="gpt-4o-mini+timeout=x1", messages=messages, extra_headers={"X-TF-Request-Id": rid})  # type: ignore[arg-type]


def test_delay(sim: ServiceProc, client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.chat.completions.create(model="gpt-4o-mini+delay_ms=200", messages=prompt())  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.2
    # a client that stops waiting is noticed during the delay, not after it
    rid = uuid.uuid4().hex
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(
            model="gpt-4o-mini+delay_ms=5000", messages=prompt(), extra_headers={"X-TF-Request-Id": rid})  # type: ignore[arg-type]
    entry = wait_for_log(sim, lambda e: e["request_id"] == rid)
    assert entry["outcome"] == "client_gave_up" and entry["duration_ms"] < 2000


def test_no_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-4o-mini+no_usage", messages=prompt())  # type: ignore[arg-type]
    assert r.usage is None and r.choices[0].message.content
    _, _, usage = collect(client.chat.completions.create(
        model="gpt-4o-mini+no_usage", messages=prompt(), stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    assert usage is None


def test_break_after_closes_the_stream_abruptly(sim: ServiceProc, client: openai.OpenAI) -> None:
    rid = uuid.uuid4().hex
    pieces: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini+break_after=3", messages=prompt(), stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_headers={"X-TF-Request-Id": rid},
        ):
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert len([p for p in pieces if p]) == 3
    assert tokens.count_text("".join(pieces)) == 3  # one token per chunk
    entry = wait_for_log(sim, lambda e: e["request_id"] == rid)
    assert (entry["outcome"], entry["chunks_sent"]) == ("broken", 3)


def test_respond_model_cached_and_reasoning(client: openai.OpenAI) -> None:
    messages = prompt("a long enough prompt " * 30)
    r = client.chat.completions.create(
        model="gpt-4o-mini+respond_model=gpt-4o-mini-2024-07-18+cached=64+reasoning=8",  # type: ignore[arg-type]
        messages=messages, max_tokens=10)
    assert r.model == "gpt-4o-mini-2024-07-18"
    assert r.usage is not None
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 64
    assert r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 8
    assert r.usage.completion_tokens == 10 + 8  # reasoning is part of the completion tokens
    assert tokens.count_text(r.choices[0].message.content or "") == 10


def test_fault_header_and_bad_directives(sim: ServiceProc, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="gpt-4o", messages=prompt(), extra_headers={"X-Sim-Fault": "respond_model=x-1; cached=3"})  # type: ignore[arg-type]
    assert r.model == "x-1" and r.usage.prompt_tokens_details.cached_tokens == 3  # type: ignore[union-attr]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=prompt(), extra_headers={"X-Sim-Fault": "fail=502"})  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o+explode", messages=prompt())  # type: ignore[arg-type]
    assert "unknown sim directive `explode`" in str(info.value)
    bad = httpx.post(sim.address + "/v1/chat/completions", content=b"{nope", timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_client_going_away_mid_stream_stops_the_stream(sim: ServiceProc, client: openai.OpenAI) -> None:
    rid = uuid.uuid4().hex
    stream = client.chat.completions.create(
        model="gpt-4o-mini+chunk_delay_ms=50", messages=prompt(), stream=True,  # type: ignore[arg-type]
        extra_headers={"X-TF-Request-Id": rid})
    received = 0
    for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received == 2:
            break
    stream.close()
    entry = wait_for_log(sim, lambda e: e["request_id"] == rid)
    assert entry["outcome"] == "client_gave_up"
    assert 2 <= entry["chunks_sent"] <= 3
    assert entry["duration_ms"] < 1000


async def _load(url: str, total: int, concurrency: int) -> float:
    """Keep-alive clients on raw sockets: the sim, not the client, should be the limit."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-4o-mini", "messages": prompt("load")}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(n):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency))), timeout=60)
    return total / (time.perf_counter() - started)


async def test_throughput(sim: ServiceProc) -> None:
    rate = await _load(sim.address, 4000, 32)
    print(f"\nsim-upstream: {rate:.0f} req/s (32 keep-alive clients in this process)")
    assert rate > 1000


def test_sigterm_stops_promptly_despite_hanging_requests() -> None:
    proc = start_sim()
    try:
        def hang() -> None:
            try:
                httpx.post(proc.address + "/v1/chat/completions", timeout=30,
                           json={"model": "gpt-4o-mini+timeout", "messages": prompt()})
            except httpx.HTTPError:
                pass  # the server closing the hanging request is the point

        hanging = threading.Thread(target=hang, daemon=True)
        hanging.start()
        wait_until = time.monotonic() + LOG_WAIT_S
        while httpx.get(proc.address + "/sim/log", timeout=5).json()["requests_total"] < 1:
            assert time.monotonic() < wait_until
            time.sleep(0.02)
        started = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - started < 5
        hanging.join(5)
        assert not hanging.is_alive()
    finally:
        proc.stop()
