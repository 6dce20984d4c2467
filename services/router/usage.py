"""Reading an upstream's usage report into our usage shape (pure)."""

from __future__ import annotations

from typing import Any

from tokenforge.router.upstream import AttemptFailed


def usage_from_openai(raw: Any) -> dict[str, int] | None:
    """OpenAI `usage` → {input_tokens, output_tokens, cached_input_tokens, reasoning_tokens}.

    None when the upstream reported no usage; AttemptFailed(bad_response) when it reported
    one we cannot read. Contradictions (cached > input, …) are judged by metering's Rate.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AttemptFailed("bad_response", "upstream `usage` is not an object", 200, upstream_may_bill=True)
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if prompt is None and completion is None:
        return None
    details_in = raw.get("prompt_tokens_details") or {}
    details_out = raw.get("completion_tokens_details") or {}
    values = {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cached_input_tokens": details_in.get("cached_tokens", 0) if isinstance(details_in, dict) else None,
        "reasoning_tokens": details_out.get("reasoning_tokens", 0) if isinstance(details_out, dict) else None,
    }
    for name, value in values.items():
        if value is None:
            values[name] = 0
        elif isinstance(value, bool) or not isinstance(value, int):
            raise AttemptFailed("bad_response", f"upstream usage `{name}` is not an integer", 200, upstream_may_bill=True)
    return values  # type: ignore[return-value]


def usage_from_openai_or_none(raw: Any) -> dict[str, int] | None:
    """The upstream's usage, or None when it sent none or one that cannot be billed (a
    stream's output is delivered already: it is then counted locally instead)."""
    try:
        return usage_from_openai(raw)
    except AttemptFailed:
        return None


def message_text(choices: Any) -> str:
    """All text the upstream generated in a non-streaming answer (for local counting)."""
    parts: list[str] = []
    for choice in choices or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                parts.append(str(fn.get("name", "")) + str(fn.get("arguments", "")))
    return "".join(parts)


def delta_text(choices: Any) -> str:
    """The text in one streaming chunk's deltas."""
    parts: list[str] = []
    for choice in choices or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str):
            parts.append(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


def openai_usage(usage: dict[str, int]) -> dict[str, int]:
    """Our usage in OpenAI's shape, for a client whose upstream reported none: what we
    billed (counted locally; the receipt says `estimated`)."""
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["input_tokens"] + usage["output_tokens"],
    }
