"""ft export on a tiny LoRA run of the built-in Llama (CPU, offline).

Each format is loaded the way its users load it (transformers' from_pretrained, transformers' GGUF loader,
llama.cpp through llama-cpp-python) and compared with the 16-bit merge: logits, greedy continuations, and the
eval loss export.json reports, recomputed by hand. Refusals exit 3 with nothing written; bad input exits 2.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.test_eval_merge_generate import hand_loss, invoke, run_eval_rows, train, write_recipe, write_rows

FAST = ("--eval-rows", "8", "--bench-tokens", "4")
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao not installed (pip install 'ft-cli[export]')")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed (pip install 'ft-cli[llama-cpp]'; "
                                            "scripts/_setup.sh installs it when CI is set or FT_WITH_LLAMA_CPP=1)")


def needs_converter() -> None:
    from ft_cli.export.gguf import find_converter

    if importlib.util.find_spec("gguf") is None or find_converter() is None:
        pytest.skip("llama.cpp's converter not installed (python -m ft_cli.export.gguf install)")


@pytest.fixture(scope="module")
def rows(alpaca_file: Path) -> list[dict]:
    return json.loads(alpaca_file.read_text())[:48]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> Path:
    tmp = tmp_path_factory.mktemp("export-run")
    return train(write_recipe(tmp, write_rows(tmp / "train.json", rows)))


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, run: Path) -> Path:
    out = tmp_path_factory.mktemp("export-merged") / "bf16"
    assert invoke("merge", run, "--out", out, "--dtype", "bfloat16").exit_code == 0
    return out


def export(run: Path, out: Path, fmt: str, *extra: str):
    return invoke("export", run, "--format", fmt, "--out", out, *FAST, *extra)


_EXPORTS: dict[tuple, Path] = {}


def exported(run: Path, tmp_path_factory: pytest.TempPathFactory, fmt: str, *extra: str) -> Path:
    """One export per format (and llama.cpp availability) for the whole module: exports take seconds each."""
    import ft_cli.export.gguf

    key = (run, fmt, extra, ft_cli.export.gguf.llama_cpp_available())
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"export-{fmt}") / "out"
        result = export(run, out, fmt, "--max-ppl-increase", "1000%", *extra)
        assert result.exit_code == 0, result.output
        _EXPORTS[key] = out
    return _EXPORTS[key]


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def eval_ids(run: Path) -> list[torch.Tensor]:
    return [torch.tensor(r) for r in run_eval_rows(run)["input_ids"][:4]]


def logits(model, ids: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=i[None]).logits[0].float() for i in ids])


def check_report(out: Path, fmt: str) -> dict:
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == fmt and report["tool"] == "ft export"
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])
    q = report["quality"]
    assert q["rows"] == 8 and q["tokens"] > 0 and q["ok"] is True
    assert q["ppl_increase_pct"] == pytest.approx(100 * (q["export"]["perplexity"] / q["reference"]["perplexity"] - 1))
    assert report["merge_parity"]["top1_agreement"] > 0.9
    assert report["estimated_size_bytes"] > 0 and report["weights_bytes"] > 0
    # The estimate comes from the config alone; the real files add headers, the tokenizer (GGUF) and fallbacks for
    # rows a format cannot block: q4_K needs multiples of 256, which nothing in a 64-wide model is.
    low = 0.3 if fmt == "gguf-q4_k_m" else 0.6
    assert low < report["estimated_size_bytes"] / report["weights_bytes"] < 1.1
    ref = report["speed"]["reference"]
    assert ref["new_tokens"] == 4 * 4 and ref["tokens_per_second"] > 0 and ref["peak_memory_bytes"] > 0
    return report


# transformers formats ----------------------------------------------------------------------------------------------

@needs_torchao
@pytest.mark.parametrize("fmt, tolerance", [("int8", 0.05), ("int8-dynamic", 0.08), ("int4", 0.6)])
def test_transformers_formats_load_as_is_and_stay_close(run: Path, merged: Path, fmt: str, tolerance: float,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_cli.model import keep_bnb_cpu_path_trainable

    out = exported(run, tmp_path_factory, fmt)
    report = check_report(out, fmt)
    assert report["weights_bytes"] < report["reference_16bit"]["weights_bytes"]
    assert report["speed"]["export"]["new_tokens"] == 16
    model = AutoModelForCausalLM.from_pretrained(out)  # as is: the quantization config travels with the files
    keep_bnb_cpu_path_trainable(model)  # int4 on an AVX512-BF16 CPU: the tiny widths need the dequantizing path
    weights = {type(m.weight).__name__ for n, m in model.named_modules() if n.endswith("q_proj")}
    assert weights == ({"Params4bit"} if fmt == "int4" else {"Int8Tensor"})
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = eval_ids(run)
    diff = relative_diff(logits(model, ids), logits(reference, ids))
    assert 0 < diff < tolerance
    # the reported quality is what the exported model computes
    rows = run_eval_rows(run).select(range(8))
    loss, tokens = hand_loss(model, rows)
    assert report["quality"]["export"]["loss"] == pytest.approx(loss, rel=1e-3)
    assert report["quality"]["tokens"] == tokens
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(merged).chat_template


@pytest.mark.parametrize("host_has_avx512bf16", [True, False])
def test_int4_export_on_both_bitsandbytes_cpu_paths(run: Path, tmp_path_factory: pytest.TempPathFactory,
                                                    monkeypatch: pytest.MonkeyPatch, host_has_avx512bf16: bool) -> None:
    """bitsandbytes picks its 4-bit CPU kernel by instruction set; ft's loader must work on both kinds of CPU."""
    from bitsandbytes.nn import modules

    from ft_cli.export import load_export

    out = exported(run, tmp_path_factory, "int4")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: host_has_avx512bf16)
    model, tokenizer, notes = load_export(out)
    assert bool(notes) == host_has_avx512bf16  # tiny widths: the packed kernel is turned off, and ft says so
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = eval_ids(run)
    assert torch.isfinite(logits(model, ids)).all()
    assert tokenizer.eos_token == "<|im_end|>"


