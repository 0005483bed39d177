"""Reliability of the files ft writes: it replaces only what it wrote, one writer per run directory, disk and
permission faults end in one message with nothing half-written, damaged checkpoints are skipped on resume, a second
Ctrl-C says what is left, and every file gets the user's umask (tiny built-in Llama, CPU, offline)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ft_cli.cli import app
from ft_cli.run_dir import RunDir
from tests.test_train import metrics, write_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE, MARKER = ".ft.lock", ".ft-output.json"  # docs/SPEC.md names both
TRAIN = {"max_steps": 6, "micro_batch_size": 4, "save_every": 2, "eval_every": 3, "log_every": 1, "keep_last": None}


def ft(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def debris(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".ft-tmp" in p.name or ".ft-old" in p.name or ".tmp" in p.name]


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model fail loudly: a check that must happen before it is proven to."""
    import ft_cli.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(ft_cli.model, "build_model", refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> tuple[Path, Path]:
    """(recipe, run directory) of a finished 6-step LoRA run with checkpoints at steps 2, 4, 6 and evaluations."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp, alpaca_file, train=TRAIN)
    result = ft("train", recipe)
    assert result.exit_code == 0, result.output
    return recipe, tmp / "run"


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe, run = finished
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


# What --overwrite may replace -----------------------------------------------------------------------------------

def test_overwrite_never_deletes_a_directory_ft_did_not_write(tmp_path: Path, alpaca_file: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "userdir"
    (user / "src").mkdir(parents=True)
    (user / "src" / "main.py").write_text("print('mine')\n")
    (user / "notes.txt").write_text("my notes\n")
    before = snapshot(user)
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN)
    no_model_load(monkeypatch)
    for flags in ([], ["--overwrite"]):
        result = ft("train", recipe, "--output-dir", user, *flags)
        assert result.exit_code == 2, result.output
        assert "ft did not write (notes.txt, src/)" in result.output and "never deletes" in result.output
        assert "Traceback" not in result.output
    assert snapshot(user) == before


def test_overwrite_never_replaces_a_file(tmp_path: Path, alpaca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN)
    no_model_load(monkeypatch)
    result = ft("train", recipe, "--output-dir", target, "--overwrite")
    assert result.exit_code == 2 and "is a file, not a directory; ft never replaces a file" in result.output
    assert target.read_text() == "a,b\n1,2\n"


def test_overwrite_of_a_run_holding_foreign_files_is_refused(finished_run: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, run = copy_run(finished_run, tmp_path)
    (run / "my-analysis.ipynb").write_text("{}")
    before = snapshot(run)
    no_model_load(monkeypatch)
    result = ft("train", recipe, "--output-dir", run, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "also holds 1 entries ft did not write (my-analysis.ipynb)" in result.output
    assert snapshot(run) == before


def test_overwrite_replaces_an_ft_run_and_says_what_it_removes(finished_run: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    recipe, run = copy_run(finished_run, tmp_path)
    old_metrics = (run / "metrics.jsonl").read_text()
    result = ft("train", recipe, "--output-dir", run, "--overwrite", "--set", "train.max_steps=2",
                "--set", "train.save_every=null")
    assert result.exit_code == 0, result.output
    assert (f"--overwrite: removing the previous run in {run}: adapter/, best/, checkpoints/, metrics.jsonl, "
            "recipe.yaml, run.json") in result.output
    assert (run / "metrics.jsonl").read_text() != old_metrics and not (run / "checkpoints").exists()
    assert json.loads((run / "run.json").read_text())["final_step"] == 2


def test_a_directory_holding_another_kind_of_ft_output_is_refused(tmp_path: Path) -> None:
    from ft_cli.run_dir import prepare_output_dir

    out = prepare_output_dir(tmp_path / "merged", kind="merge")
    with out.writing() as tmp:
        (tmp / "config.json").write_text("{}")
    for kind in ("run", "export", "preprocess"):
        with pytest.raises(Exception) as exc:
            prepare_output_dir(tmp_path / "merged", kind=kind, overwrite=True)
        assert f"holds an ft merge output, not a {kind}" in str(exc.value)


def test_outputs_of_ft_0_1_are_recognised_by_their_layout(tmp_path: Path) -> None:
    """Before .ft-output.json: a merge directory is known by merge_report.json, and only ft's file names in it."""
    from ft_cli.run_dir import output_kind, prepare_output_dir

    old = tmp_path / "merged"
    old.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (old / name).write_text("{}")
    (old / "merge_report.json").write_text(json.dumps({"parity": {}}))
    assert output_kind(old) == "merge"
    assert "merge_report.json" in prepare_output_dir(old, kind="merge", overwrite=True).replaces
    (old / "notes.md").write_text("mine")
    with pytest.raises(Exception, match=r"1 entries ft did not write \(notes.md\)"):
        prepare_output_dir(old, kind="merge", overwrite=True)
    (old / "merge_report.json").write_text("{}")  # not ft's report: no proof
    with pytest.raises(Exception, match="holds files ft did not write"):
        prepare_output_dir(old, kind="merge", overwrite=True)


@pytest.fixture(scope="module")
def small_lora_run(finished_run: tuple[Path, Path]) -> Path:
    return finished_run[1]


def test_merge_out_replaces_only_its_own_output(small_lora_run: Path, tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    result = ft("merge", small_lora_run, "--out", user, "--overwrite")
    assert result.exit_code == 2 and "ft did not write (keep.txt)" in result.output
    assert [p.name for p in user.iterdir()] == ["keep.txt"]
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"weights")
    result = ft("merge", small_lora_run, "--out", afile, "--overwrite")
    assert result.exit_code == 2 and "ft never replaces a file" in result.output and afile.read_bytes() == b"weights"

    out = tmp_path / "merged"
    assert ft("merge", small_lora_run, "--out", out).exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "merge" and "merge_report.json" in marker["entries"]
    first = out.stat().st_ino
    result = ft("merge", small_lora_run, "--out", out)
    assert result.exit_code == 2 and "earlier ft merge output; use --overwrite" in result.output
    result = ft("merge", small_lora_run, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"--out {out}: replacing the previous merge output:" in result.output
    assert "config.json" in result.output and "merge_report.json" in result.output
    assert out.stat().st_ino != first  # a new directory, built beside the old one and renamed into place
    assert not debris(tmp_path)
    (out / "notes.md").write_text("what I found")
    result = ft("merge", small_lora_run, "--out", out, "--overwrite")
    assert result.exit_code == 2 and "entries ft did not write (notes.md)" in result.output
    assert (out / "notes.md").is_file() and (out / "config.json").is_file()


def test_preprocess_out_replaces_only_its_own_output(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file)
    out = tmp_path / "tokenized"
    assert ft("preprocess", recipe, "--out", out).exit_code == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "preprocess"
    result = ft("preprocess", recipe, "--out", out)
    assert result.exit_code == 2 and "use --overwrite" in result.output
    result = ft("preprocess", recipe, "--out", out, "--overwrite")
    assert result.exit_code == 0 and "replacing the previous preprocess output" in result.output
    assert "dataset_dict.json" in result.output and "stats.json" in result.output
    from datasets import load_from_disk

    assert len(load_from_disk(str(out))["train"]) > 0
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.parquet").write_bytes(b"PAR1")
    result = ft("preprocess", recipe, "--out", user, "--overwrite")
    assert result.exit_code == 2 and "ft did not write (data.parquet)" in result.output
    assert [p.name for p in user.iterdir()] == ["data.parquet"]
    assert not debris(tmp_path)


def test_cache_entries_carry_fts_manifest_and_only_they_are_removed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets import Dataset, DatasetDict

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.data import cache
    from ft_cli.run_dir import remove_output_dir

    built = resolve_builtin("builtin:tiny-llama")  # in the session's cache, before the test's cache is set
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    cache.save_entry("k" * 24, DatasetDict({"train": Dataset.from_dict({"input_ids": [[1, 2]]})}),
                     {"fingerprint": "k" * 24})
    entry = cache.cache_root() / ("k" * 24)
    assert json.loads((entry / MARKER).read_text())["kind"] == "cache"
    assert cache.load_entry("k" * 24) is not None
    foreign = cache.cache_root() / "my-models"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    with pytest.raises(Exception, match="not an ft cache output"):
        remove_output_dir(foreign, kind="cache")
    (entry / "stray.txt").write_text("x")
    with pytest.raises(Exception, match="entries ft did not write"):
        remove_output_dir(entry, kind="cache")
    (entry / "stray.txt").unlink()
    assert "meta.json" in remove_output_dir(entry, kind="cache")
    assert not entry.exists() and (foreign / "weights.bin").is_file()
    # built-in models live in the same cache and are ft's too
    copy = tmp_path / "cache" / "builtin" / built.name
    shutil.copytree(built, copy)
    assert "model.safetensors" in remove_output_dir(copy, kind="cache") and not copy.exists()


def test_an_output_is_whole_or_absent(tmp_path: Path) -> None:
    """The contract `ft export` builds on: prepare_output_dir(...).writing()."""
    from ft_cli.run_dir import prepare_output_dir

    target = tmp_path / "export"
    out = prepare_output_dir(target, kind="export")
    with pytest.raises(RuntimeError, match="conversion failed"), out.writing() as tmp:
        (tmp / "model.gguf").write_bytes(b"half")
        raise RuntimeError("conversion failed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with out.writing() as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF")
    assert (target / "model.gguf").read_bytes() == b"GGUF"
    assert stat.S_IMODE((target / "model.gguf").stat().st_mode) == 0o666 & ~_umask()
    # A second writer that started before the first finished does not clobber its output
    with pytest.raises(Exception, match="use --overwrite"), out.writing() as tmp:
        (tmp / "model.gguf").write_bytes(b"other")
    assert (target / "model.gguf").read_bytes() == b"GGUF"


def test_debris_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    from ft_cli.atomic import remove_debris

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {"dead": f".merged.ft-tmp-{dead_pid}-abcd1234", "live": f".merged.ft-tmp-{os.getpid()}-abcd1234",
             "recent": f".data.ft-tmp-{dead_pid}-0000ffff", "old": f".best.ft-old-{dead_pid}-0000abcd"}
    for name in names.values():
        (tmp_path / name).mkdir()
    (tmp_path / "mine.ft-tmp-1-a").mkdir()  # not a name ft gives its temporaries
    hour_ago = time.time() - 3600
    for key in ("dead", "live", "old"):
        os.utime(tmp_path / names[key], (hour_ago, hour_ago))
    assert remove_debris(tmp_path) == [names["dead"]]
    # the dead writer moved best/ aside and died before its new best/ arrived: the old one is put back; a temporary
    # of a live process, one of a dead process younger than 10 minutes (a pid from another host?) and a user's
    # directory stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["recent"], "best",
                                                                 "mine.ft-tmp-1-a"])
    # with the directory's lock held (a run directory), every ft temporary there is debris
    assert sorted(remove_debris(tmp_path, include_live=True)) == sorted([names["live"], names["recent"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "mine.ft-tmp-1-a"]


# One writer per run directory ----------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from ft_cli.run_dir import RunDir
from ft_cli.run_lock import acquire_run_lock
lock = acquire_run_lock(RunDir(Path(sys.argv[1])), resume=sys.argv[2] == "resume", overwrite=False)
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(run: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run), mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_turns_every_second_writer_away_and_kill_9_frees_it(
        finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ft_cli.run_lock import lock_holder

    recipe, run = copy_run(finished_run, tmp_path)
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), "status": "running"}))
    assert RunDir(run).status() == "crashed"  # "running", but nobody holds the lock
    holder = hold_lock(run, "resume")
    try:
        assert RunDir(run).status() == "running" and lock_holder(run)["pid"] == holder.pid
        before = snapshot(run)
        no_model_load(monkeypatch)
        for flags in ([], ["--resume"], ["--overwrite"]):
            result = ft("train", recipe, "--output-dir", run, *flags)
            assert result.exit_code == 2, result.output
            assert f"is in use by another ft process (pid {holder.pid} on {os.uname().nodename}" in result.output
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_holder(run) is None and RunDir(run).status() == "crashed"  # kill -9 leaves no stale lock
    result = ft("train", recipe, "--output-dir", run)
    assert result.exit_code == 2 and "(status: crashed: run.json says running, but no ft process holds its lock)" \
        in result.output


