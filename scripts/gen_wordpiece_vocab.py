"""Train the built-in WordPiece vocabulary (builtin:tiny-bert, builtin:small-bert) on ft's corpus and write the
learned tokens to ft_cli/builtin_wordpiece.txt, which ft ships and builds from (ft_cli.builtin_tokenizers).

    python scripts/gen_wordpiece_vocab.py        # rewrites the file; commit it with a FORMAT_VERSION bump

tokenizers' WordPiece trainer breaks ties between equally frequent merges differently from run to run, so each run
of this script gives a slightly different vocabulary; ft builds from the shipped file so that every build is the
same. CJK characters are not written: the builder appends every one of them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import trainers

from ft_cli.builtin_corpus import corpus
from ft_cli.builtin_tokenizers import (
    _BPE_MIN_FREQUENCY,
    _BPE_VOCAB_SIZE,
    _CJK_RANGES,
    WORDPIECE_SPECIAL,
    wordpiece_tokenizer,
)

OUT = Path(__file__).resolve().parents[1] / "ft_cli" / "builtin_wordpiece.txt"


def main() -> None:
    tok = wordpiece_tokenizer()
    cjk = [chr(c) for a, b in _CJK_RANGES for c in range(a, b)]  # in the alphabet, so they take no merges' place
    trainer = trainers.WordPieceTrainer(vocab_size=_BPE_VOCAB_SIZE + len(cjk), min_frequency=_BPE_MIN_FREQUENCY,
                                        special_tokens=list(WORDPIECE_SPECIAL), show_progress=False,
                                        initial_alphabet=cjk, limit_alphabet=len(cjk) + 1000)
    tok.train_from_iterator(corpus(), trainer=trainer)
    cjk = set(cjk)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in cjk]
    OUT.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens to {OUT}")


if __name__ == "__main__":
    main()
