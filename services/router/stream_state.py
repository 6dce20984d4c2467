"""What has passed through a stream so far, and what the client gets of each chunk (pure)."""

from __future__ import annotations

from typing import Any

from tokenforge import jsonfast
from tokenforge.router.request import ChatRequest
from tokenforge.router.usage import delta_text, openai_usage


class StreamState:
    MAX_TEXT_CHARS = 4_000_000  # text kept for local counting; beyond it the stream still flows

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.usage_raw: Any = None
        self.response_model: str | None = None
        self.broken: str | None = None
        self.chunk_id: Any = None  # the upstream's chunk id and time, for a usage chunk of ours
        self.created: Any = None
        self.estimated_usage: dict[str, int] | None = None  # counted locally when the upstream gave none

    def text(self) -> str:
        return "".join(self.parts)

    def take(self, event: dict[str, Any], req: ChatRequest) -> bytes | None:
        """Record one upstream chunk; return what the client gets (None: nothing)."""
        if event.get("usage"):
            self.usage_raw = event["usage"]
        model = event.get("model")
        if isinstance(model, str):
            self.response_model = model
        if self.chunk_id is None:
            self.chunk_id, self.created = event.get("id"), event.get("created")
        choices = event.get("choices")
        piece = delta_text(choices)
        if piece and self.chars < self.MAX_TEXT_CHARS:
            self.parts.append(piece)
            self.chars += len(piece)
        if not choices and event.get("usage") is not None and not req.include_usage:
            return None  # upstream usage is always asked for; the client gets it only if it asked
        if not req.include_usage:
            event.pop("usage", None)
        event["model"] = req.model
        return jsonfast.dumps(event)

    def usage_chunk(self, req: ChatRequest, usage: dict[str, int]) -> bytes:
        """The final usage chunk a client that asked for one gets when the upstream sent none."""
        return jsonfast.dumps({
            "id": self.chunk_id, "object": "chat.completion.chunk", "created": self.created,
            "model": req.model, "choices": [], "usage": openai_usage(usage),
        })
