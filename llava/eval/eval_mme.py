"""MME perception and cognition scores, computed as MME's official `calculation.py` does.

Per subtask: acc = right questions / questions, acc+ = images whose questions are all right / images
(MME asks two questions per image), score = (acc + acc+) * 100, at most 200. Perception sums the 10
perception subtasks (at most 2000), cognition the 4 cognition ones (at most 800); `perception_pct`
is perception / 2000 * 100, the form the paper's MME column uses. A reply is read as MME does:
lowercased, "yes"/"no" as is, else "yes" or "no" if that string occurs in its first 4 characters,
else "other" (always wrong).

Accepted inputs (each record needs a subtask, an image, the ground truth and the reply):
1. `--results-dir`: MME's eval_tool layout, one `{subtask}.txt` per subtask with lines
   `image<TAB>question<TAB>ground truth<TAB>reply` (what LLaVA's convert_answer_to_mme.py writes);
2. `--answers-file` jsonl with `{"question_id", "category", "image", "text" (reply), "answer" (gt)}`;
3. `--answers-file` LLaVA answers jsonl (`{"question_id": "artwork/images/10002.jpg", "prompt",
   "text"}`) plus `--mme-root MME_Benchmark_release_version`: the subtask is the first path part of
   `question_id`, the image its file name, and the ground truth is read from the release's
   `{subtask}/[questions_answers_YN/]{image stem}.txt` by matching the question text (instruction
   sentences such as "Please answer yes or no." ignored). In form 2 a missing `category`, `image` or
   `answer` is filled the same way.

Usage:
    python -m llava.eval.eval_mme --answers-file answers.jsonl --mme-root MME_Benchmark_release_version
    python -m llava.eval.eval_mme --results-dir eval_tool/answers/my-model
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import read_jsonl, report

logger = logging.getLogger(__name__)

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_INSTRUCTIONS = re.compile(r"please answer yes or no\.|answer the question using a single word or phrase\.")


def mme_yes_no(text: str) -> str:
    """MME's reading of a reply: "yes", "no" or "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_subtask_score(records: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """acc, acc+ and score of one subtask from (image, ground truth, reply) triples."""
    per_image: dict[str, list[bool]] = defaultdict(list)
    for image, gt, reply in records:
        gt = gt.strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {gt!r} for image {image!r}")
        per_image[image].append(mme_yes_no(reply) == gt)
    if not per_image:
        raise ValueError("mme_subtask_score needs at least one record")
    hits = [hit for image_hits in per_image.values() for hit in image_hits]
    acc = sum(hits) / len(hits)
    acc_plus = sum(all(image_hits) for image_hits in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100, "questions": len(hits)}


def score_mme(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores of every subtask and the perception / cognition sums.

    `records`: dicts with "category" (subtask), "image", "answer" (yes/no ground truth), "text" (reply).
    Subtasks outside MME's 14 are scored but enter neither sum.
    """
    by_subtask: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for r in records:
        by_subtask[r["category"]].append((r["image"], r["answer"], r["text"]))
    subtasks = {name: mme_subtask_score(rows) for name, rows in sorted(by_subtask.items())}
    unknown = sorted(set(subtasks) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        logger.warning("MME: subtasks %s are not MME's; left out of both sums", unknown)
    perception = sum(subtasks[name]["score"] for name in PERCEPTION if name in subtasks)
    cognition = sum(subtasks[name]["score"] for name in COGNITION if name in subtasks)
    return {
        "perception": perception,
        "cognition": cognition,
        "perception_pct": perception / (200 * len(PERCEPTION)) * 100,
        "subtasks": subtasks,
    }


def normalize_mme_question(question: str) -> str:
    """A question with the instruction sentences removed, lowercased, single-spaced (the join key)."""
    return " ".join(_INSTRUCTIONS.sub(" ", question.lower()).split())


def load_mme_ground_truth(mme_root: str | Path) -> dict[tuple[str, str, str], str]:
    """(subtask, image stem, normalised question) -> yes/no, from the MME release folder."""
    gt = {}
    for subtask_dir in sorted(p for p in Path(mme_root).iterdir() if p.is_dir()):
        qa_dir = subtask_dir / "questions_answers_YN"
        for txt in sorted((qa_dir if qa_dir.is_dir() else subtask_dir).glob("*.txt")):
            for line in txt.read_text(encoding="utf-8-sig").splitlines():
                if "\t" in line:  # question<TAB>Yes|No
                    question, answer = line.rsplit("\t", 1)
                    gt[(subtask_dir.name, txt.stem, normalize_mme_question(question))] = answer.strip()
    if not gt:
        raise FileNotFoundError(f"no MME question files under {mme_root}")
    return gt


def load_mme_results_dir(results_dir: str | Path) -> list[dict[str, str]]:
    """Records from MME's eval_tool layout: `{subtask}.txt` lines image<TAB>question<TAB>gt<TAB>reply."""
    records = []
    for txt in sorted(Path(results_dir).glob("*.txt")):
        for line in txt.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) == 3:  # an empty reply loses its trailing tab to some editors
                parts.append("")
            image, _question, gt, reply = parts
            records.append({"category": txt.stem, "image": image, "answer": gt, "text": reply})
    if not records:
        raise FileNotFoundError(f"no MME result lines in {results_dir}")
    return records


def load_mme_answers(path: str | Path, mme_root: str | Path | None = None) -> list[dict[str, str]]:
    """Records from an answers jsonl, filling category / image / answer from `question_id` and `mme_root`."""
    gt = load_mme_ground_truth(mme_root) if mme_root else None
    records = []
    for a in read_jsonl(path):
        qid = str(a["question_id"])
        category = a.get("category") or qid.split("/")[0]
        image = a.get("image") or qid.split("/")[-1]
        answer = a.get("answer")
        if answer is None:
            if gt is None:
                raise ValueError(
                    f"MME answer {qid!r} has no ground truth: give --mme-root or an 'answer' field"
                )
            key = (category, Path(image).stem, normalize_mme_question(a.get("prompt", "")))
            if key not in gt:
                raise ValueError(
                    f"MME answer {qid!r}: no question {key[2]!r} for image {key[1]!r} in {mme_root}"
                )
            answer = gt[key]
        records.append({"category": category, "image": image, "answer": answer, "text": a["text"]})
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results-dir", help="MME eval_tool folder of {subtask}.txt files")
    source.add_argument("--answers-file", "--result-file", dest="answers_file", help="answers jsonl")
    parser.add_argument("--mme-root", default=None, help="MME_Benchmark_release_version (ground truth)")
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    if args.results_dir:
        records = load_mme_results_dir(args.results_dir)
    else:
        records = load_mme_answers(args.answers_file, args.mme_root)
    metrics = score_mme(records)
    report(metrics, args.output_result)
    for name, m in metrics["subtasks"].items():
        print(f"MME {name:<24} score {m['score']:7.2f}  acc {m['acc']:.4f}  acc+ {m['acc_plus']:.4f}")
    print(f"MME perception: {metrics['perception']:.2f}  cognition: {metrics['cognition']:.2f}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
