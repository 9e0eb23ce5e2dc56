"""From a `--data` spec to validated, de-duplicated canonical examples (no torch, no tokenizer)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from llmbox.errors import DataError, UserError
from llmbox_engine.data.bulk import gc_paused
from llmbox_engine.data.canonical import Example, Origin, Task
from llmbox_engine.data.formats import Format, RecordContext, RecordError, convert_record, format_by_name
from llmbox_engine.data.hub import read_hub_records
from llmbox_engine.data.readers import RawRecord, read_records
from llmbox_engine.data.sources import FileSource, Source, resolve_sources


@dataclass
class SourceReport:
    path: str
    formats: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0

    @property
    def records(self) -> int:
        return sum(self.formats.values())

    @property
    def format(self) -> str:
        if len(self.formats) == 1:
            return next(iter(self.formats))
        return "mixed (" + ", ".join(f"{name} {n}" for name, n in self.formats.most_common()) + ")"


@dataclass
class IngestResult:
    examples: list[Example]
    sources: list[SourceReport]
    duplicates: int = 0
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    @property
    def formats(self) -> Counter[str]:
        return Counter(e.format for e in self.examples)

    @property
    def task(self) -> Task:
        """Text generation only when no example is a conversation: its thresholds are looser."""
        if self.examples and all(e.task == "text-generation" for e in self.examples):
            return "text-generation"
        return "instruction"

    @property
    def images(self) -> int:
        return sum(len(e.images) for e in self.examples)


def load_examples(
    spec: str,
    *,
    dataset_format: str | None = None,
    max_examples: int | None = None,
    skip_bad_records: bool = False,
    seed: int = 42,
) -> IngestResult:
    """Read every source of `spec`, validate each record and keep one copy of each distinct example.

    A bad record raises `DataError` naming the file and record, unless `skip_bad_records` is set, in
    which case it is counted (and the first few reasons kept) instead.
    """
    try:
        forced = format_by_name(dataset_format) if dataset_format else None
    except RecordError as exc:
        raise UserError(str(exc)) from None
    result = IngestResult(examples=[], sources=[])
    seen = _Seen()
    for source in resolve_sources(spec):
        report = SourceReport(str(source.path) if isinstance(source, FileSource) else f"hf:{source}")
        result.sources.append(report)
        # files make many objects and no cycles; the hub reader's libraries are left their collector
        with gc_paused() if isinstance(source, FileSource) else nullcontext():
            for example in _source_examples(source, report, forced, skip_bad_records, result):
                if not seen.add(example):
                    report.duplicates += 1
                    result.duplicates += 1
                    continue
                report.formats[example.format] += 1
                result.examples.append(example)
        if report.records + report.duplicates == 0:
            raise DataError(report.path, f"no usable records ({report.skipped} skipped as bad)")
    if max_examples is not None and len(result.examples) > max_examples:
        if max_examples < 1:
            raise UserError(f"--max-examples must be at least 1, got {max_examples}")
        kept = sorted(random.Random(seed).sample(range(len(result.examples)), max_examples))
        result.examples = [result.examples[i] for i in kept]
    return result


class _Seen:
    """Exact duplicates, found by a hash of the content and confirmed by comparing it.

    Cheaper than `Example.content_key` (no JSON, no digest) and just as exact: the dict keeps the first
    example of each hash, whose content is compared on a hit; unequal contents with one hash are kept apart.
    """

    def __init__(self) -> None:
        self.first: dict[int, Example] = {}
        self.collided: set[tuple[object, ...]] = set()

    def add(self, example: Example) -> bool:
        """Whether the example is new; if so it is remembered."""
        content = example.content()
        key = hash(content)
        first = self.first.setdefault(key, example)
        if first is example:
            return True
        if first.content() == content or content in self.collided:
            return False
        self.collided.add(content)
        return True


def _source_examples(
    source: Source,
    report: SourceReport,
    forced: Format | None,
    skip_bad_records: bool,
    result: IngestResult,
) -> Iterator[Example]:
    if isinstance(source, FileSource):
        records, base_dir = read_records(source.path), source.path.parent
    else:
        records, base_dir = read_hub_records(source), Path.cwd()
    for raw in records:
        try:
            yield _convert(raw, report.path, base_dir, forced)
        except DataError as exc:
            if not skip_bad_records:
                raise
            report.skipped += 1
            result.skipped += 1
            if len(result.skipped_reasons) < 5:
                result.skipped_reasons.append(str(exc))


def _convert(raw: RawRecord, path: str, base_dir: Path, forced: Format | None) -> Example:
    try:
        if raw.error:
            raise RecordError(raw.error)
        return convert_record(raw.value, RecordContext(Origin(path, raw.number), base_dir), forced)
    except RecordError as exc:
        raise DataError(path, str(exc), record=raw.number, line=raw.line) from None
