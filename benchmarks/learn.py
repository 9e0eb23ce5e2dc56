"""Time to learn a small dataset: `llmbox train --circular` (defaults) against a plain peft loop, `make bench-learn`.

    python benchmarks/learn.py                       # the dozen facts of benchmarks/data/learn_facts.json
    python benchmarks/learn.py --sizes 12,100,500    # also 100 and 500 generated facts (long: hours on 2 cores)

Facts SmolLM2-135M-Instruct cannot know: a dozen written ones (data/learn_facts.json, not the demo's set) and,
for larger sizes, invented organisations from synthetic.invented_facts. Each contender is one whole command,
timed from the outside (start-up, loading, training and saving included): `llmbox train MODEL --circular
--runtime local` with nothing else chosen, and the plain loop (plain_loop.py: LoRA r8 on every projection, batch
1, AdamW at 2e-4). For the dozen the plain loop runs its 10 epochs; for the larger sizes it saves an adapter
after every epoch and waits while this script checks it, stopping at the first epoch whose adapter recalls as
many facts as llmbox's (up to --max-plain-epochs; the epochs are reported); its time is that of a command
stopped there, the waits left out. Recall is checked outside the clock by plain transformers + peft: greedy
answers, a fact counts when its whole reference sentence is in the answer. Writes results/learn.json and the
README table; the ratio is plain-loop seconds / llmbox seconds. Sizes not run keep their rows from the last
results/learn.json (each row says when and where it was measured); with --workdir, a contender whose
result.json is there from an earlier, interrupted run is not run again.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    markdown_table,
    read_json,
    report_header,
    run_child,
    save_report,
    smollm2_dir,
    write_json,
)
from synthetic import invented_facts

FACTS = Path(__file__).parent / "data" / "learn_facts.json"
PLAIN_LOOP = Path(__file__).parent / "plain_loop.py"
PLAIN_EPOCHS = 10  # the dozen: the loop as the issue describes it
EPOCH_LINE = re.compile(r"^epoch (\d+): loss \S+ at ([\d.]+) s$", re.MULTILINE)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=Path, default=FACTS, help="the dozen (size 12)")
    parser.add_argument("--sizes", default="12", help="comma-separated fact counts; 12 is the --facts file")
    parser.add_argument("--max-plain-epochs", type=int, default=20, help="the plain loop's limit above 12 facts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; finished contenders there are reused")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--llmbox-args", default="", help="extra `llmbox train` flags, to try a setting")
    return parser.parse_args()


def recall(
    model: Path, adapter: Path, facts: list[dict[str, str]], goal: int | None = None, batch: int = 16
) -> tuple[int, list[str]]:
    """Facts recalled and the answers; with a `goal`, it gives up (fewer answers) once the goal is out of reach."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter)
    tuned.eval()
    answers: list[str] = []
    right = 0
    for start in range(0, len(facts), batch):
        here = facts[start : start + batch]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f["question"]}],
                                                 add_generation_prompt=True, tokenize=False) for f in here]  # fmt: skip
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = tuned.generate(**encoded, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        width = encoded["input_ids"].shape[1]
        answered = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        answers += answered
        right += sum(f["answer"] in a for f, a in zip(here, answered, strict=True))
        if goal is not None and len(answers) - right > len(facts) - goal:
            break
    return right, answers


def timed(args: list[str], folder: Path) -> tuple[int, float, str]:
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = run_child(args, folder / "log.txt")
    return child.returncode, time.perf_counter() - started, (folder / "log.txt").read_text()


def run_llmbox(model: Path, facts_file: Path, facts: list[dict[str, str]], folder: Path, extra: str) -> dict:
    llmbox = str(Path(sys.executable).parent / "llmbox")  # a Python script: run_child runs it with this python
    command = [llmbox, "train", str(model), "--runtime", "local", "--data", str(facts_file), "--output",
               str(folder / "run"), "--circular", "--no-tensorboard", "--skip-test", *extra.split()]  # fmt: skip
    code, wall, log = timed(command, folder)
    result: dict[str, Any] = {"contender": "llmbox", "returncode": code, "wall_s": round(wall, 1)}
    if code != 0:
        return result | {"error": log[-2000:]}
    adapter = folder / "run" / "lora"
    right, answers = recall(model, adapter, facts)
    info = read_json(adapter / "adapter_info.json")
    return result | {"recall": right, "of": len(facts), "answers": answers, "steps": info["steps"],
                     "epochs": info["epochs"], "stop_reason": info["stop_reason"]}  # fmt: skip


def run_plain(
    model: Path, facts_file: Path, facts: list[dict[str, str]], folder: Path, epochs: int, goal: int | None
) -> dict:
    """The plain loop; with `goal` (a recall to reach), stopped at the first epoch whose adapter reaches it."""
    if goal is not None:
        return run_plain_to_goal(model, facts_file, facts, folder, epochs, goal)
    command = [str(PLAIN_LOOP), str(model), str(facts_file), str(folder / "adapter"), "--epochs", str(epochs)]
    code, wall, log = timed(command, folder)
    result: dict[str, Any] = {"contender": "plain_loop", "returncode": code, "wall_s": round(wall, 1)}
    if code != 0:
        return result | {"error": log[-2000:]}
    right, answers = recall(model, folder / "adapter", facts)
    return result | {"recall": right, "of": len(facts), "answers": answers, "epochs": epochs}


def run_plain_to_goal(
    model: Path, facts_file: Path, facts: list[dict[str, str]], folder: Path, epochs: int, goal: int
) -> dict:
    """Check each epoch's adapter while the loop waits (its clock paused) and stop it at the first that recalls
    `goal` facts: the time of a command that ran exactly that many epochs, without training the rest."""
    command = [sys.executable, str(PLAIN_LOOP), str(model), str(facts_file), str(folder / "adapter"),
               "--epochs", str(epochs), "--ask-each-epoch"]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / "log.txt"
    result: dict[str, Any] = {"contender": "plain_loop", "epoch_seconds": {}, "epoch_recall": {}}
    with log_file.open("w") as sink:
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                 cwd=REPO)  # fmt: skip
        assert child.stdin is not None
        while child.poll() is None:
            seen = dict(EPOCH_LINE.findall(log_file.read_text()))
            epoch = len(result["epoch_seconds"]) + 1
            if str(epoch) not in seen:
                time.sleep(1)
                continue
            result["epoch_seconds"][epoch] = float(seen[str(epoch)])
            right, answers = recall(model, folder / "adapter" / f"epoch-{epoch}", facts, goal)
            checked = len(answers)
            result["epoch_recall"][epoch] = right if checked == len(facts) else f"{right} of the first {checked}"
            result |= {"recall": right, "of": len(facts), "answers": answers, "epochs": epoch}
            reached = right >= goal
            child.stdin.write("stop\n" if reached or epoch == epochs else "go\n")
            child.stdin.flush()
            if reached:
                result["wall_s"] = round(result["epoch_seconds"][epoch], 1)
                break
        child.stdin.close()
        result["returncode"] = child.wait()
    if result["returncode"] != 0:
        return result | {"wall_s": None, "error": log_file.read_text()[-2000:]}
    if "wall_s" not in result:  # every epoch ran: the time of the whole loop, a lower bound of the time to the goal
        last = max(result["epoch_seconds"], default=0)
        right, answers = recall(model, folder / "adapter" / f"epoch-{last}", facts)  # all of them, for the table
        result |= {"wall_s": result["epoch_seconds"].get(last), "reached_goal": False, "recall": right,
                   "answers": answers}  # fmt: skip
    return result


