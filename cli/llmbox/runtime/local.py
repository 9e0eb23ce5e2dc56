"""Run an engine command as a local process, with the same argv a container would get."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from llmbox.errors import UserError

ENGINE_PACKAGES = ("torch", "transformers", "peft", "datasets")


def engine_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ENGINE_PACKAGES)


def run_engine(command: str, argv: Sequence[str]) -> int:
    """Run `python -m llmbox_engine COMMAND ARGV...`; its output streams straight to the terminal.

    Ctrl+C reaches the engine from the terminal itself (same process group), and the engine decides what
    it means (save and stop, or abort on the second); this process only waits for it. SIGTERM sent to
    this process is passed on, so a supervisor stopping llmbox stops training cleanly too.
    """
    missing = [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"the engine's packages are not installed here ({', '.join(missing)} missing): "
            "pip install 'llmbox[engine]', or run in the container with --runtime docker"
        )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "llmbox_engine", command, *argv], env=env)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
