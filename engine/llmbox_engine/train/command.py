"""`train`: from parsed options to a finished run (or a dry-run plan, or a TensorBoard server alone)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmbox.errors import UserError
from llmbox.options import TRAIN_OPTIONS, to_argv
from llmbox.plan import PlanFlags
from llmbox.topology import nproc_from_environment, topology
from llmbox_engine import host_view, lifeline
from llmbox_engine.train import tensorboard_server
from llmbox_engine.train.launch import PEER_LOST_EXIT, launch, under_torchrun, write_result
from llmbox_engine.train.writer_lock import exclusive_writer

if TYPE_CHECKING:  # the recipe imports torch and transformers: seconds that the lock check must not wait for
    from llmbox_engine.train.recipe import TrainOptions

PLAN_FLAG_NAMES = tuple(PlanFlags.__dataclass_fields__)


def plan_flags(values: dict[str, Any]) -> PlanFlags:
    return PlanFlags(**{name: values[name] for name in PLAN_FLAG_NAMES if name in values and values[name] is not None})


def run_train(model_path: Path, trust_remote_code: bool, values: dict[str, Any]) -> None:
    # beside an installed model's weights folder, where `serve` looks for lora/ (or in a bare HF folder)
    output = Path(values["output"]) if values["output"] else host_view.model_directory(model_path)
    values = values | {"output": str(output)}
    if values["tensorboard_only"] is not None:
        serve_tensorboard(output / "logs", values["tensorboard_only"])
        return
    if not (model_path / "config.json").is_file():
        raise UserError(f"{model_path}: not a model folder (no config.json)")
    if under_torchrun():  # a worker: the agent that started it holds the lock and runs TensorBoard
        lifeline.die_with_parent()
        with peer_loss_reported():
            train(recipe_options(model_path, trust_remote_code, values))
        # done, every file written and every process past the last barrier: leave without the interpreter's
        # teardown, where gloo's C++ destructors now and then abort (SIGABRT) a process whose peers have already
        # gone, and the agent would report a finished run as failed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    where = topology(values, os.environ)
    values = values | {"nproc_per_node": processes(values), "nnodes": where.nnodes}
    if values["dry_run"]:
        from llmbox_engine.train.recipe import LoraRecipe

        LoraRecipe(recipe_options(model_path, trust_remote_code, values)).run()
        return
    flags = ["--trust-remote-code"] if trust_remote_code else []
    worker_argv = ["--model-path", str(model_path), *flags, *to_argv(TRAIN_OPTIONS, values | {"no_tensorboard": True})]
    if not where.writes:
        # another node's ranks: they train their share and write nothing, so no lock on a (perhaps shared) directory
        launch(values["nproc_per_node"], worker_argv, where)
        return
    # one training per model directory: taken before anything slow, so a second run stops at once
    with exclusive_writer(output):
        server = None
        if not values["no_tensorboard"]:
            server = tensorboard_server.start(output / "logs" / "training", values["tensorboard_port"])
        try:
            if values["nproc_per_node"] > 1 or where.multi_node:
                launch(values["nproc_per_node"], worker_argv, where)
            else:
                train(recipe_options(model_path, trust_remote_code, values))
        finally:
            tensorboard_server.stop(server)


@contextlib.contextmanager
def peer_loss_reported() -> Iterator[None]:
    """A collective that fails because another process went away: one line, and the exit code that tells the
    agent this process was not the cause (the agent's own error line names the rank that was)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not any(word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed")):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"rank {rank}: stopped: another training process went away ({text.splitlines()[0][:160]})",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        # at once: an orderly exit runs gloo's C++ destructors with its threads still joinable, which aborts the
        # process (SIGABRT), and the agent would then name this rank instead of the one that went away
        os._exit(PEER_LOST_EXIT)


def processes(values: dict[str, Any]) -> int:
    """--nproc-per-node ($PET_NPROC_PER_NODE), or one per visible GPU (one on CPU)."""
    given = values["nproc_per_node"] or nproc_from_environment(os.environ)
    if given:
        return int(given)
    import torch

    return max(1, torch.cuda.device_count())


def recipe_options(model_path: Path, trust_remote_code: bool, values: dict[str, Any]) -> TrainOptions:
    from llmbox_engine.train.recipe import TrainOptions

    return TrainOptions(
        model_path=model_path,
        output=Path(values["output"]),
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


def train(options: TrainOptions) -> None:
    """One process's training: the whole run, or one rank's part of it (rank 0 reports the result)."""
    import torch

    from llmbox_engine.train.recipe import LoraRecipe

    if not torch.cuda.is_available():
        from llmbox_engine.train import cpu_speed

        cpu_speed.prepare_process()  # process-wide: here, not in the recipe (tests run that in-process)
    result = LoraRecipe(options).run()
    if result is not None and result.adapter is not None:
        write_result({"stop_reason": result.stop_reason, "steps": result.steps, "adapter": str(result.adapter)})


def serve_tensorboard(logdir: Path, port: int) -> None:
    if not logdir.is_dir():
        raise UserError(f"{logdir}: no training logs yet")
    if not tensorboard_server.port_free(port):
        raise UserError(f"port {port} is in use: pick another with --tensorboard-only PORT")
    print(f"tensorboard: http://127.0.0.1:{port}/  (logs in {logdir}; Ctrl+C to stop)", flush=True)
    tensorboard_server.serve_forever(logdir, port)
