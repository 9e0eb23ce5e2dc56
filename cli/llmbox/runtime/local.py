"""Run an engine command as a local process, with the same argv a container would get."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from llmbox.errors import UserError
from llmbox.runtime.attached import run_attached

ENGINE_PACKAGES = ("torch", "transformers", "peft", "datasets")


def engine_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ENGINE_PACKAGES)


def run_engine(command: str, argv: Sequence[str], needs: Sequence[str] = ENGINE_PACKAGES) -> int:
    """Run `python -m llmbox_engine COMMAND ARGV...`, tied to this process; its output streams to the terminal."""
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"the engine's packages are not installed here ({', '.join(missing)} missing): "
            "pip install 'llmbox[engine]', or run in the container with --runtime docker"
        )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return run_attached([sys.executable, "-m", "llmbox_engine", command, *argv], env)
