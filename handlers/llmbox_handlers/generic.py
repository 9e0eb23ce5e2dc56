"""The fallback for families without a handler: LoRA on every linear layer but the output head."""

from llmbox_handlers.base import CHATML_TEMPLATE, Handler

HANDLER = Handler(
    name="generic",
    model_types=(),
    target_modules=None,
    chat_template=CHATML_TEMPLATE,
    supports_flash_attention=False,
    max_seq_length=2048,
)
