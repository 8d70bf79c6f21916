"""LLaVA's `model_vqa_loader`: answer a question jsonl with a LLaVA-Qwen checkpoint, in batches.

    python -m llava.eval.model_vqa_loader --model-path CKPT --image-folder IMAGES \\
        --question-file questions.jsonl --answers-file answers.jsonl [--conv-mode qwen_2] [--batch-size 8]

Design choices
- Generation is `llava.generation.generate_answers`, the loop every evaluation shares (prompting, left
  padding, images by file name, PIL image or bytes).
- Formats, flags and chunking (`--num-chunks/--chunk-idx`: contiguous chunks of ceil(n / k)) are LLaVA's;
  the conversation template and image aspect ratio default to the checkpoint's config.
- The answers file is written to a temporary file and renamed, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llava.generation import (
    default_conv_mode,
    generate_answers,
    model_name_from_path,
    read_questions,
)

logger = logging.getLogger(__name__)



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
    parser.add_argument("--answers-file", required=True)
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


def eval_model(args: argparse.Namespace) -> None:
    tokenizer, model, image_processor = load_model(args)
    questions = get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
    answers = generate_answers(model, tokenizer, image_processor, questions, **generate_options(args))
    model_id = model_name_from_path(args.model_path)
    rows = [answer_record(q["question_id"], q["text"], a, model_id) for q, a in zip(questions, answers)]
    write_jsonl_atomic(args.answers_file, rows)
    logger.info("wrote %d answers to %s", len(rows), args.answers_file)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    eval_model(parser.parse_args(argv))


if __name__ == "__main__":
    main()
