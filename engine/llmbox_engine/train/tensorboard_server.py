"""A TensorBoard server beside a training run (or alone, for `--tensorboard-only`), bound to loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) != 0


def command(logdir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def start(logdir: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes] | None:
    """Start TensorBoard in the background; None (with a note) when the port is taken, e.g. by another run's."""
    if not port_free(port, host):
        print(f"tensorboard: port {port} is in use (another TensorBoard?); logs still go to {logdir}", flush=True)
        return None
    logdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command(logdir, port, host), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"tensorboard: http://{host}:{port}/  (logs in {logdir})", flush=True)
    return process


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
