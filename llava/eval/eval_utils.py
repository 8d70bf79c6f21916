"""Small helpers shared by the benchmark scorers (`llava.eval.eval_*`).

Design choices:
- Scorers are pure functions over plain Python data; the helpers here only read files, parse a
  multiple-choice letter leniently, and print / save a metrics dict, so every scorer's CLI looks the same.
- Fractions stay fractions (accuracy in [0, 1]) inside the library; the CLIs print percentages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# "A", "A.", "(A)", "A)", "A:"  (the whole reply is the letter)
_LETTER_ONLY = re.compile(r"\(?([A-Z])\)?[.:)]?")
# "A. cat", "(A) cat", "A) cat", "A: cat"  (a letter with punctuation, then the option's text)
_LETTER_LEAD = re.compile(r"\(?([A-Z])(?:\)|\.|:)\s")
# "The answer is A", "the answer is (B).", "Answer: C"  (case-insensitive words, capital letter)
_ANSWER_IS = re.compile(r"(?i:answer is|answer:)\s*\(?([A-Z])\b")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (LLaVA's answers format), skipping blank lines."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_choice_letter(text: str, num_choices: int) -> str | None:
    """The option letter a reply names, or None when it names none of the first `num_choices` letters.

    A lenient reading, used only by `eval_science_qa --lenient`: accepts "A", "A.", "(A)", "A) text",
    "A. text", "The answer is A" (any trailing punctuation); several "answer is" letters that disagree
    give None. It accepts replies that LLaVA's official ScienceQA rule counts as wrong ("A.", "(A)",
    "Answer: A"), so accuracies read with it are not comparable with published numbers.
    """
    text = text.strip()
    valid = {chr(ord("A") + i) for i in range(num_choices)}
    match = _LETTER_ONLY.fullmatch(text) or _LETTER_LEAD.match(text)
    if match:
        letter = match.group(1)
    else:
        letters = set(_ANSWER_IS.findall(text))
        letter = letters.pop() if len(letters) == 1 else None
    return letter if letter in valid else None


def report(metrics: Mapping[str, Any], output_result: str | None = None) -> None:
    """Print `metrics` as indented JSON and, when asked, write it to `output_result`."""
    text = json.dumps(metrics, indent=2, sort_keys=False)
    print(text)
    if output_result:
        path = Path(output_result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def pct(fraction: float) -> float:
    """A fraction as a percentage rounded to 2 decimals, for the printed summaries."""
    return round(100.0 * fraction, 2)
