"""TensorBoard, bound to loopback: beside a training run, alone (`llmbox tensorboard`, `--tensorboard-only`).

It always runs through `python -m llmbox_engine tensorboard`, so it holds the lifeline like every engine
process: the sidecar of a training run dies with the run, even one killed with SIGKILL.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from llmbox.runtime.attached import spawn_tied


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) != 0


def command(logdir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "llmbox_engine", "tensorboard", "--logdir", str(logdir), "--host", host,
            "--port", str(port)]  # fmt: skip


def start(logdir: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes] | None:
    """Start TensorBoard in the background; None (with a note) when the port is taken, e.g. by another run's."""
    if not port_free(port, host):
        print(f"tensorboard: port {port} is in use (another TensorBoard?); logs still go to {logdir}", flush=True)
        return None
    logdir.mkdir(parents=True, exist_ok=True)
    process = spawn_tied(command(logdir, port, host), quiet=True)
    print(f"tensorboard: http://{host}:{port}/  (logs in {logdir})", flush=True)
    return process


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def serve_forever(logdir: Path, port: int, host: str = "127.0.0.1") -> None:
    """TensorBoard in this process until SIGTERM or Ctrl+C (its own handler exits cleanly on SIGTERM)."""
    from tensorboard import default, main_lib, program

    main_lib.global_init()
    board = program.TensorBoard(plugins=default.get_plugins())
    board.configure(argv=[None, "--logdir", str(logdir), "--host", host, "--port", str(port)])
    try:
        board.main()
    except KeyboardInterrupt:
        print("tensorboard stopped", file=sys.stderr)
