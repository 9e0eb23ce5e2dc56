"""The Docker build context of the engine image: the llmbox checkout, or one assembled from an installed llmbox.

A checkout (or an editable install) builds from its own tree. A wheel-installed CLI has no tree, so the context
is put together from what is installed: the three packages, the Dockerfile (installed as data under
`<prefix>/share/llmbox/`), and a pyproject.toml written from the distribution's metadata, which is what the
Dockerfile reads its dependency list from. The image then holds exactly the llmbox the host runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from llmbox.errors import UserError

PACKAGES = (("llmbox", "cli"), ("llmbox_engine", "engine"), ("llmbox_handlers", "handlers"))
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def checkout() -> Path | None:
    """The llmbox source tree this CLI runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "images" / "Dockerfile").is_file() and (root / "pyproject.toml").is_file() else None


def build_context(scratch: Path) -> Path:
    """The folder to hand `docker build`: the checkout, or a context assembled in `scratch`."""
    return checkout() or assemble_context(scratch)


def installed_dockerfile() -> Path:
    for prefix in (sysconfig.get_path("data"), sys.prefix, sys.base_prefix):
        candidate = Path(prefix) / "share" / "llmbox" / "Dockerfile"
        if candidate.is_file():
            return candidate
    raise UserError("the engine image's Dockerfile is not installed with llmbox (share/llmbox/Dockerfile): reinstall")


def assemble_context(target: Path) -> Path:
    for package, folder in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise UserError(f"llmbox build: the package {package} is not installed")
        source = Path(spec.origin).parent
        shutil.copytree(source, target / folder / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / "images" / "wheels").mkdir(parents=True)
    shutil.copyfile(installed_dockerfile(), target / "images" / "Dockerfile")
    (target / "pyproject.toml").write_text(pyproject_from_metadata())
    (target / "README.md").write_text("The llmbox engine, assembled from an installed llmbox.\n")
    return target


def requirements_by_extra(requires: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`Requires-Dist` lines split into the base dependencies and each extra's, without the extra markers."""
    base: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in requires:
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        found = _EXTRA.search(marker)
        if found is None:
            base.append(line.strip())
            continue
        rest = _EXTRA.sub("", marker).strip().strip("and").strip()  # a marker beside the extra (a platform)
        extras.setdefault(found.group(1), []).append(f"{requirement}; {rest}" if rest else requirement)
    return base, extras


def pyproject_from_metadata() -> str:
    """A pyproject.toml that builds the assembled packages and lists the same dependencies as the installed llmbox."""
    dist = metadata.distribution("llmbox")
    base, extras = requirements_by_extra(dist.requires or [])

    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    lines = [
        "[build-system]",
        'requires = ["setuptools>=69", "wheel"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "llmbox"',
        f"version = {json.dumps(dist.version)}",
        f"dependencies = {toml_list(base)}",
        "",
        "[project.optional-dependencies]",
        *(f"{name} = {toml_list(items)}" for name, items in sorted(extras.items())),
        "",
        "[project.scripts]",
        'llmbox = "llmbox.main:main"',
        "",
        "[tool.setuptools.packages.find]",
        'where = ["cli", "engine", "handlers"]',
        "",
    ]
    return "\n".join(lines)
