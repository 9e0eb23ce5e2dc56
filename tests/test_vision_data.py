"""Image data without a model: the formats that carry images, decode checks, the report, the LoRA regex, facts."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from llmbox.errors import DataError
from llmbox.facts import model_facts_from_config
from llmbox_engine.data.canonical import IMAGE_PLACEHOLDER, Message
from llmbox_engine.data.ingest import load_examples
from llmbox_engine.data.render_vision import chat_messages
from llmbox_engine.data.report import build_report
from llmbox_handlers import handler_by_name, match_handler

from conftest import EXAMPLES, write_json, write_jsonl
from tiny_vision_models import draw_shape


def png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_openai_image_parts_paths_and_data_urls(tmp_path: Path) -> None:
    draw_shape(tmp_path / "imgs" / "a.png", "red", "circle")
    inline = png_data_url(draw_shape(tmp_path / "b.png", "blue", "square"))
    first = [{"type": "image_url", "image_url": {"url": "imgs/a.png"}}, {"type": "text", "text": "and"},
             {"type": "image_url", "image_url": {"url": inline}}, {"type": "text", "text": "?"}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "red then blue"},
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "b.png")}]},
        {"role": "assistant", "content": "blue"},
    ]}])  # fmt: skip
    (example,) = load_examples(str(path)).examples
    assert example.images == (str((tmp_path / "imgs" / "a.png").resolve()), inline, str(tmp_path / "b.png"))
    assert example.messages[0].content == f"{IMAGE_PLACEHOLDER}and{IMAGE_PLACEHOLDER}?"
    assert example.messages[2].content == IMAGE_PLACEHOLDER


def test_llava_style_sharegpt(tmp_path: Path) -> None:
    draw_shape(tmp_path / "x.png", "green", "square")
    path = write_json(tmp_path / "llava.json", [{"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Green."},
    ]}])  # fmt: skip
    result = load_examples(str(path))
    (example,) = result.examples
    assert example.format == "sharegpt" and example.images == (str((tmp_path / "x.png").resolve()),)
    assert result.images == 1
    parts = chat_messages(example.messages, 1)[0]["content"]
    assert parts == [{"type": "image"}, {"type": "text", "text": "\nWhat colour is it?"}]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"image": ["x.png", "x.png"], "conversations": [{"from": "human", "value": "<image> hi"},
                                                        {"from": "gpt", "value": "a"}]},
         "1 <image> placeholder(s) for 2 image(s)"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "x.png"}}]}]}, "images may only be in user turns"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                       {"role": "assistant", "content": "a"}]}, "content parts of type 'audio' are not supported"),
        ({"image": "x.txt", "caption": "text is no image"}, "x.txt cannot be decoded as an image"),
        ({"image": "data:text/plain;base64,aGk=", "caption": "c"}, "is not an image"),
    ],
)  # fmt: skip
def test_bad_image_records_say_what_is_wrong(tmp_path: Path, record: dict[str, object], error: str) -> None:
    draw_shape(tmp_path / "x.png", "red", "square")
    (tmp_path / "x.txt").write_text("hello")
    path = write_json(tmp_path / "bad.json", [record])
    with pytest.raises(DataError, match=r"bad\.json: record 1: .*" + re.escape(error)):
        load_examples(str(path))


def test_images_without_placeholders_lead_the_first_user_turn() -> None:
    messages = (Message("system", "Be brief."), Message("user", "Describe."), Message("assistant", "red"))
    rendered = chat_messages(messages, 2)
    assert rendered[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert rendered[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
    assert rendered[2]["content"] == [{"type": "text", "text": "red"}]


def test_the_report_counts_images_and_their_sizes(tmp_path: Path) -> None:
    result = load_examples(str(EXAMPLES / "vision" / "captions.json"))
    report = build_report(result)
    assert report["images"] == 8
    assert report["image_sizes"]["min_size"] == report["image_sizes"]["max_size"] == "64x64"
    draw_shape(tmp_path / "big.png", "red", "circle", size=96)
    draw_shape(tmp_path / "small.png", "red", "circle", size=20)
    path = write_json(tmp_path / "v.json", [{"image": "big.png", "caption": "big"}, {"image": "small.png",
                                                                                    "caption": "small"}])  # fmt: skip
    sizes = build_report(load_examples(str(path)))["image_sizes"]
    assert (sizes["images"], sizes["min_size"], sizes["max_size"]) == (2, "20x20", "96x96")


def test_vision_lora_targets_the_language_model_only() -> None:
    for name in ("gemma3", "llava"):
        handler = handler_by_name(name)
        assert handler.multimodal
        pattern = handler.vision_lora_targets(handler.target_modules)
        assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
        assert re.fullmatch(pattern, "model.language_model.layers.1.mlp.down_proj")
        assert not re.fullmatch(pattern, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
        assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1")
        assert not re.fullmatch(pattern, "model.multi_modal_projector.linear_1")


def test_llava_facts_from_its_sparse_nested_config() -> None:
    # llava-1.5-7b-hf's config.json: the text_config names little more than the vocabulary
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "patch_size": 14},
    }  # fmt: skip
    facts = model_facts_from_config(config)
    assert match_handler(config).handler.name == facts.handler == "llava"
    assert facts.hidden_size == 4096 and facts.n_layers == 32 and facts.max_positions == 4096
    assert facts.n_params == pytest.approx(7.06e9, rel=0.02)
    assert handler_by_name("llava").takes_images(config)
    assert not handler_by_name("llava").takes_images({"model_type": "llava"})
