"""Tiny-world evaluation: per-family accuracy of a model's answers, scored with `llava.tiny.score`.

    python -m llava.eval.eval_tiny --question-file playground/tiny/data/test_questions.jsonl \\
        --answers-file answers.jsonl [--name student] [--output-json J] [--output-md M]

Design choices
- Questions and answers are joined by `question_id`; a question without an answer is an error (a partial
  answers file must not pass as a score), answers to unknown questions are ignored with a warning.
- `evaluate_tiny` is the in-process path (the distillation job calls it for the teacher, the SFT student
  and the Align-TI student): it answers `{split}_questions.jsonl` with `generate_answers` and scores with
  the same function as the CLI, so both give the same numbers for the same answers.
- The JSON output is `{name: summary}` and the markdown one `format_table({name: summary})`, so the files of
  several models merge into one table by a dict update.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from llava.eval.model_vqa_loader import answer_record, write_jsonl_atomic
from llava.generation import generate_answers, model_name_from_path, read_questions
from llava.tiny.score import format_table, summarize

logger = logging.getLogger(__name__)


def score_answers(questions: Sequence[dict], answers: Sequence[dict]) -> dict[str, dict]:
    """Summary {family: {"n", "accuracy"}, "overall": ...} of answers ({"question_id", "text"}) to questions
    ({"question_id", "family", "answer"}, optional "options")."""
    replies = {a["question_id"]: a["text"] for a in answers}
    missing = [q["question_id"] for q in questions if q["question_id"] not in replies]
    if missing:
        raise ValueError(f"{len(missing)} of {len(questions)} questions have no answer, e.g. {missing[:5]}")
    extra = len(set(replies) - {q["question_id"] for q in questions})
    if extra:
        logger.warning("ignoring %d answers to questions not in the question file", extra)
    return summarize([{**q, "prediction": replies[q["question_id"]]} for q in questions])


def evaluate_tiny(
    model,
    world_dir: str | os.PathLike,
    tokenizer=None,
    image_processor=None,
    *,
    split: str = "test",
    model_base: str | None = None,
    conv_mode: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    answers_file: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, dict]:
    """Answer the tiny world's `{split}_questions.jsonl` greedily and return the per-family summary.

    `model` is a loaded LLaVA-Qwen model (then `tokenizer` and `image_processor` are required) or a
    checkpoint path (loaded with `load_pretrained_model(model, model_base, device=device)`). `limit` keeps
    the first questions only; `answers_file`, when given, receives LLaVA's answers jsonl.
    """
    if isinstance(model, (str, os.PathLike)):
        from llava.model.builder import load_pretrained_model

        model_id = model_name_from_path(str(model))
        tokenizer, model, image_processor, _ = load_pretrained_model(str(model), model_base, device=device)
    elif tokenizer is None or image_processor is None:
        raise ValueError("evaluate_tiny: pass tokenizer and image_processor with a loaded model")
    else:
        model_id = getattr(model.config, "_name_or_path", "") or type(model).__name__
    world_dir = Path(world_dir)
    questions = read_questions(world_dir / f"{split}_questions.jsonl")[:limit]
    replies = generate_answers(
        model,
        tokenizer,
        image_processor,
        questions,
        world_dir / "images",
        conv_mode,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    answers = [answer_record(q["question_id"], q["text"], r, model_id) for q, r in zip(questions, replies)]
    if answers_file is not None:
        write_jsonl_atomic(answers_file, answers)
    return score_answers(questions, answers)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question-file", required=True, help="the tiny world's {split}_questions.jsonl")
    parser.add_argument(
        "--answers-file", required=True, help="LLaVA answers jsonl (model_vqa_loader's output)"
    )
    parser.add_argument("--name", default=None, help="row name in the table (default: the answers' model_id)")
    parser.add_argument("--output-json", default=None, help="write {name: summary} here")
    parser.add_argument("--output-md", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)

    questions, answers = read_questions(args.question_file), read_questions(args.answers_file)
    name = args.name or (answers[0].get("model_id") if answers else None) or Path(args.answers_file).stem
    rows = {name: score_answers(questions, answers)}
    table = format_table(rows)
    print(table)
    if args.output_json:
        write_text_atomic(args.output_json, json.dumps(rows, indent=1) + "\n")
    if args.output_md:
        write_text_atomic(args.output_md, table + "\n")
    return rows[name]


if __name__ == "__main__":
    main()
