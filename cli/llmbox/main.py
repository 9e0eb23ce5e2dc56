"""The `llmbox` command: the host side, light on purpose (no torch)."""

from __future__ import annotations

import sys
from typing import Any

import click

from llmbox import __version__
from llmbox.entry import run_cli
from llmbox.errors import UserError
from llmbox.model_home import resolve_model
from llmbox.options import DATA_REPORT_OPTIONS, TRAIN_OPTIONS, config_file_option, to_argv, with_options
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


RUNTIMES = ("auto", "docker", "local")


def choose_runtime(asked: str) -> str:
    """auto: Docker when a daemon answers, else local; always say which."""
    if asked == "docker":
        raise UserError("the docker runtime is not built yet: use --runtime local (the engine runs in-process)")
    if asked == "auto":
        click.echo("runtime: local (the engine runs in this machine's Python)", err=True)
    return "local"


@cli.command()
@click.argument("model")
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    help="Where the engine runs: a Docker container, or this machine's Python.",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (only if you trust it)."
)
@config_file_option(TRAIN_OPTIONS)
@with_options(TRAIN_OPTIONS)
def train(model: str, runtime: str, trust_remote_code: bool, **values: Any) -> None:
    """Fine-tune MODEL (an installed name or a model folder) with LoRA/QLoRA on --data."""
    home = resolve_model(model)
    choose_runtime(runtime)
    values["output"] = values["output"] or str(home.root)
    argv = ["--model-path", str(home.weights), *(["--trust-remote-code"] if trust_remote_code else [])]
    sys.exit(run_engine("train", argv + to_argv(TRAIN_OPTIONS, values)))


def main() -> None:
    run_cli(cli, "llmbox")


if __name__ == "__main__":
    main()
