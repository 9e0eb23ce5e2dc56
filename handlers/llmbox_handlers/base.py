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
    `multimodal` families train on images too; `language_model_pattern` is then the regex (peft matches it
    against whole module paths) of the language model's modules, so LoRA never lands on the vision tower or
    the projector, whose layers carry the same names (`q_proj`, `fc1`, ...): see `vision_lora_targets`.
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
    language_model_pattern: str = r".*\.language_model\..*"

    def takes_images(self, config: Mapping[str, Any]) -> bool:
        """A multimodal family, and this model has its vision tower (a `vision_config`)."""
        return self.multimodal and isinstance(config.get("vision_config"), dict)

    def vision_lora_targets(self, target_modules: tuple[str, ...] | None) -> str:
        """peft's `target_modules` as one regex: the planned modules, inside the language model only."""
        names = "|".join(target_modules) if target_modules else r"[^.]*_proj|fc\d|c_\w+|dense\w*"
        return rf"{self.language_model_pattern}\.({names})"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")) in self.model_types


@dataclass(frozen=True)
class HandlerMatch:
    handler: Handler
    reason: str
