"""The OpenAI-compatible server, run for real (`python -m llmbox_engine serve`) and driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from serve_helpers import (
    QUESTION,
    Adapter,
    Server,
    chat,
    copy_adapter,
    copy_model_home,
    running_server,
    trained_adapter,
)

from conftest import free_port

KEY = "test-key-123"
# a 64-wide model gains nothing from threads, and on a busy machine loses a lot waiting for them
ONE_THREAD = ["--threads", "1"]
LIMITED_ID = "tinyhome"  # the limited server's model directory: <name>/model, <name>/lora


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path) -> Adapter:
    return trained_adapter(tiny_llama, "a")


@pytest.fixture(scope="module")
def server(tiny_llama: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve-main")
    lora = copy_adapter(adapter, folder / "lora")
    args = ["--model-path", str(tiny_llama), "--adapter-dir", str(lora), "--max-batch-size", "8", *ONE_THREAD]
    with running_server(args, folder / "server.log", api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def limited(tiny_llama: Path, adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """--max-concurrency 2 and --no-lora, though the model's lora/ holds an adapter."""
    folder = tmp_path_factory.mktemp("serve-limited")
    home = copy_model_home(tiny_llama, folder / LIMITED_ID)
    copy_adapter(adapter, home / "lora")
    args = ["--model-path", str(home / "model"), "--no-lora", "--max-concurrency", "2", *ONE_THREAD]
    with running_server(args, folder / "server.log") as running:
        yield running


def base_id(tiny_llama: Path) -> str:
    return tiny_llama.name


def test_startup_prints_what_is_served(server: Server, adapter: Adapter, tiny_llama: Path) -> None:
    # HTTP is up before the weights: /health says so until they are loaded
    assert server.health_seen == {(503, '{"status":"loading"}'), (200, '{"status":"ok"}')}
    out = server.output()
    assert f"base model: {tiny_llama}" in out
    info = adapter.info
    line = next(line for line in out.splitlines() if line.startswith("adapter: "))
    assert info["created_at"] in line and f"final training loss {info['final_train_loss']:.4f}" in line, line


def test_models_lists_the_base_and_the_adapter(server: Server, adapter: Adapter, tiny_llama: Path) -> None:
    models = {m.id: m for m in server.client().models.list()}
    assert set(models) == {base_id(tiny_llama), f"{base_id(tiny_llama)}:lora"}
    meta = models[f"{base_id(tiny_llama)}:lora"].model_extra["llmbox"]
    assert meta["created_at"] == adapter.info["created_at"] and meta["fingerprint"] == adapter.fingerprint
    assert meta["final_loss"] == pytest.approx(adapter.info["final_train_loss"])


