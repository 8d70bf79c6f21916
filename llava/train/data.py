"""LLaVA conversation data: lazy dataset, typed tokenization, bad-input skipping, collator.

A bad sample (missing or corrupt image, a path escaping the image folder, a malformed record, no supervised
token left after truncation, visual tokens that would be cut) never stops a run once it started: it is
skipped, replaced by a good sample, logged with its index and path, and counted. Only the pre-flight before
step 1 stops a run, when more than --max_bad_fraction of the samples fail its cheap checks. Design choices:

- Replacement: index i is tried first, then indices drawn by `random.Random(i)`, then every index in file
  order after i. The same index therefore gives the same sample in every process and after a resume; a block
  of bad samples is not replaced by one neighbour repeated; only a dataset with no good sample is an error.
- Each process reports a bad sample once, the first time it meets it; the collator forwards these records in
  the batch (`skipped`), and the trainer keeps the unique (index, image, reason) ones of all processes.
- Schema: `"image"` absent, null or `[]` means text-only (null is what a JSON export of a mixed table writes
  for a missing value); a one-element list is that image; a longer list (LLaVA-OneVision multi-image) is
  skipped. Records, turns and values of the wrong JSON type are skipped with the reason.
- The `<image>` tag is moved to the front of the first human turn, as LLaVA's `preprocess_multimodal`
  does, so training has the layout of eval and the CLI (image first, then the instruction).
- One definition of "bad": the pure checks below (`check_record`: JSON structure and image files by stat;
  `read_image`; `truncate_sample`) are what `load` runs, what the pre-flight (`llava.data.check.preflight`,
  the cheap part) runs on every record, and what the dataset doctor (`python -m llava.data.check`) reports.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.conversation import Conversation, get_conv_template, tokenize_conversation
from llava.mm_utils import process_images

logger = logging.getLogger(__name__)
REPLACEMENT_DRAWS = 16  # random draws before the file-order scan; 16 all-bad draws at 50 % bad: p = 1.5e-5


BAD_KINDS = {  # kind -> what it means; the kinds of BadSample, the keys of the pre-flight and doctor counts
    "malformed": "record, turns or values of the wrong JSON type, or roles out of order",
    "multi_image": "more than one image (not supported)",
    "missing_image": "image file not found (or no --image_folder / vision tower to read it)",
    "escaping_image": "image path outside --image_folder ('../', absolute path)",
    "unreadable_image": "image file that does not decode",
    "visual_truncated": "visual tokens would be cut by --model_max_length",
    "no_supervised_token": "no answer token left after truncation",
}


class BadSample(Exception):
    """A sample that cannot be used; the message says why, `kind` (a key of BAD_KINDS) what kind of fault."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keeps `kind` through pickling (dataloader workers)
        return type(self), (str(self), self.kind)


def load_records(path: str) -> list:
    """A LLaVA JSON list, or JSON Lines (one record per line; `.jsonl`, or a `.json` file that holds JSONL).

    Errors name the file (and the line for JSONL); a UTF-8 byte-order mark is accepted."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--data_path {path!r} is a directory; give a .json or .jsonl file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data_path {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    if path.lower().endswith(".jsonl"):
        return _parse_jsonl(text, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _first_line_is_record(text):
            logger.info("%s holds one JSON value per line: reading it as JSON Lines", path)
            return _parse_jsonl(text, path)
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{path}: not valid JSON ({err.msg} at {where})") from err
    if isinstance(records, dict):
        raise ValueError(f"{path}: expected a JSON list of conversation records, got one object "
                         "(for JSON Lines, one record per line, name the file .jsonl)")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, not {type(records).__name__}")
    return records


def _first_line_is_record(text: str) -> bool:
    """Whether the first non-blank line alone is a JSON object: a JSON Lines file under a .json name."""
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _parse_jsonl(text: str, path: str) -> list:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg}, col {err.colno})") from err
    return records


def image_path(record: dict) -> str | None:
    """The record's image path relative to the image folder; None for a text-only record."""
    image = record.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise BadSample(f"multi-image samples are not supported ({len(image)} images)", "multi_image")
        image = image[0] if image else None
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise BadSample(f"'image' must be a non-empty path string, got {image!r}")
    return image


