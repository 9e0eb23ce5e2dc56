"""Vision fine-tuning on tiny random Gemma 3 and LLaVA models: masks, the real CLI, LoRA on the language model only."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmbox.errors import DataError
from llmbox_engine.data.canonical import Example, Message, Origin

from conftest import run_llmbox, write_json
from tiny_vision_models import VISION_FAMILIES, build_tiny_vision_model, draw_shape, write_caption_dataset

ORIGIN = Origin("v.json", 1)


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vision_model(family, tmp_path_factory.mktemp(f"tiny-vision-{family}"))
        return built[family]

    return make


def fresh_copy(model: Path, target: Path) -> Path:
    """Training writes lora/ and checkpoints/ into a bare model folder: each test gets its own."""
    shutil.copytree(model, target)
    return target


def processor_of(model: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model))


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_only_answer_tokens_are_trained(family: str, vision_models: Callable[[str], Path], tmp_path: Path) -> None:
    from llmbox_engine.data.render_vision import VisionRenderer, image_token_ids

    processor = processor_of(vision_models(family))
    image = str(draw_shape(tmp_path / "red.png", "red", "circle"))
    caption = Example("vision", ORIGIN, messages=(Message("user", "Describe this image."),
                      Message("assistant", "a red circle")), images=(image,))  # fmt: skip
    two_turns = Example("openai", ORIGIN, images=(image, image), messages=(
        Message("user", "What is <image> this?"), Message("assistant", "red one"),
        Message("user", "And <image>?"), Message("assistant", "red two"),
    ))  # fmt: skip
    renderer = VisionRenderer(processor, None, 512)
    tokenizer = processor.tokenizer
    image_ids = image_token_ids(processor)
    for example, answers in ((caption, ["a red circle"]), (two_turns, ["red one", "red two"])):
        (tok,) = renderer.tokenize([example])
        trained = tokenizer.decode(tok.input_ids[tok.trainable])
        assert trained.replace("<|im_end|>", "").split() == " ".join(answers).split()
        assert not any(int(t) in image_ids for t in tok.input_ids[tok.trainable])
        assert sum(int(t) in image_ids for t in tok.input_ids) >= len(example.images)  # the images are expanded


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_cli_training_lowers_the_loss_with_lora_on_the_language_model_only(
    family: str, vision_models: Callable[[str], Path], tmp_path: Path
) -> None:
    model = fresh_copy(vision_models(family), tmp_path / "model")
    data = write_caption_dataset(tmp_path / "data")
    proc = run_llmbox("train", str(model), "--data", str(data), "--runtime", "local", "--epochs", "5",
                      "--force-epochs", "--learning-rate", "1e-2", "--no-tensorboard", "--skip-test",
                      env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((model / "checkpoints" / "last" / "trainer_state.json").read_text())
    losses = [e["train_loss"] for e in state["evaluations"]]
    assert losses[-1] < 0.9 * losses[0], losses
    config = json.loads((model / "lora" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str) and "language_model" in config["target_modules"]
    from safetensors import safe_open

    with safe_open(str(model / "lora" / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(".language_model." in k for k in keys), keys[:4]
    info = json.loads((model / "lora" / "adapter_info.json").read_text())
    assert info["handler"] == family and info["data"]["examples"] == 8
    assert info["plan"]["batch_size"] <= 4


def test_a_text_only_model_refuses_image_records(tiny_llama: Path, tmp_path: Path) -> None:
    data = write_caption_dataset(tmp_path / "data")
    proc = run_llmbox("train", str(tiny_llama), "--data", str(data), "--runtime", "local", "--dry-run")
    assert proc.returncode != 0
    assert "records carry images" in proc.stderr + proc.stdout and "text-only model" in proc.stderr + proc.stdout


def test_a_length_limit_that_would_cut_an_image_names_the_record(
    vision_models: Callable[[str], Path], tmp_path: Path
) -> None:
    data = write_caption_dataset(tmp_path / "data")  # 16 image tokens early in each prompt
    proc = run_llmbox("train", str(vision_models("llava")), "--data", str(data), "--runtime", "local",
                      "--max-seq-length", "8", "--dry-run", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{data}: record 1:" in proc.stderr and "would split an image" in proc.stderr


def test_broken_and_missing_images_name_the_file_and_record(tmp_path: Path) -> None:
    from llmbox_engine.data.ingest import load_examples

    draw_shape(tmp_path / "ok.png", "blue", "square")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = write_json(tmp_path / "v.json", [{"image": "ok.png", "caption": "fine"},
                                            {"image": "broken.png", "caption": "bad"}])  # fmt: skip
    with pytest.raises(DataError, match=r"v\.json: record 2: image .*broken\.png cannot be decoded"):
        load_examples(str(path))
    path = write_json(tmp_path / "o.json", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gone.jpg"}}]},
        {"role": "assistant", "content": "x"},
    ]}])  # fmt: skip
    with pytest.raises(DataError, match=r"o\.json: record 1: messages\[1\]: image not found: .*gone\.jpg"):
        load_examples(str(path))


def test_data_report_with_a_vision_model(vision_models: Callable[[str], Path], tmp_path: Path) -> None:
    data = write_caption_dataset(tmp_path / "data")
    proc = run_llmbox("data", "--data", str(data), "--model", str(vision_models("llava")), "--json",
                      env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == 8 and report["image_sizes"]["max_size"] == "48x48"
    # each example holds its 16 image tokens (4x4 patches) besides the text
    assert report["tokens"]["handler"] == "llava" and report["tokens"]["min"] > 16
