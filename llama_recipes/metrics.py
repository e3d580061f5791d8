"""Text and classification metrics that work offline and equal their reference implementations.

ROUGE comes from Google's `rouge_score` package (the implementation `evaluate`'s "rouge" wraps),
called directly because `evaluate.load("rouge")` fetches its script from the Hub. Exact match
and token F1 follow the SQuAD v1.1 evaluation script (normalised answers). Scores are 0-1.
"""
import re
import string
from collections import Counter

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (SQuAD)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over the pairs (rouge_score's scorer, its default tokenizer).

    `evaluate`'s rouge reports the bootstrap median of the same per-pair F-measures; the plain
    mean is deterministic and, for the whole set, what the bootstrap estimates.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


GENERATION_METRICS = ("rouge", "exact_match", "f1")


def generation_scores(predictions: list[str], references: list[str], which=GENERATION_METRICS) -> dict[str, float]:
    """The chosen generation metrics over prediction/reference pairs, each a mean over pairs."""
    n = max(len(predictions), 1)
    out: dict[str, float] = {}
    if "rouge" in which:
        out.update(rouge(predictions, references))
    if "exact_match" in which:
        out["exact_match"] = sum(map(exact_match, predictions, references)) / n
    if "f1" in which:
        out["f1"] = sum(map(token_f1, predictions, references)) / n
    return out


def classification_scores(predictions: list, references: list, labels: list | None = None) -> dict:
    """Accuracy, macro-F1 (mean over labels of per-label F1) and a confusion matrix.

    confusion_matrix[i][j] counts examples of true label labels[i] predicted as labels[j].
    """
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references, strict=True):
        matrix[index[r]][index[p]] += 1
    f1s = []
    for i in range(len(labels)):
        tp = matrix[i][i]
        fp = sum(matrix[r][i] for r in range(len(labels))) - tp
        fn = sum(matrix[i]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    n = max(len(references), 1)
    return {
        "accuracy": sum(matrix[i][i] for i in range(len(labels))) / n,
        "macro_f1": sum(f1s) / max(len(f1s), 1),
        "labels": [str(lab) for lab in labels],
        "confusion_matrix": matrix,
    }
