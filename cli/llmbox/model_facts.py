"""Facts about a model folder read from its `config.json` alone: no torch, no weights loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmbox.errors import UserError


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    # multimodal configs keep the language model's facts under text_config
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def max_positions(config: dict[str, Any]) -> int | None:
    text = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
