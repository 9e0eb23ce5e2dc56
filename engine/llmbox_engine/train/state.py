"""Where a run stands, and how it is saved into and restored from a checkpoint folder."""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmbox_engine.atomic import write_json
from llmbox_engine.train.adaptive import AdaptiveState
from llmbox_engine.train.artifacts import TRAINER_STATE, TRAINING_STATE
from llmbox_engine.train.autostop import Evaluation


@dataclass
class Progress:
    batch_size: int  # examples per micro-batch now (circular mode grows it between cycles)
    schedule_steps: int | None = None  # the learning-rate schedule's length, fixed when the run starts
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch (cycle) in progress, 0-based
    batch_in_epoch: int = 0  # micro-batches of this epoch already trained on
    tokens_seen: int = 0  # real (non-padding) tokens trained on
    train_seconds: float = 0.0
    train_points: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    adaptive: AdaptiveState | None = None
    best_val: float | None = None
    best_step: int | None = None
    stop_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        data = dict(data)
        data["train_points"] = [tuple(p) for p in data["train_points"]]
        data["evaluations"] = [Evaluation(**e) for e in data["evaluations"]]
        data["adaptive"] = AdaptiveState(**data["adaptive"]) if data["adaptive"] else None
        return cls(**data)


def save_training_state(folder: Path, progress: Progress, optimizer_state: Any, plan: dict[str, Any]) -> None:
    state = {
        "progress": progress.to_dict(),
        "optimizer": optimizer_state,
        "plan": plan,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    # through memory, so a failed write is the OSError it is (torch.save to a file says only "unexpected pos")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (folder / TRAINING_STATE).write_bytes(buffer.getbuffer())
    summary = {k: v for k, v in progress.to_dict().items() if k != "train_points"}
    write_json(folder / TRAINER_STATE, summary)


def load_training_state(folder: Path) -> dict[str, Any]:
    # our own file, holding numpy RNG state: not loadable with weights_only
    return torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
