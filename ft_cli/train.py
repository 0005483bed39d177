"""`ft train`: one readable training loop on accelerate.

`setup()` (ft_cli.session) returns everything the loop needs; `fit()` is the loop: step, log, evaluate, checkpoint,
stop. Runs unchanged on one CPU/GPU or under `accelerate launch` / `torchrun` (DDP): every rank computes, rank 0
writes.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ft_cli.atomic import write_dir, write_text_atomic
from ft_cli.batches import rows_at
from ft_cli.recipe import load_recipe, recipe_errors
from ft_cli.run_end import StopSignals, diverged, ended_by, finish_run, interrupted
from ft_cli.session import Session, TrainState, reduce_sum, reduce_sums, setup

__all__ = ["Session", "TrainState", "fit", "setup", "train_from_recipe"]


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


def fit(s: Session) -> Path:
    """The training loop. Gradients are normalised by the trained tokens of the whole optimizer step across all
    micro-batches and processes, so grad_accum and the number of processes do not change the maths."""
    import torch

    from ft_cli.batches import train_loader
    from ft_cli.progress import MetricsWriter, Reporter

    acc, t, model = s.accelerator, s.recipe.train, s.model
    main = acc.is_main_process
    world = acc.num_processes
    if s.start_step >= s.total_steps and not s.pending_eval:
        finish_run(s, "completed", s.start_step)
        _release(s)
        if main:
            print(f"{s.run.root} already finished {s.start_step} of {s.total_steps} steps: nothing to do "
                  "(raise train.max_steps or epochs to continue training)", file=sys.stderr)
        return s.run.root
    metrics = MetricsWriter(s.run.metrics, keep_until_step=s.start_step, redo_eval=s.pending_eval) if main else None
    reporter = Reporter(s.total_steps, start=s.start_step, enabled=main)
    if s.start_step:
        reporter.message(f"resuming {s.run.root} from checkpoint step {s.start_step} of {s.total_steps}")
    stop = StopSignals(announce=main)
    params = [p for p in model.parameters() if p.requires_grad]
    step, stopped_early = s.start_step, False
    window = _Window()
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
        loader = iter(train_loader(s.data.train, s.batches, s.collate, start=step * t.grad_accum,
                                   stop=s.total_steps * t.grad_accum, workers=_loader_workers(s),
                                   pin_memory=cuda, fetch=_rows, worker_init=_WorkerInit(s.lock)))
        while step < s.total_steps and not stopped_early:
            micro = [next(loader) for _ in range(t.grad_accum)]
            # DDP averages gradients over processes, so each process divides its loss sum by (global tokens / world).
            n_global = reduce_sum(acc, sum(s.task.count(b) for b in micro))
            denom = torch.tensor(max(n_global, 1) / world, device=acc.device)
            s.task.begin_step(micro, acc, reduce_sum)
            loss_sum = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro):
                window.count(batch, s.task.count(batch))
                sync = i == len(micro) - 1
                with nullcontext() if sync else acc.no_sync(model):
                    micro_loss = s.task.loss(model, batch, acc.device, denom)
                    acc.backward(micro_loss)
                loss_sum += micro_loss.detach().float()
            # Unscales float16 gradients first (accelerate's GradScaler), so the norm and the clipping are real.
            grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            grad_norm = None if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside; may not say
            loss = reduce_sum(acc, loss_sum) / world
            # Under float16 loss scaling an overflowing gradient is routine: the scaler skips that step and lowers
            # the scale. Without a scaler, a non-finite gradient means the run diverged.
            if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)
                                           and acc.scaler is None):
                raise diverged(s, step + 1, loss, grad_norm)
            s.optimizer.step()
            if not s.optimizer.step_was_skipped:  # keep the schedule aligned with the updates actually made
                s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            step += 1
            window.steps += 1

            epoch = s.batches.epoch_of(step * t.grad_accum)
            lr = s.scheduler.get_last_lr()[0]
            reporter.update(step, f"loss {loss:.4f} lr {lr:.2e}", log_line=False)
            if step % t.log_every == 0 or step == s.total_steps:
                if cuda:  # the window ends when this step's kernels (optimizer update included) have run
                    torch.cuda.synchronize(acc.device)
                record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          **window.record(acc)}
                if cuda:  # the most GPU memory this process's tensors have held so far
                    record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 3)
                record.update(s.task.train_metrics(acc, reduce_sum))
                if metrics:
                    metrics.write(record)
                acc.log(record, step=step)
                reporter.update(step, f"loss {loss:.4f} lr {lr:.2e} {record['tokens_per_s']:,.0f} tok/s",
                                log_line=True)
                window = _Window()

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
            window.t0 += time.perf_counter() - paused  # tokens_per_s counts training time, not eval or saving
            if reduce_sum(acc, int(stop.signum is not None)):
                _checkpoint(s, step)
                raise interrupted(s, step, stop.signum or signal.SIGTERM)
            if stopped_early:
                if not saves:
                    _checkpoint(s, step)
                reporter.message(_early_stopping(s, step))
                break
        if s.data.eval is not None and last_eval_step != step and step > s.start_step:
            _evaluate(s, step, s.batches.epoch_of(step * t.grad_accum), metrics, reporter)
        out_dir = s.run.output(whole_model=s.recipe.spec.whole_model)
        _save_trained(s, out_dir, step=step)
        finish_run(s, "completed", step)
        reporter.close()
        reporter.message(_summary(s, step, out_dir))
    except BaseException as exc:
        reporter.close()
        ending = ended_by(s, step, exc)
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

class _Window:
    """What the steps since the last train line processed, for its throughput fields: input tokens that are not
    padding, input positions with padding, what the loss is averaged over, and the training seconds they took."""

    def __init__(self) -> None:
        self.tokens = self.padded = self.targets = self.steps = 0
        self.t0 = time.perf_counter()

    def count(self, batch: dict[str, Any], targets: int) -> None:
        from ft_cli.scoring import real_tokens

        self.tokens += real_tokens(batch)
        self.padded += batch["input_ids"].numel()
        self.targets += targets

    def record(self, acc: Any) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tokens, padded, targets = reduce_sums(acc, [self.tokens, self.padded, self.targets])
        # step_time_s: training seconds per optimizer step over the window (evaluation and saving left out)
        return {"tokens_per_s": round(tokens / elapsed, 1), "step_time_s": round(elapsed / max(self.steps, 1), 4),
                "tokens": int(tokens), "padded_tokens": int(padded), "targets": int(targets),
                "wall_time": round(time.time(), 3)}


def _loader_workers(s: Session) -> int:
    """DataLoader workers that prepare the next batches during a step (train.dataloader_workers); by default one on
    CUDA, where the CPU is otherwise idle while the GPU computes, and none on a CPU device, where a worker would only
    take cores from the model's own math."""
    workers = s.recipe.train.dataloader_workers
    return workers if workers is not None else int(s.accelerator.device.type == "cuda")


class _WorkerInit:
    """Run in each DataLoader worker as it starts: a forked worker lets go of the run directory's lock. (A worker
    started by spawn inherits no descriptor: it gets a copy that does nothing.)"""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __call__(self, _worker_id: int) -> None:
        if self.lock is not None:
            self.lock.close_in_child()

    def __reduce__(self) -> tuple[Any, ...]:
        return _WorkerInit, (None,)


def _rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    return rows_at(dataset, indices)  # through this module's name, so a test can stand in for it


def _evaluate(s: Session, step: int, epoch: float, metrics: Any, reporter: Any) -> bool:
    """Evaluate, log, keep the best output (by train.best_metric); returns True when early stopping says stop."""
    acc, t = s.accelerator, s.recipe.train
    scores = s.task.evaluate(s.model, s.data.eval, s.collate, t.eval_batch_size or t.micro_batch_size, acc,
                             reduce_sum)
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


def _release(s: Session) -> None:
    if s.lock is not None:
        s.lock.release()


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
