"""Chat requests with images, for multimodal models: the processor renders the images and the text together.

The processor's chat template places each image part, and calling the processor expands it into the image's
tokens (as training did) and computes the pixel values (plus Gemma 3's token types). Those go with the job to
the generation worker, which prefills each image prompt on its own (see `generation.py`).
"""

from __future__ import annotations

import threading
from typing import Any

from llmbox_engine.serve.errors import bad_request
from llmbox_engine.serve.images import MAX_IMAGES_PER_REQUEST, ImagePolicy
from llmbox_engine.serve.prompts import PromptBuilder
from llmbox_engine.serve.schemas import ChatRequest

VISION_INPUTS = ("pixel_values", "token_type_ids")


class VisionPromptBuilder:
    """Holds its own processor (and so its own tokenizer) behind a lock, like `PromptBuilder`."""

    def __init__(self, processor: Any, policy: ImagePolicy, text_prompts: PromptBuilder) -> None:
        self.processor = processor
        self.policy = policy
        self.text_prompts = text_prompts  # for the context-length rule
        self._lock = threading.Lock()

    def chat(self, request: ChatRequest) -> tuple[list[int], dict[str, Any]]:
        """Prompt token ids (image tokens expanded) and the model inputs the images become."""
        messages, images = self._messages(request)
        with self._lock:
            try:
                text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja's raise_exception(): roles the template refuses, and the like
                raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
            encoded = self.processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
        ids = [int(t) for t in encoded["input_ids"][0]]
        self.text_prompts.check_length(len(ids), "messages")
        return ids, {name: encoded[name] for name in VISION_INPUTS if name in encoded}

    def _messages(self, request: ChatRequest) -> tuple[list[dict[str, Any]], list[Any]]:
        messages: list[dict[str, Any]] = []
        images: list[Any] = []
        for i, message in enumerate(request.messages):
            parts: list[dict[str, Any]] = []
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    param = f"messages.{i}.content.{j}"
                    if part.type == "text":
                        parts.append({"type": "text", "text": part.text or ""})
                    elif part.type == "image_url":
                        if message.role != "user":
                            raise bad_request("images may only be in user messages", param)
                        if not part.url:
                            raise bad_request("an image_url part needs image_url.url", param)
                        images.append(self.policy.load(part.url, param))
                        parts.append({"type": "image"})
                    else:
                        raise bad_request(f"content parts of type {part.type!r} are not supported", param)
            elif message.content:
                parts.append({"type": "text", "text": message.content})
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": parts})
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise bad_request(f"at most {MAX_IMAGES_PER_REQUEST} images per request", "messages")
        return messages, images
