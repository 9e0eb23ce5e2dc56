"""One rich console for everything llmbox prints."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console() -> Console:
    # logs (docker logs, CI, pipes) have no terminal width: keep a line or a table row on one line there
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)
