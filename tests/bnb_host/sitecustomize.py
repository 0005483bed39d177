"""TEST-ONLY: make bitsandbytes act as on a CPU with or without AVX512-BF16, whatever this host has.

tests/conftest.py puts this directory first on PYTHONPATH, so every Python process the suite starts (`ft ...` in a
subprocess, `accelerate launch`, `torchrun`) runs this file at start-up. It reads FT_TEST_BNB_AVX512BF16:

    1  bitsandbytes' 4-bit layers are created with `support_avx512bf16_for_cpu = True`, as bitsandbytes 0.50.2 does
       on a CPU with AVX512-BF16 (the host that breaks QLoRA unless ft switches it off);
    0  they are created with it False, as on a CPU without it;
    unset: bitsandbytes asks the CPU (this file changes nothing).

Only the per-layer switch is forced (`bitsandbytes.nn.modules.has_avx512bf16`, which `Linear4bit.__init__` reads),
never the native kernels bitsandbytes registers at import: on a host without the instruction set the packed path,
if anything reaches it, runs through bitsandbytes' pure-torch fallback instead of crashing. Nothing outside the
test suite sets the variable or puts this directory on the path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ENV = "FT_TEST_BNB_AVX512BF16"
_TARGET = "bitsandbytes.nn.modules"


def forced() -> bool | None:
    value = os.environ.get(ENV)
    return None if value in (None, "") else value == "1"


def force(module, value: bool) -> None:
    """Make `module.has_avx512bf16` (bitsandbytes.nn.modules) answer `value`."""
    module.has_avx512bf16 = lambda: value


class _ForceOnImport(importlib.abc.MetaPathFinder):
    """Patches bitsandbytes.nn.modules right after it is executed, before any layer is built."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            value = forced()
            if value is not None:
                force(module, value)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        value = forced()
        if value is not None:
            force(sys.modules[_TARGET], value)
    elif not any(isinstance(f, _ForceOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ForceOnImport())


def _run_shadowed_sitecustomize() -> None:
    """This file shadows any sitecustomize later on sys.path (e.g. a distribution's): run that one too."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and os.path.abspath(spec.origin or "") != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    install()
    _run_shadowed_sitecustomize()
