"""GGUF: write with llama.cpp's converter, read back with llama.cpp (llama-cpp-python) or transformers' GGUF loader.

The converter (convert_hf_to_gguf.py with its `conversion/` package and the gguf-py it is released with) is not on
PyPI as a package; llama-cpp-python's source distribution vendors the llama.cpp it binds, converter included.
`python -m ft_cli.export.gguf install` downloads that sdist with pip and unpacks the converter's files into
`<sys.prefix>/share/ft/llama.cpp/` (or FT_GGUF_CONVERTER points at a convert_hf_to_gguf.py of your own). Taking it
from the same llama-cpp-python release as the installed bindings keeps writer and reader in step.

The converter runs in a child process (ft_cli.export.gguf_convert) because it puts its own gguf-py first on
sys.path, which must not replace the gguf package transformers uses in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ft_cli.atomic import write_dir
from ft_cli.errors import UserError

# The llama-cpp-python release whose vendored converter `install` fetches when the bindings are not installed.
DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER_ENV = "FT_GGUF_CONVERTER"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def converter_home() -> Path:
    return Path(sys.prefix) / "share" / "ft" / "llama.cpp"


def find_converter() -> Path | None:
    """convert_hf_to_gguf.py from FT_GGUF_CONVERTER, else the one `install` unpacked; None when neither exists."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise UserError(f"{CONVERTER_ENV}={override}: no such file (expected llama.cpp's convert_hf_to_gguf.py)")
        return path
    path = converter_home() / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


def require_converter() -> Path:
    path = find_converter()
    if path is None:
        raise UserError("GGUF export needs llama.cpp's converter (convert_hf_to_gguf.py), which is not installed; "
                        "run: python -m ft_cli.export.gguf install   (fetches it from llama-cpp-python's source "
                        f"release on PyPI), or set {CONVERTER_ENV} to a convert_hf_to_gguf.py")
    return path


def converter_version() -> str | None:
    stamp = converter_home() / "ft_source.json"
    try:
        return json.loads(stamp.read_text())["llama-cpp-python"]
    except (OSError, ValueError, KeyError):
        return None


def _unpack_converter(sdist: Path, staging: Path, version: str) -> None:
    """vendor/llama.cpp's converter files from the sdist into `staging` (atomic.write_dir renames it into place)."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rest = parts[3]
            if not any(rest == m or rest.startswith(m) for m in _MEMBERS) or not (member.isfile() or member.isdir()):
                continue
            member.name = rest
            tar.extract(member, staging, filter="data")
    if not (staging / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama-cpp-python=={version}'s source release has no vendor/llama.cpp/convert_hf_to_gguf.py")
    (staging / "ft_source.json").write_text(json.dumps({"llama-cpp-python": version}) + "\n")


def install_converter(version: str | None = None, *, quiet: bool = False) -> Path:
    """Download llama-cpp-python's sdist (pip) and unpack its vendored converter into converter_home()."""
    if version is None:
        version = llama_cpp_version() or DEFAULT_LLAMA_CPP_PYTHON
    home = converter_home()
    if (home / "convert_hf_to_gguf.py").is_file() and converter_version() == version:
        return home / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix="ft-llama-cpp-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise UserError(f"could not download llama-cpp-python=={version}'s source release with pip:\n"
                            f"{done.stderr.strip()[-2000:]}")
        home.parent.mkdir(parents=True, exist_ok=True)
        write_dir(home, lambda staging: _unpack_converter(sdists[0], staging, version))
    if not quiet:
        print(f"installed llama.cpp's converter from llama-cpp-python {version} into {home}", flush=True)
    return home / "convert_hf_to_gguf.py"


def llama_cpp_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# Writing -----------------------------------------------------------------------------------------------------------

def convert(model_dir: Path, outfile: Path, outtype: str) -> dict[str, Any]:
    """Run the converter on a 16-bit model directory; returns what it reported (tensors that fell back, the
    pre-tokenizer it recorded)."""
    converter = require_converter()
    report = outfile.with_suffix(".convert.json")
    cmd = [sys.executable, "-m", "ft_cli.export.gguf_convert", str(converter), str(report),
           str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise UserError(f"llama.cpp's converter ({converter}) failed on {model_dir}:\n{tail}")
    info = json.loads(report.read_text())
    report.unlink()
    return info


def quantize_q4_k_m(src: Path, dst: Path) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), through llama-cpp-python."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = max(1, os.cpu_count() or 1)
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp could not quantize {src} to q4_K_M (code {code})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (gguf-py's reader): shows what fell back."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# Reading -----------------------------------------------------------------------------------------------------------

class LlamaCppModel:
    """A GGUF file in llama.cpp: per-token log-likelihood and greedy decoding over token ids."""

    def __init__(self, path: Path, n_ctx: int = 2048):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                         n_threads=len(os.sched_getaffinity(0)))  # as torch does

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        """argmax decoding, one token at a time (llama.cpp keeps its KV cache between eval calls)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in stops:
                break
            self.llm.eval([token])
        return out

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def load_gguf_in_transformers(path: Path) -> Any:
    """transformers' GGUF loader: gguf-py dequantizes every tensor to float32 (what the weights hold, computed
    without llama.cpp's kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "install" or len(args) > 2:
        print("usage: python -m ft_cli.export.gguf install [LLAMA_CPP_PYTHON_VERSION]", file=sys.stderr)
        return 2
    try:
        install_converter(args[1] if len(args) == 2 else None)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
