"""The cost of the collectives: the same training job in 2 processes x 1 thread and in 1 process x 2 threads.

    python benchmarks/scale.py [--examples 48] [--steps 6] [--repeats 2]

The job: `llmbox train --runtime local` on SmolLM2-135M-Instruct, synthetic chat examples, 8 x 2 per step,
fp32-or-bf16 as the planner picks, no TensorBoard, no sample answers. The baseline is one process using both
cores (`--nproc-per-node 1`, OMP_NUM_THREADS=2); the contender is torchrun's two processes with a core each
(`--nproc-per-node 2`, OMP_NUM_THREADS=1), exchanging gradients over gloo after every step. Both see the same
global batches, so both do the same arithmetic: the ratio of their training tokens/s (from adapter_info.json,
start-up excluded) is what splitting the work into processes costs, or gains, on this machine. Runs alternate.
Writes results/scale.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    alternating,
    markdown_table,
    report_header,
    run_child,
    save_report,
    smollm2_dir,
    write_json,
)
from synthetic import chat_records

LLMBOX = ["-c", "from llmbox.main import main; main()"]
SETUPS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}  # name: (processes, threads each)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (8 x 2 examples each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args()


def train_once(name: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    processes, threads = SETUPS[name]
    out = work / f"{processes}x{threads}-{time.monotonic_ns()}"
    command = [*LLMBOX, "train", str(smollm2_dir()), "--runtime", "local", "--data", str(data), "--output", str(out),
               "--nproc-per-node", str(processes), "--max-steps", str(args.steps), "--batch-size", "8",
               "--gradient-accumulation-steps", "2", "--validation-split", "0.1", "--no-tensorboard",
               "--skip-test"]  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the child and its workers inherit it
    child = run_child(command, out.with_suffix(".log"))
    if child.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    info = json.loads((out / "lora" / "adapter_info.json").read_text())
    assert info["plan"]["world_size"] == processes, info["plan"]["world_size"]
    return {
        "setup": name,
        "tokens_per_s": info["tokens_per_s"],
        "train_seconds": info["train_seconds"],
        "wall_s": round(child.wall_s, 2),
        "final_train_loss": info["final_train_loss"],
        "other_cpu_load": round(child.other_cpu_load, 3),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = {name: statistics.median(r["tokens_per_s"] for r in runs if r["setup"] == name) for name in SETUPS}
    baseline, contender = SETUPS
    return {
        "median_tokens_per_s": {name: round(v, 1) for name, v in median.items()},
        "two_processes_over_one": round(median[contender] / median[baseline], 3),
    }


def readme_table(report: dict[str, Any]) -> str:
    s, runs = report["summary"], report["runs"]
    rows = [[name, f"{s['median_tokens_per_s'][name]:.0f}",
             ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs if r["setup"] == name),
             f"{statistics.median(r['wall_s'] for r in runs if r['setup'] == name):.1f}"]
            for name in SETUPS]  # fmt: skip
    return "\n".join([
        f"Last run: {report['date']}, {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs), "
        f"SmolLM2-135M-Instruct, {report['steps']} steps of 8 x 2 examples, {report['repeats']} runs each, "
        "alternating.",
        "",
        markdown_table(["setup", "median training tok/s", "runs", "median wall s (with start-up)"], rows),
        "",
        f"2 processes / 1 process: {s['two_processes_over_one']:.2f}x training tokens/s (the same global batches).",
    ])  # fmt: skip


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="llmbox-scale-bench-") as scratch:
        data = write_json(Path(scratch) / "chat.json", chat_records(args.examples, seed=7))
        runs = alternating(list(SETUPS), args.repeats, lambda name: train_once(name, data, Path(scratch), args),
                           "tokens_per_s")  # fmt: skip
    report = report_header() | {
        "examples": args.examples,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary(runs),
    }
    save_report(report, args.output, readme_table(report), "scale-results", readme=not args.no_readme)


if __name__ == "__main__":
    main()
