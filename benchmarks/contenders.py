"""One training contender, run in its own process: `python benchmarks/contenders.py SPEC.json`.

Every contender trains the same LoRA (r8, alpha 16, dropout 0.05, q/k/v/o/gate/up/down, the same
initialisation seed; fp32 on CPU, a bf16 base on a GPU, with flash-attention 2 where it is installed) on the
same token ids and assistant-only loss masks, rendered by llmbox's Renderer, for one epoch at 8 examples per
optimizer step. Each one times its own training loop the same way: a clock mark at the start of the loop and
after every optimizer step, and the real (non-padding) tokens of that step; the first `skip_steps` steps are
left out of tokens/s (warm-up). Model loading, tokenisation and saving are outside the clock. The adapter is
saved for the shared held-out loss (`heldout.py`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import peak_rss_mb, read_json, render_with_llmbox, write_json

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DROPOUT = 0.05  # llmbox's planner default, used by every contender
PAD_TO = 1024
# 8 rows of 1024 tokens need more than the 23 GB here without gradient checkpointing (OOM-killed at 23 GB):
# the pad-to-max contender takes its 8 examples per step as 4 x 2 accumulation.
PAD_TO_MAX_MICRO_BATCH = 4

CONTENDERS = {
    "llmbox": "llmbox engine (LoraRecipe, as `llmbox train` runs it: bf16 matmuls over fp32 weights on CPUs with "
    "native bf16, else fp32)",
    "llmbox_fp32": "llmbox engine with --precision fp32 (the other contenders' precision on CPU)",
    "trl_default": "TRL SFTTrainer, defaults (gradient checkpointing on, pad to longest)",
    "trl_padding_free": "TRL SFTTrainer, padding_free=True, max_length=None",
    "hf_pad_to_max": "transformers Trainer + peft, every example padded to 1024 (micro-batch 4 x 2 accumulation)",
    "hf_group_by_length": "transformers Trainer + peft, pad to longest, group_by_length sampler",
}
# Not in the default set (`--contenders` picks them): llmbox variants, to show where its time and memory go.
EXTRA_CONTENDERS = {
    "llmbox_micro4": "llmbox engine, micro-batches of 4 x 2 accumulation (8 per step)",
}
# The memory benchmark's set (memory.py): each method of the guide, and TRL with the same QLoRA settings.
QUANTIZED_CONTENDERS = {
    "llmbox_lora": "llmbox engine, --method lora",
    "llmbox_qlora": "llmbox engine, --method qlora (4-bit NF4, double quantization)",
    "llmbox_8bit": "llmbox engine, --use-8bit (8-bit weights)",
    "llmbox_qlora_adamw8": "llmbox engine, --method qlora --optimizer adamw_bnb_8bit",
    "trl_lora": "TRL SFTTrainer, defaults, LoRA on the full-precision base",
    "trl_qlora": "TRL SFTTrainer, defaults, QLoRA: the same 4-bit NF4 base, prepare_model_for_kbit_training",
}


@dataclass
class StepClock:
    """Marks at the loop's start and after each optimizer step, with the real tokens of each step."""

    marks: list[float] = field(default_factory=list)
    cpu_marks: list[float] = field(default_factory=list)  # this process's CPU seconds, all threads
    tokens: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what the contender reports about itself

    def start(self) -> None:
        _synchronize()
        self.marks, self.cpu_marks, self.tokens = [time.perf_counter()], [time.process_time()], []

    def step(self, tokens: int) -> None:
        _synchronize()
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())
        self.tokens.append(tokens)

    def summary(self, skip_steps: int) -> dict[str, Any]:
        seconds = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        skip = min(skip_steps, max(0, len(seconds) - 1))  # always time at least one step
        timed_s, timed_tokens = sum(seconds[skip:]), sum(self.tokens[skip:])
        timed_cpu_s = self.cpu_marks[-1] - self.cpu_marks[skip]
        return {
            "steps": len(seconds),
            "skipped_steps": skip,
            "step_seconds": [round(s, 3) for s in seconds],
            "step_tokens": self.tokens,
            "train_loop_s": round(sum(seconds), 2),
            "timed_s": round(timed_s, 2),
            "timed_tokens": timed_tokens,
            "tokens_per_s": timed_tokens / max(1e-9, timed_s),
            "tokens_per_s_all_steps": sum(self.tokens) / max(1e-9, sum(seconds)),
            # less sensitive to other processes on the machine than wall time (but counts threads' spin-waits)
            "tokens_per_cpu_s": timed_tokens / max(1e-9, timed_cpu_s),
        } | self.info


