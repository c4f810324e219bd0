"""Answer extraction as LLM-Adapters does it, accuracy, and ROUGE for summaries."""

from __future__ import annotations

import re
from collections import Counter

from .prompts import candidate_labels

# A number as models and GSM8K write them: a sign (ASCII or Unicode minus), thousands commas,
# a decimal part with or without a leading digit (".25"), or a fraction ("3/4").
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")
# Where an answer is stated: "The answer is 18", "answer: 18", GSM8K's "#### 18".
_STATED = re.compile(r"(?:answer\s*(?:is|:)|####)", re.IGNORECASE)


def extract_choice(record: dict, text: str) -> int | None:
    """Index of the first candidate label named in the generated text (LLM-Adapters: first match)."""
    labels = candidate_labels(record)
    # Longer labels first inside the alternation so "answer1" never shadows "answer10".
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(pattern, text)
    return labels.index(match.group(0)) if match else None


def best_constant_label(labels: list[int]) -> dict:
    """The trivial baseline of a multiple-choice accuracy: always giving the label that is most
    often right on these items (ties: the lowest label). {"label": k, "accuracy": percent}."""
    counts = Counter(labels)
    label = max(sorted(counts), key=lambda k: counts[k])
    return {"label": label, "accuracy": 100.0 * counts[label] / len(labels)}


def label_histogram(predictions: list[int | None]) -> dict[str, int]:
    """How often each label was predicted ("none": no label found in the output), by label."""
    counts = Counter("none" if p is None else str(p) for p in predictions)
    return dict(sorted(counts.items()))


def _numbers(text: str) -> list[float]:
    values = []
    for match in _NUMBER.finditer(text):
        token = match.group(0).replace(",", "").replace("\u2212", "-")
        if not any(c.isdigit() for c in token):
            continue
        numerator, _, denominator = token.partition("/")
        try:
            value = float(numerator)
            values.append(value / float(denominator) if denominator else value)
        except (ValueError, ZeroDivisionError):
            continue
    return values


def extract_number(text: str) -> float | None:
    """The answer a math response states: the first number after its last "the answer is",
    "answer:" or "####"; without such a phrase, the last number in the text (LLM-Adapters' rule).
    Thousands commas, "$", a Unicode minus, ".25" and fractions ("3/4" -> 0.75) are read."""
    stated = list(_STATED.finditer(text))
    if stated:
        after = _numbers(text[stated[-1].end():])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def math_correct(predicted: float | None, answer: float) -> bool:
    return predicted is not None and abs(predicted - answer) <= 1e-3


def accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, with stemming), in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    n = max(len(predictions), 1)
    return {key: 100.0 * value / n for key, value in totals.items()}
