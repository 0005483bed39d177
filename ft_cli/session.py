"""What `ft train` sets up before its loop: checks (resume, lock, disk space), tokenizer, data, batches, model,
optimizer and schedule on accelerate, the run directory and run.json, gathered in one `Session` for `fit()`
(ft_cli.train). The state a resume continues with besides the weights is `TrainState`."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ft_cli.atomic import is_disk_full, write_text_atomic
from ft_cli.errors import UserError
from ft_cli.manifest import start_manifest
from ft_cli.recipe import Recipe, dump_recipe
from ft_cli.run_dir import RunDir, check_run_dir, prepare_run_dir


@dataclass
class TrainState:
    """What a resume continues with besides weights, optimizer and step: the evaluations' outcome. A checkpoint's
    state.json stores these keys (as_dict), next to its own bookkeeping; older checkpoints without some of them
    resume with the defaults."""

    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0  # early-stopping patience used up
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    best_score: float | None = None  # the best value of train.best_metric (classification: accuracy, f1, ...)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Session:
    recipe: Recipe
    recipe_path: Path
    run: RunDir
    accelerator: Any
    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    data: Any  # ft_cli.data.pipeline.DataBundle
    task: Any  # ft_cli.tasks.CausalLM or Classification: data, batches, loss and evaluation of recipe.task
    collate: Any
    batches: Any  # ft_cli.batches.MicroBatches
    total_steps: int
    start_step: int = 0
    pending_eval: bool = False  # resumed from a checkpoint written just before its step's evaluation
    state: TrainState = field(default_factory=TrainState)
    manifest: dict[str, Any] = field(default_factory=dict)
    lock: Any = None  # ft_cli.run_lock.RunLock on the main process: this run's hold on its directory


def setup(recipe: Recipe, recipe_path: Path, *, resume: bool, overwrite: bool) -> Session:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ft_cli.preflight import preflight

    run = RunDir(Path(recipe.output_dir or "runs/run"))
    accelerator = preflight(recipe, run, resume=resume)  # accelerator, launch, DeepSpeed, dtype, kernels, trackers
    # Every rank checks the run directory before any rank changes it, so a refusal is raised everywhere; then the
    # main process locks it for the whole run. Nothing else in it changes until tokenizer, data and model have
    # loaded: bad input writes nothing (a directory made only for the lock is removed again).
    check_run_dir(run, resume=resume, overwrite=overwrite)
    lock = _lock_run_dir(run, accelerator, resume=resume, overwrite=overwrite)
    try:
        return _setup_locked(recipe, recipe_path, run, accelerator, lock, resume=resume)
    except BaseException as exc:
        if lock is not None:
            lock.abandon()
        if isinstance(exc, Exception) and not isinstance(exc, UserError) and is_disk_full(exc, run.root):
            raise UserError(f"output_dir {run.root}: disk full while setting up the run ({exc}); free space and "
                            "run the command again") from None
        raise


def _setup_locked(recipe: Recipe, recipe_path: Path, run: RunDir, accelerator: Any, lock: Any, *,
                  resume: bool) -> Session:
    from accelerate.utils import set_seed

    from ft_cli.batches import MicroBatches
    from ft_cli.batches import total_steps as count_steps
    from ft_cli.data.audit import data_notes
    from ft_cli.model import build_model, load_tokenizer
    from ft_cli.optim import build_optimizer, build_scheduler
    from ft_cli.tasks import task_for

    resume_from = _check_resume(run, recipe, accelerator) if resume else None

    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    task = task_for(recipe)
    data = task.build_datasets(tokenizer, main_process_first=accelerator.main_process_first)
    if accelerator.is_main_process:
        for line in data_notes(data):  # rows dropped or cut, and why: never silently
            print(line, file=sys.stderr)
    t = recipe.train
    batches = MicroBatches(len(data.train), t.micro_batch_size, world_size=accelerator.num_processes,
                           rank=accelerator.process_index, seed=t.seed, shuffle=recipe.data.shuffle,
                           lengths=_row_lengths(data.train) if recipe.data.group_by_length else None)
    total_steps = count_steps(t.max_steps, t.epochs, batches.per_epoch, t.grad_accum)
    sized = _check_disk_space(recipe, run, total_steps)
    set_seed(recipe.train.seed)  # data building must not shift the model's initial weights
    built = build_model(recipe, device=accelerator.device, head=task.head(tokenizer, data))
    if not sized:  # the config was not on disk before the model loaded: size the run from the model itself
        _check_disk_space(recipe, run, total_steps, model=built.model)
    model = built.model
    _model_notes(recipe, built, accelerator.is_main_process)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, total_steps)
    # The scheduler is stepped by hand once per optimizer step; accelerate's wrapper would step it per process.
    collate = task.collator(tokenizer, data)
    # Before a resume loads the checkpoint: what the task computes from the model as loaded (DPO's reference).
    task.prepare(model, data, collate, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_run_dir(run, resume=resume)
    accelerator.wait_for_everyone()

    session = Session(recipe=recipe, recipe_path=recipe_path, run=run, accelerator=accelerator, tokenizer=tokenizer,
                      model=model, optimizer=optimizer, scheduler=scheduler, data=data, task=task, collate=collate,
                      batches=batches, total_steps=total_steps, lock=lock)
    if resume_from is not None:
        _resume(session, resume_from)
    session.manifest = start_manifest(run, recipe, built, data, accelerator, start_step=session.start_step,
                                      total_steps=total_steps, resumed=resume_from is not None)
    if accelerator.is_main_process:
        write_text_atomic(run.recipe, dump_recipe(recipe))
        run.write_manifest(session.manifest)
    if recipe.logging.trackers:
        accelerator.init_trackers(recipe.logging.project or run.root.name,
                                  config=recipe.training_fingerprint())
    return session


def _model_notes(recipe: Recipe, built: Any, main: bool) -> None:
    """Compile the blocks when asked (lazily: the first forward compiles) and say what changed in the model."""
    from ft_cli.model import compile_blocks

    if recipe.train.compile:
        blocks = compile_blocks(built.model)
        if main:
            print(f"train.compile: {blocks} transformer blocks compiled with torch.compile on first use (the first "
                  "step and the first evaluation are slow)", file=sys.stderr)
    if built.qat and main:
        print(built.qat, file=sys.stderr)
    if built.liger_kernels and main:
        print(f"train.liger_kernel: liger-kernel {', '.join(built.liger_kernels)}", file=sys.stderr)


def _resume(s: Session, checkpoint: Path) -> None:
    """Load the checkpoint into the prepared model, optimizer and schedule; continue its step and evaluations."""
    from ft_cli.checkpoint import load_checkpoint
    from ft_cli.optim import replan_schedule

    state = load_checkpoint(checkpoint, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
                            accelerator=s.accelerator)
    s.start_step = int(state["step"])
    s.state = TrainState.from_checkpoint(state)
    s.pending_eval = bool(state.get("evaluation_due")) and s.data.eval is not None
    _report_schedule(s, planned=replan_schedule(s.scheduler, s.total_steps))


def _report_schedule(s: Session, planned: int | None) -> None:
    """After the checkpoint's schedule was re-planned for s.total_steps: say so when the run is extended, and warn
    when the steps left would train at (nearly) no learning rate."""
    from ft_cli.optim import remaining_lr_peak

    if not s.accelerator.is_main_process or s.start_step >= s.total_steps:
        return
    t = s.recipe.train
    extended = planned is not None and planned != s.total_steps
    if extended:
        print(f"resume: the run was planned for {planned} steps and now has {s.total_steps}: the {t.scheduler} "
              f"learning-rate schedule is re-planned for {s.total_steps} steps from step {s.start_step} on "
              f"(warm-up unchanged, the steps taken unchanged)", file=sys.stderr)
    peak = remaining_lr_peak(s.scheduler, s.total_steps)
    if peak == 0 or (extended and peak < 0.1 * t.lr):
        what = "at lr 0" if peak == 0 else f"at lr {peak:.3g} at most ({peak / t.lr:.1%} of train.lr {t.lr:g})"
        print(f"warning: steps {s.start_step + 1}-{s.total_steps} would train {what}: the {t.scheduler} schedule "
              f"is near its end at step {s.start_step} of {s.total_steps}; to train longer at a useful learning "
              "rate extend by more steps (the schedule is re-planned for the new length)", file=sys.stderr)


def _check_resume(run: RunDir, recipe: Recipe, accelerator: Any) -> Path:
    """The checkpoint to resume from: the newest whole one (checksums checked; damaged ones skipped with a
    warning naming them), if the recipe has not changed in a way that changes training."""
    from ft_cli.checkpoint import newest_whole_checkpoint, recipe_changes, warn_on_stderr

    found = newest_whole_checkpoint(run, warn=warn_on_stderr if accelerator.is_main_process else None)
    if found is None:
        raise UserError(f"--resume: {run.root} has no whole checkpoint to resume from: every checkpoint there is "
                        "damaged (see the warnings above); start a new run with --overwrite or --output-dir")
    ckpt, state = found
    changes = recipe_changes(state.get("recipe_fields", {}), recipe.training_fingerprint())
    if changes:
        raise UserError(f"--resume: the recipe changed in fields that change training since {ckpt.name}:\n  "
                        + "\n  ".join(changes) + "\nrevert them, or start a new run with --output-dir")
    return ckpt


def _lock_run_dir(run: RunDir, accelerator: Any, *, resume: bool, overwrite: bool) -> Any:
    """The main process locks the run directory for the whole run (ft_cli.run_lock); every process learns whether
    it could, so that a refusal ends all of them. Returns the lock on the main process, None on the others."""
    from ft_cli.run_lock import acquire_run_lock

    accelerator.wait_for_everyone()  # every process has probed the lock (check_run_dir) before it is taken
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire_run_lock(run, resume=resume, overwrite=overwrite)
        except UserError as exc:
            error = exc
    if reduce_sum(accelerator, int(error is not None)):
        raise error or UserError(f"output_dir {run.root}: the main process could not lock the run directory; see "
                                 "its message")
    return lock


def _check_disk_space(recipe: Recipe, run: RunDir, total_steps: int, *, model: Any = None) -> bool:
    """Refuse (exit 2) a run whose checkpoints and outputs will not fit on the disk, before it starts: sized with
    ft plan's parameter counts from the model config, before the model loads, or from the loaded `model` when the
    config was not on disk. Returns False when it could not size the run yet."""
    from ft_cli.plan import disk_needs, planned_trainable
    from ft_cli.run_dir import check_free_space, existing_bytes

    if model is not None:
        params = list(model.parameters())
        counts = ([(p.numel(), p.element_size()) for p in params if p.requires_grad], sum(p.numel() for p in params))
    else:
        counts = planned_trainable(recipe)
        if counts is None:
            return False
    need, detail = disk_needs(recipe, *counts, total_steps=total_steps)
    check_free_space(run.root, need, detail, reusable=existing_bytes(run.root))  # --resume/--overwrite reuse it
    return True


def _row_lengths(dataset: Any) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy().tolist()


def reduce_sum(acc: Any, value: Any) -> float:
    return reduce_sums(acc, [value])[0]


def reduce_sums(acc: Any, values: list[Any]) -> list[float]:
    """Each value summed over the processes, in one collective."""
    if acc.num_processes == 1:
        return [float(v) for v in values]
    import torch

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=acc.device)
    return acc.reduce(tensor, reduction="sum").tolist()
