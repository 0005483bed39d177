"""scripts/gpu_check.sh (the whole GPU check in one command) on the CPU: the dry run of every stage's code path
and the results files, so the script that a short GPU lease depends on cannot rot; and its parts (time budgets,
stopping a command, the wheel plan, bitsandbytes' slimmed wheel, the pytest parsers, the targets and summary).
The GPU run itself is for a machine with a GPU (docs/benchmarks.md, "How to run the GPU check")."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402


def _wheel(directory: Path, name: str, version: str, files: dict[str, bytes], tag: str = "py3-none-any") -> Path:
    """A minimal valid wheel (what pip needs: METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    path = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", record)
    return path


# The dry run -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bash scripts/gpu_check.sh --device cpu --shape tiny` once, with a wheels folder like the one that travels:
    a probe wheel the interpreter lacks (installed), a wheel of an installed package at its installed version
    (skipped) and the data, gzipped (200 alpaca rows here, to keep it quick)."""
    base = tmp_path_factory.mktemp("gpu-check")
    wheels, work, out = base / "wheels", base / "work", base / "out"
    wheels.mkdir()
    _wheel(wheels, "ft_gpu_check_probe", "1.0", {"ft_gpu_check_probe/__init__.py": b"VALUE = 42\n"})
    yaml_version = metadata.version("pyyaml")
    _wheel(wheels, "PyYAML", yaml_version, {"yaml/__init__.py": b"raise ImportError('must not be installed')\n"})
    (wheels / "gpu_wheels.json").write_text(json.dumps({"wheels": [
        {"file": f"PyYAML-{yaml_version}-py3-none-any.whl", "name": "pyyaml", "version": yaml_version,
         "policy": "floor", "min": "5.1"}]}))
    (wheels / "data").mkdir()
    with gzip.open(wheels / "data" / "alpaca_en_demo.json.gz", "wb") as f:
        f.write((ROOT / "examples" / "data" / "quickstart_alpaca.json").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="2")
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--shape", "tiny", "--work-dir",
                           str(work), "--out", str(out), "--wheels", str(wheels), "--budget", "1000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return {"proc": proc, "out": out, "work": work, "wall": time.monotonic() - start,
            "data": json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None}


def _stage(data: dict, name: str) -> dict:
    return next(s for s in data["stages"] if s["name"] == name)


def test_dry_run_passes_every_stage_and_writes_the_results(dry_run: dict) -> None:
    proc, data = dry_run["proc"], dry_run["data"]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert [s["name"] for s in data["stages"]] == list(gpu_check.STAGES)
    for s in data["stages"]:
        assert s["status"] == "passed", (s["name"], s)
        for step in s["steps"]:
            assert step["status"] == "passed" or step["status"].startswith("skipped: "), step
            assert all(c["ok"] for c in step["checks"]), step
    assert data["finished"] and data["device"] == "cpu" and data["shape"] == "tiny"
    assert "gpu check: 5 passed of 5 stages" in proc.stdout
    # What the device tool returns: at most 8 files, 16 MiB each, plain names, at most 2 folders down.
    files = sorted(p.name for p in dry_run["out"].rglob("*") if p.is_file())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    for p in dry_run["out"].iterdir():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < 16 * 2**20
    # The printed summary ends the output (the tool's reply shows the last 12,000 characters).
    assert "## Targets" in proc.stdout[-12000:] and "| stage | status |" in proc.stdout[-12000:]


def test_dry_run_setup_installs_only_what_is_missing(dry_run: dict) -> None:
    setup = _stage(dry_run["data"], "setup")
    wheels = {w["name"]: w for w in setup["details"]["wheels"]}
    assert wheels["ft-gpu-check-probe"]["install"] and wheels["ft-gpu-check-probe"]["why"] == "missing"
    assert not wheels["pyyaml"]["install"] and wheels["pyyaml"]["why"].endswith(">= 5.1 is there")
    site = dry_run["work"] / "site"
    assert (site / "ft_gpu_check_probe" / "__init__.py").is_file() and not (site / "yaml").exists()
    pre = setup["details"]["preflight"]
    assert pre["ok"] and pre["problems"] == [] and pre["bnb_nf4_relative_error"] < 0.2
    assert pre["versions"]["torch"] and pre["versions"]["bitsandbytes"] and pre["versions"]["datasets"]
    data_step = next(s for s in setup["steps"] if s["name"] == "data")
    assert "(carried)" in data_step["note"]
    assert (dry_run["work"] / "data" / "alpaca_en_demo.json").read_bytes() == \
        (ROOT / "examples" / "data" / "quickstart_alpaca.json").read_bytes()


def test_setup_falls_back_to_the_machines_version_when_a_carried_one_breaks(tmp_path: Path) -> None:
    """A carried wheel that would replace the machine's own version but does not import there (here: a broken
    pyyaml) is dropped and setup retries with the machine's; the rest of the carried set is still installed."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "PyYAML", "0.0.1", {"yaml/__init__.py": b"raise ImportError('carried pyyaml is broken')\n"})
    _wheel(wheels, "ft_gpu_check_probe", "1.0", {"ft_gpu_check_probe/__init__.py": b""})
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--only", "",
                           "--work-dir", str(tmp_path / "work"), "--out", str(out), "--wheels", str(wheels), "--budget",
                           "500"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    setup = _stage(json.loads((out / "gpu_check.json").read_text()), "setup")
    assert setup["status"] == "passed"
    assert [s["name"] for s in setup["steps"]] == [
        "install wheels", "preflight", "install wheels (machine's own versions where present)",
        "preflight (machine's own versions)", "data"]
    assert setup["details"]["fallback"]["dropped"] == ["PyYAML-0.0.1-py3-none-any.whl"]
    assert any("carried pyyaml is broken" in p for p in setup["details"]["fallback"]["problems"])
    site = tmp_path / "work" / "site-machine"
    assert (site / "ft_gpu_check_probe").is_dir() and not (site / "yaml").exists()
    assert "retrying with the machine's own versions" in proc.stdout