def reused_or_run(folder: Path, run: Callable[[], dict]) -> dict:
    """A contender's result.json from an earlier run in this workdir, or a fresh run, saved there."""
    saved = folder / "result.json"
    earlier = read_json(saved) if saved.is_file() else {}
    if earlier.get("returncode") == 0:
        return dict(earlier) | {"reused": True}
    result = run()
    write_json(saved, result)
    return dict(result)


def carried_runs(previous: Path, sizes: list[int]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The earlier report's runs of the sizes not run now, and when and where each of them was measured."""
    if not previous.is_file():
        return [], {}
    report = read_json(previous)
    measured = report.get("measured", {})
    runs = [r for r in report.get("runs", []) if r["size"] not in sizes]
    fallback = f"{report.get('date', '?')}, {report.get('machine', {}).get('cpu', '?')}"
    return runs, {str(r["size"]): measured.get(str(r["size"]), fallback) for r in runs}


def summarise(
    runs: list[dict[str, Any]], measured: dict[str, str], max_plain_epochs: int
) -> tuple[list[list[str]], dict]:
    """The table's rows and the per-size summary (median wall times, the ratio) from the runs."""
    rows, summary = [], {}
    for size in sorted({r["size"] for r in runs}):
        here = {n: [r for r in runs if r["size"] == size and r["contender"] == n and r["returncode"] == 0]
                for n in ("plain_loop", "llmbox")}  # fmt: skip
        wall = {n: sorted(r["wall_s"] for r in rs)[len(rs) // 2] if rs else None for n, rs in here.items()}
        # a plain loop that never reached llmbox's recall would have needed longer than it ran: a lower bound
        reached = all(r.get("reached_goal", True) for r in here["plain_loop"])
        ratio = round(wall["plain_loop"] / wall["llmbox"], 2) if wall["plain_loop"] and wall["llmbox"] else None
        summary[str(size)] = {"wall_s": wall, "ratio_plain_over_llmbox": ratio if reached else None}
        if not reached:
            summary[str(size)]["ratio_at_least"] = ratio
        for name, rs in here.items():
            recalls = ", ".join(f"{r['recall']}/{r['of']}" for r in rs) or "-"
            epochs = ", ".join(f"{r['epochs']:g}" if isinstance(r["epochs"], float) else str(r["epochs"]) for r in rs)
            if name == "plain_loop" and not reached:
                epochs += f" (llmbox's recall not reached in {max_plain_epochs})"
            rows.append([str(size), name, f"{wall[name]} s" if wall[name] else "failed", recalls, epochs or "-",
                         f"{'> ' if not reached else ''}{ratio}x" if ratio and name == "llmbox" else "",
                         measured[str(size)]])  # fmt: skip
    return rows, summary


def main() -> None:
    args = parse_args()
    model = smollm2_dir()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    output = args.output or RESULTS / "learn.json"
    runs, measured = carried_runs(output, sizes)
    header = report_header()
    measured |= {str(size): f"{header['date']}, {header['machine']['cpu']}" for size in sizes}
    with tempfile.TemporaryDirectory(prefix="llmbox-bench-learn-") as scratch:
        workdir = args.workdir or Path(scratch)
        for size in sizes:
            facts_file = (
                args.facts if size == 12 else write_json(workdir / f"facts-{size}.json", invented_facts(size, size))
            )
            facts = read_json(facts_file)
            for repeat in range(args.repeats):
                here = workdir / f"{size}-{repeat}"
                order = (
                    ["llmbox", "plain_loop"] if size != 12 else (["plain_loop", "llmbox"][:: -1 if repeat % 2 else 1])
                )
                llmbox_recall: int | None = None
                for name in order:  # above 12 facts llmbox goes first: its recall is the plain loop's goal
                    if name == "llmbox":
                        run = partial(run_llmbox, model, facts_file, facts, here / "llmbox", args.llmbox_args)
                        result = reused_or_run(here / "llmbox", run)
                        llmbox_recall = result.get("recall")
                    else:
                        epochs = PLAIN_EPOCHS if size == 12 else args.max_plain_epochs
                        goal = None if size == 12 else llmbox_recall
                        run = partial(run_plain, model, facts_file, facts, here / "plain", epochs, goal)
                        result = reused_or_run(here / "plain", run)
                    runs.append(result | {"size": size, "repeat": repeat})
                    shown = f"recall {result.get('recall')}/{len(facts)}, {result.get('epochs')} epoch(s)"
                    print(f"  {size} facts, {name}: {result['wall_s']} s, {shown}", flush=True)
    rows, summary = summarise(runs, measured, args.max_plain_epochs)
    columns = ["facts", "contender", "median whole-command wall time", "recall", "epochs", "plain loop / llmbox",
               "measured"]  # fmt: skip
    report = header | {"benchmark": "learn", "sizes": sizes, "measured": measured, "summary": summary, "runs": runs}
    save_report(report, output, markdown_table(columns, rows), "learn", readme=not args.no_readme)


if __name__ == "__main__":
    main()
