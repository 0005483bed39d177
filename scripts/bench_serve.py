"""Serving benchmark: `ft serve` with 1 and 3 adapters against `ft generate` run once per request (the script a
user would otherwise write), on the built-in tiny model (CPU).

    python scripts/bench.py serve [--requests 48] [--concurrency 8] [--baseline-requests 6] [--repeat 2]
                                  [--max-new-tokens 32] [--batch 8] [--model builtin:tiny-llama] [--json PATH]

Three LoRA runs are trained first (a few steps each, so their replies differ). Then, side by side:
- baseline: `ft generate RUN --prompt P --temperature 0` as a fresh process per request, one after another (each
  pays the start-up and the model load, as a loop in a shell script does);
- `ft serve RUN_A --adapter b=RUN_B --adapter c=RUN_C` started once (its start-up is reported, not counted), then
  --requests greedy chat requests from --concurrency client threads, all to one adapter, then spread round-robin
  over the three: requests/s, p50/p95 latency, and generated tokens/s (best of --repeat interleaved passes: the
  CPU kernels are slow the first time they meet a shape, a cost a long-running server pays once);
- the concurrency policy: by default ft serve decodes one request at a time (FIFO); `--max-batch N` decodes the
  queued requests of one adapter together. The 3-adapter scenario again on a server started with
  `--max-batch` set to --batch; and in-process, on one adapter, greedy decoding of --batch prompts one by one vs as one
  left-padded batch: the throughput ratio, and how many batched replies differ from the one-by-one ones (padding
  changes the floating-point sums, so batched greedy replies are not guaranteed to equal ft generate's).
Every number is printed as a ratio against its baseline from the same invocation; nothing is asserted here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("alpha", "b", "c")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="ft serve (1 vs 3 adapters) vs ft generate per request; batching",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama", help="a built-in base model (default builtin:tiny-llama)")
    p.add_argument("--requests", type=int, default=48, help="requests per server scenario (default 48)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--baseline-requests", type=int, default=6, help="ft generate processes (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="--max-batch, and prompts in the batching comparison (8)")
    p.add_argument("--repeat", type=int, default=2,
                   help="passes of each server scenario and of the batching comparison, interleaved; the best is "
                        "kept, so the first is the warm-up (default 2)")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.set_defaults(func=bench_serve)
    return p


def _train_runs(tmp: Path, model: str) -> list[Path]:
    import yaml

    from ft_cli.train import train_from_recipe

    rows = json.loads((ROOT / "examples" / "data" / "quickstart_alpaca.json").read_text())
    runs = []
    for i in range(3):
        (tmp / f"data{i}.json").write_text(json.dumps(rows[i * 40:(i + 1) * 40]))
        recipe = {"model": {"name_or_path": model, "dtype": "float32"}, "method": "lora",
                  "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                  "data": {"train": str(tmp / f"data{i}.json"), "format": "alpaca", "val_split": 0.0,
                           "max_seq_len": 128, "packing": False},
                  "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-2, "warmup_ratio": 0.0,
                            "eval_every": None, "save_every": None, "log_every": 6, "seed": i,
                            "gradient_checkpointing": False},
                  "output_dir": str(tmp / ("alpha", "beta", "gamma")[i])}
        (tmp / f"r{i}.yaml").write_text(yaml.safe_dump(recipe))
        with contextlib.redirect_stdout(io.StringIO()):
            runs.append(Path(train_from_recipe(tmp / f"r{i}.yaml", [], overwrite=True)))
    return runs


def _prompts(n: int) -> list[str]:
    rows = json.loads((ROOT / "examples" / "data" / "quickstart_alpaca.json").read_text())
    return [rows[120 + i % 60]["instruction"] for i in range(n)]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _stats(latencies: list[float], wall: float, tokens: int) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 19
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": q[18], "tokens_per_s": tokens / wall}


def _baseline(runs: list[Path], prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    latencies, tokens = [], 0
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ft_cli.cli", "generate", str(runs[i % 3]), "--prompt", prompt,
                               "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)],
                              capture_output=True, text=True, env=env)
        latencies.append(time.perf_counter() - start)
        if proc.returncode:
            sys.exit(f"ft generate failed:\n{proc.stderr[-3000:]}")
        tokens += args.max_new_tokens  # an upper bound: ft generate does not print its token count
    return _stats(latencies, sum(latencies), tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(runs: list[Path], args: argparse.Namespace, scenarios: tuple[str, ...],
            max_batch: int = 1) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "ft_cli.cli", "serve", str(runs[0]), "--adapter", f"b={runs[1]}", "--adapter",
           f"c={runs[2]}", "--port", str(port), "--max-batch", str(max_batch)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    sys.exit(f"ft serve did not start:\n{proc.communicate()[0][-3000:]}")
                time.sleep(0.2)
        startup = time.perf_counter() - t0
        prompts = _prompts(args.requests)
        out: dict[str, Any] = {"startup_s": startup}
        spreads = {"1 adapter": [NAMES[0]] * args.requests, "3 adapters": [NAMES[i % 3] for i in range(args.requests)]}
        # The first passes are slow while the CPU kernels meet new shapes: run every scenario --repeat times,
        # interleaved, and keep the best (the first pass is the warm-up).
        for _ in range(args.repeat):
            for label, models in ((k, spreads[k]) for k in scenarios):
                def one(i: int, models: list[str] = models) -> tuple[float, int]:
                    start = time.perf_counter()
                    reply = _post(url + "/chat/completions", {
                        "model": models[i], "messages": [{"role": "user", "content": prompts[i]}],
                        "max_tokens": args.max_new_tokens, "temperature": 0})
                    return time.perf_counter() - start, reply["usage"]["completion_tokens"]

                start = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - start
                stats = _stats([r[0] for r in results], wall, sum(r[1] for r in results))
                if label not in out or stats["rps"] > out[label]["rps"]:
                    out[label] = stats
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _batching(runs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """One adapter, greedy: one prompt at a time (ft serve's policy) vs a left-padded batch."""
    from ft_cli.generation import generate_ids, greedy_generate, render_prompt
    from ft_cli.serve import load_engine, plan_serve

    engine = load_engine(plan_serve(str(runs[0]), []))
    name = engine.names[1]
    engine.model.set_adapter(name)
    tok = engine.tokenizers[name]
    prompts = [render_prompt(tok, p) for p in _prompts(args.batch)]
    sequential = batch_s = float("inf")
    for _ in range(args.repeat):  # interleaved, best of --repeat (the first pass is the warm-up)
        start = time.perf_counter()
        one = [tok.decode(generate_ids(engine.model, tok, p, max_new_tokens=args.max_new_tokens, temperature=0,
                                       top_p=1.0)[0], skip_special_tokens=True).strip() for p in prompts]
        sequential = min(sequential, time.perf_counter() - start)
        start = time.perf_counter()
        batched = greedy_generate(engine.model, tok, prompts, max_new_tokens=args.max_new_tokens, device="cpu",
                                  batch_size=len(prompts))
        batch_s = min(batch_s, time.perf_counter() - start)
    return {"prompts": len(prompts), "sequential_s": sequential, "batched_s": batch_s,
            "speedup": sequential / batch_s, "replies_differing": sum(a != b for a, b in zip(one, batched, strict=True))}


def bench_serve(args: argparse.Namespace) -> None:
    from ft_cli.builtin_models import resolve_builtin

    resolve_builtin(args.model)  # built once, outside the timings
    print(f"serve: {args.model}, 3 LoRA adapters (rank 8, float32), greedy, {args.max_new_tokens} new tokens at most; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = _train_runs(Path(tmp), args.model)
        base = _baseline(runs, _prompts(args.baseline_requests), args)
        print(f"  baseline: ft generate per request: {base['rps']:.3f} req/s, p50 {base['p50_s']:.2f} s", flush=True)
        served = _server(runs, args, ("1 adapter", "3 adapters"))
        served[f"3 adapters, --max-batch {args.batch}"] = _server(runs, args, ("3 adapters",),
                                                                  max_batch=args.batch)["3 adapters"]
        batching = _batching(runs, args)
    print(f"\n  {'':<50} {'req/s':>8} {'x base':>7} {'p50':>8} {'p95':>8} {'tokens/s':>9}")
    rows = [("ft generate per request (baseline)", base)] + \
        [(f"ft serve, {k}, {args.concurrency} clients", served[k])
         for k in ("1 adapter", "3 adapters", f"3 adapters, --max-batch {args.batch}")]
    for label, s in rows:
        print(f"  {label:<50} {s['rps']:8.3f} {s['rps'] / base['rps']:7.1f} {s['p50_s']:7.3f}s {s['p95_s']:7.3f}s "
              f"{s['tokens_per_s']:9.1f}")
    three_vs_one = served["3 adapters"]["rps"] / served["1 adapter"]["rps"]
    print(f"\n  ft serve vs ft generate per request: {served['1 adapter']['rps'] / base['rps']:.1f}x requests/s "
          f"(1 adapter), {served['3 adapters']['rps'] / base['rps']:.1f}x (3 adapters)")
    print(f"  3 adapters vs 1 adapter (cost of switching adapters per request): {three_vs_one:.2f}x requests/s")
    print(f"  ft serve start-up (base + 3 adapters loaded, listening): {served['startup_s']:.1f} s, paid once "
          f"(ft generate pays ~{base['p50_s']:.1f} s per request)")
    batched = served[f"3 adapters, --max-batch {args.batch}"]["rps"] / served["3 adapters"]["rps"]
    print(f"  concurrency policy, 3 adapters: --max-batch {args.batch} vs one request at a time: {batched:.2f}x "
          "requests/s")
    print(f"  concurrency policy, in-process: a batch of {batching['prompts']} greedy prompts on one adapter vs one by "
          f"one: {batching['speedup']:.2f}x faster, {batching['replies_differing']}/{batching['prompts']} batched "
          "replies differ from one-at-a-time")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "func"},
                                               "baseline": base, "serve": served, "batching": batching,
                                               "three_vs_one": three_vs_one, "max_batch_speedup": batched},
                                              indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    ns.func(ns)