def test_dry_run_stages_check_what_they_promise(dry_run: dict) -> None:
    data = dry_run["data"]
    tests = _stage(data, "gpu-tests")["details"]
    assert tests["counts"] == {"skipped": len(tests["tests"])} and len(tests["tests"]) >= 8  # no CUDA here
    assert any(t["name"].endswith("test_qlora_bf16_on_cuda_loss_falls") for t in tests["tests"])

    recipes = _stage(data, "recipes")
    assert [s["name"] for s in recipes["steps"]] == ["quickstart", "llama-3.1-8b/qlora.yaml --smoke"]
    for step in recipes["steps"]:
        whats = {c["what"] for c in step["checks"]}
        assert {"run.json status completed", "trained on cpu", "adapter written", "eval_loss logged"} <= whats
        assert step["losses"]["steps"] == 4

    bench = _stage(data, "bench")
    assert [s["status"] for s in bench["steps"]] == ["passed", "skipped: liger-kernel needs CUDA",
                                                     "skipped: flash-attn needs CUDA"]
    base = bench["details"]["variants"]["base"]
    assert base["complete"] and [r["method"] for r in base["results"]] == ["lora", "qlora"]
    for r in base["results"]:
        assert r["tokens_per_s"] > 0 and r["plan_bytes"] > 0 and r["timed_steps"] == 2 and r["peak_bytes"] > 0
        assert 0 < r["timed_tokens"] <= 2 * 128 and r["segments"] >= 2
    assert base["targets"]["qlora_speed"]["value"] > 0 and base["targets"]["lora_mfu"]["value"] is None

    real = _stage(data, "real-run")
    assert [s["name"] for s in real["steps"]] == ["build the tiny model, ft plan", "train", "ft eval", "ft merge"]
    d = real["details"]
    assert d["model"]["shape"] == "tiny" and d["plan_bytes"] > 0 and len(d["losses"]) == 6
    assert d["eval"]["relative_diff"] <= 1e-4 and d["eval"]["logged_at_step"] == 6
    assert d["merge"]["parity_ok"] is True


