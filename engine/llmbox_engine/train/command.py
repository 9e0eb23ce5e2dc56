"""`train`: from parsed options to a finished run (or a dry-run plan, or a TensorBoard server alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmbox.errors import UserError
from llmbox.plan import PlanFlags
from llmbox_engine import host_view
from llmbox_engine.train import tensorboard_server
from llmbox_engine.train.host_memory import keep_freed_memory
from llmbox_engine.train.writer_lock import exclusive_writer

PLAN_FLAG_NAMES = tuple(PlanFlags.__dataclass_fields__)


def plan_flags(values: dict[str, Any]) -> PlanFlags:
    return PlanFlags(**{name: values[name] for name in PLAN_FLAG_NAMES if name in values and values[name] is not None})


def run_train(model_path: Path, trust_remote_code: bool, values: dict[str, Any]) -> None:
    # beside an installed model's weights folder, where `serve` looks for lora/ (or in a bare HF folder)
    output = Path(values["output"]) if values["output"] else host_view.model_directory(model_path)
    if values["tensorboard_only"] is not None:
        serve_tensorboard(output / "logs", values["tensorboard_only"])
        return
    if not (model_path / "config.json").is_file():
        raise UserError(f"{model_path}: not a model folder (no config.json)")
    if values["dry_run"]:
        train(model_path, output, trust_remote_code, values)
        return
    # one training per model directory: taken before anything slow, so a second run stops at once
    with exclusive_writer(output):
        train(model_path, output, trust_remote_code, values)


def train(model_path: Path, output: Path, trust_remote_code: bool, values: dict[str, Any]) -> None:
    import torch

    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    options = TrainOptions(
        model_path=model_path,
        output=output,
        data=values["data"],
        flags=plan_flags(values),
        dataset_format=values["dataset_format"],
        max_examples=values["max_examples"],
        skip_bad_records=values["skip_bad_records"],
        resume=values["resume"],
        resume_from=Path(values["resume_from"]) if values["resume_from"] else None,
        tensorboard=not values["no_tensorboard"],
        tensorboard_port=values["tensorboard_port"],
        skip_test=values["skip_test"],
        dry_run=values["dry_run"],
        json=values["json"],
        trust_remote_code=trust_remote_code,
    )
    if options.dry_run:
        LoraRecipe(options).run()
        return
    if not torch.cuda.is_available():
        # process-wide, so here in the training process's entry and not in the recipe (tests run it in-process)
        keep_freed_memory()
    server = None
    if options.tensorboard:
        server = tensorboard_server.start(output / "logs" / "training", options.tensorboard_port)
    try:
        LoraRecipe(options).run()
    finally:
        tensorboard_server.stop(server)


def serve_tensorboard(logdir: Path, port: int) -> None:
    if not logdir.is_dir():
        raise UserError(f"{logdir}: no training logs yet")
    if not tensorboard_server.port_free(port):
        raise UserError(f"port {port} is in use: pick another with --tensorboard-only PORT")
    print(f"tensorboard: http://127.0.0.1:{port}/  (logs in {logdir}; Ctrl+C to stop)", flush=True)
    tensorboard_server.serve_forever(logdir, port)
