"""Phi-3 and Phi-3.5 (and Phi-4 mini): fused qkv and gate/up projections."""

from llmbox_handlers.base import Handler

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

HANDLER = Handler(
    name="phi3",
    model_types=("phi3",),
    target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    chat_template=PHI3_TEMPLATE,
)
