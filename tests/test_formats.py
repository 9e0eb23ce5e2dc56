"""Every dataset format, read from real files, becomes the right canonical example."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from llmbox.errors import DataError, UserError
from llmbox_engine.data import Message, load_examples

from conftest import EXAMPLES, write_json, write_jsonl


def test_alpaca_with_and_without_input(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "output": "Hi!", "input": ""},
    ])  # fmt: skip
    examples = load_examples(str(path)).examples
    assert [e.format for e in examples] == ["alpaca", "alpaca"]
    assert examples[0].messages == (
        Message("user", "Translate to French\n\ncat"),
        Message("assistant", "chat"),
    )
    assert examples[1].messages == (Message("user", "Say hi"), Message("assistant", "Hi!"))
    assert examples[0].task == "instruction"


def test_sharegpt_roles_and_system(tmp_path: Path) -> None:
    path = write_json(tmp_path / "s.json", [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello"},
        {"from": "gpt", "value": "Hi."},
        {"from": "user", "value": "Bye"},
        {"from": "bot", "value": "Bye."},
    ]}])  # fmt: skip
    (example,) = load_examples(str(path)).examples
    assert [m.role for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.format == "sharegpt"


def test_openai_messages_keep_system(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    ]}])  # fmt: skip
    (example,) = load_examples(str(path)).examples
    assert example.messages[0] == Message("system", "You are terse.")
    assert example.messages[2] == Message("assistant", "4")


def test_qa_plain_context_and_squad(tmp_path: Path) -> None:
    path = write_json(tmp_path / "q.json", [
        {"question": "Capital of Peru?", "answer": "Lima"},
        {"question": "Who wrote it?", "context": "Hamlet was written by Shakespeare.", "answer": "Shakespeare"},
        {"question": "Colour?", "context": "The sky is blue.", "answers": {"text": ["blue"], "answer_start": [11]}},
    ])  # fmt: skip
    a, b, c = load_examples(str(path)).examples
    assert a.messages == (Message("user", "Capital of Peru?"), Message("assistant", "Lima"))
    assert b.messages[0].content == "Hamlet was written by Shakespeare.\n\nWho wrote it?"
    assert c.messages[1] == Message("assistant", "blue")


def test_completion_is_text_generation_with_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "The capital of France is", "completion": " Paris."}])
    result = load_examples(str(path))
    (example,) = result.examples
    assert (example.prompt, example.text, example.task) == (
        "The capital of France is",
        " Paris.",
        "text-generation",
    )
    assert result.task == "text-generation"


def test_plain_text_one_example_per_nonempty_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    result = load_examples(str(path))
    assert [e.text for e in result.examples] == ["first line", "second line"]
    assert result.task == "text-generation"


def test_vision_image_resolved_relative_to_the_data_file(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "imgs" / "a.png")
    path = write_json(tmp_path / "sub" / ".." / "v.json", [{"image": "imgs/a.png", "caption": "a red dot"}])
    (example,) = load_examples(str(path)).examples
    assert example.images == (str((tmp_path / "imgs" / "a.png").resolve()),)
    assert example.messages[-1] == Message("assistant", "a red dot")


def test_missing_image_is_an_error_naming_the_record(tmp_path: Path) -> None:
    path = write_json(tmp_path / "v.json", [{"image": "nope.png", "caption": "x"}])
    with pytest.raises(DataError, match=r"v\.json: record 1: image not found: .*nope\.png"):
        load_examples(str(path))


def test_csv_and_parquet_columns_fit_a_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with (tmp_path / "a.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Add", "input": "", "output": "done"})
    pq.write_table(pa.table({"question": ["Q1?", "Q2?"], "answer": ["A1", "A2"]}), tmp_path / "q.parquet")
    result = load_examples(f"{tmp_path / 'a.csv'},{tmp_path / 'q.parquet'}")
    assert result.formats == {"alpaca": 1, "qa": 2}
    assert result.examples[0].messages[0].content == "Add"  # the empty input cell adds nothing


def test_json_lines_saved_as_json_are_read(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [e.text for e in load_examples(str(path)).examples] == ["one", "two"]


def test_a_file_may_mix_formats_detected_per_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "i", "output": "o"},
        {"question": "q", "answer": "a"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ])  # fmt: skip
    result = load_examples(str(path))
    assert [e.format for e in result.examples] == ["alpaca", "qa", "openai"]
    assert result.sources[0].format.startswith("mixed (")


def test_dataset_format_forces_one_format(tmp_path: Path) -> None:
    # records carrying `text` and `question`: detection would say qa, the user says text
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a", "text": "raw"}])
    assert load_examples(str(path)).examples[0].format == "qa"
    assert load_examples(str(path), dataset_format="text").examples[0].text == "raw"
    with pytest.raises(
        DataError, match=r"f\.jsonl: record 1 \(line 1\): missing field 'instruction' \(alpaca format\)"
    ):
        load_examples(str(path), dataset_format="alpaca")
    with pytest.raises(UserError, match="unknown dataset format 'yaml'"):
        load_examples(str(path), dataset_format="yaml")


def test_exact_duplicates_are_removed_and_counted(tmp_path: Path) -> None:
    record = {"instruction": "i", "output": "o"}
    a = write_json(tmp_path / "a.json", [record, record, {"instruction": "j", "output": "o"}])
    b = write_jsonl(tmp_path / "b.jsonl", [record])
    result = load_examples(f"{a},{b}")
    assert len(result.examples) == 2
    assert result.duplicates == 2


def test_max_examples_is_a_seeded_sample(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(50)])
    first = [e.text for e in load_examples(str(path), max_examples=10, seed=1).examples]
    again = [e.text for e in load_examples(str(path), max_examples=10, seed=1).examples]
    other = [e.text for e in load_examples(str(path), max_examples=10, seed=2).examples]
    assert len(first) == 10 and first == again and first != other


def test_bundled_examples_cover_every_format() -> None:
    result = load_examples(str(EXAMPLES))
    assert set(result.formats) == {"alpaca", "sharegpt", "openai", "qa", "completion", "text", "vision"}
    assert result.duplicates == 0
    assert result.images == result.formats["vision"]
