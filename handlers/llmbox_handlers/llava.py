"""LLaVA (`LlavaForConditionalGeneration`, model_type "llava"): a CLIP or SigLIP vision tower, a small projector,
and a Llama-style language model (Llama, Mistral, Vicuna, Qwen2 inside).

Vision training: the processor expands each `<image>` into one token per patch; those tokens and the prompt
are masked out of the loss, and only the answer is trained. LoRA goes on the language model's projections
only, by the regex `.*\\.language_model\\..*\\.(q_proj|k_proj|...)` (`Handler.vision_lora_targets`): the CLIP
tower has `q_proj`/`k_proj`/`v_proj` too, and a plain name list would adapt it. The tower and the projector
stay frozen, as peft leaves every non-LoRA weight.
"""

from llmbox_handlers.base import CHATML_TEMPLATE, Handler
from llmbox_handlers.llama import LLAMA_PROJECTIONS

HANDLER = Handler(
    name="llava",
    model_types=("llava",),
    target_modules=LLAMA_PROJECTIONS,
    chat_template=CHATML_TEMPLATE,
    max_seq_length=4096,
    multimodal=True,
)
