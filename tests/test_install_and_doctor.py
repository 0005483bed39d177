"""Reproducible installs (constraints.txt, scripts/_setup.sh, scripts/update_constraints.py), `ft doctor`'s checks,
the quickstart's own check that its loss falls (run by .ci/run), and no noise from optional kernels."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import quickstart_summary  # noqa: E402
import update_constraints  # noqa: E402

CORE = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers", "pydantic")


# constraints.txt -----------------------------------------------------------------------------------------------

def test_constraints_pin_every_core_package_and_not_ft_itself() -> None:
    from ft_cli.doctor import tested_versions

    pins = tested_versions(ROOT / "constraints.txt")
    assert pins is not None
    assert all(name in pins for name in CORE), sorted(set(CORE) - set(pins))
    assert "ft-cli" not in pins
    assert all("+" not in v for v in pins.values())  # torch 2.13.0, not 2.13.0+cpu: _setup.sh picks the build


def test_update_constraints_keeps_exact_pins_only() -> None:
    freeze = "\n".join([
        "# Editable Git install with no remote (ft-cli==0.1.0)",
        "-e /work/ft",
        "Jinja2==3.1.6",
        "torch==2.13.0+cpu",
        "ft-cli==0.1.0",
        "some-pkg @ file:///tmp/some_pkg-1.0-py3-none-any.whl",
        "absl-py==2.5.1",
    ])
    assert update_constraints.constraints_from_freeze(freeze) == ["absl-py==2.5.1", "Jinja2==3.1.6", "torch==2.13.0"]


def fake_venv(tmp_path: Path, has_torch: bool) -> tuple[Path, Path]:
    """A venv whose python logs how it was called: `import ...` checks fail until `has_torch`, pip succeeds."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n'
                      f'case "$*" in *import*) exit {0 if has_torch else 1};; esac\nexit 0\n')
    python.chmod(0o755)
    return venv, log


def setup_calls(tmp_path: Path, **env: str) -> list[str]:
    venv, log = fake_venv(tmp_path, has_torch=False)
    environment = {k: v for k, v in os.environ.items() if k not in ("FT_UNPINNED", "FT_TORCH_VERSION")}
    environment.update(FT_VENV=str(venv), PATH=f"{tmp_path}:{os.environ['PATH']}", **env)
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # no GPU, whatever this host has
    (tmp_path / "nvidia-smi").chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "_setup.sh")], env=environment, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]


def test_setup_installs_the_tested_versions_by_default(tmp_path: Path) -> None:
    from ft_cli.doctor import tested_versions

    torch_pin = tested_versions(ROOT / "constraints.txt")["torch"]
    torch_install, ft_install = setup_calls(tmp_path)
    assert torch_install.startswith(f"-m pip install -q torch=={torch_pin}")
    assert f"-c {ROOT / 'constraints.txt'}" in torch_install and f"-c {ROOT / 'constraints.txt'}" in ft_install
    assert f"-e {ROOT}[dev]" in ft_install


def test_setup_opt_outs(tmp_path: Path) -> None:
    unpinned = setup_calls(tmp_path / "a", FT_UNPINNED="1")
    assert not any("-c " in call for call in unpinned)
    other_torch = setup_calls(tmp_path / "b", FT_TORCH_VERSION="2.12.0")
    assert other_torch[0].startswith("-m pip install -q torch==2.12.0")
    filtered = Path(other_torch[1].split("-c ", 1)[1].split()[0])
    assert "torch==" not in filtered.read_text() and "transformers==" in filtered.read_text()


