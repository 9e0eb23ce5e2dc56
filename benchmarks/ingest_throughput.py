"""Data ingestion throughput: llmbox's loader and Renderer against a plain `datasets.map`.

    python benchmarks/ingest_throughput.py                    # 200k records
    python benchmarks/ingest_throughput.py --records 20000 --profile

The same generated records (half Alpaca, half ShareGPT, one JSON file each) go through
- `llmbox`: `load_examples` (find the files, detect each record's format, validate, de-duplicate) and
  `Renderer.tokenize` (chat template, token ids and assistant-only loss masks);
- `datasets_map`: `load_dataset("json")` per file, then one batched `map` that turns each record into
  messages and calls the same tokenizer's `apply_chat_template` and the tokenizer (ids only, no masks).
Each runs in its own process (peak RSS is its own); examples/s counts from the first read to the last token
id, after the tokenizer is loaded. `--profile` also writes the top of a cProfile of each side.

Writes results/ingest.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    machine_info,
    markdown_table,
    peak_rss_mb,
    publish_table,
    read_json,
    run_child,
    smollm2_dir,
    versions,
    write_json,
)
from synthetic import ingest_records

RECORDS = 200_000
SEED = 7
MAX_SEQ_LENGTH = 2048
SIDES = {
    "llmbox": "load_examples + Renderer.tokenize (format detection, validation, de-duplication, loss masks)",
    "datasets_map": "load_dataset('json') + batched map: apply_chat_template + tokenizer (ids only)",
}


# ---- the two sides (run in a worker process) ---------------------------------------------------------------


def run_llmbox(data: Path, model: Path, tokenizer: Any) -> int:
    from common import render_with_llmbox

    return len(render_with_llmbox(model, data, tokenizer, MAX_SEQ_LENGTH))


def alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    extra = record.get("input")
    prompt = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def sharegpt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]


def run_datasets_map(data: Path, model: Path, tokenizer: Any) -> int:
    from datasets import load_dataset

    def tokenize(batch: dict[str, list[Any]], to_messages: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        texts = tokenizer.apply_chat_template([to_messages(r) for r in records], tokenize=False)
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    total, cache = 0, data.parent / f"hf-cache-{time.time_ns()}"
    for name, to_messages in (("alpaca", alpaca_messages), ("sharegpt", sharegpt_messages)):
        # a fresh cache folder: nothing is reused from an earlier run
        dataset = load_dataset("json", data_files=str(data / f"{name}.json"), split="train", cache_dir=str(cache))
        mapped = dataset.map(
            tokenize, batched=True, fn_kwargs={"to_messages": to_messages}, remove_columns=dataset.column_names
        )
        total += len(mapped)
    return total


RUNNERS: dict[str, Callable[[Path, Path, Any], int]] = {"llmbox": run_llmbox, "datasets_map": run_datasets_map}


def worker(side: str, data: Path, model: Path, output: Path, profile: bool) -> None:
    """One side, timed after its imports and the tokenizer load (the same for both)."""
    import datasets  # noqa: F401 (imported before the clock, like llmbox's modules)
    from transformers import AutoTokenizer

    import llmbox_engine.data.ingest
    import llmbox_engine.data.render  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    examples = RUNNERS[side](data, model, tokenizer)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    result = {"side": side, "examples": examples, "seconds": round(seconds, 2), "examples_per_s": examples / seconds}
    result["worker_peak_rss_mb"] = round(peak_rss_mb(), 1)
    if profiler:
        result["profile_top"] = profile_top(profiler)
    write_json(output, result)


def profile_top(profiler: cProfile.Profile, limit: int = 25) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return text.getvalue()


# ---- the parent --------------------------------------------------------------------------------------------


def write_records(folder: Path, n: int) -> Path:
    alpaca, sharegpt = ingest_records(n, SEED)
    write_json(folder / "alpaca.json", alpaca)
    write_json(folder / "sharegpt.json", sharegpt)
    return folder


def run_side(side: str, data: Path, model: Path, workdir: Path, profile: bool) -> dict[str, Any]:
    output = workdir / f"{side}.json"
    args = ["benchmarks/ingest_throughput.py", "--worker", side, "--data", str(data), "--model", str(model)]
    args += ["--worker-output", str(output)] + (["--profile"] if profile else [])
    child = run_child(args, workdir / f"{side}.log")
    if child.returncode != 0:
        raise SystemExit(f"{side} failed:\n{(workdir / f'{side}.log').read_text()[-3000:]}")
    result = read_json(output) | {"peak_rss_mb": round(child.peak_rss_mb, 1), "wall_s": round(child.wall_s, 1)}
    # the machine is shared: the child's own CPU time and everyone else's load say how noisy the number is
    result["cpu_s"] = round(child.cpu_s, 1)
    result["other_cpu_load"] = round(child.other_cpu_load, 3)
    print(f"  {side}: {result['examples_per_s']:.0f} examples/s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return dict(result)


def readme_table(report: dict[str, Any]) -> str:
    sides = report["sides"]
    rows = [
        [
            f"`{name}`",
            f"{v['examples_per_s']:.0f}",
            f"{v['seconds']:.1f}",
            f"{v['peak_rss_mb']:.0f}",
            SIDES[name],
        ]
        for name, v in sides.items()
    ]
    header = ["side", "examples/s", "seconds", "peak RSS MB", "what it does"]
    ratio = report["ratio_llmbox_vs_datasets_map"]
    return "\n".join(
        [
            f"Last run: {report['date']}, {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs), "
            f"{report['records']} records (half Alpaca, half ShareGPT), SmolLM2's tokenizer and chat template, "
            f"datasets {report['versions']['datasets']}, transformers {report['versions']['transformers']}.",
            "",
            markdown_table(header, rows),
            "",
            f"llmbox / datasets.map: {ratio:.2f}x (goal: >= 2x). CPU seconds of each worker (imports included): "
            + ", ".join(f"`{name}` {v.get('cpu_s', float('nan')):.0f}" for name, v in sides.items())
            + "; other load on the machine meanwhile (share of all CPUs): "
            + ", ".join(f"`{name}` {v.get('other_cpu_load', float('nan')):.2f}" for name, v in sides.items())
            + ".",
        ]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--profile", action="store_true", help="cProfile each side; the top goes in the JSON")
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest.json")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.data, args.model, args.worker_output, args.profile)
        return
    model = smollm2_dir()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmbox-ingest-") as tmp:
        workdir = Path(tmp)
        data = write_records(workdir / "data", args.records)
        print(f"{args.records} records in {data}", flush=True)
        sides = {side: run_side(side, data, model, workdir, args.profile) for side in SIDES}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": versions(),
        "records": args.records,
        "sides": sides,
        "ratio_llmbox_vs_datasets_map": round(
            sides["llmbox"]["examples_per_s"] / sides["datasets_map"]["examples_per_s"], 3
        ),
        "bench_wall_s": round(time.monotonic() - started, 1),
    }
    write_json(args.output, report)
    if not args.no_readme:
        publish_table("ingest-results", readme_table(report))
    print(f"llmbox / datasets.map = {report['ratio_llmbox_vs_datasets_map']:.2f}x; wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
