"""Turning a `--data` spec into concrete sources.

A spec is a comma list whose parts are each a file, a folder (searched recursively for data files),
a quoted glob (`'data/*.json'`, `**` allowed), or a Hugging Face dataset as `name:split`.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmbox.errors import DataError, UserError
from llmbox_engine.data.readers import DATA_SUFFIXES


@dataclass(frozen=True)
class FileSource:
    path: Path


@dataclass(frozen=True)
class HubSource:
    name: str  # a hub id, or a local dataset folder
    split: str

    def __str__(self) -> str:
        return f"{self.name}:{self.split}"


Source = FileSource | HubSource

_GLOB_CHARS = re.compile(r"[*?\[]")
# `owner/name:split` or `name:split`, split possibly sliced (`train[:10%]`)
_HUB_SPEC = re.compile(r"(?P<name>[^:,]+):(?P<split>[A-Za-z_][\w.+-]*(\[[^\]]*\])?)")


def resolve_sources(spec: str) -> list[Source]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("--data is empty: give a file, folder, glob, comma list or name:split")
    sources: list[Source] = []
    for part in parts:
        for source in _resolve_part(part):
            if source not in sources:
                sources.append(source)
    return sources


def _resolve_part(part: str) -> Sequence[Source]:
    path = Path(part).expanduser()
    if path.is_file():
        return [FileSource(path)]
    if path.is_dir():
        return _folder(path)
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True)) if _GLOB_CHARS.search(part) else []  # noqa: PTH207
    if matches:
        files = [m for m in matches if m.is_file()]
        for folder in (m for m in matches if m.is_dir()):
            files += [s.path for s in _folder(folder)]
        data_files = [f for f in files if f.suffix.lower() in DATA_SUFFIXES]
        if not data_files:
            raise DataError(part, f"the glob matched no data files ({', '.join(DATA_SUFFIXES)})")
        return [FileSource(f) for f in data_files]
    hub = _HUB_SPEC.fullmatch(part)
    if hub:
        return [HubSource(hub["name"], hub["split"])]
    if _GLOB_CHARS.search(part):
        raise DataError(part, "the glob matched no files")
    raise DataError(part, "no such file or folder (and not a Hugging Face dataset name:split)")


def _folder(folder: Path) -> list[FileSource]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))
    data_files = [p for p in files if p.suffix.lower() in DATA_SUFFIXES]
    if not data_files:
        what = "is empty" if not files else f"holds no data files ({', '.join(DATA_SUFFIXES)})"
        raise DataError(str(folder), f"the folder {what}")
    return [FileSource(p) for p in data_files]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