def _synchronize() -> None:
    """On a GPU, wait for the queued kernels, so a clock mark falls where the step really ended."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def on_gpu(spec: dict[str, Any]) -> bool:
    return bool(spec.get("device") == "cuda")


def attention_for(spec: dict[str, Any]) -> str:
    """SDPA on CPU; on a GPU flash-attention 2 where installed (padding-free TRL needs it to keep rows apart)."""
    import importlib.util

    return "flash_attention_2" if on_gpu(spec) and importlib.util.find_spec("flash_attn") else "sdpa"


# ---- llmbox ------------------------------------------------------------------------------------------------


def run_llmbox(
    spec: dict[str, Any],
    clock: StepClock,
    micro_batch: int | None = None,
    precision: str | None = None,
    method: str | None = None,
    use_8bit: bool = False,
    optimizer: str | None = None,
) -> Path:
    """LoraRecipe on `llmbox train`'s code path; only the periodic evaluation is off (nobody else has one)."""
    from llmbox.plan import PlanFlags
    from llmbox_engine.train import cpu_speed
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    if not on_gpu(spec):
        cpu_speed.prepare_process()  # as `llmbox train` sets up its process on CPU (engine/.../train/command.py)

    class TimedRecipe(LoraRecipe):
        def _optimizer_step(self, group: list[list[int]]) -> float:
            loss = super()._optimizer_step(group)
            clock.step(sum(len(self.train_set[i]) for ids in group for i in ids))
            return loss

        def _evaluate(self, running_train_loss: float, final: bool = False) -> str | None:
            return None

    micro = micro_batch or spec["batch_size"]
    flags = PlanFlags(
        epochs=1,
        force_epochs=True,
        batch_size=micro,
        gradient_accumulation_steps=spec["batch_size"] // micro,
        lora_r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        learning_rate=spec["learning_rate"],
        validation_split=0.0,
        seed=spec["seed"],
        precision=precision,
        method=method,
        use_8bit=use_8bit,
        optimizer=optimizer,
    )
    output = Path(spec["output"])
    options = TrainOptions(
        model_path=Path(spec["model"]),
        output=output,
        data=spec["train_data"],
        flags=flags,
        tensorboard=False,
        skip_test=True,
    )
    recipe = TimedRecipe(options)
    recipe.setup()
    clock.info["precision"] = recipe.plan.precision
    with recipe.stop:
        clock.start()
        reason = recipe.train()
        recipe.finish(reason)
    clock.info["memory"] = read_json(output / "lora" / "adapter_info.json")["memory"]
    return output / "lora"


# ---- Hugging Face contenders -------------------------------------------------------------------------------


