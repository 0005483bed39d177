"""Load what a run produced — or a plain model directory — ready for `ft eval`, `ft merge` and `ft generate`.

A run directory holds recipe.yaml plus adapter/ (PEFT methods, bottleneck adapters) or model/ (full, freeze);
best/ is a copy of that output at the best eval_loss. adapter/ and model/ hold the LAST step, best/ the best.
A model directory is anything `AutoModelForCausalLM.from_pretrained` loads (e.g. the output of `ft merge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ft_cli.errors import UserError
from ft_cli.methods.peft_common import load_peft_adapter  # noqa: F401  (ft_cli.loading.load_peft_adapter)
from ft_cli.methods.registry import method_spec
from ft_cli.recipe import Recipe, recipe_from_dict
from ft_cli.run_dir import RunDir

Which = Literal["final", "best"]


@dataclass(frozen=True)
class Target:
    """What a path on the command line points at: `run` (with its recipe and chosen output), `model` (a model
    directory) or `hub` (a Hugging Face model id, cached or downloadable)."""

    kind: Literal["run", "model", "hub"]
    path: Path  # the run root, or the model directory (for a hub id: the id)
    output: Path  # adapter/, model/ or best/ of a run; the model directory (or hub id) itself otherwise
    recipe: Recipe | None

    @property
    def method(self) -> str | None:
        return self.recipe.method if self.recipe else None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_run_recipe(run: RunDir) -> Recipe:
    """The resolved recipe a run was trained with (absolute data and model paths)."""
    import yaml

    try:
        raw = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{run.recipe}: cannot read the run's recipe ({type(exc).__name__})") from None
    return recipe_from_dict(raw, source=str(run.recipe))


def resolve_target(path: str | Path, which: Which = "final") -> Target:
    """Classify PATH: a run directory, a run's adapter/ or best/ directory, or a model directory."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_ID.match(str(path)) and not str(path).startswith((".", "~")):
            return _hub_target(str(path), which)
        raise UserError(f"{p}: no such directory")
    if not p.is_dir():
        raise UserError(f"{p}: expected a run directory or a model directory, got a file")
    if which not in ("final", "best"):
        raise UserError(f"--which: must be final or best, got {which!r}")
    run = RunDir(p)
    if run.recipe.is_file():
        recipe = read_run_recipe(run)
        if which == "best":
            if not run.best.is_dir():
                raise UserError(f"{p}: no best/ inside; best/ is written when the run evaluates (train.eval_every "
                                "with eval data); use --which final")
            return Target("run", p, run.best, recipe)
        return Target("run", p, run.final_output(), recipe)
    # RUN/adapter or RUN/best named directly: an adapter needs the run's recipe to find its base model.
    parent = RunDir(p.parent)
    adapter_files = ("adapter_config.json", "ft_adapter_config.json")  # peft, ft bottleneck
    if any((p / f).is_file() for f in adapter_files) and parent.recipe.is_file() and p.name in ("adapter", "best"):
        return Target("run", parent.root, p, read_run_recipe(parent))
    if (p / "config.json").is_file():
        if which != "final":
            raise UserError(f"--which {which}: applies to run directories (best/ is a run's); {p} is a model "
                            "directory")
        return Target("model", p, p, None)
    if (p / "adapter_config.json").is_file():
        raise UserError(f"{p}: a PEFT adapter outside an ft run directory; pass the run directory (the one with "
                        "recipe.yaml), or merge it into a model directory first")
    raise UserError(f"{p}: not an ft run directory (no recipe.yaml) and not a model directory (no config.json)")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_target(repo_id: str, which: Which) -> Target:
    """`org/name` that is no local path: a hub model, if it is cached or the hub is reachable (fails fast)."""
    from ft_cli.model import check_hub_reachable

    if which != "final":
        raise UserError(f"--which: applies to run directories; {repo_id} is a hub model id")
    try:
        check_hub_reachable(repo_id, None)
    except UserError as exc:
        reason = exc.message.removeprefix("model.name_or_path: ")
        raise UserError(f"{repo_id}: no such directory, and as a hub model id: {reason}") from None
    return Target("hub", Path(repo_id), Path(repo_id), None)


def load_run(run_dir: str | Path, which: Which = "final", device: Any = "cpu", merged: bool = False,
             quantize: bool | None = None) -> tuple[Any, Any, Recipe | None]:
    """(model, tokenizer, recipe) for a run directory or a model directory; recipe is None for the latter.

    Adapter runs load the base (quantized as in training unless `quantize=False`) and put the adapter on it;
    `merged=True` folds a LoRA/DoRA/IA3 adapter into an unquantized base (faster generation).
    """
    target = resolve_target(run_dir, which)
    return load_target(target, device=device, merged=merged, quantize=quantize)


