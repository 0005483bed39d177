"""The method registry (ft_cli.methods.registry) is the one source of method facts: every method the recipe schema
accepts has an entry and every entry is a method the schema accepts; each entry's section, apply function and
capabilities are real, and the recipe enforces what the entries say."""

from __future__ import annotations

import inspect
import typing

import pytest

from ft_cli.errors import UserError
from ft_cli.methods.registry import METHODS, MethodSpec
from ft_cli.recipe import Recipe, recipe_from_dict

SECTIONS = {"lora", "freeze", "prompt", "bottleneck", "ia3"}


def _recipe(method: str, **extra) -> Recipe:
    return recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "method": method,
                             "data": {"train": "x.jsonl"}, **extra})


def test_schema_methods_are_the_registry():
    schema = typing.get_args(Recipe.model_fields["method"].annotation)
    assert list(schema) == list(METHODS)
    assert list(METHODS) == ["lora", "qlora", "dora", "full", "freeze", "ia3", "prompt_tuning", "prefix_tuning",
                             "adapter"]  # the order docs/recipe.md and `ft schema` list them in
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name


def test_every_method_section_belongs_to_a_method_and_back():
    used = {s.section for s in METHODS.values()} - {None}
    assert used == SECTIONS
    for section in SECTIONS:
        assert section in Recipe.model_fields, section


@pytest.mark.parametrize("name", list(METHODS))
def test_entry_is_real(name):
    spec = METHODS[name]
    fn = spec.apply_fn()
    assert callable(fn) and list(inspect.signature(fn).parameters)[:2] == ["model", "recipe"]
    assert spec.tasks and set(spec.tasks) <= set(typing.get_args(typing.get_type_hints(MethodSpec)["tasks"]
                                                                 .__args__[0]))
    for capability in ("merges", "packs", "gradient_checkpointing"):
        if not getattr(spec, capability) and not (capability == "merges" and spec.whole_model):
            assert spec.why_not.get(capability), f"{name}: {capability} is off without a reason for the user"
    recipe = _recipe(name)
    assert recipe.spec is spec
    if spec.section:  # the method's section gets its defaults
        assert getattr(recipe, spec.section) is not None
    assert recipe.quantized == (spec.quantized_base == "required")
    assert recipe.is_peft == (not spec.whole_model)


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if not s.packs])
def test_registry_refuses_packing(name):
    with pytest.raises(UserError, match=f"data.packing: cannot be used with {name}"):
        recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "method": name,
                          "data": {"train": "x.jsonl", "packing": True}})


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.quantized_base == "never"])
def test_registry_refuses_quantized_base(name):
    with pytest.raises(UserError, match="quantization"):
        _recipe(name, quantization={"bits": 4})


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.quantized_base == "optional"])
def test_registry_allows_quantized_base(name):
    assert _recipe(name, quantization={"bits": 4}).quantized


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if not s.merges and not s.whole_model])
def test_merge_refusal_comes_from_the_registry(name):
    from ft_cli.merge import _check_mergeable

    with pytest.raises(UserError, match=f"method {name}: "):
        _check_mergeable(_recipe(name))


def test_sections_of_other_methods_are_refused():
    for name, spec in METHODS.items():
        for section in SECTIONS - {spec.section}:
            with pytest.raises(UserError, match=f"{section}: is only used by method"):
                _recipe(name, **{section: {}})


class _NoTokenizer:
    def save_pretrained(self, out) -> None:
        pass


@pytest.mark.parametrize("name", ["lora", "adapter", "full"])  # one method per kind of output (MethodSpec.saves)
def test_outputs_take_weights_from_an_explicit_state_dict(name, tmp_path):
    """Under FSDP / ZeRO-3 the model in memory holds shards; training gathers the whole state dict and hands it to
    save_trained, which must write the weights from it (not from the model) for every kind of output."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_cli.methods.apply import apply_method, save_trained

    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    recipe = _recipe(name, model={"name_or_path": "builtin:tiny-llama", "dtype": "float32"})
    model = apply_method(AutoModelForCausalLM.from_config(config), recipe)
    whole = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}  # the "gathered" weights
    save_trained(model, _NoTokenizer(), tmp_path, recipe, state_dict=dict(whole))  # transformers empties it
    saved = load_file(str(next(tmp_path.glob("*.safetensors"))))
    if METHODS[name].peft:
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model, state_dict=whole)
    else:
        expected = {k: v for k, v in whole.items() if k in saved}
    assert saved and set(saved) == set(expected)
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert len(saved) >= (len(trained) if name == "adapter" else 1)
    for key, tensor in saved.items():
        assert torch.equal(tensor, expected[key]), key


def test_a_value_the_method_rules_out_is_derived_and_shown_not_silent(tmp_path):
    """prefix_tuning cannot use gradient checkpointing: the default (on) becomes off, and `ft validate` says so;
    asking for it explicitly is an error naming the field."""
    from typer.testing import CliRunner

    from ft_cli.cli import app

    recipe = _recipe("prefix_tuning")
    assert recipe.train.gradient_checkpointing is False
    assert "prefix_tuning" in recipe.derived["train.gradient_checkpointing"]
    assert _recipe("lora").derived == {}
    with pytest.raises(UserError, match="train.gradient_checkpointing: does not work with prefix_tuning"):
        _recipe("prefix_tuning", train={"gradient_checkpointing": True})
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: 'builtin:tiny-llama'}\nmethod: prefix_tuning\ndata: {train: x.jsonl}\n")
    result = CliRunner().invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "train.gradient_checkpointing" in flat and "prefix_tuning" in flat


def test_cross_field_errors_are_all_reported_at_once():
    with pytest.raises(UserError) as caught:
        _recipe("prefix_tuning", quantization={"bits": 4}, freeze={}, prompt={"init_text": "hi"},
                data={"train": "x.jsonl", "packing": True}, train={"layerwise_lr_decay": 0.9})
    lines = str(caught.value).splitlines()
    for needle in ("freeze: is only used by method freeze", "prompt.init_text: only applies to prompt_tuning",
                   "data.packing: cannot be used with prefix_tuning", "train.layerwise_lr_decay: applies to method"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
