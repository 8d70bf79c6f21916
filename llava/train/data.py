"""LLaVA conversation data: lazy dataset, typed tokenization, bad-input skipping, collator.

A bad sample (missing or corrupt image, a path escaping the image folder, no supervised token left after
truncation, visual tokens that would be cut) never stops a run: it is skipped, replaced by the next good
sample, logged with its index and path, and counted. The collator forwards the skip records in the batch
(`skipped`), so the trainer counts them in the main process whatever the number of dataloader workers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.conversation import get_conv_template, tokenize_conversation
from llava.mm_utils import process_images

logger = logging.getLogger(__name__)
MAX_REPLACEMENT_TRIES = 50


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


def load_records(path: str) -> list[dict]:
    """A LLaVA JSON list, or JSONL (one record per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_path {path!r} does not exist")
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of conversation records")
    return records


def build_conversation(record: dict, template: str, has_image: bool):
    """LLaVA record -> Conversation with `<image>` at the start of the first human turn (if not already there)."""
    conv = get_conv_template(template)
    turns = record.get("conversations")
    if not turns or len(turns) % 2:
        raise BadSample("'conversations' must hold human/gpt pairs")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise BadSample(f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        value = turn.get("value", "")
        if i == 0 and has_image:
            if value.count(DEFAULT_IMAGE_TOKEN) > 1:
                raise BadSample(f"{value.count(DEFAULT_IMAGE_TOKEN)} <image> tags for one image")
            if DEFAULT_IMAGE_TOKEN not in value:
                value = DEFAULT_IMAGE_TOKEN + "\n" + value
        else:  # a tag without an image (or in a later turn) would desynchronise images and tokens
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if template == "plain" and i == 0 and has_image:
            value = DEFAULT_IMAGE_TOKEN  # LLaVA's pretraining: the image alone, then the caption
        conv.append_message(conv.roles[i % 2], value)
    return conv


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Tokenizes on access. Items: input_ids, labels, token_types [T], image [3,H,W] or None, skipped list."""

    def __init__(
        self,
        data_path: str,
        tokenizer,
        image_processor=None,
        image_folder: str | None = None,
        template: str = "qwen_2",
        model_max_length: int = 2048,
        num_image_tokens: int = 0,
        image_aspect_ratio: str = "pad",
        skip_log_limit: int = 20,
    ):
        self.records = load_records(data_path)
        if not self.records:
            raise ValueError(f"{data_path} holds no samples")
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_folder = os.path.realpath(image_folder) if image_folder else None
        self.template = template
        self.model_max_length = model_max_length
        self.num_image_tokens = num_image_tokens
        self.image_aspect_ratio = image_aspect_ratio
        self.skip_log_limit = skip_log_limit
        self._logged = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough lengths (words), negative for text-only samples (LLaVA's convention for grouping)."""
        lengths = []
        for r in self.records:
            words = sum(len(t.get("value", "").split()) for t in r.get("conversations", []))
            lengths.append(words if "image" in r else -words)
        return lengths

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(MAX_REPLACEMENT_TRIES):
            i = (index + attempt) % len(self.records)
            try:
                item = self.load(i)
            except BadSample as err:
                record = self.records[i]
                skip = {"index": i, "id": record.get("id"), "image": record.get("image"), "reason": str(err)}
                skipped.append(skip)
                if self._logged < self.skip_log_limit:
                    logger.warning("Skipping sample %d (id=%s, image=%s): %s", i, skip["id"], skip["image"], err)
                    self._logged += 1
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"{MAX_REPLACEMENT_TRIES} consecutive bad samples from index {index} in {self.data_path}")

    def load(self, i: int) -> dict:
        record = self.records[i]
        image = self.load_image(record) if "image" in record else None
        conv = build_conversation(record, self.template, image is not None)
        input_ids, labels, token_types = tokenize_conversation(conv, self.tokenizer)
        input_ids, labels, token_types = self.truncate(input_ids, labels, token_types)
        return {"input_ids": input_ids, "labels": labels, "token_types": token_types, "image": image}

    def load_image(self, record: dict) -> torch.Tensor:
        if self.image_folder is None or self.image_processor is None:
            raise BadSample("sample has an image but no --image_folder / vision tower is configured")
        path = os.path.realpath(os.path.join(self.image_folder, record["image"]))
        if os.path.commonpath([path, self.image_folder]) != self.image_folder:
            raise BadSample(f"image path escapes the image folder: {record['image']!r}")
        if not os.path.isfile(path):
            raise BadSample(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                pil = img.convert("RGB")
        except Exception as err:  # PIL raises many types for corrupt files
            raise BadSample(f"unreadable image {path}: {err}") from err
        return process_images([pil], self.image_processor, self.image_aspect_ratio)[0]

    def truncate(self, input_ids, labels, token_types):
        """Cut to `model_max_length` counted after image expansion; reject if visual tokens would be cut."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        expanded = torch.where(is_image, max(self.num_image_tokens, 1), 1).cumsum(0)  # end position of each
        if int(expanded[-1]) > self.model_max_length:
            keep = int((expanded <= self.model_max_length).sum())
            if bool(is_image[keep:].any()):
                raise BadSample(f"visual tokens would be cut by model_max_length={self.model_max_length}")
            input_ids, labels, token_types = input_ids[:keep], labels[:keep], token_types[:keep]
        if not bool((labels != IGNORE_INDEX).any()):
            raise BadSample(f"no supervised token left (model_max_length={self.model_max_length})")
        return input_ids, labels, token_types


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads to the longest sample; stacks the images of the samples that have one, in order."""

    pad_token_id: int

    def __call__(self, instances: list[dict]) -> dict:
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [x["input_ids"] for x in instances], batch_first=True, padding_value=self.pad_token_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX
        )
        token_types = torch.nn.utils.rnn.pad_sequence(
            [x["token_types"] for x in instances], batch_first=True, padding_value=int(TokenType.PAD)
        )
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": (token_types != TokenType.PAD).long(),
            "token_types": token_types,
        }
        images = [x["image"] for x in instances if x.get("image") is not None]
        if images:
            batch["images"] = torch.stack(images)
        skipped = [s for x in instances for s in x.get("skipped", ())]
        if skipped:
            batch["skipped"] = skipped
        return batch


def make_supervised_data_module(tokenizer, data_args, training_args, image_processor=None, num_image_tokens=0,
                                template="qwen_2") -> dict:
    """LLaVA's helper: {'train_dataset', 'eval_dataset', 'data_collator'}."""
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        image_processor=image_processor,
        image_folder=data_args.image_folder,
        template=template,
        model_max_length=training_args.model_max_length,
        num_image_tokens=num_image_tokens,
        image_aspect_ratio=data_args.image_aspect_ratio,
        skip_log_limit=training_args.skip_log_limit,
    )
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id),
    }
