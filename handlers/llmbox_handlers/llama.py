"""Llama 2/3 and Llama 4 (text), and the many models built on the Llama architecture (SmolLM, TinyLlama)."""

from llmbox_handlers.base import Handler

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama 3's header-style turns; Llama 2 models ship their own template in the tokenizer.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

HANDLER = Handler(
    name="llama",
    model_types=("llama",),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=LLAMA3_TEMPLATE,
    max_seq_length=8192,
)

# Llama 4 trains in bf16 only: its router and MoE layers are unstable in fp16.
LLAMA4_HANDLER = Handler(
    name="llama4",
    model_types=("llama4", "llama4_text"),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=LLAMA3_TEMPLATE,
    prefers_bf16=True,
    max_seq_length=8192,
)
