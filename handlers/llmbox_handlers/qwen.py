"""Qwen2, Qwen2.5 and Qwen3 (dense): Llama-style projections, ChatML turns."""

from llmbox_handlers.base import CHATML_TEMPLATE, Handler
from llmbox_handlers.llama import LLAMA_PROJECTIONS

HANDLER = Handler(
    name="qwen",
    model_types=("qwen2", "qwen3"),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=CHATML_TEMPLATE,
    max_seq_length=8192,
)
