"""Rendering examples into token ids and loss masks, with the model's chat template.

Conversations are rendered once in full; the character span of each assistant turn (content and the
end-of-turn marker, so the model learns to stop) is found by rendering the prefix before the turn with
the generation prompt. The template runs once per role signature and is then applied by concatenation
(`compiled_template`). Batched tokenization maps characters to tokens through the offsets, so a long
conversation is tokenized once, not once per turn; for byte-level BPE tokenizers the tokens of repeated
words come from a cache (`token_masks`). Text examples train on every token and end with EOS; completion
examples train on the completion only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmbox.errors import DataError
from llmbox_engine.data.bulk import gc_paused
from llmbox_engine.data.canonical import Example
from llmbox_engine.data.compiled_template import ConversationCompiler
from llmbox_engine.data.token_masks import encoder_for

IGNORE_INDEX = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: np.ndarray  # int32
    trainable: np.ndarray  # bool: this token is a target of the loss
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def labels(self) -> list[int]:
        return np.where(self.trainable, self.input_ids, IGNORE_INDEX).tolist()


@dataclass(frozen=True)
class RenderStats:
    examples: int
    truncated: int
    without_targets: int  # truncation cut every trainable token away
    lengths: np.ndarray

    def summary(self) -> dict[str, Any]:
        lengths = self.lengths if len(self.lengths) else np.zeros(1)
        return {
            "examples": self.examples,
            "tokens": int(lengths.sum()),
            "min": int(lengths.min()),
            "median": int(np.median(lengths)),
            "mean": round(float(lengths.mean()), 1),
            "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "truncated": self.truncated,
            "without_targets": self.without_targets,
        }


def chat_template_for(tokenizer: Any, fallback: str) -> str:
    """The tokenizer's own template, or the handler's fallback for models that ship none."""
    return tokenizer.chat_template or fallback


class Renderer:
    def __init__(self, tokenizer: Any, chat_template: str, max_seq_length: int) -> None:
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_seq_length = max_seq_length
        # the template compiled per role signature: most conversations render without jinja
        self._compiler = ConversationCompiler(self._template, chat_template)
        self._encoder = encoder_for(tokenizer)

    def render(self, example: Example) -> tuple[str, list[Span], bool]:
        """The text to tokenize, the character spans to train on, and whether to add EOS/BOS."""
        if example.images:
            raise DataError(example.origin.path, "image records need a multimodal model", record=example.origin.record)
        if example.text is not None:
            prompt = example.prompt or ""
            return prompt + example.text, [(len(prompt), len(prompt) + len(example.text))], True
        return (*self._render_conversation(example), False)

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _apply(self, example: Example, messages: Sequence[Any], generation_prompt: bool) -> str:
        try:
            return self._template([{"role": m.role, "content": m.content} for m in messages], generation_prompt)
        except Exception as exc:  # jinja's raise_exception() and template errors
            raise DataError(
                example.origin.path,
                f"the chat template refused this conversation: {exc}",
                record=example.origin.record,
            ) from None

    def _render_conversation(self, example: Example) -> tuple[str, list[Span]]:
        return self._compiler.render(example.messages, lambda: self._render_with_jinja(example))

    def _render_with_jinja(self, example: Example) -> tuple[str, list[Span]]:
        messages = example.messages
        full = self._apply(example, messages, False)
        spans: list[Span] = []
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prefix = self._apply(example, messages[:i], True)
            upto = full if i == len(messages) - 1 else self._apply(example, messages[: i + 1], False)
            if not (full.startswith(prefix) and full.startswith(upto)):
                return full, self._spans_by_search(full, example)
            spans.append((len(prefix), len(upto)))
        return full, spans

    def _spans_by_search(self, full: str, example: Example) -> list[Span]:
        """For templates whose prefixes are not prefixes of the whole (some rewrite earlier turns)."""
        spans, cursor = [], 0
        eos = self.tokenizer.eos_token or ""
        for message in example.messages:
            if message.role != "assistant":
                continue
            start = full.find(message.content, cursor)
            if start < 0:
                continue  # the template dropped this turn: nothing to train on
            end = start + len(message.content)
            if eos and full.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
            cursor = end
        return spans

    def tokenize(self, examples: Sequence[Example], chunk_size: int = 512) -> list[TokenizedExample]:
        out: list[TokenizedExample] = []
        with gc_paused():
            for begin in range(0, len(examples), chunk_size):
                chunk = [self.render(e) for e in examples[begin : begin + chunk_size]]
                out.extend(self._tokenize_rendered(chunk))
        return out

    def _tokenize_rendered(self, rendered: list[tuple[str, list[Span], bool]]) -> list[TokenizedExample]:
        results: list[TokenizedExample | None] = [None] * len(rendered)
        for is_text in (False, True):
            indices = [i for i, r in enumerate(rendered) if r[2] == is_text]
            if not indices:
                continue
            encoded = self._encoder.encode(
                [rendered[i][0] for i in indices],
                [rendered[i][1] for i in indices],
                special=is_text,  # chat templates write their own BOS
            )
            for i, (ids, trainable) in zip(indices, encoded, strict=True):
                if is_text and self.tokenizer.eos_token_id is not None:
                    ids = np.append(ids, np.int32(self.tokenizer.eos_token_id))
                    trainable = np.append(trainable, True)
                results[i] = self._truncate(ids, trainable)
        return [r for r in results if r is not None]

    def _truncate(self, ids: np.ndarray, trainable: np.ndarray) -> TokenizedExample:
        if len(ids) <= self.max_seq_length:
            return TokenizedExample(ids, trainable)
        return TokenizedExample(ids[: self.max_seq_length], trainable[: self.max_seq_length], truncated=True)


def render_stats(tokenized: Sequence[TokenizedExample]) -> RenderStats:
    return RenderStats(
        examples=len(tokenized),
        truncated=sum(t.truncated for t in tokenized),
        without_targets=sum(not t.trainable.any() for t in tokenized),
        lengths=np.asarray([len(t) for t in tokenized], dtype=np.int64),
    )
