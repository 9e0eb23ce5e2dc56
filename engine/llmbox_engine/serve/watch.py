"""An adapter folder's files, and watching it for the new adapter training publishes (torch-free: vLLM's
supervisor uses both too).

Training publishes `lora/` by renaming a finished folder into place (the previous one becomes `lora.prev/`),
so the watcher sees the old folder, no folder for an instant, or the new one. It polls a cheap signature
(inode, mtime and size of the folder and its files) and, when it changes, hands the folder to a reader that
checks it entirely off the model: the server only swaps in an adapter that already passed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from llmbox_engine.train.artifacts import ADAPTER_INFO

log = logging.getLogger("llmbox.serve")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # .bin: adapters saved by older peft

Signature = tuple[tuple[str, int, int, int], ...]
Read = TypeVar("Read")


class AdapterError(Exception):
    """An adapter folder that cannot be served; the message says why."""


def read_info(folder: Path) -> dict[str, Any]:
    """adapter_info.json's contents ({} without one); AdapterError when it is unreadable or not a JSON object."""
    path = folder / ADAPTER_INFO
    return read_json(path) if path.exists() else {}


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return value


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def signature(folder: Path) -> Signature | None:
    """What changes when the folder is replaced or a file in it rewritten; None while it is missing."""
    entries = []
    for path in (folder, *(folder / name for name in (CONFIG_FILE, ADAPTER_INFO, *WEIGHT_FILES))):
        try:
            st = path.stat()
        except OSError:
            if path == folder:
                return None
            continue
        entries.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(entries)


class AdapterWatcher(threading.Thread, Generic[Read]):
    """Polls an adapter folder; a changed, valid adapter goes to `on_adapter`, a broken one is logged and skipped."""

    def __init__(
        self,
        folder: Path,
        read: Callable[[Path], Read],
        on_adapter: Callable[[Read], None],
        seen: Signature | None,
        interval: float = 1.0,
    ) -> None:
        super().__init__(name="adapter-watcher", daemon=True)
        self.folder = folder
        self.read = read
        self.on_adapter = on_adapter
        self.seen = seen
        self.interval = interval
        self._halt = threading.Event()
        self._missing_logged = False

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise; the next poll tries again
                log.exception("adapter watcher: unexpected error")

    def poll(self) -> None:
        current = signature(self.folder)
        if current is None:
            if not self._missing_logged and self.seen is not None:
                log.info("adapter: %s is missing; the current adapter keeps serving", self.folder)
            self._missing_logged = True
            return
        self._missing_logged = False
        if current == self.seen:
            return
        # a folder copied in by hand may still be growing: read it once it holds still for a moment
        if self._halt.wait(min(0.2, self.interval)) or signature(self.folder) != current:
            return
        self.seen = current
        try:
            files = self.read(self.folder)
        except AdapterError as exc:
            log.warning("adapter refused, the current one keeps serving: %s", exc)
            return
        self.on_adapter(files)
