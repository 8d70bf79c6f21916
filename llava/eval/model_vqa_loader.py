"""LLaVA's `model_vqa_loader`: answer a question jsonl with a LLaVA-Qwen checkpoint, in batches.

    python -m llava.eval.model_vqa_loader --model-path CKPT --image-folder IMAGES \\
        --question-file questions.jsonl --answers-file answers.jsonl [--conv-mode qwen_2] [--batch-size 8]

Design choices
- `generate_answers` is the one generation loop: this CLI, ScienceQA, MMBench, the tiny-world evaluation and
  the lmms-eval plugin all call it. Prompts are built with the conversation template and tokenized with
  `tokenize_conversation` plus a generation prompt, so inference sees exactly the training layout.
- Batches are LEFT padded (generation appends on the right). The model keeps each row's padding side when
  it splices images in and position ids follow the mask, so under greedy decoding a batched answer equals
  the unbatched one (tested).
- A question's "image" is a file name under `image_folder`, a PIL image, or encoded image bytes (MMBench's
  base64, decoded lazily by the loader); a question without one is text-only, and one batch may mix both.
- Formats, flags and chunking (`--num-chunks/--chunk-idx`: contiguous chunks of ceil(n / k)) are LLaVA's;
  the conversation template and image aspect ratio default to the checkpoint's config.
- The answers file is written to a temporary file and renamed, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template, tokenize_conversation
from llava.mm_utils import process_images

logger = logging.getLogger(__name__)

DEFAULT_CONV_MODE = "qwen_2"


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


def model_name_from_path(model_path: str) -> str:
    """LLaVA's model_id: the folder name, or `parent_checkpoint-N` for a trainer checkpoint folder."""
    parts = os.path.normpath(os.path.expanduser(model_path)).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def default_conv_mode(model) -> str:
    """The checkpoint's own template, else the one of its LLM family (Qwen3's has no default system prompt)."""
    saved = getattr(model.config, "conv_template", None)
    if saved:
        return saved
    return "qwen_3" if getattr(model.config, "model_type", "").endswith("qwen3") else DEFAULT_CONV_MODE


class QuestionDataset(Dataset):
    """Questions -> (input_ids [T] with one IMAGE_TOKEN_INDEX per image, pixels [3, H, W] or None)."""

    def __init__(
        self,
        questions: Sequence[dict],
        image_folder: str | os.PathLike,
        tokenizer,
        image_processor,
        conv_mode: str,
        image_aspect_ratio: str = "pad",
    ):
        self.questions = questions
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        question = self.questions[index]
        text, image = question["text"], question.get("image")
        pixels = None
        if image is not None:
            if isinstance(image, bytes):
                image = Image.open(io.BytesIO(image))
            elif not isinstance(image, Image.Image):
                image = Image.open(os.path.join(self.image_folder, image))
            pixels = process_images([image.convert("RGB")], self.image_processor, self.image_aspect_ratio)[0]
            if DEFAULT_IMAGE_TOKEN not in text:
                text = DEFAULT_IMAGE_TOKEN + "\n" + text
        conv = get_conv_template(self.conv_mode)
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)  # generation prompt
        input_ids, _, _ = tokenize_conversation(conv, self.tokenizer)
        return input_ids, pixels


def collate_left_padded(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor | None]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> input_ids [B, T] left-padded with `pad_token_id`, attention_mask [B, T], images [n_img, 3, H, W]
    (None when no question of the batch has an image)."""
    ids, pixels = zip(*batch)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, width - len(row) :] = row
        attention_mask[b, width - len(row) :] = 1
    images = [p for p in pixels if p is not None]
    return input_ids, attention_mask, torch.stack(images) if images else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's eos ids plus ChatML's turn end `<|im_end|>` (answers end with it, see the templates)."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def generation_kwargs(
    model,
    tokenizer,
    temperature: float = 0.0,
    top_p: float | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 128,
) -> dict[str, Any]:
    """`generate` kwargs: greedy when temperature == 0, else sampling with temperature / top_p (as LLaVA)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "use_cache": True,
        "pad_token_id": pad,
        "eos_token_id": stop_token_ids(model, tokenizer),
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        kwargs["do_sample"] = False
    return kwargs


def generate_answers(
    model,
    tokenizer,
    image_processor,
    questions: Sequence[dict],
    image_folder: str | os.PathLike = "",
    conv_mode: str | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    image_aspect_ratio: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> list[str]:
    """Answer every question ({"text", optional "image": file name under `image_folder`, PIL image or bytes}).

    Returns the decoded replies (special tokens skipped, stripped) in the order of `questions`.
    `conv_mode` and `image_aspect_ratio` default to the checkpoint's `conv_template` / `image_aspect_ratio`.
    The model is put in eval mode for the call and given back in the mode it came in.
    """
    conv_mode = conv_mode or default_conv_mode(model)
    aspect = image_aspect_ratio or getattr(model.config, "image_aspect_ratio", None) or "pad"
    dataset = QuestionDataset(questions, image_folder, tokenizer, image_processor, conv_mode, aspect)
    gen_kwargs = generation_kwargs(model, tokenizer, temperature, top_p, num_beams, max_new_tokens)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(collate_left_padded, pad_token_id=gen_kwargs["pad_token_id"]),
    )
    device, dtype = model.device, model.dtype
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), desc="answering", disable=not progress) as bar:
            for input_ids, attention_mask, images in loader:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (B, T)
                if images is not None:
                    images = images.to(device=device, dtype=dtype)  # (n_img, 3, H, W)
                output = model.generate(input_ids, images=images, attention_mask=attention_mask, **gen_kwargs)
                answers += tokenizer.batch_decode(output, skip_special_tokens=True)  # new tokens only
                bar.update(len(input_ids))
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


def read_questions(path: str | os.PathLike) -> list[dict]:
    """A question jsonl (one JSON object a line; blank lines skipped)."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
