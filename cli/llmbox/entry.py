"""Running a click command group the llmbox way: user errors as one `error:` line and a non-zero exit."""

from __future__ import annotations

import sys

import click

from llmbox.errors import UserError


def run_cli(group: click.Group, prog_name: str) -> None:
    try:
        group.main(standalone_mode=False, prog_name=prog_name)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
