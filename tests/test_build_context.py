"""`llmbox build` from a wheel-installed CLI: the build context is assembled from what is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from llmbox.runtime.build_context import requirements_by_extra

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llmbox as `pip install llmbox` lays it out: a wheel installed into its own prefix, no checkout around."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    for item in ("pyproject.toml", "README.md", "cli", "engine", "handlers", "images/Dockerfile"):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copyfile
        (source / item).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / item, source / item)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(source)], check=True)  # fmt: skip
    wheel = next((root / "dist").glob("llmbox-*.whl"))
    # --ignore-installed: without it pip would uninstall this venv's llmbox to install into the prefix
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix",
                    str(root / "prefix"), str(wheel)], check=True)  # fmt: skip
    return root / "prefix"


def run_installed(prefix: Path, code: str, cwd: Path) -> str:
    site = next(prefix.glob("lib/python*/site-packages"))
    # the installed copy comes first on the path; sys.prefix points at it, as it would in its own venv
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = f"import sys; sys.prefix = {str(prefix)!r}\n{code}"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def same_requirements(a: list[str], b: list[str]) -> bool:
    from packaging.requirements import Requirement

    return [str(Requirement(r)) for r in a] == [str(Requirement(r)) for r in b]  # `>=5,<6` is `<6,>=5`


def test_a_wheel_install_assembles_a_buildable_context(installed: Path, tmp_path: Path) -> None:
    context = tmp_path / "context"
    code = "import llmbox.runtime.build_context as b, pathlib, sys; "
    code += f"print(b.checkout(), b.build_context(pathlib.Path({str(context)!r})))"
    out = run_installed(installed, code, tmp_path)
    assert out.split() == ["None", str(context)]  # not the checkout: the installed packages
    assert (context / "images" / "Dockerfile").read_text() == (REPO / "images" / "Dockerfile").read_text()
    for folder, package in (("cli", "llmbox"), ("engine", "llmbox_engine"), ("handlers", "llmbox_handlers")):
        assert (context / folder / package / "__init__.py").is_file()
    assert (context / "engine" / "llmbox_engine" / "train" / "recipe.py").is_file()
    assembled = tomllib.loads((context / "pyproject.toml").read_text())["project"]
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert same_requirements(assembled["dependencies"], ours["dependencies"])
    assert same_requirements(assembled["optional-dependencies"]["engine"], ours["optional-dependencies"]["engine"])
    # what the Dockerfile's last layer does with it: install the packages from the context
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(context)], check=True)  # fmt: skip
    assert (target / "llmbox_engine" / "serve" / "app.py").is_file() and (target / "llmbox" / "main.py").is_file()


def test_the_checkout_builds_from_itself() -> None:
    from llmbox.runtime.build_context import build_context, checkout

    assert checkout() == REPO and build_context(Path("/nonexistent")) == REPO


def test_requirements_split_by_extra() -> None:
    base, extras = requirements_by_extra(
        ['click>=8.1', 'torch>=2.4; extra == "engine"', 'pytest>=8; extra == "dev"',
         'uvloop; sys_platform != "win32" and extra == "engine"']
    )  # fmt: skip
    assert base == ["click>=8.1"]
    assert extras == {"engine": ["torch>=2.4", 'uvloop; sys_platform != "win32"'], "dev": ["pytest>=8"]}


def test_build_arguments_pick_the_base_for_the_variant(tmp_path: Path) -> None:
    from llmbox.runtime.docker import CPU_BASE_IMAGE, build_args

    cpu = build_args(cpu=True, base_image=None, version="1.2.3", context=tmp_path)
    assert cpu["BASE_IMAGE"] == CPU_BASE_IMAGE and "BITSANDBYTES" not in cpu and cpu["LLMBOX_VERSION"] == "1.2.3"
    cuda = build_args(cpu=False, base_image=None, version="1.2.3", context=tmp_path)
    assert "BASE_IMAGE" not in cuda and cuda["CUDA_LABEL"] == "12.8"  # the Dockerfile's CUDA default
    assert build_args(cpu=True, base_image="mine", version="1", context=tmp_path)["BASE_IMAGE"] == "mine"
    (tmp_path / "images" / "wheels").mkdir(parents=True)
    (tmp_path / "images" / "wheels" / "torch-2.13.0-cp311-cp311-linux_x86_64.whl").touch()
    assert build_args(cpu=True, base_image=None, version="1", context=tmp_path)["TORCH_SPEC"] == "torch==2.13.0"
