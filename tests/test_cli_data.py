"""`llmbox data`: what training would see, as tables and as JSON, with token statistics from a model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from llmbox_engine.data import split_examples

from conftest import EXAMPLES, run_llmbox, write_json


def test_json_report_of_the_bundled_examples() -> None:
    proc = run_llmbox("data", "--data", str(EXAMPLES), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    by_name = {Path(f["path"]).name: f for f in report["files"]}
    assert by_name["alpaca.json"]["format"] == "alpaca" and by_name["alpaca.json"]["records"] > 0
    assert set(report["formats"]) == {"alpaca", "sharegpt", "openai", "qa", "completion", "text", "vision"}
    assert report["total_records"] == sum(f["records"] for f in report["files"]) == sum(report["formats"].values())
    assert report["task"] == "instruction"


def test_text_only_data_is_a_text_generation_task(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    report = json.loads(run_llmbox("data", "--data", str(tmp_path / "t.txt"), "--json").stdout)
    assert report["task"] == "text-generation" and report["formats"] == {"text": 2}


def test_token_statistics_with_a_model(tmp_path: Path, tiny_llama: Path) -> None:
    records = [{"instruction": "say " + "word " * n, "output": "ok"} for n in range(1, 40)]
    path = write_json(tmp_path / "a.json", records)
    proc = run_llmbox("data", "--data", str(path), "--model", str(tiny_llama), "--max-seq-length", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)["tokens"]
    assert tokens["handler"] == "llama" and tokens["max_seq_length"] == 32
    assert tokens["max"] == 32 and tokens["min"] < 32
    assert 0 < tokens["truncated"] < len(records)


def test_table_output_names_files_and_task() -> None:
    proc = run_llmbox("data", "--data", str(EXAMPLES / "alpaca.json"))
    assert proc.returncode == 0, proc.stderr
    assert "alpaca.json" in proc.stdout and "task: instruction" in proc.stdout


def test_validation_split_is_deterministic() -> None:
    items = list(range(100))
    train, val = split_examples(items, 10, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_examples(items, 10, seed=3) == (train, val)
    assert split_examples(items, 10, seed=4)[1] != val
    assert split_examples(items, 0, seed=3) == (items, [])


def test_the_host_cli_does_not_import_torch() -> None:
    code = "import sys, llmbox.main, llmbox.options, llmbox.runtime.local; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_the_data_options(tiny_model_factory: Callable[..., Path]) -> None:
    proc = run_llmbox("data", "--help")
    for flag in ("--data", "--dataset-format", "--max-examples", "--skip-bad-records", "--model", "--json"):
        assert flag in proc.stdout
