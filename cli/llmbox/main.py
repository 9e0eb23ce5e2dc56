"""The `llmbox` command: the host side, light on purpose (no torch)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llmbox import __version__
from llmbox.entry import run_cli
from llmbox.errors import UserError
from llmbox.model_home import llmbox_home, resolve_model
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


@cli.command()
@click.argument("source")
@click.option("--name", help="The model's name under $LLMBOX_HOME/models (default: from SOURCE).")
@click.option("--force", is_flag=True, help="Replace the weights of an installed model of that name.")
def install(source: str, name: str | None, force: bool) -> None:
    """Install SOURCE (a Hugging Face repo id, a local HF folder or a .gguf file) as a model directory."""
    from llmbox import install as installer

    home = installer.prepare(name or installer.default_name(source), force)
    target = home / "model"
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{source}: no such GGUF file")
        code = run_engine("import-gguf", [str(path.resolve()), "--output", str(target)])
        if code:
            sys.exit(code)
    elif path.is_dir():
        installer.copy_local_folder(path, target)
    elif path.exists():
        raise UserError(f"{source}: expected a model folder, a .gguf file or a Hugging Face repo id")
    else:
        installer.download_from_hub(source, target)
    installer.write_scripts(home)
    click.echo(f"installed {home.name} in {home}")
    click.echo(f"  train: llmbox train {home.name} --data 'data/*.json'   (or: cd {home} && ./train.sh --data ...)")


@cli.command("list")
def list_models() -> None:
    """The installed models: family, size, handler, and whether a trained adapter is there."""
    from rich.console import Console
    from rich.table import Table

    from llmbox.catalog import installed_models

    table = Table(title=f"Models in {llmbox_home() / 'models'}", title_justify="left")
    for column in ("name", "family", "params", "handler", "adapter", "final loss"):
        table.add_column(column)
    for m in installed_models():
        params = f"{m.params / 1e9:.2f}B" if m.params and m.params >= 1e9 else f"{(m.params or 0) / 1e6:.0f}M"
        loss = f"{m.final_loss:.4f}" if m.final_loss is not None else "-"
        table.add_row(m.name, m.family, params if m.params else "?", m.handler, "yes" if m.adapter else "no", loss)
        if m.problem:
            table.add_row("", f"[red]{m.problem}[/]", "", "", "", "")
    Console().print(table)


def main() -> None:
    run_cli(cli, "llmbox")


if __name__ == "__main__":
    main()
