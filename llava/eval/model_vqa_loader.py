"""LLaVA's `model_vqa_loader`: answer a question jsonl with a LLaVA-Qwen checkpoint, in batches.

    python -m llava.eval.model_vqa_loader --model-path CKPT --image-folder IMAGES \\
        --question-file questions.jsonl --answers-file answers.jsonl [--conv-mode qwen_2] [--batch-size 8]

Design choices
- Generation is `llava.generation.generate_answers`, the loop every evaluation shares (prompting, left
  padding, images by file name, PIL image or bytes).
- Formats, flags and chunking (`--num-chunks/--chunk-idx`: contiguous chunks of ceil(n / k)) are LLaVA's;
  the conversation template and image aspect ratio default to the checkpoint's config.
- Answers are streamed: each batch's lines are appended to the answers file and flushed to disk as soon as they
  are generated (`write_answers`, shared by every model_vqa_* script), so a crash loses one batch at most.
  Rerun with the same `--answers-file` and the questions already answered there are skipped (the log says how
  many); a partial last line left by a crash is cut off and that question answered again. A file written for
  other questions, prompts or another model (`model_id`) is refused rather than mixed in: delete it for a fresh
  run. The model is not loaded when nothing is left to answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from llava.generation import (
    default_conv_mode,
    iter_answers,
    model_name_from_path,
    read_questions,
)

logger = logging.getLogger(__name__)

# iter_answers' signature: (model, tokenizer, image_processor, questions, **generate_options) -> replies per batch
AnswerBatches = Callable[..., Iterable[list[str]]]


def split_list(lst: Sequence, n: int) -> list[Sequence]:
    """Split a list into n (roughly) equal-sized contiguous chunks (LLaVA's)."""
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i : i + chunk_size] for i in range(0, len(lst), max(chunk_size, 1))]


def get_chunk(lst: Sequence, n: int, k: int) -> Sequence:
    """Chunk k of `split_list(lst, n)`; empty when there are fewer than k + 1 chunks (n > len(lst))."""
    if not 0 <= k < n:
        raise ValueError(f"--chunk-idx must be in [0, {n}), got {k}")
    chunks = split_list(lst, n)
    return chunks[k] if k < len(chunks) else lst[:0]


def write_jsonl_atomic(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows as jsonl through a temporary file + rename; parent folders are created."""
    path = Path(os.path.expanduser(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def answer_record(question_id, prompt: str, text: str, model_id: str, **extra) -> dict:
    """One answers-file line in LLaVA's format (`extra`, e.g. MMBench's round_id, goes before answer_id)."""
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        **extra,
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": model_id,
        "metadata": {},
    }


def load_model(args: argparse.Namespace):
    """(tokenizer, model, image_processor) from the common flags; fills `args.conv_mode` from the config."""
    from llava.model.builder import load_pretrained_model

    model_path = os.path.expanduser(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, model_name_from_path(model_path), device=args.device
    )
    args.conv_mode = args.conv_mode or default_conv_mode(model)
    return tokenizer, model, image_processor


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by the model_vqa_* scripts (LLaVA's names)."""
    parser.add_argument("--model-path", required=True, help="checkpoint folder")
    parser.add_argument("--model-base", default=None, help="base LLM for projector-only or LoRA checkpoints")
    parser.add_argument(
        "--image-folder", default="", help="folder the questions' image names are relative to"
    )
    parser.add_argument("--question-file", required=True)
    parser.add_argument(
        "--answers-file", required=True,
        help="answers jsonl, appended batch by batch; rerun with the same file to skip questions answered there",
    )
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    parser.add_argument("--chunk-idx", type=int, default=0, help="the chunk this process answers")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, else sampling")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="questions per generate call (left padding)"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image loading")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def generate_options(args: argparse.Namespace) -> dict[str, Any]:
    """`generate_answers` keyword arguments from the common flags."""
    return {
        "image_folder": args.image_folder,
        "conv_mode": args.conv_mode,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }


def prompt_key(row: dict) -> Hashable:
    """What identifies an answer line and the question it answers: question_id and prompt (MME asks two
    questions per image under one question_id)."""
    return row["question_id"], row["prompt"]


