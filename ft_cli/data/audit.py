"""The data audit `ft validate` prints: counts per split, a length histogram, packing and padding efficiency,
warnings, and samples with the trained tokens highlighted (green: carries loss; dim: masked). Without colours
(output piped or redirected, NO_COLOR, TERM=dumb) trained spans are marked [[like this]] instead."""

from __future__ import annotations

from typing import Any

from ft_cli.data.encode import IGNORE_INDEX
from ft_cli.data.pipeline import DataBundle, DataStats

TRAINED_STYLE, MASKED_STYLE = "green", "dim"
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # the marker when there are no colours


def print_data_report(bundle: DataBundle, tokenizer: Any, console: Any, show: int = 0) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="data" + (" (from cache)" if bundle.from_cache else ""), show_header=True)
    table.add_column("")
    splits = [("train", bundle.train_stats)] + ([("eval", bundle.eval_stats)] if bundle.eval_stats else [])
    for name, _ in splits:
        table.add_column(name, justify="right")
    for label, fn in _ROWS:
        values = [fn(s) for _, s in splits]
        if any(v for v in values):
            table.add_row(label, *[v or "-" for v in values])
    console.print(table)
    s = bundle.train_stats
    console.print(f"train example lengths (tokens; max_seq_len {s.max_seq_len}):", markup=False)
    console.print(length_histogram(s), markup=False)
    if bundle.train_stats.sources and len(bundle.train_stats.sources) > 1:
        for src in bundle.train_stats.sources:
            console.print(f"  source {src['path']}: {src['rows']} rows of {src['available']}"
                          + (f" (weight {src['weight']:g})" if src.get("weight") else ""), markup=False)
    for w in bundle.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), w))
    for note in bundle.notes:
        console.print(Text.assemble(("note: ", "cyan"), note))
    if show > 0 and bundle.labels is not None:  # task classification: text and label, no loss mask
        for i, row in enumerate(bundle.train.select(range(min(show, len(bundle.train))))):
            console.rule(f"example {i} ({len(row['input_ids'])} tokens, label {bundle.labels[row['label']]!r})")
            console.print(tokenizer.decode(row["input_ids"], skip_special_tokens=False), markup=False)
    elif show > 0:
        markers = console.color_system is None or console.no_color  # piped, redirected, NO_COLOR: no colours
        if markers:
            console.print(f"first {show} training examples ({TRAINED_OPEN}trained tokens{TRAINED_CLOSE}, "
                          "masked tokens unmarked):", markup=False)
        else:
            console.print(f"first {show} training examples ([{TRAINED_STYLE}]trained tokens[/], "
                          f"[{MASKED_STYLE}]masked tokens[/]):")
        for i, (ids, labels) in enumerate(iter_examples(bundle.train, show)):
            console.rule(f"example {i} ({len(ids)} tokens, {sum(x != IGNORE_INDEX for x in labels)} trained)")
            console.print(highlight_tokens(tokenizer, ids, labels, markers=markers))


def data_notes(bundle: DataBundle) -> list[str]:
    """What the pipeline dropped or cut, with counts and reasons, then its warnings and notes: `ft train` prints these (ft
    validate shows the same counts in its table), so no row disappears without a word."""
    lines = []
    splits = [("training", bundle.train_stats)] + ([("eval", bundle.eval_stats)] if bundle.eval_stats else [])
    for name, s in splits:
        if s.unit == "pairs":
            lines += _pair_notes(name, s)
            continue
        if s.dropped_empty:
            lines.append(f"data: {s.dropped_empty:,} of {s.rows_in:,} {name} records dropped: nothing to train on "
                         "(no assistant reply with content, or blank text)")
        if s.dropped_too_long:
            lines.append(f"data: {s.dropped_too_long:,} of {s.rows_in:,} {name} records dropped: too long for "
                         f"data.max_seq_len={s.max_seq_len} (data.truncation: drop, or nothing trained left after "
                         "truncating)")
        if s.truncated:
            lines.append(f"data: {s.truncated:,} of {s.rows:,} {name} examples truncated to data.max_seq_len="
                         f"{s.max_seq_len} (their tail is not trained; data.truncation: drop skips them instead)")
    return lines + [f"warning: {w}" for w in bundle.warnings] + [f"note: {n}" for n in bundle.notes]


