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
A reply is read with MMBench's deterministic matching, exactly as lmms-eval's (0.7.3)
`MMBench_Evaluator.can_infer` does before asking GPT: `can_infer_option` (a lone capital letter A-E
among the whitespace-separated words, unless "A" is one of more than three words, or else exactly
one letter written "B.", "B,", "(B)", ...), then `can_infer_text` (the one option whose lowercased
text occurs in the lowercased reply). Replies neither reads are counted wrong and reported as
`unmatched`: the official pipeline asks GPT to match those, which is not reproduced offline, so when
`unmatched` > 0 the accuracy is a lower bound of the official one.

Usage:
    python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv --result-file answers.jsonl
"""

from __future__ import annotations

import argparse
import csv
import logging
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.eval_utils import pct, read_jsonl, report

logger = logging.getLogger(__name__)

OPTION_LETTERS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000
# (prefix, suffix) around a letter that MMBench's `can_infer_option` accepts, in its order.
_OPTION_AFFIXES = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


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


def can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """The option letter MMBench's `can_infer_option` finds in `answer`, or None.

    Follows lmms-eval's `MMBench_Evaluator.can_infer_option` exactly (letters A-E whatever the
    number of options, as it is called with its default `num_choice`).
    """
    if "Failed to obtain answer via API" in answer:  # MMBench's marker of a failed GPT call
        return None
    choices = string.ascii_uppercase[:num_choice]
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:  # "A" may be the article ("A dog is shown")
                break
            if ch in splits:
                return ch
    for prefix, suffix in _OPTION_AFFIXES:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return None


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> str | None:
    """The letter of the one option whose lowercased text occurs in the lowercased `answer`, else None."""
    answer = answer.lower()
    candidates = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return candidates[0] if len(candidates) == 1 else None


def infer_mmbench_letter(answer: str, choices: Mapping[str, Any]) -> str | None:
    """MMBench's `can_infer`: `can_infer_option`, then `can_infer_text` over `choices` (letter -> text)."""
    return can_infer_option(answer) or can_infer_text(answer, choices)


def mmbench_records(
    results: Sequence[Mapping[str, Any]], annotations: Mapping[int, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One record per result: {"group", "variant", "matched", "pred", "answer", "category"}.

    `pred` and `answer` are letters in the original order; `matched` says whether MMBench's
    deterministic matching read a letter from the reply (see the module docstring).
    """
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
        # Letters and texts are those shown in this variant; `original` maps them back.
        letter = infer_mmbench_letter(str(r["text"]), dict(zip(OPTION_LETTERS, shown)))
        position = None if letter is None else string.ascii_uppercase.index(letter)
        records.append({
            "group": r.get("circular_group", index % CIRCULAR_STRIDE),
            "variant": (index, int(r.get("round_id", 0))),
            "matched": letter is not None,
            # A letter past the shown options ("E", or "C" of two) is wrong, as it is in MMBench.
            "pred": original[position] if position is not None and position < len(original) else None,
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
        "unmatched": sum(not rec["matched"] for rec in records),
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
    if metrics["unmatched"]:
        logger.warning(
            "MMBench: %d replies matched no option (counted wrong; the official scorer would ask GPT)",
            metrics["unmatched"],
        )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
