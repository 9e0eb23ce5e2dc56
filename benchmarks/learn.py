"""Time to learn a small dataset: `llmbox train --circular` (defaults) against a plain peft loop, `make bench-learn`.

    python benchmarks/learn.py [--facts benchmarks/data/learn_facts.json] [--repeats 1]

A dozen invented facts SmolLM2-135M-Instruct cannot know (benchmarks/data/learn_facts.json, not the demo's set).
Each contender is one whole command, timed from the outside (start-up, loading, training and saving included):
the plain loop (plain_loop.py: LoRA r8 on every projection, batch 1, AdamW at 2e-4, 10 epochs) and
`llmbox train MODEL --circular --runtime local` with nothing else chosen. Recall is checked afterwards, outside
the clock, by plain transformers + peft: greedy answers, a fact counts when its whole reference sentence is in
the answer. Writes results/learn.json and the README table; the ratio is plain-loop seconds / llmbox seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, markdown_table, report_header, run_child, save_report, smollm2_dir

FACTS = Path(__file__).parent / "data" / "learn_facts.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=Path, default=FACTS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--llmbox-args", default="", help="extra `llmbox train` flags, to try a setting")
    return parser.parse_args()


def recall(model: Path, adapter: Path, facts: list[dict[str, str]]) -> tuple[int, list[str]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter)
    tuned.eval()
    answers = []
    for fact in facts:
        chat = [{"role": "user", "content": fact["question"]}]
        encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = tuned.generate(**encoded, max_new_tokens=40, do_sample=False)
        answers.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    right = sum(f["answer"] in a for f, a in zip(facts, answers, strict=True))
    return right, answers


def run(name: str, args: list[str], folder: Path, adapter: Path, model: Path, facts: list[dict[str, str]]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = run_child(args, folder / "log.txt")
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"contender": name, "returncode": child.returncode, "wall_s": round(wall, 1),
                              "peak_rss_mb": round(child.peak_rss_mb), "command": args}  # fmt: skip
    if child.returncode != 0:
        result["error"] = (folder / "log.txt").read_text()[-2000:]
        return result
    right, answers = recall(model, adapter, facts)
    result |= {"recall": right, "of": len(facts), "answers": answers}
    if name == "llmbox":
        info = json.loads((adapter / "adapter_info.json").read_text())
        result |= {"steps": info["steps"], "epochs": info["epochs"], "stop_reason": info["stop_reason"],
                   "train_seconds": info["train_seconds"]}  # fmt: skip
    print(f"  {name}: {result['wall_s']} s, recall {right}/{len(facts)}", flush=True)
    return result


def main() -> None:
    args = parse_args()
    model = smollm2_dir()
    facts = json.loads(args.facts.read_text())
    llmbox = str(Path(sys.executable).parent / "llmbox")
    runs = []
    with tempfile.TemporaryDirectory(prefix="llmbox-bench-learn-") as scratch:
        workdir = args.workdir or Path(scratch)
        for repeat in range(args.repeats):
            plain_out, llmbox_out = workdir / f"plain-{repeat}", workdir / f"llmbox-{repeat}"
            contenders = [
                ("plain_loop", [str(Path(__file__).parent / "plain_loop.py"), str(model), str(args.facts),
                                str(plain_out / "adapter")], plain_out / "adapter"),
                ("llmbox", [llmbox, "train", str(model), "--runtime", "local", "--data", str(args.facts), "--output",
                            str(llmbox_out), "--circular", "--no-tensorboard", "--skip-test",
                            *args.llmbox_args.split()], llmbox_out / "lora"),
            ]  # fmt: skip
            if repeat % 2:
                contenders.reverse()
            for name, command, adapter in contenders:
                # run_child runs a script with this interpreter; the llmbox entry point is a script too
                folder = workdir / f"{name}-{repeat}"
                runs.append(run(name, command, folder, adapter, model, facts) | {"repeat": repeat})
    by_name = {n: [r for r in runs if r["contender"] == n and r["returncode"] == 0] for n in ("plain_loop", "llmbox")}
    wall = {n: sorted(r["wall_s"] for r in rs)[len(rs) // 2] if rs else None for n, rs in by_name.items()}
    ratio = round(wall["plain_loop"] / wall["llmbox"], 2) if wall["plain_loop"] and wall["llmbox"] else None
    report = report_header() | {"benchmark": "learn", "facts": str(args.facts), "wall_s": wall,
                                "ratio_plain_over_llmbox": ratio, "runs": runs}  # fmt: skip
    recalls = {n: ", ".join(f"{r['recall']}/{r['of']}" for r in rs) or "-" for n, rs in by_name.items()}
    rows = [[n, f"{wall[n]} s" if wall[n] else "failed", recalls[n]] for n in ("plain_loop", "llmbox")]
    table = markdown_table(["contender", "median whole-command wall time", "recall"], rows)
    table += f"\n\nplain loop / llmbox: {ratio}x" if ratio else ""
    save_report(report, args.output or RESULTS / "learn.json", table, "learn", readme=not args.no_readme)


if __name__ == "__main__":
    main()
