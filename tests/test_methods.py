"""Every fine-tuning method, end to end on the built-in tiny Llama (CPU, offline, about a second per run):
the loss falls, only the method's parameters change, and the saved output reloads to the same logits.
Then the mechanics of single methods on several architectures, and the recipe rules the methods need."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ft_cli.errors import UserError
from ft_cli.methods.apply import apply_method
from ft_cli.recipe import load_recipe, recipe_from_dict
from tests.conftest import tiny_recipe, write_recipe_file

# name: (recipe sections, lr, regex every trainable parameter name matches)
RUNS: dict[str, tuple[dict[str, Any], float, str]] = {
    "lora": ({}, 1e-2, r"\.lora_[AB]\."),
    "lora-rslora": ({"lora": {"use_rslora": True}}, 1e-2, r"\.lora_[AB]\."),
    "lora-plus": ({"lora": {"loraplus_lr_ratio": 16}}, 2e-3, r"\.lora_[AB]\."),
    "qlora-nf4": ({"method": "qlora", "quantization": {"bits": 4, "compute_dtype": "float32"}}, 1e-2, r"\.lora_[AB]\."),
    "qlora-fp4": ({"method": "qlora", "quantization": {"bits": 4, "quant_type": "fp4", "double_quant": False,
                                                       "compute_dtype": "float32"}}, 1e-2, r"\.lora_[AB]\."),
    "qlora-8bit": ({"method": "qlora", "quantization": {"bits": 8, "compute_dtype": "float32"}}, 1e-2,
                   r"\.lora_[AB]\."),
    "dora": ({"method": "dora"}, 1e-2, r"\.lora_(A|B|magnitude_vector)\."),
    "dora-4bit": ({"method": "dora", "quantization": {"bits": 4, "compute_dtype": "float32"}}, 1e-2,
                  r"\.lora_(A|B|magnitude_vector)\."),
    # QLoRA as on a GPU: bf16 base and compute, fp32 adapters
    "qlora-bf16": ({"method": "qlora", "model": {"dtype": "bfloat16"},
                    "quantization": {"bits": 4, "compute_dtype": "bfloat16"}}, 1e-2, r"\.lora_[AB]\."),
    # bf16 with float32 master weights (train.mixed_precision, the default): a small lr still moves every weight
    "full-bf16": ({"method": "full", "model": {"dtype": "bfloat16"}}, 1e-4, r"."),
    "freeze": ({"method": "freeze", "freeze": {"trainable_layers": 1, "trainable_modules": ["lm_head"]}}, 1e-3,
               r"^(model\.layers\.1\.|lm_head\.)"),
    "ia3": ({"method": "ia3"}, 0.3, r"\.ia3_l\."),
    "prompt_tuning": ({"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 16,
                                                             "init_text": "Answer with the colour."}}, 0.3,
                      r"^prompt_encoder\."),
    "prefix_tuning": ({"method": "prefix_tuning", "prompt": {"num_virtual_tokens": 8}}, 0.1, r"^prompt_encoder\."),
    "adapter": ({"method": "adapter", "bottleneck": {"size": 16, "dropout": 0.1}}, 0.1,
                r"\.(self_attn|mlp)\.bottleneck_adapter\.(down|up)\."),
}

# Negative controls: trained like RUNS, but not held to every method's checks.
CONTROLS: dict[str, tuple[dict[str, Any], float, str]] = {
    # pure bf16: a weight near 1.0 takes no update smaller than half its spacing (2^-8), so lr 1e-4 rounds away
    "full-bf16-pure": ({"method": "full", "model": {"dtype": "bfloat16"}, "train": {"mixed_precision": False}},
                       1e-4, r"."),
}

WORDS = ["apple", "river", "lamp", "cloud", "stone", "green", "seven", "music"]


def write_data(path: Path, n: int = 32) -> Path:
    rows = [{"instruction": f"Which colour goes with the {WORDS[i % 8]}?", "input": "",
             "output": ["red", "blue", "yellow", "purple"][i % 4]} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def write_recipe(tmp: Path, data: Path, lr: float, **sections: Any) -> Path:
    recipe = tiny_recipe(data, tmp / "run", base={
        "data": {"max_seq_len": 64},
        "train": {"max_steps": 15, "lr": lr, "scheduler": "constant", "seed": 3}}, **sections)
    return write_recipe_file(tmp / "recipe.yaml", recipe)


@dataclass
class Trained:
    recipe: Any
    model: Any  # the trained model, as the loop left it
    optimizer: Any
    before: dict[str, torch.Tensor]  # state_dict before training
    trainable: set[str]  # state_dict keys of trainable tensors
    losses: list[float]  # logged per step
    loss_before: float  # token loss on the training set, before and after
    loss_after: float
    batch: dict[str, torch.Tensor]
    run: Path
    dtypes: dict[str, set[torch.dtype]]  # output dtypes seen while training: "blocks" (residual stream), "logits"


def train_run(tmp: Path, data: Path, name: str) -> Trained:
    from ft_cli.scoring import token_loss
    from ft_cli.train import fit, setup

    sections, lr, _ = {**RUNS, **CONTROLS}[name]
    path = write_recipe(tmp, data, lr, **sections)
    session = setup(load_recipe(path), path, resume=False, overwrite=True)
    model = session.accelerator.unwrap_model(session.model)
    trainable_ptrs = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {k for k, v in model.state_dict().items() if v.data_ptr() in trainable_ptrs}

    def loss() -> float:
        total, tokens = token_loss(model, session.data.train, session.collate, 8, device="cpu")
        return total / tokens

    loss_before = loss()
    dtypes: dict[str, set[torch.dtype]] = {"blocks": set(), "logits": set()}

    def record(kind: str) -> Any:
        return lambda module, args, out: dtypes[kind].add((out[0] if isinstance(out, tuple) else out).dtype)

    blocks = [m for n, m in model.named_modules() if re.search(r"\.layers\.\d+$", n)]
    hooks = [m.register_forward_hook(record("blocks")) for m in blocks]
    hooks.append(model.get_output_embeddings().register_forward_hook(record("logits")))
    run = fit(session)
    for hook in hooks:
        hook.remove()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    batch = session.collate([session.data.train[i] for i in range(4)])
    return Trained(session.recipe, model, session.optimizer, before, trainable,
                   [ln["loss"] for ln in lines if "loss" in ln], loss_before, loss(), batch, run, dtypes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """trained(name): the run of RUNS[name], trained once per module."""
    data = write_data(tmp_path_factory.mktemp("data") / "train.json")
    runs: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in runs:
            runs[name] = train_run(tmp_path_factory.mktemp(name), data, name)
        return runs[name]

    return get


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def base_model(t: Trained) -> Any:
    """The base as training saw it: quantized layers beside model.dtype embeddings, norms and head."""
    from ft_cli.loading import load_base

    return load_base(t.recipe)


def reload(t: Trained) -> Any:
    """The run's output loaded the way users (and ft eval) load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft_cli.methods.bottleneck import load_bottleneck_adapter

    if t.recipe.method in ("full", "freeze"):
        return AutoModelForCausalLM.from_pretrained(t.run / "model", dtype="auto")
    base = base_model(t)
    if t.recipe.method == "adapter":
        return load_bottleneck_adapter(base, t.run / "adapter")
    return PeftModel.from_pretrained(base, t.run / "adapter")


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bytes, not values: packed 4-bit weights stored as float32 hold NaN bit patterns, and NaN != NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", RUNS)
def test_loss_falls(trained, name: str) -> None:
    t = trained(name)
    assert len(t.losses) == 15 and all(map(torch.isfinite, torch.tensor(t.losses)))
    assert t.loss_after < t.loss_before - 0.1, (t.loss_before, t.loss_after)
    assert sum(t.losses[-3:]) < sum(t.losses[:3]), t.losses


