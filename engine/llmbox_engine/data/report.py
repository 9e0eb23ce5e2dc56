"""`llmbox data`: what training would see, as a dict (for --json) and as tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmbox.model_facts import max_positions, read_config
from llmbox_engine.data.canonical import Example
from llmbox_engine.data.ingest import IngestResult


def token_statistics(examples: Sequence[Example], model_dir: Path, max_seq_length: int | None) -> dict[str, Any]:
    """Token lengths as training would render them: the model's chat template, its length limit."""
    from transformers import AutoTokenizer

    from llmbox_engine.data.render import Renderer, chat_template_for, render_stats
    from llmbox_handlers import match_handler

    config = read_config(model_dir)
    handler = match_handler(config).handler
    limit = max_seq_length or min(handler.max_seq_length, max_positions(config) or handler.max_seq_length)
    if any(e.images for e in examples) and handler.takes_images(config):
        from transformers import AutoProcessor

        from llmbox_engine.data.render_vision import VisionRenderer

        processor = AutoProcessor.from_pretrained(str(model_dir))
        stats = render_stats(VisionRenderer(processor, None, limit).tokenize(examples))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        renderer = Renderer(tokenizer, chat_template_for(tokenizer, handler.chat_template), limit)
        stats = render_stats(renderer.tokenize(examples))
    return {"model": str(model_dir), "handler": handler.name, "max_seq_length": limit, **stats.summary()}


def build_report(result: IngestResult, tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "files": [
            {"path": s.path, "format": s.format, "records": s.records, "skipped": s.skipped} for s in result.sources
        ],
        "formats": dict(result.formats.most_common()),
        "total_records": len(result.examples),
        "task": result.task,
        "duplicates_removed": result.duplicates,
        "skipped_records": result.skipped,
        "images": result.images,
    }
    if result.images:
        from llmbox_engine.data.images import image_statistics

        report["image_sizes"] = image_statistics(ref for e in result.examples for ref in e.images)
    if result.skipped_reasons:
        report["skipped_examples"] = result.skipped_reasons
    if tokens is not None:
        report["tokens"] = tokens
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from llmbox.console import make_console

    console = make_console()
    files = Table(title="Data files", title_justify="left")
    for column in ("file", "format", "records", "skipped"):
        files.add_column(column, justify="right" if column in ("records", "skipped") else "left")
    for f in report["files"]:
        files.add_row(f["path"], f["format"], str(f["records"]), str(f["skipped"]))
    console.print(files)
    formats = ", ".join(f"{name} {n}" for name, n in report["formats"].items())
    console.print(f"[bold]{report['total_records']}[/] examples ({formats}); task: [bold]{report['task']}[/]")
    console.print(
        f"duplicates removed: {report['duplicates_removed']}, bad records skipped: {report['skipped_records']}"
        + (f", images: {report['images']}" if report["images"] else "")
    )
    sizes = report.get("image_sizes")
    if sizes:
        console.print(
            f"images: {sizes['images']} distinct, from {sizes['min_size']} to {sizes['max_size']} pixels "
            f"(width {sizes['min_width']}-{sizes['max_width']}, height {sizes['min_height']}-{sizes['max_height']})"
        )
    for reason in report.get("skipped_examples", []):
        console.print(f"  skipped: {reason}", style="yellow")
    tokens = report.get("tokens")
    if tokens:
        table = Table(
            title=f"Tokens ({tokens['handler']} handler, max {tokens['max_seq_length']})",
            title_justify="left",
        )
        keys = ("tokens", "min", "median", "mean", "p95", "max", "truncated")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_row(*(str(tokens[k]) for k in keys))
        console.print(table)
        if tokens["truncated"]:
            console.print(
                f"{tokens['truncated']} examples are longer than {tokens['max_seq_length']} tokens"
                " and will be truncated"
                + (
                    f"; {tokens['without_targets']} of them lose every answer token"
                    if tokens["without_targets"]
                    else ""
                ),
                style="yellow",
            )
