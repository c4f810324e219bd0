"""Answer extraction as LLM-Adapters does it, accuracy, and ROUGE for summaries."""

from __future__ import annotations

import re
from collections import Counter

from .prompts import candidate_labels

_NUMBER = re.compile(r"-?\d+\.?\d*")


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


def extract_number(text: str) -> float | None:
    """The last number in the text, commas removed (LLM-Adapters' math extraction)."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    if not numbers:
        return None
    try:
        return float(numbers[-1])
    except ValueError:
        return None


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
