"""Model-family handlers: which modules to train, which precision, attention and sequence length to use.

Adding a family is one small module with a `HANDLER` and one line in `FAMILY_HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmbox_handlers import gemma3, generic, gpt2, llama, llava, mistral, phi3, qwen
from llmbox_handlers.base import CHATML_TEMPLATE, Handler, HandlerMatch

FAMILY_HANDLERS: tuple[Handler, ...] = (
    llama.HANDLER,
    llama.LLAMA4_HANDLER,
    mistral.HANDLER,
    qwen.HANDLER,
    gemma3.HANDLER,
    llava.HANDLER,
    gpt2.HANDLER,
    phi3.HANDLER,
)
GENERIC = generic.HANDLER


def match_handler(config: Mapping[str, Any]) -> HandlerMatch:
    """The handler for a model's `config.json`, with the reason it was chosen."""
    model_type = str(config.get("model_type", ""))
    for handler in FAMILY_HANDLERS:
        if handler.matches(config):
            return HandlerMatch(handler, f"config.json model_type {model_type!r} belongs to the {handler.name} family")
    shown = repr(model_type) if model_type else "(missing)"
    return HandlerMatch(
        GENERIC,
        f"no family handler for model_type {shown}: generic rules (LoRA on all linear layers but the head)",
    )


def handler_by_name(name: str) -> Handler:
    for handler in (*FAMILY_HANDLERS, GENERIC):
        if handler.name == name:
            return handler
    known = ", ".join(h.name for h in (*FAMILY_HANDLERS, GENERIC))
    raise KeyError(f"unknown handler {name!r} (known: {known})")


__all__ = [
    "CHATML_TEMPLATE",
    "FAMILY_HANDLERS",
    "GENERIC",
    "Handler",
    "HandlerMatch",
    "handler_by_name",
    "match_handler",
]
