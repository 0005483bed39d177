"""`ft train`: set up model, data and optimizer on accelerate, then one readable training loop.

`setup()` returns everything the loop needs; `fit()` is the loop: step, log, evaluate, checkpoint, stop.
Runs unchanged on one CPU/GPU or under `accelerate launch` / `torchrun` (DDP): every rank computes, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ft_cli.atomic import is_disk_full, write_dir, write_text_atomic
from ft_cli.batches import rows_at
from ft_cli.errors import CheckFailed, RunInterrupted, UserError
from ft_cli.manifest import finish_manifest, start_manifest
from ft_cli.recipe import Recipe, dump_recipe, load_recipe, recipe_errors
from ft_cli.run_dir import RunDir, check_run_dir, prepare_run_dir, remove_run_debris


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


def train_from_recipe(recipe_path: Path, overrides: list[str], *, output_dir: Path | None = None,
                      resume: bool = False, overwrite: bool = False, smoke: bool = False) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    with recipe_errors(recipe):  # "model.x: ..." errors get the recipe file and line (or the --set item)
        if smoke:  # before --output-dir: an explicit directory is used as given, the recipe's gets "-smoke"
            from ft_cli.smoke import smoke_recipe

            recipe = smoke_recipe(recipe)
        if output_dir is not None:
            recipe.output_dir = str(output_dir)
        try:
            session = setup(recipe, Path(recipe_path), resume=resume, overwrite=overwrite)
            return fit(session)
        finally:
            _end_process_group()


def _end_process_group() -> None:
    """Under torchrun / accelerate launch, tear the process group down before the interpreter exits, whether the run
    finished or failed: left to exit, gloo's threads can abort a rank ("terminate called without an active
    exception", SIGABRT) after a run that succeeded, and the launcher then reports the whole run failed."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    from ft_cli.model import build_model, compile_blocks, load_tokenizer
    from ft_cli.optim import build_optimizer, build_scheduler, replan_schedule
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
    if recipe.train.compile:  # lazily: the first forward compiles
        blocks = compile_blocks(model)
        if accelerator.is_main_process:
            print(f"train.compile: {blocks} transformer blocks compiled with torch.compile on first use (the first "
                  "step and the first evaluation are slow)", file=sys.stderr)
    if built.qat and accelerator.is_main_process:
        print(built.qat, file=sys.stderr)
    if built.liger_kernels and accelerator.is_main_process:
        print(f"train.liger_kernel: liger-kernel {', '.join(built.liger_kernels)}", file=sys.stderr)
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
        from ft_cli.checkpoint import load_checkpoint

        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                accelerator=accelerator)
        session.start_step = int(state["step"])
        session.state = TrainState.from_checkpoint(state)
        session.pending_eval = bool(state.get("evaluation_due")) and data.eval is not None
        _report_schedule(session, planned=replan_schedule(scheduler, total_steps))
    session.manifest = start_manifest(run, recipe, built, data, accelerator, start_step=session.start_step,
                                      total_steps=total_steps, resumed=resume_from is not None)
    if accelerator.is_main_process:
        write_text_atomic(run.recipe, dump_recipe(recipe))
        run.write_manifest(session.manifest)
    if recipe.logging.trackers:
        accelerator.init_trackers(recipe.logging.project or run.root.name,
                                  config=recipe.training_fingerprint())
    return session


