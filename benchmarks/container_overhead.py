"""Container overhead: the same short training job through `llmbox train --runtime docker` and `--runtime local`.

    python benchmarks/container_overhead.py [--steps 4] [--repeats 2] [--image llmbox/engine:cpu]

The job: SmolLM2-135M-Instruct (installed into a scratch LLMBOX_HOME), examples/alpaca.json, `--max-steps`
optimizer steps, no TensorBoard, no sample answers. Runs alternate between the runtimes; the headline is the
median wall time of each and their ratio, and the fixed start cost (docker minus local, which the job's length
does not change). Alongside: a bare `docker run --rm IMAGE true`, the floor of any container start. The image
must exist (`llmbox build --cpu`, or the tests' build); it is not built here, so build time never counts.
Writes results/container.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    alternating,
    markdown_table,
    report_header,
    run_child,
    save_report,
    smollm2_dir,
)

RUNTIMES = ("local", "docker")
LLMBOX = ["-c", "from llmbox.main import main; main()"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image", default="llmbox/engine:cpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "container.json")
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args()


def bare_container_start(image: str, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(["docker", "run", "--rm", "--network", "host", image, "true"], check=True)
        walls.append(time.monotonic() - started)
    return statistics.median(walls)


def train_once(runtime: str, home: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / f"{runtime}-{time.monotonic_ns()}"
    command = [*LLMBOX, "train", "smollm2", "--runtime", runtime, "--data", str(REPO / "examples" / "alpaca.json"),
               "--output", str(out), "--max-steps", str(args.steps), "--no-tensorboard", "--skip-test"]  # fmt: skip
    if runtime == "docker":
        command += ["--image", args.image]
    os.environ["LLMBOX_HOME"] = str(home)  # the child inherits it
    child = run_child(command, out.with_suffix(".log"))
    if child.returncode != 0:
        raise SystemExit(f"{runtime} run failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    adapter = out / "lora" / "adapter_model.safetensors"
    assert adapter.is_file(), f"{runtime}: no adapter in {out}"
    return {"runtime": runtime, "wall_s": round(child.wall_s, 2), "other_cpu_load": round(child.other_cpu_load, 3)}


def summary(runs: list[dict[str, Any]], bare_start_s: float) -> dict[str, Any]:
    median = {r: statistics.median(x["wall_s"] for x in runs if x["runtime"] == r) for r in RUNTIMES}
    spread = {r: [x["wall_s"] for x in runs if x["runtime"] == r] for r in RUNTIMES}
    return {
        "median_wall_s": {r: round(v, 2) for r, v in median.items()},
        "walls_s": spread,
        "docker_over_local": round(median["docker"] / median["local"], 3),
        "fixed_start_cost_s": round(median["docker"] - median["local"], 2),
        "bare_container_start_s": round(bare_start_s, 2),
    }


def readme_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    rows = [[f"`--runtime {r}`", f"{s['median_wall_s'][r]:.1f}", ", ".join(f"{w:.1f}" for w in s["walls_s"][r])]
            for r in RUNTIMES]  # fmt: skip
    return "\n".join([
        f"Last run: {report['date']}, {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs), "
        f"{report['steps']} optimizer steps of SmolLM2-135M-Instruct on examples/alpaca.json, {report['repeats']} runs "
        "each, alternating.",
        "",
        markdown_table(["runtime", "median wall s", "runs"], rows),
        "",
        f"Docker / local: {s['docker_over_local']:.2f}x; fixed start cost {s['fixed_start_cost_s']:.1f} s "
        f"(a bare `docker run --rm IMAGE true`: {s['bare_container_start_s']:.1f} s).",
    ])  # fmt: skip


def main() -> None:
    args = parse_args()
    if subprocess.run(["docker", "image", "inspect", args.image], capture_output=True).returncode != 0:
        raise SystemExit(f"{args.image} is not built: `llmbox build --cpu` first")
    with tempfile.TemporaryDirectory(prefix="llmbox-container-bench-") as scratch:
        home, work = Path(scratch) / "home", Path(scratch) / "runs"
        models = home / "models" / "smollm2"
        shutil.copytree(smollm2_dir(), models / "model")
        bare = bare_container_start(args.image, 3)
        runs = alternating(RUNTIMES, args.repeats, lambda runtime: train_once(runtime, home, work, args), "wall_s")
    report = report_header() | {
        "image": args.image,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary(runs, bare),
    }
    save_report(report, args.output, readme_table(report), "container-results", readme=not args.no_readme)


if __name__ == "__main__":
    main()
