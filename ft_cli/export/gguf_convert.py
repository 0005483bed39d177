"""Child process of `ft export --format gguf-*`: run llama.cpp's convert_hf_to_gguf.py and report what it did.

    python -m ft_cli.export.gguf_convert CONVERTER REPORT_JSON MODEL_DIR [converter arguments...]

Two things are added around the unchanged converter:
- Its tokenizer check identifies a BPE pre-tokenizer by hashing how the tokenizer splits a test string, against a
  table of known models. A tokenizer trained elsewhere (ft's built-in tiny models) is not in that table even when
  its pre-tokenizer is exactly a known one. When the hash is unknown, and only then, a tokenizer.json whose
  pre-tokenizer is literally Qwen2's (its split regex + byte-level, as llama.cpp's "qwen2" pre-type implements) is
  given "qwen2"; anything else still fails with the converter's own message.
- Every warning the converter logs (e.g. "falling back to F16" for a tensor whose rows q8_0 cannot split into
  blocks of 32) is collected into REPORT_JSON, so ft can say what was not quantized.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

# Qwen2's pre-tokenizer in tokenizer.json (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2 quotes this "original regex").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def known_pre_tokenizer(model_dir: Path) -> str | None:
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if spec.get("model", {}).get("type") != "BPE" or not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex")
            and (spec.get("normalizer") or {}).get("type", "NFC") == "NFC"):
        return "qwen2"
    return None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> int:
    converter, report_path, model_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(converter.parent))
    import conversion.base as base  # the converter's package, beside convert_hf_to_gguf.py

    report: dict[str, Any] = {"pre_tokenizer_rule": None}
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            res = known_pre_tokenizer(model_dir)
            if res is None:
                raise
            report["pre_tokenizer_rule"] = res
            return res

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    sys.argv = [str(converter), str(model_dir), *sys.argv[4:]]
    try:
        runpy.run_path(str(converter), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    report["warnings"] = collect.messages
    report["fell_back_to_f16"] = sum("falling back to F16" in m for m in collect.messages)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