@pytest.mark.slow
def test_two_trains_started_together_one_runs_the_other_exits_2(tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "max_steps": 15, "eval_every": None})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ft_cli.cli", "train", str(recipe)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], outs
    loser = outs[[first.returncode, second.returncode].index(2)][1]
    assert "is in use by another ft process (pid" in loser or "already holds a run (status: running" in loser, loser
    assert "Traceback" not in loser
    assert [x["step"] for x in metrics(tmp_path / "run")[0]] == list(range(1, 16))  # each step once


# Faults: permissions, paths, disk space ---------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nobody may write into: a read-only tmpfs as root (root ignores permissions), chmod 555 else."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
            pytest.skip("running as root but cannot mount a read-only tmpfs")
        yield path
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.mark.parametrize("sub", ["", "run"])
def test_not_writable_output_dir_is_refused_before_the_model_loads(read_only_dir: Path, sub: str, tmp_path: Path,
                                                                   alpaca_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN)
    out = read_only_dir / sub if sub else read_only_dir
    no_model_load(monkeypatch)
    result = ft("train", recipe, "--output-dir", out)
    assert result.exit_code == 2, result.output
    assert "not writable" in result.output and "Traceback" not in result.output
    assert "read-only file system" in result.output or "permission denied" in result.output


def test_a_path_through_a_file_is_refused_before_the_model_loads(tmp_path: Path, alpaca_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "afile").write_text("x")
    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN)
    no_model_load(monkeypatch)
    for command in (["train", recipe, "--output-dir", tmp_path / "afile" / "sub"],
                    ["preprocess", recipe, "--out", tmp_path / "afile" / "sub"]):
        result = ft(*command)
        assert result.exit_code == 2, result.output
        assert f"{tmp_path / 'afile'} is a file, not a directory" in result.output
    assert (tmp_path / "afile").read_text() == "x"


