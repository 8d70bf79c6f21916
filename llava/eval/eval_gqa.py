"""GQA accuracy as in LLaVA-1.5's GQA protocol: LLaVA's conversion, then GQA's official exact match.

LLaVA converts its answers with `scripts/convert_gqa_for_eval.py` (`text.rstrip('.').lower()`: no
whitespace trimming) and runs GQA's official `eval.py`, whose accuracy is exact match of that
prediction with the raw gold `answer`, over the questions with `isBalanced` true. This module does
both steps. Inputs:
- predictions: LLaVA answers jsonl (`{"question_id", "prompt", "text", ...}` per line), converted
  here, or the converted json (`[{"questionId", "prediction"}, ...]`), used as it is;
- questions: GQA's `testdev_balanced_questions.json` (`{qid: {"answer", "isBalanced", "types"}}`).
A question file without any `isBalanced` key is scored whole (and a warning says so). A balanced
question without a prediction counts as wrong and is reported under `missing`, where the official
script refuses to score an incomplete file. Accuracy per structural type (verify, query, choose,
logical, compare) is added when the questions carry `types`.

Usage:
    python -m llava.eval.eval_gqa --question-file testdev_balanced_questions.json \
        --result-file answers/merge.jsonl [--convert-to testdev_balanced_predictions.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import load_json, pct, read_jsonl, report

logger = logging.getLogger(__name__)


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's conversion of a reply: trailing periods dropped, lowercased ("Yes." -> "yes", " a. " kept)."""
    return text.rstrip(".").lower()


def convert_gqa_for_eval(answers: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """LLaVA answers -> GQA's submission format `[{"questionId", "prediction"}]` (converted)."""
    return [
        {"questionId": str(a["question_id"]), "prediction": normalize_gqa_answer(a["text"])} for a in answers
    ]


def load_gqa_predictions(path: str | Path) -> dict[str, str]:
    """Converted predictions by question id, from a LLaVA answers jsonl or a `[{"questionId", ...}]` json."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
    records = load_json(path) if head == "[" else convert_gqa_for_eval(read_jsonl(path))
    return {str(p["questionId"]): p["prediction"] for p in records}


def gqa_accuracy(
    predictions: Mapping[str, str], questions: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Exact-match accuracy of converted `predictions` over the balanced questions of `questions`.

    Returns {"accuracy", "correct", "total", "missing", "unbalanced", "by_type"}; accuracies are
    fractions, `unbalanced` the questions left out. Predictions for ids absent from `questions` are
    an error (the wrong question file, most likely).
    """
    unknown = [qid for qid in predictions if qid not in questions]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have no question in the question file, e.g. {unknown[:3]}"
        )
    if any("isBalanced" in q for q in questions.values()):
        scored = {qid: q for qid, q in questions.items() if q.get("isBalanced")}
    else:
        logger.warning(
            "GQA: the question file has no isBalanced key; scoring all %d questions", len(questions)
        )
        scored = dict(questions)
    correct, missing = 0, 0
    type_hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # type -> [correct, total]
    for qid, question in scored.items():
        if qid in predictions:
            hit = predictions[qid] == question["answer"]
        else:
            hit, missing = False, missing + 1
        correct += hit
        structural = question.get("types", {}).get("structural")
        if structural:
            type_hits[structural][0] += hit
            type_hits[structural][1] += 1
    total = len(scored)
    if missing:
        logger.warning("GQA: %d of %d questions have no prediction; counted as wrong", missing, total)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "missing": missing,
        "unbalanced": len(questions) - total,
        "by_type": {t: c / n for t, (c, n) in sorted(type_hits.items())},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--question-file",
        "--annotation-file",
        dest="question_file",
        required=True,
        help="GQA questions json, e.g. testdev_balanced_questions.json",
    )
    parser.add_argument(
        "--result-file",
        required=True,
        help="LLaVA answers jsonl, or converted [{questionId, prediction}] json",
    )
    parser.add_argument(
        "--convert-to",
        default=None,
        help="also write the predictions in GQA's submission format to this path",
    )
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    predictions = load_gqa_predictions(args.result_file)
    if args.convert_to:
        converted = [{"questionId": q, "prediction": p} for q, p in predictions.items()]
        Path(args.convert_to).parent.mkdir(parents=True, exist_ok=True)
        Path(args.convert_to).write_text(json.dumps(converted), encoding="utf-8")
    metrics = gqa_accuracy(predictions, load_json(args.question_file))
    report(metrics, args.output_result)
    print(f"GQA accuracy: {pct(metrics['accuracy'])}% ({metrics['correct']}/{metrics['total']})")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
