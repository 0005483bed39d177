"""The pipeline around the masks: sources and file types, mixing, eval split, truncation, the cache, `ft
preprocess`, `ft eval --data` loading and the `ft validate` audit (seconds)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.data import pipeline
from ft_cli.data.pipeline import build_datasets, load_eval_data

IGNORE = -100


def jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def alpaca(i: int, tag: str = "") -> dict:
    return {"instruction": f"{tag}question {i}", "input": "", "output": f"{tag}answer {i}"}


def decoded(tok, ds) -> list[str]:
    return [tok.decode(ids) for ids in ds["input_ids"]]


# File types and sources ------------------------------------------------------------------------------------------

def test_every_file_type_and_directories_give_the_same_rows(tmp_path, data_tokenizer, data_recipe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [alpaca(i) for i in range(6)]
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d" / "a.jsonl", records[:2])
    (tmp_path / "d" / "b.json").write_text(json.dumps(records[2:4]))
    pq.write_table(pa.Table.from_pylist(records[4:5]), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "e.csv").write_text('instruction,input,output\n"question 5",,"answer 5"\n')
    (tmp_path / "d" / "notes.md").write_text("ignored")
    from_dir = decoded(data_tokenizer, build_datasets(data_recipe(str(tmp_path / "d")), data_tokenizer).train)
    reference = jsonl(tmp_path / "all.jsonl", records)
    assert from_dir == decoded(data_tokenizer, build_datasets(data_recipe(reference), data_tokenizer).train)
    assert len(from_dir) == 6


def test_weights_mix_sources_in_proportion(tmp_path, data_tokenizer, data_recipe):
    a = jsonl(tmp_path / "a.jsonl", [alpaca(i, "A ") for i in range(100)])
    b = jsonl(tmp_path / "b.jsonl", [alpaca(i, "B ") for i in range(100)])
    recipe = data_recipe([{"path": a, "weight": 3}, {"path": b, "weight": 1}])
    bundle = build_datasets(recipe, data_tokenizer)
    texts = decoded(data_tokenizer, bundle.train)
    from_a = [t for t in texts if "A question" in t]
    assert len(texts) == 200 and len(from_a) == 150  # 3:1 of the 200 rows the sources hold together
    assert len(set(from_a)) == 100  # upsampled: every A row at least once, 50 drawn again
    assert len({t for t in texts if "B question" in t}) == 50  # downsampled without replacement
    assert [s["rows"] for s in bundle.train_stats.sources] == [150, 50]
    assert texts == decoded(data_tokenizer, build_datasets(recipe, data_tokenizer).train)  # seeded
    other_seed = data_recipe([{"path": a, "weight": 3}, {"path": b, "weight": 1}], train_section={"seed": 7})
    assert texts != decoded(data_tokenizer, build_datasets(other_seed, data_tokenizer).train)


def test_without_weights_every_row_is_used_once(tmp_path, data_tokenizer, data_recipe):
    a = jsonl(tmp_path / "a.jsonl", [alpaca(i, "A ") for i in range(30)])
    b = jsonl(tmp_path / "b.jsonl", [alpaca(i, "B ") for i in range(10)])
    texts = decoded(data_tokenizer, build_datasets(data_recipe([{"path": a}, {"path": b}]), data_tokenizer).train)
    assert len(texts) == len(set(texts)) == 40


def test_val_split_is_seeded_and_disjoint(tmp_path, data_tokenizer, data_recipe):
    path = jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(100)])
    bundle = build_datasets(data_recipe(path, val_split=0.1), data_tokenizer)
    train, held = decoded(data_tokenizer, bundle.train), decoded(data_tokenizer, bundle.eval)
    assert (len(train), len(held)) == (90, 10) and not set(train) & set(held)
    assert bundle.eval_stats.rows == 10 and bundle.train_stats.rows == 90
    again = build_datasets(data_recipe(path, val_split=0.1), data_tokenizer)
    assert decoded(data_tokenizer, again.eval) == held


def test_eval_file_and_no_eval(tmp_path, data_tokenizer, data_recipe):
    path = jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(10)])
    ev = jsonl(tmp_path / "e.jsonl", [alpaca(i, "E ") for i in range(3)])
    bundle = build_datasets(data_recipe(path, eval=ev, val_split=0.5, packing=True), data_tokenizer)
    assert len(bundle.train_stats.sources) == 1 and bundle.train_stats.rows == 10  # val_split unused with eval
    assert len(bundle.eval) == 3 and "position_ids" not in bundle.eval.column_names  # eval is never packed
    no_eval = build_datasets(data_recipe(path), data_tokenizer)
    assert no_eval.eval is None and no_eval.eval_stats is None


# Truncation ------------------------------------------------------------------------------------------------------

def test_truncate_keeps_the_first_tokens_and_drops_examples_left_without_trained_tokens(
        tmp_path, data_tokenizer, data_recipe):
    records = [{"instruction": "short", "output": "word " * 200},  # answer cut: kept, truncated
               {"instruction": "long " * 200, "output": "lost"},  # answer beyond the limit: dropped
               {"instruction": "fits", "output": "yes"}]
    path = jsonl(tmp_path / "a.jsonl", records)
    bundle = build_datasets(data_recipe(path, max_seq_len=64), data_tokenizer)
    s = bundle.train_stats
    assert (s.rows_in, s.rows, s.truncated, s.dropped_too_long, s.dropped_empty) == (3, 2, 1, 1, 0)
    assert all(len(ids) <= 64 for ids in bundle.train["input_ids"])
    first = bundle.train[0]
    assert len(first["input_ids"]) == 64 and first["labels"][-1] != IGNORE  # the kept part is trained


def test_drop_removes_every_over_long_example(tmp_path, data_tokenizer, data_recipe):
    records = [{"instruction": "short", "output": "word " * 200}, {"instruction": "fits", "output": "yes"}]
    bundle = build_datasets(data_recipe(jsonl(tmp_path / "a.jsonl", records), max_seq_len=64, truncation="drop"),
                            data_tokenizer)
    s = bundle.train_stats
    assert (s.rows, s.truncated, s.dropped_too_long) == (1, 0, 1)


def test_empty_answers_are_counted_not_trained(tmp_path, data_tokenizer, data_recipe):
    records = [alpaca(0), {"instruction": "q", "output": ""}]
    s = build_datasets(data_recipe(jsonl(tmp_path / "a.jsonl", records)), data_tokenizer).train_stats
    assert (s.rows_in, s.rows, s.dropped_empty) == (2, 1, 1)


# Cache -------------------------------------------------------------------------------------------------------------

def test_second_build_loads_the_cache_without_tokenizing(tmp_path, data_tokenizer, data_recipe, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    path = jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(20)])
    first = build_datasets(data_recipe(path, cache=True, packing=True, val_split=0.2), data_tokenizer)
    assert not first.from_cache and len(list((tmp_path / "cache" / "data").iterdir())) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache entry")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "encode_examples", refuse)
        second = build_datasets(data_recipe(path, cache=True, packing=True, val_split=0.2), data_tokenizer)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.train["position_ids"] == first.train["position_ids"]
    assert second.eval["labels"] == first.eval["labels"]
    assert second.train_stats == first.train_stats

    # anything that changes the tokens changes the key
    keys = {first.fingerprint}
    for recipe in (data_recipe(path, cache=True, packing=True, val_split=0.2, max_seq_len=512),
                   data_recipe(path, cache=True, packing=False, val_split=0.2),
                   data_recipe(path, cache=True, packing=True, val_split=0.2, train_on_inputs=True),
                   data_recipe(path, cache=True, packing=True, val_split=0.2, chat_template="llama3")):
        keys.add(build_datasets(recipe, data_tokenizer).fingerprint)
    Path(path).write_text(Path(path).read_text().replace("answer 3", "answer 4"))
    keys.add(build_datasets(data_recipe(path, cache=True, packing=True, val_split=0.2), data_tokenizer).fingerprint)
    assert len(keys) == 6


def test_cache_off_writes_nothing(tmp_path, data_tokenizer, data_recipe, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    build_datasets(data_recipe(jsonl(tmp_path / "a.jsonl", [alpaca(0)]), cache=False), data_tokenizer)
    assert not (tmp_path / "cache").exists()


def test_only_the_main_process_builds(tmp_path, data_tokenizer, data_recipe, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    entered = []

    @contextlib.contextmanager
    def main_process_first():
        entered.append(True)
        yield

    build_datasets(data_recipe(jsonl(tmp_path / "a.jsonl", [alpaca(0)]), cache=True), data_tokenizer,
                   main_process_first=main_process_first)
    assert entered == [True]


# ft preprocess, ft eval --data, ft validate ---------------------------------------------------------------------

def _recipe_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny-llama"}, "data": data}))
    return path


def test_preprocess_writes_a_dataset_that_load_from_disk_reads(tmp_path, shared_data, data_tokenizer):
    from datasets import load_from_disk

    recipe = _recipe_file(tmp_path, {"train": str(shared_data / "alpaca_en_demo.json"), "packing": True,
                                     "max_seq_len": 1024, "cache": False})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["preprocess", str(recipe), "--out", str(out), "--set", "data.val_split=0.1"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "packed into" in result.stdout
    dsd = load_from_disk(str(out))
    assert set(dsd) == {"train", "eval"}
    assert dsd["train"].column_names == ["input_ids", "labels", "position_ids"]
    assert dsd["eval"].column_names == ["input_ids", "labels"]
    assert max(len(x) for x in dsd["train"]["input_ids"]) <= 1024
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train_stats"]["packing_efficiency"] >= 0.97 and stats["eval_stats"]["rows"] == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_preprocess_refuses_a_non_empty_out(tmp_path):
    recipe = _recipe_file(tmp_path, {"train": jsonl(tmp_path / "a.jsonl", [alpaca(0)])})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["preprocess", str(recipe), "--out", str(out)])
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_preprocess_into_an_empty_directory(tmp_path):
    recipe = _recipe_file(tmp_path, {"train": jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(4)]),
                                     "val_split": 0.0, "cache": False})
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(app, ["preprocess", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    from datasets import load_from_disk

    assert list(load_from_disk(str(tmp_path / "out"))) == ["train"]


def test_load_eval_data_masks_like_training(tmp_path, data_tokenizer, data_recipe):
    path = jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(5)])
    recipe = data_recipe(path, packing=True)
    ds = load_eval_data(path, recipe, data_tokenizer)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 5
    trained = [data_tokenizer.decode([i for i, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != IGNORE])
               for r in ds]
    assert trained == [f"answer {i}<|im_end|>\n" for i in range(5)]


def test_audit_reports_counts_histogram_and_highlighted_samples(tmp_path, data_tokenizer, data_recipe):
    from rich.console import Console

    from ft_cli.data.audit import MASKED_STYLE, TRAINED_STYLE, highlight_tokens, print_data_report

    records = [alpaca(i) for i in range(20)] + [{"instruction": "q", "output": ""}]
    bundle = build_datasets(data_recipe(jsonl(tmp_path / "a.jsonl", records), packing=True, val_split=0.2),
                            data_tokenizer)
    console = Console(record=True, width=120)
    print_data_report(bundle, data_tokenizer, console, show=2)
    out = console.export_text()
    for text in ("records read", "trained tokens", "dropped: nothing to train on", "packing efficiency",
                 "train example lengths", "#", "example 0", "example 1", "answer"):
        assert text in out
    row = bundle.train[0]
    text = highlight_tokens(data_tokenizer, row["input_ids"], row["labels"])
    styled = {(text.plain[s.start:s.end], s.style) for s in text.spans}
    assert any(style == TRAINED_STYLE and "<|im_end|>" in piece for piece, style in styled)
    assert any(style == MASKED_STYLE and "<|im_start|>user" in piece for piece, style in styled)


# The tokenizing pass's shortcuts give what the plain path gives ---------------------------------------------------

def _encoded_fields(enc) -> dict:
    return {"ids": enc.ids.tolist(), "labels": enc.labels.tolist(), "lengths": enc.lengths.tolist(),
            "cut": enc.cut.tolist(), "kept": enc.kept.tolist(), "counts": (enc.dropped_too_long, enc.dropped_empty,
                                                                         enc.truncated, enc.rows_in)}


def _real_examples(shared_data: Path) -> list:
    from ft_cli.data.formats import Origin, make_converter

    alpaca_rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:150]
    tool_rows = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text())[:50]
    return ([make_converter("alpaca", None)(r, Origin("a", i)) for i, r in enumerate(alpaca_rows)]
            + [make_converter("sharegpt", None)(r, Origin("g", i)) for i, r in enumerate(tool_rows)])


@pytest.mark.parametrize("max_len", [64, 200, 2048])
@pytest.mark.parametrize("truncation", ["truncate", "drop"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_chunks_of_conversations_label_as_row_by_row(shared_data, data_tokenizer, monkeypatch, max_len, truncation,
                                                     train_on_inputs):
    """Conversations that need no BOS are labelled on flat arrays (_Labeler._add_conversations); the result -
    ids, labels, lengths, which rows were cut or kept and every count - equals the row-by-row path's, on real
    alpaca and multi-turn tool-call data, for each truncation setting and train_on_inputs."""
    from ft_cli.data import encode

    examples = _real_examples(shared_data)
    settings = encode.EncodeSettings(max_len, truncation, train_on_inputs)
    fast = _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings))
    monkeypatch.setattr(encode._Labeler, "add", encode._Labeler._add_rows)
    assert fast == _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings))
    assert fast["counts"][0] + fast["counts"][2] > 0 or max_len == 2048  # the cases cut or drop something


def test_nfc_texts_skip_the_normalizer_with_the_same_result(data_tokenizer, monkeypatch):
    """With a full first chunk, texts already in NFC are tokenized by a copy of the backend without its NFC
    normalizer; a chunk holding a text that is not NFC uses the normalizer. Both give what the normalizing
    backend gives."""
    import unicodedata

    from ft_cli.data import batch_tokenizer, encode
    from ft_cli.data.formats import Origin, make_converter

    convert = make_converter("alpaca", None)
    records = [{"instruction": f"question {i}", "input": "", "output": f"caf\u00e9 answer {i}"}
               for i in range(2 * encode.CHUNK + 100)]
    records[-5]["output"] = "cafe\u0301 decomposed"  # not NFC: the normalizer composes it
    assert not unicodedata.is_normalized("NFC", records[-5]["output"])
    examples = [convert(r, Origin("x", i)) for i, r in enumerate(records)]
    settings = encode.EncodeSettings(128, "truncate", False)
    copy_used = []
    real_free = batch_tokenizer.BatchEncoder._nfc_free

    class Spy:
        def __init__(self, backend):
            self.backend = backend

        def encode_batch(self, texts, **kwargs):
            copy_used.append(len(texts))
            return self.backend.encode_batch(texts, **kwargs)

    monkeypatch.setattr(batch_tokenizer.BatchEncoder, "_nfc_free", lambda self, texts: Spy(real_free(self, texts)))
    got = _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings))
    assert copy_used == [encode.CHUNK]  # chunk 1 checks the backend, chunk 2 takes the copy, chunk 3 is not NFC
    monkeypatch.setattr(batch_tokenizer.BatchEncoder, "_nfc_free", lambda self, texts: None)
    assert got == _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings))
    composed = data_tokenizer("caf\u00e9 decomposed", add_special_tokens=False).input_ids
    flat = got["ids"]
    assert any(flat[i:i + len(composed)] == composed for i in range(len(flat)))  # the normalizer ran on it


def test_big_data_tokenized_by_forked_workers_gives_the_one_process_result(shared_data, data_tokenizer,
                                                                           monkeypatch):
    """On big data ft forks a tokenizing worker per core, each on a contiguous part; joined in order, the result
    equals one process's (ids, labels, lengths, cut and kept rows, every count), and a record's error from a worker
    reaches the user as the same message."""
    from ft_cli.data import encode
    from ft_cli.errors import UserError

    examples = _real_examples(shared_data) + [None]  # a record that converted to nothing counts as dropped
    settings = encode.EncodeSettings(200, "truncate", False)
    one = _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings))
    forks = []
    real_forked = encode._encode_forked
    monkeypatch.setattr(encode, "_processes", lambda live: 3)
    monkeypatch.setattr(encode, "_encode_forked", lambda *a: (forks.append(a[4]), real_forked(*a))[1])
    assert _encoded_fields(encode.encode_examples(examples, data_tokenizer, settings)) == one
    assert forks == [3]

    real = encode.ChatRenderer.conversation
    target = examples[170]  # in the second of three parts

    def refuse(self, ex):
        if ex is target:
            raise UserError(f"{ex.origin}: the template refuses this record")
        return real(self, ex)

    monkeypatch.setattr(encode.ChatRenderer, "conversation", refuse)
    with pytest.raises(UserError, match="refuses this record"):
        encode.encode_examples(examples, data_tokenizer, settings)