def fit(s: Session) -> Path:
    """The training loop. Gradients are normalised by the trained tokens of the whole optimizer step across all
    micro-batches and processes, so grad_accum and the number of processes do not change the maths."""
    import torch

    from ft_cli.progress import MetricsWriter, Reporter
    from ft_cli.scoring import real_tokens

    acc, t, model = s.accelerator, s.recipe.train, s.model
    main = acc.is_main_process
    world = acc.num_processes
    if s.start_step >= s.total_steps and not s.pending_eval:
        _finish_manifest(s, "completed", s.start_step)
        _release(s)
        if main:
            print(f"{s.run.root} already finished {s.start_step} of {s.total_steps} steps: nothing to do "
                  "(raise train.max_steps or epochs to continue training)", file=sys.stderr)
        return s.run.root
    metrics = MetricsWriter(s.run.metrics, keep_until_step=s.start_step, redo_eval=s.pending_eval) if main else None
    reporter = Reporter(s.total_steps, start=s.start_step, enabled=main)
    if s.start_step:
        reporter.message(f"resuming {s.run.root} from checkpoint step {s.start_step} of {s.total_steps}")
    stop = _StopSignals(announce=main)
    params = [p for p in model.parameters() if p.requires_grad]
    step, stopped_early = s.start_step, False
    window_tokens, window_steps, window_t0 = 0, 0, time.perf_counter()
    cuda = acc.device.type == "cuda"
    last_eval_step = -1
    model.train()
    try:
        if s.pending_eval:  # the run stopped between this step's checkpoint and its evaluation: evaluate now
            last_eval_step = step
            stopped_early = _evaluate(s, step, s.batches.epoch_of(step * t.grad_accum), metrics, reporter)
            _update_checkpoint_state(s, step)
            if stopped_early:
                reporter.message(_early_stopping(s, step))
        elif s.data.eval is not None:
            _sanity_eval(s, reporter)
        while step < s.total_steps and not stopped_early:
            first = step * t.grad_accum
            micro = [s.collate(_rows(s.data.train, s.batches.indices(m))) for m in range(first, first + t.grad_accum)]
            # DDP averages gradients over processes, so each process divides its loss sum by (global tokens / world).
            n_global = _reduce_sum(acc, sum(s.task.count(b) for b in micro))
            denom = torch.tensor(max(n_global, 1) / world, device=acc.device)
            s.task.begin_step(micro, acc, _reduce_sum)
            loss_sum = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro):
                window_tokens += real_tokens(batch)
                sync = i == len(micro) - 1
                with nullcontext() if sync else acc.no_sync(model):
                    micro_loss = s.task.loss(model, batch, acc.device, denom)
                    acc.backward(micro_loss)
                loss_sum += micro_loss.detach().float()
            # Unscales float16 gradients first (accelerate's GradScaler), so the norm and the clipping are real.
            grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            grad_norm = None if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside; may not say
            loss = _reduce_sum(acc, loss_sum) / world
            # Under float16 loss scaling an overflowing gradient is routine: the scaler skips that step and lowers
            # the scale. Without a scaler, a non-finite gradient means the run diverged.
            if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)
                                           and acc.scaler is None):
                raise _diverged(s, step + 1, loss, grad_norm)
            s.optimizer.step()
            if not s.optimizer.step_was_skipped:  # keep the schedule aligned with the updates actually made
                s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1

            epoch = s.batches.epoch_of(step * t.grad_accum)
            lr = s.scheduler.get_last_lr()[0]
            reporter.update(step, f"loss {loss:.4f} lr {lr:.2e}", log_line=False)
            if step % t.log_every == 0 or step == s.total_steps:
                elapsed = time.perf_counter() - window_t0
                tps = _reduce_sum(acc, window_tokens) / max(elapsed, 1e-9)
                # step_time_s: training seconds per optimizer step over the window (evaluation and saving left out)
                record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": round(tps, 1), "step_time_s": round(elapsed / max(window_steps, 1), 4)}
                if cuda:  # the most GPU memory this process's tensors have held so far
                    record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 3)
                record.update(s.task.train_metrics(acc, _reduce_sum))
                if metrics:
                    metrics.write(record)
                acc.log(record, step=step)
                reporter.update(step, f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s", log_line=True)
                window_tokens, window_steps, window_t0 = 0, 0, time.perf_counter()

            paused = time.perf_counter()
            saves = bool(t.save_every) and (step % t.save_every == 0 or step == s.total_steps)
            evaluates = s.data.eval is not None and bool(t.eval_every) and (step % t.eval_every == 0
                                                                            or step == s.total_steps)
            if saves:  # before evaluating: an evaluation that fails must not cost this step's checkpoint
                _checkpoint(s, step, evaluation_due=evaluates)  # also at the end, so a run can be extended
            if evaluates:
                last_eval_step = step
                stopped_early = _evaluate(s, step, epoch, metrics, reporter)
                if saves:  # a resume from this checkpoint continues with this evaluation's best and patience
                    _update_checkpoint_state(s, step)
            window_t0 += time.perf_counter() - paused  # tokens_per_s counts training time, not eval or saving
            if _reduce_sum(acc, int(stop.signum is not None)):
                _checkpoint(s, step)
                raise _interrupted(s, step, stop.signum or signal.SIGTERM)
            if stopped_early:
                if not saves:
                    _checkpoint(s, step)
                reporter.message(_early_stopping(s, step))
                break
        if s.data.eval is not None and last_eval_step != step and step > s.start_step:
            _evaluate(s, step, s.batches.epoch_of(step * t.grad_accum), metrics, reporter)
        out_dir = s.run.output(whole_model=s.recipe.spec.whole_model)
        _save_trained(s, out_dir, step=step)
        _finish_manifest(s, "completed", step)
        reporter.close()
        reporter.message(_summary(s, step, out_dir))
    except BaseException as exc:
        reporter.close()
        ending = _ended_by(s, step, exc)
        if ending is not exc:
            raise ending from None
        raise
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if s.recipe.logging.trackers:
            acc.end_training()
        _release(s)
    return s.run.root


# Pieces of the loop ----------------------------------------------------------------------------------------------

def _rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    return rows_at(dataset, indices)  # through this module's name, so a test can stand in for it


def _row_lengths(dataset: Any) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy().tolist()


def _reduce_sum(acc: Any, value: Any) -> float:
    if acc.num_processes == 1:
        return float(value)
    import torch

    tensor = torch.as_tensor(float(value), dtype=torch.float64, device=acc.device)
    return float(acc.reduce(tensor, reduction="sum"))


def _evaluate(s: Session, step: int, epoch: float, metrics: Any, reporter: Any) -> bool:
    """Evaluate, log, keep the best output (by train.best_metric); returns True when early stopping says stop."""
    acc, t = s.accelerator, s.recipe.train
    scores = s.task.evaluate(s.model, s.data.eval, s.collate, t.eval_batch_size or t.micro_batch_size, acc,
                             _reduce_sum)
    record = {"step": step, "epoch": round(epoch, 4), **scores}
    if metrics:
        metrics.write(record)
    acc.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)
    eval_loss = record["eval_loss"]
    st = s.state
    name, lower = t.best_metric, t.best_metric == "eval_loss"
    value = record["eval_loss" if lower else f"eval_{name}"]
    best = st.best_score
    if best is None and lower:  # a checkpoint from before best_metric: its best eval_loss
        best = st.best_eval_loss
    improved = best is None or (value < best if lower else value > best)
    shown = f"eval_loss {eval_loss:.4f}" + ("" if lower else f" {name} {value:.4f}")
    reporter.message(f"step {step}: {shown}" + (" (best)" if improved else ""))
    st.last_eval_loss, st.last_eval_step = eval_loss, step
    if improved:
        st.best_eval_loss, st.best_score, st.best_step, st.evals_without_improvement = eval_loss, value, step, 0
        _save_trained(s, s.run.best, step=step)
        return False
    st.evals_without_improvement += 1
    patience = t.early_stopping_patience
    return patience is not None and st.evals_without_improvement >= patience


