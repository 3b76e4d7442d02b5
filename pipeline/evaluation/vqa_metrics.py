"""VQA answer metrics: accuracy, macro F1 and WUPS (Malinowski & Fritz, NIPS 2014).

An answer is a comma-separated list of words ("chair, table"); it is compared as a SET of its stripped items, as in
the authors' evaluation script, so "table,chair" equals "chair, table". :func:`canonical_answer` is that set
written as one string (sorted items joined by ", "), which is also the class name of the answer classifier.

- **accuracy**: fraction of questions whose predicted answer set equals the true one.
- **F1 (macro)**: per answer class (a canonical answer string), F1 = 2 TP / (2 TP + FP + FN) over the questions,
  averaged over every class that occurs as a true or a predicted answer (scikit-learn's ``average="macro"`` on the
  label strings). A true answer the classifier cannot produce (absent from its vocabulary) is a class with F1 0.
- **WUPS@t** (t = 0.9 and 0.0): for prediction set A and truth set T,
  ``min(prod_{a in A} max_{x in T} mu(a, x), prod_{x in T} max_{a in A} mu(a, x))``, averaged over the questions,
  where ``mu(a, b) = 1`` for equal words, else ``s = max`` Wu-Palmer similarity over the noun synsets of a and b
  (0 when either has none) and ``mu = s`` when ``s >= t``, else ``0.1 * s``. WordNet comes from nltk, used only
  when nltk and its WordNet corpus are already installed; :func:`wordnet_similarity` says why otherwise.

All metrics are fractions in [0, 1] (the papers print WUPS and accuracy in percent).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

WUPS_THRESHOLDS = (0.9, 0.0)
WordSimilarity = Callable[[str, str], float]


def answer_items(answer: Any) -> frozenset[str]:
    """The set of an answer's comma-separated, stripped, non-empty items."""
    return frozenset(part.strip() for part in str(answer).split(",") if part.strip())


def canonical_answer(answer: Any) -> str:
    """An answer as its sorted distinct items joined by ", ": equal sets give equal strings."""
    return ", ".join(sorted(answer_items(answer)))


def accuracy(predicted: Sequence[Any], truth: Sequence[Any]) -> float:
    _check(predicted, truth)
    return sum(answer_items(p) == answer_items(t) for p, t in zip(predicted, truth, strict=True)) / len(truth)


def macro_f1(predicted: Sequence[Any], truth: Sequence[Any]) -> float:
    """Macro F1 over the canonical answer classes that occur as a true or a predicted answer."""
    _check(predicted, truth)
    pred = [canonical_answer(p) for p in predicted]
    true = [canonical_answer(t) for t in truth]
    tp = Counter(p for p, t in zip(pred, true, strict=True) if p == t)
    pred_count, true_count = Counter(pred), Counter(true)
    classes = set(pred_count) | set(true_count)
    # 2TP / (2TP + FP + FN) with FP = predicted - TP and FN = true - TP
    return sum(2 * tp[c] / (pred_count[c] + true_count[c]) for c in classes) / len(classes)


def thresholded(similarity: WordSimilarity, threshold: float) -> WordSimilarity:
    """``mu`` of WUPS@threshold from a raw word similarity: 1 for equal words, down-weighted by 0.1 below it."""

    def mu(a: str, b: str) -> float:
        if a == b:
            return 1.0
        s = similarity(a, b)
        return s if s >= threshold else 0.1 * s

    return mu


def wups_score(predicted: Any, truth: Any, mu: WordSimilarity) -> float:
    """WUPS of one question: the fuzzy set agreement of the two answers' items under ``mu``."""
    a_set, t_set = answer_items(predicted), answer_items(truth)
    if not a_set and not t_set:
        return 1.0
    if not a_set or not t_set:
        return 0.0
    left = math.prod(max(mu(a, t) for t in t_set) for a in a_set)
    right = math.prod(max(mu(a, t) for a in a_set) for t in t_set)
    return min(left, right)


def wups(predicted: Sequence[Any], truth: Sequence[Any], threshold: float, similarity: WordSimilarity) -> float:
    """Mean WUPS@threshold over the questions (``similarity``: raw word similarity, e.g. :func:`wordnet_similarity`)."""
    _check(predicted, truth)
    mu = thresholded(similarity, threshold)
    return sum(wups_score(p, t, mu) for p, t in zip(predicted, truth, strict=True)) / len(truth)


def wordnet_similarity() -> tuple[WordSimilarity | None, str | None]:
    """``(similarity, None)`` with nltk's WordNet Wu-Palmer similarity, or ``(None, why not)``.

    Nothing is downloaded: the corpus must already be where nltk looks (e.g. ``~/nltk_data``,
    ``/usr/share/nltk_data``)."""
    try:
        from nltk.corpus import wordnet as wn
    except ImportError:
        return None, "nltk is not installed"
    try:
        wn.synsets("dog")
    except LookupError:
        return None, "nltk is installed but its WordNet corpus is not (nltk.download('wordnet'))"
    except Exception as exc:  # a corpus that is there but incomplete or unreadable (e.g. OSError: no index.sense)
        return None, f"nltk's WordNet corpus cannot be read ({type(exc).__name__}: {exc})"

    @cache
    def synsets(word: str) -> tuple:
        return tuple(wn.synsets(word, pos=wn.NOUN))

    @cache
    def similarity(a: str, b: str) -> float:
        best = 0.0
        for x in synsets(a):
            for y in synsets(b):
                best = max(best, x.wup_similarity(y) or 0.0)
        return best

    return similarity, None


def answer_metrics(predicted: Sequence[Any], truth: Sequence[Any],
                   similarity: WordSimilarity | None = None, why_no_wups: str | None = None) -> dict[str, Any]:
    """Accuracy, macro F1 and (with a word ``similarity``) WUPS@0.9 and WUPS@0.0 of predicted vs true answers."""
    out: dict[str, Any] = {"questions": len(truth), "accuracy": accuracy(predicted, truth),
                           "f1_macro": macro_f1(predicted, truth)}
    if similarity is None:
        out["wups"] = None
        out["wups_not_computed"] = f"WUPS not computed: {why_no_wups or 'no word similarity given'}"
    else:
        out["wups"] = {f"WUPS@{t}": wups(predicted, truth, t, similarity) for t in WUPS_THRESHOLDS}
    return out


def _check(predicted: Sequence[Any], truth: Sequence[Any]) -> None:
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} true answers")
    if not truth:
        raise ValueError("no questions to score")