def turn_values(record: dict, has_image: bool) -> list[str]:
    """The record's turn texts (human, gpt, ...), checked; with an image, `<image>` leads the first one."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise BadSample("'conversations' must be a list of human/gpt pairs")
    values = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample(f"turn {i} is a {type(turn).__name__}, not a JSON object")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise BadSample(f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise BadSample(f"turn {i} 'value' must be a string, got {type(value).__name__}")
        if i == 0 and has_image:
            if value.count(DEFAULT_IMAGE_TOKEN) > 1:
                raise BadSample(f"{value.count(DEFAULT_IMAGE_TOKEN)} <image> tags for one image")
            # LLaVA's preprocess_multimodal: the image goes first wherever the tag was, the layout of eval/CLI
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        else:  # a tag without an image (or in a later turn) would desynchronise images and tokens
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        values.append(value)
    return values


def conversation_from(values: list[str], template: str, has_image: bool) -> Conversation:
    """Checked turn texts (`turn_values`) -> Conversation of `template`."""
    conv = get_conv_template(template)
    for i, value in enumerate(values):
        if template == "plain" and i == 0 and has_image:
            value = DEFAULT_IMAGE_TOKEN  # LLaVA's pretraining: the image alone, then the caption
        conv.append_message(conv.roles[i % 2], value)
    return conv


def build_conversation(record: dict, template: str, has_image: bool) -> Conversation:
    """LLaVA record -> Conversation; with an image, `<image>` goes to the front of the first human turn."""
    return conversation_from(turn_values(record, has_image), template, has_image)


def resolve_image(image_folder: str | None, rel_path: str) -> str:
    """The file that `rel_path` names under the absolute `image_folder`, checked by stat (no decode).

    Escapes are judged on the lexical path: `../` or an absolute path in the JSON escapes, a symlink inside
    the folder (playground/data/coco -> another disk, HF snapshots -> blobs/) does not."""
    if image_folder is None:
        raise BadSample("sample has an image but no --image_folder is given", "missing_image")
    path = os.path.normpath(os.path.join(image_folder, rel_path))
    if path != image_folder and not path.startswith(os.path.join(image_folder, "")):  # both normalised
        raise BadSample(f"image path escapes the image folder: {rel_path!r}", "escaping_image")
    if not os.path.isfile(path):
        raise BadSample(f"image file not found: {path}", "missing_image")
    return path


def read_image(path: str) -> Image.Image:
    """The decoded RGB image at `path`; BadSample if the file does not decode."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt files
        raise BadSample(f"unreadable image {path}: {err}", "unreadable_image") from err


def check_record(record, image_folder: str | None) -> tuple[str | None, list[str]]:
    """The cheap checks of one record, as `load` and the pre-flight run them: JSON structure, roles, and the
    image file by stat. -> (image file, None for text-only; checked turn texts); raises BadSample."""
    if not isinstance(record, dict):
        raise BadSample(f"record is a {type(record).__name__}, not a JSON object")
    rel_path = image_path(record)
    image_file = resolve_image(image_folder, rel_path) if rel_path is not None else None
    return image_file, turn_values(record, image_file is not None)


