"""TextVQA accuracy: the standard VQA soft accuracy over 10 human answers (see `m4c_evaluator`).

Inputs:
- results: LLaVA answers jsonl (`{"question_id", "prompt", "text", ...}` per line);
- annotations: `TextVQA_0.5.1_val.json` (`{"data": [{"question_id", "image_id", "question",
  "answers": [10 strings]}, ...]}`).
Matching a result to its annotation: LLaVA's TextVQA question file stores the *image* id under
`question_id` and the question (plus OCR tokens and an instruction line) under `prompt`, so such a
result is matched on (image id, lowercased question read from the prompt), as LLaVA's script does.
Like LLaVA's, every result is scored, and when several annotations share an (image id, question)
pair the last one is the one all their results are scored against. A result whose `question_id` is
a TextVQA question id is matched on it directly. An (image id, question) pair that no result
answered counts as 0 and is reported under `missing` (LLaVA's script would leave it out; on a
complete answers file there is none).

Usage:
    python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers.jsonl
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llava.eval.eval_utils import load_json, pct, read_jsonl, report
from llava.eval.m4c_evaluator import vqa_accuracy

logger = logging.getLogger(__name__)

_OCR_PROMPT_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def extract_textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lowercased.

    Handles "question\\nReference OCR token: ...\\nAnswer the question ...", the same with the OCR
    line first, "question\\nAnswer the question ..." and "OCR tokens: ... Question: q Short answer:".
    """
    prompt = prompt.replace("<image>", "").strip()
    if prompt.startswith("OCR tokens: "):
        match = _OCR_PROMPT_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"no 'Question: ... Short answer:' in TextVQA prompt {prompt!r}")
        return match.group(1).strip().lower()
    lines = [line.strip() for line in prompt.split("\n")]
    lines = [line for line in lines if line and not line.startswith("Reference OCR token:")]
    if not lines:
        raise ValueError(f"no question in TextVQA prompt {prompt!r}")
    return lines[0].lower()


def match_textvqa_results(
    results: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]
) -> tuple[list[tuple[str, Sequence[str]]], int]:
    """(reply, human answers) for every result, and how many (image id, question) pairs no result answered."""
    by_qid = {str(a["question_id"]): a for a in annotations}
    # A dict of the annotations, so a repeated (image, question) pair keeps its last one, as LLaVA's.
    by_image_question = {(str(a["image_id"]), a["question"].strip().lower()): a for a in annotations}
    image_ids = {key[0] for key in by_image_question}

    scored: list[tuple[str, Sequence[str]]] = []
    answered: set[tuple[str, str]] = set()
    for result in results:
        qid = str(result["question_id"])
        if qid in image_ids and "prompt" in result:  # LLaVA: question_id holds the image id
            key = (qid, extract_textvqa_question(result["prompt"]))
            if key not in by_image_question:
                raise ValueError(f"no TextVQA annotation for image {key[0]!r}, question {key[1]!r}")
            annotation = by_image_question[key]
        elif qid in by_qid:
            annotation = by_qid[qid]
            key = (str(annotation["image_id"]), annotation["question"].strip().lower())
        else:
            raise ValueError(f"TextVQA result {qid!r} matches no annotation")
        answered.add(key)
        scored.append((result["text"], annotation["answers"]))
    return scored, len(by_image_question.keys() - answered)


def textvqa_accuracy(scored: Sequence[tuple[str, Sequence[str]]], missing: int = 0) -> dict[str, Any]:
    """Mean VQA accuracy of (reply, human answers) pairs, with `missing` unanswered questions scoring 0.

    Returns {"accuracy", "total", "missing"}.
    """
    scores = [vqa_accuracy(reply, answers) for reply, answers in scored] + [0.0] * missing
    if missing:
        logger.warning("TextVQA: %d of %d questions have no prediction; scored 0", missing, len(scores))
    return {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "total": len(scores),
        "missing": missing,
    }


def score_textvqa(
    results: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Match LLaVA results to TextVQA annotations and score them (see `textvqa_accuracy`)."""
    return textvqa_accuracy(*match_textvqa_results(results, annotations))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", required=True, help="LLaVA answers jsonl")
    parser.add_argument("--output-result", default=None, help="write the metrics json here")
    args = parser.parse_args(argv)

    metrics = score_textvqa(read_jsonl(args.result_file), load_json(args.annotation_file)["data"])
    report(metrics, args.output_result)
    print(f"TextVQA accuracy: {pct(metrics['accuracy'])}% over {metrics['total']} questions")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
