"""The standard VQA answer normalisation and soft accuracy (as used by TextVQA / VQAv2 / M4C).

Both the prediction and every human answer go through `normalize_vqa_answer`, in this order:
1. lowercase; drop "," and "?"; split the possessive "'s" off its word ("man's" -> "man 's");
   newlines and tabs become spaces;
2. punctuation: each mark in `PUNCTUATION` is deleted when it touches a space somewhere in the answer,
   otherwise it becomes a space ("coca-cola" -> "coca cola"); a period is deleted unless a digit
   follows it ("3.5" stays, "yes." -> "yes"), which is what the official regular expression does in
   practice, but only the first 32 of them (the official call's quirk);
3. per word: number words zero..ten (and "none") become digits, the articles a/an/the are dropped,
   and the official contraction table puts apostrophes back ("dont" -> "don't").

`vqa_accuracy` is min(#humans who gave the answer / 3, 1) averaged over the n leave-one-annotator-out
subsets of the n (10) human answers, as in the official metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each character is one mark
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# The official `EvalAIAnswerProcessor.CONTRACTIONS` verbatim, quirks included: "somebody'd" maps to
# "somebodyd", the capitalised keys never match (answers are lowercased first), and common words such
# as "well" or "its" are deliberately absent.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # The test reads the input text, not the partly cleaned one, as the official processor does.
        # (Its other test, a digit-comma-digit in the text, never fires: commas are already gone.)
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space else " ")
    # The official `PERIOD_STRIP.sub("", s, re.UNICODE)` passes re.UNICODE (32) as the count, so only
    # the first 32 such periods go; kept for parity with the published numbers.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


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
