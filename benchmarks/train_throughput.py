"""LoRA training throughput, side by side: llmbox's engine against TRL and the plain transformers Trainer.

    python benchmarks/train_throughput.py                       # the quick default (fits `make bench`)
    python benchmarks/train_throughput.py --train-examples 400  # the full benchmark: one epoch of 400
    python benchmarks/train_throughput.py --device cuda         # on a GPU (`make bench-gpu`): bf16, all 400

SmolLM2-135M-Instruct in fp32 on this machine, LoRA r8 / alpha 16 / dropout 0.05 on q, k, v, o, gate, up
and down, 8 examples per optimizer step, learning rate 2e-4, seed 42, one epoch over the same generated
conversations (34-717 tokens after the chat template). Each contender runs in its own process (its peak
RSS is its own, from the kernel) and times its own training loop (see contenders.py); the order alternates
between repeats. The held-out loss comes from one shared function (heldout.py) over the same held-out
conversations. MFU = achieved FLOP/s / the fp32 matmul rate measured around each contender, with achieved
FLOP/s = tokens/s x 4 x 134.5M x 1.05 (forward 2N, backward through frozen weights 2N, attention ~5%).

On a GPU (`--device cuda`) every contender trains a bf16 base (TRL's own default there), with flash-attention
2 where it is installed (llmbox then packs rows and TRL's padding-free mode keeps them apart); the matmul
rate is bf16 (8192 x 8192) and memory is the peak reserved by torch on the GPU.

Writes results/train.json (results/train_gpu.json on a GPU), a plot beside it and the table in README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    ChildRun,
    machine_info,
    markdown_table,
    matmul_gflops,
    publish_table,
    read_json,
    run_child,
    smollm2_dir,
    versions,
    write_json,
)
from contenders import CONTENDERS, EXTRA_CONTENDERS
from synthetic import chat_records

PARAMS = 134.5e6
FLOPS_PER_TOKEN = 4 * PARAMS * 1.05
TOTAL_EXAMPLES = 400
HELDOUT_EXAMPLES = 40
# The quick default fits `make bench` (~12 minutes here, two CPU cores): two optimizer steps per contender,
# the first one left out of tokens/s as warm-up. `--train-examples 400 --heldout-examples 40` is the full run.
QUICK_TRAIN_EXAMPLES = 16
QUICK_HELDOUT_EXAMPLES = 8
SETTINGS = {
    "model": "SmolLM2-135M-Instruct",
    "precision": "fp32",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,
    "epochs": 1,
    "seed": 42,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=QUICK_TRAIN_EXAMPLES, help="of the 400 generated")
    parser.add_argument("--heldout-examples", type=int, default=QUICK_HELDOUT_EXAMPLES, help="of the 40 held out")
    parser.add_argument("--skip-steps", type=int, default=1, help="first optimizer steps left out of tokens/s")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender, order alternating")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS | EXTRA_CONTENDERS)}",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per contender run")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep adapters and logs here, and reuse the runs it holds"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU benchmark, in bf16")
    parser.add_argument("--output", type=Path, default=None, help="default: results/train.json (train_gpu.json)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    return parser.parse_args()


# ---- data -------------------------------------------------------------------------------------------------


def write_data(workdir: Path, model: Path, train_examples: int, heldout_examples: int) -> tuple[Path, Path]:
    """The 400 + 40 generated conversations (one seed); fewer than all: a subset spread evenly over their lengths."""
    records = chat_records(TOTAL_EXAMPLES + HELDOUT_EXAMPLES, seed=SETTINGS["seed"])
    lengths = token_lengths(model, write_json(workdir / "generated.json", records))
    train = spread_by_length(records[:TOTAL_EXAMPLES], lengths[:TOTAL_EXAMPLES], train_examples)
    heldout = spread_by_length(records[TOTAL_EXAMPLES:], lengths[TOTAL_EXAMPLES:], heldout_examples)
    return write_json(workdir / "train.json", train), write_json(workdir / "heldout.json", heldout)


def spread_by_length(records: list[Any], lengths: list[int], n: int) -> list[Any]:
    """`n` records at evenly spaced quantiles of their token lengths, in their original order."""
    if n >= len(records):
        return records
    by_length = sorted(range(len(records)), key=lambda i: lengths[i])
    return [records[i] for i in sorted(by_length[int((j + 0.5) * len(records) / n)] for j in range(n))]


def token_lengths(model: Path, data: Path) -> list[int]:
    from transformers import AutoTokenizer

    from common import render_with_llmbox

    return [len(t) for t in render_with_llmbox(model, data, AutoTokenizer.from_pretrained(str(model)), 1024)]


def token_stats(model: Path, data: Path) -> dict[str, Any]:
    lengths = token_lengths(model, data)
    return {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "min": min(lengths),
        "mean": round(sum(lengths) / len(lengths), 1),
        "max": max(lengths),
    }


# ---- running the contenders --------------------------------------------------------------------------------


def run_contender(name: str, repeat: int, model: Path, train: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """One contender's run in its own process; a run already finished in `--workdir` is reused, not repeated."""
    folder = workdir / f"{name}-{repeat}"
    if (folder / "run.json").is_file():
        run: dict[str, Any] = read_json(folder / "run.json")
        print(f"  {name} #{repeat}: {_run_line(run)} (from {folder})", flush=True)
        return run
    spec = {**settings_for(args.device), "contender": name, "model": str(model), "train_data": str(train)}
    spec |= {"output": str(folder), "skip_steps": args.skip_steps, "device": args.device}
    spec_path = write_json(folder / "spec.json", spec)
    before = matmul_gflops(device=args.device)
    child: ChildRun = run_child(["benchmarks/contenders.py", str(spec_path)], folder / "log.txt", args.timeout)
    after = matmul_gflops(device=args.device)
    # a contender multiplying in bf16 on CPU (llmbox's bf16-mixed) is judged against the bf16 rate
    bf16_cpu = args.device == "cpu" and _precision_of(folder) == "bf16-mixed"
    run = {
        "contender": name,
        "repeat": repeat,
        "returncode": child.returncode,
        "wall_s": round(child.wall_s, 1),
        "peak_rss_mb": round(child.peak_rss_mb, 1),
        "cpu_s": round(child.cpu_s, 1),
        "sys_s": round(child.sys_s, 1),
        "other_cpu_load": round(child.other_cpu_load, 3),
        "matmul_gflops": round((before + after) / 2, 1),
        **({"matmul_gflops_fp32": round((before + after) / 2, 1)} if bf16_cpu else {}),
        "log": str(folder / "log.txt"),
    }
    if bf16_cpu:
        run["matmul_gflops"] = round(matmul_gflops(bf16=True), 1)
    result_path = folder / "result.json"
    if child.returncode == 0 and result_path.is_file():
        run |= read_json(result_path)
        write_json(folder / "run.json", run)
    else:
        run["error"] = (folder / "log.txt").read_text()[-2000:]
    print(f"  {name} #{repeat}: {_run_line(run)}", flush=True)
    return run


