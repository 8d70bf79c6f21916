"""Generation and prompting shared by evaluation, the CLI and demo, and the analysis tools: the template a
checkpoint was trained with, its stop tokens and sampling options, a left-padded question loader, and
`iter_answers` / `generate_answers`, the one batched generation loop (`model_vqa_loader`, ScienceQA, MMBench,
the tiny-world evaluation and the lmms-eval plugin all call it).

Design choices
- Prompts are built with the conversation template and tokenized with `tokenize_conversation` plus a
  generation prompt, so inference sees exactly the training layout.
- Batches are LEFT padded (generation appends on the right). The model keeps each row's padding side when
  it splices images in and position ids follow the mask, so under greedy decoding a batched answer equals
  the unbatched one (tested).
- A question's "image" is a file name under `image_folder`, a PIL image, or encoded image bytes (MMBench's
  base64, decoded lazily by the loader); a question without one is text-only, and one batch may mix both.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from functools import partial
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


def iter_answers(
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
) -> Iterator[list[str]]:
    """Answer `questions` batch by batch: yields the replies of each batch of `batch_size` questions, in order.

    Arguments and replies as `generate_answers` (which collects this generator); the answer-writing CLIs use it
    to write every batch as soon as it is generated. The model is in eval mode while the generator runs and is
    given back in the mode it came in when the generator ends, is closed, or is dropped.
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
    try:
        with tqdm(total=len(dataset), desc="answering", disable=not progress) as bar:
            for input_ids, attention_mask, images in loader:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (B, T)
                if images is not None:
                    images = images.to(device=device, dtype=dtype)  # (n_img, 3, H, W)
                with torch.inference_mode():  # not across the yield: the caller's code runs outside it
                    output = model.generate(input_ids, images=images, attention_mask=attention_mask, **gen_kwargs)
                replies = tokenizer.batch_decode(output, skip_special_tokens=True)  # new tokens only
                bar.update(len(input_ids))
                yield [a.strip() for a in replies]
    finally:
        model.train(was_training)


def generate_answers(model, tokenizer, image_processor, questions: Sequence[dict], *args, **kwargs) -> list[str]:
    """Answer every question ({"text", optional "image": file name under `image_folder`, PIL image or bytes}).

    Returns the decoded replies (special tokens skipped, stripped) in the order of `questions`. Arguments after
    `questions` are `iter_answers`' (image_folder, conv_mode, temperature, top_p, num_beams, max_new_tokens,
    batch_size; keywords image_aspect_ratio, num_workers, progress). `conv_mode` and `image_aspect_ratio`
    default to the checkpoint's `conv_template` / `image_aspect_ratio`. The model is put in eval mode for the
    call and given back in the mode it came in.
    """
    batches = iter_answers(model, tokenizer, image_processor, questions, *args, **kwargs)
    return [reply for replies in batches for reply in replies]


def read_questions(path: str | os.PathLike) -> list[dict]:
    """A question jsonl (one JSON object a line; blank lines skipped)."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
