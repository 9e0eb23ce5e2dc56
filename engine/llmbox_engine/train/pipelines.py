"""What the recipe asks of the data's modality, so the training loop has no modality branches.

A pipeline answers: how examples become token ids and loss masks, how they are cut to the planned length, how
the plan fits it, which attention and LoRA targets it takes, how a micro-batch is collated, and how a sample
answer is generated. `TextPipeline` is here; `VisionPipeline` (images through the model's processor) is in
`train/vision.py`. `pipeline_for` picks one from the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from llmbox.plan import TrainingPlan
from llmbox_engine.data.batching import packed_batch, padded_batch
from llmbox_engine.data.canonical import Example
from llmbox_engine.data.render import Renderer, TokenizedExample, chat_template_for
from llmbox_engine.train.model_setup import attention_implementation, load_tokenizer, takes_packed_rows
from llmbox_handlers import Handler

LoraTargets = tuple[str, ...] | str | None


class Pipeline(Protocol):
    tokenizer: Any
    multimodal: bool  # loaded as an image-text-to-text model
    packed: bool  # micro-batches are packed rows (set by choose_attention: it takes attention that keeps them apart)

    def tokenize(self, examples: Sequence[Example], max_seq_length: int) -> list[TokenizedExample]: ...

    def truncate(
        self, tokenized: Sequence[TokenizedExample], limit: int, examples: Sequence[Example]
    ) -> list[TokenizedExample]: ...

    def fit_plan(self, plan: TrainingPlan) -> TrainingPlan: ...

    def choose_attention(self, device: str) -> str: ...

    def lora_targets(self, planned: tuple[str, ...] | None) -> LoraTargets: ...

    def collate(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]: ...

    def answer(self, model: Any, example: Example, device: Any) -> str: ...


def pipeline_for(model_path: Path, handler: Handler, config: dict[str, Any], trust_remote_code: bool) -> Pipeline:
    """Multimodal models train through their processor, text-only data too."""
    if handler.takes_images(config):
        from llmbox_engine.train.vision import VisionPipeline

        return VisionPipeline(model_path, handler, trust_remote_code)
    return TextPipeline(model_path, handler, trust_remote_code)


class TextPipeline:
    multimodal = False

    def __init__(self, model_path: Path, handler: Handler, trust_remote_code: bool = False) -> None:
        self.handler = handler
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.template = chat_template_for(self.tokenizer, handler.chat_template)
        self.packed = False  # decided with the attention: packed rows need attention that reads position ids

    def tokenize(self, examples: Sequence[Example], max_seq_length: int) -> list[TokenizedExample]:
        return Renderer(self.tokenizer, self.template, max_seq_length).tokenize(examples)

    def truncate(
        self, tokenized: Sequence[TokenizedExample], limit: int, examples: Sequence[Example]
    ) -> list[TokenizedExample]:
        return [
            t if len(t) <= limit else TokenizedExample(t.input_ids[:limit], t.trainable[:limit], truncated=True)
            for t in tokenized
        ]

    def fit_plan(self, plan: TrainingPlan) -> TrainingPlan:
        return plan

    def choose_attention(self, device: str) -> str:
        attention = attention_implementation(device, self.handler.supports_flash_attention)
        self.packed = takes_packed_rows(attention)  # then no padding anywhere
        return attention

    def lora_targets(self, planned: tuple[str, ...] | None) -> LoraTargets:
        return planned

    def collate(self, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
        return packed_batch(examples) if self.packed else padded_batch(examples, self.tokenizer.pad_token_id, 8)

    def answer(self, model: Any, example: Example, device: Any) -> str:
        """A greedy answer to the example's conversation minus its last turn."""
        prompt = [{"role": m.role, "content": m.content} for m in example.messages[:-1]]
        encoded = self.tokenizer.apply_chat_template(
            prompt, chat_template=self.template, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        encoded = {k: v.to(device) for k, v in encoded.items()}
        generated = model.generate(
            **encoded, max_new_tokens=96, do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id
        )
        return str(self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
