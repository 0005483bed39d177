"""The fixed generation workload of `ft export`, run in a fresh child process per model so that its peak memory
belongs to that model alone:

    python -m ft_cli.export.speed SPEC_JSON RESULT_JSON

SPEC: {"kind": "transformers" | "gguf", "path": ..., "prompts": [[token ids], ...], "new_tokens": N,
"device": "cpu" | "cuda"}. Every prompt generates exactly N tokens greedily (end-of-turn ignored), batch 1, after one
untimed warm-up prompt. Reported: load seconds, generated tokens / second, and memory: on CUDA the peak allocated
by torch; on the CPU the process's peak resident set (ru_maxrss) and that minus the resident set measured after
the libraries were imported (what loading and running the model added). The peak is the kernel's VmHWM of this
process: ru_maxrss would not do, as Linux carries it over from the parent through fork and exec.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def proc_status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ft_cli.export.load import load_export
    from ft_cli.loading import load_model_dir

    device = spec["device"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if spec.get("plain"):
        model = load_model_dir(Path(spec["path"]), device=device)
    else:
        model, _, _ = load_export(spec["path"], device=device)
    loaded = time.perf_counter() - start

    def generate(ids: list[int], n: int) -> int:
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=0)
        return out.shape[1] - x.shape[1]

    return _timed(generate, spec, loaded, cuda=device == "cuda")


def run_gguf(spec: dict[str, Any]) -> dict[str, Any]:
    from ft_cli.export.gguf import LlamaCppModel

    start = time.perf_counter()
    model = LlamaCppModel(Path(spec["path"]), n_ctx=max(len(p) for p in spec["prompts"]) + spec["new_tokens"] + 8)
    loaded = time.perf_counter() - start

    def generate(ids: list[int], n: int) -> int:
        return len(model.greedy(ids, n, stops=[]))

    return _timed(generate, spec, loaded, cuda=False)


def _timed(generate: Any, spec: dict[str, Any], loaded: float, *, cuda: bool) -> dict[str, Any]:
    prompts, n = spec["prompts"], spec["new_tokens"]
    generate(prompts[0], min(n, 4))  # warm-up: first-call allocations and kernel selection
    tokens = 0
    start = time.perf_counter()
    for ids in prompts:
        tokens += generate(ids, n)
    seconds = time.perf_counter() - start
    result = {"load_seconds": round(loaded, 3), "generate_seconds": round(seconds, 3), "new_tokens": tokens,
              "tokens_per_second": tokens / seconds if seconds > 0 else float("inf")}
    if cuda:
        import torch

        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        result["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_bytes"] = proc_status_bytes("VmHWM")
        result["memory_measure"] = "peak resident set of the process"
    return result


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["kind"] == "gguf":
        import llama_cpp  # noqa: F401  (before the baseline: the library itself is not the model)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    baseline = proc_status_bytes("VmRSS")
    result = run_gguf(spec) if spec["kind"] == "gguf" else run_transformers(spec)
    result["baseline_rss_bytes"] = baseline
    if result["memory_measure"].startswith("peak resident"):
        result["model_memory_bytes"] = max(0, result["peak_memory_bytes"] - baseline)
    else:
        result["model_memory_bytes"] = result["peak_memory_bytes"]
    Path(sys.argv[2]).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
