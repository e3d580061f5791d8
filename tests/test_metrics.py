"""Generation and classification metrics equal their reference values on hand-written pairs."""
import pytest
from rouge_score import rouge_scorer

from llama_recipes.metrics import (
    classification_scores,
    exact_match,
    generation_scores,
    normalize_answer,
    rouge,
    token_f1,
)

PAIRS = [  # (prediction, reference)
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("The Cat.", "cat"),
    ("blue green red", "red green blue"),
    ("", "something"),
    ("eight", "8"),
    ("a quick brown fox jumps", "the quick brown dog jumps over"),
]


def test_normalize_and_exact_match():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert [exact_match(p, r) for p, r in PAIRS] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_token_f1_hand_computed():
    # "quick brown fox jumps" vs "quick brown dog jumps over": 3 common, P=3/4, R=3/5 -> F=2/3
    assert token_f1(*PAIRS[5]) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert token_f1("blue green red", "red green blue") == 1.0  # bag of tokens
    assert token_f1("", "something") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("eight", "8") == 0.0


def test_rouge_equals_rouge_score_and_hand_values():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    ours = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per_pair = [scorer.score(r, p) for p, r in PAIRS]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ours[k] == pytest.approx(sum(s[k].fmeasure for s in per_pair) / len(PAIRS), abs=1e-12)
    # by hand: "blue green red" vs "red green blue": all unigrams match; no bigram; LCS = 1 word
    one = rouge(["blue green red"], ["red green blue"])
    assert one["rouge1"] == pytest.approx(1.0) and one["rouge2"] == 0.0 and one["rougeL"] == pytest.approx(1 / 3)
    # "the cat sat on the mat" vs "the cat sat on a mat": rouge_score keeps articles; 5/6 unigrams
    first = rouge([PAIRS[0][0]], [PAIRS[0][1]])
    assert first["rouge1"] == pytest.approx(5 / 6) and first["rouge2"] == pytest.approx(3 / 5)


def test_generation_scores_selects_metrics():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    assert set(generation_scores(preds, refs)) == {"rouge1", "rouge2", "rougeL", "exact_match", "f1"}
    only = generation_scores(preds, refs, ["exact_match"])
    assert only == {"exact_match": pytest.approx(2 / 6)}


def test_classification_scores_hand_computed():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    s = classification_scores(preds, refs, labels=["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # per-label F1: a 2*2/(4+0+1)=0.8, b 2/(2+1+1)=0.5, c 2/(2+1+0)=2/3
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
