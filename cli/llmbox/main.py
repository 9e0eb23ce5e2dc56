"""The `llmbox` command: the host side, light on purpose (no torch)."""

from __future__ import annotations

import sys
from typing import Any

import click

from llmbox import __version__
from llmbox.entry import run_cli
from llmbox.options import DATA_REPORT_OPTIONS, to_argv, with_options
from llmbox.runtime.local import run_engine


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="llmbox")
def cli() -> None:
    """Fine-tune LLMs with LoRA/QLoRA and serve them behind an OpenAI-compatible API."""


@cli.command()
@with_options(DATA_REPORT_OPTIONS)
def data(**values: Any) -> None:
    """Show what training would see in --data: formats, record counts, task, duplicates, token lengths."""
    sys.exit(run_engine("data", to_argv(DATA_REPORT_OPTIONS, values)))


def main() -> None:
    run_cli(cli, "llmbox")


if __name__ == "__main__":
    main()
