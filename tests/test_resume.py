"""Reliability: kill -9 and resume gives the uninterrupted result; SIGTERM checkpoints; NaN stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.errors import CheckFailed
from ft_cli.recipe import load_recipe
from ft_cli.run_dir import RunDir
from tests.test_train import metrics, write_recipe

runner = CliRunner()
pytestmark = pytest.mark.slow

QLORA = {"method": "qlora", "quantization": {"bits": 4, "compute_dtype": "float32"},
         "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}}  # dropout: resume must restore the RNG too
TRAIN = {"max_steps": 12, "micro_batch_size": 4, "save_every": 3, "eval_every": 4, "log_every": 1, "keep_last": 2}


def ft(*args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ft_cli.cli", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    """The uninterrupted QLoRA run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(tmp, alpaca_file, train=TRAIN, **QLORA)
    out = ft("train", str(recipe))
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    (train_got, eval_got), (train_want, eval_want) = metrics(run), metrics(reference)
    assert [x["step"] for x in train_got] == [x["step"] for x in train_want]
    assert [x["loss"] for x in train_got] == pytest.approx([x["loss"] for x in train_want], rel=1e-6)
    assert [x["step"] for x in eval_got] == [x["step"] for x in eval_want]
    assert [x["eval_loss"] for x in eval_got] == pytest.approx([x["eval_loss"] for x in eval_want], rel=1e-6)
    a, b = adapter_weights(run), adapter_weights(reference)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path, alpaca_file: Path, reference: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN, **QLORA)
    proc = ft("train", str(recipe), wait=False)
    assert isinstance(proc, subprocess.Popen)
    wait_for(tmp_path / "run" / "checkpoints" / "step-6" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    # run.json still says "running", but the kernel dropped the run's lock with the process: a crash, not a live run
    assert json.loads((run / "run.json").read_text())["status"] == "running" and RunDir(run).status() == "crashed"
    out = ft("train", str(recipe), "--resume")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming" in out.stderr and "from checkpoint step" in out.stderr
    assert_same_run(run, reference)
    # keep_last: 2 pruned the older checkpoints
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-12", "step-9"]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_kill_9_of_a_run_with_a_dataloader_worker_resumes_exactly(tmp_path: Path, alpaca_file: Path,
                                                                   reference: Path) -> None:
    """train.dataloader_workers moves batch reading to a worker process and changes nothing else: killed with its
    worker after step 6 and resumed in-process, the run equals the reference, which never had a worker."""
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "dataloader_workers": 1}, **QLORA)
    proc = ft("train", str(recipe), wait=False)
    assert isinstance(proc, subprocess.Popen)
    wait_for(tmp_path / "run" / "checkpoints" / "step-6" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = ft("train", str(recipe), "--resume", "--set", "train.dataloader_workers=0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert_same_run(tmp_path / "run", reference)


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path: Path, alpaca_file: Path, reference: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN, **QLORA)
    proc = ft("train", str(recipe), wait=False)
    assert isinstance(proc, subprocess.Popen)
    wait_for(tmp_path / "run" / "checkpoints" / "step-3" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM: stopped after step" in output and "--resume" in output and "Traceback" not in output
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    step = manifest["final_step"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{step}" / "state.json").is_file()
    out = ft("train", str(recipe), "--resume")
    assert out.returncode == 0, out.stdout + out.stderr
    assert_same_run(tmp_path / "run", reference)


def test_resume_refuses_changed_training_fields(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "max_steps": 3, "eval_every": None})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--set", "train.lr=0.5", "--set", "lora.rank=4"])
    assert result.exit_code == 2
    assert "train.lr: 0.01 -> 0.5" in result.output and "lora.rank: 8 -> 4" in result.output
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    # max_steps is harmless: extending the run continues from the last checkpoint
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--set", "train.max_steps=5"])
    assert result.exit_code == 0, result.output
    assert [x["step"] for x in metrics(tmp_path / "run")[0]] == [1, 2, 3, 4, 5]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file)
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "run" / "checkpoints" / ".tmp-step-4").mkdir(parents=True)  # a half-written checkpoint
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 2 and "no whole checkpoint" in result.output


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path: Path, alpaca_file: Path) -> None:
    from ft_cli.train import fit, setup

    recipe_path = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "save_every": 2, "eval_every": None})
    session = setup(load_recipe(recipe_path), recipe_path, resume=False, overwrite=False)
    forward = session.model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += session.model.training  # not the evaluations (the sanity check before step 1 is one)
        if calls["n"] == 5 and session.model.training:  # the 5th optimizer step (grad_accum 1)
            out.loss = out.loss * float("nan")
        return out

    session.model.forward = poisoned
    with pytest.raises(CheckFailed) as exc:
        fit(session)
    msg = str(exc.value)
    assert "training diverged at step 5" in msg and "lower train.lr" in msg and "step-4" in msg
    assert exc.value.exit_code == 3
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-4" / "state.json").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4]
    assert not (run / "adapter").exists()
