"""Download the wheels the lent GPU machine lacks into .whl/ (ignored by git), for scripts/gpu_check.py to install
there: the machine has no network, and everything that travels to it (the working tree plus carried folders) must
fit in 64 MiB. Run here, where pip reaches the package index:

    bash scripts/fetch_gpu_wheels.sh [--python-version 3.12] [--bnb-cuda 13] [--dest .whl]

What the machine has (the device notes, KINDS.md): Python 3.12 with torch (CUDA 13), triton, transformers 5.17,
peft, accelerate 1.15, tokenizers, safetensors, huggingface-hub, typer, rich, jinja2, pyyaml, numpy, pandas,
pyarrow, fsspec, xxhash, pytest and pytest-xdist; not bitsandbytes, datasets (nor its dill and multiprocess),
pydantic or liger-kernel. So this fetches, at the versions ft's CPU suite runs (read from this interpreter, i.e.
scripts/_setup.sh's .venv):

- what is missing: bitsandbytes, datasets, dill, multiprocess, pydantic (+ pydantic-core, annotated-types,
  typing-inspection), liger-kernel;
- ft's tested versions of what ft leans on hardest, installed over the machine's own (gpu_check.py falls back to
  the machine's if they do not import there): transformers, peft, fsspec (datasets pins it);
- version floors, installed only when the machine's copy is older: regex (transformers checks it at import),
  typing-extensions (pydantic).

pyarrow, which datasets needs, is NOT carried: its cp312 wheel alone is 52.5 MiB, which does not fit beside
bitsandbytes and the rest. The machine has pyarrow (its image is newer than this stack: numpy 2.5 there); the
setup stage's preflight writes and reads a dataset, so an incompatible pyarrow shows up there by name, first.

bitsandbytes' wheel is 43 MB because it carries a native library per CUDA version (11.8 to 13.2) plus ROCm and
XPU builds; the machine's torch is built for CUDA 13, so --bnb-cuda 13 (the default) keeps only the CUDA 13
libraries and the CPU one (the wheel shrinks to ~3 MB; its RECORD is rewritten to match). bitsandbytes picks the
closest library of the same CUDA major itself. --bnb-cuda all keeps the wheel as published.

The data the benchmark and the tests read (../shared/data/alpaca_en_demo.json) does not travel either: a gzipped
copy goes to .whl/data/. gpu_wheels.json records each wheel's install policy. Finally the size of everything that
will travel is checked against the limit (exit 2 when over).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64
# (distribution, policy, fallback version when this interpreter does not have it, floor for "floor")
WANTED = (
    ("bitsandbytes", "pin", "0.50.2", None),
    ("datasets", "pin", "5.2.0", None),
    ("dill", "pin", "0.4.1", None),
    ("multiprocess", "pin", "0.70.19", None),
    ("pydantic", "pin", "2.14.4", None),
    ("pydantic-core", "pin", "2.50.5", None),
    ("annotated-types", "pin", "0.8.0", None),
    ("typing-inspection", "pin", "0.4.5", None),
    ("liger-kernel", "pin", "0.8.5", None),
    ("transformers", "pin", "5.24.0", None),
    ("peft", "pin", "0.21.2", None),
    ("fsspec", "pin", "2026.9.0", None),
    ("regex", "floor", "2026.11.19", "2025.10.22"),
    ("typing-extensions", "floor", "4.16.0", "4.16.0"),
)
PLATFORMS = ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
BNB_LIB = re.compile(r"^bitsandbytes/libbitsandbytes_(cuda\d+|rocm\d+|xpu\d*)\.\w+$")


def version_of(name: str, fallback: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


def slim_bnb_wheel(path: Path, keep_majors: list[str]) -> tuple[int, int, list[str]]:
    """Rewrite a bitsandbytes wheel in place keeping only the CUDA libraries of `keep_majors` (and the CPU one);
    RECORD loses the dropped files' lines. Returns (bytes before, bytes after, kept CUDA libraries)."""
    before = path.stat().st_size
    tmp = path.with_name(path.name + ".tmp")
    dropped, kept = set(), []
    with zipfile.ZipFile(path) as src:
        for name in src.namelist():
            m = BNB_LIB.match(name)
            if not m:
                continue
            kind = m.group(1)
            if kind.startswith("cuda") and any(kind[4:].startswith(major) and len(kind[4:]) == len(major) + 1
                                               for major in keep_majors):
                kept.append(Path(name).name)
            else:
                dropped.add(name)
        if not kept:
            raise SystemExit(f"gpu_wheels: {path.name} has no CUDA {'/'.join(keep_majors)} library; "
                             f"use --bnb-cuda with one of: " + ", ".join(sorted(
                                 {BNB_LIB.match(n).group(1) for n in src.namelist() if BNB_LIB.match(n)})))
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] not in dropped]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    return before, path.stat().st_size, sorted(kept)


