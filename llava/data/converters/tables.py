"""Question/answer and caption tables -> LLaVA records.

Design choices:
- Column names are options, not guesses: `--question_key`, `--answer_key`, `--image_key`, `--caption_key`,
  `--id_key`. A JSON file may hold the rows in a list, under a key (`--records_key data`: TextVQA), or as an
  object of rows keyed by question id (GQA's question files; the key becomes the id).
- An image column holds a path or an id; `--image_format` turns it into a path ("gqa/images/{}.jpg",
  "COCO_train2014_{:012d}.jpg"), then `--input_root` / `--image_folder` place it (`common.ImagePaths`).
- An answer that is a list (VQAv2 / TextVQA: ten annotators) becomes its most frequent entry, ties to the
  earliest; entries may be strings or objects with an "answer" key.
- VQA: the question, then `--suffix` on a new line (LLaVA-1.5's short-answer prompt is `--short_answer`).
  `--max_turns K` joins up to K questions on the same image into one conversation in input order (as LLaVA-1.5's
  mix does); rows are then held until their image has K questions or the input ends.
- Captions: one record per caption, the caption as the answer to an instruction (`--prompt`, or one drawn per
  record from `--prompts_file` with `--seed`), as LCS-558K's records are. COCO's captions file
  (`{"images": [...], "annotations": [...]}`) is read directly: one record per caption (5 per image).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.converters.common import (
    JSON_LINES,
    ImagePaths,
    Item,
    Report,
    Skip,
    input_format,
    json_object,
    json_value_items,
    load_json,
    read_items,
)

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's prompt for short-answer VQA
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


def text_field(record: dict, key: str, what: str) -> str:
    """The non-empty string (numbers are turned into strings) under `key`; raises Skip."""
    if key not in record:
        raise Skip("missing_field", f"no {what} column {key!r} (columns: {', '.join(map(str, list(record)[:12]))})")
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise Skip("empty_text", f"{what} {key!r} is empty or not text: {value!r}")
    return value.strip()


def pick_answer(value) -> str:
    """A string answer, or the most frequent of a list of answers (ties: the earliest); raises Skip."""
    if isinstance(value, list):
        answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
        answers = [str(a).strip() for a in answers if isinstance(a, (str, int, float)) and str(a).strip()]
        if not answers:
            raise Skip("empty_text", "answer list holds no answer")
        counts = Counter(answers)
        return max(answers, key=lambda a: (counts[a], -answers.index(a)))
    if isinstance(value, bool) or value is None:
        raise Skip("empty_text", f"answer is {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise Skip("empty_text", f"answer is empty or not text: {value!r}")
    return value.strip()


def record_id(item: Item, row: dict, id_key: str | None, stem: str) -> str:
    if id_key and row.get(id_key) not in (None, ""):
        return str(row[id_key])
    return item.key if item.key is not None else f"{stem}-{item.index}"  # a dict of rows: its key (GQA's ids)


def conversation(image: str | None, pairs: list[tuple[str, str]]) -> list[dict]:
    """[(question, answer), ...] -> LLaVA turns, `<image>` leading the first question."""
    turns = []
    for i, (q, a) in enumerate(pairs):
        if i == 0 and image is not None:
            q = f"{DEFAULT_IMAGE_TOKEN}\n{q}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


class VQAConverter:
    """Rows with a question, an answer and an image -> LLaVA records (one, or up to `max_turns` per image)."""

    def __init__(self, paths: ImagePaths, report: Report, stem: str, question_key="question", answer_key="answer",
                 image_key="image", id_key="id", suffix="", max_turns=1):
        self.paths, self.report, self.stem = paths, report, stem
        self.question_key, self.answer_key, self.image_key, self.id_key = question_key, answer_key, image_key, id_key
        self.suffix, self.max_turns = suffix, max_turns
        self.pending: dict[str, list] = {}  # image -> [(id, question, answer)], in first-seen order

    def convert(self, item: Item) -> list[dict]:
        """Records ready to write after this row (none while a group waits for more questions)."""
        row = json_object(item)
        question = text_field(row, self.question_key, "question")
        if self.answer_key not in row:
            raise Skip("missing_field", f"no answer column {self.answer_key!r}")
        answer = pick_answer(row[self.answer_key])
        if self.image_key not in row:
            raise Skip("missing_field", f"no image column {self.image_key!r}")
        image = self.paths.resolve(self.paths.format(row[self.image_key]), self.report)
        if self.suffix:
            question = f"{question}\n{self.suffix}"
        entry = (record_id(item, row, self.id_key, self.stem), question, answer)
        if self.max_turns <= 1:
            return [self._record(image, [entry])]
        group = self.pending.setdefault(image, [])
        group.append(entry)
        if len(group) < self.max_turns:
            return []
        del self.pending[image]
        return [self._record(image, group)]

    def flush(self) -> list[dict]:
        """The groups still waiting at the end of the input, in first-seen order."""
        out = [self._record(image, group) for image, group in self.pending.items()]
        self.pending.clear()
        return out

    def _record(self, image: str, group: list) -> dict:
        return {"id": group[0][0], "image": image, "conversations": conversation(image, [(q, a) for _, q, a in group])}


def is_coco_captions(value) -> bool:
    """Whether a parsed JSON value is COCO's captions file: {"images": [...], "annotations": [...]}."""
    return isinstance(value, dict) and isinstance(value.get("images"), list) and \
        isinstance(value.get("annotations"), list)


