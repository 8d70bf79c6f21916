"""ScienceQA accuracy on multiple-choice letters: overall and on the questions with an image (IMG).

Inputs (ScienceQA's release, as LLaVA uses it):
- `--base-dir` holding `problems.json` (`{pid: {"choices": [...], "answer": index, "image": name or
  null, ...}}`) and `pid_splits.json` (`{"test": [pid, ...], ...}`);
- `--result-file`: LLaVA answers jsonl (`{"question_id": pid, "text": reply, ...}`), e.g. from
  `llava.eval.model_vqa_science --single-pred-prompt`.
Every problem of the split is scored; one without a reply counts as wrong (`missing`). A reply is read
with `parse_choice_letter` ("A", "A.", "(A) text", "The answer is A"); a letter past the problem's
choices is wrong. IMG accuracy counts only problems whose `image` is set, the paper's SQA column.

Usage:
    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file answers.jsonl \
        [--split test] [--output-file per_question.json] [--output-result metrics.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import load_json, parse_choice_letter, pct, read_jsonl, report

logger = logging.getLogger(__name__)


def grade_science_qa(
    problems: Mapping[str, Mapping[str, Any]], split_ids: Sequence[str], predictions: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One record per problem of the split: {"question_id", "reply", "pred", "answer", "correct", "is_multimodal"}.

    `pred` and `answer` are letters ("A"...); `pred` is None when the reply names no valid choice.
    """
    graded = []
    for pid in split_ids:
        problem = problems[pid]
        reply = predictions.get(pid)
        letter = None if reply is None else parse_choice_letter(reply, len(problem["choices"]))
        answer = chr(ord("A") + int(problem["answer"]))
        graded.append({
            "question_id": pid,
            "reply": reply,
            "pred": letter,
            "answer": answer,
            "correct": letter == answer,
            "is_multimodal": bool(problem.get("image")),
        })  # fmt: skip
    return graded


def score_science_qa(
    problems: Mapping[str, Mapping[str, Any]], split_ids: Sequence[str], predictions: Mapping[str, str]
) -> dict[str, Any]:
    """Overall and IMG accuracy (fractions) of `predictions` (pid -> reply) over the split's problems."""
    graded = grade_science_qa(problems, split_ids, predictions)
    img = [g for g in graded if g["is_multimodal"]]
    correct, img_correct = sum(g["correct"] for g in graded), sum(g["correct"] for g in img)
    missing = sum(g["reply"] is None for g in graded)
    if missing:
        logger.warning("ScienceQA: %d of %d problems have no reply; counted as wrong", missing, len(graded))
    return {
        "accuracy": correct / len(graded) if graded else 0.0,
        "img_accuracy": img_correct / len(img) if img else 0.0,
        "correct": correct,
        "total": len(graded),
        "img_correct": img_correct,
        "img_total": len(img),
        "missing": missing,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="LLaVA answers jsonl")
    parser.add_argument("--split", default="test", help="key of pid_splits.json to score")
    parser.add_argument("--output-file", default=None, help="write the per-problem grading json here")
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    base = Path(args.base_dir)
    problems = load_json(base / "problems.json")
    split_ids = [str(pid) for pid in load_json(base / "pid_splits.json")[args.split]]
    predictions = {str(a["question_id"]): a["text"] for a in read_jsonl(args.result_file)}
    metrics = score_science_qa(problems, split_ids, predictions)
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        graded = grade_science_qa(problems, split_ids, predictions)
        Path(args.output_file).write_text(json.dumps(graded, indent=1), encoding="utf-8")
    report(metrics, args.output_result)
    print(
        f"ScienceQA {args.split}: total {metrics['total']}, accuracy {pct(metrics['accuracy'])}%, "
        f"IMG-accuracy {pct(metrics['img_accuracy'])}% ({metrics['img_total']} problems)"
    )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