def test_too_little_disk_space_is_refused_before_the_model_loads(tmp_path: Path, alpaca_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ft_cli.run_dir

    recipe = write_recipe(tmp_path, alpaca_file, train=TRAIN)
    monkeypatch.setattr(ft_cli.run_dir, "free_bytes", lambda path: 300_000)
    no_model_load(monkeypatch)
    result = ft("train", recipe)
    assert result.exit_code == 2, result.output
    assert "not enough free disk space: 0.29 MiB free, and it will write about" in result.output
    assert "3 checkpoints of" in result.output and "3 copies of the adapter" in result.output
    assert not (tmp_path / "run").exists()  # the directory made for the lock is gone again


def test_disk_estimate_follows_the_checkpoint_and_output_arithmetic() -> None:
    from ft_cli.plan import OUTPUT_EXTRA_BYTES, disk_needs
    from ft_cli.recipe import recipe_from_dict

    def recipe(**train):
        return recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "method": "lora",
                                 "data": {"train": "x.jsonl", "val_split": 0.1}, "train": train})

    trainable = [(1000, 4), (500, 4)]  # 6000 bytes of float32 adapter weights, AdamW: 12000 bytes of state
    ckpt = 6000 + 12000 + 2**20
    out = 6000 + OUTPUT_EXTRA_BYTES
    need, detail = disk_needs(recipe(max_steps=100, save_every=10, keep_last=2), trainable, 10**6, total_steps=100)
    assert need == 3 * ckpt + 3 * out and detail.startswith("3 checkpoints")  # 2 kept + 1 being written
    need, _ = disk_needs(recipe(max_steps=100, save_every=30, keep_last=None), trainable, 10**6, total_steps=100)
    assert need == 4 * ckpt + 3 * out  # steps 30, 60, 90 and the final 100, all kept
    full = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama", "dtype": "bfloat16"}, "method": "full",
                             "data": {"train": "x.jsonl", "val_split": 0.0}, "train": {"save_every": None}})
    need, detail = disk_needs(full, [(10**6, 4)], 10**6, total_steps=5)
    assert need == 2 * 10**6 + OUTPUT_EXTRA_BYTES and "1 copy of the model" in detail  # bf16, no best/