def tokenized_rows(spec: dict[str, Any], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(input ids, assistant mask) per training example, from llmbox's loader and Renderer."""
    tokenized = render_with_llmbox(Path(spec["model"]), spec["train_data"], tokenizer, PAD_TO, spec["seed"])
    return [(t.input_ids.tolist(), t.trainable.astype(int).tolist()) for t in tokenized]


def load_lora_model(spec: dict[str, Any], four_bit: bool = False) -> Any:
    """The base (fp32 on CPU, bf16 on a GPU; `four_bit`: NF4 with double quantization, computing in that dtype,
    the QLoRA recipe) and the LoRA wrapped the way llmbox wraps it (same seed, same A)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from llmbox_engine import quantized

    dtype = torch.bfloat16 if on_gpu(spec) else torch.float32
    device = "cuda" if on_gpu(spec) else "cpu"
    extra: dict[str, Any] = {}
    if four_bit:
        extra["quantization_config"] = quantized.config(4, compute=dtype)  # exactly llmbox's QLoRA settings
        extra["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation=attention_for(spec), **extra
    )
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.to(device)
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])
    config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=LORA_DROPOUT,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


class CountingCollator:
    """Wraps a collator and records the real tokens of each batch it builds, in order."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.inner = inner
        self.batch_tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return self.inner(features)


def clock_callback(clock: StepClock, counter: CountingCollator, meter: Any = None) -> Any:
    from transformers import TrainerCallback

    class ClockCallback(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if meter is not None:
                meter.training_starts()  # llmbox's own meter, started at the same point of the run
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            per_step = args.gradient_accumulation_steps  # micro-batches collated per optimizer step
            clock.step(sum(counter.batch_tokens[(state.global_step - 1) * per_step : state.global_step * per_step]))

    return ClockCallback()


def common_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_dir": str(Path(spec["output"]) / "trainer"),
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"],
        "num_train_epochs": 1,
        "seed": spec["seed"],
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not on_gpu(spec),
        "bf16": on_gpu(spec),  # SFTConfig's own default, kept on a GPU; off on CPU, where it halves the speed
        "fp16": False,
        "disable_tqdm": True,
    }


def train_hf(trainer: Any, clock: StepClock, spec: dict[str, Any], meter: Any = None) -> Path:
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(clock_callback(clock, counter, meter))
    trainer.train()
    adapter = Path(spec["output"]) / "adapter"
    trainer.model.save_pretrained(str(adapter))
    return adapter


def run_trl(spec: dict[str, Any], clock: StepClock, padding_free: bool, four_bit: bool = False) -> Path:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmbox_engine.train.memory_meter import MemoryMeter

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = tokenized_rows(spec, tokenizer)
    dataset = Dataset.from_dict({"input_ids": [r[0] for r in rows], "assistant_masks": [r[1] for r in rows]})
    extra: dict[str, Any] = {"padding_free": True, "max_length": None} if padding_free else {}
    # bf16=False: SFTConfig turns bf16 on by default, even on CPU; everything else stays TRL's default
    config = SFTConfig(**common_arguments(spec), **extra)
    meter = MemoryMeter(torch.device("cuda" if on_gpu(spec) else "cpu"))
    model = load_lora_model(spec, four_bit)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    adapter = train_hf(trainer, clock, spec, meter)
    clock.info["memory"] = meter.read(estimate_bytes=0).to_dict()
    return adapter


def run_plain_trainer(spec: dict[str, Any], clock: StepClock, pad_to_max: bool) -> Path:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = tokenized_rows(spec, tokenizer)
    dataset = Dataset.from_dict(
        {
            "input_ids": [r[0] for r in rows],
            "attention_mask": [[1] * len(r[0]) for r in rows],
            "labels": [[t if m else -100 for t, m in zip(*r, strict=True)] for r in rows],
        }
    )
    arguments = common_arguments(spec)
    if pad_to_max:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=PAD_TO)
        arguments["per_device_train_batch_size"] = PAD_TO_MAX_MICRO_BATCH
        arguments["gradient_accumulation_steps"] = spec["batch_size"] // PAD_TO_MAX_MICRO_BATCH
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest")
        arguments["train_sampling_strategy"] = "group_by_length"
    trainer = Trainer(
        model=load_lora_model(spec), args=TrainingArguments(**arguments), train_dataset=dataset, data_collator=collator
    )
    return train_hf(trainer, clock, spec)


RUNNERS: dict[str, Callable[[dict[str, Any], StepClock], Path]] = {
    "llmbox": run_llmbox,
    "llmbox_fp32": lambda spec, clock: run_llmbox(spec, clock, precision="fp32"),
    "llmbox_micro4": lambda spec, clock: run_llmbox(spec, clock, micro_batch=4),
    "trl_default": lambda spec, clock: run_trl(spec, clock, padding_free=False),
    "trl_padding_free": lambda spec, clock: run_trl(spec, clock, padding_free=True),
    "hf_pad_to_max": lambda spec, clock: run_plain_trainer(spec, clock, pad_to_max=True),
    "hf_group_by_length": lambda spec, clock: run_plain_trainer(spec, clock, pad_to_max=False),
    "llmbox_lora": lambda spec, clock: run_llmbox(
        spec, clock, precision=None if on_gpu(spec) else "fp32", method="lora"
    ),
    "llmbox_qlora": lambda spec, clock: run_llmbox(
        spec, clock, precision=None if on_gpu(spec) else "fp32", method="qlora"
    ),
    "llmbox_8bit": lambda spec, clock: run_llmbox(
        spec, clock, precision=None if on_gpu(spec) else "fp32", use_8bit=True
    ),
    "llmbox_qlora_adamw8": lambda spec, clock: run_llmbox(
        spec, clock, precision=None if on_gpu(spec) else "fp32", method="qlora", optimizer="adamw_bnb_8bit"
    ),
    "trl_lora": lambda spec, clock: run_trl(spec, clock, padding_free=False),
    "trl_qlora": lambda spec, clock: run_trl(spec, clock, padding_free=False, four_bit=True),
}


def main(spec_path: str) -> None:
    spec = read_json(Path(spec_path))
    clock = StepClock()
    adapter = RUNNERS[spec["contender"]](spec, clock)
    result = clock.summary(spec["skip_steps"]) | {
        "contender": spec["contender"],
        "adapter": str(adapter),
        "worker_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if on_gpu(spec):
        import torch

        result["peak_gpu_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    write_json(Path(spec["output"]) / "result.json", result)


if __name__ == "__main__":
    main(sys.argv[1])
