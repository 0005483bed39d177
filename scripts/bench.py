"""Benchmarks. One subcommand per area; each prints its numbers side by side.

    python scripts/bench.py data [--rows 50000] [--pack-rows 100000] [--data-dir ../shared/data]

`data`: ft's data pipeline (render + tokenize + mask + pack, from a file on disk) against a per-example
`datasets.map` over `tokenizer.apply_chat_template`, on alpaca rows (the demo rows repeated, each made unique so
no cache can help); packing time for 100k examples; packing efficiency on alpaca_en_demo at max_seq_len 1024.
Uses the built-in tiny-llama tokenizer (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# data ------------------------------------------------------------------------------------------------------------

def _alpaca_messages(ex: dict) -> list[dict]:
    user = f"{ex['instruction']}\n{ex['input']}" if ex["input"] else ex["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def _baseline(tokenizer, rows: list[dict], *, masked: bool) -> tuple[float, float]:
    """Per-example datasets.map over apply_chat_template. masked=True also computes labels the usual way
    (tokenize the prompt with add_generation_prompt=True and mask that many tokens): the same output as ft's."""
    import datasets

    ds = datasets.Dataset.from_list(rows)

    def one(ex: dict) -> dict:
        messages = _alpaca_messages(ex)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        if not masked:
            return {"input_ids": ids}
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        return {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]}

    start, cpu = time.perf_counter(), time.process_time()
    ds.map(one, remove_columns=ds.column_names, load_from_cache_file=False)
    return time.perf_counter() - start, time.process_time() - cpu


def _ft(tokenizer, path: Path, *, packing: bool, max_seq_len: int = 2048) -> tuple[tuple[float, float], object]:
    from ft_cli.data.pipeline import build_datasets
    from ft_cli.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"},
                               "data": {"train": str(path), "format": "alpaca", "val_split": 0.0, "cache": False,
                                        "packing": packing, "max_seq_len": max_seq_len}})
    start, cpu = time.perf_counter(), time.process_time()
    bundle = build_datasets(recipe, tokenizer)
    return (time.perf_counter() - start, time.process_time() - cpu), bundle


def bench_data(args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from ft_cli.builtin_models import resolve_builtin
    from ft_cli.data.packing import pack_sequences, packing_efficiency

    datasets.disable_progress_bars()
    data_dir = Path(args.data_dir)
    demo = json.loads((data_dir / "alpaca_en_demo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    rows = [dict(r, instruction=f"{r['instruction']} (#{i})") for i, r in
            ((i, demo[i % len(demo)]) for i in range(args.rows))]
    print(f"data: {len(rows):,} alpaca rows (alpaca_en_demo repeated, each unique); tokenizer builtin:tiny-llama; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        path.write_text(json.dumps(rows))
        warm = Path(tmp) / "warm.json"
        warm.write_text(json.dumps(rows[:1000]))
        _ft(tokenizer, warm, packing=True)  # warm-up: imports, jinja compile
        _baseline(tokenizer, rows[:1000], masked=True)
        times = {"ft (file -> tokens + labels + packed rows)": [], "baseline map, apply_chat_template only": [],
                 "baseline map, apply_chat_template + prompt mask": []}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits every method alike
            t, bundle = _ft(tokenizer, path, packing=True)
            times["ft (file -> tokens + labels + packed rows)"].append(t)
            times["baseline map, apply_chat_template only"].append(_baseline(tokenizer, rows, masked=False))
            times["baseline map, apply_chat_template + prompt mask"].append(_baseline(tokenizer, rows, masked=True))
    best = {k: min(v) for k, v in times.items()}  # (wall, cpu) of the fastest run
    ft_time = best["ft (file -> tokens + labels + packed rows)"][0]
    for name, (t, cpu) in best.items():
        print(f"  {name:<50} {t:7.2f} s wall ({cpu:6.1f} s CPU)  {len(rows) / t:7,.0f} rows/s  "
              f"x{t / ft_time:.2f} of ft's time")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    s = bundle.train_stats
    print(f"  ft: {s.rows:,} examples, {s.tokens:,} tokens, {s.packed_rows:,} packed rows")

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 0.8, args.pack_rows).astype(np.int64), 8, 2048)
    start = time.perf_counter()
    packed = pack_sequences(lengths, 2048, seed=0)
    pack_time = time.perf_counter() - start
    print(f"packing: {args.pack_rows:,} examples (lognormal lengths, mean {lengths.mean():.0f}) into "
          f"{len(packed):,} rows of 2048 in {pack_time:.2f} s, efficiency "
          f"{packing_efficiency(lengths, len(packed), 2048):.4f}")

    _, bundle = _ft(tokenizer, data_dir / "alpaca_en_demo.json", packing=True, max_seq_len=1024)
    s = bundle.train_stats
    print(f"packing efficiency on alpaca_en_demo.json at max_seq_len 1024: {s.packing_efficiency:.4f} "
          f"({s.rows} examples, {s.tokens:,} tokens -> {s.packed_rows} rows)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="data pipeline vs a per-example apply_chat_template map; packing")
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--pack-rows", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the best is reported")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.set_defaults(func=bench_data)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
