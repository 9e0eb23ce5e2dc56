"""Writing folders and files so that a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def staged_dir(final: Path, keep_previous: Path | None = None) -> Iterator[Path]:
    """A fresh folder beside `final` that replaces it on success (and vanishes on failure).

    The old `final` is removed, or kept as `keep_previous`. Between the two renames `final` is briefly
    absent; a reader must treat that as "no change yet", never as a broken folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        _finalise_tree(staging)
        old = keep_previous or final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        staging.rename(final)
        if keep_previous is None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A path beside `final` to write; on success it is flushed and renamed to `final`, on failure removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield staging
        with staging.open("rb") as f:
            os.fsync(f.fileno())
        staging.chmod(0o666 & ~_umask())
        staging.replace(final)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path: Path, value: Any) -> None:
    """Write-then-rename, so a reader never sees a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


def _finalise_tree(folder: Path) -> None:
    """Flush every file to disk, and give the tree ordinary permissions: mkdtemp makes it private (0700),
    which would hide a published adapter from a server running as another user."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            path.chmod(0o777 & ~umask)
