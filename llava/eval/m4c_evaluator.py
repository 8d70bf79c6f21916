"""The standard VQA answer normalisation and soft accuracy (as used by TextVQA / VQAv2 / M4C).

Both the prediction and every human answer go through `normalize_vqa_answer`, in this order:
1. lowercase; drop "," and "?"; split the possessive "'s" off its word ("man's" -> "man 's");
   newlines and tabs become spaces;
2. punctuation: each mark in `PUNCTUATION` is deleted when it touches a space somewhere in the answer
   (or the answer has a digit-comma-digit), otherwise it becomes a space ("coca-cola" -> "coca cola");
   a period is deleted unless a digit follows it ("3.5" stays, "yes." -> "yes"), which is what the
   official regular expression does in practice;
3. per word: number words zero..ten (and "none") become digits, the articles a/an/the are dropped,
   and a contraction written without its apostrophes gets them back ("dont" -> "don't").

`vqa_accuracy` is min(#humans who gave the answer / 3, 1) averaged over the n leave-one-annotator-out
subsets of the n (10) human answers, as in the official metric.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each character is one mark
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# Contractions as they should read; every spelling with some apostrophes missing maps back to them.
# Forms whose apostrophe-less spelling is a common word ("we'll" -> "well", "it's" -> "its") are
# deliberately absent, as in the official table.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've",
    "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
    "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've",
    "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've",
    "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've",
    "you'll", "you're", "you've",
)  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes removed."""
    parts = word.split("'")  # n apostrophes -> n + 1 parts
    variants = []
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        if all(keep):
            continue
        joined = parts[0]
        for part, kept in zip(parts[1:], keep):
            joined += ("'" if kept else "") + part
        variants.append(joined)
    return variants


CONTRACTIONS = {variant: word for word in _CONTRACTIONS for variant in _apostrophe_variants(word)}


def _process_punctuation(text: str) -> str:
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test reads the input text, not the partly cleaned one, as the official processor does.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or glued else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The standard VQA answer normalisation (see the module docstring for the steps)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))


def vqa_answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct normalised human answer.

    score(a) = mean over the n subsets leaving one annotator out of min(#matches of a in subset / 3, 1).
    With n = 10 and m humans giving a: m = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.
    """
    if not gt_answers:
        raise ValueError("vqa_answer_scores needs at least one human answer")
    answers = [normalize_vqa_answer(a) for a in gt_answers]
    scores = {}
    for candidate in set(answers):
        per_subset = []
        for left_out in range(len(answers)):
            matches = sum(a == candidate for i, a in enumerate(answers) if i != left_out)
            per_subset.append(min(1.0, matches / 3.0))
        scores[candidate] = sum(per_subset) / len(per_subset)
    return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (both normalised)."""
    return vqa_answer_scores(gt_answers).get(normalize_vqa_answer(prediction), 0.0)
