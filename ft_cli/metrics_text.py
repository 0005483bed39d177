"""Scores of generated text against references, as used by `ft eval --generate N`.

- exact_match: fraction of predictions equal to their reference after stripping surrounding whitespace (0..1).
- rouge_l: mean ROUGE-L F1 (rouge-score, with its default tokenizer and the Porter stemmer) (0..1).
- bleu, chrf: corpus BLEU and chrF from sacrebleu with its defaults (0..100, sacrebleu's convention).
"""

from __future__ import annotations

from ft_cli.errors import UserError

GENERATION_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise UserError(f"--generate needs the eval extras ({exc.name} is missing): pip install 'ft-cli[eval]'") \
            from None
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    return {
        "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(preds),
        "rouge_l": sum(rouge) / len(rouge),
        "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
    }
