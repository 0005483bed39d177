"""`ft cache list | size | clean`: ft's cache under $FT_CACHE_DIR; clean deletes only what ft wrote."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ft_cli.cli import app

runner = CliRunner()
OLD = time.time() - 90 * 86400


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, data_tokenizer, data_recipe):
    """A private cache with two tokenized-data entries, a DPO reference entry, a built-in model, leftovers (named as
    ft 0.2 and as ft now names them) and things ft did not write."""
    from ft_cli.data.pipeline import build_datasets
    from ft_cli.reference import save_entry

    root = tmp_path / "ft-cache"
    monkeypatch.setenv("FT_CACHE_DIR", str(root))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q {i}", "output": f"a {i}"}) + "\n" for i in range(10)))
    for max_len in (64, 128):  # two settings: two entries
        build_datasets(data_recipe(str(data), cache=True, max_seq_len=max_len), data_tokenizer)
    shutil.copytree(tiny_llama_dir, root / "builtin" / tiny_llama_dir.name)
    entries = sorted((root / "data").iterdir())
    os.utime(entries[0] / "meta.json", (OLD, OLD))  # not used for 90 days
    old_tmp = root / "data" / f".tmp-{'a' * 24}-123-{'b' * 8}"
    young_tmp = root / "data" / f".tmp-{'c' * 24}-456-{'d' * 8}"
    for t in (old_tmp, young_tmp):
        (t / "dataset").mkdir(parents=True)
        (t / "dataset" / "part.arrow").write_bytes(b"x" * 100)
    os.utime(old_tmp, (OLD, OLD))
    save_entry("0" * 24, [-1.5, -2.0], [-3.0, -4.5], {"model": "builtin:tiny-llama", "pairs": 2})
    old_ref_tmp = root / "reference" / f".{'9' * 24}.ft-tmp-4242-0a1b2c3d"  # a writer killed 90 days ago
    old_ref_tmp.mkdir()
    (old_ref_tmp / "logps.npy").write_bytes(b"x" * 10)
    os.utime(old_ref_tmp, (OLD, OLD))
    mine = tmp_path / "my-precious"  # a user's directory, shaped like an entry, reached by a symlink
    (mine / "dataset").mkdir(parents=True)
    (mine / "meta.json").write_text("{}")
    (root / "data" / ("e" * 24)).symlink_to(mine)
    (root / "data" / ("f" * 24)).mkdir()  # named like an entry but without ft's meta.json
    (root / "data" / "notes.txt").write_text("mine")
    (root / "other-tool").mkdir()
    return {"root": root, "data": entries, "old_tmp": old_tmp, "young_tmp": young_tmp, "mine": mine,
            "builtin": root / "builtin" / tiny_llama_dir.name, "reference": root / "reference" / ("0" * 24),
            "old_ref_tmp": old_ref_tmp}


def test_list_and_size(cache) -> None:
    result = runner.invoke(app, ["cache", "list"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "7 entries" in flat and "builtin:tiny-llama" in flat and "d.jsonl" in flat
    assert "DPO reference log-probabilities: builtin:tiny-llama on 2 pairs" in flat
    assert "not ft's, left alone:" in flat and "notes.txt" in flat and "other-tool" in flat
    result = runner.invoke(app, ["cache", "size"])
    assert result.exit_code == 0
    data_line = next(ln for ln in result.output.splitlines() if ln.startswith("data"))
    assert "(2 entries)" in data_line and "leftover" in result.output
    leftover_line = next(ln for ln in result.output.splitlines() if ln.startswith("leftover"))
    assert "(3 entries)" in leftover_line  # .tmp-KEY-PID-XXXX (ft 0.2) and .KEY.ft-tmp-PID-XXXX (ft_cli.atomic)
    assert "(1 entries)" in next(ln for ln in result.output.splitlines() if ln.startswith("reference"))


def test_clean_deletes_only_what_ft_wrote(cache) -> None:
    root = cache["root"]
    before = sorted(p.name for p in (root / "data").iterdir())
    result = runner.invoke(app, ["cache", "clean", "--dry-run"])
    assert result.exit_code == 0 and "would delete 6 entries" in result.output
    assert sorted(p.name for p in (root / "data").iterdir()) == before  # a dry run deletes nothing

    result = runner.invoke(app, ["cache", "clean", "--kind", "data", "--older-than", "30"])
    assert result.exit_code == 0, result.output
    assert not cache["data"][0].exists() and cache["data"][1].exists()  # only the entry unused for 90 days

    result = runner.invoke(app, ["cache", "clean"])
    assert result.exit_code == 0, result.output
    assert not cache["data"][1].exists() and not cache["builtin"].exists() and not cache["old_tmp"].exists()
    assert not cache["reference"].exists() and not cache["old_ref_tmp"].exists()
    assert cache["young_tmp"].exists()  # may belong to a process writing it right now
    assert (cache["mine"] / "meta.json").is_file() and (root / "data" / ("e" * 24)).is_symlink()
    assert (root / "data" / ("f" * 24)).is_dir() and (root / "data" / "notes.txt").read_text() == "mine"
    assert (root / "other-tool").is_dir()
    result = runner.invoke(app, ["cache", "clean", "--kind", "models"])
    assert result.exit_code == 2 and "--kind: must be one of data, reference, builtin, leftover" in result.output


def test_a_cleaned_cache_is_rebuilt_and_use_is_recorded(cache, tmp_path, data_tokenizer, data_recipe) -> None:
    from ft_cli.data.pipeline import build_datasets

    assert runner.invoke(app, ["cache", "clean", "--kind", "data"]).exit_code == 0
    recipe = data_recipe(str(tmp_path / "d.jsonl"), cache=True, max_seq_len=64)
    assert build_datasets(recipe, data_tokenizer).from_cache is False  # rebuilt
    (entry,) = [p for p in (cache["root"] / "data").iterdir() if (p / "meta.json").is_file() and not p.is_symlink()]
    os.utime(entry / "meta.json", (OLD, OLD))
    assert build_datasets(recipe, data_tokenizer).from_cache is True
    assert time.time() - (entry / "meta.json").stat().st_mtime < 600  # a cache hit counts as a use
