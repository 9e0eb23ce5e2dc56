"""`adapter_info.json`: where a published adapter came from (base, data, plan) and how its run went."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmbox import __version__
from llmbox.plan import TrainingPlan
from llmbox_engine.data.ingest import IngestResult
from llmbox_engine.train.artifacts import checkpoint_step, model_fingerprint
from llmbox_engine.train.memory_meter import MemoryUse
from llmbox_engine.train.state import Progress


def adapter_info(
    *,
    model_path: Path,
    model_name: str,
    config: dict[str, Any],
    handler: str,
    plan: TrainingPlan,
    data_spec: str,
    ingest: IngestResult,
    progress: Progress,
    epochs: float,
    source: Path,
    memory: MemoryUse | None = None,
) -> dict[str, Any]:
    content = hashlib.blake2b(digest_size=16)
    for example in ingest.examples:
        content.update(example.content_key().encode())
    final = progress.evaluations[-1] if progress.evaluations else None
    return {
        "llmbox_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {
            "path": str(model_path),
            "name": model_name,
            "model_type": config.get("model_type"),
            "fingerprint": model_fingerprint(model_path),
        },
        "handler": handler,
        "plan": plan.to_dict(),
        "data": {
            "spec": data_spec,
            "sources": [{"path": s.path, "format": s.format, "records": s.records} for s in ingest.sources],
            "examples": len(ingest.examples),
            "duplicates_removed": ingest.duplicates,
            "content_hash": content.hexdigest(),
            "task": ingest.task,
        },
        "published_checkpoint": source.name,
        "published_step": checkpoint_step(source),
        "final_train_loss": final.train_loss if final else None,
        "final_val_loss": final.val_loss if final else None,
        "best_val_loss": progress.best_val,
        "best_step": progress.best_step,
        "steps": progress.step,
        "epochs": epochs,
        "stop_reason": progress.stop_reason,
        "train_seconds": round(progress.train_seconds, 2),
        "tokens_per_s": round(progress.tokens_seen / max(1e-9, progress.train_seconds), 1),
        "memory": memory.to_dict() if memory is not None else None,
    }
