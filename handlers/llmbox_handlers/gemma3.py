"""Gemma 3 (text and multimodal). Trained in bf16: Gemma's activations overflow fp16."""

from llmbox_handlers.base import Handler
from llmbox_handlers.llama import LLAMA_PROJECTIONS

# Gemma has no system role: the system message is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (system + '\n\n' if system and loop.first else '')"
    " + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

HANDLER = Handler(
    name="gemma3",
    model_types=("gemma3", "gemma3_text"),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=GEMMA_TEMPLATE,
    prefers_bf16=True,
    max_seq_length=8192,
    multimodal=True,
)
