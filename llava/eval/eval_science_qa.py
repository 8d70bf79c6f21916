"""ScienceQA accuracy on multiple-choice letters: overall and on the questions with an image (IMG).

Inputs (ScienceQA's release, as LLaVA uses it):
- `--base-dir` holding `problems.json` (`{pid: {"choices": [...], "answer": index, ...}}`) and
  `pid_splits.json` (`{"test": [pid, ...], ...}`);
- `--result-file`: LLaVA answers jsonl (`{"question_id": pid, "prompt": ..., "text": reply, ...}`),
  e.g. from `llava.eval.model_vqa_science --single-pred-prompt`.

Scoring follows LLaVA's `llava/eval/eval_science_qa.py`, so the numbers are the published ones:
- a reply is read by `parse_science_qa_reply`: exactly "A" (a letter A-E), "A. " at its start, or
  exactly one match of the case-sensitive `The answer is ([A-Z]).` ("." is any character); anything
  else, or a letter past the problem's choices, is wrong;
- a problem is in the IMG subset when its result's `prompt` contains `<image>`;
- every problem of the split counts in the overall accuracy; one without a reply is wrong there and,
  having no prompt, is left out of the IMG subset (LLaVA gives it the prompt "Unknown"); how many
  had no reply is logged and reported as `missing`.
`--lenient` reads replies with `eval_utils.parse_choice_letter` instead ("A.", "(A) text", "Answer: A",
...): a diagnostic only, NOT comparable with published numbers.

Usage:
    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file answers.jsonl \
        [--split test] [--lenient] [--output-file per_question.json] [--output-result metrics.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import load_json, parse_choice_letter, pct, read_jsonl, report

logger = logging.getLogger(__name__)

# LLaVA's `--options` default: the letters its first two rules accept, whatever the problem's choices.
SQA_OPTIONS = ("A", "B", "C", "D", "E")
# LLaVA's pattern verbatim: case-sensitive, and the final "." matches any character but a newline.
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
IMAGE_TAG = "<image>"


def parse_science_qa_reply(text: str, num_choices: int) -> str | None:
    """The letter LLaVA's ScienceQA script reads from `text`, or None where it reads none (FAILED).

    A letter outside the problem's first `num_choices` options is None (LLaVA's index -1: wrong).
    """
    if text in SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SQA_OPTIONS[:num_choices] else None


def grade_science_qa(
    problems: Mapping[str, Mapping[str, Any]],
    split_ids: Sequence[str],
    results: Mapping[str, Mapping[str, Any]],
    lenient: bool = False,
) -> list[dict[str, Any]]:
    """One record per problem of the split: {"question_id", "reply", "pred", "answer", "correct", "is_multimodal"}.

    `results` maps pid to its answers-file line (needs "text" and "prompt"). `pred` and `answer` are
    letters ("A"...); `pred` is None when the reply names no valid choice.
    """
    parse = parse_choice_letter if lenient else parse_science_qa_reply
    graded = []
    for pid in split_ids:
        problem = problems[pid]
        result = results.get(pid)
        reply = None if result is None else result["text"]
        letter = None if reply is None else parse(reply, len(problem["choices"]))
        answer = SQA_OPTIONS[int(problem["answer"])]
        graded.append({
            "question_id": pid,
            "reply": reply,
            "pred": letter,
            "answer": answer,
            "correct": letter == answer,
            "is_multimodal": result is not None and IMAGE_TAG in result["prompt"],
        })  # fmt: skip
    return graded


def score_science_qa(
    problems: Mapping[str, Mapping[str, Any]],
    split_ids: Sequence[str],
    results: Mapping[str, Mapping[str, Any]],
    lenient: bool = False,
) -> dict[str, Any]:
    """Overall and IMG accuracy (fractions) of `results` (pid -> answers-file line) over the split's problems."""
    graded = grade_science_qa(problems, split_ids, results, lenient)
    img = [g for g in graded if g["is_multimodal"]]
    correct, img_correct = sum(g["correct"] for g in graded), sum(g["correct"] for g in img)
    missing = sum(g["reply"] is None for g in graded)
    if missing:
        logger.warning(
            "ScienceQA: %d of %d problems have no reply; wrong overall and left out of IMG, as in LLaVA",
            missing,
            len(graded),
        )
    return {
        "accuracy": correct / len(graded) if graded else 0.0,
        "img_accuracy": img_correct / len(img) if img else 0.0,
        "correct": correct,
        "total": len(graded),
        "img_correct": img_correct,
        "img_total": len(img),
        "missing": missing,
        "lenient": lenient,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="LLaVA answers jsonl")
    parser.add_argument("--split", default="test", help="key of pid_splits.json to score")
    parser.add_argument(
        "--lenient",
        action="store_true",
        help="read replies leniently ('A.', '(A) text', 'Answer: A'); NOT comparable with published numbers",
    )
    parser.add_argument("--output-file", default=None, help="write the per-problem grading json here")
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    base = Path(args.base_dir)
    problems = load_json(base / "problems.json")
    split_ids = [str(pid) for pid in load_json(base / "pid_splits.json")[args.split]]
    # A repeated question id keeps its last line, as in LLaVA's dict.
    results = {str(a["question_id"]): a for a in read_jsonl(args.result_file)}
    metrics = score_science_qa(problems, split_ids, results, args.lenient)
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        graded = grade_science_qa(problems, split_ids, results, args.lenient)
        Path(args.output_file).write_text(json.dumps(graded, indent=1), encoding="utf-8")
    report(metrics, args.output_result)
    print(
        f"ScienceQA {args.split}{' (lenient: not comparable)' if args.lenient else ''}: "
        f"total {metrics['total']}, accuracy {pct(metrics['accuracy'])}%, "
        f"IMG-accuracy {pct(metrics['img_accuracy'])}% ({metrics['img_total']} problems)"
    )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
