"""Preference pairs -> token rows: a chosen and a rejected sequence per pair, scored on the final reply only.

Each side is the prompt conversation plus its reply, rendered with the chat template exactly as SFT renders a
conversation (ft_cli.data.render), so the reply's tokens and its end-of-turn are what carries loss and the prompt is
context. Only the last assistant turn scores: earlier assistant turns belong to the prompt. A pair is kept only when
both sides are (a side with no reply token left after truncation drops its pair, counted); a truncated side is
counted and said, because its comparison then covers the replies' first tokens only.

Rows: `input_ids` / `labels` (the chosen side: ft validate --show and the padding statistics read these as for SFT)
and `rejected_input_ids` / `rejected_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ft_cli.data.encode import Encoded, EncodeSettings, encode_examples
from ft_cli.data.formats import Example
from ft_cli.data.render import Rendered, Sample
from ft_cli.data.rows import DataBundle, DataStats, histogram
from ft_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from ft_cli.data.render import ChatRenderer
    from ft_cli.recipe import Recipe

PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


@dataclass
class _LastTurn:
    """A ChatRenderer whose samples train the conversation's last assistant turn only (the reply being compared)."""

    renderer: ChatRenderer

    @property
    def shapes(self) -> Any:  # the sampled render check of encode_examples applies to the wrapped renderer
        return self.renderer.shapes

    def conversation(self, ex: Example) -> Rendered:
        rendered = self.renderer.conversation(ex)
        last = rendered.samples[-1]  # the sample that holds the final turn at its own position
        return Rendered([Sample(last.text, last.spans[-1:])], lost=rendered.lost)


@dataclass
class PairEncoded:
    chosen_ids: list[list[int]]
    chosen_labels: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_labels: list[list[int]]
    pairs_in: int = 0
    dropped_empty: int = 0  # a blank reply on either side
    dropped_too_long: int = 0  # a side with no reply token left within max_seq_len (or truncation: drop)
    truncated_pairs: int = 0  # kept pairs with a side cut at max_seq_len
    unequal_cuts: int = 0  # ... of which only one side was cut


def encode_pairs(examples: list[Example | None], tokenizer: Any, settings: EncodeSettings,
                 renderer: ChatRenderer) -> PairEncoded:
    live = [ex for ex in examples if ex is not None]
    sides = []
    for ex in live:
        assert ex.rejected is not None
        sides.append(Example(ex.messages, ex.tools, None, ex.origin))
        sides.append(Example(ex.rejected, ex.tools, None, ex.origin))
    enc = encode_examples(sides, tokenizer, settings, _LastTurn(renderer))  # type: ignore[arg-type]
    rows = _split_rows(enc)
    assert enc.kept is not None and enc.cut is not None
    by_side = dict(zip(enc.kept.tolist(), zip(rows, enc.cut.tolist(), strict=True), strict=True))
    out = PairEncoded([], [], [], [], pairs_in=len(examples), dropped_empty=len(examples) - len(live))
    for i in range(len(live)):
        chosen, rejected = by_side.get(2 * i), by_side.get(2 * i + 1)
        if chosen is None or rejected is None:
            out.dropped_too_long += 1
            continue
        (c_ids, c_labels), c_cut = chosen
        (r_ids, r_labels), r_cut = rejected
        out.chosen_ids.append(c_ids)
        out.chosen_labels.append(c_labels)
        out.rejected_ids.append(r_ids)
        out.rejected_labels.append(r_labels)
        out.truncated_pairs += c_cut or r_cut
        out.unequal_cuts += c_cut != r_cut
    return out


def _split_rows(enc: Encoded) -> list[tuple[list[int], list[int]]]:
    ends = np.cumsum(enc.lengths)
    starts = ends - enc.lengths
    return [(enc.ids[a:b].tolist(), enc.labels[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def pair_dataset(enc: PairEncoded) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict(dict(zip(PAIR_COLUMNS, (enc.chosen_ids, enc.chosen_labels, enc.rejected_ids,
                                                              enc.rejected_labels), strict=True)))


def pair_stats(enc: PairEncoded, max_seq_len: int, sources: list[dict[str, Any]]) -> DataStats:
    lengths = np.array([len(a) + len(b) for a, b in zip(enc.chosen_ids, enc.rejected_ids, strict=True)], np.int64)
    side_lengths = np.array([len(x) for x in enc.chosen_ids + enc.rejected_ids], np.int64)
    trained = sum(sum(t != -100 for t in lab[1:]) for lab in enc.chosen_labels + enc.rejected_labels)
    return DataStats(
        rows_in=enc.pairs_in, rows=len(enc.chosen_ids), dropped_empty=enc.dropped_empty,
        dropped_too_long=enc.dropped_too_long, truncated=enc.truncated_pairs, tokens=int(lengths.sum()),
        trained_tokens=int(trained), packed_rows=None, packing_efficiency=None, max_seq_len=max_seq_len,
        mean_length=float(side_lengths.mean()) if len(side_lengths) else 0.0,
        max_length=int(side_lengths.max()) if len(side_lengths) else 0,
        length_histogram=histogram(side_lengths, max_seq_len), sources=sources, unit="pairs")


def pair_bundle(recipe: Recipe, tokenizer: Any, key: str, settings: EncodeSettings, renderer: ChatRenderer,
                train_examples: list[Example | None], eval_examples: list[Example | None],
                train_mix: list[dict[str, Any]], eval_sources: list[dict[str, Any]],
                warnings: list[str]) -> DataBundle:
    d = recipe.data
    train_enc = encode_pairs(train_examples, tokenizer, settings, renderer)
    if not train_enc.chosen_ids:
        raise UserError(f"data.train: no preference pair left to train on ({train_enc.pairs_in} records: "
                        f"{train_enc.dropped_empty} with a blank reply, {train_enc.dropped_too_long} with a reply "
                        f"that does not fit data.max_seq_len={d.max_seq_len}); raise max_seq_len or check the data")
    warnings = list(warnings) + _truncation_warnings(train_enc, d.max_seq_len, "training")
    eval_ds, eval_stats = None, None
    if eval_examples:
        eval_enc = encode_pairs(eval_examples, tokenizer, settings, renderer)
        eval_stats = pair_stats(eval_enc, d.max_seq_len, eval_sources)
        warnings += _truncation_warnings(eval_enc, d.max_seq_len, "eval")
        if eval_enc.chosen_ids:
            eval_ds = pair_dataset(eval_enc)
        else:
            warnings.append("every eval pair was dropped; training runs without evaluation")
    notes = [f"preference pairs ({recipe.objective}): each row is a chosen and a rejected sequence; only the final "
             "reply of each scores (earlier turns are the prompt). Counts in this table are pairs; tokens count "
             "both sides."]
    return DataBundle(pair_dataset(train_enc), eval_ds, pair_stats(train_enc, d.max_seq_len, train_mix), eval_stats,
                      key, warnings, notes=notes)


def _truncation_warnings(enc: PairEncoded, max_seq_len: int, split: str) -> list[str]:
    if not enc.truncated_pairs:
        return []
    return [f"{enc.truncated_pairs:,} of {len(enc.chosen_ids):,} {split} pairs have a reply cut at "
            f"data.max_seq_len={max_seq_len} (in {enc.unequal_cuts:,} of them only one side, so its comparison is "
            "between a whole reply and the start of the other): raise max_seq_len, or data.truncation: drop skips "
            "such pairs"]