def _early_stopping(s: Session, step: int) -> str:
    t, st = s.recipe.train, s.state
    best = st.best_eval_loss if st.best_score is None else st.best_score
    return (f"early stopping at step {step}: {t.best_metric} has not improved for {t.early_stopping_patience} "
            f"evaluations (best {best:.4f} at step {st.best_step})")


def _sanity_eval(s: Session, reporter: Any) -> None:
    """Evaluate the first 1-2 eval batches before the first optimizer step (litgpt's validate(max_iters=2)): a
    failure in the evaluation path (memory, a kernel that only runs in eval mode, a shape) shows at step 0, not
    after eval_every steps. Every rank scores the same rows, so sharded models run the same forwards everywhere.
    The loss covers those rows only: printed, never logged as eval_loss."""
    t = s.recipe.train
    size = t.eval_batch_size or t.micro_batch_size
    rows = s.data.eval.select(range(min(len(s.data.eval), 2 * size)))
    loss = s.task.sanity_loss(s.model, rows, s.collate, size, s.accelerator.device)
    reporter.message(f"step {s.start_step}: evaluation works (sanity check on {len(rows)} eval rows: loss "
                     f"{loss:.4f})")


def _update_checkpoint_state(s: Session, step: int) -> None:
    """Write the evaluation's outcome (best_eval_loss, best_step, patience) into the state of the checkpoint saved
    just before it at this step. Until then the state says the evaluation is due, and a resume from it evaluates
    that step first."""
    import json

    from ft_cli.checkpoint import STATE_FILE

    if s.accelerator.is_main_process:
        path = s.run.checkpoint(step) / STATE_FILE
        state = {**json.loads(path.read_text()), **s.state.as_dict(), "evaluation_due": False}
        write_text_atomic(path, json.dumps(state, indent=2) + "\n")
    s.accelerator.wait_for_everyone()


