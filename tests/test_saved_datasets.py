"""Datasets saved with `datasets.save_to_disk` as data sources: raw records (a Dataset or a split of a
DatasetDict), and `ft preprocess`'s own tokenized output, used as it is once its tokenizer is checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.data.pipeline import build_datasets
from ft_cli.errors import UserError

runner = CliRunner()


def alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer number {i}"}


def save(records: list[dict], path: Path, splits: dict[str, slice] | None = None) -> Path:
    import datasets

    ds = datasets.Dataset.from_list(records)
    if splits is None:
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({name: ds.select(range(len(records))[s]) for name, s in splits.items()}).save_to_disk(
            str(path))
    return path


def ids_of(bundle) -> list[list[int]]:
    return list(bundle.train["input_ids"])


def test_a_saved_dataset_of_records_is_read_like_a_file(tmp_path, data_tokenizer, data_recipe):
    records = [alpaca(i) for i in range(12)]
    (tmp_path / "rows.json").write_text(json.dumps(records))
    reference = ids_of(build_datasets(data_recipe(str(tmp_path / "rows.json")), data_tokenizer))
    single = save(records, tmp_path / "single")
    assert ids_of(build_datasets(data_recipe(str(single)), data_tokenizer)) == reference
    both = save(records, tmp_path / "dict", {"train": slice(0, 12), "validation": slice(0, 3)})
    assert ids_of(build_datasets(data_recipe(str(both)), data_tokenizer)) == reference  # split train by default
    chosen = data_recipe([{"path": str(both), "split": "validation"}])
    assert ids_of(build_datasets(chosen, data_tokenizer)) == reference[:3]
    with pytest.raises(UserError, match=r"no split 'test' \(splits: train, validation\)"):
        build_datasets(data_recipe([{"path": str(both), "split": "test"}]), data_tokenizer)


def test_a_bad_record_in_a_saved_dataset_names_the_dataset_and_the_record(tmp_path, data_tokenizer, data_recipe):
    saved = save([alpaca(0), {"instruction": "no output here", "input": "", "output": None}], tmp_path / "bad")
    with pytest.raises(UserError, match=r"bad:record 1: missing field 'output'"):
        build_datasets(data_recipe(str(saved)), data_tokenizer)


@pytest.fixture
def preprocessed(tmp_path: Path, alpaca_file: Path) -> tuple[Path, Path]:
    """(recipe, ft preprocess output) for 48 alpaca rows, packed, with an eval split."""
    data = tmp_path / "train.json"
    data.write_text(json.dumps(json.loads(alpaca_file.read_text())[:48]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}, "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_seq_len": 128, "packing": True, "val_split": 0.125},
        "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_ratio": 0.0,
                  "eval_every": 3, "save_every": 100, "log_every": 1}}))
    out = tmp_path / "tokenized"
    result = runner.invoke(app, ["preprocess", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return recipe, out


def test_preprocess_output_is_used_as_is_and_trains_exactly_like_the_raw_data(preprocessed, tmp_path):
    from datasets import load_from_disk

    recipe, out = preprocessed
    meta = json.loads((out / "stats.json").read_text())
    assert meta["tokenizer_vocab"] and meta["settings"]["packing"] is True  # what the rows were made with
    saved = load_from_disk(str(out))
    losses = {}
    for name, extra in (("raw", []), ("tokenized", ["--set", f"data.train={out}"])):
        run = tmp_path / f"run-{name}"
        result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(run), *extra])
        assert result.exit_code == 0, result.output
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [ln.get("loss", ln.get("eval_loss")) for ln in lines]
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["data"]["train"]["tokens"] == sum(len(r) for r in saved["train"]["input_ids"])
    assert losses["tokenized"] == pytest.approx(losses["raw"], rel=1e-6, abs=1e-7)
    assert "warning" not in result.output  # same tokenizer, same settings: nothing to warn about


def test_preprocess_output_is_refused_for_another_tokenizer(preprocessed, tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    recipe, out = preprocessed
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<|a new token|>"])  # one more token: ids mean other things
    tok.save_pretrained(other)
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run"),
                                 "--set", f"data.train={out}", "--set", f"model.name_or_path={other}"])
    assert result.exit_code == 2, result.output
    assert "tokenized with a different tokenizer (builtin:tiny-llama)" in result.output
    assert not (tmp_path / "run").exists()


def test_preprocess_output_must_fit_the_recipe(preprocessed, data_tokenizer):
    from ft_cli.recipe import load_recipe

    recipe_path, out = preprocessed
    unpacked = load_recipe(recipe_path, [f"data.train={out}", "data.packing=false"])
    with pytest.raises(UserError, match=r"data.packing: .* holds packed rows \(position_ids\)"):
        build_datasets(unpacked, data_tokenizer)
    short = load_recipe(recipe_path, [f"data.train={out}", "data.max_seq_len=16"])
    with pytest.raises(UserError, match=r"data.max_seq_len: 16 is shorter than the rows of"):
        build_datasets(short, data_tokenizer)
    changed = load_recipe(recipe_path, [f"data.train={out}", "data.train_on_inputs=true"])
    bundle = build_datasets(changed, data_tokenizer)  # used as it is, and said so
    assert any("data.train_on_inputs: True here, False when preprocessed" in w for w in bundle.warnings)
    mixed = load_recipe(recipe_path, [f"data.train=[{{path: {out}}}, {{path: {recipe_path.parent / 'train.json'}}}]"])
    with pytest.raises(UserError, match="must be the only training source"):
        build_datasets(mixed, data_tokenizer)


def test_tokenized_rows_from_elsewhere_are_checked_and_packed_on_request(tmp_path, data_tokenizer, data_recipe):
    import datasets

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    plain = tmp_path / "plain"
    datasets.Dataset.from_list(rows).save_to_disk(str(plain))
    bundle = build_datasets(data_recipe(str(plain), max_seq_len=8, packing=True), data_tokenizer)
    assert list(bundle.train["input_ids"]) == [[5, 6, 7, 8, 9, 10]]  # packed here, as data.packing asks
    assert list(bundle.train["position_ids"]) == [[0, 1, 2, 3, 0, 1]]
    assert bundle.train_stats.rows == 2 and bundle.train_stats.trained_tokens == 3
    assert any("can only check that the ids fit the vocabulary" in w for w in bundle.warnings)
    no_labels = tmp_path / "no-labels"
    datasets.Dataset.from_list([{"input_ids": [5, 6]}]).save_to_disk(str(no_labels))
    with pytest.raises(UserError, match="no labels column"):
        build_datasets(data_recipe(str(no_labels)), data_tokenizer)
    too_big = tmp_path / "too-big"
    datasets.Dataset.from_list([{"input_ids": [5, 10**6], "labels": [-100, 10**6]}]).save_to_disk(str(too_big))
    with pytest.raises(UserError, match=r"token id 1000000, but the recipe's tokenizer has \d+ tokens"):
        build_datasets(data_recipe(str(too_big)), data_tokenizer)


def test_eval_data_can_be_preprocess_output(preprocessed, tmp_path):
    recipe, out = preprocessed
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(recipe), "--output-dir", str(run)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(run), "--data", str(out / "eval")])
    assert result.exit_code == 0, result.output
    own = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else None
    scored = json.loads((run / "eval-eval.json").read_text())
    assert scored["examples"] == 6 and scored["tokens"] > 0
    assert own is None  # --data never writes the default eval.json
    default = runner.invoke(app, ["eval", str(run)])
    assert default.exit_code == 0
    assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(scored["loss"], rel=1e-6)
