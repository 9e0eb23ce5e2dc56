"""The run's TensorBoard scalars, written so that a failing log never stops the training it describes.

A full disk or a log folder that cannot be written costs the logs, with one warning, and the run goes on:
the checkpoints, which a full disk does stop with a clear error, are what must not be lost.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_default_excepthook = threading.excepthook


def _quiet_about_writer_failures(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread dies of the OSError it then raises in ours, where ScalarLog reports it once;
    without this, the thread's death prints it again, as a traceback."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
        return
    _default_excepthook(args)


class ScalarLog:
    """`enabled=False`: writes nothing (the processes of a distributed run other than the main one)."""

    def __init__(self, folder: Path, warn: Any, enabled: bool = True) -> None:
        self._warn = warn
        self._writer: Any = None
        if not enabled:
            return
        threading.excepthook = _quiet_about_writer_failures
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(folder))
        except OSError as exc:
            self._give_up(exc)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def _call(self, method: str, *args: Any) -> None:
        if self._writer is None:
            return
        try:
            getattr(self._writer, method)(*args)
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        self._warn(f"warning: TensorBoard logs: {exc.strerror or exc}; logging stops, training goes on")
        self._writer = None
