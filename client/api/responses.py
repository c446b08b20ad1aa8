"""Response bodies and server-sent events as OpenAI sends them (pure functions).

A non-standard ``stamen`` field (``{"route": [{"peer_id", "public_name", "blocks"}]}``) on the whole
response, or on the streamed chunk that carries the finish reason, names the servers that answered.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"


@dataclass
class Completion:
    """What identifies one response and its chunks."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, usage: dict, route: list[dict]) -> dict:
        """The whole (non-streamed) response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish_reason
        return {**self._head(False), "choices": [choice], "usage": usage, "stamen": {"route": route}}

    def chunk(
        self,
        text: str = "",
        first: bool = False,
        finish_reason: str | None = None,
        route: list[dict] | None = None,
        with_usage: bool = False,
    ) -> dict:
        """A streamed chunk: new text; the chat's first chunk carries the role; the last the finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if finish_reason else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head(True), "choices": [choice]}
        if with_usage:  # stream_options.include_usage: every chunk has usage null, then a last one with counts
            chunk["usage"] = None
        if route is not None:
            chunk["stamen"] = {"route": route}
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "stamen"}


def sse(payload: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