def test_dry_run_log_and_summary(dry_run: dict) -> None:
    log = (dry_run["out"] / "gpu_check.log").read_text()
    # the benchmark's own table went through (rows of numbers per method), and every command is logged
    for method in ("lora", "qlora"):
        assert re.search(rf"^{method}\s+[\d,]+\s+[\d.]+\s+n/a\s+n/a\s+n/a\s+[\d.]+\s", log, re.M), method
    for text in ("MFU", "GiB", "QLoRA/LoRA throughput", "QLoRA/LoRA peak memory", "ft plan GiB", "torch ",
                 "transformers ", "peft ", "bitsandbytes ", "command: python scripts/bench_gpu.py --shape tiny"):
        assert text in log, text
    assert "$ " + sys.executable in log and "ft_cli.cli train" in log and "ft_cli.cli merge" in log
    md = (dry_run["out"] / "gpu_check.md").read_text()
    for text in ("**Dry run on the CPU**", "## Targets", "| bf16 LoRA 8B MFU (4N) | not measured | >= 40% | n/a |",
                 "QLoRA / LoRA tokens/s", "ft plan vs every measured peak", "## GPU tests", "## Recipes",
                 "## Benchmark: tiny shape", "## Real-size run: tiny model", "ft merge: parity OK",
                 "ft-gpu-check-probe"):
        assert text in md, text
    assert "## Failures" not in md


# Time: budgets, stopping, skipping ---------------------------------------------------------------------------------

def test_share_of_the_time_left() -> None:
    assert gpu_check.share(500, 100, 400) == 200  # 100 s to spare: this stage may use them
    assert gpu_check.share(200, 100, 400) == 50  # short: each remaining stage gets its proportion
    assert gpu_check.share(-3, 100, 400) == 0


def _check(tmp_path: Path, *argv: str) -> gpu_check.Check:
    args = gpu_check.parse_args(["--device", "cpu", "--work-dir", str(tmp_path / "work"), "--out",
                                 str(tmp_path / "out"), *argv])
    check = gpu_check.Check(args)
    check.out.mkdir(parents=True)
    return check


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan whose reaping is up to the container's init)."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_a_command_past_its_time_is_stopped_with_its_children(tmp_path: Path) -> None:
    check = _check(tmp_path, "--only", "recipes", "--stage-budget", "setup=1", "--stage-budget", "recipes=2")
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\ntime.sleep(60)\n")
    stage = gpu_check.Stage(check, "recipes")
    assert stage.time <= 3
    rec = stage.step("sleeper")
    start = time.monotonic()
    res = stage.command(rec, [sys.executable, "-c", script])
    assert res["timed_out"] and time.monotonic() - start < 15
    assert rec["status"] == "stopped: time" and rec["tail"] == ["started"]
    assert not _running(int(pid_file.read_text()))  # the whole process group went, grandchildren too
    assert not stage.can_start("next")  # nothing left: the next step is skipped, not started
    assert stage.record["steps"][-1]["status"] == "skipped: time"
    stage.finish()
    assert stage.record["status"] == "stopped: time"
    saved = json.loads((check.out / "gpu_check.json").read_text())
    assert _stage(saved, "recipes")["status"] == "stopped: time"
    assert "stopped: time" in (check.out / "gpu_check.md").read_text()
    assert "[stopped after" in (check.out / "gpu_check.log").read_text()


