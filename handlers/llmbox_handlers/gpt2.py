"""GPT-2: one fused attention projection (`c_attn`) and Conv1D layers, which peft handles by name."""

from llmbox_handlers.base import CHATML_TEMPLATE, Handler

HANDLER = Handler(
    name="gpt2",
    model_types=("gpt2",),
    target_modules=("c_attn", "c_proj", "c_fc"),
    chat_template=CHATML_TEMPLATE,
    # GPT-2's learned position table has 1024 rows; past that there is nothing to attend with.
    max_seq_length=1024,
    supports_flash_attention=False,
)