# Faults: a full disk in the middle of a run ---------------------------------------------------------------------

def _fill_on_second_checkpoint(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The second checkpoint (step 4) hits a full disk: in the weights (safetensors) or the optimizer state
    (torch.save through ft's file object), after part of the file was written."""
    import safetensors.torch

    import ft_cli.checkpoint

    calls = {"n": 0}
    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        real_save_file(tensors, filename, *args, **kwargs)
        if calls["n"] == 2 and where == "weights":
            with open(filename, "r+b") as fh:
                fh.truncate(os.path.getsize(filename) // 2)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28)")

    def write(self, data):
        if calls["n"] == 2 and self.fh.name.endswith("optimizer.pt") and self.fh.tell() > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.sha256.update(data)  # what ft_cli.checkpoint._HashingWriter.write does
        return self.fh.write(data)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    if where == "optimizer":
        monkeypatch.setattr(ft_cli.checkpoint._HashingWriter, "write", write)


def assert_failed_cleanly_at_step_4(result, run: Path) -> None:
    from ft_cli.checkpoint import checkpoint_problem
    from ft_cli.run_lock import lock_holder

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "disk full while writing to" in result.output and "the last whole checkpoint is step 2" in result.output
    assert "--resume" in result.output
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("disk full")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert checkpoint_problem(run / "checkpoints" / "step-2") is None
    assert not debris(run), debris(run)
    assert lock_holder(run) is None and RunDir(run).status() == "failed"


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(where: str, tmp_path: Path, alpaca_file: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "eval_every": None})
    with monkeypatch.context() as patch:
        _fill_on_second_checkpoint(patch, where)
        result = ft("train", recipe)
    run = tmp_path / "run"
    assert_failed_cleanly_at_step_4(result, run)
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4]
    result = ft("train", recipe, "--resume")  # space freed: it continues from step 2
    assert result.exit_code == 0, result.output
    assert "from checkpoint step 2" in result.output
    assert [x["step"] for x in metrics(run)[0]] == [1, 2, 3, 4, 5, 6]


def test_disk_full_on_a_real_small_filesystem(tmp_path: Path, alpaca_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on a 64 MiB tmpfs that fills up after the first checkpoint: the errors the libraries really raise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_disk_full_during_a_checkpoint_keeps_the_previous_one "
                    "injects the same error")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        import ft_cli.checkpoint

        real = ft_cli.checkpoint.save_checkpoint

        def save_then_fill(run, step, **kwargs):
            path = real(run, step, **kwargs)
            if step == 2:  # leave a few KB: the next checkpoint needs ~150 KB
                with open(disk / "filler", "wb") as fh:
                    fh.write(b"\0" * (shutil.disk_usage(disk).free - 8192))
            return path

        monkeypatch.setattr(ft_cli.checkpoint, "save_checkpoint", save_then_fill)
        recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "eval_every": None},
                              output_dir=str(disk / "run"))
        result = ft("train", recipe)
        assert_failed_cleanly_at_step_4(result, disk / "run")
        (disk / "filler").unlink()
        monkeypatch.setattr(ft_cli.checkpoint, "save_checkpoint", real)
        result = ft("train", recipe, "--resume")
        assert result.exit_code == 0, result.output
        assert [x["step"] for x in metrics(disk / "run")[0]] == [1, 2, 3, 4, 5, 6]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# Resume skips damaged checkpoints ---------------------------------------------------------------------------------

