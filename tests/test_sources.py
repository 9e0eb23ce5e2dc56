"""Every kind of --data source: file, glob, folder, comma list, Hugging Face name:split."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmbox.errors import DataError
from llmbox_engine.data import load_examples
from llmbox_engine.data.sources import FileSource, HubSource, resolve_sources

from conftest import write_json, write_jsonl


@pytest.fixture
def data_tree(tmp_path: Path) -> Path:
    write_json(tmp_path / "a.json", [{"instruction": "a", "output": "1"}])
    write_json(tmp_path / "b.json", [{"instruction": "b", "output": "2"}])
    write_jsonl(tmp_path / "nested" / "deeper" / "c.jsonl", [{"question": "c?", "answer": "3"}])
    (tmp_path / "nested" / "notes.md").write_text("not data")
    (tmp_path / "nested" / "lines.txt").write_text("plain one\nplain two\n")
    return tmp_path


def test_single_file(data_tree: Path) -> None:
    assert resolve_sources(str(data_tree / "a.json")) == [FileSource(data_tree / "a.json")]


def test_glob(data_tree: Path) -> None:
    assert resolve_sources(str(data_tree / "*.json")) == [
        FileSource(data_tree / "a.json"),
        FileSource(data_tree / "b.json"),
    ]
    recursive = resolve_sources(str(data_tree / "**" / "*.jsonl"))
    assert recursive == [FileSource(data_tree / "nested" / "deeper" / "c.jsonl")]


def test_folder_recurses_and_ignores_non_data_files(data_tree: Path) -> None:
    result = load_examples(str(data_tree / "nested"))
    assert [Path(s.path).name for s in result.sources] == ["c.jsonl", "lines.txt"]
    assert result.formats == {"qa": 1, "text": 2}


def test_comma_list_mixes_files_globs_and_folders_without_repeats(data_tree: Path) -> None:
    spec = f"{data_tree / 'a.json'}, {data_tree / '*.json'},{data_tree / 'nested'}"
    names = [p.path.name for p in resolve_sources(spec) if isinstance(p, FileSource)]
    assert names == ["a.json", "b.json", "c.jsonl", "lines.txt"]
    assert len(load_examples(spec).examples) == 5


def test_hub_name_split_is_recognised_when_no_such_path() -> None:
    assert resolve_sources("tatsu-lab/alpaca:train") == [HubSource("tatsu-lab/alpaca", "train")]
    assert resolve_sources("squad:validation[:10%]") == [HubSource("squad", "validation[:10%]")]


def test_hub_dataset_from_a_local_folder(tmp_path: Path) -> None:
    # `datasets.load_dataset(folder, split=...)` is the same call a hub id takes, minus the network
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"instruction": f"i{n}", "output": f"o{n}"} for n in range(3)])
    result = load_examples(f"{tmp_path / 'ds'}:train")
    assert len(result.examples) == 3
    assert result.sources[0].path == f"hf:{tmp_path / 'ds'}:train"


def test_hub_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = {"question": ["q1?", "q2?"], "answer": ["a1", "a2"]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    result = load_examples(f"{tmp_path / 'saved'}:test")
    assert result.formats == {"qa": 2}
    with pytest.raises(DataError, match="no split 'train'"):
        load_examples(f"{tmp_path / 'saved'}:train")
