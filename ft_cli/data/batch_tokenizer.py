"""The tokenizer call of ft's tokenizing pass (ft_cli.data.encode): a batch of texts per call to the fast tokenizer,
with what makes that call cheaper and is checked to change nothing. A leaf: no ft imports."""

from __future__ import annotations

import os
import unicodedata
from contextlib import contextmanager
from typing import Any

CHUNK = 1024  # texts per tokenizer call (ft_cli.data.encode): big enough for the tokenizer's threads


class BatchEncoder:
    """One tokenizer call per chunk -> (ids per text, tokenizers.Encoding per text or None for slow tokenizers).

    A fast tokenizer's own `__call__` only configures the Rust tokenizer (no truncation or padding, special
    tokens kept whole) and converts its output to lists; after the first call has done the configuring, the
    Rust `encode_batch` is called directly, once it gave the same ids on the first texts."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.checked = False
        self.unnormalized: Any = None  # a copy of the backend without its NFC normalizer (see `_nfc_free`)

    def __call__(self, texts: list[str]) -> tuple[list[list[int]], list[Any] | None]:
        if self.backend is not None:
            if not self.checked:
                self.checked = True
                expected = self._via_transformers(texts[:4])[0]
                encodings = self.backend.encode_batch(texts, add_special_tokens=False)
                if [e.ids for e in encodings[:4]] == expected:
                    self.unnormalized = self._nfc_free(texts)
                    return [e.ids for e in encodings], encodings
                self.backend = None  # the tokenizer class adds something of its own: always go through it
            else:
                backend = self.backend
                if self.unnormalized is not None and all(unicodedata.is_normalized("NFC", t) for t in texts):
                    backend = self.unnormalized
                encodings = backend.encode_batch(texts, add_special_tokens=False)
                return [e.ids for e in encodings], encodings
        return self._via_transformers(texts)

    def _nfc_free(self, texts: list[str]) -> Any:
        """Qwen's tokenizers (and ft's built-in ones) NFC-normalize every text, keeping an alignment per byte, which
        is 8 % of their time; on a text that is NFC already (unicodedata.is_normalized, a fast C check) it changes
        nothing, ids or offsets. For big data (a full first chunk) a copy of the backend without the normalizer
        tokenizes such chunks, once it gave the same ids and offsets on the first texts."""
        from tokenizers import Tokenizer, normalizers

        if len(texts) < CHUNK or type(self.backend.normalizer) is not normalizers.NFC:
            return None
        copy = Tokenizer.from_str(self.backend.to_str())
        copy.normalizer = None
        sample = [t for t in texts[:64] if unicodedata.is_normalized("NFC", t)]
        same = all(a.ids == b.ids and a.offsets == b.offsets for a, b in zip(
            self.backend.encode_batch(sample, add_special_tokens=False),
            copy.encode_batch(sample, add_special_tokens=False), strict=True))
        return copy if same and sample else None

    def _via_transformers(self, texts: list[str]) -> tuple[list[list[int]], list[Any] | None]:
        enc = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return enc["input_ids"], enc.encodings


@contextmanager
def tokenizer_threads():
    """Let the Rust tokenizer use all cores for the batched calls, then restore the caller's setting. (ft sets
    TOKENIZERS_PARALLELISM=false to keep forks safe; with it set explicitly, a fork after this stays silent.)"""
    key = "TOKENIZERS_PARALLELISM"
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ[key] = "false"
        else:
            os.environ[key] = before
