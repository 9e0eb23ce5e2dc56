"""A run's checkpoints/ and lora/: saving, choosing where to resume, publishing. Every write is atomic, and a
failed one (a full disk, an unwritable folder) is one clear error that says what is safe.

    checkpoints/checkpoint-N/   adapter, optimizer, RNG and data position, sealed by a manifest (pruned)
    checkpoints/last/, best/    copies of the latest and of the best
    lora/                       the published adapter (lora.prev/ the one before)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmbox.errors import UserError
from llmbox_engine import host_view
from llmbox_engine.atomic import staged_dir
from llmbox_engine.train.artifacts import (
    TRAINING_STATE,
    checkpoint_problem,
    checkpoint_step,
    copy_checkpoint,
    latest_whole_checkpoint,
    prune_checkpoints,
    publish_adapter,
    seal_checkpoint,
    write_errors_reported,
)
from llmbox_engine.train.state import Progress, load_training_state, save_training_state


class Checkpointer:
    def __init__(self, output: Path, keep: int, warn: Callable[[str], None]) -> None:
        self.folder = output / "checkpoints"
        self.lora_dir = output / "lora"
        self.keep = keep  # numbered checkpoints kept
        self._warn = warn

    @property
    def last(self) -> Path:
        return self.folder / "last"

    def resume_folder(self, resume: bool, resume_from: Path | None) -> Path | None:
        """--resume-from as given (it must be whole), or for --resume the newest whole checkpoint."""
        if resume_from is not None:
            problem = checkpoint_problem(resume_from)
            if problem is not None:
                raise UserError(f"{resume_from}: cannot resume from it: {problem}")
            return resume_from
        if not resume:
            return None
        found = latest_whole_checkpoint(self.folder, lambda message: self._warn(f"warning: {message}"))
        if found is None:
            where = host_view.host_path(self.folder)
            raise UserError(f"{where}: no checkpoint to resume from (none there is whole)")
        return found

    @staticmethod
    def load(folder: Path) -> dict[str, Any]:
        try:
            return load_training_state(folder) | {"folder": folder}
        except (OSError, RuntimeError, EOFError) as exc:  # a checkpoint saved before manifests, damaged since
            raise UserError(f"{folder / TRAINING_STATE}: unreadable ({exc}); resume from an older checkpoint") from None

    def save(
        self,
        model: Any,
        optimizer_state: dict[str, Any],
        progress: Progress,
        plan: dict[str, Any],
        best: bool,
        weights: dict[str, Any] | None = None,
    ) -> Path:
        """checkpoint-N (then pruned), copied to last/ and, for a new best, to best/.

        `weights`: the model's full state where the model itself holds only a shard (FSDP2)."""
        numbered = self.folder / f"checkpoint-{progress.step}"
        with self.writing(numbered.name):
            with staged_dir(numbered) as staging:
                model.save_pretrained(str(staging), safe_serialization=True, state_dict=weights)
                save_training_state(staging, progress, optimizer_state, plan)
                seal_checkpoint(staging)
            copy_checkpoint(numbered, self.last)
            if best:
                copy_checkpoint(numbered, self.folder / "best")
            prune_checkpoints(self.folder, self.keep)
        return numbered

    def holds_step(self, step: int) -> bool:
        """last/ is whole and holds `step`: nothing to save before publishing."""
        return checkpoint_step(self.last) == step and checkpoint_problem(self.last) is None

    def publish_source(self) -> Path:
        best = self.folder / "best"
        return best if checkpoint_problem(best) is None else self.last

    def publish(self, source: Path, info: dict[str, Any]) -> Path:
        with self.writing(f"the adapter to {self.lora_dir.name}/"):
            return publish_adapter(source, self.lora_dir, info)

    def writing(self, what: str) -> contextlib.AbstractContextManager[None]:
        return write_errors_reported(what, self.lora_dir, host_view.host_path)
