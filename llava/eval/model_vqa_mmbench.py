"""LLaVA's `model_vqa_mmbench`: answer an MMBench TSV (base64 images, options A-D).

    python -m llava.eval.model_vqa_mmbench --model-path CKPT --question-file mmbench_dev_20230712.tsv \\
        --answers-file answers.jsonl --single-pred-prompt --lang en [--all-rounds]

The prompt is `hint\\nquestion\\nA. ...\\nB. ...` (hint only when present; options end at the first missing
one), plus the single-prediction instruction with `--single-pred-prompt`. `--all-rounds` asks every
circular rotation of the options (round r shows the options rotated left r times; `option_char` lists the
original letters in the order shown), as LLaVA does for MMBench's CircularEval (`eval_mmbench` scores it).
Images stay encoded until the loader decodes them. Generation is `llava.generation.iter_answers`; answers are
appended batch by batch and a rerun skips the (question_id, round_id) pairs already answered
(`model_vqa_loader.write_answers`).
"""

from __future__ import annotations

import argparse
import base64
import csv
import logging
import math
import os
from collections.abc import Hashable

from llava.eval.model_vqa_loader import (
    AnswerBatches,
    add_common_args,
    answer_record,
    get_chunk,
    write_answers,
)
from llava.generation import iter_answers, model_name_from_path

logger = logging.getLogger(__name__)

ALL_OPTIONS = ("A", "B", "C", "D")
SINGLE_PRED_PROMPT = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}


def is_none(value) -> bool:
    """MMBench's empty cells: missing, '', 'nan', 'none' (any case), or a float NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_tsv(path: str | os.PathLike) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # base64 images are long fields
    with open(os.path.expanduser(path), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def mmbench_questions(
    rows: list[dict], all_rounds: bool, single_pred_prompt: bool, lang: str = "en"
) -> list[dict]:
    """TSV rows -> generate_answers questions, one per (row, round), with LLaVA's answer fields."""
    questions = []
    for row in rows:
        options = []
        for c in ALL_OPTIONS:  # options end at the first missing one
            if is_none(row.get(c)):
                break
            options.append(row[c])
        option_chars = list(ALL_OPTIONS[: len(options)])
        image = base64.b64decode(row["image"])
        base = row["question"] if is_none(row.get("hint")) else row["hint"] + "\n" + row["question"]
        for round_id in range(len(options) if all_rounds else 1):
            prompt = base + "".join(f"\n{c}. {o}" for c, o in zip(ALL_OPTIONS, options))
            text = prompt + ("\n" + SINGLE_PRED_PROMPT[lang] if single_pred_prompt else "")
            questions.append(
                {
                    "question_id": int(float(row["index"])),
                    "round_id": round_id,
                    "prompt": prompt,
                    "text": text,
                    "image": image,
                    "options": options,
                    "option_char": option_chars,
                }
            )
            options, option_chars = options[1:] + options[:1], option_chars[1:] + option_chars[:1]
    return questions


def round_key(row: dict) -> Hashable:
    """The question an answer line answers: with `--all-rounds` one question_id comes once per round."""
    return row["question_id"], row["round_id"], row["prompt"]


def eval_model(args: argparse.Namespace, answer_batches: AnswerBatches = iter_answers) -> None:
    rows = get_chunk(read_tsv(args.question_file), args.num_chunks, args.chunk_idx)
    questions = mmbench_questions(rows, args.all_rounds, args.single_pred_prompt, args.lang)
    model_id = model_name_from_path(args.model_path)
    fields = ("round_id", "options", "option_char")  # LLaVA's extra MMBench fields

    def record(question: dict, reply: str) -> dict:
        extra = {k: question[k] for k in fields}
        return answer_record(question["question_id"], question["prompt"], reply, model_id, **extra)

    write_answers(args, questions, record, key=round_key, answer_batches=answer_batches)


def main(argv: list[str] | None = None, answer_batches: AnswerBatches = iter_answers) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument(
        "--all-rounds", action="store_true", help="ask every circular rotation of the options"
    )
    parser.add_argument(
        "--single-pred-prompt", action="store_true", help="append the answer-with-a-letter line"
    )
    parser.add_argument("--lang", default="en", choices=sorted(SINGLE_PRED_PROMPT))
    eval_model(parser.parse_args(argv), answer_batches)


if __name__ == "__main__":
    main()
