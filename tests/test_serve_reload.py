"""Hot reload: training publishes a new lora/ while requests flow; broken adapters are refused. Via `llmbox serve`."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmbox_engine.train.artifacts import publish_adapter
from serve_helpers import ANSWERS, Adapter, Server, chat, copy_adapter, copy_model_home, running_server, trained_adapter

NAME = "reloading"  # the model directory, so the model ids are `reloading` and `reloading:lora`


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path) -> dict[str, Adapter]:
    return {which: trained_adapter(tiny_llama, which) for which in ANSWERS}


@pytest.fixture(scope="module")
def home(tiny_llama: Path, adapters: dict[str, Adapter], tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = copy_model_home(tiny_llama, tmp_path_factory.mktemp("serve-reload") / NAME)
    publish_adapter(adapters["a"].lora, home / "lora", adapters["a"].info)
    return home


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    # the host command, as a user runs it: MODEL resolves to home/model and home/lora
    args = [str(home), "--runtime", "local", "--threads", "1"]
    with running_server(args, home.parent / "server.log", host_cli=True) as running:
        yield running


def current_adapter(server: Server) -> dict[str, Any]:
    models = {m.id: m for m in server.client().models.list()}
    return models[f"{NAME}:lora"].model_extra["llmbox"]  # type: ignore[no-any-return]


def wait_for_adapter(server: Server, fingerprint: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while current_adapter(server)["fingerprint"] != fingerprint:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)


def publish_folder(folder: Path, home: Path) -> None:
    """What training does: the finished folder renamed into place, the old one kept as lora.prev."""
    lora, previous = home / "lora", home / "lora.prev"
    shutil.rmtree(previous, ignore_errors=True)
    lora.rename(previous)
    folder.rename(lora)


def test_a_new_adapter_is_served_without_restart_or_failed_requests(
    server: Server, home: Path, adapters: dict[str, Adapter]
) -> None:
    a, b = adapters["a"], adapters["b"]
    assert f"adapter: {home / 'lora'}" in server.output()
    assert current_adapter(server)["fingerprint"] == a.fingerprint
    per_thread: list[list[tuple[str, str]]] = [[], [], []]
    results: list[tuple[str, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic(mine: list[tuple[str, str]]) -> None:
        client = server.client()
        while not stop.is_set():
            try:
                answer = chat(client, f"{NAME}:lora", max_tokens=8)
            except Exception as exc:
                errors.append(repr(exc))
                continue
            mine.append((answer.system_fingerprint, answer.choices[0].message.content))
            results.append(mine[-1])

    threads = [threading.Thread(target=traffic, args=(mine,)) for mine in per_thread]
    for t in threads:
        t.start()
    try:
        while len(results) < 6 and not errors:
            time.sleep(0.05)
        publish_adapter(b.lora, home / "lora", b.info)  # exactly what the end of a training run does
        wait_for_adapter(server, b.fingerprint)
        seen = len(results)
        while len(results) < seen + 6 and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    answer_of = {a.fingerprint: a.answer, b.fingerprint: b.answer}
    assert all(answer_of[fingerprint] == text for fingerprint, text in results), results
    assert results[0][0] == a.fingerprint and results[-1][0] == b.fingerprint
    for mine in per_thread:  # a client's requests, one after another: once on the new adapter, never back
        fingerprints = [fingerprint for fingerprint, _ in mine]
        assert fingerprints == sorted(fingerprints, key=lambda f: f == b.fingerprint), fingerprints
    assert current_adapter(server)["created_at"] == b.info["created_at"]
    server.wait_for_output("adapter reloaded")
    assert (home / "lora.prev" / "adapter_model.safetensors").is_file()


def broken_copies(adapter: Adapter, root: Path) -> dict[str, Path]:
    root.mkdir()
    folders = {name: copy_adapter(adapter, root / name) for name in ("corrupt", "bad-json", "shapes", "no-weights")}
    weights = folders["corrupt"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folders["bad-json"] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folders["shapes"] / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(folders["shapes"] / "adapter_model.safetensors"))
    (folders["no-weights"] / "adapter_model.safetensors").unlink()
    return folders


def test_broken_adapters_are_refused_and_the_current_one_keeps_serving(
    server: Server, home: Path, adapters: dict[str, Adapter], tmp_path: Path
) -> None:
    before = current_adapter(server)
    expected = chat(server.client(), f"{NAME}:lora").choices[0].message.content
    refusals = server.output().count("adapter refused")
    for name, folder in broken_copies(adapters["a"], tmp_path / "broken").items():
        publish_folder(folder, home)
        refusals += 1
        server.wait_for_output("adapter refused", count=refusals)
        assert current_adapter(server) == before, name
        assert chat(server.client(), f"{NAME}:lora").choices[0].message.content == expected, name
    refused = [line for line in server.output().splitlines() if "adapter refused" in line]
    for fragment in ("corrupt weights", "malformed JSON", "has shape", "no adapter_model.safetensors"):
        assert any(fragment in line for line in refused), (fragment, refused)


def test_a_missing_folder_keeps_the_adapter_and_old_bin_adapters_load(
    server: Server, home: Path, adapters: dict[str, Adapter], tmp_path: Path
) -> None:
    before = current_adapter(server)
    (home / "lora").rename(home / "lora.away")  # as between training's two renames, only longer
    server.wait_for_output("is missing; the current adapter keeps serving")
    assert current_adapter(server) == before
    assert chat(server.client(), f"{NAME}:lora").choices[0].message.content in ANSWERS.values()

    from safetensors.torch import load_file

    a = adapters["a"]
    old = copy_adapter(a, tmp_path / "old-style")
    torch.save(load_file(str(old / "adapter_model.safetensors")), old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    old.rename(home / "lora")
    deadline = time.monotonic() + 30
    while current_adapter(server) == before:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    assert chat(server.client(), f"{NAME}:lora").choices[0].message.content == a.answer