@pytest.mark.parametrize("name", RUNS)
def test_only_the_methods_parameters_change(trained, name: str) -> None:
    t = trained(name)
    after = t.model.state_dict()
    assert set(after) == set(t.before)
    pattern = re.compile(RUNS[name][2])
    assert t.trainable and all(pattern.search(k) for k in t.trainable), sorted(t.trainable)[:5]
    changed = {k for k in after if not bit_identical(after[k], t.before[k])}
    assert changed == t.trainable, (sorted(changed - t.trainable)[:5], sorted(t.trainable - changed)[:5])


@pytest.mark.parametrize("name", RUNS)
def test_saved_output_reloads_to_the_trained_logits(trained, name: str) -> None:
    t = trained(name)
    loaded = reload(t)
    expected = logits(t.model, t.batch)
    assert not torch.equal(expected, logits(base_model(t), t.batch))  # training changed the model
    if t.recipe.autocast_dtype:
        # float32 master weights, saved in bf16: the file holds each trained weight rounded, and the saved model
        # scores (in pure bf16) what training scored (bf16 autocast on the float32 weights) up to that rounding.
        trained_weights = dict(t.model.named_parameters())
        for n, p in loaded.named_parameters():
            assert p.dtype == torch.bfloat16 and torch.equal(p, trained_weights[n].to(torch.bfloat16)), n
        total, tokens = token_loss_of(loaded, t)
        assert total / tokens == pytest.approx(t.loss_after, rel=1e-2)
        return
    torch.testing.assert_close(logits(loaded, t.batch), expected, atol=1e-5, rtol=0)


