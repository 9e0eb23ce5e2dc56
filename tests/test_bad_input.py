"""Bad input ends in one `error:` line naming the file and what is wrong, a non-zero exit, no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmbox.errors import DataError
from llmbox_engine.data import load_examples

from conftest import run_llmbox, write_json, write_jsonl


def assert_one_error_line(args: list[str], *expected: str, env: dict[str, str] | None = None) -> str:
    proc = run_llmbox("data", *args, env=env)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    assert_one_error_line(["--data", str(path)], "broken.json: line 3: malformed JSON")


def test_malformed_jsonl_names_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    assert_one_error_line(["--data", str(path)], "broken.jsonl: record 2 (line 3): malformed JSON")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "file is empty"),
        ("   \n", "file is empty"),
        ("[]", "the JSON array is empty"),
        ('{"a": 1}', "single object"),
    ],
)
def test_empty_or_shapeless_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(content)
    assert_one_error_line(["--data", str(path)], "data.json", message)


def test_empty_folder_and_folder_without_data(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_error_line(["--data", str(tmp_path / "empty")], "empty: the folder is empty")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    assert_one_error_line(["--data", str(tmp_path / "pics")], "pics: the folder holds no data files")


def test_glob_matching_nothing(tmp_path: Path) -> None:
    assert_one_error_line(["--data", str(tmp_path / "*.json")], "*.json: the glob matched no files")


def test_missing_path() -> None:
    assert_one_error_line(["--data", "no/such/file.json"], "no/such/file.json: no such file or folder")


def test_missing_field_names_record_and_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "only"}])
    assert_one_error_line(["--data", str(path)], "a.json: record 2: missing field 'output' (alpaca format)")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "x", "output": 5}, "field 'output' must be a string, got a number"),
        ({"messages": "hi"}, "field 'messages' must be a list, got a string"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "q"}]}, "unknown role 'robot'"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
        ({"question": "q", "answers": {"text": []}}, "field 'answers' must hold a non-empty list"),
        ({"instruction": "   ", "output": "y"}, "field 'instruction' is empty"),
        (["not", "an", "object"], "a record must be a JSON object, got a list"),
    ],
)
def test_wrong_types(tmp_path: Path, record: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 1 \(line 1\): .*" + re.escape(message)):
        load_examples(str(path))


def test_wrong_type_through_the_cli(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": ["a", "list"]}])
    assert_one_error_line(["--data", str(path)], "bad.jsonl: record 2 (line 2): field 'text' must be a string")


def test_unknown_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "odd.json", [{"foo": 1, "bar": 2}])
    line = assert_one_error_line(["--data", str(path)], "odd.json: record 1: no known format fits this record")
    assert "bar, foo" in line and "alpaca" in line
    assert_one_error_line(["--data", str(path), "--dataset-format", "yaml"], "unknown dataset format 'yaml'")


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.json"
    path.write_bytes(b"\x00\x01\x02GGUF" + bytes(range(256)))
    assert_one_error_line(["--data", str(path)], "weights.json: binary file")


def test_unsupported_file_type_given_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    assert_one_error_line(["--data", str(path)], "data.xml: unsupported file type '.xml'")


def test_missing_image(tmp_path: Path) -> None:
    path = write_json(tmp_path / "v.json", [{"image": "gone.png", "caption": "c"}])
    assert_one_error_line(["--data", str(path)], "v.json: record 1: image not found", "gone.png")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root reads any file whatever its mode, so the permission error is simulated where the read happens
    path = write_jsonl(tmp_path / "secret.jsonl", [{"text": "x"}])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=r"secret\.jsonl: cannot read the file: permission denied"):
        load_examples(str(path))


def test_unreachable_hub_dataset(tmp_path: Path) -> None:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    assert_one_error_line(
        ["--data", "hf-no-such-org/nothing:train"], "nothing:train: cannot load the dataset", env=offline
    )


def test_one_bad_file_in_a_folder_fails_loudly_unless_skipping_is_asked(tmp_path: Path) -> None:
    write_json(tmp_path / "good.json", [{"instruction": f"i{n}", "output": "o"} for n in range(4)])
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"text": 3}, {"nothing": "here"}, {"text": "also fine"}])
    assert_one_error_line(["--data", str(tmp_path)], "mixed.jsonl: record 2 (line 2)")
    result = load_examples(str(tmp_path), skip_bad_records=True)
    assert result.skipped == 2 and len(result.examples) == 6
    proc = run_llmbox("data", "--data", str(tmp_path), "--skip-bad-records", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"skipped_records": 2' in proc.stdout


def test_a_file_of_only_bad_records_fails_even_when_skipping(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "all_bad.jsonl", [{"nothing": 1}, {"text": 2}])
    assert_one_error_line(
        ["--data", str(tmp_path), "--skip-bad-records"], "all_bad.jsonl: no usable records (2 skipped"
    )
