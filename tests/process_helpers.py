"""Driving llmbox as a pipeline or a terminal does: real processes, real signals, and the process tree they leave."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LLMBOX = str(Path(sys.executable).with_name("llmbox"))
# training that only a signal ends: no auto-stop, no epoch limit
NEVER_STOPS = ["--mode", "non-stop", "--patience", "100000", "--overfitting-threshold", "1000"]


def start_training(
    model: Path | str,
    out: Path | None,
    data: Path,
    *extra: str,
    host_cli: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    output = ["--output", str(out)] if out is not None else []
    flags = ["--data", str(data), *output, "--skip-test", *NEVER_STOPS, *extra]
    if host_cli:
        command = [LLMBOX, "train", str(model), *flags]
        if "--runtime" not in extra:
            command += ["--runtime", "local"]
    else:
        command = [sys.executable, "-m", "llmbox_engine", "train", "--model-path", str(model), *flags]
    if "--tensorboard-port" not in extra:
        command.append("--no-tensorboard")
    # a session of its own, like a terminal's foreground job: Ctrl+C goes to the whole group
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=takes_ctrl_c, env={**os.environ, **(env or {})},
    )  # fmt: skip


def takes_ctrl_c() -> None:
    """In the child: SIGINT as a terminal's foreground job has it, even when the tests run from a background
    shell, which starts them with SIGINT ignored (and Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children of each of its threads, then theirs)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(children - found)
            found |= children
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, already dead and waiting to be reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The processes among `pids` still running after up to `timeout` seconds (empty: all ended)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if alive(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def port_free(port: int) -> bool:
    """A new server could listen on `port` (as servers do, past the TIME_WAIT of connections already closed)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True
