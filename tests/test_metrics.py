"""Task metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from alter_ds.metrics import score


def test_accuracy_and_exact_match_normalise_case_and_space():
    assert score(
        "accuracy", ["Positive ", "negative", "positive"], ["positive", "negative", "negative"]
    ) == pytest.approx(200 / 3)
    assert score("exact_match", ["Hola  mundo", "x"], ["hola mundo", "y"]) == 50.0


def test_macro_f1_by_hand():
    # class a: tp=1 fp=1 fn=0 -> f1 2/3; class b: tp=1 fp=0 fn=1 -> f1 2/3; mean 2/3
    assert score("macro_f1", ["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(200 / 3)


def test_generation_metrics():
    assert score("rouge_l", ["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    # LCS "the cat" of 2 tokens: precision 2/2, recall 2/3 -> F 0.8
    assert score("rouge_l", ["the cat"], ["the cat sat"]) == pytest.approx(80.0)
    assert score("chrf", ["buenos dias"], ["buenos dias"]) == pytest.approx(100.0)
    assert 0 < score("chrf", ["buenas"], ["buenos dias"]) < 100


def test_bad_metric_calls():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        score("accuracy", ["a"], ["a", "b"])
