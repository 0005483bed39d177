"""`ft train`: set up model, data and optimizer on accelerate, then one readable training loop.

`setup()` returns everything the loop needs; `fit()` is the loop: step, log, evaluate, checkpoint, stop.
Runs unchanged on one CPU/GPU or under `accelerate launch` / `torchrun` (DDP): every rank computes, rank 0 writes.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_cli.errors import CheckFailed, RunInterrupted, UserError
from ft_cli.recipe import Recipe, dump_recipe, load_recipe
from ft_cli.run_dir import RunDir, check_run_dir, now_iso, prepare_run_dir, write_text_atomic


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
    collate: Any
    batches: Any  # ft_cli.batches.MicroBatches
    total_steps: int
    start_step: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # best_eval_loss, best_step, evals_without_improvement
    manifest: dict[str, Any] = field(default_factory=dict)


def train_from_recipe(recipe_path: Path, overrides: list[str], *, output_dir: Path | None = None,
                      resume: bool = False, overwrite: bool = False, smoke: bool = False) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    if smoke:  # before --output-dir: an explicit directory is used as given, the recipe's gets "-smoke"
        from ft_cli.smoke import smoke_recipe

        recipe = smoke_recipe(recipe)
    if output_dir is not None:
        recipe.output_dir = str(output_dir)
    session = setup(recipe, Path(recipe_path), resume=resume, overwrite=overwrite)
    return fit(session)


def setup(recipe: Recipe, recipe_path: Path, *, resume: bool, overwrite: bool) -> Session:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accelerate.utils import set_seed

    from ft_cli.batches import MicroBatches
    from ft_cli.data.pipeline import build_datasets, make_collator
    from ft_cli.model import build_model, compile_blocks, load_tokenizer
    from ft_cli.optim import build_optimizer, build_scheduler, check_optimizer_supported

    run = RunDir(Path(recipe.output_dir or "runs/run"))
    accelerator = _accelerator(recipe, run)
    _check_deepspeed(recipe, accelerator, resume)
    check_optimizer_supported(recipe, accelerator.device.type)
    _check_dtype(recipe, accelerator.device.type)
    _check_kernels(recipe, accelerator.device.type)
    # Every rank checks the run directory before any rank changes it, so a refusal is raised everywhere. The
    # directory itself is only touched once tokenizer, data and model have loaded: bad input writes nothing.
    check_run_dir(run, resume=resume, overwrite=overwrite)
    saved_state = _check_resume(run, recipe) if resume else None

    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    data = build_datasets(recipe, tokenizer, main_process_first=accelerator.main_process_first)
    if accelerator.is_main_process:  # what ft validate reports about the data, said here too
        for line in [f"warning: {w}" for w in data.warnings] + [f"note: {n}" for n in data.notes]:
            print(line, file=sys.stderr)
    set_seed(recipe.train.seed)  # data building must not shift the model's initial weights
    built = build_model(recipe, device=accelerator.device)
    model = built.model
    if recipe.train.compile:  # lazily: the first forward compiles
        blocks = compile_blocks(model)
        if accelerator.is_main_process:
            print(f"train.compile: {blocks} transformer blocks compiled with torch.compile on first use (the first "
                  "step and the first evaluation are slow)", file=sys.stderr)
    if built.liger_kernels and accelerator.is_main_process:
        print(f"train.liger_kernel: liger-kernel {', '.join(built.liger_kernels)}", file=sys.stderr)
    optimizer = build_optimizer(model, recipe)
    t = recipe.train
    batches = MicroBatches(len(data.train), t.micro_batch_size, world_size=accelerator.num_processes,
                           rank=accelerator.process_index, seed=t.seed, shuffle=recipe.data.shuffle)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * batches.per_epoch / t.grad_accum))
    scheduler = build_scheduler(optimizer, recipe, total_steps)
    # The scheduler is stepped by hand once per optimizer step; accelerate's wrapper would step it per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    collate = make_collator(tokenizer, packed=recipe.data.packing)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_run_dir(run, resume=resume)
    accelerator.wait_for_everyone()

    session = Session(recipe=recipe, recipe_path=recipe_path, run=run, accelerator=accelerator, tokenizer=tokenizer,
                      model=model, optimizer=optimizer, scheduler=scheduler, data=data, collate=collate,
                      batches=batches, total_steps=total_steps)
    session.state = {"best_eval_loss": None, "best_step": None, "evals_without_improvement": 0}
    if saved_state is not None:
        from ft_cli.checkpoint import load_checkpoint

        ckpt = run.latest_checkpoint()
        assert ckpt is not None
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
        session.start_step = int(state["step"])
        session.state.update({k: state[k] for k in session.state if k in state})
    session.manifest = _start_manifest(session, built, resumed=saved_state is not None)
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
    from ft_cli.scoring import count_targets, model_inputs, real_tokens

    acc, t, model = s.accelerator, s.recipe.train, s.model
    main = acc.is_main_process
    world = acc.num_processes
    if s.start_step >= s.total_steps:
        _finish_manifest(s, "completed", s.start_step)
        if main:
            print(f"{s.run.root} already finished {s.start_step} of {s.total_steps} steps: nothing to do "
                  "(raise train.max_steps or epochs to continue training)", file=sys.stderr)
        return s.run.root
    metrics = MetricsWriter(s.run.metrics, keep_until_step=s.start_step) if main else None
    reporter = Reporter(s.total_steps, start=s.start_step, enabled=main)
    if s.start_step:
        reporter.message(f"resuming {s.run.root} from checkpoint step {s.start_step} of {s.total_steps}")
    stop = _StopSignals()
    params = [p for p in model.parameters() if p.requires_grad]
    step, stopped_early = s.start_step, False
    window_tokens, window_t0 = 0, time.perf_counter()
    last_eval_step = -1
    model.train()
    try:
        while step < s.total_steps:
            first = step * t.grad_accum
            micro = [s.collate(_rows(s.data.train, s.batches.indices(m))) for m in range(first, first + t.grad_accum)]
            # DDP averages gradients over processes, so each process divides its loss sum by (global tokens / world).
            n_global = _reduce_sum(acc, sum(count_targets(b) for b in micro))
            denom = torch.tensor(max(n_global, 1) / world, device=acc.device)
            loss_sum = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro):
                window_tokens += real_tokens(batch)
                sync = i == len(micro) - 1
                with nullcontext() if sync else acc.no_sync(model):
                    out = model(**model_inputs(batch, acc.device), num_items_in_batch=denom)
                    acc.backward(out.loss)
                loss_sum += out.loss.detach().float()
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

            epoch = s.batches.epoch_of(step * t.grad_accum)
            lr = s.scheduler.get_last_lr()[0]
            reporter.update(step, f"loss {loss:.4f} lr {lr:.2e}", log_line=False)
            if step % t.log_every == 0 or step == s.total_steps:
                elapsed = time.perf_counter() - window_t0
                tps = _reduce_sum(acc, window_tokens) / max(elapsed, 1e-9)
                record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": round(tps, 1)}
                if metrics:
                    metrics.write(record)
                acc.log(record, step=step)
                reporter.update(step, f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s", log_line=True)
                window_tokens, window_t0 = 0, time.perf_counter()

            if s.data.eval is not None and t.eval_every and (step % t.eval_every == 0 or step == s.total_steps):
                last_eval_step = step
                if _evaluate(s, step, epoch, metrics, reporter):
                    stopped_early = True
            if t.save_every and (step % t.save_every == 0 or step == s.total_steps):
                _checkpoint(s, step)  # also at the end, so a finished run can be extended with --resume
            if _reduce_sum(acc, int(stop.signum is not None)):
                _checkpoint(s, step)
                raise _interrupted(s, step, stop.signum or signal.SIGTERM)
            if stopped_early:
                if t.save_every and step % t.save_every:
                    _checkpoint(s, step)
                reporter.message(f"early stopping at step {step}: eval_loss has not improved for "
                                 f"{t.early_stopping_patience} evaluations (best {s.state['best_eval_loss']:.4f} "
                                 f"at step {s.state['best_step']})")
                break
        if s.data.eval is not None and last_eval_step != step and step > s.start_step:
            _evaluate(s, step, s.batches.epoch_of(step * t.grad_accum), metrics, reporter)
        out_dir = s.run.output(whole_model=s.recipe.method in ("full", "freeze"))
        _save_trained(s, out_dir)
        _finish_manifest(s, "completed", step)
        reporter.close()
        reporter.message(_summary(s, step, out_dir))
    except BaseException as exc:
        reporter.close()
        if main and not isinstance(exc, RunInterrupted):
            _finish_manifest(s, "failed", step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if s.recipe.logging.trackers:
            acc.end_training()
    return s.run.root


# Pieces of the loop ----------------------------------------------------------------------------------------------

def _rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    cols = dataset[indices]
    return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]


def _reduce_sum(acc: Any, value: Any) -> float:
    if acc.num_processes == 1:
        return float(value)
    import torch

    tensor = torch.as_tensor(float(value), dtype=torch.float64, device=acc.device)
    return float(acc.reduce(tensor, reduction="sum"))


def _evaluate(s: Session, step: int, epoch: float, metrics: Any, reporter: Any) -> bool:
    """Evaluate, log, keep the best output; returns True when early stopping says stop."""
    from ft_cli.scoring import token_loss

    acc, t = s.accelerator, s.recipe.train
    loss_sum, tokens = token_loss(s.model, s.data.eval, s.collate, t.eval_batch_size or t.micro_batch_size,
                                  device=acc.device, rank=acc.process_index, world_size=acc.num_processes)
    loss_sum, tokens = _reduce_sum(acc, loss_sum), int(_reduce_sum(acc, tokens))
    eval_loss = loss_sum / max(tokens, 1)
    record = {"step": step, "epoch": round(epoch, 4), "eval_loss": eval_loss,
              "eval_perplexity": math.exp(min(eval_loss, 50)), "eval_tokens": tokens}
    if metrics:
        metrics.write(record)
    acc.log(record, step=step)
    best = s.state["best_eval_loss"]
    improved = best is None or eval_loss < best
    reporter.message(f"step {step}: eval_loss {eval_loss:.4f}" + (" (best)" if improved else ""))
    if improved:
        s.state.update(best_eval_loss=eval_loss, best_step=step, evals_without_improvement=0)
        _save_trained(s, s.run.best, replace=True)
        return False
    s.state["evals_without_improvement"] += 1
    patience = t.early_stopping_patience
    return patience is not None and s.state["evals_without_improvement"] >= patience


def _checkpoint(s: Session, step: int) -> None:
    from ft_cli.checkpoint import save_checkpoint

    state = {**s.state, "fingerprint": s.recipe.fingerprint_hash(),
             "recipe_fields": s.recipe.training_fingerprint(), "total_steps": s.total_steps}
    save_checkpoint(s.run, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler, state=state,
                    accelerator=s.accelerator, keep_last=s.recipe.train.keep_last)


def _save_trained(s: Session, out_dir: Path, *, replace: bool = False) -> None:
    """Rank 0 writes the adapter (or model) to `out_dir`; `replace` swaps a whole new copy in for an old one.
    Under FSDP (and DeepSpeed ZeRO-3) every rank holds only shards of each weight, so all ranks first gather whole
    tensors to rank 0 (a collective) and the savers, which call model.state_dict(), are handed those."""
    from accelerate.utils import DistributedType

    from ft_cli.methods import save_trained

    acc = s.accelerator
    model = acc.unwrap_model(s.model)
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full = acc.get_state_dict(s.model) if sharded else None
    if acc.is_main_process:
        if full is not None:
            model.state_dict = lambda *args, **kwargs: full  # instance attribute: shadows the method until del
        try:
            if replace:
                _replace_dir(out_dir, lambda tmp: save_trained(model, s.tokenizer, tmp, s.recipe))
            else:
                save_trained(model, s.tokenizer, out_dir, s.recipe)
        finally:
            if full is not None:
                del model.state_dict
    acc.wait_for_everyone()


def _replace_dir(target: Path, write: Any) -> None:
    import shutil

    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to finish the current step and checkpoint; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
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

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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


def _check_resume(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    import json

    from ft_cli.checkpoint import STATE_FILE, recipe_changes

    ckpt = run.latest_checkpoint()
    assert ckpt is not None  # check_run_dir made sure
    state = json.loads((ckpt / STATE_FILE).read_text())
    changes = recipe_changes(state.get("recipe_fields", {}), recipe.training_fingerprint())
    if changes:
        raise UserError(f"--resume: the recipe changed in fields that change training since {ckpt.name}:\n  "
                        + "\n  ".join(changes) + "\nrevert them, or start a new run with --output-dir")
    return state


def _accelerator(recipe: Recipe, run: RunDir) -> Any:
    """accelerate's Accelerator with the recipe's precision, not `accelerate launch --mixed_precision`'s: autocast
    in model.dtype over float32 master weights (plus a GradScaler for float16) for whole-model mixed precision,
    none otherwise (PEFT methods compute in model.dtype with float32 adapters)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(recipe.autocast_dtype or "", "no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # An earlier run in this process (tests, notebooks) fixed another precision in accelerate's process-wide
        # state, which refuses a change; the distributed setup (PartialState) is kept.
        AcceleratorState._reset_state()
    # dynamo_backend "no": `accelerate launch --dynamo_backend` would wrap the model and rename every weight
    # `_orig_mod.*` in checkpoints; train.compile compiles the blocks in place instead (ft_cli.model.compile_blocks).
    accelerator = Accelerator(log_with=_trackers(recipe, run), project_dir=str(run.root), mixed_precision=mixed,
                              cpu=_cpu_processes(), dynamo_backend="no")
    if accelerator.is_main_process:
        for warning in _launch_warnings(accelerator):
            print(f"warning: {warning}", file=sys.stderr)
    return accelerator


def _cpu_processes() -> bool:
    """True when launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with no
    GPU: accelerate then needs cpu=True to set up gloo, or every process silently trains alone."""
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    return launched and not torch.accelerator.is_available()


def _launch_warnings(accelerator: Any) -> list[str]:
    """Launches that accelerate quietly turns into something else than what was asked for."""
    from accelerate.utils import DistributedType

    env, warnings = os.environ, []
    if (accelerator.num_processes == 1 and "MASTER_PORT" in env
            and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        warnings.append("`accelerate launch --cpu` starts one process unless given an MPI hostfile: this run uses 1 "
                        "process. For several CPU processes: torchrun --nproc_per_node N -m ft_cli.cli train ...")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if dynamo.lower() not in ("no", ""):
        warnings.append(f"accelerate launch --dynamo_backend {dynamo} is ignored (it would rename the saved weights); "
                        "set train.compile: true in the recipe to compile the model")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        warnings.append(f"FSDP needs GPUs; accelerate runs this as {accelerator.distributed_type.value} (plain data "
                        "parallel: every process holds the whole model)")
    return warnings


def _check_deepspeed(recipe: Recipe, accelerator: Any, resume: bool) -> None:
    """Launched with a DeepSpeed config: DeepSpeed steps the optimizer inside each backward and partitions the
    optimizer state, so ft's own gradient accumulation and resumable checkpoints are refused (FSDP has both), and
    the micro-batch and clipping it needs are taken from the recipe."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    t = recipe.train
    fsdp = "or launch with recipes/accelerate/fsdp.yaml, which supports it"
    if t.grad_accum != 1:
        raise UserError(f"train.grad_accum: must be 1 under DeepSpeed (got {t.grad_accum}); raise micro_batch_size, "
                        f"use more GPUs, {fsdp}")
    if t.save_every or resume:
        raise UserError(f"train.save_every: resumable checkpoints are not supported under DeepSpeed yet; set "
                        f"save_every: null (the final adapter is still written), {fsdp}")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = t.max_grad_norm or 0.0


def _check_kernels(recipe: Recipe, device_type: str) -> None:
    """train.compile and train.liger_kernel: refuse, before anything loads or is written, what cannot run here."""
    import importlib.util

    t = recipe.train
    if t.liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("train.liger_kernel: liger-kernel is not installed; pip install liger-kernel (or set "
                            "train.liger_kernel: false)")
        if device_type != "cuda":
            raise UserError(f"train.liger_kernel: liger-kernel's Triton kernels need a CUDA GPU and this run is on "
                            f"the {device_type}; set train.liger_kernel: false")
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as exc:  # e.g. a liger-kernel too old or too new for this transformers
            raise UserError(f"train.liger_kernel: liger-kernel does not load here ({exc}); upgrade liger-kernel or "
                            "set train.liger_kernel: false") from None
    if t.compile:
        from ft_cli.model import compile_problem

        problem = compile_problem(device_type)
        if problem:
            raise UserError(f"train.compile: {problem}; or set train.compile: false")


def _check_dtype(recipe: Recipe, device_type: str) -> None:
    import torch

    if device_type == "cuda" and recipe.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UserError("model.dtype: bfloat16 is not supported by this GPU; use float16 or float32")
    if device_type == "cpu" and recipe.model.dtype == "float16":
        raise UserError("model.dtype: float16 training is not supported on the CPU; use float32 or bfloat16")


# logging.trackers entry -> (importable modules, any of which works; the pip extra that installs one)
_TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
                     "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow")}


def _trackers(recipe: Recipe, run: RunDir) -> list[str] | None:
    import importlib.util

    trackers = list(recipe.logging.trackers)
    for name in trackers:  # fail before the model loads, not after the first logged step
        modules, extra = _TRACKER_PACKAGES[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"logging.trackers: {name} is not installed; pip install 'ft-cli[{extra}]' "
                            f"(or pip install {modules[0]}), or remove {name} from logging.trackers")
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline-safe unless the user opts in
        os.environ.setdefault("WANDB_DIR", str(run.root))
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run.root / "mlruns").resolve().as_uri())
    return trackers or None


def _start_manifest(s: Session, built: Any, *, resumed: bool) -> dict[str, Any]:
    from ft_cli.manifest import environment_info

    previous = s.run.read_manifest() if resumed else {}
    return {
        **previous,
        "status": "running",
        "started_at": previous.get("started_at", now_iso()),
        "resumed_at": now_iso() if resumed else None,
        "resumed_from_step": s.start_step if resumed else None,
        "recipe_hash": s.recipe.fingerprint_hash(),
        "seed": s.recipe.train.seed,
        "method": s.recipe.method,
        "base_model": s.recipe.model.name_or_path,
        "base_model_path": built.base_path,
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "total_steps": s.total_steps,
        "num_processes": s.accelerator.num_processes,
        "data": {"fingerprint": s.data.fingerprint, "train": s.data.train_stats.to_dict(),
                 "eval": s.data.eval_stats.to_dict() if s.data.eval_stats else None},
        "environment": environment_info(str(s.accelerator.device)),
    }


def _finish_manifest(s: Session, status: str, step: int, error: str | None = None) -> None:
    if not s.accelerator.is_main_process:
        return
    s.manifest.update(status=status, finished_at=now_iso(), final_step=step,
                      best_eval_loss=s.state.get("best_eval_loss"), best_step=s.state.get("best_step"))
    if error:
        s.manifest["error"] = error[:2000]
    s.run.write_manifest(s.manifest)


def _summary(s: Session, step: int, out_dir: Path) -> str:
    lines = [f"done: {step} steps; {'adapter' if out_dir.name == 'adapter' else 'model'} saved to {out_dir}"]
    if s.state.get("best_eval_loss") is not None:
        lines.append(f"best eval_loss {s.state['best_eval_loss']:.4f} at step {s.state['best_step']} "
                     f"(a copy of that {out_dir.name} is in {s.run.best})")
    lines.append(f"metrics: {s.run.metrics}")
    return "\n".join(lines)
