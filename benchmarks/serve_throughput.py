"""Serving throughput: `llmbox serve` on its own engine and on vLLM, against plain transformers `generate`, at 1, 8
and 32 concurrent clients.

    python benchmarks/serve_throughput.py [MODEL_DIR] [--max-tokens 64] [--clients 1,8,32] [--engines llmbox,vllm]

MODEL_DIR defaults to the test suite's SmolLM2-135M-Instruct. Each server runs as a subprocess (`python -m
llmbox_engine serve --engine E --no-lora --dtype float32`; vLLM from $LLMBOX_VLLM_PYTHON, default .venv-vllm),
driven by the openai client with streaming on, so time to first token is what a client sees: at 1 client,
SOLO_REQUESTS requests one after another, at N clients one request each, all at once. The baseline is what a server
without batching would do with the same requests: `generate` one request after another (a request waits for those
before it), and, for reference, one static batch of 8 through `generate`. Everything is greedy, fp32 and capped at
--max-tokens; tokens are counted as generated (an answer that ends its turn early counts its real length). Results
go to benchmarks/results/serve.json, with the load average around the run: other work on the machine skews every
number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    machine_info,
    markdown_table,
    publish_table,
    smollm2_dir,
    versions,
    write_json,
)

SOLO_REQUESTS = 4
PROMPTS = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how photosynthesis works, step by step.",
    "Describe a walk through a busy market in Marrakesh.",
    "What are the main causes of the French Revolution?",
    "Write a letter to a friend about your summer holidays.",
    "Explain the difference between a list and a tuple in Python.",
    "Describe the water cycle to a ten-year-old.",
    "Give advice to someone starting to learn the piano.",
]


def summarize(records: list[dict[str, float]], wall: float) -> dict[str, Any]:
    """records: per request, `ttft` (seconds from the client's start to its first token) and `tokens`."""
    tokens = sum(int(r["tokens"]) for r in records)
    ttfts = [r["ttft"] for r in records]
    return {
        "requests": len(records),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


# ---- llmbox serve ------------------------------------------------------------------------------------------


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL, so no server is left behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, engine: str, dtype: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["serve", "--model-path", str(model), "--no-lora", "--port", str(port), "--engine", engine,
            "--dtype", dtype, "--max-batch-size", "32"]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("LLMBOX_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmbox_engine", *args], stdout=sink, stderr=sink, env=env,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {engine} server exited: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the {engine} server did not become ready: see {log}")


def one_streamed_request(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": (first or time.perf_counter()) - started, "tokens": tokens}


def requests_at(clients: int) -> int:
    return SOLO_REQUESTS if clients == 1 else 1


def bench_server(model: Path, engine: str, dtype: str, counts: list[int], max_tokens: int, log: Path) -> dict[str, Any]:
    from openai import OpenAI

    port = free_port()
    process = start_server(model, engine, dtype, port, log)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        model_id = client.models.list().data[0].id
        one_streamed_request(client, model_id, PROMPTS[0], 8)  # warm-up
        results: dict[str, Any] = {}
        for count in counts:
            records: list[dict[str, float]] = []

            def client_loop(index: int, count: int = count, records: list[dict[str, float]] = records) -> None:
                for r in range(requests_at(count)):
                    prompt = PROMPTS[(index + r * count) % len(PROMPTS)]
                    records.append(one_streamed_request(client, model_id, prompt, max_tokens))

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(count)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[f"{count}_clients"] = summarize(records, time.perf_counter() - started)
            print(f"llmbox serve --engine {engine}, {count} client(s): {results[f'{count}_clients']}", flush=True)
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


# ---- plain transformers ------------------------------------------------------------------------------------


class FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def bench_transformers(model_dir: Path, counts: list[int], batch: int, max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    def generate(prompts: list[str]) -> tuple[float, list[int]]:
        """Seconds to the first token, and each row's tokens up to and with its end of turn."""
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        clock = FirstTokenClock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **encoded, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos,
                streamer=clock,
            )  # fmt: skip
        rows = out[:, encoded["input_ids"].shape[1] :].tolist()
        return (clock.first or time.perf_counter()) - started, [r.index(eos) + 1 if eos in r else len(r) for r in rows]

    generate(PROMPTS[:1])  # warm-up
    results: dict[str, Any] = {}
    for count in counts:
        # `count` clients' requests arrive together and are answered one after another, each after those before it
        records: list[dict[str, float]] = []
        started = time.perf_counter()
        for r in range(requests_at(count)):
            arrived = time.perf_counter()
            for i in range(count):
                waited = time.perf_counter() - arrived
                ttft, tokens = generate([PROMPTS[(i + r * count) % len(PROMPTS)]])
                records.append({"ttft": waited + ttft, "tokens": tokens[0]})
        results[f"{count}_clients_sequential"] = summarize(records, time.perf_counter() - started)
        print(f"transformers generate, {count} client(s), one at a time: {results[f'{count}_clients_sequential']}")
    records = []
    started = time.perf_counter()
    ttft, tokens = generate([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    records += [{"ttft": ttft, "tokens": t} for t in tokens]
    results[f"{batch}_clients_static_batch"] = summarize(records, time.perf_counter() - started)
    print(f"transformers generate, {batch} prompts as one batch: {results[f'{batch}_clients_static_batch']}")
    return results


STATIC_BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, help="An HF model folder (default: the tests' SmolLM2).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,8,32", help="Concurrent clients to measure, comma-separated.")
    parser.add_argument("--engines", default="llmbox,vllm", help="The servers to measure: llmbox, vllm or both.")
    parser.add_argument("--dtype", default="float32", help="The servers' weights (bfloat16 on a GPU).")
    parser.add_argument("--output", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    model = args.model or smollm2_dir()
    counts = sorted({int(c) for c in args.clients.split(",")})
    load_before = os.getloadavg()
    servers = {}
    for engine in args.engines.split(","):
        log = Path(tempfile.gettempdir()) / f"llmbox-serve-throughput-{engine}.log"  # for when it fails
        servers[engine] = bench_server(model, engine, args.dtype, counts, args.max_tokens, log)
    baseline = bench_transformers(model, counts, STATIC_BATCH, args.max_tokens)
    most = counts[-1]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": str(model),
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "clients": counts,
        "solo_requests": SOLO_REQUESTS,
        "servers": servers,
        "transformers_generate": baseline,
        f"throughput_vs_sequential_generate_at_{most}_clients": {
            engine: ratio(figures[f"{most}_clients"], baseline[f"{most}_clients_sequential"])
            for engine, figures in servers.items()
        },
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "machine": machine_info(),
        "versions": versions(),
    }
    write_json(args.output, result)
    publish_table("serve-results", readme_table(result))
    print(f"wrote {args.output}")


def ratio(served: dict[str, Any], baseline: dict[str, Any]) -> float:
    return round(served["tokens_per_s"] / baseline["tokens_per_s"], 2)


NAMES = {"llmbox": "`llmbox serve` (llmbox engine)", "vllm": "`llmbox serve --engine vllm` (vLLM)"}


def readme_table(result: dict[str, Any]) -> str:
    counts, servers, baseline = result["clients"], result["servers"], result["transformers_generate"]
    rows = []
    for count in counts:
        for engine, figures in servers.items():
            rows.append([NAMES.get(engine, engine), str(count), *_cells(figures[f"{count}_clients"])])
        rows.append(["transformers `generate`, one request at a time", str(count),
                     *_cells(baseline[f"{count}_clients_sequential"])])  # fmt: skip
    rows.append(["transformers `generate`, one static batch (reference)", str(STATIC_BATCH),
                 *_cells(baseline[f"{STATIC_BATCH}_clients_static_batch"])])  # fmt: skip
    load = result["load_average_1min"]
    most = counts[-1]
    ratios = result[f"throughput_vs_sequential_generate_at_{most}_clients"]
    return "\n".join([
        f"Last run: {result.get('date', '?')}, {result['machine']['cpu']} ({result['machine']['logical_cpus']} "
        f"CPUs), SmolLM2-135M-Instruct {result.get('dtype', 'float32')} on every server, greedy, "
        f"{result['max_tokens']} tokens per answer, streaming; load average {load['before']} before, "
        f"{load['after']} after.",
        "",
        markdown_table(["server", "clients", "tokens/s", "TTFT mean s", "TTFT max s"], rows),
        "",
        f"At {most} clients, tokens/s against `generate` one request after another: "
        + ", ".join(f"{NAMES.get(e, e)} {r:.2f}x" for e, r in ratios.items()) + ".",
    ])  # fmt: skip


def _cells(figures: dict[str, float]) -> list[str]:
    return [f"{figures['tokens_per_s']:.1f}", f"{figures['ttft_mean_s']:.2f}", f"{figures['ttft_max_s']:.2f}"]


if __name__ == "__main__":
    main()
