"""How a training spreads over processes: the planner's distribution rule (pure; tested without torch).

One process trains on one device. With several (`--nproc-per-node`, or every visible GPU), torchrun starts one
per device and the global batch is shared out: every process builds the same list of forward passes for a
step and takes every N-th, the loss is normalised by the target tokens of all of them, and the gradients are
averaged, so N processes make the same update as one process on the whole batch. DDP keeps a whole replica on
each device, which suits LoRA whenever the model fits one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["single", "ddp"]


@dataclass(frozen=True)
class Distribution:
    strategy: Strategy
    world_size: int
    why: str


def distribution(processes: int, on_gpu: bool) -> Distribution:
    if processes <= 1:
        return Distribution("single", 1, "one process on one device")
    devices = f"{processes} GPUs" if on_gpu else f"{processes} CPU processes (gloo)"
    return Distribution(
        "ddp",
        processes,
        f"DDP over {devices}: the model fits one device, so each holds a replica and takes every "
        f"{processes}th forward pass of the global batch; gradients averaged",
    )
