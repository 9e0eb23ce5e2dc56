"""LoRA / QLoRA fine-tuning of a causal language model: the training story in one class, its parts beside it.

`LoraRecipe(options).run()`:
- `setup`: read `--data` and tokenize it through the modality's pipeline; plan with the pure planner
  (`--dry-run` stops here); load the base model as planned, wrap it in LoRA; the optimizer; where the run
  starts, or resumes from the newest whole checkpoint;
- `train`: optimizer steps over token-budget batches, shuffled between length buckets, until a stop: the
  loss only at target positions, each target token weighing the same across the step's micro-batches;
  `_evaluate` every `eval_steps` (every pass in circular mode) prints one status line, asks the judge and
  saves checkpoints; Ctrl+C / SIGTERM finish the step and save; out of memory halves the passes and retries
  the same step;
- `finish`: publish the best adapter to `lora/` atomically, plot `training_history.png`, sample answers.

One class runs one process's share of a run: alone, or as one of torchrun's workers (`launch.py`), where every
process builds the same passes and takes its share, the model is a DDP replica or FSDP2 shards
(`sharding.py`), and rank 0 alone prints and writes.

The parts: `pipelines.py` (text) and `vision.py` (images): tokenizing, collating, sample answers;
`judge.py`: auto-stop and adaptive mode; `checkpointer.py`: checkpoints, resume, publishing;
`distributed.py`: which process this is, and the reductions (trivial for one process); `loss.py`;
`data/batching.py`; and the plan, `cli/llmbox/plan.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmbox.errors import UserError
from llmbox.facts import DataFacts, model_facts_from_config, read_gpu_facts, read_host_facts
from llmbox.model_facts import max_positions, read_config
from llmbox.plan import PlanFlags, TrainingPlan, plan
from llmbox.planning.terms import BNB_OPTIMIZERS
from llmbox_engine import host_view, quantized
from llmbox_engine.data.batching import split_to_budget, token_budget_batches
from llmbox_engine.data.canonical import Example, examples_digest
from llmbox_engine.data.ingest import IngestResult, load_examples
from llmbox_engine.data.render import IGNORE_INDEX, TokenizedExample, render_stats
from llmbox_engine.data.split import split_examples
from llmbox_engine.train import console as out
from llmbox_engine.train import cpu_speed, sharding
from llmbox_engine.train.adaptive import AdaptiveState
from llmbox_engine.train.artifacts import checkpoint_step
from llmbox_engine.train.autostop import Evaluation
from llmbox_engine.train.checkpointer import Checkpointer
from llmbox_engine.train.distributed import DistributedContext
from llmbox_engine.train.history_plot import plot_history
from llmbox_engine.train.judge import Judge, Verdict
from llmbox_engine.train.loss import LossModule, loss_sum
from llmbox_engine.train.memory_meter import MemoryMeter
from llmbox_engine.train.model_setup import load_base_model, wrap_lora
from llmbox_engine.train.optimizers import make_optimizer
from llmbox_engine.train.pipelines import Pipeline, pipeline_for
from llmbox_engine.train.provenance import adapter_info
from llmbox_engine.train.scalar_log import ScalarLog
from llmbox_engine.train.schedule import learning_rate_at
from llmbox_engine.train.signals import GracefulStop
from llmbox_engine.train.state import Progress, restore_rng
from llmbox_handlers import Handler, match_handler

# Without a validation set, a small training set is re-evaluated in eval mode (no dropout) instead.
MAX_TRAIN_SET_EVAL = 512
# circular mode checks for a perfect loss with a forward over the training set once a pass's own loss is below
# this multiple of the threshold (dropout and mid-pass updates keep the running loss above the checked one)
CIRCULAR_CHECK_BELOW = 10.0
SAMPLE_ANSWERS = 3
# Plan fields a resumed run takes from its checkpoint, so it continues the same run, not a new one.
RESUMED_PLAN_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_seq_length", "batch_size",
    "gradient_accumulation_steps", "effective_batch_size", "max_batch_size", "learning_rate", "optimizer",
    "eval_steps", "save_steps", "seed", "n_train", "n_val", "steps_per_epoch",
)  # fmt: skip


@dataclass(frozen=True)
class TrainOptions:
    model_path: Path
    output: Path
    data: str
    flags: PlanFlags
    dataset_format: str | None = None
    max_examples: int | None = None
    skip_bad_records: bool = False
    resume: bool = False
    resume_from: Path | None = None
    tensorboard: bool = True
    tensorboard_port: int = 6006
    skip_test: bool = False
    dry_run: bool = False
    json: bool = False
    trust_remote_code: bool = False

    @property
    def model_name(self) -> str:
        return host_view.model_name(self.model_path)

    @property
    def seed(self) -> int:
        return self.flags.seed if self.flags.seed is not None else 42


@dataclass(frozen=True)
class TrainResult:
    adapter: Path | None
    stop_reason: str
    steps: int
    best_val: float | None


class LoraRecipe:
    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.output = options.output
        self.dist = DistributedContext.from_environment()
        # every process gets the signal (torchrun passes it on); one of them says so
        self.stop = GracefulStop() if self.dist.is_main else GracefulStop(announce=lambda _message: None)

    # ---- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_data()
        self._setup_plan()
        if self.options.dry_run:
            return
        self._setup_model()
        self._setup_optimizer()
        self._setup_progress()

    def _setup_data(self) -> None:
        o = self.options
        self.config = read_config(o.model_path)
        self.handler: Handler = match_handler(self.config).handler
        self.model_facts = model_facts_from_config(self.config)
        self.pipeline: Pipeline = pipeline_for(o.model_path, self.handler, self.config, o.trust_remote_code)
        self.tokenizer = self.pipeline.tokenizer
        self.ingest: IngestResult = load_examples(
            o.data,
            dataset_format=o.dataset_format,
            max_examples=o.max_examples,
            skip_bad_records=o.skip_bad_records,
            seed=o.seed,
        )
        if self.ingest.images and not self.pipeline.multimodal:
            raise UserError(f"{self.ingest.images} records carry images: {o.model_name} is a text-only model")
        self.dist.check_same_data(examples_digest(self.ingest.examples), len(self.ingest.examples))
        limit = o.flags.max_seq_length or min(
            self.handler.max_seq_length, max_positions(self.config) or self.handler.max_seq_length
        )
        self.tokenized = self.pipeline.tokenize(self.ingest.examples, limit)
        stats = render_stats(self.tokenized)
        self.data_facts = DataFacts(
            n_train=len(self.tokenized),
            n_val=0,
            task=self.ingest.task,
            mean_tokens=float(stats.lengths.mean()),
            p95_tokens=int(np.percentile(stats.lengths, 95)),
            max_tokens=int(stats.lengths.max()),
        )

    def _setup_plan(self) -> None:
        o = self.options
        gpus = read_gpu_facts() if torch.cuda.is_available() else []
        self.plan: TrainingPlan = self.pipeline.fit_plan(
            plan(self.model_facts, gpus, self.data_facts, o.flags, read_host_facts())
        )
        self.checkpointer = Checkpointer(self.output, self.plan.save_total_limit, self._say)
        self.resume_state: dict[str, Any] | None = None
        resume_dir = self.checkpointer.resume_folder(o.resume, o.resume_from)
        if resume_dir is not None:
            self.resume_state = self.checkpointer.load(resume_dir)
            saved = self.resume_state["plan"]
            self._replan(**{k: tuple(v) if k == "target_modules" and v else v for k, v in saved.items()
                            if k in RESUMED_PLAN_FIELDS})  # fmt: skip
        if self.dist.is_main:
            if o.json and o.dry_run:
                import json

                out.console.print_json(json.dumps(self.plan.to_dict(), default=str))
            else:
                out.print_plan(self.plan, o.model_name)
        if o.dry_run:
            return
        if self.plan.optimizer in BNB_OPTIMIZERS:
            quantized.require(f"--optimizer {self.plan.optimizer}", self.plan.device)
        tokenized = self.pipeline.truncate(self.tokenized, self.plan.max_seq_length, self.ingest.examples)
        self.train_set, self.val_set = split_examples(tokenized, self.plan.n_val, self.plan.seed)
        _, held_out = split_examples(self.ingest.examples, self.plan.n_val, self.plan.seed)
        self.val_examples: list[Example] = held_out or list(self.ingest.examples)  # for sample answers
        truncated = sum(t.truncated for t in tokenized)
        if truncated:
            self._say(f"{truncated} example(s) longer than {self.plan.max_seq_length} tokens were truncated")

    def _replan(self, **changes: Any) -> None:
        """The one place the plan changes after planning: a resumed run's settings, an out-of-memory retry."""
        self.plan = dataclasses.replace(self.plan, **changes)

    def _setup_model(self) -> None:
        p = self.plan
        gpu = self.dist.local_rank if self.dist.distributed else p.gpu_index or 0
        self.device = torch.device("cuda", gpu) if p.device == "cuda" else torch.device("cpu")
        if p.device == "cpu":
            torch.manual_seed(p.seed)
        attention = self.pipeline.choose_attention(p.device)
        self.meter = MemoryMeter(self.device)
        base = load_base_model(
            self.options.model_path,
            precision=p.precision,
            method=p.method,
            use_8bit=p.load_in_8bit,
            attention=attention,
            device=str(self.device),
            trust_remote_code=self.options.trust_remote_code,
            vision=self.pipeline.multimodal,
            sharded=p.strategy == "fsdp2",
        )
        torch.manual_seed(p.seed)  # LoRA's A matrices: the same seed gives the same start
        self.model = wrap_lora(
            base,
            r=p.lora_r,
            alpha=p.lora_alpha,
            dropout=p.lora_dropout,
            target_modules=self.pipeline.lora_targets(p.target_modules),
            gradient_checkpointing=p.gradient_checkpointing,
            quantized=p.load_in_4bit or p.load_in_8bit,
        )
        cpu_speed.prepare_model(self.model, p)
        if self.resume_state is not None:
            self._load_adapter(self.resume_state["folder"])
        self.replicas: Any = None  # DDP: the replica whose backward averages the gradients
        self.shards: Any = None  # FSDP2: the root unit, which sets when gradients are reduced
        if self.plan.strategy == "fsdp2":
            self.shards = sharding.shard(self.model, self.dist.world_size, self.device.type)
        elif self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            devices = [self.device.index] if self.device.type == "cuda" else None
            self.replicas = DistributedDataParallel(LossModule(self.model), device_ids=devices)
        trainable = sum(t.numel() for t in self.model.parameters() if t.requires_grad)
        self._say(f"model loaded: {attention} attention, {trainable:,} trainable LoRA parameters")

    @property
    def packed(self) -> bool:
        """Micro-batches are packed rows (no padding), which the chosen attention keeps apart."""
        return self.pipeline.packed

    def _load_adapter(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")))

    def _setup_optimizer(self) -> None:
        params = [t for t in self.model.parameters() if t.requires_grad]
        self.optimizer = make_optimizer(self.plan.optimizer, params, self.plan.learning_rate)
        if self.resume_state is None:
            return
        saved = self.resume_state["plan"].get("strategy", "single")
        if (saved == "fsdp2") != (self.plan.strategy == "fsdp2"):
            raise UserError(
                f"{self.resume_state['folder']}: saved by a run with strategy {saved}; this one plans "
                f"{self.plan.strategy}: resume with the same --nproc-per-node as that run"
            )
        if self.shards is not None:
            sharding.load_optimizer_state(self.model, self.optimizer, self.resume_state["optimizer"])
        else:
            self.optimizer.load_state_dict(self.resume_state["optimizer"])

    def _setup_progress(self) -> None:
        if self.resume_state is not None:
            self.progress = Progress.from_dict(self.resume_state["progress"])
            restore_rng(self.resume_state["rng"])
            self._say(
                f"resuming from {self.resume_state['folder']} at step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}, batch {self.progress.batch_in_epoch})"
            )
        else:
            self.progress = Progress(batch_size=self.plan.batch_size, schedule_steps=self._schedule_steps())
            if self.plan.adaptive:
                self.progress.adaptive = AdaptiveState.start(self.plan.eval_steps)
        self.judge = Judge(self.plan)
        run_name = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.writer = ScalarLog(self.output / "logs" / "training" / run_name, self._say, enabled=self.dist.is_main)

    def _schedule_steps(self) -> int | None:
        """The learning-rate schedule's length, fixed at the start so a resumed run keeps the same curve.

        It spans the planned epochs; `--max-steps` without `--epochs` spans that many steps instead (with
        both, `--max-steps` only stops early). Circular and non-stop runs have no known end: flat after warm-up.
        """
        p = self.plan
        if p.circular:
            return None
        if p.max_steps is not None and self.options.flags.epochs is None:
            return p.max_steps
        return None if p.epochs is None else p.epochs * p.steps_per_epoch

    def _say(self, message: str) -> None:
        """Print from the main process only (every process of a distributed run knows the same things)."""
        if self.dist.is_main:
            out.console.print(message, style="yellow" if message.startswith("warning") else None)

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult | None:
        self.setup()
        if self.options.dry_run:
            return None
        with self.stop:  # a second Ctrl+C aborts the saving too: every artifact is staged, never half-written
            return self.finish(self.train())  # a torchrun worker then exits at once (train/command.py)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The micro-batches of one epoch: a pure function of (seed, epoch, batch size), so resume can rebuild it."""
        return token_budget_batches(
            self.train_lengths,
            max_tokens=batch_size * self.plan.max_seq_length,
            max_batch_size=batch_size,
            seed=self.plan.seed + epoch,
        )

    @functools.cached_property
    def train_lengths(self) -> list[int]:
        return [len(t) for t in self.train_set]

    def _eval_interval(self) -> int:
        return self.progress.adaptive.eval_interval if self.progress.adaptive else self.plan.eval_steps

    def train(self) -> str:
        """Optimizer steps until a stop; the reason it stopped."""
        self.meter.training_starts()
        with out.StepBar(enabled=self.dist.is_main) as self.bar:
            self.bar.restart(self._eval_interval())
            return self._train_loop()

    def _train_loop(self) -> str:
        p, prog = self.plan, self.progress
        self.started = time.monotonic() - prog.train_seconds
        self.model.train()
        steps_since_eval, loss_since_eval = 0, 0.0
        if p.max_steps is not None and prog.step >= p.max_steps:  # resumed where a run had already got to
            return f"reached --max-steps {p.max_steps}"
        while True:
            batches = self.epoch_batches(prog.epoch, prog.batch_size)
            while prog.batch_in_epoch < len(batches):
                group = batches[prog.batch_in_epoch : prog.batch_in_epoch + p.gradient_accumulation_steps]
                loss = self._step_with_retry(group)
                prog.batch_in_epoch += len(group)
                self.bar.advance(loss)
                steps_since_eval += 1
                loss_since_eval += loss
                end_of_epoch = prog.batch_in_epoch >= len(batches)
                # circular runs are judged per pass over the data; the others every eval interval
                if end_of_epoch if p.circular else prog.step % self._eval_interval() == 0:
                    reason = self._evaluate(loss_since_eval / steps_since_eval)
                    steps_since_eval, loss_since_eval = 0, 0.0
                    self.bar.restart(self._eval_interval())
                    if reason:
                        return reason
                if self.dist.any(self.stop.requested is not None):  # every process stops at the same step
                    return f"stopped by {self.stop.requested or 'a signal to another process'}"
                if p.max_steps is not None and prog.step >= p.max_steps:
                    return self._final_evaluation(
                        steps_since_eval, loss_since_eval, f"reached --max-steps {p.max_steps}"
                    )
            prog.epoch += 1
            prog.batch_in_epoch = 0
            if p.circular:
                prog.batch_size = min(p.max_batch_size, max(prog.batch_size + 1, int(prog.batch_size * p.batch_growth)))
            if p.epochs is not None and prog.epoch >= p.epochs:
                what = "cycle limit" if p.circular else "all"
                return self._final_evaluation(steps_since_eval, loss_since_eval, f"{what} {p.epochs} epoch(s) done")

    def _step_with_retry(self, group: list[list[int]]) -> float:
        """One optimizer step; out of memory, the same step again in passes half the size, down to one example."""
        while True:
            try:
                return self._optimizer_step(group)
            except torch.OutOfMemoryError:
                self._halve_passes_after_out_of_memory()

    def _halve_passes_after_out_of_memory(self) -> None:
        """The same micro-batches and effective batch, in forward passes of half the tokens: the data order is
        unchanged, so nothing is trained twice and the curve goes on as planned."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        where = f"GPU {self.plan.gpu_name}" if self.plan.device == "cuda" else "CPU RAM"
        if self.dist.distributed:
            # the other processes wait in this step's collectives, which a retry here would not match: stop, and
            # torchrun stops them (the agent's error line names this rank)
            raise UserError(
                f"rank {self.dist.rank}: out of memory on {where} in a pass of up to {self.plan.max_forward_tokens} "
                "tokens: try --batch-size with a smaller value, --max-seq-length, --method qlora or --strategy fsdp2"
            )
        tokens = self.plan.max_forward_tokens
        if tokens <= self.plan.max_seq_length:
            raise UserError(
                f"out of memory on {where} with one example of up to {self.plan.max_seq_length} tokens per pass: "
                "try --max-seq-length with a smaller value, --method qlora, or a GPU with more free memory"
            )
        halved = max(self.plan.max_seq_length, tokens // 2)
        self._say(f"warning: out of memory on {where}: retrying the step in passes of {halved} tokens (was {tokens})")
        self._replan(max_forward_tokens=halved)

    def _final_evaluation(self, steps_since_eval: int, loss_since_eval: float, reason: str) -> str:
        if steps_since_eval:
            return self._evaluate(loss_since_eval / steps_since_eval, final=True) or reason
        return reason

    def _optimizer_step(self, group: list[list[int]]) -> float:
        """One optimizer step over `group` micro-batches; each target token weighs the same."""
        p, prog = self.plan, self.progress
        lengths = self.train_lengths
        passes = [piece for ids in group for piece in split_to_budget(ids, lengths, p.max_forward_tokens, self.packed)]
        mine = self.dist.share(passes)  # every process built the same passes: each takes its share
        batches = [self.pipeline.collate([self.train_set[i] for i in ids]) for ids in mine]
        # every process runs as many passes as the busiest (gradients are synchronised on the last), the
        # others' extra ones without targets: no loss, no gradient
        short = self.dist.max(len(mine)) - len(mine)
        batches += [without_targets(self.pipeline.collate([self.train_set[i] for i in passes[0]]))] * short
        (targets,) = self.dist.sum([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)])
        lr = learning_rate_at(prog.step, p.learning_rate, prog.schedule_steps)
        lr *= prog.adaptive.lr_scale if prog.adaptive else 1.0
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        started = time.monotonic()
        (total,) = self.dist.sum([self._accumulate(batches, int(targets))])
        norm = sharding.full_value(
            torch.nn.utils.clip_grad_norm_([t for t in self.model.parameters() if t.requires_grad], 1.0)
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real_tokens = sum(lengths[i] for ids in group for i in ids)
        prog.step += 1
        prog.tokens_seen += real_tokens
        prog.train_seconds = time.monotonic() - self.started
        loss = total / max(1, targets)
        prog.train_points.append((prog.step, loss))
        self.writer.add_scalar("train/loss", loss, prog.step)
        self.writer.add_scalar("train/learning_rate", lr, prog.step)
        self.writer.add_scalar("train/grad_norm", float(norm), prog.step)
        self.writer.add_scalar("train/tokens_per_s", real_tokens / max(1e-9, time.monotonic() - started), prog.step)
        return loss

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16-mixed: the forward's matmuls in bf16 over fp32 weights (autograd casts back in backward)."""
        if self.plan.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _accumulate(self, batches: list[dict[str, torch.Tensor]], targets: int) -> float:
        """Forward and backward over this process's passes; the summed loss. Each target token of the step,
        on every process, weighs 1/targets (DDP averages over processes: the world size makes it a sum)."""
        total = 0.0
        scale = self.dist.world_size / max(1, targets)
        for k, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = k == len(batches) - 1  # gradients are exchanged after the last pass alone
            if self.shards is not None:
                self.shards.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.replicas is None else self.replicas.no_sync():
                with self._autocast():
                    if self.replicas is None:
                        summed, _ = loss_sum(self.model, batch, checkpoint_chunks=self.plan.gradient_checkpointing)
                    else:
                        summed, _ = self.replicas(batch, self.plan.gradient_checkpointing)
                (summed * scale).backward()
            total += float(summed.detach())
        return total

    # ---- evaluation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def loss_on(self, examples: Sequence[TokenizedExample]) -> float:
        """Mean loss per target token over `examples`, in eval mode (over every process's share)."""
        self.model.eval()
        total, count = 0.0, 0
        everyone = token_budget_batches([len(t) for t in examples], 4 * self.plan.max_seq_length, 16)
        mine = [self.pipeline.collate([examples[i] for i in ids]) for ids in self.dist.share(everyone)]
        # sharded weights are gathered by every process at once: as many passes on each
        short = self.dist.max(len(mine)) - len(mine) if self.shards is not None else 0
        mine += [without_targets(self.pipeline.collate([examples[i] for i in everyone[0]]))] * short
        for batch in mine:
            with self._autocast():
                summed, n = loss_sum(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total, count = total + float(summed), count + n
        self.model.train()
        everyone_total, everyone_count = self.dist.sum([total, count])
        return everyone_total / max(1, everyone_count)

    def _evaluate(self, running_train_loss: float, final: bool = False) -> str | None:
        """Losses, the judge's verdict, a checkpoint when due, one status line; the stop reason, if any."""
        prog = self.progress
        if self.val_set:
            train_loss, val_loss = running_train_loss, self.loss_on(self.val_set)
        elif self._far_from_perfect(running_train_loss):
            train_loss, val_loss = running_train_loss, None  # the pass's own loss says enough: no second forward
        elif len(self.train_set) <= MAX_TRAIN_SET_EVAL:
            train_loss, val_loss = self.loss_on(self.train_set), None
        else:
            train_loss, val_loss = running_train_loss, None
        verdict = self.judge(prog, Evaluation(step=prog.step, train_loss=train_loss, val_loss=val_loss))
        if verdict.new_best:
            self.save_checkpoint(best=True)
        elif prog.step % self.plan.save_steps == 0 or final:
            self.save_checkpoint()
        self._log_evaluation(train_loss, val_loss, verdict)
        if verdict.adaptive_note:
            self._say(f"  adaptive: {verdict.adaptive_note}")
        return verdict.stop_reason

    def _far_from_perfect(self, running_train_loss: float) -> bool:
        """Circular mode: a pass whose own training loss (the same on every process) is this far above the
        perfect-loss threshold is taken as not there yet, and the forward over the training set that would check
        it is skipped; were a check to pass anyway, the next pass's catches it, a pass later."""
        perfect = self.plan.perfect_loss
        return self.plan.circular and perfect is not None and running_train_loss > CIRCULAR_CHECK_BELOW * perfect

    def _log_evaluation(self, train_loss: float, val_loss: float | None, verdict: Verdict) -> None:
        prog = self.progress
        elapsed = time.monotonic() - self.started
        self.writer.add_scalar("eval/train_loss", train_loss, prog.step)
        if val_loss is not None:
            self.writer.add_scalar("eval/val_loss", val_loss, prog.step)
            self.writer.add_scalar("eval/perplexity", math.exp(min(val_loss, 50)), prog.step)
        self.writer.flush()
        if not self.dist.is_main:
            return
        line = out.status_line(
            number=len(prog.evaluations),
            elapsed=elapsed,
            step=prog.step,
            epoch=self._epochs_done(),
            train_loss=train_loss,
            val_loss=val_loss,
            show_perplexity=self.data_facts.task == "text-generation",
            best=prog.best_val,
            patience_left=verdict.decision.patience_left if self.plan.auto_stop else None,
            patience=self.plan.patience if self.plan.auto_stop else None,
            tokens_per_s=prog.tokens_seen / max(1e-9, elapsed),
        )
        out.console.print(line)

    def _epochs_done(self) -> float:
        prog = self.progress
        batches_in_epoch = len(self.epoch_batches(prog.epoch, prog.batch_size))
        return prog.epoch + min(1.0, prog.batch_in_epoch / max(1, batches_in_epoch))

    # ---- checkpoints and artifacts -----------------------------------------------------------------------

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """checkpoint-N (then pruned), copied to last/ and, for a new best, to best/: written by the main process
        (with FSDP2, after every process has helped gather the full state)."""
        weights = None
        if self.shards is not None:
            weights, optimizer_state = sharding.full_states(self.model, self.optimizer)
        else:
            optimizer_state = self.optimizer.state_dict()
        if not self.dist.is_main:
            return None
        return self.checkpointer.save(self.model, optimizer_state, self.progress, self.plan.to_dict(), best, weights)

    def finish(self, stop_reason: str) -> TrainResult:
        prog = self.progress
        prog.stop_reason = stop_reason
        if self.dist.any(self.dist.is_main and not self.checkpointer.holds_step(prog.step)):
            self.save_checkpoint()  # every process: a sharded state is gathered by all
        if not self.dist.is_main:
            self.dist.barrier()  # the main process publishes; the others wait, then leave together
            return TrainResult(None, stop_reason, prog.step, prog.best_val)
        self.writer.close()
        memory = self.meter.read(self.plan.memory.total_bytes)
        source = self.checkpointer.publish_source()
        info = adapter_info(
            model_path=self.options.model_path,
            model_name=self.options.model_name,
            config=self.config,
            handler=self.handler.name,
            plan=self.plan,
            data_spec=self.options.data,
            ingest=self.ingest,
            progress=prog,
            epochs=prog.epoch + prog.batch_in_epoch / max(1, len(self.epoch_batches(prog.epoch, prog.batch_size))),
            source=source,
            memory=memory,
        )
        adapter = self.checkpointer.publish(source, info)
        self._plot()
        shown = host_view.host_path
        self._say(f"[bold]stopped:[/] {stop_reason}")
        self._say(out.memory_line(memory))
        self._say(f"adapter: {shown(adapter)}  (from {source.name}, step {checkpoint_step(source)})")
        self._say(
            f"checkpoints: {shown(self.checkpointer.folder)}   plot: {shown(self.output / 'training_history.png')}"
        )
        if self.shards is not None and not self.options.skip_test:
            self._say("sample answers: skipped (the model is sharded across processes); `llmbox serve` answers")
        elif not self.options.skip_test:
            self.sample_answers(adapter)
        self.dist.barrier()
        return TrainResult(adapter, stop_reason, prog.step, prog.best_val)

    def _plot(self) -> None:
        prog = self.progress
        mode = "circular" if self.plan.circular else self.plan.mode
        try:
            plot_history(
                prog.train_points,
                prog.evaluations,
                self.judge.best_index(prog),
                self.output / "training_history.png",
                f"{self.options.model_name}: LoRA r{self.plan.lora_r}, {mode} mode",
            )
        except OSError as exc:  # the adapter is out; a plot that cannot be written is worth a warning, not an error
            self._say(f"warning: training_history.png not written: {exc.strerror or exc}")

    @torch.no_grad()
    def sample_answers(self, adapter: Path) -> list[dict[str, Any]]:
        """Greedy answers to a few held-out prompts, beside their references."""
        self._load_adapter(adapter)
        self.model.eval()
        conversations = [e for e in self.val_examples if e.messages]
        spread = max(1, len(conversations) // SAMPLE_ANSWERS)  # from across the data, not its first records
        rows = []
        with self._autocast():
            for example in conversations[::spread][:SAMPLE_ANSWERS]:
                answer = self.pipeline.answer(self.model, example, self.device)
                rows.append({"prompt": example.messages[-2].content, "reference": example.messages[-1].content,
                             "answer": answer})  # fmt: skip
        if rows:
            out.console.print(out.samples_table(rows))
        return rows


def without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same pass with nothing to learn: it runs forward and backward, and adds nothing."""
    return batch | {"labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
