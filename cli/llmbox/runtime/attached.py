"""Running a child that owns the terminal's Ctrl+C: the engine, or the docker client in front of it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence


def run_attached(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run `argv` in the foreground and wait for it, whatever signals arrive.

    Ctrl+C reaches the child from the terminal itself (same process group) and the child decides what it
    means (the engine saves and stops, or aborts on the second); this process only waits. SIGTERM sent to
    this process is passed on, so a supervisor stopping llmbox stops the engine cleanly too.
    """
    process = subprocess.Popen(list(argv), env=dict(env) if env is not None else None)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