def test_chat_and_completion(server: Server, adapter: Adapter, tiny_llama: Path) -> None:
    client = server.client()
    answer = chat(client, f"{base_id(tiny_llama)}:lora", max_tokens=40)
    # trained on short answers, the adapter ends its turn (<|im_end|>) long before max_tokens
    assert answer.choices[0].message.content == adapter.answer
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens > 5 and 0 < answer.usage.completion_tokens < 40
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.system_fingerprint == adapter.fingerprint

    text = client.completions.create(model=base_id(tiny_llama), prompt="The quick brown", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5


def test_streaming_assembles_to_the_same_text(server: Server, tiny_llama: Path) -> None:
    client = server.client()
    for model in (base_id(tiny_llama), f"{base_id(tiny_llama)}:lora"):
        whole = chat(client, model, max_tokens=20)
        chunks = list(chat(client, model, max_tokens=20, stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    prompt = "Water boils at"
    whole_text = client.completions.create(model=base_id(tiny_llama), prompt=prompt, max_tokens=12, temperature=0)
    stream = client.completions.create(
        model=base_id(tiny_llama), prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole_text.choices[0].text


def test_the_raw_stream_is_openai_sse(server: Server, tiny_llama: Path) -> None:
    import urllib.request

    body = {"model": base_id(tiny_llama), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    req = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_adapter_and_base_answer_differently(server: Server, tiny_llama: Path) -> None:
    client = server.client()
    base = chat(client, base_id(tiny_llama), max_tokens=24)
    tuned = chat(client, f"{base_id(tiny_llama)}:lora", max_tokens=24)
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert base.system_fingerprint != tuned.system_fingerprint


def test_sampling_options(server: Server, adapter: Adapter, tiny_llama: Path) -> None:
    client = server.client()
    model = base_id(tiny_llama)
    first = chat(client, model, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    again = chat(client, model, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    assert first.choices[0].message.content == again.choices[0].message.content
    several = chat(client, model, temperature=1.0, n=3, max_tokens=12)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert 3 <= several.usage.completion_tokens <= 36
    stopped = chat(client, f"{model}:lora", stop=[" blue"], max_completion_tokens=30)
    assert stopped.choices[0].message.content == adapter.answer.split(" blue")[0]
    assert stopped.choices[0].finish_reason == "stop"
    texts = client.completions.create(model=model, prompt=["The sum", "Paris is"], max_tokens=4, temperature=0)
    assert [c.index for c in texts.choices] == [0, 1] and texts.usage.completion_tokens == 8


def test_api_key_is_required_except_for_health(server: Server, tiny_llama: Path) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        server.client(api_key="wrong-key").models.list()
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    status, body = server.post("/v1/chat/completions", {"model": base_id(tiny_llama), "messages": []})
    assert status == 400  # the key is right: the request is judged
    for headers in ({"Authorization": ""}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer nope"}):
        status, body = server.request("GET", "/v1/models", headers=headers)
        assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert server.request("GET", "/health", headers={"Authorization": ""}) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"model": "x", "messages": [', 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "invalid_value"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
        ({"messages": []}, 400, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop", "invalid_value"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None, "request_too_large"),
    ],
    ids=["malformed-json", "not-an-object", "wrong-type", "negative-max-tokens", "wrong-type-temperature",
         "content-type", "unknown-role", "empty-messages", "stop-type", "too-long-prompt", "unknown-model",
         "oversized-body"],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    server: Server, tiny_llama: Path, body: object, status: int, param: str | None, code: str | None
) -> None:
    if isinstance(body, dict):
        body = json.dumps({"model": base_id(tiny_llama), **body}).encode()
    assert isinstance(body, bytes)
    got, answer = server.request("POST", "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error


def test_odd_but_valid_requests(server: Server, tiny_llama: Path) -> None:
    model = base_id(tiny_llama)
    # a huge max_tokens is capped to what the context leaves
    status, body = server.post("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 10**12})
    assert status == 200 and body["usage"]["total_tokens"] <= 512, body
    status, body = server.post("/v1/completions", {"model": model, "prompt": [5, 6, 7], "max_tokens": 2})
    assert status == 200 and body["usage"]["prompt_tokens"] == 3
    status, body = server.post("/v1/completions", {"model": model, "prompt": [10**9], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = server.request("GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "item 3?"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    status, body = server.post("/v1/chat/completions", {"model": f"{model}:lora", "messages": messages})
    assert status == 200, body


def test_32_concurrent_requests_all_succeed(server: Server, adapter: Adapter, tiny_llama: Path) -> None:
    model = base_id(tiny_llama)
    expected_base = chat(server.client(), model, max_tokens=12).choices[0].message.content

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        target = f"{model}:lora" if i % 2 else model
        messages = [{"role": "user", "content": QUESTION}]
        if i % 4 == 3:
            stream = await client.chat.completions.create(
                model=target,
                messages=messages,
                max_tokens=12,
                temperature=0,
                stream=True,  # type: ignore[arg-type]
            )
            return target, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        answer = await client.chat.completions.create(
            model=target,
            messages=messages,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
        )
        return target, answer.choices[0].message.content or ""

    async def all_of_them() -> list[tuple[str, str]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(all_of_them())
    # batched with others or not, a greedy answer is the same
    for target, text in results:
        assert text == (adapter.answer if target.endswith(":lora") else expected_base), (target, text)


def test_cancelled_streams_free_their_slots(limited: Server) -> None:
    client = limited.client()
    for _ in range(2):
        streams = [chat(client, LIMITED_ID, max_tokens=400, stream=True) for _ in range(2)]
        for stream in streams:
            next(iter(stream))
            stream.close()  # the client goes away mid-answer
        # both slots of --max-concurrency 2 come back once the worker drops the cancelled rows
        for _ in range(50):
            try:
                answer = chat(client, LIMITED_ID, max_tokens=4)
                break
            except openai.RateLimitError:
                threading.Event().wait(0.1)
        else:
            pytest.fail("the cancelled requests kept their slots")
        assert answer.choices[0].finish_reason == "length"


def test_no_lora_serves_the_base_alone(limited: Server) -> None:
    assert [m.id for m in limited.client().models.list()] == [LIMITED_ID]
    with pytest.raises(openai.NotFoundError):
        chat(limited.client(), f"{LIMITED_ID}:lora")
    assert "adapter: off (--no-lora)" in limited.output()


def test_max_concurrency_answers_429_beyond_it(limited: Server) -> None:
    outcomes: list[str] = []

    def one() -> None:
        try:
            chat(limited.client(), LIMITED_ID, max_tokens=100)
            outcomes.append("ok")
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "rate_limit_exceeded" and "max-concurrency 2" in exc.body["message"]
            outcomes.append("429")

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 10 and outcomes.count("ok") >= 2 and outcomes.count("429") >= 1, outcomes
    assert chat(limited.client(), LIMITED_ID, max_tokens=2).choices[0].finish_reason == "length"


def test_start_up_failures_are_one_clear_error(tmp_path: Path, tiny_llama: Path) -> None:
    import socket
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "llmbox_engine", "serve", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    proc = serve("--model-path", str(tmp_path))
    assert proc.returncode == 2 and "error: " in proc.stderr and "no config.json" in proc.stderr, proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = serve("--model-path", str(tiny_llama), "--port", str(taken.getsockname()[1]))
    assert proc.returncode == 2 and "pick another --port" in proc.stderr, proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not weights")
    port = str(free_port())
    proc = serve("--model-path", str(broken), "--host", "0.0.0.0", "--port", port, "--no-lora")
    assert "warning: listening on 0.0.0.0 without an API key" in proc.stderr
    assert proc.returncode == 2 and "error: could not load" in proc.stderr, proc.stderr
