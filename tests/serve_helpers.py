"""Serving tests' helpers: tiny adapters trained once per session, the real server as a subprocess, raw HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from conftest import free_port, write_json
from train_helpers import train

QUESTION = "What is item 3?"
ANSWERS = {"a": "red blue", "b": "green cat"}  # what each adapter learns to answer to every question


@dataclass(frozen=True)
class Adapter:
    lora: Path  # a trained lora/ folder (adapter_config.json, adapter_model.safetensors, adapter_info.json)
    answer: str

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.lora / "adapter_info.json").read_text())  # type: ignore[no-any-return]

    @property
    def fingerprint(self) -> str:
        return hashlib.blake2b((self.lora / "adapter_model.safetensors").read_bytes(), digest_size=16).hexdigest()


@cache
def trained_adapter(base: Path, which: str) -> Adapter:
    """An adapter that answers every question with ANSWERS[which] and stops: a few seconds of training."""
    out = base.parent / f"serve-adapter-{which}"
    if not (out / "lora" / "adapter_model.safetensors").is_file():
        records = [{"question": f"What is item {i}?", "answer": ANSWERS[which]} for i in range(8)]
        data = write_json(out / "data.json", records)
        train(base, out, data, epochs=6, force_epochs=True, learning_rate=3e-2, validation_split=0.0, batch_size=8)
    return Adapter(out / "lora", ANSWERS[which])


def copy_model_home(base: Path, home: Path) -> Path:
    """A model directory as `llmbox install` makes it: home/model/ holds the weights, lora/ goes beside."""
    (home / "model").mkdir(parents=True)
    for item in base.iterdir():
        if item.is_file():
            (home / "model" / item.name).write_bytes(item.read_bytes())
    return home


def copy_adapter(adapter: Adapter, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in adapter.lora.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL, so no server is left behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@dataclass
class Server:
    port: int
    log: Path
    process: subprocess.Popen[bytes]
    api_key: str | None = None
    health_seen: set[tuple[int, str]] = field(default_factory=set)  # (status, body) answers while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, api_key: str | None = None) -> Any:
        from openai import OpenAI

        key = self.api_key or "none" if api_key is None else api_key
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def async_client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=120)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """A raw HTTP request (the key sent unless `headers` replace it); the status and the JSON body."""
        sent = {"Content-Type": "application/json"}
        if self.api_key:
            sent["Authorization"] = f"Bearer {self.api_key}"
        sent.update(headers or {})
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(self, path: str, value: Any) -> tuple[int, Any]:
        return self.request("POST", path, json.dumps(value).encode())

    def wait_until_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    self.health_seen.add((response.status, response.read().decode()))
                    return
            except urllib.error.HTTPError as exc:
                self.health_seen.add((exc.code, exc.read().decode()))
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def wait_for_output(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not in the server's output:\n{self.output()}")
            time.sleep(0.1)


VLLM_SHUTDOWN = "[shutdown] API server: shutdown triggered"


@contextmanager
def running_server(
    args: list[str],
    log: Path,
    api_key: str | None = None,
    host_cli: bool = False,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120,
) -> Iterator[Server]:
    """`python -m llmbox_engine serve ARGS` (or `llmbox serve ARGS`) on a free port, stopped with SIGTERM."""
    port = free_port()
    command = (
        [str(Path(sys.executable).with_name("llmbox")), "serve"]
        if host_cli
        else [sys.executable, "-m", "llmbox_engine", "serve"]
    )
    given = env or {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **given}
    if "LLMBOX_VLLM_PYTHON" not in given:  # `make test` sets it for the vLLM tests; the others serve on llmbox's
        env.pop("LLMBOX_VLLM_PYTHON", None)
    env.pop("LLMBOX_API_KEY", None)
    if api_key:
        env["LLMBOX_API_KEY"] = api_key
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, *args, "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
    server = Server(port, log, process, api_key)
    try:
        server.wait_until_ready(ready_timeout)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # cancelled streams, bad requests and reloads must never show up as crashes (vLLM 0.32's own shutdown logs
    # its output handler meeting the stopped engine: what follows its "[shutdown]" lines is not checked)
    running = server.output().split(VLLM_SHUTDOWN)[0]
    assert "Traceback" not in running, server.output()


def chat(client: Any, model: str, content: str = QUESTION, **options: Any) -> Any:
    params = {"temperature": 0, "max_tokens": 16, **options}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **params)
