"""The training loop's order around evaluation: a sanity evaluation of 1-2 eval batches before the first optimizer
step (an eval-path failure shows at step 0, not after eval_every steps), and at a step that both saves and
evaluates, the checkpoint first (a failing evaluation does not cost it) with the evaluation's outcome added after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ft_cli.scoring
from ft_cli.recipe import load_recipe
from tests.test_eval_never_changes_training import METHODS, write_recipe, write_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("data")
    return write_rows(tmp / "train.json", 24), write_rows(tmp / "eval.json", 6, offset=3)


def session_for(tmp: Path, data: tuple[Path, Path], **train_section):
    from ft_cli.train import setup

    path = write_recipe(tmp, *data, METHODS["lora"], train_section)
    return setup(load_recipe(path), path, resume=False, overwrite=True)


def failing_eval(monkeypatch: pytest.MonkeyPatch, on_call: int) -> list[int]:
    """Make the `on_call`-th evaluation (1 = the sanity check) raise, as an out-of-memory eval batch would."""
    real, calls = ft_cli.scoring.token_loss, [0]

    def token_loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise RuntimeError("evaluation broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(ft_cli.scoring, "token_loss", token_loss)
    return calls


def train_lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    return [ln for ln in lines if "loss" in ln]


def test_sanity_evaluation_runs_before_the_first_step(tmp_path: Path, data: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture) -> None:
    from ft_cli.train import fit

    fit(session_for(tmp_path, data, max_steps=2, eval_every=2))
    err = capsys.readouterr().err
    assert "step 0: evaluation works (sanity check on 6 eval rows: loss" in err
    assert err.index("step 0: evaluation works") < err.index("step 1/2")


def test_an_evaluation_failure_surfaces_before_any_training(tmp_path: Path, data: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.train import fit

    session = session_for(tmp_path, data, max_steps=4, eval_every=3)
    failing_eval(monkeypatch, on_call=1)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        fit(session)
    assert train_lines(tmp_path / "run") == []  # not 3 steps of training first
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_step_that_saves_and_evaluates_saves_first(tmp_path: Path, data: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.train import fit

    session = session_for(tmp_path, data, max_steps=4, eval_every=2, save_every=2, keep_last=None)
    failing_eval(monkeypatch, on_call=3)  # the sanity check, step 2, then step 4 fails
    with pytest.raises(RuntimeError, match="evaluation broke"):
        fit(session)
    run = tmp_path / "run"
    assert [ln["step"] for ln in train_lines(run)] == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["step"] == 4


def test_the_checkpoint_of_a_step_that_evaluated_carries_the_evaluation(tmp_path: Path,
                                                                        data: tuple[Path, Path]) -> None:
    """Resuming from it continues with that evaluation's best_eval_loss, best_step and patience."""
    from ft_cli.train import fit

    run = fit(session_for(tmp_path, data, max_steps=4, eval_every=2, save_every=2, keep_last=None,
                          early_stopping_patience=3))
    evals = {ln["step"]: ln["eval_loss"] for ln in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in ln}
    for step in (2, 4):
        state = json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())
        best = min((s for s in evals if s <= step), key=evals.get)
        assert state["best_step"] == best and state["best_eval_loss"] == pytest.approx(evals[best], rel=1e-12)
        assert state["step"] == step and "fingerprint" in state


def resume_session(tmp: Path, data: tuple[Path, Path], **train_section):
    from ft_cli.train import setup

    path = write_recipe(tmp, *data, METHODS["lora"], train_section)
    return setup(load_recipe(path), path, resume=True, overwrite=False)


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fails_at", [2, 4])  # mid-run, and the last step's evaluation
def test_a_resume_evaluates_the_step_whose_evaluation_was_cut_short(
        tmp_path: Path, data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, fails_at: int) -> None:
    """Killed (here: an evaluation that raises) between a step's checkpoint and its evaluation: the resumed run does
    that evaluation first, logs it once, and ends exactly like a run that was never interrupted."""
    from ft_cli.train import fit

    section = {"max_steps": 4, "eval_every": 2, "save_every": 2, "keep_last": None}
    reference = fit(session_for(tmp_path / "reference", data, **section))

    session = session_for(tmp_path / "cut", data, **section)
    failing_eval(monkeypatch, on_call=1 + fails_at // 2)  # after the sanity check, the evaluation at `fails_at`
    with pytest.raises(RuntimeError, match="evaluation broke"):
        fit(session)
    run = tmp_path / "cut" / "run"
    state = json.loads((run / "checkpoints" / f"step-{fails_at}" / "state.json").read_text())
    assert state["evaluation_due"] is True
    monkeypatch.undo()
    fit(resume_session(tmp_path / "cut", data, **section))

    got, want = metric_lines(run), metric_lines(reference)
    assert [(ln["step"], "eval_loss" in ln) for ln in got] == [(ln["step"], "eval_loss" in ln) for ln in want]
    for a, b in zip(got, want, strict=True):
        key = "eval_loss" if "eval_loss" in a else "loss"
        assert a[key] == pytest.approx(b[key], rel=1e-6)
    assert (run / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["best_step"] == json.loads(
        (reference / "run.json").read_text())["best_step"]
    assert json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())["evaluation_due"] is False