# GGUF ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, tolerance", [("gguf-f16", 1e-3), ("gguf-q8_0", 0.05)])
def test_gguf_read_back_by_transformers(run: Path, merged: Path, fmt: str, tolerance: float,
                                        tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llama-cpp-python the export is scored through transformers' GGUF loader, and says so."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ft_cli.export.gguf

    needs_converter()
    monkeypatch.setattr(ft_cli.export.gguf, "llama_cpp_available", lambda: False)
    out = exported(run, tmp_path_factory, fmt)
    report = check_report(out, fmt)
    name = f"model-{fmt.removeprefix('gguf-')}.gguf"
    assert report["artifact"] == name and "llama-cpp-python is not installed" in report["speed"]["skipped"]
    assert "transformers' GGUF loader" in report["quality"]["scored_with"]
    reader = GGUFReader(str(out / name))
    meta = {f.name: f for f in reader.fields.values()}
    template = AutoTokenizer.from_pretrained(merged).chat_template
    assert bytes(meta["tokenizer.chat_template"].parts[-1]).decode() == template
    assert bytes(meta["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    types = report["tensor_types"]
    assert ("Q8_0" in types) == (fmt == "gguf-q8_0")
    if fmt == "gguf-q8_0":  # tiny-llama's MLP is 176 wide: not a multiple of 32, so those rows stay F16, and we say so
        assert any("stayed F16" in n for n in report["notes"])
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = eval_ids(run)
    assert relative_diff(logits(model, ids), logits(reference, ids)) < tolerance
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    text = "Write a haiku about the sea, 3 times!"
    assert gguf_tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(merged)(text)["input_ids"]
    loss, _ = hand_loss(model, run_eval_rows(run).select(range(8)))
    assert report["quality"]["export"]["loss"] == pytest.approx(loss, rel=1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"])
def test_gguf_runs_in_llama_cpp_like_transformers(run: Path, merged: Path, fmt: str,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from ft_cli.export.measure import greedy_ids

    needs_converter()
    out = exported(run, tmp_path_factory, fmt)
    report = check_report(out, fmt)
    assert "llama.cpp" in report["quality"]["scored_with"]
    assert report["speed"]["export"]["new_tokens"] == 16
    verification = report["verification"]
    assert verification["prompts"] == 4
    if fmt == "gguf-f16":  # same weights up to f16 rounding: the same greedy tokens
        assert verification["identical"] >= 3 and min(verification["common_prefix_tokens"]) >= 4
    if fmt == "gguf-q4_k_m":
        assert {"Q4_K", "Q6_K"} & set(report["tensor_types"]) or "Q5_0" in report["tensor_types"]
    # Independently of ft's own check: llama.cpp's logits against transformers on the 16-bit merge.
    llm = Llama(model_path=str(out / report["artifact"]), n_ctx=256, logits_all=True, verbose=False)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = eval_ids(run)[0]
    llm.eval(ids.tolist())
    got = torch.tensor(llm.scores[: len(ids)])
    want = logits(reference, [ids])
    tolerance = {"gguf-f16": 0.01, "gguf-q8_0": 0.05, "gguf-q4_k_m": 0.6}[fmt]
    assert relative_diff(got, want) < tolerance
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > (0.9 if fmt == "gguf-f16" else 0.5)
    prompt = ids[:10].tolist()
    stops = [int(llm.token_eos())]
    if fmt == "gguf-f16":
        assert greedy_ids(reference, prompt, 8, stops, "cpu")[:4] == verification_tokens(llm, prompt, 4)


def verification_tokens(llm, prompt: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


# refusals and bad input --------------------------------------------------------------------------------------------

@needs_torchao
def test_quality_refusal_writes_nothing_and_force_writes(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    result = export(run, out, "int4", "--max-ppl-increase", "0%")
    assert result.exit_code == 3, result.output
    assert "export refused" in result.output and "FAILED" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary directory left behind either
    forced = export(run, out, "int4", "--max-ppl-increase", "0", "--force")
    assert forced.exit_code == 0, forced.output
    report = json.loads((out / "export.json").read_text())
    assert report["quality"]["ok"] is False and report["quality"]["max_ppl_increase_pct"] == 0


@needs_torchao
def test_out_rules(run: Path, tmp_path: Path) -> None:
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    assert export(run, user_file, "int8").exit_code == 2 and user_file.read_text() == "mine"
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "main.py").write_text("print(1)")
    result = export(run, user_dir, "int8", "--overwrite")
    assert result.exit_code == 2 and "not an ft export" in result.output
    assert [p.name for p in user_dir.iterdir()] == ["main.py"]
    out = tmp_path / "out"
    assert export(run, out, "int8").exit_code == 0
    again = export(run, out, "int8")
    assert again.exit_code == 2 and "--overwrite" in again.output
    (out / "extra.txt").write_text("mine")
    assert export(run, out, "int8", "--overwrite").exit_code == 2 and (out / "extra.txt").is_file()
    (out / "extra.txt").unlink()
    first = json.loads((out / "export.json").read_text())["created_at"]
    replaced = export(run, out, "int8-dynamic", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == "int8-dynamic" and report["created_at"] >= first


def test_bad_input_exits_2(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (("--format", "int3"), "--format: must be one of"),
        (("--format", "int8", "--max-ppl-increase", "lots"), "--max-ppl-increase"),
        (("--format", "int8", "--max-ppl-increase", "-1%"), "--max-ppl-increase"),
    ]
    for args, message in cases:
        result = invoke("export", run, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2 and message in result.output, result.output
    not_a_run = invoke("export", tmp_path, "--format", "int8", "--out", tmp_path / "x")
    assert not_a_run.exit_code == 2
    monkeypatch.setenv("FT_GGUF_CONVERTER", str(tmp_path / "missing.py"))
    missing = invoke("export", run, "--format", "gguf-f16", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "FT_GGUF_CONVERTER" in missing.output
    assert not (tmp_path / "x").exists()


def test_missing_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util as util

    from ft_cli.errors import UserError
    from ft_cli.export import require_libraries
    from ft_cli.export.formats import FORMATS

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(UserError, match=r"llama_cpp.*ft-cli\[llama-cpp\]"):
        require_libraries(FORMATS["gguf-q4_k_m"])


def test_builtin_tokenizer_is_recognised_as_qwen2_only_when_it_is(merged: Path, tmp_path: Path) -> None:
    from ft_cli.export.gguf_convert import known_pre_tokenizer

    assert known_pre_tokenizer(merged) == "qwen2"
    spec = json.loads((merged / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert known_pre_tokenizer(tmp_path) is None


# quantization-aware training ---------------------------------------------------------------------------------------

def test_qat_recipe_rules() -> None:
    from ft_cli.errors import UserError
    from ft_cli.recipe import recipe_from_dict

    base = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "x.json"},
            "train": {"qat": "int8-dynamic-act-int4-weight"}}
    for method in ("full", "freeze", "lora"):
        assert recipe_from_dict({**base, "method": method}).train.qat == "int8-dynamic-act-int4-weight"
    for method in ("qlora", "ia3", "prompt_tuning"):
        with pytest.raises(UserError, match="train.qat"):
            recipe_from_dict({**base, "method": method})
    with pytest.raises(UserError, match="train.qat"):
        recipe_from_dict({**base, "train": {"qat": "int2"}})


@needs_torchao
def test_qat_fake_quantizes_lora_base_layers_only(tmp_path: Path, rows: list[dict]) -> None:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from ft_cli.model import build_model
    from ft_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, write_rows(tmp_path / "train.json", rows),
                                      train={"qat": "int8-dynamic-act-int4-weight"}))
    built = build_model(recipe)
    fake = {n for n, m in built.model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    assert fake and all(n.endswith("base_layer") for n in fake)
    assert not any(isinstance(m, FakeQuantizedLinear) for n, m in built.model.named_modules() if "lora_" in n)
    # tiny-llama's down_proj is 176 wide (not a multiple of 32): left out, and said so
    assert "stay unquantized" in built.qat and not any("down_proj" in n for n in fake)
    plain = build_model(recipe.model_copy(update={"train": recipe.train.model_copy(update={"qat": None})}))
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        assert not torch.allclose(built.model(ids).logits, plain.model(ids).logits)  # the rounding is really applied


@needs_torchao
def test_qat_run_trains_against_what_export_produces(tmp_path: Path, rows: list[dict]) -> None:
    """A full QAT run's own (fake-quantized) eval loss is what its int8-dynamic-int4 export scores."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, write_rows(tmp_path / "train.json", rows), method="full", lora=None,
                          train={"qat": "int8-dynamic-act-int4-weight", "lr": 1e-3})
    run = train(recipe)
    model = AutoModelForCausalLM.from_pretrained(run / "model")  # saved as a plain model: same tensor names
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("q_proj"))
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    out = tmp_path / "int4"
    result = invoke("export", run, "--format", "int8-dynamic-int4", "--out", out, "--eval-rows", "256",
                    "--bench-tokens", "4", "--max-ppl-increase", "1000%")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export.json").read_text())
    assert report["quality"]["rows"] == len(run_eval_rows(run))
    assert report["quality"]["export"]["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=0.01)
    assert any("multiple of the int4 group size 32" in n for n in report["notes"])


# families ------------------------------------------------------------------------------------------------------------

def with_sentencepiece_tokenizer(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of a built-in with a SentencePiece tokenizer.model, as real Gemma checkpoints ship (llama.cpp's Gemma
    converter reads the vocabulary from it; ft's built-ins have a byte-level BPE instead)."""
    import io
    import shutil

    import sentencepiece as spm

    from ft_cli.builtin_corpus import corpus

    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    lines = [line for paragraph in corpus() for line in paragraph.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    (copy / "tokenizer.model").write_bytes(model.getvalue())
    return copy


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_gguf_conversion_of_each_family_computes_the_same_logits(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.export import gguf

    needs_converter()
    model_dir = resolve_builtin(f"builtin:tiny-{family}")
    if family.startswith("gemma"):
        model_dir = with_sentencepiece_tokenizer(model_dir, tmp_path)
    out = tmp_path / "model-f16.gguf"
    gguf.convert(model_dir, out, "f16")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = list(range(5, 40))
    want = logits(reference, [torch.tensor(ids)])
    if importlib.util.find_spec("llama_cpp") is not None:
        llm = gguf.LlamaCppModel(out, n_ctx=64)
        got = torch.from_numpy(llm.logits(ids))
        llm.close()
        assert relative_diff(got, want) < 5e-3
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    if not family.startswith("gemma"):  # transformers' GGUF reader, the path without llama-cpp-python
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        assert relative_diff(logits(model, [torch.tensor(ids)]), want) < 5e-3
