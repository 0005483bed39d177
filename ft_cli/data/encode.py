"""Examples -> token ids + labels, truncated or dropped, with every removal counted.

A conversation becomes one training text (or one per assistant turn where the template rewrites earlier turns,
see `render`), tokenized once (a batch of texts per call to the fast tokenizer); a token is trained when its
first character lies inside an assistant span. Label -100 means "no loss". Position 0 is always -100: nothing
predicts the first token, and in a packed row that label would otherwise be the target of the previous
example's last token.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from ft_cli.data.batch_tokenizer import CHUNK, BatchEncoder, tokenizer_threads
from ft_cli.data.formats import Example
from ft_cli.data.render import ChatRenderer
from ft_cli.data.shapes import ShapeMismatch
from ft_cli.errors import UserError

IGNORE_INDEX = -100  # the label of a token that carries no loss (torch's cross_entropy ignore_index); ft's one copy
# Of each conversation shape after its first shapes.CHECK_FIRST, every CHECK_EVERY-th is compared with a real render
# of the template (data/shapes.py): rendering each one costs a third of ft's Python time on plain chat data.
CHECK_EVERY = 32


@dataclass
class EncodeSettings:
    max_seq_len: int
    truncation: str  # "truncate" | "drop"
    train_on_inputs: bool
    text_chunking: str = "truncate"  # "split": text documents become max_seq_len chunks; "truncate": as truncation
    text_overlap: int = 0  # split: tokens of the previous chunk repeated as (untrained) context
    system_message: str = "keep"  # data.system_message


@dataclass
class Encoded:
    """Flat token arrays of the kept examples (example i is the i-th run of lengths[i] tokens) and the counts."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    rows_in: int = 0
    dropped_empty: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    cut: np.ndarray | None = None  # per kept row, whether it was truncated to max_seq_len
    kept: np.ndarray | None = None  # per kept row, the index of its text among the examples' samples (in order)
    split_documents: int = 0  # text documents longer than max_seq_len cut into chunks (text_chunking: split)
    text_chunks: int = 0  # the examples those documents became
    split_rows: int = 0  # conversations with assistant turns trained in samples of their own (render, case 3)
    extra_samples: int = 0  # the samples those added
    lost_rows: int = 0  # conversations whose assistant text the template partly leaves out of the training text
    lost_first: str | None = None  # where and what, for the first of them
    texts: int = 0  # samples tokenized (a conversation whose turns train apart gives several)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def adds_bos(tokenizer: Any) -> bool:
    """Does this tokenizer put a BOS token in front when asked to add special tokens (Llama does, Qwen not)?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("x").input_ids[:1] == [bos] and tokenizer("x", add_special_tokens=False).input_ids[:1] != [bos]


def encode_examples(examples: list[Example | None], tokenizer: Any, settings: EncodeSettings,
                    renderer: ChatRenderer | None = None, on_chunk: Any = None) -> Encoded:
    """Tokenize and mask; a text example (ex.text set) trains every token, a conversation its assistant turns.
    `on_chunk(n)` is called as each n examples are done (progress on big data).

    Rendering (Python) and tokenizing (Rust, which releases the GIL and uses its own threads) overlap: a worker
    thread tokenizes chunk i while this thread renders chunk i+1 and then labels chunk i."""
    live = [ex for ex in examples if ex is not None]
    if tokenizer.eos_token_id is None and any(ex.text is not None for ex in live):
        raise UserError("data.format text appends the eos token so the model learns to stop, but the tokenizer "
                        "has none; set eos_token in the model's tokenizer_config.json")
    if renderer is None and any(ex.text is None for ex in live):
        renderer = ChatRenderer(tokenizer, settings.system_message)
    processes = _processes(len(live))
    if processes > 1:
        enc = _encode_forked(live, tokenizer, settings, renderer, processes, on_chunk)
    else:
        enc = _encode_checked(live, tokenizer, settings, renderer, on_chunk, overlap=True)
    enc.rows_in, enc.dropped_empty = len(examples), enc.dropped_empty + len(examples) - len(live)
    return enc


def _encode_checked(live: list[Example], tokenizer: Any, settings: EncodeSettings, renderer: ChatRenderer | None,
                    on_chunk: Any, *, overlap: bool) -> Encoded:
    shapes = getattr(renderer, "shapes", None)
    if shapes is None:
        return _encode_pass(live, tokenizer, settings, renderer, on_chunk, overlap)
    every = shapes.check_every
    shapes.check_every = CHECK_EVERY
    try:
        while True:
            try:
                return _encode_pass(live, tokenizer, settings, renderer, on_chunk, overlap)
            except ShapeMismatch:  # that shape is checked conversation by conversation now: start again
                continue
    finally:
        shapes.check_every = every


def _encode_pass(live: list[Example], tokenizer: Any, settings: EncodeSettings, renderer: ChatRenderer | None,
                 on_chunk: Any, overlap: bool) -> Encoded:
    labeler = _Labeler(tokenizer, settings, rows_in=len(live), dropped_empty=0)
    encode = BatchEncoder(tokenizer)
    if not overlap:  # one thread: a forked worker, one of as many as there are cores
        for start in range(0, len(live), CHUNK):
            texts, spans = _render(live[start:start + CHUNK], renderer, labeler.out)
            labeler.add(encode(texts), texts, spans)
        return labeler.result()
    with tokenizer_threads(), ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for start in range(0, len(live), CHUNK):
            texts, spans = _render(live[start:start + CHUNK], renderer, labeler.out)
            job = (pool.submit(encode, texts), texts, spans)
            if pending is not None:
                labeler.add(pending[0].result(), *pending[1:])
                if on_chunk is not None:
                    on_chunk(len(pending[1]))
            pending = job
        if pending is not None:
            labeler.add(pending[0].result(), *pending[1:])
            if on_chunk is not None:
                on_chunk(len(pending[1]))
    return labeler.result()


# Several processes -------------------------------------------------------------------------------------------------
# Python's part of the work (rendering, labelling; ~a quarter of it) holds the GIL, so one process keeps at most one
# core busy with it while the tokenizer's threads take the rest. On big data ft forks one worker per core (Linux;
# fork shares the examples, tokenizer and renderer without pickling them), each tokenizing a contiguous part on one
# thread; the parts are joined in order, so the result is the one-process result (tested).
PART_MIN = 8192  # live examples per worker: below this, forking costs more than it saves
_FORK_STATE: dict[str, Any] = {}


def _processes(live: int) -> int:
    if sys.platform != "linux" or live < 2 * PART_MIN:
        return 1
    # under torchrun every process of a node may tokenize (data.cache: false): they share the node's cores
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(cores, live // PART_MIN))


def _encode_forked(live: list[Example], tokenizer: Any, settings: EncodeSettings, renderer: ChatRenderer | None,
                   processes: int, on_chunk: Any) -> Encoded:
    import multiprocessing

    bounds = np.linspace(0, len(live), processes + 1).astype(int).tolist()
    _FORK_STATE.update(live=live, tokenizer=tokenizer, settings=settings, renderer=renderer, bounds=bounds)
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = []
            for i, part in enumerate(pool.imap(_encode_part, range(processes))):
                parts.append(part)
                if on_chunk is not None:
                    on_chunk(bounds[i + 1] - bounds[i])
    finally:
        _FORK_STATE.clear()
    return _joined(parts)


def _encode_part(i: int) -> Encoded:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; and no warning about the fork
    st = _FORK_STATE
    a, b = st["bounds"][i], st["bounds"][i + 1]
    return _encode_checked(st["live"][a:b], st["tokenizer"], st["settings"], st["renderer"], None, overlap=False)


def _joined(parts: list[Encoded]) -> Encoded:
    out = Encoded(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]),
                  np.concatenate([p.lengths for p in parts]), cut=np.concatenate([p.cut for p in parts]))
    offsets = np.cumsum([0] + [p.texts for p in parts])
    out.kept = np.concatenate([p.kept + offset for p, offset in zip(parts, offsets, strict=False)])
    for name in ("dropped_empty", "dropped_too_long", "truncated", "split_documents", "text_chunks", "split_rows",
                 "extra_samples", "lost_rows", "texts"):
        setattr(out, name, sum(getattr(p, name) for p in parts))
    out.lost_first = next((p.lost_first for p in parts if p.lost_first is not None), None)
    return out


def _render(chunk: list[Example], renderer: ChatRenderer | None, counts: Encoded) -> tuple[list[str], list[Any]]:
    texts: list[str] = []
    spans: list[list[tuple[int, int]] | None] = []
    for ex in chunk:
        if ex.text is not None:
            texts.append(ex.text)
            spans.append(None)
            continue
        rendered = renderer.conversation(ex)
        for sample in rendered.samples:
            texts.append(sample.text)
            spans.append(sample.spans)
        if rendered.own_turns:
            counts.split_rows += 1
            counts.extra_samples += len(rendered.samples) - 1
        if rendered.lost is not None:
            counts.lost_rows += 1
            if counts.lost_first is None:
                counts.lost_first = f"{ex.origin}, {rendered.lost}"
    return texts, spans


class _Labeler:
    """Turns tokenized chunks into labelled, truncated examples and counts every drop."""

    def __init__(self, tokenizer: Any, settings: EncodeSettings, *, rows_in: int, dropped_empty: int):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.bos_text = tokenizer.bos_token or ""
        self.eos_id = tokenizer.eos_token_id
        self.settings = settings
        self.out = Encoded(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
                           rows_in=rows_in, dropped_empty=dropped_empty)
        self.id_chunks: list[np.ndarray] = []
        self.label_chunks: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.kept: list[int] = []
        self.cut: list[bool] = []
        self.seen = 0  # texts labelled so far

    def add(self, enc: Any, texts: list[str], spans: list[Any]) -> None:
        if all(s is not None for s in spans) and (self.bos_id is None or all(
                t.startswith(self.bos_text) for t in texts)):
            self._add_conversations(enc, texts, spans)  # the usual chunk: the same result, in numpy
        else:
            self._add_rows(enc, texts, spans)

    def _add_rows(self, enc: Any, texts: list[str], spans: list[Any]) -> None:
        """Row by row: text examples (eos, BOS, text_chunking: split) and conversations that need a BOS added."""
        out, bos_id, L = self.out, self.bos_id, self.settings.max_seq_len
        drop, train_all = self.settings.truncation == "drop", self.settings.train_on_inputs
        chunk_ids: list[int] = []
        chunk_labels: list[int] = []
        base = self.seen
        self.seen += len(texts)
        for i, (ids, ranges) in enumerate(_token_ranges(self.tokenizer, enc, texts, spans)):
            if ranges is None:  # text: every token, then EOS so the model learns to stop
                ids = ids + [self.eos_id]
                if bos_id is not None:
                    ids = [bos_id] + ids
                if self.settings.text_chunking == "split" and len(ids) > L:
                    before = len(self.lengths)
                    self._add_chunks(ids, chunk_ids, chunk_labels)
                    self.kept += [base + i] * (len(self.lengths) - before)
                    self.cut += [False] * (len(self.lengths) - before)
                    continue
                labels = list(ids)
            else:
                if bos_id is not None and not texts[i].startswith(self.bos_text):
                    ids = [bos_id] + ids
                    ranges = [(a + 1, b + 1) for a, b in ranges]
                if train_all:
                    labels = list(ids)
                else:
                    labels = [IGNORE_INDEX] * len(ids)
                    for a, b in ranges:
                        labels[a:b] = ids[a:b]
            truncated = len(ids) > L
            if truncated:
                if drop:
                    out.dropped_too_long += 1
                    continue
                ids, labels = ids[:L], labels[:L]
            labels[0] = IGNORE_INDEX
            if labels.count(IGNORE_INDEX) == len(labels):
                if truncated:
                    out.dropped_too_long += 1
                else:
                    out.dropped_empty += 1
                continue
            out.truncated += truncated
            chunk_ids += ids
            chunk_labels += labels
            self.lengths.append(len(ids))
            self.kept.append(base + i)
            self.cut.append(truncated)
        self.id_chunks.append(np.array(chunk_ids, dtype=np.int32))
        self.label_chunks.append(np.array(chunk_labels, dtype=np.int32))

    def _add_conversations(self, enc: Any, texts: list[str], spans: list[Any]) -> None:
        """`add` for a chunk of conversations that need no BOS added, on flat arrays instead of per-token lists:
        label the assistant ranges, cut (or drop) rows longer than max_seq_len, never train position 0, and drop
        rows left with nothing to train, counting each as `add` does."""
        out, L = self.out, self.settings.max_seq_len
        all_ids = enc[0]
        n = len(all_ids)
        lengths = np.fromiter(map(len, all_ids), np.int64, count=n)
        flat = np.fromiter(chain.from_iterable(all_ids), np.int32, count=int(lengths.sum()))
        starts = np.zeros(n, np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        if self.settings.train_on_inputs:
            labels = flat.copy()
        else:
            labels = np.full(len(flat), IGNORE_INDEX, np.int32)
            for start, (_, ranges) in zip(starts.tolist(), _token_ranges(self.tokenizer, enc, texts, spans),
                                          strict=True):
                for a, b in ranges:
                    labels[start + a:start + b] = flat[start + a:start + b]
        labels[starts[lengths > 0]] = IGNORE_INDEX  # nothing predicts a row's first token
        row = np.repeat(np.arange(n), lengths)
        kept_len = np.minimum(lengths, L)
        in_row = (np.arange(len(flat)) - starts[row]) < kept_len[row]
        trained = np.bincount(row[(labels != IGNORE_INDEX) & in_row], minlength=n)
        truncated = lengths > L
        too_long = truncated & ((trained == 0) | (self.settings.truncation == "drop"))
        keep = ~too_long & (trained > 0)
        out.dropped_too_long += int(too_long.sum())
        out.dropped_empty += int((~truncated & (trained == 0)).sum())
        out.truncated += int((truncated & keep).sum())
        take = in_row & keep[row]
        self.id_chunks.append(flat[take])
        self.label_chunks.append(labels[take])
        self.lengths += kept_len[keep].tolist()
        self.kept += (self.seen + np.flatnonzero(keep)).tolist()
        self.seen += n
        self.cut += truncated[keep].tolist()

    def _add_chunks(self, ids: list[int], chunk_ids: list[int], chunk_labels: list[int]) -> None:
        """text_chunking: split: a long document becomes chunks of max_seq_len tokens, each starting text_overlap
        tokens before the previous one ended. Those repeated tokens are context only (label -100), and so is each
        chunk's first token (nothing in the row predicts it), so every token is trained at most once (with an
        overlap, every token but the document's first exactly once). A last chunk of a single token would train
        nothing: it starts one token earlier, so the document's end (eos) is always trained."""
        L, overlap = self.settings.max_seq_len, self.settings.text_overlap
        start, count = 0, 0
        while True:
            context = max(1, overlap) if start else 1
            if start and len(ids) - start == 1:  # only without overlap: a lone last token nothing would predict
                start -= 1
            piece = ids[start:start + L]
            labels = [IGNORE_INDEX] * context + piece[context:]
            chunk_ids += piece
            chunk_labels += labels
            self.lengths.append(len(piece))
            count += 1
            if start + L >= len(ids):
                break
            start += L - overlap
        self.out.split_documents += 1
        self.out.text_chunks += count

    def result(self) -> Encoded:
        out = self.out
        if self.id_chunks:
            out.ids, out.labels = np.concatenate(self.id_chunks), np.concatenate(self.label_chunks)
        out.lengths = np.array(self.lengths, dtype=np.int64)
        out.kept = np.array(self.kept, dtype=np.int64)
        out.cut = np.array(self.cut, dtype=bool)
        out.texts = self.seen
        return out


def _token_ranges(tokenizer: Any, enc: tuple[list[list[int]], list[Any] | None], texts: list[str], spans: list[Any]):
    """Yield (token ids, token ranges of the assistant spans, or None for a text example) per text."""
    all_ids, encodings = enc
    for i, ids in enumerate(all_ids):
        if spans[i] is None:
            yield ids, None
            continue
        text, n = texts[i], len(ids)
        if encodings is not None:
            e = encodings[i]
            ranges = [(_first_token_at(e, a, len(text), n), _first_token_at(e, b, len(text), n)) for a, b in spans[i]]
        else:  # a slow tokenizer has no offsets: count the tokens of each prefix instead
            ranges = [(_count_tokens(tokenizer, text[:a]), _count_tokens(tokenizer, text[:b])) for a, b in spans[i]]
        yield ids, ranges


def _first_token_at(e: Any, c: int, text_len: int, n: int) -> int:
    """Index of the first token whose first character is at or after character c."""
    pos = c
    while pos < text_len:
        t = e.char_to_token(pos)
        if t is not None:
            return t if e.token_to_chars(t)[0] >= c else t + 1
        pos += 1  # characters that belong to no token (trimmed whitespace): look further
    return n


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0
