r"""Gemma 3 (text and multimodal). Trained in bf16: Gemma's activations overflow fp16.

Multimodal Gemma 3 (`Gemma3ForConditionalGeneration`: model_type "gemma3" with a `vision_config`) trains on
images: the processor expands `<start_of_image>` into the image's soft tokens, which (like the prompt) are
masked out of the loss; `token_type_ids` mark them so they attend to each other both ways. LoRA goes on the
language model only, by the regex `.*\.language_model\..*\.(q_proj|...)` (`Handler.vision_lora_targets`):
the SigLIP tower has `q_proj`/`k_proj`/`v_proj`/`out_proj` too, and a plain name list would adapt it. The
tower and the projector stay frozen.
"""

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
