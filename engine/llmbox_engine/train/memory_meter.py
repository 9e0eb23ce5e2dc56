"""What training really held in memory, beside the plan's estimate: the check on the planner's memory model.

On a GPU: `torch.cuda.max_memory_allocated` from the first step on (the model's tensors; the CUDA context and the
allocator's cache are the plan's margin). On a CPU: the process's peak resident memory during training (Linux
`VmHWM`, reset once the model has loaded, so loading's own transients are left out) minus its resident memory
before the model loaded (the Python runtime, torch's libraries, the tokenized data): what the model, its
training state and the passes added.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # proc(5): writing 5 to clear_refs resets the peak resident set size to the current one


@dataclass(frozen=True)
class MemoryUse:
    device: str
    before_model_bytes: int  # CPU: resident before the model loaded; GPU: allocated then (usually 0)
    peak_bytes: int  # the highest during training, measured the same way
    estimate_bytes: int  # the plan's estimate for this process (weights + LoRA state + one pass)

    @property
    def training_bytes(self) -> int:
        """What the model and its training added: the quantity the plan estimates."""
        return self.peak_bytes - self.before_model_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"training_bytes": self.training_bytes}


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _resident_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return _peak_resident_bytes()  # no /proc (macOS): the peak is the best number there is


def _peak_resident_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class MemoryMeter:
    """Made before the model loads; `training_starts` once it has; `read` at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _resident_bytes()

    def training_starts(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # not Linux: the peak then includes loading
            CLEAR_REFS.write_text(RESET_PEAK_RSS)

    def read(self, estimate_bytes: int) -> MemoryUse:
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = _peak_resident_bytes()
        return MemoryUse(self.device.type, self.before, max(peak, self.before), estimate_bytes)