def _label_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return "\n".join(f"{name}: {_pct(n, total)}" for name, n in counts.items())


def _pair_notes(name: str, s: Any) -> list[str]:
    lines = []
    if s.dropped_empty:
        lines.append(f"data: {s.dropped_empty:,} of {s.rows_in:,} {name} pairs dropped: a blank chosen or rejected reply")
    if s.dropped_too_long:
        lines.append(f"data: {s.dropped_too_long:,} of {s.rows_in:,} {name} pairs dropped: a reply does not fit "
                     f"data.max_seq_len={s.max_seq_len} after its prompt (or data.truncation: drop)")
    return lines


def _pct(part: int, whole: int) -> str:
    return f"{part:,} ({part / whole:.1%})" if whole else f"{part:,}"


_ROWS = [
    ("records read", lambda s: f"{s.rows_in:,}"),
    ("examples kept", lambda s: f"{s.rows:,}"),
    ("dropped: nothing to train on", lambda s: f"{s.dropped_empty:,}" if s.dropped_empty else ""),
    ("dropped: too long", lambda s: f"{s.dropped_too_long:,}" if s.dropped_too_long else ""),
    ("truncated to max_seq_len", lambda s: _pct(s.truncated, s.rows) if s.truncated else ""),
    ("documents split into chunks", lambda s: f"{s.split_documents:,} -> {s.text_chunks:,} examples"
     if s.split_documents else ""),
    ("conversations split per assistant turn", lambda s: f"{s.split_rows:,} (+{s.extra_samples:,} samples)"
     if s.split_rows else ""),
    ("assistant text left out by the template", lambda s: f"{s.lost_rows:,} conversations" if s.lost_rows else ""),
    ("tokens", lambda s: f"{s.tokens:,}"),
    ("trained tokens", lambda s: _pct(s.trained_tokens, s.tokens) if s.label_counts is None else ""),
    ("labels (task classification)", lambda s: _label_counts(s.label_counts) if s.label_counts else ""),
    ("mean / max length", lambda s: f"{s.mean_length:.0f} / {s.max_length}"),
    ("packed rows", lambda s: f"{s.packed_rows:,}" if s.packed_rows else ""),
    ("packing efficiency", lambda s: f"{s.packing_efficiency:.1%}" if s.packing_efficiency else ""),
    ("padding efficiency (per micro-batch)", lambda s: f"{s.padding_efficiency:.1%}" if s.padding_efficiency else ""),
]


def length_histogram(stats: DataStats, width: int = 40) -> str:
    bins = stats.length_histogram
    if not bins:
        return "  (no examples)"
    top = max(c for _, _, c in bins) or 1
    lines = []
    for lo, hi, c in bins:
        bar = "#" * (round(width * c / top) if c else 0)
        lines.append(f"  {lo:>6}-{hi - 1:<6} {bar:<{width}} {c:,}")
    return "\n".join(lines)


def iter_examples(dataset: Any, limit: int):
    """(input_ids, labels) of the first `limit` examples; packed rows are split where position_ids restart."""
    count = 0
    for row in dataset:
        ids, labels, pos = row["input_ids"], row["labels"], row.get("position_ids")
        starts = [0] if pos is None else [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(ids)], strict=True):
            yield ids[a:b], labels[a:b]
            count += 1
            if count >= limit:
                return


def highlight_tokens(tokenizer: Any, ids: list[int], labels: list[int], *, markers: bool = False) -> Any:
    """A rich Text of the decoded example: runs of trained tokens green, masked ones dim; with `markers`, trained
    runs are also wrapped in [[ ]], which survives where colours do not (CI logs, `| less`, files)."""
    from rich.text import Text

    text = Text()
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            piece = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            trained = labels[start] != IGNORE_INDEX
            if trained and markers:
                piece = f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}"
            text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
            start = i
    return text
