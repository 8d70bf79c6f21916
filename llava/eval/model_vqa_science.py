"""LLaVA's `model_vqa_science`: answer ScienceQA (LLaVA's question json with "conversations").

    python -m llava.eval.model_vqa_science --model-path CKPT --question-file llava_test_CQM-I.json \\
        --image-folder scienceqa/images/test --answers-file answers.jsonl --single-pred-prompt

The user message is the first human turn with `<image>` removed (put back in front when the record has an
image), plus LLaVA's single-prediction instruction with `--single-pred-prompt`. Generation is
`llava.generation.iter_answers`; the answers file is LLaVA's (`prompt` carries the `<image>` tag), appended batch
by batch, and a rerun skips the questions already answered (`model_vqa_loader.write_answers`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.model_vqa_loader import (
    AnswerBatches,
    add_common_args,
    answer_record,
    get_chunk,
    write_answers,
)
from llava.generation import iter_answers, model_name_from_path

logger = logging.getLogger(__name__)

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def science_questions(records: list[dict], single_pred_prompt: bool) -> list[dict]:
    """LLaVA ScienceQA records -> generate_answers questions (+ "prompt", LLaVA's cur_prompt)."""
    questions = []
    for record in records:
        text = record["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        question = {"question_id": record["id"], "text": text, "prompt": text}
        if "image" in record:
            question["image"] = record["image"]
            question["prompt"] = DEFAULT_IMAGE_TOKEN + "\n" + text
        if single_pred_prompt:
            question["text"] += "\n" + SINGLE_PRED_PROMPT
            question["prompt"] += "\n" + SINGLE_PRED_PROMPT
        questions.append(question)
    return questions


def eval_model(args: argparse.Namespace, answer_batches: AnswerBatches = iter_answers) -> None:
    with open(os.path.expanduser(args.question_file), encoding="utf-8") as f:
        records = get_chunk(json.load(f), args.num_chunks, args.chunk_idx)
    questions = science_questions(records, args.single_pred_prompt)
    model_id = model_name_from_path(args.model_path)

    def record(question: dict, reply: str) -> dict:
        return answer_record(question["question_id"], question["prompt"], reply, model_id)

    write_answers(args, questions, record, answer_batches=answer_batches)


def main(argv: list[str] | None = None, answer_batches: AnswerBatches = iter_answers) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--single-pred-prompt", action="store_true", help=f"append {SINGLE_PRED_PROMPT!r}")
    eval_model(parser.parse_args(argv), answer_batches)


if __name__ == "__main__":
    main()
