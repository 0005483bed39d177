"""Bad data is the user's fault: one clear UserError (exit 2) naming file:line or record and field (fast)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.data.pipeline import build_datasets
from ft_cli.errors import UserError


def jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def alpaca(i: int) -> dict:
    return {"instruction": f"q{i}", "input": "", "output": f"a{i}"}


def fails(recipe, tokenizer, pattern: str) -> str:
    with pytest.raises(UserError, match=pattern) as err:
        build_datasets(recipe, tokenizer)
    assert err.value.exit_code == 2
    return str(err.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(alpaca(0)) + "\n\n" + '{"instruction": "x", "output": }\n')
    fails(data_recipe(str(path)), data_tokenizer, rf"^{path}:3: invalid JSON: Expecting value \(column 32\)$")


def test_malformed_json_array_names_file_and_line(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    fails(data_recipe(str(path)), data_tokenizer, rf"^{path}:3: invalid JSON: Expecting ',' delimiter")


def test_json_lines_in_a_json_file_are_read(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps(alpaca(i)) + "\n" for i in range(3)))
    assert len(build_datasets(data_recipe(str(path)), data_tokenizer).train) == 3


def test_missing_field_names_file_record_and_field(tmp_path, data_tokenizer, data_recipe):
    records = [alpaca(i) for i in range(10)]
    del records[7]["output"]
    path = jsonl(tmp_path / "data.jsonl", records)
    fails(data_recipe(path), data_tokenizer,
          rf"^{path}:record 7 \(line 8\): missing field 'output' \(format alpaca; map your columns with data.columns\)$")


def test_missing_renamed_field_names_the_users_column(tmp_path, data_tokenizer, data_recipe):
    path = jsonl(tmp_path / "data.jsonl", [{"question": "q"}])
    fails(data_recipe(path, columns={"instruction": "question", "output": "answer"}), data_tokenizer,
          r"record 0 \(line 1\): missing field 'answer' \(format alpaca\)")


def test_missing_field_in_a_json_array_names_the_record(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([alpaca(0), {"instruction": "x"}]))
    fails(data_recipe(str(path)), data_tokenizer, rf"^{path}:record 1: missing field 'output'")


@pytest.mark.parametrize(("fmt", "record", "pattern"), [
    ("alpaca", {"instruction": "q", "output": 42}, r"record 0 \(line 1\): field 'output' must be a string, got int \(42\)"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["only one"]]},
     r"field 'history\[0\]' must be a \[user, assistant\] pair of strings"),
    ("chat", {"messages": "hello"}, r"field 'messages' must be a list of \{role, content\} messages, got str"),
    ("chat", {"messages": [{"role": "user", "content": ["x"]}]}, r"field 'messages\[0\].content' must be a string"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]},
     r"messages\[0\].role: unknown role 'bot' \(allowed: system, user, assistant, tool\)"),
    ("chat", {"messages": [{"content": "x"}]}, r"messages\[0\] has no 'role'"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]},
     r"conversations\[0\].from: unknown role 'robot' \(allowed: human, gpt, system, function_call, observation\)"),
    ("sharegpt", {"conversations": [{"from": "function_call", "value": "{not json"}]},
     r"conversations\[0\].value: a function_call must be the JSON of \{name, arguments\}"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}], "tools": "[oops"},
     r"field 'tools' is not valid JSON"),
    ("text", {"text": None}, r"missing field 'text' \(format text; map your columns"),
    ("text", {"text": ["a"]}, r"field 'text' must be a string, got list"),
])
def test_wrong_types_and_roles(tmp_path, data_tokenizer, data_recipe, fmt, record, pattern):
    path = jsonl(tmp_path / "data.jsonl", [record])
    msg = fails(data_recipe(path, format=fmt), data_tokenizer, pattern)
    assert msg.startswith(f"{path}:record 0 (line 1): ")


def test_record_that_is_not_an_object(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.jsonl"
    path.write_text('["a", "b"]\n')
    fails(data_recipe(str(path)), data_tokenizer, rf"^{path}:1: expected one JSON object per line, got list$")


def test_empty_dataset(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.json"
    path.write_text("[]")
    fails(data_recipe(str(path)), data_tokenizer, rf"^data.train: no records in {path}$")


def test_every_example_dropped_gives_the_counts(tmp_path, data_tokenizer, data_recipe):
    records = [{"instruction": "q", "output": ""}, {"instruction": "q", "output": "  "},
               {"instruction": "long " * 200, "output": "a"}]
    path = jsonl(tmp_path / "data.jsonl", records)
    fails(data_recipe(path, max_seq_len=64), data_tokenizer,
          r"^data.train: every example was dropped \(3 read: 2 with nothing to train on \(no assistant answer or "
          r"blank text\), 1 too long for max_seq_len=64, truncation=truncate\)")


def test_missing_file(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "nope.jsonl"
    fails(data_recipe(str(path)), data_tokenizer, rf"^data.train: file not found: {path}$")
    fails(data_recipe([{"path": jsonl(tmp_path / "ok.jsonl", [alpaca(0)])}, {"path": str(path)}]), data_tokenizer,
          rf"^data.train\[1\]: file not found: {path}$")


def test_unsupported_file_and_empty_directory(tmp_path, data_tokenizer, data_recipe):
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    fails(data_recipe(str(txt)), data_tokenizer, r"unsupported file type '.txt'")
    (tmp_path / "empty").mkdir()
    fails(data_recipe(str(tmp_path / "empty")), data_tokenizer, r"holds no .json, .jsonl, .csv, .tsv, .parquet files")


def test_hub_dataset_offline_fails_at_once_naming_the_id(data_tokenizer, data_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    fails(data_recipe("tatsu-lab/alpaca"), data_tokenizer,
          r"^data.train: 'tatsu-lab/alpaca' is not a local file or directory.*hub is offline \(HF_HUB_OFFLINE=1\)")
    assert time.perf_counter() - start < 2


def test_unknown_column_key(tmp_path, data_tokenizer, data_recipe):
    path = jsonl(tmp_path / "data.jsonl", [alpaca(0)])
    fails(data_recipe(path, columns={"instrution": "q"}), data_tokenizer,
          r"^data.columns: 'instrution' is not a field of format alpaca \(fields: instruction, input, output, system, "
          r"history\)")


def test_bad_csv_row(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nq,a\nq,a,extra\n")
    fails(data_recipe(str(path)), data_tokenizer, rf"^{path}:3: more cells than the header has columns$")


def test_cli_reports_bad_data_in_one_line_with_exit_2(tmp_path):
    records = [alpaca(0), {"instruction": "q"}]
    data = jsonl(tmp_path / "data.jsonl", records)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": data}}))
    result = CliRunner().invoke(app, ["preprocess", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {data}:record 1 (line 2): missing field 'output' (format alpaca; map "
                                     "your columns with data.columns)")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