def test_resume_skips_corrupt_and_partial_checkpoints(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, run = copy_run(finished_run, tmp_path)
    original = metrics(run)
    ckpts = run / "checkpoints"
    data = bytearray((ckpts / "step-6" / "trainable.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, still parses
    (ckpts / "step-6" / "trainable.safetensors").write_bytes(bytes(data))
    (ckpts / "step-4" / "optimizer.pt").unlink()  # partial: a file is missing
    (ckpts / ".step-8.ft-tmp").mkdir()  # what a kill -9 in the middle of writing a checkpoint and run.json leaves
    (ckpts / ".step-8.ft-tmp" / "trainable.safetensors").write_bytes(b"half")
    (run / f".run.json.ft-tmp-{os.getpid()}-abcd0123").write_text("{")
    result = ft("train", recipe, "--output-dir", run, "--resume")
    assert result.exit_code == 0, result.output
    assert not debris(run)
    assert (f"warning: checkpoint {ckpts / 'step-6'} is corrupt or partial (trainable.safetensors does not match "
            "its checksum); skipping it") in result.output
    assert f"warning: checkpoint {ckpts / 'step-4'} is corrupt or partial (optimizer.pt is missing)" in result.output
    assert "from checkpoint step 2" in result.output and "Traceback" not in result.output
    # Steps 3-6 were trained again from step 2: exactly what the first run computed (resume is exact)
    resumed = metrics(run)
    assert [x["step"] for x in resumed[0]] == list(range(1, 7))
    assert [x["loss"] for x in resumed[0]] == pytest.approx([x["loss"] for x in original[0]], rel=1e-6)
    assert [x["eval_loss"] for x in resumed[1]] == pytest.approx([x["eval_loss"] for x in original[1]], rel=1e-6)


def test_resume_with_only_damaged_checkpoints_is_a_clear_error(finished_run: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    recipe, run = copy_run(finished_run, tmp_path)
    for ckpt in (run / "checkpoints").iterdir():
        file = ckpt / "trainable.safetensors"
        file.write_bytes(file.read_bytes()[:100])  # cut short
    before = snapshot(run)
    result = ft("train", recipe, "--output-dir", run, "--resume")
    assert result.exit_code == 2 and "every checkpoint there is damaged" in result.output
    assert "has 100 bytes" in result.output and "Traceback" not in result.output
    assert {k: v for k, v in snapshot(run).items() if k != LOCK_FILE} == \
        {k: v for k, v in before.items() if k != LOCK_FILE}


# Ctrl-C twice -----------------------------------------------------------------------------------------------------

def test_second_ctrl_c_exits_at_once_and_names_the_last_whole_checkpoint(tmp_path: Path, alpaca_file: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capfd: pytest.CaptureFixture,
                                                                        tiny_llama_dir: Path) -> None:
    """The first Ctrl-C comes during step 3: ft finishes the step and starts writing a checkpoint; the second comes
    while that checkpoint is half written. (tiny_llama_dir: the built-in model is built, and its weights saved,
    before the count of saved files starts.)"""
    import safetensors.torch

    import ft_cli.train

    steps, saves = {"n": 0}, {"n": 0}
    real_rows, real_save_file = ft_cli.train._rows, safetensors.torch.save_file

    def rows(dataset, indices):
        steps["n"] += 1
        if steps["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_rows(dataset, indices)

    def save_file(tensors, filename, *args, **kwargs):
        saves["n"] += 1
        real_save_file(tensors, filename, *args, **kwargs)
        if saves["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt arrives here, before the rest is written

    monkeypatch.setattr(ft_cli.train, "_rows", rows)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "eval_every": None, "grad_accum": 1})
    result = ft("train", recipe)
    assert result.exit_code == 130, result.output
    # the first one said what happens next, from the signal handler (straight to file descriptor 2)
    assert "SIGINT: stopping after this step to write a checkpoint; Ctrl-C again exits at once, without one" \
        in capfd.readouterr().err
    assert "interrupted again: exiting without a checkpoint; the last whole checkpoint is step 2" in result.output
    assert "Traceback" not in result.output
    run = tmp_path / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["final_step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"] and not debris(run)


# Modes ---------------------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_gets_the_users_umask(mask: int, tmp_path: Path, alpaca_file: Path) -> None:
    recipe = write_recipe(tmp_path, alpaca_file, train={**TRAIN, "max_steps": 2})
    old = os.umask(mask)
    try:
        result = ft("train", recipe)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert "adapter/adapter_model.safetensors" in modes and "checkpoints/step-2/trainable.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_lets_go_of_the_run_lock(tmp_path: Path) -> None:
    """Any process forked while ft holds a run's lock (a DataLoader worker, a tokenizing worker) closes its copy of
    the lock's descriptor as it starts, so that after kill -9 of ft the run is free at once, not when a child ends."""
    from ft_cli.run_lock import acquire_run_lock, lock_holder

    lock = acquire_run_lock(RunDir(tmp_path / "run"), resume=False, overwrite=False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it still holds the lock, then wait to be killed
        os.write(write, b"held" if lock.held else b"free")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(read, 4) == b"free"
        assert lock.held
        lock.release()  # the parent lets go while the child still runs: the run must be free now
        assert lock_holder(tmp_path / "run") is None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
