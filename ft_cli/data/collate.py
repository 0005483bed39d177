"""Rows -> tensors for the model.

Unpacked: right padding; input_ids padded with pad_token_id, labels with -100, attention_mask 1/0.
Packed: input_ids, labels, position_ids and no attention_mask. With no mask, transformers derives the example
boundaries from the restarts in position_ids (a block-diagonal causal mask for sdpa/eager, varlen kernels for
flash_attention_2). Padding between rows of different length becomes one more "example" (positions 0..k-1,
labels -100) that no real token can attend to. Rows without position_ids (e.g. unpacked eval rows) get 0..n-1,
so one packed collator also serves eval. `num_tokens` (real, non-padding tokens) is included for throughput
logging because without an attention_mask it cannot be recovered from the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ft_cli.data.encode import IGNORE_INDEX


def make_collator(tokenizer: Any, *, packed: bool,
                  pad_to_multiple_of: int | None = None) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def width(rows: list[dict[str, Any]]) -> int:
        n = max(len(r["input_ids"]) for r in rows)
        if pad_to_multiple_of:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        return n

    def collate_padded(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = width(rows)
        input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def collate_packed(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = width(rows)
        input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.arange(n, dtype=torch.long).repeat(len(rows), 1)
        real = 0
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            real += k
            input_ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            if r.get("position_ids") is not None:
                position_ids[i, :k] = torch.as_tensor(r["position_ids"])
            position_ids[i, k:] = torch.arange(n - k)  # padding: its own segment, never attended to by real tokens
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "num_tokens": torch.tensor(real)}

    return collate_packed if packed else collate_padded