def token_loss_of(model: Any, t: Trained) -> tuple[float, int]:
    from ft_cli.data.pipeline import build_datasets, make_collator
    from ft_cli.model import load_tokenizer
    from ft_cli.scoring import token_loss

    tok = load_tokenizer(t.recipe)
    data = build_datasets(t.recipe, tok).train
    return token_loss(model, data, make_collator(tok, packed=t.recipe.data.packing), 8, device="cpu")


def test_qlora_in_bf16_keeps_the_stream_and_logits_bf16_and_adapters_fp32(trained) -> None:
    """ft's k-bit preparation leaves embeddings, norms and head in model.dtype (peft's upcast them to float32,
    which made every block output and the logits float32)."""
    t = trained("qlora-bf16")
    assert t.dtypes == {"blocks": {torch.bfloat16}, "logits": {torch.bfloat16}}
    params = dict(t.model.named_parameters())
    assert {p.dtype for n, p in params.items() if ".lora_" in n} == {torch.float32}
    not_quantized = {n: p.dtype for n, p in params.items() if ".lora_" not in n and type(p).__name__ != "Params4bit"}
    assert any("embed_tokens" in n for n in not_quantized) and any("norm" in n for n in not_quantized)
    assert set(not_quantized.values()) == {torch.bfloat16}, not_quantized
    assert t.model.get_base_model().is_activation_checkpointing


