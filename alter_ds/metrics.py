"""Task metrics, each computed by a kept library: accuracy and macro-F1 (scikit-learn), ROUGE-L
(rouge-score), chrF (sacrebleu); exact match after whitespace and case normalisation. Scores are in [0, 100]."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sklearn.metrics import accuracy_score

    return 100.0 * float(accuracy_score([_normalise(r) for r in references], [_normalise(p) for p in predictions]))


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Macro-F1 over the reference labels (a prediction outside them counts as wrong for its reference)."""
    from sklearn.metrics import f1_score

    references_n = [_normalise(r) for r in references]
    labels = sorted(set(references_n))
    return 100.0 * float(
        f1_score(references_n, [_normalise(p) for p in predictions], labels=labels, average="macro", zero_division=0)
    )


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
    return 100.0 * hits / max(len(references), 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {sorted(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return METRICS[metric](predictions, references)
