"""`serve`: the HTTP server up at once (/health says "loading"), the weights loaded beside it, then the adapter.

Loading runs in a thread so the server answers /health while it lasts; a failed load stops the server with
the reason. The adapter watcher and the generation worker start once the weights are in.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from llmbox.errors import UserError
from llmbox_engine.host_view import host_path, model_name
from llmbox_engine.serve.adapters import AdapterFiles, read_adapter
from llmbox_engine.serve.app import MAX_BODY_BYTES, create_app
from llmbox_engine.serve.generation import AdapterMeta, GenerationWorker
from llmbox_engine.serve.images import ImagePolicy
from llmbox_engine.serve.loading import LoadedModel, base_weights_for, load_model
from llmbox_engine.serve.service import Service
from llmbox_engine.serve.watch import AdapterError, AdapterWatcher, signature

log = logging.getLogger("llmbox.serve")


@dataclass(frozen=True)
class ServeConfig:
    model_path: Path
    adapter_dir: Path | None  # None: --no-lora
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_concurrency: int = 64
    max_batch_size: int = 16
    dtype: str = "auto"
    base_weights: str = "auto"  # auto, full, 4bit or 8bit (loading.base_weights_for)
    threads: int | None = None  # torch's intra-op threads; None: its default
    trust_remote_code: bool = False
    poll_interval: float = 1.0
    max_body_bytes: int = MAX_BODY_BYTES
    image_dir: Path | None = None  # chat requests may name image files under it (else data URLs only)


def say(message: str) -> None:
    print(message, flush=True)


def run_server(config: ServeConfig) -> None:
    import uvicorn

    _check_port(config.host, config.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    service = Service(model_name(config.model_path), ImagePolicy(config.image_dir))
    app = create_app(service, config.api_key, config.max_body_bytes)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=3,
        )
    )  # fmt: skip
    loader = _Loader(config, service, server)
    say(f"serving on http://{_url_host(config.host)}:{config.port}/v1 (loading {host_path(config.model_path)} ...)")
    loader.start()
    server.run()
    loader.shutdown()
    if loader.failure is not None:
        raise UserError(f"could not load {config.model_path}: {loader.failure}")


class _Loader(threading.Thread):
    def __init__(self, config: ServeConfig, service: Service, server: object) -> None:
        super().__init__(name="model-loader", daemon=True)
        self.config = config
        self.service = service
        self.server = server
        self.failure: BaseException | None = None
        self.worker: GenerationWorker | None = None
        self.watcher: AdapterWatcher[AdapterFiles] | None = None

    def run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # any failure must stop the server, not leave it "loading" forever
            log.debug("loading failed", exc_info=True)  # the reason is the one `error:` line run_server ends with
            self.failure = exc
            self.server.should_exit = True  # type: ignore[attr-defined]

    def _load(self) -> None:
        c = self.config
        if c.threads is not None:
            import torch

            # process-wide: a split of small matrix products over cores that other work keeps busy costs more
            # in waiting for each other than it saves
            torch.set_num_threads(c.threads)
        weights, why = base_weights_for(c.base_weights, c.adapter_dir)
        loaded = load_model(c.model_path, c.dtype, c.trust_remote_code, weights)
        held = str(loaded.dtype).removeprefix("torch.") if weights == "full" else f"{weights} ({why})"
        say(
            f"base model: {loaded.path} ({loaded.model_type}, {held} on {loaded.device.type}, "
            f"context {loaded.context_length} tokens)  model id: {self.service.base_id}"
        )
        worker = GenerationWorker(loaded, max_batch_size=c.max_batch_size, max_concurrency=c.max_concurrency)
        worker.on_adapter_loaded = partial(_reloaded, self.service)
        worker.on_adapter_refused = _refused
        self.worker = worker
        if c.adapter_dir is None:
            say("adapter: off (--no-lora): serving the base model alone")
        else:
            self.watcher = self._first_adapter(loaded, worker, c.adapter_dir)
        worker.start()
        if self.watcher is not None:
            self.watcher.start()
        self.service.attach(loaded, worker)
        ids = ", ".join(self.service.model_ids())
        say(f"ready: {ids}  (max {c.max_concurrency} requests at once, batches of up to {c.max_batch_size})")

    def _first_adapter(
        self, loaded: LoadedModel, worker: GenerationWorker, folder: Path
    ) -> AdapterWatcher[AdapterFiles]:
        read = partial(read_adapter, linear_shapes=loaded.linear_shapes, base_fingerprint=loaded.fingerprint)
        seen = signature(folder)
        if seen is None:
            say(f"adapter: none in {folder} yet: serving the base model, and the adapter once training publishes one")
        else:
            try:
                files = read(folder)
                worker.load_adapter(files)
                say(f"adapter: {files.describe()}  model id: {self.service.adapter_id}")
                _warn_base(files)
            except AdapterError as exc:
                say(f"adapter refused: {exc}; serving the base model, and watching {folder} for a new adapter")
        return AdapterWatcher(folder, read, worker.offer_adapter, seen, self.config.poll_interval)

    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop()


def _reloaded(service: Service, meta: AdapterMeta) -> None:
    log.info("adapter reloaded: %s  model id: %s", meta.files.describe(), service.adapter_id)
    _warn_base(meta.files)


def _refused(files: AdapterFiles, reason: str) -> None:
    log.warning("adapter refused, the current one keeps serving: %s", reason)


def _warn_base(files: AdapterFiles) -> None:
    if not files.base_matches:
        log.warning("adapter %s was trained on other base weights (fingerprint differs); serving it anyway", files.path)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (pick another --port)") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
