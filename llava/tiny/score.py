"""Scoring of answers on the tiny world, per question family, and the markdown results table.

Design choices
- Short families (attribute, existence, counting, spatial, reading, and any other) score 1 for an exact
  match after normalisation: lowercase, punctuation and the articles a/an/the removed, number words
  zero..ten written as digits, whitespace collapsed ("Two." == "2", "The left" == "left").
- ``choice`` scores the option letter: "C", "C.", "(C)", "C) green" and "C. green" all read as C; a reply
  without a letter counts if it equals the correct option's text (records carry ``options``).
- ``describe`` scores the F1 between the sets of scene facts stated in the prediction and in the reference
  answer: for each object named by its colour and shape, the facts (object exists), (its size) and (its
  position), plus one fact for the text (the word or number written, or that there is none). Facts are read
  with the phrases the world's descriptions use (``world.POSITIONS``, sizes, colours, shapes), so the
  reference's own facts come from the same parser and the measure needs no scene metadata.
- Accuracies are fractions in [0, 1]; "overall" is the mean over all questions (the test split balances
  families, so it is close to the mean over families); tables print percentages.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

from llava.tiny.questions import FAMILIES
from llava.tiny.scenes import COLORS, POSITIONS, SHAPES, SIZES

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_LETTER = re.compile(r"^\(?([A-E])(?:[.):]|\s|$)")
_POS = "|".join(sorted((re.escape(p) for p in POSITIONS.values()), key=len, reverse=True))
_OBJECT = re.compile(
    rf"\b(?:({'|'.join(SIZES)})\s+)?({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(?:e?s)?\b(?:\s+({_POS})\b)?"
)
_TEXT = re.compile(r'\b(?:word|number)\s+"([^"]*)"')
_NO_TEXT = re.compile(r"\bno (?:text|words?|numbers?)\b")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words -> digits, collapse whitespace."""
    words = text.lower().translate(_PUNCT).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def choice_letter(prediction: str) -> str | None:
    """The option letter a reply starts with ("C", "C.", "(C)", "C. green"), or None."""
    m = _LETTER.match(prediction.strip())
    return m.group(1) if m else None


def description_facts(text: str) -> set[tuple]:
    """Facts stated in a description: (object|size|position, colour, shape[, value]) and (text, value)."""
    facts: set[tuple] = set()
    lowered = text.lower()
    for size, color, shape, position in _OBJECT.findall(lowered):
        facts.add(("object", color, shape))
        if size:
            facts.add(("size", color, shape, size))
        if position:
            facts.add(("position", color, shape, position))
    facts.update(("text", value) for value in _TEXT.findall(lowered))
    if _NO_TEXT.search(lowered):
        facts.add(("text", None))
    return facts


def fact_f1(predicted: set, reference: set) -> float:
    """F1 of two fact sets (1.0 when both are empty)."""
    if not predicted and not reference:
        return 1.0
    hits = len(predicted & reference)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(reference)
    return 2 * precision * recall / (precision + recall)


def score_answer(family: str, prediction: str, record: dict) -> float:
    """Score in [0, 1] of `prediction` for a val/test `record` (fields "answer", and "options" for choice)."""
    answer = record["answer"]
    if family == "describe":
        return fact_f1(description_facts(prediction), description_facts(answer))
    if family == "choice":
        letter = choice_letter(prediction)
        if letter is not None:
            return float(letter == answer.strip().upper())
        options = record.get("options")
        if options:
            correct = options["ABCDE".index(answer.strip().upper())]
            return float(normalize(prediction) == normalize(correct))
        return 0.0
    return float(normalize(prediction) == normalize(answer))


def summarize(results: list[dict]) -> dict[str, dict]:
    """{family: {"n", "accuracy"}} plus "overall", in `FAMILIES` order then any other family by name.

    Each result needs "family" and either "score" or "prediction" with the record's "answer" (and "options").
    """
    scores: dict[str, list[float]] = defaultdict(list)
    for r in results:
        score = r["score"] if "score" in r else score_answer(r["family"], r["prediction"], r)
        scores[r["family"]].append(float(score))
    order = [f for f in FAMILIES if f in scores] + sorted(set(scores) - set(FAMILIES))
    summary = {f: {"n": len(scores[f]), "accuracy": sum(scores[f]) / len(scores[f])} for f in order}
    every = [s for f in order for s in scores[f]]
    summary["overall"] = {"n": len(every), "accuracy": sum(every) / len(every) if every else 0.0}
    return summary


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per model, one column per family (accuracy in %) and "overall" last."""
    present = {f for summary in rows.values() for f in summary if f != "overall"}
    columns = [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES)) + ["overall"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, summary in rows.items():
        cells = [f"{100 * summary[c]['accuracy']:.1f}" if c in summary else "-" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
