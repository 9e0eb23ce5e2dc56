"""Rendering image conversations for a multimodal model: token ids, loss masks, and the images to batch.

The model's processor (AutoProcessor) does the family-specific part: its chat template places each image
marker, and calling it with the images expands each marker into the image's tokens (one per patch for LLaVA,
`mm_tokens_per_image` soft tokens for Gemma 3). The loss mask is found the dependable way: for each assistant
turn, the conversation before it is rendered with the generation prompt and tokenized with its images, and
everything up to that length is masked. (`return_assistant_tokens_mask` would need `{% generation %}` markers
that most templates lack; without them it gives an all-zero mask and a NaN loss with only a warning.) Image
tokens are never trainable, whatever the template does.

Images are decoded again when a batch is built (`VisionCollator`), not kept as pixels: a 896-pixel Gemma
image is 9.6 MB of float32, far too much to hold for a whole dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from llmbox.errors import DataError
from llmbox_engine.data.batching import padded_batch
from llmbox_engine.data.canonical import IMAGE_PLACEHOLDER, Example, Message
from llmbox_engine.data.images import load_image
from llmbox_engine.data.render import TokenizedExample

# tokenizer attributes naming image tokens (LLaVA: image_token; Gemma 3: boi/eoi and image soft tokens)
IMAGE_TOKEN_ATTRIBUTES = ("image_token", "boi_token", "eoi_token")


@dataclass(frozen=True)
class VisionExample(TokenizedExample):
    """A tokenized example whose image tokens are already expanded, with the images they stand for."""

    images: tuple[str, ...] = ()


def chat_messages(messages: Sequence[Message], n_images: int) -> list[dict[str, Any]]:
    """OpenAI-style list content: each IMAGE_PLACEHOLDER becomes an image part.

    Images without placeholders go, in order, to the start of the first user turn.
    """
    placed = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    leading = n_images if placed == 0 else 0
    out: list[dict[str, Any]] = []
    for message in messages:
        parts: list[dict[str, Any]] = []
        if leading and message.role == "user":
            parts += [{"type": "image"}] * leading
            leading = 0
        pieces = message.content.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": message.role, "content": parts})
    return out


def image_count(messages: list[dict[str, Any]]) -> int:
    """How many image parts `chat_messages` placed in these messages."""
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def image_token_ids(processor: Any) -> frozenset[int]:
    tokenizer = processor.tokenizer
    ids = set()
    for attribute in IMAGE_TOKEN_ATTRIBUTES:
        token = getattr(tokenizer, attribute, None) if hasattr(tokenizer, attribute) else None
        if isinstance(token, str):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        ids.add(token_id)
    return frozenset(ids)


T = TypeVar("T", bound=TokenizedExample)


def cut_to(example: Example, tokenized: T, limit: int, image_ids: frozenset[int]) -> T:
    """`tokenized` (rendered from `example`) cut to `limit` tokens; an image is never cut: a DataError instead."""
    ids = tokenized.input_ids
    if len(ids) <= limit:
        return tokenized
    if image_ids and np.isin(ids[limit:], list(image_ids)).any():
        raise DataError(
            example.origin.path,
            f"{len(ids)} tokens with its images, past the {limit}-token limit, and a cut there "
            "would split an image: shorten the text or raise --max-seq-length",
            record=example.origin.record,
        )
    return dataclasses.replace(tokenized, input_ids=ids[:limit], trainable=tokenized.trainable[:limit], truncated=True)


class VisionRenderer:
    def __init__(self, processor: Any, chat_template: str | None, max_seq_length: int) -> None:
        self.processor = processor
        self.chat_template = chat_template or getattr(processor, "chat_template", None)
        if not self.chat_template:
            raise DataError("(model)", "the model's processor has no chat template to place images with")
        self.max_seq_length = max_seq_length
        self.image_ids = image_token_ids(processor)

    def _text(self, example: Example, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            text: str = self.processor.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja's raise_exception() and template errors
            raise DataError(
                example.origin.path, f"the chat template refused this conversation: {exc}", record=example.origin.record
            ) from None
        return text

    def _ids(self, example: Example, text: str, images: list[Any]) -> np.ndarray:
        try:
            encoded = self.processor(
                text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="np"
            )
        except Exception as exc:  # a placeholder the template dropped, an image the processor refuses
            raise DataError(
                example.origin.path, f"the processor refused this example: {exc}", record=example.origin.record
            ) from None
        return np.asarray(encoded["input_ids"][0], dtype=np.int32)

    def render(self, example: Example) -> VisionExample:
        images = [load_image(ref) for ref in example.images]
        messages = chat_messages(example.messages, len(images))
        ids = self._ids(example, self._text(example, messages, False), images)
        trainable = np.zeros(len(ids), dtype=bool)
        for i, message in enumerate(example.messages):
            if message.role != "assistant":
                continue
            before = messages[:i]
            shown = image_count(before)
            start = len(self._ids(example, self._text(example, before, True), images[:shown]))
            end = len(ids)
            if i < len(example.messages) - 1:
                end = len(self._ids(example, self._text(example, messages[: i + 1], False), images[:shown]))
            trainable[start:end] = True
        if self.image_ids:
            trainable &= ~np.isin(ids, list(self.image_ids))
        return self._truncate(example, ids, trainable)

    def _truncate(self, example: Example, ids: np.ndarray, trainable: np.ndarray) -> VisionExample:
        rendered = VisionExample(ids, trainable, images=example.images)
        return cut_to(example, rendered, self.max_seq_length, self.image_ids)

    def tokenize(self, examples: Sequence[Example]) -> list[VisionExample]:
        return [self.render(e) for e in examples]


class VisionCollator:
    """Padded token batches plus the images' pixel values (and Gemma 3's token types), decoded per batch."""

    def __init__(self, processor: Any, pad_token_id: int) -> None:
        self.processor = processor
        self.pad_token_id = pad_token_id
        self.token_type_ids = "token_type_ids" in getattr(processor, "model_input_names", ())
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(
            getattr(processor.tokenizer, "image_token", None) or getattr(processor, "image_token", "<image>")
        )

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
        batch = padded_batch(examples, self.pad_token_id, 8)
        refs = [ref for e in examples for ref in getattr(e, "images", ())]
        if refs:
            pixels = self.processor.image_processor(images=[load_image(r) for r in refs], return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"]
        if self.token_type_ids:
            batch["token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch
