"""Start vLLM's server, say when it is ready, and hand it each adapter training publishes; then wait for it.

vLLM listens on the user's port itself: requests never pass through this process. What it adds is what
`llmbox serve` promises on either engine: the adapter checked before vLLM sees it, the `<name>:lora` id, the
key kept off command lines, and the adapter that training publishes loaded without a restart. A new adapter
is loaded under a fresh vLLM id (unload, then load, the same public name): requests already running keep the
one they started with, new requests get the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from llmbox.errors import UserError
from llmbox_engine.host_view import host_path, model_name
from llmbox_engine.serve.watch import AdapterError, AdapterWatcher, signature
from llmbox_engine.serve_vllm.adapter import VLLM_LORA_RANKS, VllmAdapter, max_lora_rank, snapshot
from llmbox_engine.serve_vllm.command import VllmLaunch, vllm_argv, vllm_env

# --max-lora-rank when no adapter exists yet to size it from: covers the ranks the planner picks
RANK_WITHOUT_ADAPTER = 64


@dataclass(frozen=True)
class VllmConfig:
    model_path: Path
    adapter_dir: Path | None  # None: --no-lora
    python: str  # the interpreter that has vLLM
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str = "auto"
    max_num_seqs: int | None = None
    max_lora_rank: int | None = None  # None: from the adapter
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    trust_remote_code: bool = False
    extra_args: tuple[str, ...] = ()
    cpu: bool = False  # no GPU: vLLM's CPU backend, whose KV cache is sized in GiB
    poll_interval: float = 1.0


def say(message: str) -> None:
    print(message, flush=True)


def run_vllm(config: VllmConfig) -> int:
    snapshots = Path(tempfile.mkdtemp(prefix="llmbox-vllm-adapters-"))
    try:
        return _serve(config, snapshots)
    finally:
        shutil.rmtree(snapshots, ignore_errors=True)


def _serve(config: VllmConfig, snapshots: Path) -> int:
    if config.max_lora_rank is not None and config.max_lora_rank not in VLLM_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_LORA_RANKS))
        raise UserError(f"--max-lora-rank {config.max_lora_rank}: vLLM takes one of {allowed}")
    name = model_name(config.model_path)
    adapters = _Snapshots(snapshots)
    first = _first_adapter(config.adapter_dir, adapters) if config.adapter_dir else None
    rank = None
    if config.adapter_dir is not None:
        rank = config.max_lora_rank or (max_lora_rank(first.rank) if first else RANK_WITHOUT_ADAPTER)
    launch = VllmLaunch(
        python=config.python, model_path=config.model_path, served_name=name, host=config.host, port=config.port,
        dtype=config.dtype, max_num_seqs=config.max_num_seqs, lora_rank=rank,
        first_adapter=first.path if first else None, tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=config.max_model_len, trust_remote_code=config.trust_remote_code, extra_args=config.extra_args,
    )  # fmt: skip
    url = f"http://{_client_host(config.host)}:{config.port}"
    say(f"serving on {url}/v1 with vLLM (loading {host_path(config.model_path)}; the port opens when it is ready)")
    if rank is not None:
        say(f"LoRA: up to rank {rank} (--max-lora-rank; {'from the adapter' if first else 'no adapter yet'})")
    process = _start(vllm_argv(launch), vllm_env(os.environ, config.api_key, lora=rank is not None, cpu=config.cpu))
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        if process.poll() is None:
            process.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    watcher = None
    if _wait_until_ready(url, process, stopping):
        ids = [name] if rank is None else [name, launch.adapter_id]
        say(f"ready: {', '.join(ids)}  (vLLM, pid {process.pid})")
        if config.adapter_dir is None:
            say("adapter: off (--no-lora): serving the base model alone")
        else:
            loader = _AdapterLoader(url, config.api_key, launch.adapter_id, name, rank or 0, loaded=first is not None)
            seen = first.signature if first else None
            watcher = AdapterWatcher(config.adapter_dir, adapters.take, loader.load, seen, config.poll_interval)
            watcher.start()
    code = process.wait()
    if watcher is not None:
        watcher.stop()
    if stopping.is_set():
        return 0
    raise UserError(f"vLLM's server exited with status {code} (its log is above)")


def _first_adapter(folder: Path, adapters: _Snapshots) -> VllmAdapter | None:
    if signature(folder) is None:
        say(f"adapter: none in {host_path(folder)} yet: serving the base model, and the adapter once training "
            "publishes one")  # fmt: skip
        return None
    try:
        adapter = adapters.take(folder)
    except AdapterError as exc:
        say(f"adapter refused: {exc}; serving the base model, and watching {host_path(folder)} for a new adapter")
        return None
    say(f"adapter: {adapter.describe()}")
    return adapter


class _Snapshots:
    """Numbered snapshot folders, one per adapter seen, kept while the server runs (see adapter.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def take(self, folder: Path) -> VllmAdapter:
        self.count += 1
        return snapshot(folder, self.root / f"v{self.count}")


class _AdapterLoader:
    """Loads a newly published adapter into the running server through vLLM's runtime LoRA endpoints."""

    def __init__(self, url: str, api_key: str | None, adapter_id: str, base: str, rank: int, loaded: bool) -> None:
        self.url = url
        self.api_key = api_key
        self.adapter_id = adapter_id
        self.base = base
        self.rank = rank
        self.loaded = loaded

    def load(self, adapter: VllmAdapter) -> None:
        if adapter.rank > self.rank:
            say(f"adapter refused, the current one keeps serving: {host_path(adapter.source)} has rank {adapter.rank}, "
                f"above the {self.rank} this server started with: restart `llmbox serve` (or start it with "
                f"--max-lora-rank {max_lora_rank(adapter.rank)})")  # fmt: skip
            return
        if self.loaded:  # the id's requests in flight keep their adapter: vLLM gives the next load a new one
            self._post("/v1/unload_lora_adapter", {"lora_name": self.adapter_id})
            self.loaded = False
        status, body = self._post("/v1/load_lora_adapter", {"lora_name": self.adapter_id,
                                                             "lora_path": str(adapter.path),
                                                             "base_model_name": self.base})  # fmt: skip
        if status == 200:
            self.loaded = True
            say(f"adapter reloaded: {adapter.describe()}  model id: {self.adapter_id}")
        else:
            say(f"adapter refused by vLLM ({status}): {body}")

    def _post(self, path: str, value: dict[str, Any]) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, data=json.dumps(value).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # its own session: a terminal's Ctrl+C reaches this process alone, which passes it on once
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)  # fmt: skip


def _die_with_parent() -> None:
    """Linux: vLLM gets SIGTERM if this process dies, even by SIGKILL (started from the main thread, which lives
    as long as the process)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _wait_until_ready(url: str, process: subprocess.Popen[bytes], stopping: threading.Event) -> bool:
    started = time.monotonic()
    while process.poll() is None and not stopping.is_set():
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=5) as response:
            if response.status == 200:
                say(f"vLLM ready after {time.monotonic() - started:.0f} s")
                return True
        stopping.wait(0.5)
    return False


def _client_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