def test_mixed_precision_keeps_small_updates_that_pure_bf16_loses(trained) -> None:
    """lr 1e-4 moves a norm weight of 1.0 by about 1e-4 a step, under half the bf16 spacing there (2^-8): pure
    bf16 rounds every such update away; float32 master weights (the default) keep them."""
    mixed, pure = trained("full-bf16"), trained("full-bf16-pure")

    def norms_moved(t: Trained) -> tuple[set[str], set[str]]:
        after = t.model.state_dict()
        norms = {k for k in t.before if "norm" in k}
        return norms, {k for k in norms if not torch.equal(after[k], t.before[k])}

    norms, moved = norms_moved(mixed)
    assert len(norms) == 5 and moved == norms  # 2 blocks x 2 norms + the final norm
    assert norms_moved(pure)[1] == set()  # the negative control: not one norm weight moved
    assert mixed.model.dtype == torch.float32 and pure.model.dtype == torch.bfloat16
    # Under autocast the matmuls (logits included) run in bf16; the stream over float32 weights is float32.
    assert mixed.dtypes == {"blocks": {torch.float32}, "logits": {torch.bfloat16}}
    assert pure.dtypes == {"blocks": {torch.bfloat16}, "logits": {torch.bfloat16}}
    assert mixed.loss_after < pure.loss_after - 0.5, (mixed.loss_after, pure.loss_after)
    for t in (mixed, pure):  # both write bf16, whatever they trained in
        with safe_open(str(t.run / "model" / "model.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
        assert json.loads((t.run / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_every_method_keeps_gradient_checkpointing_on_but_prefix_tuning(trained) -> None:
    for name in RUNS:
        t = trained(name)
        base = t.model.get_base_model() if hasattr(t.model, "get_base_model") else t.model
        assert base.is_activation_checkpointing == (t.recipe.method != "prefix_tuning"), name


@pytest.mark.parametrize(("name", "layer", "quant_type"), [
    ("qlora-nf4", "Linear4bit", "nf4"), ("qlora-fp4", "Linear4bit", "fp4"), ("qlora-8bit", "Linear8bitLt", None),
    ("dora-4bit", "Linear4bit", "nf4"),
])
def test_quantized_bases_are_bitsandbytes_layers(trained, name: str, layer: str, quant_type: str | None) -> None:
    import bitsandbytes as bnb

    t = trained(name)
    lora_layers = [m for n, m in t.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert len(lora_layers) == 4  # 2 blocks x (q_proj, down_proj): all-linear reaches every block
    for m in lora_layers:
        assert isinstance(m.base_layer, getattr(bnb.nn, layer)), type(m.base_layer)
        if quant_type:
            assert m.base_layer.weight.quant_state.quant_type == quant_type
    config = json.loads((t.run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is name.startswith("dora")


def test_adapter_configs_say_what_trained(trained) -> None:
    read = lambda name: json.loads((trained(name).run / "adapter" / "adapter_config.json").read_text())  # noqa: E731
    assert read("lora")["use_rslora"] is False and read("lora-rslora")["use_rslora"] is True
    assert read("ia3")["peft_type"] == "IA3" and read("prefix_tuning")["peft_type"] == "PREFIX_TUNING"
    prompt = read("prompt_tuning")
    assert (prompt["peft_type"], prompt["prompt_tuning_init"], prompt["num_virtual_tokens"]) == \
        ("PROMPT_TUNING", "TEXT", 16)


def test_loraplus_gives_b_matrices_ratio_times_the_lr(trained) -> None:
    t = trained("lora-plus")
    lr_of = {id(p): g["lr"] for g in t.optimizer.param_groups for p in g["params"]}
    named = dict(t.model.named_parameters())
    b = {lr_of[id(p)] for n, p in named.items() if ".lora_B." in n}
    a = {lr_of[id(p)] for n, p in named.items() if ".lora_A." in n}
    assert a == {2e-3} and len(b) == 1 and b.pop() == pytest.approx(16 * 2e-3)


def test_whole_model_outputs_are_standalone_models_in_the_recipe_dtype(trained) -> None:
    for name, dtype in (("full-bf16", "bfloat16"), ("freeze", "float32")):
        out = trained(name).run / "model"
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F32"}
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == dtype and config["use_cache"] is True
        assert (out / "generation_config.json").is_file() and (out / "chat_template.jinja").is_file()
        assert not (out / "adapter_config.json").exists()


def test_bottleneck_adapter_dir(trained) -> None:
    from ft_cli.methods import bottleneck

    out = trained("adapter").run / "adapter"
    config = json.loads((out / bottleneck.CONFIG_FILE).read_text())
    assert config["size"] == 16 and config["model_type"] == "llama" and config["blocks"] == "model.layers"
    assert config["recipe_model"] == "builtin:tiny-llama"
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()  # loadable as it is, as peft's
    with safe_open(str(out / bottleneck.WEIGHTS_FILE), "pt") as f:
        assert len(list(f.keys())) == 2 * 2 * 4  # blocks x (attention, mlp) x (down, up) x (weight, bias)
    assert not (out / "adapter_config.json").exists()  # not a peft adapter
    assert bottleneck.MERGEABLE is False
    with pytest.raises(UserError, match="not a bottleneck adapter"):
        bottleneck.load_bottleneck_adapter(tiny_model("llama"), out.parent)


# On a CUDA GPU (skipped without one) -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_float16_mixed_precision_trains_through_loss_scaling(tmp_path: Path) -> None:
    """fp16 autocast over float32 master weights with accelerate's GradScaler: steps whose scaled gradients
    overflow are skipped by the scaler (not reported as divergence), the loss falls, the model is saved fp16."""
    from ft_cli.train import train_from_recipe

    path = write_recipe(tmp_path, write_data(tmp_path / "train.json"), 1e-4, method="full",
                        model={"dtype": "float16"})
    run = train_from_recipe(path, [], overwrite=True)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3]), losses
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


@pytest.mark.gpu
def test_qlora_without_the_fp32_upcast_is_bf16_and_smaller_on_cuda(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same QLoRA step with ft's preparation and with peft's prepare_model_for_kbit_training: ft's keeps the
    logits bf16 and peaks lower (float32 stream and logits under peft's)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    import ft_cli.methods.apply
    from ft_cli.model import build_model

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    r = recipe(model={"name_or_path": str(tmp_path / "model"), "dtype": "bfloat16"}, method="qlora",
               quantization={"bits": 4, "compute_dtype": "bfloat16"})

    def step() -> tuple[torch.dtype, int]:
        model = build_model(r, device=torch.device("cuda")).model.train()
        ids = torch.randint(1, 32000, (4, 512), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        peak = torch.cuda.max_memory_allocated() - start
        dtype = out.logits.dtype
        del model, out
        torch.cuda.empty_cache()
        return dtype, peak

    ft_dtype, ft_peak = step()
    monkeypatch.setattr(ft_cli.methods.apply, "prepare_quantized", lambda model, recipe: prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}))
    peft_dtype, peft_peak = step()
    assert (ft_dtype, peft_dtype) == (torch.bfloat16, torch.float32)
    assert ft_peak < 0.9 * peft_peak, (ft_peak, peft_peak)


# Mechanics on several architectures (models built from a config: milliseconds) ---------------------------------

def tiny_model(model_type: str, layers: int = 3) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=layers, n_head=4, vocab_size=256, n_positions=64)
    else:
        config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=256, pad_token_id=0,
                                      tie_word_embeddings=model_type == "qwen2")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def recipe(**sections: Any) -> Any:
    return recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                             "data": {"train": "x.jsonl"}, **sections})


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "phi3"]
BLOCK = {"gpt2": r"transformer\.h\.(\d+)\."}


@pytest.mark.parametrize("model_type", ARCHS)
def test_freeze_trains_the_last_blocks_and_named_modules(model_type: str) -> None:
    model = apply_method(tiny_model(model_type), recipe(method="freeze", freeze={"trainable_layers": 2,
                                                                                 "trainable_modules": ["lm_head"]}))
    block = re.compile(BLOCK.get(model_type, r"model\.layers\.(\d+)\."))
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        m = block.match(name)
        expected = (m is not None and int(m.group(1)) >= 1) or p is head  # a tied head is the embeddings' weight
        assert p.requires_grad == expected, name
    assert head.requires_grad


def test_freeze_errors_name_the_field() -> None:
    with pytest.raises(UserError, match=r"freeze.trainable_modules: 'lm_haed' matches no module.*lm_head"):
        apply_method(tiny_model("llama"), recipe(method="freeze", freeze={"trainable_modules": ["lm_haed"]}))
    with pytest.raises(UserError, match=r"freeze.trainable_layers: 10, but the llama model has 3 transformer blocks"):
        apply_method(tiny_model("llama"), recipe(method="freeze", freeze={"trainable_layers": 10}))
    every = apply_method(tiny_model("llama"), recipe(method="freeze", freeze={"trainable_layers": 3}))
    assert all(p.requires_grad for n, p in every.named_parameters() if ".layers." in n)  # N == blocks: all blocks


def test_whole_model_is_written_in_the_recipe_dtype_without_touching_the_trained_model(tmp_path: Path) -> None:
    from ft_cli.methods.whole import save_whole_model

    model = tiny_model("llama")  # float32 weights, e.g. upcast for training
    model.config.use_cache = False
    save_whole_model(model, tmp_path, recipe(method="full", model={"name_or_path": "x", "dtype": "bfloat16"}))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.dtype == torch.float32 and model.config.use_cache is False


@pytest.mark.parametrize("model_type", ARCHS)
def test_bottleneck_starts_as_the_base_model_and_trains_only_adapters(model_type: str, tmp_path: Path) -> None:
    from ft_cli.methods.bottleneck import load_bottleneck_adapter, save_bottleneck_adapter

    x = torch.randint(0, 256, (2, 12))
    base_logits = tiny_model(model_type)(input_ids=x).logits
    r = recipe(method="adapter", bottleneck={"size": 8})
    model = apply_method(tiny_model(model_type), r)
    assert torch.equal(model(input_ids=x).logits, base_logits)  # up-projections start at zero
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 2 * 4 and all(".bottleneck_adapter." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 3 * 2 * (64 * 8 + 8 + 8 * 64 + 64)
    model.train()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained_logits = model(input_ids=x).logits
    assert not torch.allclose(trained_logits, base_logits)
    save_bottleneck_adapter(model, tmp_path, r)
    loaded = load_bottleneck_adapter(tiny_model(model_type), tmp_path)
    torch.testing.assert_close(loaded(input_ids=x).logits, trained_logits, atol=1e-6, rtol=0)
    other = "gpt2" if model_type != "gpt2" else "llama"
    with pytest.raises(UserError, match=f"trained on a {model_type} model"):
        load_bottleneck_adapter(tiny_model(other), tmp_path)


def test_ia3_targets_default_to_peffts_mapping_or_the_recipes() -> None:
    def scaled(model: Any) -> dict[str, bool]:
        return {n.rsplit(".", 1)[-1]: m.is_feedforward for n, m in model.named_modules() if hasattr(m, "ia3_l")}

    assert scaled(apply_method(tiny_model("llama"), recipe(method="ia3"))) == \
        {"k_proj": False, "v_proj": False, "down_proj": True}
    assert scaled(apply_method(tiny_model("gpt2"), recipe(method="ia3"))) == {"c_attn": False, "c_proj": True}
    custom = apply_method(tiny_model("llama"), recipe(method="ia3", ia3={"target_modules": ["q_proj", "down_proj"]}))
    assert scaled(custom) == {"q_proj": False, "down_proj": True}
    with pytest.raises(UserError, match="ia3.target_modules: .*not found"):
        apply_method(tiny_model("llama"), recipe(method="ia3", ia3={"target_modules": ["qkv"]}))
    with pytest.raises(UserError, match="ia3.feedforward_modules: q_proj not in ia3.target_modules"):
        apply_method(tiny_model("llama"), recipe(method="ia3", ia3={"feedforward_modules": ["q_proj"]}))


def test_prompt_tuning_starts_from_the_init_text_embeddings() -> None:
    from ft_cli.model import load_base_model, load_tokenizer, resolve_model_path

    r = recipe(method="prompt_tuning", prompt={"num_virtual_tokens": 6, "init_text": "Answer briefly"})
    path = resolve_model_path(r.model)
    model = apply_method(load_base_model(r, path), r)
    ids = load_tokenizer(r, path)("Answer briefly")["input_ids"]
    ids = (ids * 6)[:6]  # peft repeats the text's tokens to fill the virtual tokens
    virtual = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(virtual, model.get_input_embeddings().weight[ids], atol=0, rtol=0)


def test_lora_target_modules_that_match_nothing_name_the_field() -> None:
    with pytest.raises(UserError, match="lora.target_modules: .*not found"):
        apply_method(tiny_model("llama"), recipe(method="lora", lora={"target_modules": ["c_attn"]}))


# Recipe rules the methods need ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sections", "expected"), [
    ({"method": "prefix_tuning", "prompt": {"init_text": "hi"}}, "prompt.init_text: only applies to prompt_tuning"),
    ({"method": "prompt_tuning", "data": {"train": "x", "packing": True}}, "data.packing: cannot be used with "
                                                                           "prompt_tuning"),
    ({"method": "prefix_tuning", "data": {"train": "x", "packing": True}}, "data.packing: cannot be used with "
                                                                           "prefix_tuning"),
    ({"method": "prefix_tuning", "train": {"gradient_checkpointing": True}},
     "train.gradient_checkpointing: does not work with prefix_tuning"),
    ({"method": "ia3", "ia3": {"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}},
     "ia3.feedforward_modules: down_proj not in ia3.target_modules"),
    ({"method": "lora", "train": {"mixed_precision": False}},
     "train.mixed_precision: applies to method full or freeze"),
])
def test_recipe_rules(sections: dict, expected: str) -> None:
    with pytest.raises(UserError, match=re.escape(expected)):
        recipe_from_dict({"model": {"name_or_path": "x"}, "data": {"train": "x"}, **sections})


def test_mixed_precision_applies_to_16bit_whole_model_training_only() -> None:
    def r(method: str, dtype: str, **train: Any) -> Any:
        return recipe(method=method, model={"name_or_path": "x", "dtype": dtype}, train=train)

    assert (r("full", "bfloat16").autocast_dtype, r("full", "bfloat16").weights_dtype) == ("bfloat16", "float32")
    assert r("freeze", "float16").autocast_dtype == "float16"
    assert r("full", "bfloat16", mixed_precision=False).weights_dtype == "bfloat16"
    for plain in (r("full", "float32"), r("lora", "bfloat16"), r("qlora", "bfloat16")):
        assert plain.autocast_dtype is None and plain.weights_dtype == plain.model.dtype
        assert "train.mixed_precision" not in plain.training_fingerprint()  # no effect: resuming ignores it
    assert r("lora", "bfloat16", mixed_precision=True).train.mixed_precision  # true is harmless anywhere
    assert r("full", "bfloat16").training_fingerprint()["train.mixed_precision"] is True


def test_prefix_tuning_turns_gradient_checkpointing_off_by_default() -> None:
    assert recipe(method="prefix_tuning").train.gradient_checkpointing is False
    assert recipe(method="prompt_tuning").train.gradient_checkpointing is True


# Generation uses what was trained, for every method -----------------------------------------------------------

GENERATE_RUNS = ["lora", "qlora-nf4", "dora", "ia3", "prompt_tuning", "prefix_tuning", "adapter", "full-bf16",
                 "freeze"]
PROMPTS = ["Which colour goes with the apple?", "Which colour goes with the lamp?", "Which colour goes with the music?"]


def hand_greedy(model: Any, prompt: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding written out: the whole sequence through the model's forward at every step (no KV cache, no
    generate()), the most likely next token appended until a stop token."""
    ids, reply = list(prompt), []
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].float().argmax())
            if token in stops:
                break
            reply.append(token)
            ids.append(token)
    return reply


@pytest.mark.parametrize("name", GENERATE_RUNS)
def test_greedy_generation_uses_what_was_trained(trained, name: str) -> None:
    """ft eval --generate and ft generate decode exactly what the trained model's forward predicts, and differ from
    the base model's generation wherever the logits do (prefix tuning used to generate as the base model)."""
    from typer.testing import CliRunner

    from ft_cli.cli import app
    from ft_cli.evaluate import greedy_generate, stop_token_ids
    from ft_cli.generation import render_prompt
    from ft_cli.loading import load_run

    t = trained(name)
    model, tok, recipe = load_run(t.run)  # as ft eval loads it
    prompts = [render_prompt(tok, text) for text in PROMPTS]
    stops = stop_token_ids(model, tok)
    by_hand = [hand_greedy(model, p, stops, 8) for p in prompts]
    expected = [tok.decode(r, skip_special_tokens=True).strip() for r in by_hand]
    assert greedy_generate(model, tok, prompts, max_new_tokens=8, device="cpu", batch_size=3) == expected

    # ft generate folds an unquantized LoRA/DoRA/IA3 adapter into the base first: compare with that model
    merged = recipe.spec.merges and not recipe.quantized
    cli_model = load_run(t.run, merged=True)[0] if merged else model
    want = tok.decode(hand_greedy(cli_model, prompts[0], stops, 8), skip_special_tokens=True).strip()
    result = CliRunner().invoke(app, ["generate", str(t.run), "-p", PROMPTS[0], "--temperature", "0",
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == want

    base = base_model(t)
    base_replies = greedy_generate(base, tok, prompts, max_new_tokens=8, device="cpu", batch_size=3)
    first_differs = []
    with torch.no_grad():
        for p, reply, base_reply in zip(prompts, expected, base_replies, strict=True):
            ids = torch.tensor([p])
            differs = bool(model(input_ids=ids).logits[0, -1].argmax() != base(input_ids=ids).logits[0, -1].argmax())
            first_differs.append(differs)
            if differs:
                assert reply != base_reply, (reply, base_reply)
    assert any(first_differs)  # training changed what the model says


def test_peft_and_transformers_still_disagree_on_the_cache_name(trained) -> None:
    """What ft_cli.generation works around, pinned: without it, prefix tuning generates exactly as the base model.
    When this fails, a new peft or transformers fixed it: check whether prompt_learning_generation is still needed."""
    import peft
    import transformers

    from ft_cli.generation import prompt_learning_generation, render_prompt
    from ft_cli.loading import load_run

    model, tok, _ = load_run(trained("prefix_tuning").run)
    ids = torch.tensor([render_prompt(tok, PROMPTS[0])])
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    with torch.no_grad():
        plain = model.generate(input_ids=ids, **kwargs)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, **kwargs)
        with prompt_learning_generation(model):
            fixed = model.generate(input_ids=ids, **kwargs)
    versions = f"peft {peft.__version__}, transformers {transformers.__version__}"
    assert torch.equal(plain, base), f"{versions}: prefix tuning now generates with its prefix without ft's help"
    assert not torch.equal(fixed, base)


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning"])
def test_ft_serve_decodes_prompt_learning_adapters_with_what_was_trained(trained, name: str) -> None:
    """ft serve (one request at a time, and --max-batch) answers what the trained model's forward predicts."""
    from ft_cli.evaluate import stop_token_ids
    from ft_cli.generation import render_prompt
    from ft_cli.serve import load_engine, plan_serve
    from ft_cli.serve.engine import Job, Params

    t = trained(name)
    engine = load_engine(plan_serve(str(t.run), []), device="cpu", max_batch=4)
    adapter = next(n for n in engine.names if n != "base")
    tok = engine.tokenizers[adapter]
    prompts = [render_prompt(tok, text) for text in PROMPTS]
    stops = stop_token_ids(engine.model, tok)
    with engine.selected(adapter):
        expected = [tok.decode(hand_greedy(engine.model, p, stops, 8), skip_special_tokens=True) for p in prompts]
    params = Params(max_new_tokens=8, temperature=0, top_p=1)
    assert [engine.generate(adapter, p, params).text for p in prompts] == expected
    if name == "prefix_tuning":  # left-padded rows keep their positions: batching is safe
        assert [r.text for r in engine.generate_batch([Job(adapter, p, params) for p in prompts])] == expected
    engine.decodes.clear()
    futures = [engine.submit(adapter, p, params) for p in prompts]  # the queue may batch them (max_batch 4)
    assert [f.result(timeout=300).text for f in futures] == expected
    if name == "prompt_tuning":  # never batched: padding would move its tokens to other positions
        assert {size for _, size in engine.decodes} == {1}
    engine.close()
