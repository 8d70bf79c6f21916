"""POPE: accuracy, precision, recall, F1 and yes-ratio per split (adversarial, popular, random).

Inputs (LLaVA's layout):
- results: LLaVA answers jsonl (`{"question_id", "text", ...}`);
- question file: `llava_pope_test.jsonl`, whose `category` names each question's split (a result may
  also carry `category` itself, or in its `metadata`);
- annotation dir: POPE's `coco_pope_{split}.json` files, one json object a line
  (`{"question_id", "image", "text", "label": "yes" | "no"}`).
Within a split, results meet labels by `question_id` when both sides carry the same set of ids, and
otherwise by order, as LLaVA's script does (results in question-file order, equal counts required).
A reply means "no" when its first sentence has the word "no", "No" or "not" (LLaVA's rule; commas
are dropped first), and "yes" otherwise, an empty reply included. Precision, recall or F1 with a zero
denominator are reported as 0. `mean` averages each metric over the splits; the paper's POPE column
is the mean F1.

Usage:
    python -m llava.eval.eval_pope --annotation-dir pope/coco --question-file llava_pope_test.jsonl \
        --result-file answers.jsonl
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import pct, read_jsonl, report

logger = logging.getLogger(__name__)

_NO_WORDS = frozenset({"no", "No", "not"})
_LABEL_PREFIX, _LABEL_SUFFIX = "coco_pope_", ".json"


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE reading of a reply: "no" if its first sentence has the word no/No/not, else "yes"."""
    first_sentence = text.split(".")[0].replace(",", "")
    return "no" if _NO_WORDS.intersection(first_sentence.split(" ")) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Binary metrics with "yes" as the positive class; `predictions` are raw replies, `labels` yes/no."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(
            f"POPE needs equal, non-zero counts: {len(predictions)} predictions, {len(labels)} labels"
        )
    pred_yes = [pope_yes_no(p) == "yes" for p in predictions]
    label_yes = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and y for p, y in zip(pred_yes, label_yes))
    fp = sum(p and not y for p, y in zip(pred_yes, label_yes))
    tn = sum(not p and not y for p, y in zip(pred_yes, label_yes))
    fn = sum(not p and y for p, y in zip(pred_yes, label_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred_yes) / len(pred_yes),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "total": len(labels),
    }  # fmt: skip


def load_pope_labels(annotation_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Label lines of every `coco_pope_{split}.json` in `annotation_dir`, by split name."""
    files = sorted(Path(annotation_dir).glob(f"{_LABEL_PREFIX}*{_LABEL_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"no {_LABEL_PREFIX}<split>{_LABEL_SUFFIX} files in {annotation_dir}")
    return {f.name[len(_LABEL_PREFIX) : -len(_LABEL_SUFFIX)]: read_jsonl(f) for f in files}


def _split_of(result: Mapping[str, Any], questions: Mapping[str, Mapping[str, Any]]) -> str:
    if "category" in result:
        return result["category"]
    if "category" in (result.get("metadata") or {}):
        return result["metadata"]["category"]
    question = questions.get(str(result["question_id"]))
    if question is None or "category" not in question:
        raise ValueError(f"POPE result {result['question_id']!r} has no split: give the question file")
    return question["category"]


def _align(results: list[Mapping[str, Any]], labels: list[Mapping[str, Any]], split: str) -> list[str]:
    """The label of each result of one split, by question id when possible, else by order."""
    result_ids = [str(r["question_id"]) for r in results]
    label_by_id = {str(lab["question_id"]): lab["label"] for lab in labels}
    if len(set(result_ids)) == len(result_ids) == len(label_by_id) == len(labels) and set(result_ids) == set(
        label_by_id
    ):
        return [label_by_id[qid] for qid in result_ids]
    if len(results) != len(labels):
        raise ValueError(
            f"POPE split {split!r}: {len(results)} results but {len(labels)} labels, and ids differ"
        )
    return [lab["label"] for lab in labels]


def score_pope(
    results: Sequence[Mapping[str, Any]],
    labels_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    questions: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics per split (see `pope_metrics`) and their `mean` over splits.

    `questions` maps str(question_id) to the question-file entry (for its `category`).
    """
    questions = questions or {}
    by_split: dict[str, list[Mapping[str, Any]]] = {split: [] for split in labels_by_split}
    for result in results:
        split = _split_of(result, questions)
        if split not in by_split:
            raise ValueError(
                f"POPE result {result['question_id']!r} is in split {split!r}, which has no label file"
            )
        by_split[split].append(result)
    metrics: dict[str, Any] = {}
    for split, labels in labels_by_split.items():
        if not by_split[split]:
            logger.warning("POPE: no results for split %r; skipped", split)
            continue
        aligned = _align(by_split[split], list(labels), split)
        metrics[split] = pope_metrics([r["text"] for r in by_split[split]], aligned)
    if not metrics:
        raise ValueError("POPE: no split had results")
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    metrics["mean"] = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in keys}
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--annotation-dir", required=True, help="folder of coco_pope_{split}.json label files"
    )
    parser.add_argument("--question-file", default=None, help="llava_pope_test.jsonl (gives each split)")
    parser.add_argument("--result-file", required=True, help="LLaVA answers jsonl")
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    questions = (
        {str(q["question_id"]): q for q in read_jsonl(args.question_file)} if args.question_file else {}
    )
    metrics = score_pope(read_jsonl(args.result_file), load_pope_labels(args.annotation_dir), questions)
    report(metrics, args.output_result)
    for split, m in metrics.items():
        print(f"POPE {split}: F1 {pct(m['f1'])}  acc {pct(m['accuracy'])}  yes-ratio {pct(m['yes_ratio'])}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