def test_setup_stamp_covers_the_constraints(tmp_path: Path) -> None:
    """A regenerated constraints.txt reinstalls; an unchanged one does nothing."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt", "scripts/_setup.sh"):
        shutil.copy(ROOT / name, root / name)
    venv, log = fake_venv(tmp_path, has_torch=True)
    env = {**os.environ, "FT_VENV": str(venv)}
    env.pop("FT_UNPINNED", None)

    def run() -> int:
        before = len(log.read_text().splitlines()) if log.exists() else 0
        subprocess.run(["bash", str(root / "scripts" / "_setup.sh")], env=env, check=True, capture_output=True)
        return sum("pip install" in line for line in log.read_text().splitlines()[before:])

    assert run() == 1  # ft installed (torch "present")
    assert run() == 0  # stamp matches: nothing to do
    with (root / "constraints.txt").open("a") as f:
        f.write("some-new-package==1.0\n")
    assert run() == 1


# ft doctor -----------------------------------------------------------------------------------------------------

def test_doctor_reports_drift_from_the_tested_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    import ft_cli.doctor as doctor

    pins = tmp_path / "constraints.txt"
    import peft

    pins.write_text(f"# tested\ntransformers==0.0.1\npeft=={peft.__version__}\nnot-installed-anywhere==1.0\n")
    monkeypatch.setattr(doctor, "CONSTRAINTS", pins)
    rows = {name: (value, meaning) for name, value, meaning in doctor.run_doctor()}
    value, meaning = rows["tested versions"]
    assert value == "1 of 3 differ from constraints.txt"
    assert f"transformers {transformers.__version__} (tested 0.0.1)" in meaning and "_setup.sh" in meaning
    assert rows["transformers"][1] == "tested with 0.0.1 (constraints.txt)"
    pins.write_text(f"transformers=={transformers.__version__}\n")
    rows = {name: (value, meaning) for name, value, meaning in doctor.run_doctor()}
    assert rows["tested versions"][0] == "all match constraints.txt (1 pinned)"
    monkeypatch.setattr(doctor, "CONSTRAINTS", tmp_path / "missing.txt")
    rows = {name: (value, meaning) for name, value, meaning in doctor.run_doctor()}
    assert rows["tested versions"][0] == "unknown"


def test_doctor_says_in_one_line_what_bitsandbytes_does_on_this_cpu() -> None:
    from bitsandbytes.functional import has_avx512bf16

    from ft_cli.doctor import run_doctor

    rows = {name: (value, meaning) for name, value, meaning in run_doctor()}
    value, meaning = rows["bitsandbytes on the CPU"]
    assert value.startswith(f"AVX512-BF16: {'yes' if has_avx512bf16() else 'no'}; kernels-community")
    assert "never used" in meaning and "not needed" in meaning


# No noise from optional kernels --------------------------------------------------------------------------------

def test_bitsandbytes_kernels_community_notice_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """On any host: the record bitsandbytes logs on AVX512-BF16 CPUs never reaches the terminal once ft is imported,
    and bitsandbytes still words it the way ft's filter expects."""
    import importlib.util

    import ft_cli

    source = Path(importlib.util.find_spec("bitsandbytes.backends.cpu.ops").origin).read_text()
    assert f"Failed to load CPU gemm_4bit_forward {ft_cli.BNB_KERNEL_NOTICE}" in source
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
    logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_a_qlora_run_prints_no_kernel_noise(tmp_path: Path) -> None:
    """A whole `ft train` of a QLoRA recipe in a fresh process (bitsandbytes imported as users get it)."""
    from tests.test_eval_never_changes_training import FOUR_BIT, write_recipe, write_rows

    recipe = write_recipe(tmp_path, write_rows(tmp_path / "train.json", 8), None, FOUR_BIT["qlora-nf4"],
                          {"max_steps": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "ft_cli.cli", "train", str(recipe)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "kernels" not in out.stderr and "kernels" not in out.stdout


# The quickstart checks that it learned ------------------------------------------------------------------------

def write_metrics(run: Path, losses: list[float], evals: list[float]) -> Path:
    run.mkdir(parents=True)
    lines = [{"step": 5 * (i + 1), "loss": v} for i, v in enumerate(losses)]
    lines += [{"step": 20 * (i + 1), "eval_loss": v} for i, v in enumerate(evals)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(ln) for ln in lines) + "\n")
    return run


def test_quickstart_fails_when_its_loss_does_not_fall(tmp_path: Path) -> None:
    good = write_metrics(tmp_path / "good", [7.4, 7.0, 6.6, 5.5, 5.0, 4.9, 4.8], [5.4, 4.7])
    assert quickstart_summary.main([str(good)]) == 0
    flat = write_metrics(tmp_path / "flat", [7.4, 7.4, 7.4, 7.4, 7.3, 7.4, 7.4], [7.4, 7.4])
    summary, problems = quickstart_summary.check(flat)
    assert quickstart_summary.main([str(flat)]) == 1 and "did not fall" in problems[0]
    rising_eval = write_metrics(tmp_path / "rising", [7.4, 7.0, 6.6, 5.5, 5.0, 4.9, 4.8], [5.4, 5.6])
    assert quickstart_summary.main([str(rising_eval)]) == 1
    assert quickstart_summary.main([str(tmp_path / "missing")]) == 1


def test_ci_runs_the_suite_and_the_quickstart() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "scripts/quickstart.sh" in ci
    assert "quickstart_summary.py" in (ROOT / "scripts" / "quickstart.sh").read_text()
