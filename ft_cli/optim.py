"""Optimizer and learning-rate schedule: AdamW (torch or bitsandbytes 8-bit), parameter groups for
weight decay, LoRA+ and layer-wise learning-rate decay."""

from __future__ import annotations

import math
import re
from typing import Any

from ft_cli.errors import UserError
from ft_cli.recipe import Recipe

_NO_DECAY = ("bias", "norm", "ln_", "layernorm")
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def check_optimizer_supported(recipe: Recipe, device_type: str) -> None:
    """Fail before the model loads when the optimizer cannot run here."""
    opt = recipe.train.optimizer
    if opt == "adamw_torch":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"train.optimizer: {opt} needs bitsandbytes, which is not installed; "
                        "pip install bitsandbytes, or use adamw_torch") from None
    if opt == "paged_adamw_8bit" and device_type != "cuda":
        raise UserError(f"train.optimizer: paged_adamw_8bit pages optimizer state between GPU and CPU memory and "
                        f"needs a CUDA GPU (this run is on {device_type}); use adamw_8bit or adamw_torch")


def param_groups(model: Any, recipe: Recipe) -> list[dict[str, Any]]:
    t = recipe.train
    ratio = recipe.lora.loraplus_lr_ratio if recipe.lora is not None else None
    num_layers = _num_layers(model) if t.layerwise_lr_decay else 0
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = t.lr
        if ratio and ".lora_B." in name:
            lr = t.lr * ratio  # LoRA+: B learns faster than A (Hayou et al., 2024)
        if t.layerwise_lr_decay:
            lr = t.lr * t.layerwise_lr_decay ** _depth_from_top(name, num_layers)
        wd = 0.0 if p.ndim < 2 or any(k in name.lower() for k in _NO_DECAY) else t.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def _num_layers(model: Any) -> int:
    ids = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_RE.search(n))]
    return max(ids) + 1 if ids else 0


def _depth_from_top(name: str, num_layers: int) -> int:
    """0 for the last block, final norm and head, L for the embeddings, L-1-i for block i. A head tied to the
    embeddings (GPT-2, Qwen2.5-0.5B) is the embeddings' parameter, named after them, so it gets depth L."""
    m = _LAYER_RE.search(name)
    if m:
        return num_layers - 1 - int(m.group(1))
    return num_layers if "embed" in name or ".wte." in name or ".wpe." in name else 0


def build_optimizer(model: Any, recipe: Recipe):
    t = recipe.train
    groups = param_groups(model, recipe)
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    if t.optimizer == "adamw_torch":
        import torch

        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kwargs)


def build_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    t = recipe.train
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    return LambdaLR(optimizer, LrSchedule(t.scheduler, warmup, total_steps))


class LrSchedule:
    """Linear warm-up, then cosine / linear decay to 0 or constant. A class (not a closure) so it pickles.

    After the warm-up this is exactly transformers' get_scheduler("cosine" | "linear" | "constant_with_warmup")
    (tests/test_optim.py compares them step by step). The warm-up differs on purpose: transformers' is
    step / warmup, so the first optimizer step runs at lr 0 and changes nothing (a step, and its batch, wasted);
    ft's is (step + 1) / (warmup + 1), which starts at lr / (warmup + 1) and reaches the full lr on the step after
    the warm-up, as transformers' does. ft also keeps its own class because resuming a longer run re-plans the
    decay (replan_schedule sets `total`), which transformers' closures do not allow."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def replan_schedule(scheduler: Any, total_steps: int) -> int | None:
    """Resuming: the learning rate of the remaining steps follows the schedule of a run planned for `total_steps`
    from the start; returns the total the checkpoint's schedule was planned for.

    A checkpoint's scheduler state carries the schedule it was made with (LrSchedule pickles its total), so
    without this a run extended with --set train.max_steps / train.epochs would stay on the old schedule: a
    finished cosine or linear run sits at lr 0 and every added step trains nothing. The warm-up stays as it was
    (its steps are in the past); only the length of the decay changes. Same total: nothing changes."""
    old = None
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, LrSchedule):
            old = fn.total
            fn.total = max(total_steps, 1)
    # The optimizer holds the lr of the next step (restored from the checkpoint): recompute it on the new plan.
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return old


def remaining_lr_peak(scheduler: Any, total_steps: int) -> float:
    """The highest learning rate any remaining optimizer step will use (of the largest parameter group)."""
    base = max(scheduler.base_lrs)
    fn = scheduler.lr_lambdas[scheduler.base_lrs.index(base)]
    return max((base * fn(step) for step in range(scheduler.last_epoch, total_steps)), default=0.0)