def _checkpoint(s: Session, step: int, evaluation_due: bool = False) -> None:
    from ft_cli.checkpoint import save_checkpoint

    state = {**s.state.as_dict(), "fingerprint": s.recipe.fingerprint_hash(), "evaluation_due": evaluation_due,
             "recipe_fields": s.recipe.training_fingerprint(), "total_steps": s.total_steps}
    save_checkpoint(s.run, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler, state=state,
                    accelerator=s.accelerator, keep_last=s.recipe.train.keep_last)


def _save_trained(s: Session, out_dir: Path, *, step: int) -> None:
    """Rank 0 writes the adapter (or model) of `step` to `out_dir`, with a model card (README.md), replacing an
    older copy (best/) whole.
    Under FSDP (and DeepSpeed ZeRO-3) every rank holds only shards of each weight, so all ranks first gather whole
    tensors to rank 0 (a collective) and the savers are handed that state dict."""
    from accelerate.utils import DistributedType

    from ft_cli.methods.apply import save_trained
    from ft_cli.model_card import write_model_card

    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full = acc.get_state_dict(s.model) if sharded else None
    if acc.is_main_process:
        def write(tmp: Path) -> None:
            save_trained(model, s.tokenizer, tmp, s.recipe, state_dict=full)
            s.task.save_extras(model, tmp, s.data)
            write_model_card(tmp, s.recipe, s.manifest, s.state.as_dict(), step=step, best=out_dir == s.run.best)

        write_dir(out_dir, write)  # built under a temporary name and renamed into place: whole or absent
    acc.wait_for_everyone()


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to finish the current step and checkpoint; a second SIGINT stops at once
    (fit then says which whole checkpoint is the last)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep default handling
            self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:  # os.write: print() is not safe inside a signal handler
            name = signal.Signals(signum).name
            more = "; Ctrl-C again exits at once, without one" if signum == signal.SIGINT else ""
            os.write(2, f"\n{name}: stopping after this step to write a checkpoint{more}\n".encode())

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _release(s: Session) -> None:
    if s.lock is not None:
        s.lock.release()


