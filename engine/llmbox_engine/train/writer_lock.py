"""One training per model directory: an exclusive lock on `<output>/.llmbox-train.lock` for the whole run.

`flock` is held by the open file, so the kernel releases it when the process ends, however it ends: a lock
is never left stale. It works across the container boundary (the engine in a container locks the same
host file through the bind mount). The file names its holder, for the error a second training prints.
`serve` never takes it: it reads while training publishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from llmbox.errors import UserError

LOCK_NAME = ".llmbox-train.lock"
# set by the docker runtime: inside a container our pid means nothing on the host, the container's name does
CONTAINER_ENV = "LLMBOX_CONTAINER_NAME"


@contextmanager
def exclusive_writer(directory: Path) -> Iterator[None]:
    """Hold the model directory's training lock, or stop at once naming who holds it."""
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy_message(directory, read_holder(fd))) from None
        name_holder(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def name_holder(fd: int) -> None:
    """Say who holds the lock, over the last holder's words (no new space needed, the file's block is there).
    Best effort: the lock itself is what keeps a second training out, and a full disk must not stop the run
    before its own error can say so."""
    text = json.dumps(this_holder()).encode()
    with contextlib.suppress(OSError):
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))


def this_holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "container": os.environ.get(CONTAINER_ENV),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def read_holder(fd: int) -> dict[str, Any]:
    """What the holder wrote; {} while it has not written yet (it has the lock, not yet the words)."""
    try:
        text = os.pread(fd, 65536, 0).decode()
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def busy_message(directory: Path, holder: dict[str, Any]) -> str:
    started = f", started {holder['started']}" if holder.get("started") else ""
    if holder.get("container"):
        name = holder["container"]
        who = f"the container {name}{started}"
        how = f"`docker kill --signal INT {name}` (it saves the adapter, then stops)"
    elif holder.get("pid"):
        pid = holder["pid"]
        here = holder.get("host") in (None, socket.gethostname())
        who = f"process {pid}{'' if here else ' on host ' + str(holder['host'])}{started}"
        how = f"`kill -INT {pid}`{'' if here else ' there'} (it saves the adapter, then stops)"
    else:
        who, how = "another training that is just starting", "stopping that training"
    return f"{directory} is being trained by {who}: wait for it to finish, or stop it with {how}"
