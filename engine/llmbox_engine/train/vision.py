"""The pipeline of a multimodal model (`train/pipelines.py`): what changes when the training data has images.

A multimodal model (a handler with `multimodal=True` and a config with a `vision_config`) is loaded with
AutoModelForImageTextToText and its AutoProcessor. Examples are rendered by `VisionRenderer` (loss only on
the answers, never on image tokens), batches carry `pixel_values` (and Gemma 3's `token_type_ids`), LoRA
goes on the language model only (the handler's regex), and the vision tower and projector stay frozen.
Micro-batches are capped at `MAX_VISION_BATCH`: each image costs its tower's activations on top of the tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmbox.plan import TrainingPlan
from llmbox_engine.data.canonical import Example
from llmbox_engine.data.images import load_image
from llmbox_engine.data.render import TokenizedExample
from llmbox_engine.data.render_vision import (
    VisionCollator,
    VisionRenderer,
    chat_messages,
    cut_to,
    image_count,
    image_token_ids,
)
from llmbox_engine.train.model_setup import attention_implementation
from llmbox_handlers import Handler

MAX_VISION_BATCH = 4


class VisionPipeline:
    multimodal = True
    packed = False  # image batches stay padded: their pixels travel per row

    def __init__(self, model_path: Path, handler: Handler, trust_remote_code: bool = False) -> None:
        from transformers import AutoProcessor

        self.handler = handler
        self.processor = AutoProcessor.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.collate = VisionCollator(self.processor, self.tokenizer.pad_token_id)

    def tokenize(self, examples: Sequence[Example], max_seq_length: int) -> list[TokenizedExample]:
        return [*VisionRenderer(self.processor, None, max_seq_length).tokenize(examples)]

    def truncate(
        self, tokenized: Sequence[TokenizedExample], limit: int, examples: Sequence[Example]
    ) -> list[TokenizedExample]:
        """Cut to the plan's length; an image is never cut (that example is refused, naming its record).

        `examples` are the ones `tokenized` came from, in the same order.
        """
        image_ids = image_token_ids(self.processor)
        return [cut_to(e, t, limit, image_ids) for t, e in zip(tokenized, examples, strict=True)]

    def fit_plan(self, plan: TrainingPlan) -> TrainingPlan:
        """At most MAX_VISION_BATCH rows per micro-batch; accumulation makes up the planned effective batch."""
        if plan.batch_size <= MAX_VISION_BATCH:
            return plan
        accumulation = plan.gradient_accumulation_steps * -(-plan.batch_size // MAX_VISION_BATCH)
        return dataclasses.replace(
            plan,
            batch_size=MAX_VISION_BATCH,
            max_batch_size=min(plan.max_batch_size, MAX_VISION_BATCH),
            gradient_accumulation_steps=accumulation,
        )

    def choose_attention(self, device: str) -> str:
        # image batches stay padded: their pixels travel per row
        return attention_implementation(device, self.handler.supports_flash_attention, vision=True)

    def lora_targets(self, planned: tuple[str, ...] | None) -> str:
        return self.handler.vision_lora_targets(planned)

    def answer(self, model: Any, example: Example, device: Any, max_new_tokens: int = 96) -> str:
        """A greedy answer to the example's conversation minus its last turn, images included."""
        prompt = example.messages[:-1]
        messages = chat_messages(prompt, len(example.images))
        shown = image_count(messages)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [load_image(ref) for ref in example.images[:shown]]
        encoded = self.processor(
            text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt"
        )
        encoded = {k: v.to(device) for k, v in encoded.items()}
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return str(self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