def _ended_by(s: Session, step: int, exc: BaseException) -> BaseException:
    """How a run that stopped with `exc` ends: run.json says so, nothing half-written stays (a checkpoint, best/
    or adapter/ being written), and a full disk or a second Ctrl-C becomes one message instead of a traceback."""
    main = s.accelerator.is_main_process
    if main:
        with contextlib.suppress(OSError):
            remove_run_debris(s.run)  # frees the space a half-written checkpoint took, before run.json is written
    if isinstance(exc, RunInterrupted):
        return exc  # run.json was written by _interrupted
    last = s.run.latest_checkpoint()
    kept = f"the last whole checkpoint is step {last.name[5:]}" if last else "no checkpoint had been written yet"
    resume = f"ft train {s.recipe_path} --resume --output-dir {s.run.root}"
    if isinstance(exc, KeyboardInterrupt):
        message = f"interrupted again: exiting without a checkpoint; {kept}"
        _finish_manifest(s, "interrupted", step, error=message, quiet=True)
        return RunInterrupted(message + (f".\nResume with: {resume}" if last else ""), exit_code=130)
    if isinstance(exc, Exception) and is_disk_full(exc, s.run.root):
        _finish_manifest(s, "failed", step, error=f"disk full: {exc}", quiet=True)
        return UserError(f"disk full while writing to {s.run.root} after step {step} ({exc}); nothing half-written "
                         f"was kept and {kept}.\nFree space, then resume with: {resume}")
    _finish_manifest(s, "failed", step, error=f"{type(exc).__name__}: {exc}", quiet=True)  # exc is what counts
    return exc


def _interrupted(s: Session, step: int, signum: int) -> RunInterrupted:
    name = signal.Signals(signum).name
    _finish_manifest(s, "interrupted", step)
    cmd = f"ft train {s.recipe_path} --resume" + (f" --output-dir {s.run.root}" if s.run.root else "")
    return RunInterrupted(f"{name}: stopped after step {step}; checkpoint written to {s.run.checkpoint(step)}.\n"
                          f"Resume with: {cmd}", exit_code=128 + int(signum))


def _diverged(s: Session, step: int, loss: float, grad_norm: float | None) -> CheckFailed:
    last = s.run.latest_checkpoint()
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    hints = ["lower train.lr"]
    if s.recipe.model.dtype == "float16":
        hints.append("use model.dtype: bfloat16 (float16 overflows easily)")
    if s.recipe.train.max_grad_norm is None:
        hints.append("set train.max_grad_norm: 1.0")
    hints.append("check the data for empty or garbage examples (ft validate --show 5)")
    return CheckFailed(f"training diverged at step {step}: {what} is {loss if what == 'loss' else grad_norm} "
                       f"(loss {loss}, grad_norm {grad_norm}); the optimizer step was skipped and {keep}.\n"
                       f"Likely causes: " + "; ".join(hints))


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
    if _reduce_sum(accelerator, int(error is not None)):
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


def _finish_manifest(s: Session, status: str, step: int, error: str | None = None, quiet: bool = False) -> None:
    if s.accelerator.is_main_process:
        finish_manifest(s.run, s.manifest, status, step, best_eval_loss=s.state.best_eval_loss,
                        best_step=s.state.best_step, error=error, quiet=quiet)


def _summary(s: Session, step: int, out_dir: Path) -> str:
    lines = [f"done: {step} steps; {'adapter' if out_dir.name == 'adapter' else 'model'} saved to {out_dir}"]
    metric, st = s.recipe.train.best_metric, s.state
    if metric != "eval_loss" and st.best_score is not None:
        lines.append(f"best {metric} {st.best_score:.4f} at step {st.best_step} "
                     f"(a copy of that {out_dir.name} is in {s.run.best})")
    elif st.best_eval_loss is not None:
        lines.append(f"best eval_loss {st.best_eval_loss:.4f} at step {st.best_step} "
                     f"(a copy of that {out_dir.name} is in {s.run.best})")
    lines.append(f"metrics: {s.run.metrics}")
    return "\n".join(lines)
