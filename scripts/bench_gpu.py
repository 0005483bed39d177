"""GPU benchmark: ft's own training loop (ft_cli.train.setup / fit) on an 8B-shaped Llama, LoRA in bfloat16 and
QLoRA (4-bit NF4), packed rows: trained tokens/s, MFU and peak memory per method, `ft plan`'s estimate beside
each measured peak, and the targets.

    python scripts/bench.py gpu [--shape 8b|0.5b|tiny] [--methods lora,qlora] [--seq 2048] [--micro-batch 1]
                                [--steps 20] [--warmup 5] [--compile] [--liger] [--no-grad-ckpt]
                                [--attn sdpa|flash_attention_2] [--model-dir DIR] [--json PATH]
    python scripts/bench_gpu.py ...          (the same, standalone)
    python scripts/bench_gpu.py --shape tiny --device cpu --steps 3 --warmup 1 --seq 256   (CPU smoke test)

Nothing is downloaded. A random-init model directory (bfloat16 safetensors, the built-in tiny-llama tokenizer) is
built once per invocation (8b: initialised on the GPU, ~16 GB written to a temporary directory; --model-dir keeps
and reuses it), then each method runs in a fresh subprocess (so its peak memory is its own) through ft's
setup() and fit() with a recipe like recipes/llama-3.1-8b/{lora,qlora}.yaml: rank 16, alpha 32, dropout 0.05,
all-linear, packing, adamw_torch, gradient checkpointing (unless --no-grad-ckpt), model.dtype bfloat16 (float32
on the CPU, where bf16 matmuls are emulated). The data is alpaca_en_demo.json's rows, repeated as needed, until
one epoch holds twice the tokens the steps train on.

Timing: the first --warmup optimizer steps are excluded; the next --steps are timed from the start of the first
timed step to the start of the step after the last (one extra, untimed step is run), with CUDA synchronised at
both ends. tokens/s counts the real (non-padding) tokens of the packed rows, prompt tokens included, as ft's
metrics.jsonl does; ft's own logged tokens_per_s (median over the timed steps) is shown beside it as a check.

MFU = tokens/s x 4N / the device's peak dense bfloat16 FLOP/s (LoRA convention: forward 2N + backward through the
frozen weights 2N; no weight gradients for the base). N = the base weights that multiply: all parameters but the
input embedding table (a lookup), lm_head included. The LoRA adapters' own FLOPs (<1 %) and the forward that
gradient checkpointing recomputes are not counted (model FLOPs, not hardware FLOPs). "MFU+attn" adds causal
attention inside each packed example (forward 2*heads*head_dim*L*(L+1) per layer, backward twice that); "6N" is
the full-fine-tuning convention, for reference. Peak memory: torch.cuda.max_memory_allocated over the whole
subprocess (model load included); on the CPU, the subprocess's peak RSS. "device peak" is what `ft plan` estimates
and nvidia-smi would show: the allocator's peak reservation plus the memory outside it (CUDA context, library
workspaces), read from the device at the end of the run; "plan" is `ft plan`'s estimate for the same recipe
(ft_cli.plan.estimate_memory), and plan/peak its ratio to the device peak.

`scripts/gpu_check.py` runs this benchmark as one stage of the whole GPU check (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("lora", "qlora")
# Targets (issue 21): the best published single-GPU LoRA figure is 40.6 % MFU on an H100.
TARGET_LORA_MFU = 0.40  # bf16 LoRA, 8B, packed 2048
TARGET_QLORA_SPEED = 0.9  # QLoRA tokens/s >= 0.9 x LoRA's
TARGET_QLORA_MEMORY = 0.5  # QLoRA peak memory <= 0.5 x LoRA's
TARGET_PLAN_ERROR = 0.10  # ft plan's estimate within 10 % of every measured (device) peak

# Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B), minus the token ids (the built-in tokenizer's are used).
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Qwen2.5-0.5B's config.json (Qwen/Qwen2.5-0.5B): q/k/v biases, tied embeddings, 151,936-token vocabulary.
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
              "use_sliding_window": False}
QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
SHAPES = ("8b", "0.5b", "tiny")

# Peak dense (no sparsity) bfloat16 tensor FLOP/s, matched against torch.cuda.get_device_name in this order.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

MARKER = "ft_bench_model.json"  # written last into a model directory: it is complete
GIB = 1024 ** 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `gpu` on an argparse subparsers object (scripts/bench.py)."""
    p = subparsers.add_parser("gpu", help="LoRA vs QLoRA training throughput, MFU and peak memory through ft",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="8b",
                   help="8b: Llama-3.1-8B's shape; 0.5b: Qwen2.5-0.5B's; tiny: the built-in tiny-llama's (default 8b)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from lora,qlora (default both)")
    p.add_argument("--seq", type=int, default=2048, help="data.max_seq_len: tokens per packed row (default 2048)")
    p.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch_size (default 1)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps run before timing starts (default 5)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="directory holding alpaca_en_demo.json (default ../shared/data)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default); cpu only with --shape tiny, to try the code path without a GPU")
    p.add_argument("--compile", action="store_true", help="train.compile: true")
    p.add_argument("--liger", action="store_true", help="train.liger_kernel: true (liger-kernel must be installed)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="train.gradient_checkpointing: false")
    p.add_argument("--attn", choices=("sdpa", "flash_attention_2"), default=None,
                   help="model.attn_implementation (default: ft's own choice; the one used is reported)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s of the device, for a GPU this script does not know")
    p.add_argument("--model-dir", default=None,
                   help="keep the random-init model here and reuse it when it is already there (default: a "
                        "temporary directory, removed at the end)")
    p.add_argument("--work-dir", default=None, help="where temporary files go (default: the system temp dir)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    # Internal: the per-method subprocess and the model build.
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=bench_gpu)
    return p


def bench_gpu(args: argparse.Namespace) -> None:
    if args._build:
        _build_model_dir(args.shape, Path(args._build), args.device)
        return
    if args._one:
        _run_one(args)
        return
    _main(args)


# The parent: check, build, run each method in its own process, report ---------------------------------------------

def _fail(message: str, code: int = 2) -> None:
    print(f"bench gpu: {message}", file=sys.stderr)
    raise SystemExit(code)


def _check_args(args: argparse.Namespace) -> list[str]:
    import importlib.util

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        _fail(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    for name in ("seq", "micro_batch", "steps"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        _fail("--warmup must be 0 or more")
    if args.device == "cpu" and args.shape != "tiny":
        _fail("--device cpu is only for smoke-testing the code path with --shape tiny; the 8b shape needs a GPU")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("no CUDA GPU is available (torch " + torch.__version__ + "); this benchmark measures GPU training. "
                  "To try the code path on the CPU: --shape tiny --device cpu")
    if args.attn == "flash_attention_2":
        if args.device != "cuda":
            _fail("--attn flash_attention_2 needs --device cuda")
        if importlib.util.find_spec("flash_attn") is None:
            _fail("--attn flash_attention_2: flash-attn is not installed (pip install flash-attn)")
    if args.liger and args.device != "cuda":
        _fail("--liger: liger-kernel's Triton kernels need --device cuda")
    if args.liger and importlib.util.find_spec("liger_kernel") is None:
        _fail("--liger: liger-kernel is not installed (pip install liger-kernel)")
    if not (Path(args.data_dir) / "alpaca_en_demo.json").is_file():
        _fail(f"--data-dir: {Path(args.data_dir) / 'alpaca_en_demo.json'} not found")
    return methods


def _main(args: argparse.Namespace) -> None:
    methods = _check_args(args)
    command = _command_line()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-gpu-", dir=args.work_dir))
    try:
        model_dir = Path(args.model_dir).resolve() if args.model_dir else work / "model"
        model_info = _ensure_model(args, model_dir)
        data_file = _write_data(args, model_dir, work / "alpaca_repeated.json")
        results: list[dict[str, Any]] = []
        for method in methods:
            results.append(_run_method(args, method, model_dir, data_file, work))
            if args.json:  # after every method: a run stopped from outside keeps what it measured
                _write_json(Path(args.json), summarize(args, results, model_info, command, complete=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = summarize(args, results, model_info, command, complete=True)
    print_report(report)
    if args.json:
        _write_json(Path(args.json), report)
        print(f"results written to {args.json}")
    if any(r.get("error") for r in results):
        raise SystemExit(1)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    from ft_cli.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def _command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *sys.argv[1:]])


def _child(args: argparse.Namespace, *extra: str) -> list[str]:
    """This script again, with the options that matter to a child."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--shape", args.shape, "--seq", str(args.seq),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device]
    cmd += ["--attn", args.attn] if args.attn else []
    cmd += ["--compile"] * args.compile + ["--liger"] * args.liger + ["--no-grad-ckpt"] * args.no_grad_ckpt
    return cmd + list(extra)


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise pick a GPU that is there
    return env


def _ensure_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    marker = model_dir / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("shape") == args.shape:
            print(f"model: reusing {model_dir} ({_count(info['parameters'])} parameters)", file=sys.stderr)
            return info
        _fail(f"--model-dir: {model_dir} holds the {info.get('shape')} shape, not {args.shape}")
    if model_dir.exists() and any(model_dir.iterdir()):
        _fail(f"--model-dir: {model_dir} exists and is not a model this benchmark built; give an empty or new path")
    start = time.perf_counter()
    print(f"model: building a random-init {args.shape} model in {model_dir} ...", file=sys.stderr, flush=True)
    if args.shape == "tiny":
        _build_model_dir("tiny", model_dir, "cpu")
    else:  # on the GPU, in its own process, so none of its memory stays with this one
        out = subprocess.run(_child(args, "--_build", str(model_dir)), env=_child_env(args), cwd=ROOT,
                             stdout=sys.stderr)
        if out.returncode != 0:
            _fail(f"building the model directory failed (exit {out.returncode})", code=1)
    info = json.loads(marker.read_text())
    info["build_s"] = round(time.perf_counter() - start, 1)
    print(f"model: built in {info['build_s']:.0f} s ({_count(info['parameters'])} parameters, "
          f"{_dir_size(model_dir) / GIB:.1f} GiB on disk)", file=sys.stderr)
    return info


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_config(shape: str) -> tuple[Any, Any, Path]:
    """(transformers config of `shape`, the built-in tiny-llama tokenizer, its directory)."""
    import inspect

    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, Qwen2Config

    from ft_cli.builtin_models import resolve_builtin

    tok_dir = resolve_builtin("builtin:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if shape == "tiny":
        config = AutoConfig.from_pretrained(tok_dir)
    else:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        cls, widths, rope_parameters = (LlamaConfig, LLAMA_8B, LLAMA3_ROPE) if shape == "8b" else \
            (Qwen2Config, QWEN25_05B, QWEN2_ROPE)
        if "rope_parameters" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
            rope = {"rope_parameters": rope_parameters}
        else:
            scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
            rope = {"rope_theta": rope_parameters["rope_theta"],
                    **({"rope_scaling": scaling} if scaling.get("rope_type") != "default" else {})}
        config = cls(**widths, **rope, **ids)
    assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)  # every id has a row
    return config, tokenizer, tok_dir


def _build_model_dir(shape: str, out: Path, device: str) -> None:
    """Random-init model of `shape` in bfloat16 safetensors plus the built-in tokenizer, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    config, tokenizer, tok_dir = model_config(shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.manual_seed(0)
        with torch.device(device):  # 8b: initialised on the GPU (seconds, not minutes on the CPU)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight.numel()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        for f in tok_dir.iterdir():  # tokenizer, its config and chat template; not the tiny model's weights
            if f.is_file() and f.name not in ("config.json", "generation_config.json", "ft_builtin.json") \
                    and not f.name.startswith("model"):
                shutil.copy2(f, tmp / f.name)
        info = {"shape": shape, "parameters": params, "embedding_parameters": embed, "tied_embeddings": tied,
                # weights that multiply: all but the input embedding table (its lm_head twin counts when tied)
                "matmul_parameters": params - embed + (embed if tied else 0),
                "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                "hidden": config.hidden_size, "vocab": config.vocab_size, "tokenizer_size": len(tokenizer)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_data(args: argparse.Namespace, model_dir: Path, path: Path) -> Path:
    """The rows of alpaca_en_demo.json, repeated as needed, until one epoch holds about twice the tokens the steps
    train on (at least 200 examples, so packing has enough to choose from); ft would wrap into a second epoch
    anyway. Fewer rows than the whole file when few are needed: less for every method's process to tokenize."""
    from transformers import AutoTokenizer

    demo = json.loads((Path(args.data_dir) / "alpaca_en_demo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [" ".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in demo]
    lengths = [len(ids) + 12 for ids in tokenizer(texts)["input_ids"]]  # + chat template markers
    needed = 2 * (args.warmup + args.steps + 1) * args.micro_batch * args.seq
    rows, tokens = [], 0
    while tokens < needed or len(rows) < 200:
        i = len(rows) % len(demo)
        rows.append(demo[i])
        tokens += lengths[i]
    path.write_text(json.dumps(rows))
    print(f"data: {len(rows):,} examples of alpaca_en_demo.json ({len(rows) / len(demo):.2f}x the file, "
          f"~{tokens:,} tokens) for {args.warmup}+{args.steps}+1 steps of {args.micro_batch} x {args.seq} tokens",
          file=sys.stderr)
    return path


def _run_method(args: argparse.Namespace, method: str, model_dir: Path, data_file: Path,
                work: Path) -> dict[str, Any]:
    result_file = work / f"{method}.result.json"
    cmd = _child(args, "--_one", method, "--_model", str(model_dir), "--_data", str(data_file),
                 "--_run", str(work / f"run-{method}"), "--_result", str(result_file))
    print(f"--- {method} ---", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, env=_child_env(args), cwd=ROOT, stdout=sys.stderr)
    wall = time.perf_counter() - start
    if out.returncode != 0 or not result_file.is_file():
        print(f"{method}: failed (exit {out.returncode}); its output is above", file=sys.stderr)
        return {"method": method, "error": f"exit {out.returncode}", "wall_s": round(wall, 1)}
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(wall, 1)
    return result


# The child: one method through ft's setup() and fit() ------------------------------------------------------------

def _recipe(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Like recipes/llama-3.1-8b/{lora,qlora}.yaml, at the benchmark's sequence length and batch."""
    recipe: dict[str, Any] = {
        "model": {"name_or_path": args._model, "dtype": _dtype(args)},
        "method": method,
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": args._data, "format": "alpaca", "val_split": 0.0, "max_seq_len": args.seq,
                 "packing": True, "cache": False},
        "train": {"max_steps": args.warmup + args.steps + 1, "micro_batch_size": args.micro_batch, "grad_accum": 1,
                  "lr": 2e-4, "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                  "optimizer": "adamw_torch", "gradient_checkpointing": not args.no_grad_ckpt,
                  "compile": args.compile, "liger_kernel": args.liger, "eval_every": None, "save_every": None,
                  "log_every": 1, "seed": 42},
        "output_dir": args._run,
    }
    if args.attn:
        recipe["model"]["attn_implementation"] = args.attn
    if method == "qlora":
        recipe["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": _dtype(args)}
    return recipe


def _dtype(args: argparse.Namespace) -> str:
    """bfloat16 on the GPU; float32 for the CPU smoke run (CPUs without bf16 matmul units emulate it ~50x slower)."""
    return "bfloat16" if args.device == "cuda" else "float32"


def _timed(lines: list[dict[str, Any]], warmup: int, steps: int) -> tuple[float, int]:
    """Seconds and real tokens of the timed steps, from ft's own metrics.jsonl (a line per step: log_every 1). The loop
    ends each line's window after a CUDA synchronise, so the seconds hold the step's kernels and optimizer update."""
    timed = [ln for ln in lines if "step_time_s" in ln and warmup < ln["step"] <= warmup + steps]
    assert len(timed) == steps, f"the timed steps did not all run ({len(timed)} of {steps} logged)"
    return sum(ln["step_time_s"] for ln in timed), sum(ln["tokens"] for ln in timed)


def _timed_segments(session: Any, warmup: int, steps: int, pad_id: int) -> list[int]:
    """Lengths of the packed examples in the timed steps: their micro-batches again, collated after the run (the
    order is a pure function of the step), off the clock."""
    from ft_cli.batches import rows_at

    ga = session.recipe.train.grad_accum
    out: list[int] = []
    for m in range(warmup * ga, (warmup + steps) * ga):
        out += _segments(session.collate(rows_at(session.data.train, session.batches.indices(m))), pad_id)
    return out


def _segments(batch: dict[str, Any], pad_id: int) -> list[int]:
    """Lengths of the examples packed in each row (position_ids restart at 0), trailing padding left out."""
    out: list[int] = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        real = len(ids)
        while real and ids[real - 1] == pad_id:
            real -= 1
        starts = [i for i in range(real) if pos[i] == 0] + [real]
        out += [b - a for a, b in zip(starts, starts[1:], strict=False) if b > a]
    return out


def _run_one(args: argparse.Namespace) -> None:
    import resource

    import torch

    from ft_cli.recipe import recipe_from_dict
    from ft_cli.train import fit, setup

    cuda = args.device == "cuda"
    recipe = recipe_from_dict(_recipe(args, args._one), source=f"bench {args._one}")
    run = Path(args._run)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    session = setup(recipe, run.with_suffix(".yaml"), resume=False, overwrite=False)
    setup_s = time.perf_counter() - start
    setup_peak = torch.cuda.max_memory_allocated() if cuda else None
    setup_reserved = torch.cuda.max_memory_reserved() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the training peak on its own, too
    pad_id = session.tokenizer.pad_token_id
    config = getattr(session.accelerator.unwrap_model(session.model), "config", None)
    attn_used = getattr(config, "_attn_implementation", None)
    fit(session)
    if cuda:
        torch.cuda.synchronize()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    elapsed, tokens = _timed(lines, args.warmup, args.steps)
    segments = _timed_segments(session, args.warmup, args.steps, -1 if pad_id is None else pad_id)
    logged = [ln["tokens_per_s"] for ln in lines if "tokens_per_s" in ln
              and args.warmup < ln["step"] <= args.warmup + args.steps]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    manifest = json.loads((run / "run.json").read_text())
    data_stats = (manifest.get("data") or {}).get("train") or {}
    result: dict[str, Any] = {
        "method": args._one, "timed_steps": args.steps, "timed_tokens": tokens, "timed_s": elapsed,
        "tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps,
        "ft_logged_tokens_per_s_median": statistics.median(logged) if logged else None,
        "segments": len(segments), "sum_l_l1": sum(n * (n + 1) for n in segments),
        "setup_s": setup_s, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "trainable_params": manifest.get("trainable_params"), "device": str(session.accelerator.device),
        "packing_efficiency": data_stats.get("packing_efficiency"), "attn_implementation": attn_used,
        "timed_fill": tokens / (args.steps * args.micro_batch * args.seq),
        "plan_bytes": plan_estimate(recipe),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        train_peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        outside = max(0, (total - free) - torch.cuda.memory_reserved())  # context, workspaces: not torch's
        result.update(peak_bytes=max(setup_peak, train_peak), setup_peak_bytes=setup_peak,
                      train_peak_bytes=train_peak, reserved_bytes=reserved, device_name=props.name,
                      device_peak_bytes=max(setup_reserved, reserved) + outside, outside_allocator_bytes=outside,
                      device_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        import platform

        result.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_kind="rss",
                      device_name=f"cpu ({platform.processor() or platform.machine()}, "
                                  f"{torch.get_num_threads()} threads)")
    Path(args._result).write_text(json.dumps(result, indent=2) + "\n")


def plan_estimate(recipe: Any) -> int:
    """`ft plan`'s estimated peak (bytes) for this recipe: the same function the command prints from."""
    from ft_cli.plan import estimate_memory, load_model_config

    config, _ = load_model_config(recipe)
    return estimate_memory(config, recipe).total


# Report ------------------------------------------------------------------------------------------------------------

def _peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


def _memory_detail(r: dict[str, Any]) -> str:
    if r.get("train_peak_bytes") is None:
        return ""
    return (f"; peak {r['setup_peak_bytes'] / GIB:.2f} GiB loading, {r['train_peak_bytes'] / GIB:.2f} GiB training, "
            f"{r['reserved_bytes'] / GIB:.2f} GiB reserved in training, of {r['device_memory_bytes'] / GIB:.0f}")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summarize(args: argparse.Namespace, results: list[dict[str, Any]], model: dict[str, Any], command: str, *,
              complete: bool = True) -> dict[str, Any]:
    """The report as data: per-method rates, MFU, peaks against `ft plan`, and the targets (printed by print_report,
    written by --json, read by scripts/gpu_check.py)."""
    from ft_cli.manifest import package_versions

    ok = [r for r in results if not r.get("error")]
    device = ok[0]["device_name"] if ok else args.device
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (_peak_flops(device) if args.device == "cuda" else None)
    n = model["matmul_parameters"]
    attn_per_example = 6 * model["layers"] * model["heads"] * model["head_dim"]  # x L(L+1): fwd + 2x bwd
    for r in ok:
        tps = r["tokens_per_s"]
        attn = attn_per_example * r["sum_l_l1"] / r["timed_s"]
        r["mfu_4n"] = tps * 4 * n / peak if peak else None
        r["mfu_4n_attn"] = (tps * 4 * n + attn) / peak if peak else None
        r["mfu_6n"] = tps * 6 * n / peak if peak else None
        measured = r.get("device_peak_bytes")
        r["plan_ratio"] = r["plan_bytes"] / measured if measured and r.get("plan_bytes") else None
    by = {r["method"]: r for r in ok}
    targets: dict[str, Any] = {}
    if "lora" in by:
        mfu = by["lora"]["mfu_4n"]
        targets["lora_mfu"] = {"value": mfu, "target": TARGET_LORA_MFU,
                               "pass": None if mfu is None else mfu >= TARGET_LORA_MFU}
    if "lora" in by and "qlora" in by:
        speed = by["qlora"]["tokens_per_s"] / by["lora"]["tokens_per_s"]
        memory = by["qlora"]["peak_bytes"] / by["lora"]["peak_bytes"]
        targets["qlora_speed"] = {"value": speed, "target": TARGET_QLORA_SPEED, "pass": speed >= TARGET_QLORA_SPEED}
        targets["qlora_memory"] = {"value": memory, "target": TARGET_QLORA_MEMORY,
                                   "pass": memory <= TARGET_QLORA_MEMORY}
    ratios = [r["plan_ratio"] for r in ok if r.get("plan_ratio") is not None]
    if ratios:
        worst = max(ratios, key=lambda x: abs(x - 1))
        targets["plan_error"] = {"value": abs(worst - 1), "target": TARGET_PLAN_ERROR,
                                 "pass": all(abs(x - 1) <= TARGET_PLAN_ERROR for x in ratios)}
    return {"shape": args.shape, "seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps,
            "warmup": args.warmup, "device": device, "device_kind": args.device, "peak_flops": peak,
            "versions": package_versions(), "command": command, "complete": complete,
            "dtype": _dtype(args),
            "switches": {"attn": args.attn, "gradient_checkpointing": not args.no_grad_ckpt,
                         "compile": args.compile, "liger_kernel": args.liger},
            "model": model, "results": results, "targets": targets}


def print_report(report: dict[str, Any]) -> None:
    rp, model, results = report, report["model"], report["results"]
    ok = [r for r in results if not r.get("error")]
    cpu = rp["device_kind"] == "cpu"
    peak, sw = rp["peak_flops"], rp["switches"]
    versions = rp["versions"]
    shown = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "flash-attn")
    mem_kind = "peak RSS GiB" if cpu else "peak GiB"

    print(f"ft GPU benchmark: {rp['shape']} model ({_count(model['parameters'])} parameters, N = "
          f"{_count(model['matmul_parameters'])} matmul weights), seq {rp['seq']}, micro-batch {rp['micro_batch']}, "
          f"packed; {rp['steps']} timed steps after {rp['warmup']} warm-up")
    cuda_v = next((r.get("cuda") for r in ok if r.get("cuda")), None)
    print(f"device: {rp['device']}" + (f", CUDA {cuda_v}" if cuda_v else "")
          + f"; peak dense bf16: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (MFU n/a; --peak-tflops)'}")
    print("versions: " + ", ".join(f"{k} {versions.get(k) or '-'}" for k in shown))
    used = sorted({str(r.get("attn_implementation")) for r in ok})
    attn = f"{sw['attn'] or 'ft default'} (used: {', '.join(used) or '?'})"
    print(f"model dtype {rp['dtype']}; switches: attn {attn}, gradient checkpointing "
          f"{'on' if sw['gradient_checkpointing'] else 'off'}, compile {'on' if sw['compile'] else 'off'}, "
          f"liger {'on' if sw['liger_kernel'] else 'off'}")
    print(f"command: {rp['command']}")
    print()
    header = (f"{'method':<8} {'tokens/s':>11} {'s/step':>8} {'MFU (4N)':>9} {'MFU+attn':>9} {'(6N)':>7} "
              f"{mem_kind:>13} {'ft log tok/s':>13} {'loss':>15}")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("error"):
            print(f"{r['method']:<8} failed ({r['error']})")
            continue
        logged = r["ft_logged_tokens_per_s_median"]
        loss = f"{r['first_loss']:.3f}->{r['last_loss']:.3f}" if r["first_loss"] is not None else "-"
        print(f"{r['method']:<8} {r['tokens_per_s']:>11,.0f} {r['step_s']:>8.3f} {_pct(r['mfu_4n']):>9} "
              f"{_pct(r['mfu_4n_attn']):>9} {_pct(r['mfu_6n']):>7} {r['peak_bytes'] / GIB:>13.2f} "
              f"{(f'{logged:,.0f}' if logged is not None else '-'):>13} {loss:>15}")
    print()
    print(f"{'method':<8} {'peak alloc GiB':>15} {'device peak GiB':>16} {'ft plan GiB':>12} {'plan/peak':>10}")
    for r in ok:
        dev = r.get("device_peak_bytes")
        plan = r.get("plan_bytes")
        ratio = r.get("plan_ratio")
        print(f"{r['method']:<8} {r['peak_bytes'] / GIB:>15.2f} "
              f"{(f'{dev / GIB:.2f}' if dev else 'n/a'):>16} {(f'{plan / GIB:.2f}' if plan else 'n/a'):>12} "
              f"{(f'{ratio:.2f}' if ratio else 'n/a'):>10}")
    print()
    for r in ok:
        eff = r.get("packing_efficiency")
        print(f"{r['method']}: timed rows {r['timed_fill']:.1%} real tokens ({r['timed_tokens']:,} in {r['timed_steps']} "
              f"steps, {r['segments']} examples), packing efficiency {f'{eff:.1%}' if eff else '-'}; "
              f"{r['trainable_params'] or 0:,} trainable parameters; setup {r['setup_s']:.0f} s, whole process "
              f"{r['wall_s']:.0f} s" + _memory_detail(r))
    print("tokens/s: real (non-padding) tokens of the timed steps / their wall time; MFU (4N) = tokens/s x 4N / peak "
          "(LoRA convention, N without the input embedding, lm_head in); MFU+attn adds causal attention within each "
          "packed example; (6N) = full-fine-tuning convention, for reference; peak = whole process, model load "
          "included" + (" (peak RSS on the CPU)" if cpu else " (torch.cuda.max_memory_allocated)")
          + "; device peak = peak reserved + memory outside torch's allocator (what ft plan estimates)")

    targets = rp["targets"]
    print("targets" + (" (set for an H100/H200; this is a CPU smoke run)" if cpu else "") + ":")
    if "lora_mfu" in targets:
        mfu = targets["lora_mfu"]["value"]
        verdict = "n/a (no peak FLOP/s for this device)" if mfu is None else _verdict(targets["lora_mfu"]["pass"])
        print(f"  bf16 LoRA MFU (4N) {_pct(mfu)} >= {TARGET_LORA_MFU:.0%}: {verdict}")
    if "qlora_speed" in targets:
        t, m = targets["qlora_speed"], targets["qlora_memory"]
        print(f"  QLoRA/LoRA throughput {t['value']:.2f}x >= {TARGET_QLORA_SPEED}x: {_verdict(t['pass'])}")
        print(f"  QLoRA/LoRA peak memory {m['value']:.2f}x <= {TARGET_QLORA_MEMORY}x: {_verdict(m['pass'])}")
    else:
        print("  (the QLoRA/LoRA ratios need both methods)")
    if "plan_error" in targets:
        t = targets["plan_error"]
        print(f"  ft plan vs every measured device peak: worst {t['value']:.1%} off, within "
              f"{TARGET_PLAN_ERROR:.0%}: {_verdict(t['pass'])}")
    else:
        print("  ft plan vs measured peak: n/a" + (" (no device peak on the CPU)" if cpu else ""))
    if model.get("build_s") is not None:
        print(f"model directory built in {model['build_s']:.0f} s")


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "MISS")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "gpu":
        argv = ["gpu", *argv]  # standalone: the subcommand is implied
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