def _precision_of(folder: Path) -> str | None:
    result = folder / "result.json"
    return read_json(result).get("precision") if result.is_file() else None


def _run_line(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"FAILED (exit {run['returncode']}), see {run['log']}"
    gpu = f", peak GPU {run['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in run else ""
    return (
        f"{run['tokens_per_s']:.1f} tok/s over steps {run['skipped_steps'] + 1}-{run['steps']}, "
        f"peak RSS {run['peak_rss_mb']:.0f} MB{gpu}, matmul {run['matmul_gflops']:.0f} GFLOP/s, {run['wall_s']:.0f}s"
    )


def settings_for(device: str) -> dict[str, Any]:
    return SETTINGS | ({"precision": "bf16"} if device == "cuda" else {})


def run_all(names: list[str], model: Path, train: Path, workdir: Path, args: argparse.Namespace) -> list[dict]:
    runs = []
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        print(f"repeat {repeat + 1}/{args.repeats}: {', '.join(order)}", flush=True)
        runs += [run_contender(name, repeat, model, train, workdir, args) for name in order]
    return runs


def heldout_losses(model: Path, heldout: Path, runs: list[dict], workdir: Path, device: str) -> dict[str, float]:
    """The shared held-out loss of the base model and of each contender's first successful adapter."""
    adapters: dict[str, str | None] = {"base_model": None}
    for run in runs:
        if "adapter" in run and run["contender"] not in adapters:
            adapters[run["contender"]] = run["adapter"]
    spec = {"model": str(model), "heldout_data": str(heldout), "adapters": adapters, "device": device}
    spec["output"] = str(workdir / "heldout_result.json")
    spec_path = write_json(workdir / "heldout_spec.json", spec)
    child = run_child(["benchmarks/heldout.py", str(spec_path)], workdir / "heldout_log.txt")
    if child.returncode != 0:
        raise SystemExit(f"held-out evaluation failed: see {workdir / 'heldout_log.txt'}")
    return dict(read_json(Path(spec["output"]))["losses"])


# ---- summary -----------------------------------------------------------------------------------------------


def summarise(name: str, runs: list[dict], losses: dict[str, float]) -> dict[str, Any]:
    description = (CONTENDERS | EXTRA_CONTENDERS)[name]
    ok = [r for r in runs if r["contender"] == name and "error" not in r]
    if not ok:
        return {"description": description, "failed": True}
    tps = statistics.median(r["tokens_per_s"] for r in ok)
    gflops = statistics.median(r["matmul_gflops"] for r in ok)
    mfu = statistics.median(r["tokens_per_s"] * FLOPS_PER_TOKEN / (r["matmul_gflops"] * 1e9) for r in ok)
    gpu = [r["peak_gpu_mb"] for r in ok if "peak_gpu_mb" in r]
    speeds = [r["tokens_per_s"] for r in ok]
    return {
        "description": description,
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_spread": [round(min(speeds), 1), round(max(speeds), 1)],
        "tokens_per_s_all_steps": round(statistics.median(r["tokens_per_s_all_steps"] for r in ok), 1),
        "tokens_per_cpu_s": round(statistics.median(r["tokens_per_cpu_s"] for r in ok), 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ok), 1),
        **({"peak_gpu_mb": round(max(gpu), 1)} if gpu else {}),
        "mfu": round(mfu, 4),
        "matmul_gflops": round(gflops, 1),
        "heldout_loss": round(losses[name], 4) if name in losses else None,
        "runs": len(ok),
        **({"precision": ok[0]["precision"]} if "precision" in ok[0] else {}),
    }


