"""Reading records out of data files: .json, .jsonl, .txt, .csv and .parquet.

File-level problems (unreadable, binary, empty, not an array) raise `DataError` at once. A malformed
line of a .jsonl file is a record-level problem: it is yielded as a `RawRecord` with `error` set, so that
`--skip-bad-records` can skip it like any other bad record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbox.errors import DataError

DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    number: int  # 1-based position among the file's records
    line: int | None  # 1-based line, for line-oriented files
    value: Any
    error: str | None = None


def read_records(path: Path) -> Iterator[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path)
        return
    text = _read_text(path)
    if suffix == ".json":
        records = _json(path, text)
        del text  # the generator's copy is dropped once parsed: the text is as large as the file
        yield from records
    elif suffix == ".jsonl":
        yield from _jsonl(text)
    elif suffix == ".txt":
        yield from _lines(text)
    elif suffix == ".csv":
        yield from _csv(text)
    else:
        raise DataError(
            str(path), f"unsupported file type {suffix or '(none)'!r} (expected {', '.join(DATA_SUFFIXES)})"
        )


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise DataError(str(path), "cannot read the file: permission denied") from None
    except IsADirectoryError:
        raise DataError(str(path), "is a folder, not a data file") from None
    except OSError as exc:
        raise DataError(str(path), f"cannot read the file: {exc.strerror}") from None
    if b"\x00" in raw[:8192]:
        raise DataError(str(path), f"binary file, not {path.suffix} text (is it the right file?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise DataError(str(path), "file is empty")
    return text


def _json(path: Path, text: str) -> Iterator[RawRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json: common, and unambiguous
            yield from _jsonl(text)
            return
        raise DataError(str(path), f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    del text  # parsed: peak memory need not hold the file twice
    if isinstance(data, dict):
        raise DataError(str(path), "expected a JSON array of records, got a single object")
    if not isinstance(data, list):
        raise DataError(str(path), f"expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(str(path), "the JSON array is empty")
    for i in range(len(data)):
        value, data[i] = data[i], None  # each record is let go once converted, not at the end of the file
        yield RawRecord(i + 1, None, value)


def _jsonl(text: str) -> Iterator[RawRecord]:
    number = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        try:
            yield RawRecord(number, line_no, json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRecord(number, line_no, None, error=f"malformed JSON: {exc.msg} (column {exc.colno})")


def _lines(text: str) -> Iterator[RawRecord]:
    number = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            number += 1
            yield RawRecord(number, line_no, {"text": line.strip()})


def _csv(text: str) -> Iterator[RawRecord]:
    reader = csv.DictReader(text.splitlines())
    for number, row in enumerate(reader, start=1):
        # empty cells are absent values, as a missing JSON key would be
        record = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        yield RawRecord(number, reader.line_num, record)


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq  # engine dependency; imported only for parquet files

    try:
        parquet = pq.ParquetFile(path)
    except PermissionError:
        raise DataError(str(path), "cannot read the file: permission denied") from None
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(str(path), f"not a readable parquet file ({exc})") from None
    if parquet.metadata.num_rows == 0:
        raise DataError(str(path), "file is empty (0 rows)")
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(number, None, {k: v for k, v in row.items() if v is not None})
