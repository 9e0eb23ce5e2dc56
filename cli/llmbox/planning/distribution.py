"""How a training spreads over processes: the planner's distribution rules (pure; tested without torch).

One process trains on one device. With several (`--nproc-per-node`, or every visible GPU), torchrun starts one
per device and the global batch is shared out: every process builds the same list of forward passes for a
step and takes every N-th, the loss is normalised by the target tokens of all of them, and the gradients are
averaged, so N processes make the same update as one process on the whole batch. How the model is held:
- DDP: a whole replica on each device, when the weights, the LoRA and optimizer state and the activations fit
  one device (LoRA and QLoRA usually do); the fastest;
- FSDP2: when they do not, each process keeps 1/N of the weights and of the LoRA state, and gathers one
  decoder layer at a time to compute it. The token embedding and the output head stay whole on every device
  (the loss reads the head itself, and tied models share the two).
"""

from __future__ import annotations

from typing import Literal

Strategy = Literal["single", "ddp", "fsdp2"]

# decoder layers held whole at once under FSDP2: the one computing and the next one being gathered
GATHERED_LAYERS = 2


STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp2")


def strategies(world_size: int, asked: str | None = None) -> list[Strategy]:
    """In order of preference: replicas are faster than shards, shards fit what replicas cannot."""
    if world_size == 1:
        return ["single"]
    return [s for s in STRATEGIES if s == asked] if asked else list(STRATEGIES)


def sharded_bytes(weights: int, whole: int, lora_state: int, n_layers: int, world_size: int) -> int:
    """Per process under FSDP2: a share of the weights and LoRA state, the `whole` bytes (embedding, head) on
    every device, and GATHERED_LAYERS decoder layers at full size."""
    layers = weights - whole
    layer = layers // max(1, n_layers)
    return layers // world_size + whole + lora_state // world_size + GATHERED_LAYERS * layer


def why(strategy: Strategy, world_size: int, on_gpu: bool, weights: str, per_process: str, asked: bool) -> str:
    devices = f"{world_size} GPUs" if on_gpu else f"{world_size} CPU processes (gloo)"
    if strategy == "single":
        return "one process on one device"
    if strategy == "ddp":
        because = "--strategy ddp" if asked else "the model fits one device"
        return (
            f"DDP over {devices}: {because}, so each holds a replica and takes every {world_size}th forward "
            "pass of the global batch; gradients averaged"
        )
    because = "--strategy fsdp2" if asked else f"{weights} and their training state do not fit one device"
    return (
        f"FSDP2 over {devices}: {because}; each process holds 1/{world_size} of them (about {per_process} with "
        "its activations), one decoder layer gathered at a time"
    )
