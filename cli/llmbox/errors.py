"""Errors a user can act on. The entry points print them as one `error:` line and exit non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Something wrong with what the user asked for or pointed at; never shown as a traceback."""

    exit_code = 2


class DataError(UserError):
    """Bad training data: names the file, the record (1-based) where there is one, and what is wrong."""

    def __init__(self, path: str, message: str, record: int | None = None, line: int | None = None) -> None:
        self.path = path
        self.record = record
        self.line = line
        self.detail = message
        where = path
        if record is not None:
            where += f": record {record}"
        if line is not None:
            where += f" (line {line})" if record is not None else f": line {line}"
        super().__init__(f"{where}: {message}")
