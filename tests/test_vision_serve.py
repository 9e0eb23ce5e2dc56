"""Serving a vision adapter for real: image requests through the openai client, and the image URL rules."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import Server, running_server

from tiny_vision_models import VISION_FAMILIES, build_tiny_vision_model, draw_shape, write_caption_dataset
from train_helpers import train

CAPTION = "a red circle"  # every image is captioned alike: the adapter must say it, the base model cannot
PROMPT = "Describe this image."


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, text: str = PROMPT) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


@pytest.fixture(scope="module", params=VISION_FAMILIES)
def vision_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path]]:
    """A tiny multimodal model with an adapter trained to caption every image CAPTION, served with --image-dir."""
    family = request.param
    home = tmp_path_factory.mktemp(f"vision-{family}")
    model = build_tiny_vision_model(family, home / "model")
    data = write_caption_dataset(home / "data")
    data.write_text(json.dumps([{**r, "caption": CAPTION} for r in json.loads(data.read_text())]))
    train(model, home, data, epochs=8, force_epochs=True, learning_rate=3e-2, validation_split=0.0, batch_size=4)
    args = ["--model-path", str(model), "--threads", "1", "--image-dir", str(home / "data")]
    with running_server(args, home / "server.log", env={"HF_HUB_OFFLINE": "1"}) as server:
        yield server, home / "data" / "images" / "red_circle.png"


def ids(server: Server) -> tuple[str, str]:
    base, adapter = (m.id for m in server.client().models.list().data)
    return base, adapter


def test_the_adapter_answers_an_image_request_sent_as_a_data_url(vision_server: tuple[Server, Path]) -> None:
    server, image = vision_server
    client = server.client()
    base, adapter = ids(server)
    url = data_url(image)
    tuned = client.chat.completions.create(model=adapter, messages=image_message(url), max_tokens=6, temperature=0)
    assert tuned.choices[0].message.content.startswith("a red"), tuned.choices[0].message.content
    assert tuned.usage.prompt_tokens > len(PROMPT.split())  # the image tokens count as prompt
    plain = client.chat.completions.create(model=base, messages=image_message(url), max_tokens=6, temperature=0)
    assert plain.choices[0].message.content != tuned.choices[0].message.content
    stream = client.chat.completions.create(
        model=adapter, messages=image_message(url), max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == tuned.choices[0].message.content


def test_image_files_only_inside_the_image_dir_and_never_remote_urls(vision_server: tuple[Server, Path]) -> None:
    server, _ = vision_server
    _, adapter = ids(server)
    answer = server.client().chat.completions.create(
        model=adapter, messages=image_message("images/red_circle.png"), max_tokens=6, temperature=0
    )
    assert answer.choices[0].message.content.startswith("a red")
    for url, why in (
        ("https://example.com/cat.png", "remote image URLs are not fetched"),
        ("/etc/hostname", "outside the allowed image folder"),
        ("file://../../etc/hostname", "outside the allowed image folder"),
        ("data:image/png;base64,!!!", "base64 content is malformed"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "cannot be decoded as an image"),
    ):
        status, body = server.post("/v1/chat/completions", {"model": adapter, "messages": image_message(url)})
        assert status == 400 and why in body["error"]["message"], (url, body)
    text = server.client().chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert text.choices[0].finish_reason in ("stop", "length")  # plain text requests still work


def test_without_image_dir_paths_are_refused_and_text_models_refuse_images(tiny_llama: Path, tmp_path: Path) -> None:
    image = draw_shape(tmp_path / "red.png", "red", "circle")
    with running_server(["--model-path", str(tiny_llama), "--no-lora", "--threads", "1"], tmp_path / "s.log") as server:
        status, body = server.post(
            "/v1/chat/completions", {"model": tiny_llama.name, "messages": image_message(data_url(image))}
        )
        assert status == 400 and "text-only model" in body["error"]["message"], body
    from llmbox_engine.serve.errors import ApiError
    from llmbox_engine.serve.images import ImagePolicy

    with pytest.raises(ApiError, match="start the server with --image-dir"):
        ImagePolicy(None).load(str(image), "messages.0.content.0")


def test_image_and_text_requests_at_once(vision_server: tuple[Server, Path]) -> None:
    """Image prompts prefill alone, then decode in the shared batch beside text requests."""
    import asyncio

    server, image = vision_server
    _, adapter = ids(server)
    url = data_url(image)

    async def both() -> list[Any]:
        client = server.async_client()
        calls = [
            client.chat.completions.create(
                model=adapter,
                messages=image_message(url) if i % 2 == 0 else [{"role": "user", "content": f"question {i}"}],
                max_tokens=6,
                temperature=0,
            )
            for i in range(6)
        ]
        return list(await asyncio.gather(*calls))

    answers = asyncio.run(both())
    for i, answer in enumerate(answers):
        if i % 2 == 0:
            assert answer.choices[0].message.content.startswith("a red"), (i, answer.choices[0].message.content)
        else:
            assert answer.usage.completion_tokens >= 1
