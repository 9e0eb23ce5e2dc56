"""Running the training recipe in-process on tiny models, for tests."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from llmbox.plan import PlanFlags
from llmbox_engine.train.recipe import LoraRecipe, TrainOptions, TrainResult

from conftest import write_json


def qa_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = "red blue green cat dog sun moon tree river stone bird fish star cloud rain wind".split()  # noqa: SIM905
    return [
        {"question": f"What is item {i}?", "answer": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))}
        for i in range(n)
    ]


def qa_file(folder: Path, n: int = 24, seed: int = 0) -> Path:
    return write_json(folder / "qa.json", qa_records(n, seed))


def train(model: Path, output: Path, data: Path | str, skip_test: bool = True, **flags: Any) -> TrainResult:
    options = TrainOptions(
        model_path=model,
        output=output,
        data=str(data),
        flags=PlanFlags(**flags),
        tensorboard=False,
        skip_test=skip_test,
    )
    result = LoraRecipe(options).run()
    assert result is not None
    return result


def resume(model: Path, output: Path, data: Path | str, **flags: Any) -> TrainResult:
    """`llmbox train --resume` in-process: the newest whole checkpoint in `output`, the same flags."""
    options = TrainOptions(model, output, str(data), PlanFlags(**flags), resume=True, tensorboard=False, skip_test=True)
    result = LoraRecipe(options).run()
    assert result is not None
    return result


def adapter_info(output: Path) -> dict[str, Any]:
    return json.loads((output / "lora" / "adapter_info.json").read_text())  # type: ignore[no-any-return]


def wait_for(process: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    process.kill()
    raise AssertionError(f"never saw {marker!r}:\n{''.join(lines)}")


def finish(process: subprocess.Popen[str]) -> str:
    try:
        rest, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return rest
