"""Where llmbox's CPU training step spends its time: torch.profiler over one optimizer step.

    python benchmarks/profile_train_step.py                          # as train_throughput.py runs llmbox
    python benchmarks/profile_train_step.py --micro-batch 4          # 4 x 2 accumulation instead of 8 x 1
    python benchmarks/profile_train_step.py --lora-dropout 0         # without LoRA dropout
    python benchmarks/profile_train_step.py --per-projection-dropout # peft's dropout (a mask per projection)
    python benchmarks/profile_train_step.py --forward-tokens 2048    # passes of at most 2048 tokens

The same data and settings as train_throughput.py; the first `--steps - 1` steps are warm-up, the last
one is profiled. Prints (and writes to results/train_profile.json) the share of CPU time by kind of
operator, the top operators, the step's wall time and tokens/s, and the process's user/system CPU split.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, matmul_gflops, peak_rss_mb, smollm2_dir, write_json
from synthetic import chat_records
from train_throughput import FLOPS_PER_TOKEN, SETTINGS, TOTAL_EXAMPLES

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "dropout": ("dropout", "aten::bernoulli", "aten::native_dropout"),
    "copies": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::index", "aten::fill_"),
    "optimizer": ("optimizer", "adam", "aten::_foreach", "aten::lerp", "aten::addcmul", "aten::sqrt"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
}


def kind_of(op: str) -> str:
    lowered = op.lower()
    for kind, needles in KINDS.items():
        if any(n.lower() in lowered for n in needles):
            return kind
    return "elementwise and other"


def profile_llmbox(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from llmbox.plan import PlanFlags
    from llmbox_engine.train import cpu_speed
    from llmbox_engine.train.recipe import LoraRecipe, TrainOptions

    cpu_speed.prepare_process()  # as `llmbox train` sets up its process on CPU

    data = workdir / "train.json"
    write_json(data, chat_records(TOTAL_EXAMPLES, seed=SETTINGS["seed"])[: args.examples])
    found: dict[str, Any] = {}

    class ProfiledRecipe(LoraRecipe):
        def _setup_plan(self) -> None:
            super()._setup_plan()
            if args.lora_dropout is not None:
                self.plan = dataclasses.replace(self.plan, lora_dropout=args.lora_dropout)

        def _optimizer_step(self, group: list[list[int]]) -> float:
            if self.progress.step != args.steps - 1:
                return super()._optimizer_step(group)
            tokens = sum(len(self.train_set[i]) for ids in group for i in ids)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = super()._optimizer_step(group)
            after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
            found.update(
                tokens=tokens,
                seconds=seconds,
                user_s=after.ru_utime - before.ru_utime,
                sys_s=after.ru_stime - before.ru_stime,
                events=prof.key_averages(),
            )
            self.stop.requested = "profiled"  # end the run after this step
            return loss

        def _evaluate(self, running_train_loss: float, final: bool = False) -> str | None:
            return None

    flags = PlanFlags(
        epochs=1,
        force_epochs=True,
        batch_size=args.micro_batch,
        gradient_accumulation_steps=SETTINGS["batch_size"] // args.micro_batch,
        lora_r=SETTINGS["lora_r"],
        lora_alpha=SETTINGS["lora_alpha"],
        learning_rate=SETTINGS["learning_rate"],
        validation_split=0.0,
        seed=SETTINGS["seed"],
    )
    options = TrainOptions(model_path=smollm2_dir(), output=workdir / "run", data=str(data), flags=flags)
    if args.per_projection_dropout:  # peft's own: a mask per adapted projection
        import llmbox_engine.train.shared_dropout as shared

        shared.share_lora_dropout = lambda model, p: None
    recipe = ProfiledRecipe(dataclasses.replace(options, tensorboard=False, skip_test=True))
    recipe.setup()
    if args.forward_tokens:
        recipe.plan = dataclasses.replace(recipe.plan, max_forward_tokens=args.forward_tokens)
    with recipe.stop:
        recipe.train()
    return found


def summary(found: dict[str, Any], gflops: float, top: int) -> dict[str, Any]:
    events = [e for e in found["events"] if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    tokens_per_s = found["tokens"] / found["seconds"]
    return {
        "tokens": found["tokens"],
        "step_seconds": round(found["seconds"], 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "matmul_gflops": round(gflops, 1),
        "mfu": round(tokens_per_s * FLOPS_PER_TOKEN / (gflops * 1e9), 4),
        "user_s": round(found["user_s"], 2),
        "sys_s": round(found["sys_s"], 2),
        "process_peak_rss_mb": round(peak_rss_mb(), 1),  # over all the steps, warm-up included
        "share_by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=24, help="training examples (8 per optimizer step)")
    parser.add_argument("--steps", type=int, default=2, help="the last of these steps is profiled")
    parser.add_argument("--micro-batch", type=int, default=8, choices=(1, 2, 4, 8))
    parser.add_argument("--lora-dropout", type=float, default=None, help="override the planner's 0.05")
    parser.add_argument("--forward-tokens", type=int, default=None, help="override the plan's tokens per pass")
    parser.add_argument("--per-projection-dropout", action="store_true", help="peft's dropout, not the shared one")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None, help="default: results/train_profile-<variant>.json")
    args = parser.parse_args()
    variant = f"mb{args.micro_batch}" + ("" if args.lora_dropout is None else f"-dropout{args.lora_dropout:g}")
    variant += (f"-pass{args.forward_tokens}" if args.forward_tokens else "") + (
        "-peftdropout" if args.per_projection_dropout else ""
    )
    output = args.output or RESULTS / f"train_profile-{variant}.json"
    with tempfile.TemporaryDirectory(prefix="llmbox-profile-") as tmp:
        found = profile_llmbox(args, Path(tmp))
    result = {"micro_batch": args.micro_batch, "lora_dropout": args.lora_dropout} | summary(
        found, matmul_gflops(), args.top
    )
    for key, value in result.items():
        print(f"{key}: {value}")
    write_json(output, result)


if __name__ == "__main__":
    main()
