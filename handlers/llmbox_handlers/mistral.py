"""Mistral and Mixtral-style dense models."""

from llmbox_handlers.base import Handler
from llmbox_handlers.llama import LLAMA_PROJECTIONS

# Mistral's [INST] format has no system role: a system message is prepended to the first user turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\n\n' if system and loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

HANDLER = Handler(
    name="mistral",
    model_types=("mistral", "mixtral"),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=MISTRAL_TEMPLATE,
    max_seq_length=8192,
)
