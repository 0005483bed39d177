"""Packing: best-fit decreasing bins, position_ids, and the proof that packed examples do not see each other:
per-example losses in a packed batch equal those of the same examples run alone (sdpa and eager)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from ft_cli.data.packing import gather_packed, pack_sequences, packing_efficiency
from ft_cli.data.pipeline import build_datasets, make_collator

IGNORE = -100


def test_best_fit_decreasing_never_overflows_and_places_every_example_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 513, size=5000)
    rows = pack_sequences(lengths, 512, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(5000))
    assert max(int(lengths[row].sum()) for row in rows) <= 512
    assert packing_efficiency(lengths, len(rows), 512) > 0.97
    assert rows == pack_sequences(lengths, 512, seed=3)  # deterministic
    assert rows != pack_sequences(lengths, 512, seed=4)  # the seed shuffles the row order


def test_best_fit_decreasing_is_optimal_on_a_small_case():
    # 6+4, 5+5, 7+3: best fit decreasing finds the 3 full rows
    rows = pack_sequences([6, 5, 7, 4, 5, 3], 10)
    assert sorted(sorted([6, 5, 7, 4, 5, 3][i] for i in row) for row in rows) == [[3, 7], [4, 6], [5, 5]]


def test_packing_100k_examples_is_fast():
    lengths = np.clip(np.random.default_rng(0).lognormal(5.5, 0.8, 100_000).astype(np.int64), 8, 2048)
    start = time.perf_counter()
    rows = pack_sequences(lengths, 2048)
    assert time.perf_counter() - start < 5
    assert packing_efficiency(lengths, len(rows), 2048) > 0.99


def test_gather_restarts_positions_per_example():
    ids = np.arange(10, dtype=np.int32)
    labels = ids.copy()
    lengths = np.array([3, 2, 5])
    flat_ids, flat_labels, pos, row_lengths = gather_packed(ids, labels, lengths, [[2, 0], [1]])
    assert flat_ids.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert row_lengths.tolist() == [8, 2]


def test_alpaca_demo_packs_to_at_least_97_percent(shared_data, data_tokenizer, data_recipe):
    bundle = build_datasets(data_recipe(str(shared_data / "alpaca_en_demo.json"), packing=True, max_seq_len=1024),
                            data_tokenizer)
    s = bundle.train_stats
    assert s.rows == 999 and s.packing_efficiency >= 0.97
    assert s.packed_rows == len(bundle.train)
    lengths = [len(r) for r in bundle.train["input_ids"]]
    assert max(lengths) <= 1024
    assert sum(lengths) == s.tokens
    for row in bundle.train.select(range(20)):
        pos, labels = row["position_ids"], row["labels"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0
        assert all(labels[i] == IGNORE for i in starts)  # no example learns the next one's first token
        for a, b in zip(starts, starts[1:] + [len(pos)], strict=True):
            assert pos[a:b] == list(range(b - a))


def test_packed_collator_pads_rows_as_their_own_segment(data_tokenizer):
    collate = make_collator(data_tokenizer, packed=True, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "position_ids": [0, 1, 2, 0, 1]},
                     {"input_ids": [5, 6], "labels": [IGNORE, 6]}])  # eval rows have no position_ids
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"][1].tolist() == [IGNORE, 6] + [IGNORE] * 6
    assert batch["input_ids"][1, 2:].eq(data_tokenizer.pad_token_id).all()
    assert int(batch["num_tokens"]) == 7


def test_unpacked_collator_right_pads(data_tokenizer):
    collate = make_collator(data_tokenizer, packed=False)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [IGNORE]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, data_tokenizer.pad_token_id, data_tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


# Packed == unpacked ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples_and_rows(tmp_path_factory, tiny_llama_dir):
    """Eight short alpaca examples, unpacked and packed (max_seq_len 160 -> several per row, rows of unequal
    length so the packed batch also has padding)."""
    from transformers import AutoTokenizer

    from ft_cli.recipe import recipe_from_dict

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = [{"instruction": f"Say {w} {i} times.", "input": "", "output": " ".join([w] * (i + 1)) + "."}
               for i, w in enumerate(["yes", "no", "blue", "red", "sun", "moon", "one", "two"])]
    path = tmp_path_factory.mktemp("pack") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def build(packing: bool):
        recipe = recipe_from_dict({"model": {"name_or_path": "builtin:tiny-llama"},
                                   "data": {"train": str(path), "packing": packing, "max_seq_len": 160,
                                            "val_split": 0.0, "cache": False}})
        return build_datasets(recipe, tok).train

    unpacked, packed = build(False), build(True)
    assert len(packed) >= 2 and len(packed) < len(unpacked)
    return tok, unpacked, packed


def _model(tiny_llama_dir, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each target position t (predicted from t-1); 0 where the label is -100. Shape (B, T)."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                               ignore_index=IGNORE, reduction="none")
    return torch.nn.functional.pad(losses, (1, 0))


def _per_example_packed(model, batch: dict, use_cache: bool = False) -> list[tuple[list[int], float]]:
    """(input_ids, summed loss) of every example in a packed batch, split where position_ids restart.

    use_cache must be False: with a KV cache (config.use_cache defaults to True, and only gradient
    checkpointing in train mode turns it off) transformers skips the packed-sequence mask."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch.get("attention_mask"), use_cache=use_cache).logits
    losses = _token_losses(logits, batch["labels"])
    out = []
    for row in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = batch["input_ids"][row, a:b].tolist()
            if set(ids) != {batch["pad_id"]}:
                out.append((ids, float(losses[row, a:b].sum())))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(examples_and_rows, tiny_llama_dir, attn):
    tok, unpacked, packed = examples_and_rows
    model = _model(tiny_llama_dir, attn)
    alone = {}
    for row in unpacked:
        batch = make_collator(tok, packed=False)([row])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone[tuple(row["input_ids"])] = float(_token_losses(logits, batch["labels"]).sum())

    batch = make_collator(tok, packed=True)(list(packed))
    assert "attention_mask" not in batch
    batch["pad_id"] = tok.pad_token_id
    together = _per_example_packed(model, batch)
    assert sorted(tuple(ids) for ids, _ in together) == sorted(alone)  # every example, exactly once
    for ids, loss in together:
        assert loss == pytest.approx(alone[tuple(ids)], abs=1e-4)

    # Negative controls: a plain attention mask, a KV cache (use_cache=True), or positions that do not restart
    # let examples attend to their row-mates, and the losses change: the check above can fail.
    plain_mask = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    for broken, use_cache in ((plain_mask, False), (batch, True)):
        diffs = [abs(loss - alone[tuple(ids)]) for ids, loss in _per_example_packed(model, broken, use_cache)]
        assert max(diffs) > 1e-2
    no_restart = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=no_restart, use_cache=False).logits
    losses = _token_losses(logits, batch["labels"])
    diffs = []
    for row in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = tuple(batch["input_ids"][row, a:b].tolist())
            if ids in alone:
                diffs.append(abs(float(losses[row, a:b].sum()) - alone[ids]))
    assert max(diffs) > 1e-2
