"""The OpenAI response bodies: whole answers, and the chunks of a stream (`chat.completion.chunk`, ...)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "text"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Shape:
    """Builds one response's bodies; `chat` for /v1/chat/completions, `text` for /v1/completions."""

    kind: Kind
    model: str
    fingerprint: str | None = None
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if streaming and self.kind == "chat" else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def chunk(
        self, index: int, *, text: str | None = None, finish_reason: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(streaming=True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._envelope(streaming=True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def complete(
        self, texts: dict[int, str], finish_reasons: dict[int, str], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        choices = []
        for index in sorted(finish_reasons):
            choice: dict[str, Any] = {"index": index}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": texts.get(index, ""), "refusal": None}
            else:
                choice["text"] = texts.get(index, "")
            choices.append({**choice, "logprobs": None, "finish_reason": finish_reasons[index]})
        return {**self._envelope(streaming=False), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