def _is_llmbox(name: str) -> bool:
    """llmbox and its variants: the contenders the others are measured against, never one of the others."""
    return name.startswith("llmbox")


def ratios(table: dict[str, dict[str, Any]], key: str = "tokens_per_s") -> dict[str, float | None]:
    """llmbox's tokens/s (`key`) divided by each other contender's."""
    mine = table.get("llmbox", {}).get(key)
    others = {k: v[key] for k, v in table.items() if not _is_llmbox(k) and not v.get("failed")}

    def ratio(other: float | None) -> float | None:
        return round(mine / other, 2) if mine and other else None

    return {
        "vs_trl_default": ratio(others.get("trl_default")),
        "vs_trl_best": ratio(others.get("trl_padding_free")),
        "vs_pad_to_max": ratio(others.get("hf_pad_to_max")),
        "vs_group_by_length": ratio(others.get("hf_group_by_length")),
        "vs_fastest_other": ratio(max(others.values(), default=None)),
    }


def memory_key(table: dict[str, dict[str, Any]]) -> str:
    """The memory that limits the run: the GPU's where the contenders report it, else the process's RSS."""
    return "peak_gpu_mb" if any("peak_gpu_mb" in v for v in table.values()) else "peak_rss_mb"


def at_benchmark_precision(table: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    """llmbox's row at the precision every contender shares: `llmbox` itself, or `llmbox_fp32` where the plan
    picked bf16-mixed on a CPU with native bf16 (the MFU goal is set against that precision's matmul rate)."""
    me = table.get("llmbox", {})
    if me.get("precision", precision) == precision:
        return me
    return table.get("llmbox_fp32", {})


def targets(table: dict[str, dict[str, Any]], ratio: dict[str, float | None], precision: str) -> dict[str, Any]:
    """The issue's goals for llmbox, each with the measured value and whether it is met."""
    me = table.get("llmbox", {})
    like_for_like = at_benchmark_precision(table, precision)
    others = [v for k, v in table.items() if not _is_llmbox(k) and not v.get("failed")]
    best_loss = min((v["heldout_loss"] for v in others if v.get("heldout_loss") is not None), default=None)
    loss_gap = (me["heldout_loss"] - best_loss) / best_loss if best_loss and me.get("heldout_loss") else None
    memory = memory_key(table)
    trl_memory = table.get("trl_default", {}).get(memory)

    def goal(value: float | None, ok: bool | None) -> dict[str, Any]:
        return {"value": value, "met": ok}

    return {
        ">=1.25x fastest other": goal(ratio["vs_fastest_other"], _at_least(ratio["vs_fastest_other"], 1.25)),
        ">=4x TRL default": goal(ratio["vs_trl_default"], _at_least(ratio["vs_trl_default"], 4.0)),
        "peak memory <= TRL default": goal(
            me.get(memory), None if not trl_memory or not me.get(memory) else me[memory] <= trl_memory
        ),
        "held-out loss within 1% of the best other": goal(
            None if loss_gap is None else round(loss_gap, 4), None if loss_gap is None else loss_gap <= 0.01
        ),
        f">=40% of the matmul ceiling (MFU, {precision})": goal(
            like_for_like.get("mfu"), _at_least(like_for_like.get("mfu"), 0.40)
        ),
    }


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


# ---- reporting ---------------------------------------------------------------------------------------------


def plot(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in table.items() if not v.get("failed")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = ["tab:green" if n == "llmbox" else "yellowgreen" if _is_llmbox(n) else "tab:gray" for n in names]
    left.barh(names, [table[n]["tokens_per_s"] for n in names], color=colours)
    left.set_xlabel("real (non-padding) tokens / s  (higher is better)")
    memory = memory_key(table)
    right.barh(names, [table[n][memory] / 1024 for n in names], color=colours)
    right.set_xlabel(f"peak {'GPU memory' if memory == 'peak_gpu_mb' else 'RSS'}, GiB  (lower is better)")
    for axis in (left, right):
        axis.invert_yaxis()
        axis.grid(axis="x", alpha=0.3)
    right.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _precisions(report: dict[str, Any]) -> str:
    """The run's precision, or llmbox's beside the others' where they differ."""
    others = report["settings"]["precision"]
    mine = report["contenders"].get("llmbox", {}).get("precision", others)
    return others if mine == others else f"llmbox {mine}, others {others}"


def _bf16_rate(report: dict[str, Any]) -> str:
    rates = [r["matmul_gflops"] for r in report["runs"] if "matmul_gflops_fp32" in r]
    return f"(bf16: {statistics.median(rates):.0f}, the MFU base of bf16-mixed rows) " if rates else ""


def _spread(summary: dict[str, Any]) -> str:
    low, high = summary.get("tokens_per_s_spread", (None, None))
    return f" ({low}-{high})" if summary.get("runs", 1) > 1 and low is not None else ""


def readme_table(report: dict[str, Any]) -> str:
    s, table = report["settings"], report["contenders"]
    memory = memory_key(table)
    rows = []
    for name, v in table.items():
        if v.get("failed"):
            rows.append([f"`{name}`", "failed", "", "", "", "", "", ""])
            continue
        speed = table["llmbox"]["tokens_per_s"] / v["tokens_per_s"] if not table["llmbox"].get("failed") else None
        rows.append(
            [
                f"`{name}`",
                v.get("precision", s["precision"]),
                f"{v['tokens_per_s']:.1f}" + _spread(v),
                "" if speed is None else f"{speed:.2f}x",
                f"{v['tokens_per_s_all_steps']:.1f}",
                f"{v[memory] / 1024:.1f}",
                f"{100 * v['mfu']:.1f}%",
                "" if v["heldout_loss"] is None else f"{v['heldout_loss']:.4f}",
            ]
        )
    memory_title = "peak GPU GiB" if memory == "peak_gpu_mb" else "peak RSS GiB"
    header = ["contender", "precision", "tokens/s", "llmbox is", "whole epoch tokens/s", memory_title, "MFU"]
    header.append("held-out loss")
    data = report["data"]
    goals = "; ".join(f"{k}: {v['value']} ({'met' if v['met'] else 'not met'})" for k, v in report["targets"].items())
    return "\n".join(
        [
            f"Last run: {report['date']}, {report['machine']['gpu'] or report['machine']['cpu']} "
            f"({report['machine']['logical_cpus']} CPUs), "
            f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
            f"trl {report['versions']['trl']}, peft {report['versions']['peft']}.",
            f"{data['train']['examples']} training examples ({data['train']['tokens']} tokens, "
            f"{data['train']['min']}-{data['train']['max']}), {s['batch_size']} per step, "
            f"{report['steps']} steps, first {report['skip_steps']} left out of tokens/s; "
            f"held-out loss over {data['heldout']['examples']} conversations "
            f"(base model: {report['heldout_base_loss']:.4f}); matmul rate {report['matmul_gflops']:.0f} GFLOP/s "
            f"{_bf16_rate(report)}"
            f"(ceiling {report['ceiling_tokens_per_s']:.0f} tokens/s).",
            "",
            markdown_table(header, rows),
            "",
            f"Goals for llmbox: {goals}.{_bf16_mixed_note(report)}",
        ]
    )


def _bf16_mixed_note(report: dict[str, Any]) -> str:
    """Where llmbox trained in bf16-mixed: its speed against both ceilings (the MFU goal is the fp32 row's)."""
    me = report["contenders"].get("llmbox", {})
    if me.get("failed") or me.get("precision", report["settings"]["precision"]) == report["settings"]["precision"]:
        return ""
    return (
        f" llmbox in bf16-mixed: {100 * me['mfu']:.1f}% of the bf16 matmul rate ({me['matmul_gflops']:.0f} GFLOP/s),"
        f" {100 * me['tokens_per_s'] / report['ceiling_tokens_per_s']:.0f}% of the fp32 ceiling."
    )


def main() -> None:
    args = parse_args()
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    known = CONTENDERS | EXTRA_CONTENDERS
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    model = smollm2_dir()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmbox-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        train, heldout = write_data(workdir, model, args.train_examples, args.heldout_examples)
        data = {"train": token_stats(model, train), "heldout": token_stats(model, heldout)}
        print(f"data: {data}", flush=True)
        runs = run_all(names, model, train, workdir, args)
        losses = heldout_losses(model, heldout, runs, workdir, args.device)
    table = {name: summarise(name, runs, losses) for name in names}
    gflops = statistics.median(r.get("matmul_gflops_fp32", r["matmul_gflops"]) for r in runs)
    ratio = ratios(table)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": settings_for(args.device),
        "data": data,
        "steps": -(-args.train_examples // SETTINGS["batch_size"]),
        "skip_steps": args.skip_steps,
        "repeats": args.repeats,
        "flops_per_token": FLOPS_PER_TOKEN,
        "mfu_formula": "tokens/s x 4 x 134.5M x 1.05 / measured matmul FLOP/s "
        + ("(bf16 8192x8192 on the GPU)" if args.device == "cuda" else "(fp32 2048x2048 torch.matmul)")
        + "; a contender that multiplies in bf16 on CPU (llmbox's bf16-mixed) against the bf16 rate",
        "matmul_gflops": gflops,
        "ceiling_tokens_per_s": round(gflops * 1e9 / FLOPS_PER_TOKEN, 1),
        "heldout_base_loss": round(losses["base_model"], 4),
        "contenders": table,
        "ratios": ratio,
        # the same over every step of the epoch, warm-up included: with few steps, every contender's figure then
        # covers the same examples (the timed steps alone hold different examples for each sampler)
        "ratios_whole_epoch": ratios(table, "tokens_per_s_all_steps"),
        "targets": targets(table, ratio, settings_for(args.device)["precision"]),
        "runs": runs,
        "bench_wall_s": round(time.monotonic() - started, 1),
    }
    on_gpu = args.device == "cuda"
    output = args.output or RESULTS / ("train_gpu.json" if on_gpu else "train.json")
    write_json(output, report)
    where = report["machine"]["gpu"] if on_gpu else report["machine"]["cpu"]
    plot(table, output.with_suffix(".png"), f"LoRA r8 on SmolLM2-135M, {_precisions(report)}, {where}")
    if not args.no_readme:
        publish_table("train-gpu-results" if on_gpu else "train-results", readme_table(report))
    print(f"ratios: {ratio}\nwrote {output} and {output.with_suffix('.png')}", flush=True)


if __name__ == "__main__":
    main()
