"""Several adapters on one base model: which runs may share a base, and loading them as named PEFT adapters.

Used by `ft serve` (one base in memory, the request picks the adapter) and `ft merge --combine` (peft's
add_weighted_adapter). Two runs share a base when they were trained on the same base model (the same directory,
built-in build or hub id), loaded the same way: same model.dtype, same quantization. Anything else is refused with
exit 2 naming the two runs and what differs: an adapter on a base it was not trained for computes something else.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import Recipe

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
BASE_NAME = "base"  # the name that selects the base model with no adapter


@dataclass(frozen=True)
class RunAdapter:
    """One run's adapter, ready to be loaded onto a shared base under `name`."""

    name: str
    run: Path  # the run directory
    path: Path  # its adapter/ (or best/)
    recipe: Recipe
    base_path: str  # where the base model it was trained on is now (run_base_path)
    peft_type: str  # adapter_config.json's peft_type, e.g. LORA
    rank: int | None  # LoRA rank (the largest in rank_pattern), None for other methods
    use_dora: bool

    @property
    def base_key(self) -> dict[str, Any]:
        """What must agree between runs for them to share one loaded base."""
        q = self.recipe.quantization if self.recipe.quantized else None
        return {"base model": _same_path(self.base_path), "model.dtype": self.recipe.model.dtype,
                "quantization": q.model_dump() if q is not None else None,
                "model.trust_remote_code": self.recipe.model.trust_remote_code}


def _same_path(path: str) -> str:
    p = Path(path)
    return os.path.realpath(p) if p.exists() else path


def check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise UserError(f"{what}: adapter name {name!r} must be 1-64 letters, digits, '.', '_', ':' or '-' "
                        "(it is the `model` clients send)")
    if name == BASE_NAME:
        raise UserError(f"{what}: the name {BASE_NAME!r} is reserved for the base model without an adapter")
    return name


def run_adapter(run_dir: str | Path, name: str | None = None, which: str = "final", what: str = "") -> RunAdapter:
    """The PEFT adapter of a run directory (or of its adapter/ or best/), named `name` (default: the run's
    directory name). Whole-model runs and bottleneck adapters are refused: they are not PEFT adapters."""
    from ft_cli.loading import resolve_target, run_base_path

    what = what or str(run_dir)
    target = resolve_target(run_dir, which)  # type: ignore[arg-type]
    if target.kind != "run" or target.recipe is None:
        raise UserError(f"{what}: {run_dir} is a model directory, not a run with an adapter; serve it as the base "
                        "(the first argument) or pass a run directory written by ft train")
    recipe = target.recipe
    if recipe.spec.whole_model:
        raise UserError(f"{what}: {run_dir} trained the whole model (method {recipe.method}); it has no adapter to "
                        "put on a shared base; serve it on its own as the first argument")
    if not recipe.spec.peft:
        raise UserError(f"{what}: {run_dir} is a bottleneck adapter (method {recipe.method}), which peft cannot load as a "
                        "named adapter; use it with ft generate / ft eval")
    config_file = target.output / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: cannot read the adapter's config ({type(exc).__name__})") from None
    rank = config.get("r")
    if rank is not None and config.get("rank_pattern"):
        rank = max([rank, *config["rank_pattern"].values()])
    return RunAdapter(name=check_name(name or target.path.name, what), run=target.path, path=target.output,
                      recipe=recipe, base_path=run_base_path(target), peft_type=str(config.get("peft_type")),
                      rank=rank, use_dora=bool(config.get("use_dora")))


def parse_adapter_option(spec: str, which: str = "final") -> RunAdapter:
    """--adapter NAME=RUN_DIR (or just RUN_DIR: named after the directory)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if sep and not path:
        raise UserError(f"--adapter {spec!r}: expected NAME=RUN_DIR")
    return run_adapter(path, name or None, which, what=f"--adapter {spec}")


def check_shared_base(adapters: list[RunAdapter], base_path: str | None = None) -> None:
    """All adapters were trained on the same base, loaded the same way (and on `base_path` when given)."""
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"adapter name {dupes[0]!r} given twice; name them apart with --adapter NAME=RUN_DIR")
    if base_path is not None:
        for a in adapters:
            if _same_path(a.base_path) != _same_path(base_path):
                raise UserError(f"adapter {a.name!r} ({a.run}) was trained on {a.recipe.model.name_or_path} "
                                f"({a.base_path}), not on the base {base_path}")
    if not adapters:
        return
    first = adapters[0]
    for a in adapters[1:]:
        for key, value in first.base_key.items():
            if a.base_key[key] != value:
                raise UserError(f"adapters {first.name!r} ({first.run}) and {a.name!r} ({a.run}) need different "
                                f"bases: {key} is {value!r} vs {a.base_key[key]!r}; one base is loaded once, so "
                                "serve or combine them separately")
        if a.peft_type != first.peft_type:
            raise UserError(f"adapters {first.name!r} ({first.recipe.method}, {first.peft_type}) and {a.name!r} "
                            f"({a.recipe.method}, {a.peft_type}) are different kinds of PEFT adapter; one model "
                            "holds one kind")


def load_adapters(base: Any, adapters: list[RunAdapter]) -> Any:
    """A PeftModel holding every adapter under its name (the first loaded with PeftModel.from_pretrained, the
    others with load_adapter), in inference mode. Adapters stay float32 on a 16-bit base, as in training."""
    from peft import PeftModel

    model = None
    for a in adapters:
        if not (a.path / "adapter_config.json").is_file():
            raise UserError(f"{a.path}: no adapter_config.json; is the run finished?")
        if model is None:
            model = PeftModel.from_pretrained(base, str(a.path), adapter_name=a.name, is_trainable=False,
                                              autocast_adapter_dtype=True)
        else:
            model.load_adapter(str(a.path), adapter_name=a.name, is_trainable=False, autocast_adapter_dtype=True)
    assert model is not None
    model.eval()
    return model
