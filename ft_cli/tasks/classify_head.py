"""`task: classification`, the model: AutoModelForSequenceClassification's keyword arguments, the new head
(trained by every method; ft_cli/tasks/classification.py describes how), and what each output directory saves
beside the method's weights: the label names (LABELS_FILE) and a bottleneck run's head."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft_cli.errors import UserError

if TYPE_CHECKING:
    from ft_cli.recipe import Recipe

LABELS_FILE = "ft_classification.json"


@dataclass(frozen=True)
class Head:
    """What the classification head needs to know when the model loads."""

    labels: list[str]
    pad_token_id: int | None


def model_kwargs(head: Head) -> dict[str, Any]:
    """from_pretrained keyword arguments for AutoModelForSequenceClassification."""
    kwargs: dict[str, Any] = {"num_labels": len(head.labels), "id2label": dict(enumerate(head.labels)),
                              "label2id": {n: i for i, n in enumerate(head.labels)},
                              "problem_type": "single_label_classification"}
    if head.pad_token_id is not None:
        kwargs["pad_token_id"] = head.pad_token_id
    return kwargs


HEAD_NAMES = ("classifier", "score")  # what transformers calls the head (peft's SEQ_CLS modules_to_save)
NEW_MODULES = "ft_new_modules"  # the attribute record_new_modules sets on the model


def record_new_modules(model: Any, missing_keys: Any) -> None:
    """Remember the modules outside the backbone that from_pretrained initialised at random (their weights are not
    in the checkpoint): the head, and in some families more — DeBERTa-v2 adds a pooler (`pooler.dense`) that its
    masked-LM checkpoints do not have. Every method trains and saves them in full like the head: left frozen, a random
    layer would differ on every load (and LoRA on it would learn around noise that the reload does not have)."""
    import torch

    backbone = getattr(model, "base_model_prefix", "")
    names = {key.split(".", 1)[0] for key in missing_keys if "." in key} - {backbone}
    setattr(model, NEW_MODULES, sorted(n for n in names if isinstance(getattr(model, n, None), torch.nn.Module)))


def extra_head_names(model: Any) -> list[str]:
    """The new modules (record_new_modules) besides HEAD_NAMES: what peft's SEQ_CLS modules_to_save must add."""
    return [n for n in getattr(model, NEW_MODULES, ()) if n not in HEAD_NAMES]


def head_modules(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the classification head of a transformers model: the module transformers calls classifier
    or score, and any other new module (record_new_modules)."""
    names = set(HEAD_NAMES) | set(extra_head_names(model))
    out = [(n, m) for n, m in model.named_modules() if n in names]
    if not out:
        raise UserError(f"cannot find the classification head of this {type(model).__name__} (a module named "
                        f"{' or '.join(HEAD_NAMES)})")
    return out


def train_head(model: Any, recipe: Recipe) -> None:
    """freeze and ft's bottleneck adapters freeze what they do not train: the new head must train all the same
    (peft methods get it through task_type SEQ_CLS; full trains everything). The head trains in float32."""
    if recipe.method not in ("freeze", "adapter"):
        return
    import torch

    for _, module in head_modules(model):
        module.requires_grad_(True)
        if recipe.method == "adapter":
            module.to(torch.float32)
            _cast_head_input(module)


def _cast_head_input(module: Any) -> None:
    """A float32 head on a 16-bit base: feed it its own dtype (its output stays float32 for the loss)."""
    def pre(mod: Any, args: tuple) -> tuple:
        dtype = next(mod.parameters()).dtype
        return tuple(a.to(dtype) if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args)

    module.register_forward_pre_hook(pre)


def head_state(model: Any) -> dict[str, Any]:
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, module in head_modules(model)
            for k, v in module.state_dict().items()}


HEAD_FILE = "classifier_head.safetensors"


def save_extras(model: Any, out: Path, recipe: Recipe, labels: list[str]) -> None:
    """Beside what the method saved: the label names (every method) and, for ft's bottleneck adapters, the head."""
    if recipe.method == "adapter":
        from safetensors.torch import save_file

        save_file(head_state(model), str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / LABELS_FILE).write_text(json.dumps({"task": "classification", "labels": labels}, indent=2) + "\n",
                                   encoding="utf-8")


def load_head(model: Any, adapter_dir: Path) -> None:
    """Put a bottleneck run's saved head into `model` (load_adapter calls this)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / HEAD_FILE))
    # the modules the file holds (the head and any other new module), whatever this model's own load reported
    for name in sorted({k.split(".", 1)[0] for k in saved}):
        module = getattr(model, name, None)
        if not isinstance(module, torch.nn.Module):
            raise UserError(f"{adapter_dir / HEAD_FILE}: holds {name}, which this {type(model).__name__} has not")
        own = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
        module.to(torch.float32)
        module.load_state_dict(own)
        _cast_head_input(module)


def run_labels(output: Path) -> list[str]:
    path = Path(output) / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{output}: no {LABELS_FILE}; not the output of a classification run")
    return list(json.loads(path.read_text(encoding="utf-8"))["labels"])