def test_terminated_run_stops_its_command_and_keeps_the_results(tmp_path: Path) -> None:
    """SIGTERM (the device tool's time limit, or Ctrl-C): the running command is stopped, nothing else starts, and
    the results written so far stay, with the reason."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--only",
                             "recipes", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--wheels",
                             str(tmp_path / "none")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("--- recipes: quickstart"):
            time.sleep(1)
            proc.send_signal(15)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest
    data = json.loads((out / "gpu_check.json").read_text())
    recipes = _stage(data, "recipes")
    assert [s["status"] for s in recipes["steps"]] == ["stopped: terminated", "skipped: terminated"]
    assert recipes["status"] == "stopped: terminated" and data["finished"]
    assert "### recipes: quickstart (stopped: terminated)" in (out / "gpu_check.md").read_text()


def test_a_failed_check_fails_its_step_and_stage(tmp_path: Path) -> None:
    check = _check(tmp_path)
    stage = gpu_check.Stage(check, "setup")
    rec = stage.step("echo")
    stage.command(rec, [sys.executable, "-c", "print('hello')"])
    assert rec["status"] == "passed" and rec["wall_s"] is not None
    assert stage.expect(rec, "it said hello", True) and not stage.expect(rec, "it said bye", False, "no")
    stage.finish()
    assert rec["status"] == "failed" and stage.record["status"] == "failed"
    md = (check.out / "gpu_check.md").read_text()
    assert "### setup: echo (failed)" in md and "check failed: it said bye: no" in md


def test_arguments_are_checked() -> None:
    for argv, text in ((["--only", "bench,nope"], "unknown stage nope"),
                       (["--stage-budget", "bench=soon"], "STAGE=SECONDS"),
                       (["--device", "cpu", "--shape", "8b"], "tiny shape")):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *argv], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and text in out.stderr, (argv, out.stderr)


def test_a_work_dir_it_did_not_make_is_refused(tmp_path: Path) -> None:
    (tmp_path / "someone-elses.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="was not made by this script"):
        gpu_check.prepare_work_dir(tmp_path)
    assert (tmp_path / "someone-elses.txt").read_text() == "keep me"


def test_gpu_memory_poller_reports_peak_over_baseline() -> None:
    values = iter([1000, 1500, 4000, 2000] + [2000] * 1000)
    poller = gpu_check.GpuMemoryPoller(reader=lambda: next(values), interval=0.01)
    poller.start()
    time.sleep(0.2)
    assert poller.stop() == 3000
    assert gpu_check.GpuMemoryPoller(reader=lambda: None).stop() is None


# Wheels ------------------------------------------------------------------------------------------------------------

def test_wheel_plan_pins_floors_and_refuses_two_versions(tmp_path: Path) -> None:
    have = {"transformers": "5.17.0", "regex": "2024.11.6", "typing-extensions": "4.15.0", "peft": "0.21.2"}.get
    for name, version in (("transformers", "5.24.0"), ("peft", "0.21.2"), ("bitsandbytes", "0.50.2"),
                          ("regex", "2026.11.19"), ("typing_extensions", "4.16.0")):
        _wheel(tmp_path, name, version, {})
    (tmp_path / "gpu_wheels.json").write_text(json.dumps({"wheels": [
        {"file": "regex-2026.11.19-py3-none-any.whl", "policy": "floor", "min": "2025.10.22"},
        {"file": "typing_extensions-4.16.0-py3-none-any.whl", "policy": "floor", "min": "4.14.0"}]}))
    plan = {p["name"]: p for p in gpu_check.wheel_plan(tmp_path, installed=have)}
    assert plan["transformers"]["install"] and plan["transformers"]["shadows"]  # ft's tested version over 5.17
    assert not plan["peft"]["install"]  # the same version is there
    assert plan["bitsandbytes"]["install"] and not plan["bitsandbytes"]["shadows"]  # missing
    assert plan["regex"]["install"] and not plan["regex"]["shadows"]  # older than the floor
    assert not plan["typing-extensions"]["install"]  # 4.15.0 >= 4.14.0
    _wheel(tmp_path, "peft", "0.20.0", {})
    with pytest.raises(ValueError, match="more than one wheel of peft"):
        gpu_check.wheel_plan(tmp_path, installed=have)


def test_version_key() -> None:
    assert gpu_check.version_key("2.11.0+cu130") == (2, 11, 0)
    assert gpu_check.version_key("2025.10.22") > gpu_check.version_key("2025.9.1")
    assert gpu_check.version_key(None) == ()


def test_slimmed_bitsandbytes_wheel_keeps_cuda13_and_installs(tmp_path: Path) -> None:
    libs = {f"bitsandbytes/libbitsandbytes_{k}.so": k.encode() * 100
            for k in ("cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025", "cpu")}
    wheel = _wheel(tmp_path, "bitsandbytes", "0.50.2", {"bitsandbytes/__init__.py": b"", **libs},
                   tag="py3-none-manylinux_2_24_x86_64")
    before, after, kept = gpu_wheels.slim_bnb_wheel(wheel, ["13"])
    assert kept == ["libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"] and after < before
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"} <= names
    assert not any("cuda118" in n or "rocm" in n or "xpu" in n for n in names) and "cuda128" not in record
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (target / "bitsandbytes").glob("*.so")) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    with pytest.raises(SystemExit, match="no CUDA 11 library"):
        gpu_wheels.slim_bnb_wheel(wheel, ["11"])


def test_fetch_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine.whl").write_text("not yours")
    assert gpu_wheels.main(["--dest", str(tmp_path)]) == 2
    assert "not written by this script" in capsys.readouterr().err
    assert (tmp_path / "mine.whl").read_text() == "not yours"


# Parsing and the summary -------------------------------------------------------------------------------------------

def test_pytest_outcomes_from_verbose_lines() -> None:
    lines = ["tests/test_gpu.py::test_lora_bf16_on_cuda_loss_falls PASSED                  [ 10%]",
             "[gw1] [ 20%] FAILED tests/test_gpu.py::test_compile_on_cuda_trains_like_eager ",
             "[gw0] [ 30%] SKIPPED tests/test_gpu.py::test_ddp_two_gpus ",
             "tests/test_gpu.py::test_liger_kernel_on_cuda_trains_like_without[eager] ERROR", "noise PASSED"]
    assert gpu_check.parse_pytest_lines(lines) == {
        "tests/test_gpu.py::test_lora_bf16_on_cuda_loss_falls": "passed",
        "tests/test_gpu.py::test_compile_on_cuda_trains_like_eager": "failed",
        "tests/test_gpu.py::test_ddp_two_gpus": "skipped",
        "tests/test_gpu.py::test_liger_kernel_on_cuda_trains_like_without[eager]": "error"}


def test_junit_report_is_read(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
                   '<testcase classname="tests.test_gpu" name="test_b" time="2"><failure message="assert 1 == 2">'
                   'trace</failure></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="needs 2 GPUs"/>'
                   '</testcase></testsuite></testsuites>')
    tests = gpu_check.parse_junit(xml)
    assert [(t["name"], t["outcome"]) for t in tests] == [("tests/test_gpu.py::test_a", "passed"),
                                                         ("tests/test_gpu.py::test_b", "failed"),
                                                         ("tests/test_gpu.py::test_c", "skipped")]
    assert tests[1]["message"] == "assert 1 == 2\ntrace" and tests[2]["message"] == "needs 2 GPUs"


def _bench_result(method: str, tps: float, peak: float, plan: float, device_peak: float, mfu: float) -> dict:
    return {"method": method, "tokens_per_s": tps, "step_s": 2048 / tps, "mfu_4n": mfu, "mfu_4n_attn": mfu * 1.05,
            "peak_bytes": peak, "device_peak_bytes": device_peak, "plan_bytes": plan,
            "plan_ratio": plan / device_peak}


def test_targets_and_summary_from_gpu_numbers() -> None:
    gib = 2**30
    bench = {"settings": {"shape": "8b", "seq": 2048, "micro_batch": 1, "steps": 20, "warmup": 5}, "variants": {
        "base": {"model": {"parameters": 8_030_261_248}, "device": "NVIDIA H200", "peak_flops": 989e12,
                 "results": [_bench_result("lora", 9000, 20 * gib, 21.5 * gib, 21 * gib, 0.41),
                             _bench_result("qlora", 8000, 9 * gib, 10.5 * gib, 10 * gib, 0.36)]},
        "liger": {"model": {"parameters": 8_030_261_248}, "device": "NVIDIA H200", "peak_flops": 989e12,
                  "results": [_bench_result("lora", 9500, 18 * gib, 16 * gib, 19 * gib, 0.43)]}}}
    data = {"started": "2026-12-01T10:00:00+00:00", "finished": None, "device": "cuda", "shape": "8b",
            "command": "bash scripts/gpu_check.sh", "budget_s": 480, "wall_s": 300,
            "environment": {"gpu": "NVIDIA H200", "gpu_memory_bytes": 140 * gib, "torch": "2.11.0+cu130"},
            "stages": [{"name": "bench", "status": "passed", "wall_s": 150, "allowed_s": 170, "budget_s": 170,
                        "steps": [], "details": bench},
                       {"name": "real-run", "status": "passed", "wall_s": 60, "allowed_s": 80, "budget_s": 80,
                        "steps": [], "details": {"plan_ratio": 1.04}}]}
    t = {x["name"]: x for x in gpu_check.targets(data)}
    assert t["bf16 LoRA 8B MFU (4N)"]["value"] == 0.41 and t["bf16 LoRA 8B MFU (4N)"]["pass"] is True
    assert t["QLoRA / LoRA tokens/s"]["value"] == pytest.approx(8000 / 9000) and t["QLoRA / LoRA tokens/s"]["pass"] \
        is False  # 0.89x < 0.9x
    assert t["QLoRA / LoRA peak memory"]["value"] == pytest.approx(0.45) and t["QLoRA / LoRA peak memory"]["pass"]
    plan = t["ft plan vs every measured peak (worst)"]
    assert plan["value"] == pytest.approx(1 - 16 / 19) and plan["pass"] is False  # the liger lora estimate: 16%
    assert set(plan["detail"]) == {"bench base lora", "bench base qlora", "bench liger lora", "real-run train"}
    md = gpu_check.render_markdown(data)
    assert "| bf16 LoRA 8B MFU (4N) | 41.0 % | >= 40% | PASS |" in md
    assert "| QLoRA / LoRA tokens/s | 0.89x | >= 0.9x | MISS |" in md
    assert "| base | lora | 9,000 | 0.228 | 41.0 % | 43.0 % | 20.00 GiB | 21.00 GiB | 21.50 GiB | 1.02 |" in md
    assert "Dry run" not in md and "| gpu-tests | not run |" in md and "(not finished)" in md


def test_docs_give_the_device_call_that_fits_the_budgets() -> None:
    """docs/benchmarks.md's "How to run the GPU check" is what the next session with a GPU copies: its command must
    be this script, its carry the wheels folder, and its timeout leave room past the script's own deadline."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc[doc.index("### How to run the GPU check"):]
    assert "- command: `bash scripts/gpu_check.sh`" in section and '- carry: `[".whl"]`' in section
    timeout = int(re.search(r"- timeout_s: `(\d+)`", section)[1])
    total = sum(gpu_check.BUDGETS["cuda"].values())
    assert total + 45 <= timeout <= 600 and f"{total} s" in section
    for name, budget in gpu_check.BUDGETS["cuda"].items():
        assert re.search(rf"^\| {name} \| {budget} \|", section, re.M), name
    assert "**Not measured yet.**" in doc
