"""The serving parts without HTTP: text streaming, request checks, adapter checks, the batching worker."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmbox_engine.serve.adapters import check_shapes, read_adapter
from llmbox_engine.serve.errors import ApiError
from llmbox_engine.serve.generation import (
    Admitted,
    ChoiceDone,
    Event,
    GenerationWorker,
    Job,
    JobDone,
    JobFailed,
    OverloadedError,
    TextDelta,
)
from llmbox_engine.serve.loading import LoadedModel, load_model
from llmbox_engine.serve.prompts import PromptBuilder
from llmbox_engine.serve.sampling import SamplingParams
from llmbox_engine.serve.schemas import ChatRequest, CompletionRequest, parse
from llmbox_engine.serve.text import TextTracker
from llmbox_engine.serve.watch import AdapterError
from serve_helpers import QUESTION, Adapter, copy_adapter, trained_adapter


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: threads only wait for each other (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- text --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path) -> LoadedModel:
    return load_model(tiny_llama)


def stream_text(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    tracker = TextTracker(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(tracker.add(token))
        if tracker.stopped:
            break
    pieces.append(tracker.finish())
    return [p for p in pieces if p], tracker.stopped


def test_streamed_text_joins_to_the_decoded_text(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    text = "Paris is the capital of France. Water boils at 100 degrees — naïve café ☕ 42!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, stopped = stream_text(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text and not stopped
    assert "\ufffd" not in "".join(pieces[:-1])  # a split multi-byte character is held until complete


def test_stop_strings_are_cut_even_across_tokens(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer("The sum of two and two is four. Write a short poem.", add_special_tokens=False)["input_ids"]
    pieces, stopped = stream_text(tokenizer, ids, stop=("is four", "never"))
    assert "".join(pieces) == "The sum of two and two " and stopped
    assert all("is f" not in p for p in pieces)


# ---- requests ----------------------------------------------------------------------------------------------


def test_requests_are_checked_field_by_field() -> None:
    ok = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert ok.temperature == 0 and ok.choices == 1 and ok.stop_strings() == ()
    for body, param in [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ]:
        with pytest.raises(ApiError) as raised:
            parse(ChatRequest, body).conversation()
        assert raised.value.status == 400 and raised.value.param == param, raised.value.message
    assert parse(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    with pytest.raises(ApiError):
        parse(CompletionRequest, {"model": "m", "prompt": []}).prompts()


def test_prompts_use_the_chat_template_and_fit_the_context(loaded: LoadedModel) -> None:
    prompts = PromptBuilder(loaded.prompt_tokenizer, loaded.fallback_template, 64, loaded.vocab_size)
    ids = prompts.chat([{"role": "user", "content": "Hi"}])
    assert loaded.prompt_tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert prompts.completion_budget(len(ids), None) == 64 - len(ids)
    assert prompts.completion_budget(len(ids), 10**9) == 64 - len(ids)
    with pytest.raises(ApiError) as raised:
        prompts.chat([{"role": "user", "content": "word " * 100}])
    assert raised.value.code == "context_length_exceeded"
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.stop_ids


# ---- adapters ----------------------------------------------------------------------------------------------


def test_adapter_shapes_are_checked_against_the_model() -> None:
    layers = {"model.layers.0.q_proj": (64, 64), "model.layers.0.up_proj": (64, 128)}
    good = {
        "base_model.model.model.layers.0.up_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.0.up_proj.lora_B.weight": torch.zeros(128, 8),
    }
    check_shapes(good, layers, Path("a"))
    bad: list[tuple[dict[str, torch.Tensor], str]] = [
        ({**good, "base_model.model.model.layers.0.up_proj.lora_B.weight": torch.zeros(64, 8)}, "has shape"),
        ({"base_model.model.model.layers.9.q_proj.lora_A.weight": torch.zeros(8, 64)}, "no linear layer"),
        ({"base_model.model.model.layers.0.q_proj.lora_A.weight": torch.zeros(8, 64)}, "without its pair"),
        ({**good, "base_model.model.model.layers.0.up_proj.lora_B.weight": torch.zeros(128, 4)}, "ranks"),
        ({}, "no LoRA weights"),
    ]
    for state_dict, message in bad:
        with pytest.raises(AdapterError, match=message):
            check_shapes(state_dict, layers, Path("a"))


# ---- the worker --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path) -> dict[str, Adapter]:
    return {which: trained_adapter(tiny_llama, which) for which in ("a", "b")}


@pytest.fixture
def worker(tiny_llama: Path, adapters: dict[str, Adapter]) -> Iterator[GenerationWorker]:
    loaded = load_model(tiny_llama)  # fresh: adapters are loaded into the model itself
    worker = GenerationWorker(loaded, max_batch_size=4, max_concurrency=8)
    worker.load_adapter(read_adapter(adapters["a"].lora, loaded.linear_shapes, loaded.fingerprint))
    worker.start()
    yield worker
    worker.stop()


class Collector:
    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.fingerprint = ""

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def wait(self) -> Collector:
        while True:
            event = self.events.get(timeout=60)
            if isinstance(event, Admitted):
                self.fingerprint = event.fingerprint
            elif isinstance(event, TextDelta):
                self.texts[event.index] = self.texts.get(event.index, "") + event.text
            elif isinstance(event, ChoiceDone):
                self.finish[event.index] = event.finish_reason
            elif isinstance(event, JobFailed):
                raise AssertionError(event.message)
            elif isinstance(event, JobDone):
                return self


def job(worker: GenerationWorker, content: str, *, use_adapter: bool = False, max_tokens: int = 16, **kw: Any) -> Job:
    prompts = PromptBuilder(worker.loaded.prompt_tokenizer, worker.loaded.fallback_template, 512, 10**6)
    sampling = SamplingParams(**{"temperature": 0.0, **kw.pop("sampling", {})})
    ids = prompts.chat([{"role": "user", "content": content}])
    return Job([ids], [max_tokens], Collector(), sampling, use_adapter=use_adapter, **kw)


def run(worker: GenerationWorker, *jobs: Job) -> list[Collector]:
    for j in jobs:
        worker.submit(j)
    return [j.sink.wait() for j in jobs]  # type: ignore[attr-defined]


def test_batched_answers_equal_one_at_a_time(worker: GenerationWorker, adapters: dict[str, Adapter]) -> None:
    contents = [QUESTION, "Write a short poem about the sea and the sky", "2+2?", "What is the capital of France?"]

    def jobs() -> list[Job]:
        sampled = {"sampling": {"temperature": 0.8, "seed": 5}, "n": 2}
        return [job(worker, c, use_adapter=i % 2 == 0, **(sampled if i == 3 else {})) for i, c in enumerate(contents)]

    alone = [run(worker, j)[0] for j in jobs()]
    together = run(worker, *jobs())
    assert [c.texts for c in alone] == [c.texts for c in together]
    assert [c.finish for c in alone] == [c.finish for c in together]
    assert alone[0].texts[0] == adapters["a"].answer and alone[0].finish[0] == "stop"
    assert alone[1].finish[0] == "length" and set(alone[3].texts) == {0, 1}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3", "phi3", "gpt2"])
def test_every_family_batches_like_it_runs_alone(tiny_model_factory: Any, family: str) -> None:
    """Left padding, per-row positions and cache joins hold for each family (gemma3 has sliding-window layers)."""
    loaded = load_model(tiny_model_factory(family))
    worker = GenerationWorker(loaded, max_batch_size=4)
    worker.start()
    try:
        contents = ["Hi", "Write a short poem about the sea and the sky", "2+2?"]
        alone = [run(worker, job(worker, c, max_tokens=8))[0].texts for c in contents]
        first = job(worker, contents[1], max_tokens=40)
        collector: Collector = first.sink  # type: ignore[assignment]
        going = threading.Event()
        first.sink = lambda event: (collector(event), isinstance(event, TextDelta) and going.set())
        worker.submit(first)
        assert going.wait(30)
        together = [c.texts for c in run(worker, *(job(worker, c, max_tokens=8) for c in contents))]  # they join it
        collector.wait()
        assert together == alone
    finally:
        worker.stop()


def test_a_swap_waits_for_running_requests(worker: GenerationWorker, adapters: dict[str, Adapter]) -> None:
    a, b = adapters["a"], adapters["b"]
    files = read_adapter(b.lora, worker.loaded.linear_shapes, worker.loaded.fingerprint)
    started = job(worker, QUESTION, use_adapter=True)
    collector: Collector = started.sink  # type: ignore[assignment]
    offered = threading.Event()

    def offer_on_first_text(event: Event) -> None:
        collector(event)
        if isinstance(event, TextDelta) and not offered.is_set():
            offered.set()
            worker.offer_adapter(files)  # swapped in at the next step, while this request is mid-answer

    started.sink = offer_on_first_text
    worker.submit(started)
    collector.wait()
    assert collector.texts[0] == a.answer and collector.fingerprint == a.fingerprint
    after = run(worker, job(worker, QUESTION, use_adapter=True))[0]
    assert after.texts[0] == b.answer and after.fingerprint == b.fingerprint
    assert worker.current_adapter() is not None and worker.current_adapter().files.fingerprint == b.fingerprint  # type: ignore[union-attr]


def test_refused_adapters_leave_the_model_as_it_was(
    worker: GenerationWorker, adapters: dict[str, Adapter], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    before = run(worker, job(worker, QUESTION, use_adapter=True))[0].texts
    broken = copy_adapter(adapters["b"], tmp_path / "broken")
    files = read_adapter(broken, worker.loaded.linear_shapes, worker.loaded.fingerprint)
    files = dataclasses.replace(files, state_dict={k: v for i, (k, v) in enumerate(files.state_dict.items()) if i % 7})
    refusals: list[str] = []
    worker.on_adapter_refused = lambda files, reason: refusals.append(reason)
    worker.offer_adapter(files)
    assert run(worker, job(worker, QUESTION, use_adapter=True))[0].texts == before
    assert refusals and "do not match" in refusals[0]  # past the file checks, caught when loading into peft

    old = copy_adapter(adapters["b"], tmp_path / "old")
    torch.save(load_file(str(old / "adapter_model.safetensors")), old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    worker.offer_adapter(read_adapter(old, worker.loaded.linear_shapes, worker.loaded.fingerprint))
    assert run(worker, job(worker, QUESTION, use_adapter=True))[0].texts[0] == adapters["b"].answer


def test_cancelled_jobs_leave_and_free_their_slot(worker: GenerationWorker) -> None:
    long = job(worker, "Write a short poem", max_tokens=400)
    seen = threading.Event()
    collector: Collector = long.sink  # type: ignore[assignment]

    def cancel_on_text(event: Event) -> None:
        collector(event)
        if isinstance(event, TextDelta):
            long.cancel()
            seen.set()

    long.sink = cancel_on_text
    worker.submit(long)
    assert seen.wait(30)
    short = run(worker, job(worker, "2+2?", max_tokens=3))[0]
    assert short.finish == {0: "length"} and worker.in_flight == 0
    texts = [e for e in list(collector.events.queue) if isinstance(e, TextDelta)]
    assert len(texts) < 10  # it stopped within a step or two of the cancel, not after 400 tokens


def test_max_concurrency_counts_queued_and_running(worker: GenerationWorker) -> None:
    jobs = [job(worker, "Write a short poem", max_tokens=50) for _ in range(8)]
    for j in jobs:
        worker.submit(j)
    with pytest.raises(OverloadedError, match="max-concurrency 8"):
        worker.submit(job(worker, "2+2?"))
    for j in jobs:
        j.cancel()


# ---- the host command --------------------------------------------------------------------------------------


def host_serve(monkeypatch: pytest.MonkeyPatch, runtime: str, *args: str) -> dict[str, Any]:
    """`llmbox serve ARGS` with the engine (or the container) replaced by a recorder."""
    from click.testing import CliRunner

    from llmbox import main
    from llmbox.runtime import docker

    seen: dict[str, Any] = {}

    def engine(command: str, argv: list[str], needs: tuple[str, ...] = ()) -> int:
        seen.update(command=command, argv=argv, key=os.environ.get("LLMBOX_API_KEY"), needs=needs)
        return 0

    def container(spec: docker.ContainerSpec) -> int:
        seen.update(spec=spec)
        return 0

    # the local runtime hands the key on through os.environ: set then delete, so the undo removes what serve sets
    monkeypatch.setenv("LLMBOX_API_KEY", "")
    monkeypatch.delenv("LLMBOX_API_KEY")
    monkeypatch.setattr(main, "choose_runtime", lambda asked: runtime)
    monkeypatch.setattr(main, "run_engine", engine)
    monkeypatch.setattr(main, "engine_image", lambda image, gpus, vllm: (docker.image_tag(cuda=False, vllm=vllm), None))
    monkeypatch.setattr(main, "_has_gpus", lambda: False)
    monkeypatch.setattr(docker, "run_container", container)
    result = CliRunner().invoke(main.cli, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen


def test_the_host_command_hands_the_engine_its_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "mymodel"
    (home / "model").mkdir(parents=True)
    (home / "model" / "config.json").write_text("{}")
    seen = host_serve(monkeypatch, "local", str(home), "--api-key", "sekrit", "--port", "9001")
    assert seen["command"] == "serve" and seen["key"] == "sekrit" and "sekrit" not in seen["argv"]
    argv = seen["argv"]
    assert argv[:4] == ["--model-path", str(home / "model"), "--adapter-dir", str(home / "lora")]
    assert argv[argv.index("--port") + 1] == "9001" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--adapter-dir" not in host_serve(monkeypatch, "local", str(home), "--no-lora")["argv"]

    spec = host_serve(monkeypatch, "docker", str(home), "--api-key", "sekrit")["spec"]
    assert [(m.source, m.target, m.read_only) for m in spec.mounts] == [
        (home / "model", "/model", True),
        (home, "/adapters", True),  # lora/'s parent: a rename of lora/ shows through
    ]
    assert spec.command[spec.command.index("--adapter-dir") + 1] == "/adapters/lora"
    assert "sekrit" not in spec.command and ("LLMBOX_API_KEY", "sekrit") in spec.secrets
    assert "sekrit" not in " ".join(spec.run_args(1000, 1000))  # not even in the docker client's argv
    assert spec.image == "llmbox/engine:cpu" and spec.command[spec.command.index("--engine") + 1] == "llmbox"


def test_the_engine_option_chooses_the_image_and_what_the_local_engine_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "mymodel"
    (home / "model").mkdir(parents=True)
    (home / "model" / "config.json").write_text("{}")
    spec = host_serve(monkeypatch, "docker", str(home), "--engine", "vllm", "--max-lora-rank", "16")["spec"]
    assert spec.image == "llmbox/vllm:cpu" and spec.command[spec.command.index("--engine") + 1] == "vllm"
    assert spec.command[spec.command.index("--max-lora-rank") + 1] == "16"
    local = host_serve(monkeypatch, "local", str(home), "--engine", "vllm")
    assert local["needs"] == ("llmbox_engine",)  # vLLM may live in a Python of its own: torch is not needed here
    assert "torch" in host_serve(monkeypatch, "local", str(home))["needs"]