def read_answered(path: Path) -> list[dict]:
    """The complete answer lines of `path` ([] when it does not exist).

    A last line without its newline is what a crash in the middle of a write leaves: it is cut off the file (so
    appending starts on a fresh line) with a warning, and its question is answered again. Any other line that is
    not JSON is an error naming it: that file was not written by an interrupted run of these scripts.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if complete < len(data):
        logger.warning(
            "%s: dropping a partial last line (%d bytes, left by an interrupted run); its question is answered again",
            path, len(data) - complete,
        )
        with open(path, "r+b") as f:
            f.truncate(complete)
    rows = []
    for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON answer line ({err}); delete the file to start "
                             "over or pass another --answers-file") from err
    return rows


def unanswered(path: Path, answered: Sequence[dict], questions: Sequence[dict],
               record: Callable[[dict, str], dict], key: Callable[[dict], Hashable]) -> list[dict]:
    """The `questions` that have no line in `answered`, in order (each line answers one question: a question
    asked twice needs two lines). Refuses a file that does not belong to this run: lines that answer none of
    its questions (another question file, chunk or prompt flags) or another model's answers."""
    left = Counter(key(row) for row in answered)
    todo = []
    for question in questions:
        k = key(record(question, ""))
        if left[k]:
            left[k] -= 1
        else:
            todo.append(question)
    stray = [k for k, n in left.items() if n]
    if stray:
        raise ValueError(f"{path} holds {sum(left.values())} answers to questions this run does not ask, e.g. "
                         f"{stray[0]!r}: it was written by another run (question file, --num-chunks/--chunk-idx or "
                         "prompt flags). Delete it to answer again, or pass another --answers-file")
    model_id = record(questions[0], "")["model_id"] if questions else None
    others = sorted({str(row.get("model_id")) for row in answered} - {model_id})
    if others:
        raise ValueError(f"{path} holds answers of model_id {others[0]!r}, not of this run's {model_id!r}. Delete "
                         "it to answer again, or pass another --answers-file")
    return todo


def write_answers(
    args: argparse.Namespace,
    questions: Sequence[dict],
    record: Callable[[dict, str], dict],
    *,
    key: Callable[[dict], Hashable] = prompt_key,
    answer_batches: AnswerBatches = iter_answers,
) -> int:
    """Answer the `questions` not yet in `args.answers_file`, appending each batch's lines as they come.

    `record(question, reply)` is the question's answers-file line; `key(line)` identifies the question a line
    answers (question_id and prompt; MMBench adds round_id). `answer_batches` generates replies batch by batch (`iter_answers`;
    tests pass one that stops early). Returns the number of answers written by this call.
    """
    path = Path(os.path.expanduser(args.answers_file))
    path.parent.mkdir(parents=True, exist_ok=True)
    answered = read_answered(path)
    todo = unanswered(path, answered, questions, record, key)
    if answered:
        logger.info("%s: skipping %d of %d questions already answered there; %d to answer", path, len(answered),
                    len(questions), len(todo))
    path.touch()  # an empty chunk still leaves its (empty) file, as LLaVA's scripts expect
    if not todo:
        return 0
    tokenizer, model, image_processor = load_model(args)
    replies = answer_batches(model, tokenizer, image_processor, todo, **generate_options(args))
    written = 0
    with open(path, "a", encoding="utf-8") as f:
        for batch in replies:
            rows = [record(q, reply) for q, reply in zip(todo[written : written + len(batch)], batch)]
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
            written += len(rows)
    if written != len(todo):
        raise RuntimeError(f"generation returned {written} answers for {len(todo)} questions")
    logger.info("wrote %d answers to %s (%d in all)", written, path, len(answered) + written)
    return written


def eval_model(args: argparse.Namespace, answer_batches: AnswerBatches = iter_answers) -> None:
    questions = get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
    model_id = model_name_from_path(args.model_path)

    def record(question: dict, reply: str) -> dict:
        return answer_record(question["question_id"], question["text"], reply, model_id)

    write_answers(args, questions, record, answer_batches=answer_batches)


def main(argv: list[str] | None = None, answer_batches: AnswerBatches = iter_answers) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    eval_model(parser.parse_args(argv), answer_batches)


if __name__ == "__main__":
    main()
