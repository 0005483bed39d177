"""data.text_chunking: long documents of format text are split into max_seq_len chunks (the default), not cut off:
continued pre-training keeps every token, each trained exactly once, and the counts are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.data.pipeline import build_datasets
from ft_cli.errors import UserError

IGNORE = -100
runner = CliRunner()


def documents(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def long_text(words: int) -> str:
    return " ".join(f"word{i % 97} is number {i}." for i in range(words))


def full_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


@pytest.mark.parametrize("overlap", [0, 16])
def test_a_long_document_becomes_chunks_that_keep_every_token(tmp_path, data_tokenizer, data_recipe, overlap):
    text = long_text(300)
    doc = full_ids(data_tokenizer, text)
    assert len(doc) > 5 * 128
    recipe = data_recipe(documents(tmp_path / "d.jsonl", [text, "a short one."]), format="text", max_seq_len=128,
                         text_overlap=overlap, shuffle=False)
    bundle = build_datasets(recipe, data_tokenizer)
    rows = [(list(r["input_ids"]), list(r["labels"])) for r in bundle.train]
    chunks = [r for r in rows if len(r[0]) > 10]
    assert all(len(ids) <= 128 for ids, _ in rows)
    # Reassembled: each chunk after the first starts `overlap` tokens before the previous one ended.
    rebuilt = list(chunks[0][0])
    for ids, _ in chunks[1:]:
        assert rebuilt[len(rebuilt) - overlap:] == ids[:overlap] if overlap else True
        rebuilt += ids[overlap:]
    assert rebuilt == doc  # the whole document, eos included: no tail lost
    trained = sum(sum(x != IGNORE for x in labels) for _, labels in chunks)
    # A token is trained at most once; with overlap, every token but the document's first is trained.
    assert trained == (len(doc) - 1 if overlap else len(doc) - len(chunks))
    s = bundle.train_stats
    assert (s.split_documents, s.text_chunks, s.truncated, s.rows_in, s.rows) == (1, len(chunks), 0, 2, len(rows))


def test_a_lone_last_token_is_trained_in_a_two_token_chunk(data_tokenizer, data_recipe, tmp_path):
    from ft_cli.data.encode import EncodeSettings, encode_examples
    from ft_cli.data.formats import Example, Origin

    text = long_text(60)
    n = len(full_ids(data_tokenizer, text))
    enc = encode_examples([Example(None, None, text, Origin("x", 0))], data_tokenizer,
                          EncodeSettings(n - 1, "truncate", False, "split", 0))  # n = (n - 1) + a lone eos
    assert list(enc.lengths) == [n - 1, 2]
    assert list(enc.labels[-2:]) == [IGNORE, data_tokenizer.eos_token_id]  # the end of text trains


def test_truncate_keeps_the_old_behaviour_and_overlap_needs_split(tmp_path, data_tokenizer, data_recipe):
    path = documents(tmp_path / "d.jsonl", [long_text(300)])
    bundle = build_datasets(data_recipe(path, format="text", max_seq_len=128, text_chunking="truncate"),
                            data_tokenizer)
    assert len(bundle.train) == 1 and bundle.train_stats.truncated == 1 and bundle.train_stats.split_documents == 0
    with pytest.raises(UserError, match="data.text_overlap: only applies to text_chunking: split"):
        data_recipe(path, format="text", text_chunking="truncate", text_overlap=8)
    with pytest.raises(UserError, match=r"data.text_overlap: must be less than max_seq_len \(64\), got 64"):
        data_recipe(path, format="text", max_seq_len=64, text_overlap=64)


def test_conversations_are_still_truncated(tmp_path, data_tokenizer, data_recipe):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": long_text(200), "input": "", "output": "ok"}) + "\n")
    bundle = build_datasets(data_recipe(str(path), max_seq_len=128, train_on_inputs=True), data_tokenizer)
    assert len(bundle.train) == 1 and bundle.train_stats.truncated == 1


def test_c4_documents_lose_no_token_and_validate_reports_the_split(tmp_path, shared_data):
    """The public c4 sample: with the default every token of every document is in a row; ft validate says how
    many documents were split into how many chunks."""
    from transformers import AutoTokenizer

    from ft_cli.builtin_models import resolve_builtin

    docs = [json.loads(ln)["text"] for ln in (shared_data / "c4_demo.jsonl").read_text().splitlines()[:60]]
    tok = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    expected = sum(len(full_ids(tok, d)) for d in docs)
    data = documents(tmp_path / "c4.jsonl", docs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": "builtin:tiny-llama"},
                                  "data": {"train": data, "format": "text", "max_seq_len": 256, "val_split": 0,
                                           "cache": False}}))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "documents split into chunks" in ln)
    split_docs, chunks = (int(x.replace(",", "")) for x in line.split("│")[2].replace("examples", "").split("->"))
    assert 0 < split_docs < chunks
    from ft_cli.recipe import load_recipe

    bundle = build_datasets(load_recipe(recipe), tok)
    s = bundle.train_stats
    assert s.split_documents == split_docs and s.rows == len(docs) - split_docs + chunks
    # Every token is in a row; a last chunk that would hold a lone token repeats the one before it as context.
    repeated = s.tokens - expected
    assert 0 <= repeated <= split_docs
    # Untrained: each document's first token, and each later chunk's first token unless it is such a repeat.
    assert s.trained_tokens == expected - len(docs) - (chunks - split_docs) + repeated
