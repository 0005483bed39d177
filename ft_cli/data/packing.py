"""Packing: several examples per row of at most max_seq_len tokens, and position_ids that restart per example.

Best-fit decreasing: examples longest first, each into the fullest row that still has room, else a new row.
The open rows are kept as a sorted list of distinct remaining capacities (bisect) with a stack of rows per
capacity, so each placement is O(log max_seq_len): 100k examples pack in well under a second.

Attention never crosses examples: position_ids restart at 0 for each example and the collator sends no
attention_mask, from which transformers builds a block-diagonal causal mask (sdpa/eager, masking_utils'
find_packed_sequence_indices) or runs varlen flash attention. Each example's first label is already -100
(see `encode`), so no example is trained to predict the next one's first token.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


def pack_sequences(lengths: np.ndarray | list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to <= capacity; row order shuffled with `seed`."""
    lens = [int(x) for x in lengths]
    if any(n > capacity for n in lens):
        raise ValueError(f"an example is longer than the packing capacity {capacity}")
    order = np.argsort(-np.asarray(lens, dtype=np.int64), kind="stable").tolist()
    caps: list[int] = []  # sorted distinct remaining capacities of open rows
    rows_by_cap: dict[int, list[int]] = {}
    rows: list[list[int]] = []
    for idx in order:
        n = lens[idx]
        j = bisect_left(caps, n)
        if j == len(caps):
            row, left = len(rows), capacity - n
            rows.append([idx])
        else:
            cap = caps[j]
            stack = rows_by_cap[cap]
            row = stack.pop()
            if not stack:
                del rows_by_cap[cap]
                caps.pop(j)
            rows[row].append(idx)
            left = cap - n
        if left > 0:
            stack = rows_by_cap.get(left)
            if stack is None:
                rows_by_cap[left] = [row]
                insort(caps, left)
            else:
                stack.append(row)
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in perm]


def packing_efficiency(lengths: np.ndarray, n_rows: int, capacity: int) -> float:
    return float(np.sum(lengths)) / (n_rows * capacity) if n_rows else 0.0


def gather_packed(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                  rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (ids, labels, position_ids, row_lengths) of the packed rows, built with vectorised gathers (32-bit
    indices and in-place arithmetic where they fit: these arrays are as long as the whole dataset, and fresh
    memory is most of their cost)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=sum(len(r) for r in rows))
    seg_len = lengths[order]
    seg_new_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]]).astype(np.int64)
    total = int(seg_len.sum())
    index = np.int32 if max(total, int(lengths.sum())) < np.iinfo(np.int32).max else np.int64
    # token k of the output comes from starts[seg] + (k - seg_new_start[seg])
    src = np.repeat((starts[order] - seg_new_start).astype(index), seg_len)
    src += np.arange(total, dtype=index)
    position_ids = np.arange(total, dtype=index)
    position_ids -= np.repeat(seg_new_start.astype(index), seg_len)
    position_ids = position_ids.astype(np.int32, copy=False)
    row_first = np.concatenate([[0], np.cumsum([len(r) for r in rows])[:-1]]).astype(np.int64)
    row_lengths = np.add.reduceat(seg_len, row_first) if rows else np.zeros(0, np.int64)
    return ids[src], labels[src], position_ids, row_lengths
