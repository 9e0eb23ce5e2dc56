"""What a model-family handler says about its family. Pure data: no torch, importable on the host."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# ChatML: the template most small instruction models use, and a safe default for models without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Handler:
    """One model family's training preferences.

    `target_modules=None` means every linear layer except the output head (the generic rule).
    `max_seq_length` caps the training sequence length; the planner takes the smaller of it and
    the model's own `max_position_embeddings`.
    """

    name: str
    model_types: tuple[str, ...]
    target_modules: tuple[str, ...] | None
    chat_template: str = CHATML_TEMPLATE
    prefers_bf16: bool = False
    supports_flash_attention: bool = True
    supports_gradient_checkpointing: bool = True
    max_seq_length: int = 4096
    multimodal: bool = False

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")) in self.model_types


@dataclass(frozen=True)
class HandlerMatch:
    handler: Handler
    reason: str