def load_target(target: Target, *, device: Any = "cpu", merged: bool = False,
                quantize: bool | None = None) -> tuple[Any, Any, Recipe | None]:
    if target.kind in ("model", "hub"):
        tokenizer = load_model_dir_tokenizer(target.output)
        model = load_model_dir(target.output, device=device)
        return model, tokenizer, None
    recipe = target.recipe
    assert recipe is not None
    tokenizer = load_run_tokenizer(recipe, target.output)
    model = load_run_model(recipe, target.output, device=device, merged=merged, quantize=quantize,
                           base_path=run_base_path(target))
    return model, tokenizer, recipe


def run_base_path(target: Target) -> str:
    """Where the run's base model is now. A built-in is rebuilt under a new name when ft's build of it changes;
    the exact build the run trained on (recorded in run.json) is preferred while it is still in the cache."""
    from ft_cli.builtin_models import is_builtin
    from ft_cli.model import resolve_model_path

    assert target.recipe is not None
    recorded = RunDir(target.path).read_manifest().get("base_model_path")
    if recorded and is_builtin(target.recipe.model.name_or_path) and Path(recorded, "config.json").is_file():
        return str(recorded)
    return resolve_model_path(target.recipe.model)


def load_run_tokenizer(recipe: Recipe, output: Path) -> Any:
    """The tokenizer saved with the run's output (it carries the chat template training used)."""
    from ft_cli.model import load_tokenizer

    source = output if (output / "tokenizer_config.json").is_file() else None
    return load_tokenizer(recipe, str(source) if source else None)


def load_run_model(recipe: Recipe, output: Path, *, device: Any = "cpu", merged: bool = False,
                   quantize: bool | None = None, dtype: str | None = None, base_path: str | None = None) -> Any:
    """The trained model of a run: base + adapter (PEFT, bottleneck), or the saved whole model (full, freeze).

    `dtype` overrides the recipe's model.dtype (the dtype the base is loaded in); `base_path` the base's
    location (default: the recipe's model.name_or_path, see run_base_path).

    A whole model trained under mixed precision was evaluated during training on its float32 master weights
    under autocast; what was saved (and is loaded here, in model.dtype, as it will be deployed) is those weights
    rounded to model.dtype, so its scores differ from the logged ones by that rounding (~0.1% in eval loss on the
    tiny test model). Mirroring the autocast here would not remove it: the float32 weights are not saved."""
    if recipe.task == "classification":
        raise UserError(f"{output.parent}: a classification run (task: classification); this command works on "
                        "language-model runs; use ft eval, ft predict or ft merge")
    if dtype is not None and dtype != recipe.model.dtype:
        recipe = recipe.model_copy(deep=True)
        recipe.model.dtype = dtype  # type: ignore[assignment]
    spec = method_spec(recipe.method)
    if spec.whole_model:
        return load_model_dir(output, device=device, dtype=recipe.model.dtype,
                              trust_remote_code=recipe.model.trust_remote_code)
    if merged and not spec.merges:
        raise UserError(f"method {recipe.method}: the adapter cannot be merged into the base weights")
    quantize = recipe.quantized if quantize is None else quantize
    if merged:
        quantize = False  # never fold an adapter into quantized weights
    base = load_base(recipe, device=device, quantize=quantize, path=base_path)
    from ft_cli.methods.apply import load_trained

    model = load_trained(base, output, recipe)
    if merged:
        model = model.merge_and_unload()
    if not quantize:
        model.to(device)
    model.eval()
    return model


def load_base(recipe: Recipe, *, device: Any = "cpu", quantize: bool | None = None, path: str | None = None) -> Any:
    """The run's base model as training saw it, so scores match the ones logged during training: in model.dtype,
    with bitsandbytes layers when quantized and everything else (embeddings, head, norms) left in model.dtype, as
    ft.methods.apply.prepare_quantized leaves it. (Runs trained before that change had those upcast to float32; their
    scores now differ from the logged ones by bf16 rounding.)"""
    from ft_cli.model import load_base_model, resolve_model_path

    quantize = recipe.quantized if quantize is None else quantize
    return load_base_model(recipe, path or resolve_model_path(recipe.model), device=device, quantize=quantize)


def load_model_dir(path: Path, *, device: Any = "cpu", dtype: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """A standalone model directory, in its saved dtype unless `dtype` is given."""
    from transformers import AutoModelForCausalLM

    from ft_cli.model import torch_dtype

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype(dtype) if dtype else "auto", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model: {exc}") from None
    model.to(device)
    model.eval()
    return model


def load_model_dir_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    from ft_cli.model import check_tokenizer_files, ensure_pad_token

    check_tokenizer_files(path, field=None)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the tokenizer: {exc}") from None
    ensure_pad_token(tok)
    return tok
