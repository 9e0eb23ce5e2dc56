"""Running a child tied to this process: the engine, the docker client in front of it, or TensorBoard.

What every child llmbox starts can count on:
- Signals: SIGINT, SIGTERM and SIGHUP sent to llmbox reach the child exactly once. The child runs in a session
  of its own, so a terminal's Ctrl+C (sent to the foreground process group) reaches llmbox alone, which passes
  it on; a supervisor's `kill -INT <llmbox pid>` takes the same path. One Ctrl+C is one signal, whoever sent it.
  The docker client passes what it gets on to the container (`docker run` proxies signals).
- No orphans: the child's stdin is a pipe whose only writer is this process. However llmbox ends, SIGKILL
  included, the kernel closes it; the engine sees end-of-file and stops (`llmbox_engine.lifeline`). Through
  Docker the pipe is the client's stdin, which `docker run -i` hands to the container, and the daemon closes
  the container's stdin when the client goes, so a killed client stops the engine too.
- The exit status is the child's (128 + N when signal N ended it, as a shell reports it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from types import FrameType

# Set in a child's environment when its stdin is the lifeline: the engine then stops at its end-of-file.
LIFELINE_ENV = "LLMBOX_LIFELINE"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def spawn_tied(
    argv: Sequence[str], env: Mapping[str, str] | None = None, quiet: bool = False
) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own with the lifeline as its stdin (see the module's docstring)."""
    child_env = dict(os.environ if env is None else env, **{LIFELINE_ENV: "stdin"})
    output = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        list(argv), env=child_env, stdin=subprocess.PIPE, stdout=output, stderr=output, start_new_session=True
    )


def run_attached(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run `argv` tied to this process and wait for it, passing on each signal llmbox receives."""
    process = spawn_tied(argv, env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
