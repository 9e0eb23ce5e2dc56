"""Ctrl+C, SIGTERM and SIGHUP during training: the first asks for a clean stop (finish the step, save, exit 0),
the second aborts at once. llmbox passes each signal it gets on exactly once (`llmbox.runtime.attached`)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any


class GracefulStop:
    def __init__(self, announce: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        self.requested: str | None = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._announce(f"{name} again: aborting without saving")
            raise KeyboardInterrupt
        self.requested = name
        self._announce(
            f"{name}: finishing this step, then saving the adapter and a checkpoint (press Ctrl+C again to abort)"
        )