def coco_caption_items(value: dict) -> Iterator[Item]:
    """COCO's captions file -> rows {id, image (file_name), caption}, one per annotation."""
    files = {img.get("id"): img.get("file_name") for img in value["images"] if isinstance(img, dict)}
    for index, ann in enumerate(value["annotations"]):
        if not isinstance(ann, dict):
            yield Item(index, ann)
            continue
        yield Item(index, {"id": ann.get("id"), "image": files.get(ann.get("image_id")), "caption": ann.get("caption")})


def caption_items(path: str, fmt: str = "auto", records_key: str | None = None) -> Iterator[Item]:
    """`read_items`, except that a COCO captions file is recognised and read as its caption rows."""
    if input_format(path, fmt) != "json" or records_key is not None:
        yield from read_items(path, fmt, records_key)
        return
    value = load_json(path)
    if value is JSON_LINES:
        yield from read_items(path, "jsonl")
    elif is_coco_captions(value):
        yield from coco_caption_items(value)
    else:
        yield from json_value_items(value, path)


class CaptionConverter:
    """(image, caption) rows -> pretrain-style LLaVA records: an instruction with `<image>`, the caption."""

    def __init__(self, paths: ImagePaths, report: Report, stem: str, image_key="image", caption_key="caption",
                 id_key="id", prompts=(DEFAULT_CAPTION_PROMPT,), seed=0):
        if not prompts:
            raise ValueError("no caption prompts given")
        self.paths, self.report, self.stem = paths, report, stem
        self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key
        self.prompts, self.seed = list(prompts), seed

    def convert(self, item: Item) -> list[dict]:
        row = json_object(item)
        if self.caption_key not in row:
            raise Skip("missing_field", f"no caption column {self.caption_key!r}")
        value = row[self.caption_key]
        captions = value if isinstance(value, list) else [value]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            raise Skip("empty_text", f"caption {self.caption_key!r} is empty or not text: {value!r}")
        if self.image_key not in row:
            raise Skip("missing_field", f"no image column {self.image_key!r}")
        image = self.paths.resolve(self.paths.format(row[self.image_key]), self.report)
        base = record_id(item, row, self.id_key, self.stem)
        out = []
        for k, caption in enumerate(captions):
            # one draw per output record, from (seed, input index, caption number): reruns give the same file
            prompt = random.Random(f"{self.seed}/{item.index}/{k}").choice(self.prompts)
            out.append({"id": base if len(captions) == 1 else f"{base}-{k}", "image": image,
                        "conversations": conversation(image, [(prompt, caption)])})
        return out
