"""The one form every dataset format becomes: a conversation, or raw text for text-generation data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Task = Literal["instruction", "text-generation"]
ROLES = ("system", "user", "assistant")
# Where an image sits in a message's text (LLaVA's convention); images without one go to the first user turn.
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Origin:
    """Where an example came from, for error messages and the data report."""

    path: str
    record: int  # 1-based


@dataclass(frozen=True)
class Example:
    """A training example.

    Conversations (`messages`) train on assistant turns only. Text examples (`text`) train on all of
    `text`; an optional `prompt` is context that precedes it without being trained on (completion data).
    `images` are absolute paths (or `data:` URLs), in the order of the conversation's IMAGE_PLACEHOLDERs
    (vision data); a conversation without placeholders shows them all at the start of its first user turn.
    """

    format: str
    origin: Origin
    messages: tuple[Message, ...] = ()
    text: str | None = None
    prompt: str | None = None
    images: tuple[str, ...] = field(default=())

    @property
    def task(self) -> Task:
        return "text-generation" if self.text is not None else "instruction"

    def content(self) -> tuple[object, ...]:
        """What makes two examples duplicates: equal for exact duplicates, whatever file or format they came from."""
        return tuple((m.role, m.content) for m in self.messages), self.text, self.prompt, self.images

    def content_key(self) -> str:
        """`content()` as a stable digest (the same in every process, unlike `hash`)."""
        payload = json.dumps(self.content(), ensure_ascii=False)
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def examples_digest(examples: Sequence[Example]) -> str:
    """The examples' contents, in order, as one digest: equal on two machines only when they read the same data."""
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(example.content_key().encode())
    return digest.hexdigest()
