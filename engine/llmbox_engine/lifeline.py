"""The engine's half of the lifeline (`llmbox.runtime.attached`): stop when the llmbox process that started us ends.

llmbox holds the write end of our stdin and never writes. End-of-file means it is gone, however it ended
(SIGKILL, the OOM killer, a CI timeout), and whether we run beside it or in a container behind a docker
client. We then stop as if told to by SIGTERM: training finishes its step and saves, the server closes its
port. If that takes longer than the grace period, the process exits anyway: an orphan must not live on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from llmbox.runtime.attached import LIFELINE_ENV

GRACE_SECONDS = 120.0
ORPHAN_EXIT_CODE = 137


def hold(grace_seconds: float = GRACE_SECONDS) -> bool:
    """Watch stdin when llmbox made it our lifeline; True if it did. Children we start do not inherit the role."""
    if os.environ.pop(LIFELINE_ENV, None) != "stdin":
        return False
    # llmbox passes on every SIGINT it gets, even when it was started with SIGINT ignored (`llmbox ... &` from a
    # script), and we inherited that: take SIGINT as Ctrl+C again, as the signal llmbox forwarded
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_watch, args=(sys.stdin.fileno(), grace_seconds), name="lifeline", daemon=True).start()
    return True


def _watch(fd: int, grace_seconds: float) -> None:
    try:
        # the bare descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader holds its lock,
        # which interpreter shutdown then waits for and aborts on
        while os.read(fd, 4096):
            pass  # llmbox writes nothing; whatever arrives is not ours to read
    except OSError:
        pass  # a closed or broken stdin says the same as end-of-file
    print("llmbox, which started this engine, has ended: stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_seconds)
    print(f"still running {grace_seconds:.0f} s after llmbox ended: exiting now", file=sys.stderr, flush=True)
    os._exit(ORPHAN_EXIT_CODE)


def die_with_parent(poll_seconds: float = 0.5) -> None:
    """Stop as on SIGTERM, once, when the parent process ends, even by SIGKILL (a torchrun worker, its agent).

    A watch on the parent's pid rather than Linux's parent-death signal, which fires again for every thread
    of a multi-threaded parent (torchrun's agent is one) as the child is handed from thread to thread: the
    second signal would abort the save the first one asked for.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