def working_tree_bytes() -> int:
    """Tracked files plus untracked files git does not ignore: what the device tool sends besides carried paths."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in out.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (default .whl/, git-ignored)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--bnb-cuda", default="13",
                   help="CUDA major versions whose bitsandbytes libraries to keep, comma-separated, or 'all' "
                        "(default 13: the machine's torch is built for CUDA 13)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="where alpaca_en_demo.json is (default ../shared/data)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="what may travel in all (default 64)")
    args = p.parse_args(argv)

    dest = Path(args.dest).resolve()
    manifest_path = dest / "gpu_wheels.json"
    if dest.exists():
        ours = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if ours is None and any(dest.iterdir()):
            print(f"gpu_wheels: {dest} exists and was not written by this script; give --dest a new path",
                  file=sys.stderr)
            return 2
        if ours is not None:  # replace our previous set whole: two versions of a package stop the install
            for w in ours.get("wheels", []):
                (dest / w["file"]).unlink(missing_ok=True)
            shutil.rmtree(dest / "data", ignore_errors=True)
            manifest_path.unlink()
    dest.mkdir(parents=True, exist_ok=True)

    specs = [(name, policy, version_of(name, fallback), floor) for name, policy, fallback, floor in WANTED]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--python-version", args.python_version, "--implementation", "cp",
               *[a for plat in PLATFORMS for a in ("--platform", plat)], "-d", tmp, *[f"{name}=={version}" for name, _, version, _ in specs]]
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print("gpu_wheels: pip download failed (above)", file=sys.stderr)
            return 1
        files = sorted(Path(tmp).glob("*.whl"))
        entries = []
        for name, policy, version, floor in specs:
            norm = re.sub(r"[-_.]+", "_", name).lower()
            match = [f for f in files if re.sub(r"[-_.]+", "_", f.name.split("-")[0]).lower() == norm]
            if len(match) != 1:
                print(f"gpu_wheels: expected one wheel of {name}, got {[f.name for f in match]}", file=sys.stderr)
                return 1
            wheel = dest / match[0].name
            shutil.move(str(match[0]), wheel)
            entry = {"file": wheel.name, "name": name, "version": version, "policy": policy}
            if floor:
                entry["min"] = floor
            if name == "bitsandbytes" and args.bnb_cuda != "all":
                before, after, kept = slim_bnb_wheel(wheel, [m.strip() for m in args.bnb_cuda.split(",")])
                entry["slimmed"] = {"kept": kept, "bytes_before": before}
                print(f"bitsandbytes: kept {', '.join(kept)} and the CPU library: {before / 2**20:.1f} MiB -> "
                      f"{after / 2**20:.1f} MiB")
            entries.append(entry)

    data = Path(args.data_dir) / "alpaca_en_demo.json"
    if data.is_file():
        (dest / "data").mkdir(exist_ok=True)
        with open(data, "rb") as src, gzip.open(dest / "data" / "alpaca_en_demo.json.gz", "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        print(f"gpu_wheels: {data} not found; the benchmark and real-run stages will lack their data",
              file=sys.stderr)
    manifest = {"python_version": args.python_version, "platforms": PLATFORMS, "bnb_cuda": args.bnb_cuda,
                "wheels": entries}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    carried, tree = dir_bytes(dest), working_tree_bytes()
    print()
    for e in entries:
        size = (dest / e["file"]).stat().st_size
        print(f"  {size / 2**20:7.2f} MiB  {e['file']}  ({e['policy']}{', >= ' + e['min'] if e.get('min') else ''})")
    print(f"carried {dest.name}/: {carried / 2**20:.1f} MiB; working tree: {tree / 2**20:.1f} MiB; together "
          f"{(carried + tree) / 2**20:.1f} MiB of the {args.limit_mib:g} MiB that may travel")
    if carried + tree > args.limit_mib * 2**20:
        print("gpu_wheels: over the limit: keep fewer bitsandbytes libraries (--bnb-cuda)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
