"""MMBench accuracy, with MMBench's circular evaluation, overall and per category.

Circular evaluation (MMBench's CircularEval): a question is asked once per rotation of its options
and counts as right only if every rotation is answered right. Variants are grouped the MMBench way:
a TSV row with index i + k * 1,000,000 is the k-th rotation of question i, so the group is
`index % 1_000_000` (a result's own `circular_group` field overrides it). LLaVA's
`model_vqa_mmbench --all-rounds` writes the rotations itself, one result per `round_id`, with
`option_char` listing the original letter shown at each position; replies are mapped back through
it. With `--no-circular` only each group's first variant (lowest index, then round) is scored.

Inputs:
- `--result-file`: answers jsonl, `{"question_id": index, "text": reply}` plus, when there is no TSV,
  `"answer"` (letter) and `"category"`; LLaVA's extra `round_id`, `options`, `option_char` are used;
- `--annotation-file` (optional): the MMBench TSV (index, question, hint, A..D, answer, category, ...)
  giving `answer`, `category` and the options of each index.
A reply is read with `parse_choice_letter`; failing that, a reply equal to exactly one option's text
(case and trailing period ignored) picks that option.

Usage:
    python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv --result-file answers.jsonl
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import parse_choice_letter, pct, read_jsonl, report

logger = logging.getLogger(__name__)

OPTION_LETTERS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def load_mmbench_tsv(path: str | Path) -> dict[int, dict[str, Any]]:
    """MMBench TSV rows by integer index, with `options` (the present A..D texts); images dropped."""
    csv.field_size_limit(2**31 - 1)  # base64 images are long fields
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            row.pop("image", None)
            options = []
            for letter in OPTION_LETTERS:  # options end at the first missing one, as in LLaVA
                if _is_missing(row.get(letter)):
                    break
                options.append(row[letter])
            row["options"] = options
            rows[int(float(row["index"]))] = row
    return rows


def _match_option_text(reply: str, options: Sequence[str]) -> int | None:
    """Position of the one option whose text equals the reply (case and final period ignored)."""
    norm = reply.strip().rstrip(".").strip().lower()
    hits = [i for i, option in enumerate(options) if str(option).strip().rstrip(".").strip().lower() == norm]
    return hits[0] if len(hits) == 1 else None


def mmbench_records(
    results: Sequence[Mapping[str, Any]], annotations: Mapping[int, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One record per result: {"group", "variant", "pred", "answer", "category"}, letters in the original order."""
    records = []
    for r in results:
        index = int(r["question_id"])
        row = (annotations or {}).get(index)
        if annotations is not None and row is None:
            raise ValueError(f"MMBench result {index} has no row in the annotation file")
        answer = r.get("answer") or (row or {}).get("answer")
        if _is_missing(answer):
            raise ValueError(f"MMBench result {index} has no answer: give the dev TSV or an 'answer' field")
        category = r.get("category") or (row or {}).get("category") or "all"
        shown = list(r.get("options") or (row or {}).get("options") or [])
        original = list(r.get("option_char") or OPTION_LETTERS[: len(shown) or len(OPTION_LETTERS)])
        letter = parse_choice_letter(r["text"], len(original))
        position = OPTION_LETTERS.index(letter) if letter else _match_option_text(r["text"], shown)
        records.append({
            "group": r.get("circular_group", index % CIRCULAR_STRIDE),
            "variant": (index, int(r.get("round_id", 0))),
            "pred": None if position is None else original[position],
            "answer": str(answer).strip(),
            "category": category,
        })  # fmt: skip
    return records


def score_mmbench(records: Sequence[Mapping[str, Any]], circular: bool = True) -> dict[str, Any]:
    """Accuracy over questions (groups of variants) and per category; fractions.

    circular=True: a group is right iff all its variants are; False: only its first variant counts.
    """
    groups: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[rec["group"]].append(rec)
    if not groups:
        raise ValueError("score_mmbench needs at least one record")
    by_category: dict[str, list[bool]] = defaultdict(list)
    for variants in groups.values():
        variants = sorted(variants, key=lambda v: v["variant"])
        scored = variants if circular else variants[:1]
        by_category[variants[0]["category"]].append(all(v["pred"] == v["answer"] for v in scored))
    hits = [hit for cat_hits in by_category.values() for hit in cat_hits]
    return {
        "accuracy": sum(hits) / len(hits),
        "correct": sum(hits),
        "total": len(hits),
        "variants": len(records),
        "circular": circular,
        "by_category": {cat: sum(h) / len(h) for cat, h in sorted(by_category.items())},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--result-file", required=True, help="answers jsonl (LLaVA's model_vqa_mmbench output)"
    )
    parser.add_argument("--annotation-file", default=None, help="MMBench TSV with answers (the dev split)")
    parser.add_argument(
        "--no-circular",
        dest="circular",
        action="store_false",
        help="score only the first variant of each question",
    )
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    annotations = load_mmbench_tsv(args.annotation_file) if args.annotation_file else None
    metrics = score_mmbench(
        mmbench_records(read_jsonl(args.result_file), annotations), circular=args.circular
    )
    report(metrics, args.output_result)
    mode = "circular" if metrics["circular"] else "single-pass"
    print(f"MMBench ({mode}) accuracy: {pct(metrics['accuracy'])}% ({metrics['correct']}/{metrics['total']})")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
