"""LoRA / QLoRA fine-tuning of a causal language model on one device: the training story in one class.

`LoraRecipe(options).run()` does, in order:
- `_setup_data`: read and validate `--data` (every format and source kind), render with the model's chat
  template, tokenize once, and measure the token lengths;
- `_setup_plan`: the pure planner picks rank, precision, 4-bit or not, sequence length, batch and
  accumulation, learning rate, epochs, evaluation interval and auto-stop thresholds (`--dry-run` stops here);
- `_setup_model`: load the base model as planned and wrap it in LoRA; `_setup_optimizer`;
- `train`: token-budget, length-grouped batches shuffled between buckets (no padding to a fixed length); loss
  only at target positions, in chunks; gradient accumulation weighted by target tokens; evaluation every
  `eval_steps` with one status line; auto-stop (perfect loss, overfitting, patience, perplexity explosion);
  modes slow/medium/fast/non-stop/adaptive, `--circular` (batch grows per cycle) and `--force-epochs`;
  Ctrl+C / SIGTERM finish the step and save; one retry at half the micro-batch on out-of-memory;
- `save_checkpoint`: `checkpoints/checkpoint-N` (pruned), `best/`, `last/`, with optimizer, RNG and data position
  for `--resume`;
- `finish`: publish the best adapter atomically to `lora/` with `adapter_info.json`, plot
  `training_history.png`, and show sample answers (unless `--skip-test`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmbox import __version__
from llmbox.errors import UserError
from llmbox.facts import DataFacts, model_facts_from_config, read_gpu_facts, read_host_facts
from llmbox.model_facts import max_positions, read_config
from llmbox.plan import PlanFlags, TrainingPlan, plan
from llmbox_engine import host_view
from llmbox_engine.atomic import staged_dir
from llmbox_engine.data.batching import packed_batch, padded_batch, split_to_budget, token_budget_batches
from llmbox_engine.data.canonical import Example
from llmbox_engine.data.ingest import IngestResult, load_examples
from llmbox_engine.data.render import Renderer, TokenizedExample, chat_template_for, render_stats
from llmbox_engine.data.split import split_examples
from llmbox_engine.train import console as out
from llmbox_engine.train.adaptive import AdaptiveState, adapt
from llmbox_engine.train.artifacts import (
    TRAINING_STATE,
    checkpoint_problem,
    checkpoint_step,
    copy_checkpoint,
    latest_whole_checkpoint,
    model_fingerprint,
    prune_checkpoints,
    publish_adapter,
    seal_checkpoint,
    write_errors_reported,
)
from llmbox_engine.train.autostop import Evaluation, StopDecision, decide, rules_from_plan
from llmbox_engine.train.history_plot import plot_history
from llmbox_engine.train.loss import loss_sum
from llmbox_engine.train.model_setup import (
    attention_implementation,
    frozen_linears_to_bf16,
    load_base_model,
    load_tokenizer,
    require_bitsandbytes,
    takes_packed_rows,
    wrap_lora,
)
from llmbox_engine.train.scalar_log import ScalarLog
from llmbox_engine.train.schedule import learning_rate_at
from llmbox_engine.train.signals import GracefulStop
from llmbox_engine.train.state import Progress, load_training_state, restore_rng, save_training_state
from llmbox_engine.train.vision import VisionTraining
from llmbox_handlers import Handler, match_handler

# Without a validation set, a small training set is re-evaluated in eval mode (no dropout) instead.
MAX_TRAIN_SET_EVAL = 512
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
        self.lora_dir = self.output / "lora"
        self.checkpoints = self.output / "checkpoints"
        self.stop = GracefulStop()
        self.oom_retried = False

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
        self.tokenizer = load_tokenizer(o.model_path, o.trust_remote_code)
        self.ingest: IngestResult = load_examples(
            o.data,
            dataset_format=o.dataset_format,
            max_examples=o.max_examples,
            skip_bad_records=o.skip_bad_records,
            seed=o.seed,
        )
        takes_images = self.handler.takes_images(self.config)
        if self.ingest.images and not takes_images:
            raise UserError(f"{self.ingest.images} records carry images: {o.model_name} is a text-only model")
        # multimodal models train through their processor, text-only data too
        self.vision = VisionTraining(o.model_path, self.handler, o.trust_remote_code) if takes_images else None
        if self.vision is not None:
            self.tokenizer = self.vision.tokenizer
        limit = o.flags.max_seq_length or min(
            self.handler.max_seq_length, max_positions(self.config) or self.handler.max_seq_length
        )
        template = chat_template_for(self.tokenizer, self.handler.chat_template)
        if self.vision is not None:
            self.tokenized: list[TokenizedExample] = [*self.vision.tokenize(self.ingest.examples, limit)]
        else:
            self.tokenized = Renderer(self.tokenizer, template, limit).tokenize(self.ingest.examples)
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
        self.plan: TrainingPlan = plan(self.model_facts, gpus, self.data_facts, o.flags, read_host_facts())
        if self.vision is not None:
            self.plan = self.vision.modest_batches(self.plan)
        self.resume_state: dict[str, Any] | None = None
        resume_dir = self._resume_folder()
        if resume_dir is not None:
            self.resume_state = self._load_resume_state(resume_dir)
            saved = self.resume_state["plan"]
            changes: dict[str, Any] = {k: saved[k] for k in RESUMED_PLAN_FIELDS}
            if changes["target_modules"]:
                changes["target_modules"] = tuple(changes["target_modules"])
            self.plan = dataclasses.replace(self.plan, **changes)
        if o.json and o.dry_run:
            import json

            out.console.print_json(json.dumps(self.plan.to_dict(), default=str))
        else:
            out.print_plan(self.plan, o.model_name)
        if o.dry_run:
            return
        if self.plan.optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
            require_bitsandbytes(f"--optimizer {self.plan.optimizer}")
        if self.vision is not None:
            tokenized = self.vision.truncated(self.tokenized, self.plan.max_seq_length, self.ingest.examples)
        else:
            tokenized = self._truncated(self.tokenized, self.plan.max_seq_length)
        self.train_set, self.val_set = split_examples(tokenized, self.plan.n_val, self.plan.seed)
        self.val_examples = self._held_out_examples()
        truncated = sum(t.truncated for t in tokenized)
        if truncated:
            out.console.print(f"{truncated} example(s) longer than {self.plan.max_seq_length} tokens were truncated")

    def _resume_folder(self) -> Path | None:
        """--resume-from as given (it must be whole), or for --resume the newest whole checkpoint."""
        o = self.options
        if o.resume_from is not None:
            problem = checkpoint_problem(o.resume_from)
            if problem is not None:
                raise UserError(f"{o.resume_from}: cannot resume from it: {problem}")
            return o.resume_from
        if not o.resume:
            return None
        found = latest_whole_checkpoint(self.checkpoints, lambda m: out.console.print(f"warning: {m}", style="yellow"))
        if found is None:
            where = host_view.host_path(self.checkpoints)
            raise UserError(f"{where}: no checkpoint to resume from (none there is whole)")
        return found

    def _load_resume_state(self, folder: Path) -> dict[str, Any]:
        try:
            return load_training_state(folder) | {"folder": folder}
        except (OSError, RuntimeError, EOFError) as exc:  # a checkpoint saved before manifests, damaged since
            raise UserError(f"{folder / TRAINING_STATE}: unreadable ({exc}); resume from an older checkpoint") from None

    @staticmethod
    def _truncated(tokenized: Sequence[TokenizedExample], limit: int) -> list[TokenizedExample]:
        return [
            t if len(t) <= limit else TokenizedExample(t.input_ids[:limit], t.trainable[:limit], truncated=True)
            for t in tokenized
        ]

    def _held_out_examples(self) -> list[Example]:
        """The canonical examples behind the validation set (or the training set), for sample answers."""
        _, held_out = split_examples(self.ingest.examples, self.plan.n_val, self.plan.seed)
        return held_out or list(self.ingest.examples)

    def _setup_model(self) -> None:
        p = self.plan
        self.device = torch.device("cuda", p.gpu_index or 0) if p.device == "cuda" else torch.device("cpu")
        if p.device == "cpu":
            torch.manual_seed(p.seed)
        vision = self.vision is not None
        attention = attention_implementation(p.device, self.handler.supports_flash_attention, vision)
        # packed rows keep no padding anywhere; image batches stay padded (their pixels travel per row)
        self.packed = takes_packed_rows(attention) and not vision
        base = load_base_model(
            self.options.model_path,
            precision=p.precision,
            method=p.method,
            use_8bit=p.load_in_8bit,
            attention=attention,
            device=str(self.device),
            trust_remote_code=self.options.trust_remote_code,
            vision=self.vision is not None,
        )
        torch.manual_seed(p.seed)  # LoRA's A matrices: the same seed gives the same start
        self.model = wrap_lora(
            base,
            r=p.lora_r,
            alpha=p.lora_alpha,
            dropout=p.lora_dropout,
            target_modules=self.vision.lora_targets(p.target_modules) if self.vision else p.target_modules,
            gradient_checkpointing=p.gradient_checkpointing,
            quantized=p.load_in_4bit or p.load_in_8bit,
        )
        if p.precision == "bf16-mixed":
            frozen_linears_to_bf16(self.model)
        if self.resume_state is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(str(self.resume_state["folder"] / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.model, weights)
        trainable = sum(t.numel() for t in self.model.parameters() if t.requires_grad)
        out.console.print(f"model loaded: {attention} attention, {trainable:,} trainable LoRA parameters")

    def _setup_optimizer(self) -> None:
        params = [t for t in self.model.parameters() if t.requires_grad]
        name, lr = self.plan.optimizer, self.plan.learning_rate
        if name == "adamw_torch":
            self.optimizer: Any = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        elif name == "adafactor":
            from transformers.optimization import Adafactor

            self.optimizer = Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            self.optimizer = cls(params, lr=lr, weight_decay=0.0)
        if self.resume_state is not None:
            self.optimizer.load_state_dict(self.resume_state["optimizer"])

    def _setup_progress(self) -> None:
        if self.resume_state is not None:
            self.progress = Progress.from_dict(self.resume_state["progress"])
            restore_rng(self.resume_state["rng"])
            out.console.print(
                f"resuming from {self.resume_state['folder']} at step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}, batch {self.progress.batch_in_epoch})"
            )
        else:
            self.progress = Progress(batch_size=self.plan.batch_size, schedule_steps=self._schedule_steps())
            if self.plan.adaptive:
                self.progress.adaptive = AdaptiveState.start(self.plan.eval_steps)
        self.stop_rules = rules_from_plan(self.plan)
        self.run_name = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.writer = self._tensorboard_writer()

    def _tensorboard_writer(self) -> ScalarLog:
        warn = functools.partial(out.console.print, style="yellow")
        return ScalarLog(self.output / "logs" / "training" / self.run_name, warn)

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult | None:
        self.setup()
        if self.options.dry_run:
            return None
        with self.stop:  # a second Ctrl+C aborts the saving too: every artifact is staged, never half-written
            return self.finish(self.train())

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

    def _eval_interval(self) -> int:
        return self.progress.adaptive.eval_interval if self.progress.adaptive else self.plan.eval_steps

    def train(self) -> str:
        with out.StepBar() as self.bar:
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
                try:
                    loss = self._optimizer_step(group)
                except torch.OutOfMemoryError:
                    self._shrink_after_out_of_memory()
                    p = self.plan
                    batches = self.epoch_batches(prog.epoch, prog.batch_size)
                    prog.batch_in_epoch = 0  # the new batches cut the epoch differently: start it again
                    continue
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
                if self.stop.requested:
                    return f"stopped by {self.stop.requested}"
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

    def _shrink_after_out_of_memory(self) -> None:
        """Out of memory: once, halve the micro-batch and double the accumulation (same effective batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        where = f"GPU {self.plan.gpu_name}" if self.plan.device == "cuda" else "CPU RAM"
        if self.oom_retried or self.progress.batch_size == 1:
            raise UserError(
                f"out of memory on {where} at micro-batch {self.progress.batch_size} x {self.plan.max_seq_length} "
                "tokens: try --max-seq-length with a smaller value, --method qlora, or a GPU with more free memory"
            )
        self.oom_retried = True
        batch = max(1, self.progress.batch_size // 2)
        accumulation = self.plan.gradient_accumulation_steps * 2
        out.console.print(
            f"out of memory on {where}: retrying with micro-batch {batch} x {accumulation} accumulation", style="yellow"
        )
        forward_tokens = max(self.plan.max_seq_length, self.plan.max_forward_tokens // 2)
        self.plan = dataclasses.replace(
            self.plan, batch_size=batch, gradient_accumulation_steps=accumulation, max_batch_size=batch,
            max_forward_tokens=forward_tokens,
        )  # fmt: skip
        self.progress.batch_size = batch

    def _final_evaluation(self, steps_since_eval: int, loss_since_eval: float, reason: str) -> str:
        if steps_since_eval:
            return self._evaluate(loss_since_eval / steps_since_eval, final=True) or reason
        return reason

    def _optimizer_step(self, group: list[list[int]]) -> float:
        """One optimizer step over `group` micro-batches; each target token weighs the same."""
        p, prog = self.plan, self.progress
        lengths = self.train_lengths
        passes = [piece for ids in group for piece in split_to_budget(ids, lengths, p.max_forward_tokens, self.packed)]
        batches = [self._collate([self.train_set[i] for i in ids]) for ids in passes]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        lr = learning_rate_at(prog.step, p.learning_rate, prog.schedule_steps)
        lr *= prog.adaptive.lr_scale if prog.adaptive else 1.0
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        started = time.monotonic()
        total = self._accumulate(batches, targets)
        norm = torch.nn.utils.clip_grad_norm_([t for t in self.model.parameters() if t.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real_tokens = sum(len(self.train_set[i]) for ids in group for i in ids)
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

    def _collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        return packed_batch(examples) if self.packed else self._padded(examples)

    def _padded(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        if self.vision is not None:
            return self.vision.collate(examples)  # padded too, with the images' pixels
        return padded_batch(examples, self.tokenizer.pad_token_id, 8)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16-mixed: the forward's matmuls in bf16 over fp32 weights (autograd casts back in backward)."""
        if self.plan.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _accumulate(self, batches: list[dict[str, torch.Tensor]], targets: int) -> float:
        total = 0.0
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                summed, _ = loss_sum(self.model, batch, checkpoint_chunks=self.plan.gradient_checkpointing)
            (summed / max(1, targets)).backward()
            total += float(summed.detach())
        return total

    # ---- evaluation and auto-stop ------------------------------------------------------------------------

    @torch.no_grad()
    def loss_on(self, examples: Sequence[TokenizedExample]) -> float:
        """Mean loss per target token over `examples`, in eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for ids in token_budget_batches([len(t) for t in examples], 4 * self.plan.max_seq_length, 16):
            batch = self._collate([examples[i] for i in ids])
            with self._autocast():
                summed, n = loss_sum(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total, count = total + float(summed), count + n
        self.model.train()
        return total / max(1, count)

    def _evaluate(self, running_train_loss: float, final: bool = False) -> str | None:
        prog = self.progress
        if self.val_set:
            train_loss, val_loss = running_train_loss, self.loss_on(self.val_set)
        elif len(self.train_set) <= MAX_TRAIN_SET_EVAL:
            train_loss, val_loss = self.loss_on(self.train_set), None
        else:
            train_loss, val_loss = running_train_loss, None
        prog.evaluations.append(Evaluation(step=prog.step, train_loss=train_loss, val_loss=val_loss))
        decision = decide(prog.evaluations, self.stop_rules)
        monitored = val_loss if val_loss is not None else train_loss
        if decision.best_index == len(prog.evaluations) - 1:
            prog.best_val, prog.best_step = monitored, prog.step
            self.save_checkpoint(best=True)
        elif prog.step % self.plan.save_steps == 0 or final:
            self.save_checkpoint()
        self._log_evaluation(train_loss, val_loss, decision)
        if prog.adaptive is not None and not decision.stop:
            prog.adaptive, note = adapt(prog.evaluations, prog.adaptive)
            if note:
                out.console.print(f"  adaptive: {note}", style="cyan")
        return decision.reason if decision.stop else None

    def _log_evaluation(self, train_loss: float, val_loss: float | None, decision: StopDecision) -> None:
        prog = self.progress
        elapsed = time.monotonic() - self.started
        batches_in_epoch = len(self.epoch_batches(prog.epoch, prog.batch_size))
        line = out.status_line(
            number=len(prog.evaluations),
            elapsed=elapsed,
            step=prog.step,
            epoch=prog.epoch + min(1.0, prog.batch_in_epoch / max(1, batches_in_epoch)),
            train_loss=train_loss,
            val_loss=val_loss,
            show_perplexity=self.data_facts.task == "text-generation",
            best=prog.best_val,
            patience_left=decision.patience_left if self.plan.auto_stop else None,
            patience=self.plan.patience if self.plan.auto_stop else None,
            tokens_per_s=prog.tokens_seen / max(1e-9, elapsed),
        )
        out.console.print(line)
        self.writer.add_scalar("eval/train_loss", train_loss, prog.step)
        if val_loss is not None:
            self.writer.add_scalar("eval/val_loss", val_loss, prog.step)
            self.writer.add_scalar("eval/perplexity", math.exp(min(val_loss, 50)), prog.step)
        self.writer.flush()

    # ---- checkpoints and artifacts -----------------------------------------------------------------------

    def save_checkpoint(self, best: bool = False) -> Path:
        """checkpoint-N (then pruned), copied to last/ and, for a new best, to best/."""
        numbered = self.checkpoints / f"checkpoint-{self.progress.step}"
        with self._writing(numbered.name):
            with staged_dir(numbered) as staging:
                self.model.save_pretrained(str(staging), safe_serialization=True)
                save_training_state(staging, self.progress, self.optimizer, self.plan.to_dict())
                seal_checkpoint(staging, self.progress.step)
            copy_checkpoint(numbered, self.checkpoints / "last")
            if best:
                copy_checkpoint(numbered, self.checkpoints / "best")
            prune_checkpoints(self.checkpoints, self.plan.save_total_limit)
        return numbered

    def _writing(self, what: str) -> contextlib.AbstractContextManager[None]:
        return write_errors_reported(what, self.lora_dir, host_view.host_path)

    def finish(self, stop_reason: str) -> TrainResult:
        prog = self.progress
        prog.stop_reason = stop_reason
        last = self.checkpoints / "last"
        if checkpoint_step(last) != prog.step or checkpoint_problem(last) is not None:
            self.save_checkpoint()
        self.writer.close()
        best = self.checkpoints / "best"
        source = best if checkpoint_problem(best) is None else last
        decision = decide(prog.evaluations, self.stop_rules)
        mode = "circular" if self.plan.circular else self.plan.mode
        with self._writing(f"the adapter to {self.lora_dir.name}/"):
            adapter = publish_adapter(source, self.lora_dir, self.adapter_info(source))
        try:
            plot_history(
                prog.train_points,
                prog.evaluations,
                decision.best_index,
                self.output / "training_history.png",
                f"{self.options.model_name}: LoRA r{self.plan.lora_r}, {mode} mode",
            )
        except OSError as exc:  # the adapter is out; a plot that cannot be written is worth a warning, not an error
            out.console.print(f"warning: training_history.png not written: {exc.strerror or exc}", style="yellow")
        out.console.print(f"[bold]stopped:[/] {stop_reason}")
        shown = host_view.host_path
        out.console.print(f"adapter: {shown(adapter)}  (from {source.name}, step {checkpoint_step(source)})")
        plot = shown(self.output / "training_history.png")
        out.console.print(f"checkpoints: {shown(self.checkpoints)}   plot: {plot}")
        if not self.options.skip_test:
            self.sample_answers(adapter)
        return TrainResult(adapter, stop_reason, prog.step, prog.best_val)

    def adapter_info(self, source: Path) -> dict[str, Any]:
        prog = self.progress
        content = hashlib.blake2b(digest_size=16)
        for example in self.ingest.examples:
            content.update(example.content_key().encode())
        final = prog.evaluations[-1] if prog.evaluations else None
        return {
            "llmbox_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {
                "path": str(self.options.model_path),
                "name": self.options.model_name,
                "model_type": self.config.get("model_type"),
                "fingerprint": model_fingerprint(self.options.model_path),
            },
            "handler": self.handler.name,
            "plan": self.plan.to_dict(),
            "data": {
                "spec": self.options.data,
                "sources": [{"path": s.path, "format": s.format, "records": s.records} for s in self.ingest.sources],
                "examples": len(self.ingest.examples),
                "duplicates_removed": self.ingest.duplicates,
                "content_hash": content.hexdigest(),
                "task": self.ingest.task,
            },
            "published_checkpoint": source.name,
            "published_step": checkpoint_step(source),
            "final_train_loss": final.train_loss if final else None,
            "final_val_loss": final.val_loss if final else None,
            "best_val_loss": prog.best_val,
            "best_step": prog.best_step,
            "steps": prog.step,
            "epochs": prog.epoch + prog.batch_in_epoch / max(1, len(self.epoch_batches(prog.epoch, prog.batch_size))),
            "stop_reason": prog.stop_reason,
            "train_seconds": round(prog.train_seconds, 2),
            "tokens_per_s": round(prog.tokens_seen / max(1e-9, prog.train_seconds), 1),
        }

    @torch.no_grad()
    def sample_answers(self, adapter: Path) -> list[dict[str, Any]]:
        """Greedy answers to a few held-out prompts, beside their references."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(adapter / "adapter_model.safetensors")))
        self.model.eval()
        template = chat_template_for(self.tokenizer, self.handler.chat_template)
        rows = []
        conversations = [e for e in self.val_examples if e.messages]
        spread = max(1, len(conversations) // SAMPLE_ANSWERS)  # from across the data, not its first records
        with self._autocast():
            for example in conversations[::spread][:SAMPLE_ANSWERS]:
                rows.append(self._sample_answer(example, template))
        if rows:
            out.console.print(out.samples_table(rows))
        return rows

    def _sample_answer(self, example: Example, template: str) -> dict[str, Any]:
        prompt_messages = [{"role": m.role, "content": m.content} for m in example.messages[:-1]]
        reference = example.messages[-1].content
        if self.vision is not None:
            answer = self.vision.answer(self.model, example, self.device)
            return {"prompt": prompt_messages[-1]["content"], "reference": reference, "answer": answer}
        encoded = self.tokenizer.apply_chat_template(
            prompt_messages, chat_template=template, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        generated = self.model.generate(
            **encoded, max_new_tokens=96, do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id
        )
        answer = self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        return {"prompt": prompt_messages[-1]["content"], "reference": reference, "answer": answer}