def truncate_sample(
    input_ids: torch.Tensor, labels: torch.Tensor, token_types: torch.Tensor, model_max_length: int,
    num_image_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut [T] tensors to `model_max_length` counted after image expansion (N_v = `num_image_tokens`
    positions per image); BadSample if visual tokens would be cut or no supervised token is left."""
    is_image = input_ids == IMAGE_TOKEN_INDEX
    expanded = torch.where(is_image, max(num_image_tokens, 1), 1).cumsum(0)  # end position of each token
    if int(expanded[-1]) > model_max_length:
        keep = int((expanded <= model_max_length).sum())
        if bool(is_image[keep:].any()):
            raise BadSample(f"visual tokens would be cut by model_max_length={model_max_length}",
                            "visual_truncated")
        input_ids, labels, token_types = input_ids[:keep], labels[:keep], token_types[:keep]
    if not bool((labels != IGNORE_INDEX).any()):
        raise BadSample(f"no supervised token left (model_max_length={model_max_length})",
                        "no_supervised_token")
    return input_ids, labels, token_types


def skip_entry(index: int, record, err: BadSample) -> dict:
    """A bad sample's record, as logged, listed in skipped_samples.json and reported by the pre-flight."""
    record = record if isinstance(record, dict) else {}
    return {"index": index, "id": record.get("id"), "image": record.get("image"), "kind": err.kind,
            "reason": str(err)}


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
        # not realpath: symlinks inside the folder (playground/data/coco -> another disk, HF snapshots ->
        # blobs/) are the usual layout; escapes are judged on the lexical path (`resolve_image`)
        self.image_folder = os.path.abspath(image_folder) if image_folder else None
        self.template = template
        self.model_max_length = model_max_length
        self.num_image_tokens = num_image_tokens
        self.image_aspect_ratio = image_aspect_ratio
        self.skip_log_limit = skip_log_limit
        self._bad: dict[int, dict] = {}  # index -> skip record, for the bad samples this process has met

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough lengths (words), negative for text-only samples (LLaVA's convention for grouping).

        Tolerant of malformed records: those are skipped when loaded, not here at sampler construction."""
        lengths = []
        for r in self.records:
            turns = r.get("conversations") if isinstance(r, dict) else None
            turns = turns if isinstance(turns, list) else []
            values = [t.get("value") for t in turns if isinstance(t, dict)]
            words = sum(len(v.split()) for v in values if isinstance(v, str))
            has_image = isinstance(r, dict) and r.get("image") not in (None, [])
            lengths.append(words if has_image else -words)
        return lengths

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for i in self._candidates(index):
            if i in self._bad:  # already reported by this process
                continue
            try:
                item = self.load(i)
            except BadSample as err:
                skipped.append(self._record_skip(i, err))
                continue
            item["skipped"] = skipped
            return item
        example = next(iter(self._bad.values()))
        raise RuntimeError(
            f"{self.data_path}: none of its {len(self.records)} samples is usable "
            f"(e.g. sample {example['index']}: {example['reason']})"
        )

    def _candidates(self, index: int) -> Iterator[int]:
        """`index`, then draws seeded by it, then the rest in file order: the same in every process."""
        n = len(self.records)
        yield index
        rng = random.Random(index)
        for _ in range(REPLACEMENT_DRAWS):
            yield rng.randrange(n)
        for step in range(1, n):
            yield (index + step) % n

    def _record_skip(self, i: int, err: BadSample) -> dict:
        skip = skip_entry(i, self.records[i], err)
        self._bad[i] = skip
        if len(self._bad) <= self.skip_log_limit:
            logger.warning("Skipping sample %d (id=%s, image=%s): %s", i, skip["id"], skip["image"], err)
        elif len(self._bad) == self.skip_log_limit + 1:
            logger.warning("More than %d bad samples in %s: no longer logged one by one, all are listed in "
                           "skipped_samples.json (their count: skipped_samples in the training logs)",
                           self.skip_log_limit, self.data_path)
        return skip

    def load(self, i: int) -> dict:
        """Sample i as tensors; raises BadSample if it cannot be used."""
        image_file, values = check_record(self.records[i], self.image_folder)
        image = self.process_image(image_file) if image_file is not None else None
        conv = conversation_from(values, self.template, image is not None)
        input_ids, labels, token_types = tokenize_conversation(conv, self.tokenizer)
        input_ids, labels, token_types = truncate_sample(input_ids, labels, token_types,
                                                         self.model_max_length, self.num_image_tokens)
        return {"input_ids": input_ids, "labels": labels, "token_types": token_types, "image": image}

    def process_image(self, path: str) -> torch.Tensor:
        """The processed image file at `path`: [3, H, W]."""
        if self.image_processor is None:
            raise BadSample("sample has an image but no vision tower (image processor) is configured",
                            "missing_image")
        return process_images([read_image(path)], self.image_processor, self.image_aspect_ratio)[0]


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
    """LLaVA's helper: {'train_dataset', 'eval_dataset', 'data_collator'}, after the data pre-flight (raises
    `llava.data.check.PreflightError` when more than `data_args.max_bad_fraction` of the samples are bad)."""
    from llava.data.check import preflight  # the dataset doctor builds on this module's checks
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
    preflight(dataset, data_args.max_bad_fraction)
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id),
    }
