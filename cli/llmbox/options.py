"""Command options shared by the host CLI and the engine entry point: one definition, two parsers.

The host parses a command's options (to validate them early and, for Docker, to rewrite paths), then
hands the engine the same options as argv through `to_argv`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Opt:
    flag: str
    help: str
    type: Any = str
    default: Any = None
    is_flag: bool = False
    required: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def click_option(self) -> Callable[[F], F]:
        if self.is_flag:
            return click.option(self.flag, self.dest, is_flag=True, default=False, help=self.help)
        return click.option(
            self.flag, self.dest, type=self.type, default=self.default, required=self.required,
            show_default=self.default is not None, help=self.help,
        )  # fmt: skip

    def to_argv(self, value: Any) -> list[str]:
        if self.is_flag:
            return [self.flag] if value else []
        if value is None:
            return []
        return [self.flag, str(value)]


def with_options(options: Sequence[Opt]) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for opt in reversed(options):
            func = opt.click_option()(func)
        return func

    return decorate


def to_argv(options: Sequence[Opt], values: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    for opt in options:
        argv += opt.to_argv(values.get(opt.dest))
    return argv


DATA_SPEC_HELP = (
    "Training data: a file, a folder (recursive), a quoted glob ('data/*.json'), a comma list of those, "
    "or a Hugging Face dataset as name:split."
)

DATA_OPTIONS: tuple[Opt, ...] = (
    Opt("--data", DATA_SPEC_HELP, required=True),
    Opt(
        "--dataset-format",
        "Force one format for every record: alpaca, sharegpt, openai, qa, completion, text, vision.",
    ),
    Opt("--max-examples", "Use at most N examples (a seeded random sample).", type=click.IntRange(min=1)),
    Opt(
        "--skip-bad-records",
        "Skip records that fail validation (and report how many) instead of stopping.",
        is_flag=True,
    ),
    Opt("--seed", "Random seed for sampling, the validation split and training.", type=int, default=42),
)

DATA_REPORT_OPTIONS: tuple[Opt, ...] = (
    *DATA_OPTIONS,
    Opt("--model", "A model folder: adds token-length statistics rendered with its chat template."),
    Opt("--max-seq-length", "Truncate longer examples to this many tokens (default: the model's limit).",
        type=click.IntRange(min=2)),
    Opt("--json", "Print one JSON object instead of tables.", is_flag=True),
)  # fmt: skip
