"""task: classification on the encoder families besides BERT — RoBERTa, DeBERTa-v2, ModernBERT — each a tiny random
model built here (2 layers, hidden 64, saved as its masked-LM checkpoint the way the hub ships them, with the built-in
WordPiece tokenizer), trained by `ft` with LoRA and in full (DeBERTa-v2 also with ft's bottleneck adapters): the loss
falls, only the method's parameters and the new head change, the output reloads with plain transformers / peft to
the logits `ft predict` gives, and `ft merge` writes a standalone classifier with the same logits.

What each family needs from ft: RoBERTa's head is a two-layer `classifier` (dense + out_proj) and its positions start
after the padding index; DeBERTa-v2's classifier adds a `pooler` its masked-LM checkpoints do not have, which must
train and be saved with the head (a frozen random pooler would differ on every load); ModernBERT pools through a
pretrained `head` (dense + norm) that LoRA adapts like any other layer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.test_classification import (
    STEPS,
    Trained,
    ft,
    labelled_rows,
    logits,
    recipe_dict,
    train_run,
    write_json,
)
from tests.test_methods import bit_identical

FAMILIES = ("roberta", "deberta-v2", "modernbert")
# what `ft` trains besides the method's own parameters: the modules the base checkpoint does not have
HEAD = {"roberta": r"(^|\.)classifier\.", "deberta-v2": r"(^|\.)(classifier|pooler)\.",
        "modernbert": r"(^|\.)classifier\."}
METHODS: dict[str, tuple[dict[str, Any], float, str]] = {
    "lora": ({"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}, 1e-2, r"\.lora_[AB]\."),
    "full": ({"method": "full"}, 3e-3, r"."),
    "adapter": ({"method": "adapter", "bottleneck": {"size": 16}}, 1e-2, r"\.bottleneck_adapter\.(down|up)\."),
}


def build_encoder_dir(model_type: str, out: Path) -> Path:
    """A tiny random `model_type` encoder saved as its masked-LM model (what the hub's base checkpoints are), with
    ft's WordPiece tokenizer; the per-family config keys are those of the real models."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from ft_cli.builtin_tokenizers import build_wordpiece_tokenizer

    tok = build_wordpiece_tokenizer()
    common = {"vocab_size": -(-len(tok) // 64) * 64, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 176, "pad_token_id": tok.pad_token_id,
              "initializer_range": 0.1}
    if model_type == "roberta":  # positions start at pad + 1 (roberta-base: 514 = 512 + pad id 1 + 1)
        extra = {"max_position_embeddings": 512 + tok.pad_token_id + 2, "type_vocab_size": 1,
                 "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}
        tok.model_input_names = ["input_ids", "attention_mask"]
    elif model_type == "deberta-v2":  # deberta-v3-base's attention: relative positions, no absolute ones
        extra = {"max_position_embeddings": 512, "type_vocab_size": 0, "relative_attention": True,
                 "position_buckets": 32, "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
                 "position_biased_input": False, "norm_rel_ebd": "layer_norm", "share_att_key": True}
    else:  # modernbert: alternating global / local (sliding window) attention as ModernBERT-base
        extra = {"max_position_embeddings": 512, "global_attn_every_n_layers": 2, "local_attention": 16,
                 "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                 "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}
        tok.model_input_names = ["input_ids", "attention_mask"]
    config = AutoConfig.for_model(model_type, **common, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    data = write_json(tmp_path_factory.mktemp("data") / "train.json", labelled_rows(48))
    bases: dict[str, Path] = {}
    runs: dict[tuple[str, str], Trained] = {}

    def get(family: str, method: str) -> Trained:
        if family not in bases:
            bases[family] = build_encoder_dir(family, tmp_path_factory.mktemp(family))
        if (family, method) not in runs:
            sections, lr, _ = METHODS[method]
            runs[family, method] = train_run(tmp_path_factory.mktemp(f"{family}-{method}"), data, method, lr=lr,
                                             sections={**sections, "model": {"name_or_path": str(bases[family])}})
        return runs[family, method]

    return get


# ft's bottleneck adapters save the head beside them (classifier_head.safetensors): DeBERTa-v2's pooler with it
CASES = [pytest.param(f, m, id=f"{f}-{m}") for f in FAMILIES for m in ("lora", "full")] + [
    pytest.param("deberta-v2", "adapter", id="deberta-v2-adapter")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_loss_falls_and_only_the_methods_parameters_and_the_head_change(trained, family: str, method: str) -> None:
    t = trained(family, method)
    assert t.model.config.model_type == family
    assert len(t.losses) == STEPS and all(map(torch.isfinite, torch.tensor(t.losses)))
    assert t.loss_after < t.loss_before - 0.05, (t.loss_before, t.loss_after)
    head = {k for k in t.trainable if re.search(HEAD[family], k)}
    assert head and all(".lora_" not in k for k in head), sorted(head)  # the head trains in full, no LoRA on it
    pattern = re.compile(METHODS[method][2])
    assert all(pattern.search(k) for k in t.trainable - head), sorted(t.trainable - head)[:5]
    after = t.model.state_dict()
    changed = {k for k in after if not bit_identical(after[k], t.before[k])}
    assert changed == t.trainable, (sorted(changed - t.trainable)[:5], sorted(t.trainable - changed)[:5])


def plain_reload(t: Trained) -> Any:
    """The run's output as a user loads it, without ft: AutoModelForSequenceClassification, plus PeftModel on a
    fresh base for an adapter (whose new modules - the head, DeBERTa-v2's pooler - come from the adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import ft_cli

    if t.recipe.method == "full":
        return AutoModelForSequenceClassification.from_pretrained(t.run / "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # another random head and pooler than training started from: the adapter's win
        base = AutoModelForSequenceClassification.from_pretrained(t.recipe.model.name_or_path,
                                                                  num_labels=len(t.labels))
    if t.recipe.method == "adapter":  # ft's own bottleneck adapters: ft_cli.load_adapter is their loader
        return ft_cli.load_adapter(base, t.run / "adapter")
    return PeftModel.from_pretrained(base, t.run / "adapter")


@pytest.mark.parametrize(("family", "method"), CASES)
def test_output_reloads_in_transformers_and_peft_to_ft_predicts_logits(trained, family: str, method: str,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    t = trained(family, method)
    loaded = plain_reload(t)
    torch.testing.assert_close(logits(loaded, t.batch), logits(t.model, t.batch), atol=1e-5, rtol=0)
    texts = ["the garden was warm", "the road was cruel", "the story was paper", "the day was good and kind"]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts))
    out = tmp_path / "preds.jsonl"
    done = ft("predict", str(t.run), "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    preds = [json.loads(x)["probabilities"] for x in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(t.run / ("model" if method == "full" else "adapter"))
    with torch.no_grad():
        probs = loaded(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    got = torch.tensor([[p[name] for name in t.labels] for p in preds])
    torch.testing.assert_close(got, probs, atol=2e-6, rtol=0)  # predict rounds to 6 decimals


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_writes_a_standalone_classifier_with_the_adapters_logits(trained, family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    t = trained(family, "lora")
    out = tmp_path / "merged"
    done = ft("merge", str(t.run), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["parity_ok"] and report["parity"]["relative_mean_diff"] < 1e-5, report["parity"]
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, t.batch), logits(t.model, t.batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_prefix_tuning_is_refused_where_the_backbone_takes_no_kv_cache(tmp_path: Path, family: str) -> None:
    """peft's prefix is a KV cache; these encoders' attention takes none, so the prefix would be ignored, silently."""
    data = write_json(tmp_path / "train.json", labelled_rows(12))
    raw = recipe_dict(data, method="prefix_tuning", prompt={"num_virtual_tokens": 4},
                      model={"name_or_path": str(build_encoder_dir(family, tmp_path / family))})
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = ft("train", str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"method prefix_tuning: peft feeds the prefix as a KV cache, which this {family} model does not take" \
        in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "adapter").exists()
