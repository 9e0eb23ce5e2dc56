"""Tiny random multimodal models (Gemma 3 and LLaVA) with a processor made locally: no hub, no torchvision.

Each builds from configs in about a second: a 64-wide, 2-layer language model, a 2-layer vision tower on
32-pixel images, and the tiny BPE tokenizer of `tiny_models` plus each family's image tokens. The traps
(all seen with transformers 5.24, see /work/shared/models/README.md) are handled here:
- Gemma 3: `<image_soft_token>` is added as a special token; `mm_tokens_per_image` is k*k with k dividing
  image_size / patch_size, and the processor's `image_seq_length` equals it; the PIL image processor gets
  the tower's size.
- LLaVA: `<image>` is added as a special token (a missing one is silently a wrong id); CLIP with the
  "default" feature strategy needs `num_additional_image_tokens=1`; the processor needs `patch_size`.
Both get a chat template that renders list content (text and image parts), since training and serving
hand the processor OpenAI-style parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny_models import _tokenizer_json

VISION_FAMILIES = ("gemma3", "llava")
IMAGE_SIZE = 32
PATCH_SIZE = 8
GEMMA3_TOKENS_PER_IMAGE = 4  # k*k with k = 2 dividing 32 / 8

# ChatML whose content may be a list of parts; an image part becomes the family's image marker.
VISION_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '@IMAGE@' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_MARKERS = {"gemma3": "<start_of_image>", "llava": "<image>"}


def vision_template(family: str) -> str:
    return VISION_CHATML.replace("@IMAGE@", IMAGE_MARKERS[family])


def _vision_tower(kind: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
    }  # fmt: skip
    return tf.SiglipVisionConfig(**common) if kind == "siglip" else tf.CLIPVisionConfig(**common, projection_dim=32)


def _text_config(family: str, vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0, "tie_word_embeddings": True,
        "initializer_range": 0.25,
        **({"head_dim": 16, "sliding_window": 64} if family == "gemma3" else {}),
    }  # fmt: skip


def _tokenizer(family: str, image_tokens: dict[str, str]) -> Any:
    """The tiny BPE tokenizer with the family's image tokens as named special tokens (`tokenizer.image_token`)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json())
    backend.add_special_tokens([AddedToken(t, special=True) for t in image_tokens.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        extra_special_tokens=image_tokens,
    )
    tokenizer.chat_template = vision_template(family)
    return tokenizer


def _gemma3(out_dir: Path) -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = _tokenizer(
        "gemma3",
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    config = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**_text_config("gemma3", len(tokenizer))),
        vision_config=_vision_tower("siglip"),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        initializer_range=0.25,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = tf.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=vision_template("gemma3"),
        image_seq_length=GEMMA3_TOKENS_PER_IMAGE,
    )
    return config, processor


def _llava(out_dir: Path) -> tuple[Any, Any]:
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tokenizer("llava", {"image_token": "<image>"})
    config = tf.LlavaConfig(
        text_config=tf.LlamaConfig(**_text_config("llava", len(tokenizer))),
        vision_config=_vision_tower("clip"),
        image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=vision_template("llava"),
    )
    return config, processor


def build_tiny_vision_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random multimodal model of `family` ("gemma3" or "llava") and its processor to `out_dir`."""
    import torch
    from transformers import AutoModelForImageTextToText

    config, processor = {"gemma3": _gemma3, "llava": _llava}[family](out_dir)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square")


def draw_shape(path: Path, colour: str, shape: str, size: int = 48) -> Path:
    """A `colour` `shape` on white, as a PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_caption_dataset(folder: Path) -> Path:
    """captions.json beside images/: one image per colour and shape, captioned, paths relative to the file."""
    import json

    records = []
    for colour in COLOURS:
        for shape in SHAPES:
            draw_shape(folder / "images" / f"{colour}_{shape}.png", colour, shape)
            records.append({"image": f"images/{colour}_{shape}.png", "caption": f"a {colour} {shape}"})
    path = folder / "captions.json"
    path.write_text(json.dumps(records, indent=1))
    return path
