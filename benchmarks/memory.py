"""The planner's memory model against measured memory, for each way of loading the base: `make bench-memory`.

    python benchmarks/memory.py                  # CPU: lora, qlora, 8-bit and qlora + 8-bit AdamW; TRL beside
    python benchmarks/memory.py --device cuda    # a GPU (`make bench-gpu` runs it): max_memory_allocated

SmolLM2-135M-Instruct, the training benchmark's settings (LoRA r8 / alpha 16 / dropout 0.05 on every projection,
8 examples per optimizer step, one epoch of the same generated conversations; fp32 on CPU for every contender,
so llmbox and TRL compute alike). Each run is its own process (contenders.py). "Measured" is what the model and
its training added: on CPU the peak resident memory during training minus the resident memory before the model
loaded (llmbox_engine/train/memory_meter.py, the same meter for TRL, started at its `on_train_begin`); on a GPU the
peak allocated. "Estimate" is the plan's `memory.total_bytes` (weights + LoRA state + one forward/backward pass).
Writes results/memory.json and the README table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, markdown_table, report_header, save_report, smollm2_dir
from contenders import QUANTIZED_CONTENDERS
from train_throughput import QUICK_HELDOUT_EXAMPLES, run_contender, settings_for, token_stats, write_data

MiB = 2**20
# the bar: an estimate within 30% of the measured peak
TOLERANCE = 0.30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train-examples", type=int, default=24, help="three optimizer steps of 8 by default")
    parser.add_argument("--contenders", default=",".join(QUANTIZED_CONTENDERS))
    parser.add_argument("--skip-steps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--workdir", type=Path, default=None, help="keep runs here (a finished run is reused)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args()


def method_of(name: str) -> str:
    if "qlora" in name:
        return "qlora (4-bit)"
    return "8-bit" if "8bit" in name else "lora"


def row_for(run: dict[str, Any]) -> dict[str, Any]:
    memory = run.get("memory") or {}
    measured = memory.get("training_bytes")
    estimate = memory.get("estimate_bytes") or None
    return {
        "contender": run["contender"],
        "method": method_of(run["contender"]),
        "ok": run["returncode"] == 0 and measured is not None,
        "estimate_mib": round(estimate / MiB) if estimate else None,
        "measured_mib": round(measured / MiB) if measured is not None else None,
        "estimate_over_measured": round(estimate / measured, 2) if estimate and measured else None,
        "within_tolerance": abs(estimate / measured - 1) <= TOLERANCE if estimate and measured else None,
        "before_model_mib": round(memory["before_model_bytes"] / MiB) if memory else None,
        "process_peak_rss_mib": round(run.get("peak_rss_mb", 0)),
        "tokens_per_s": round(run["tokens_per_s"], 1) if "tokens_per_s" in run else None,
        "error": run.get("error", "")[-400:] if run["returncode"] != 0 else None,
    }


def readme_table(rows: list[dict[str, Any]], device: str) -> str:
    measured = "peak allocated" if device == "cuda" else "measured (RSS added)"
    header = ["run", "method", "plan estimate", measured, "estimate / measured", "tokens/s", "process peak RSS"]

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value} MiB"

    body = [
        [
            QUANTIZED_CONTENDERS[r["contender"]],
            r["method"],
            mib(r["estimate_mib"]),
            mib(r["measured_mib"]),
            "-" if r["estimate_over_measured"] is None else f"{r['estimate_over_measured']:.2f}",
            "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}",
            mib(r["process_peak_rss_mib"]),
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def main() -> None:
    args = parse_args()
    names = [n for n in args.contenders.split(",") if n]
    unknown = [n for n in names if n not in QUANTIZED_CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}: choose from {', '.join(QUANTIZED_CONTENDERS)}")
    model = smollm2_dir()
    with tempfile.TemporaryDirectory(prefix="llmbox-bench-memory-") as scratch:
        workdir = args.workdir or Path(scratch)
        train, _ = write_data(workdir, model, args.train_examples, QUICK_HELDOUT_EXAMPLES)
        args.repeats = 1
        runs = [run_contender(name, 0, model, train, workdir, args) for name in names]
        data = token_stats(model, train)
    rows = [row_for(run) for run in runs]
    report = report_header() | {
        "benchmark": "memory",
        "device": args.device,
        "settings": settings_for(args.device),
        "data": data,
        "tolerance": TOLERANCE,
        "rows": rows,
        "runs": runs,
    }
    suffix = "_gpu" if args.device == "cuda" else ""
    output = args.output or RESULTS / f"memory{suffix}.json"
    save_report(report, output, readme_table(rows, args.device), f"memory{suffix}", readme=not args.no_readme)
    off = [r["contender"] for r in rows if r["within_tolerance"] is False]
    if off:
        print(f"estimate off by more than {TOLERANCE:.0%}: {', '.join(off)}")


if __name__ == "__main__":
    main()
