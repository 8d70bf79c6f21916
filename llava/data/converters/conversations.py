"""LLaVA / ShareGPT-style conversation records -> the LLaVA JSON training reads, checked and normalised.

Design choices:
- The end check is training's own (`llava.train.data.image_path` + `turn_values`), so a record written here
  passes the cheap checks of `LazySupervisedDataset` and the dataset doctor, the image file aside (checked
  here by stat against `--image_folder`).
- Roles: `human`/`user` -> human, `gpt`/`assistant` -> gpt (ShareGPT exports use both spellings). Turns before
  the first human turn (a `system` prompt, a greeting by the assistant) and an unanswered last human turn are
  dropped and counted as fixes; two turns of one role in a row, or a `system` turn later on, skip the record.
- `<image>`: with an image, exactly one tag, at the front of the first human turn (`<image>\\n` + text), the
  layout training builds anyway and the one LLaVA's own data mostly has; a missing tag is added, a tag in a
  later turn moved. Two or more tags for one image skip the record (it is likely multi-image data). Without
  an image, tags are removed. Every change is counted.
- `image`: a one-element list becomes its string; more than one image skips the record (not supported).
- A missing `id` becomes `<file stem>-<index>`; other keys are kept as they are.
- ShareGPT4V's files are LLaVA JSON whose image paths start with the folders of its data page; `sharegpt4v`
  counts records and missing images per folder and maps folders to where the user keeps them (`--map`).
"""

from __future__ import annotations

import os

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.converters.common import ImagePaths, Item, Report, Skip, json_object
from llava.train.data import BadSample, image_path, turn_values

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}

# Leading folders of the image paths in ShareGPT4V's three JSON files and of llava_v1_5_mix665k.json
# (ShareGPT4V docs/Data.md and LLaVA's README; what each folder holds: docs/data.md).
SHAREGPT4V_FOLDERS = (
    "coco/train2017", "llava/llava_pretrain/images", "sam/images", "gqa/images", "ocr_vqa/images",
    "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2", "share_textvqa/images", "web-celebrity/images",
    "web-landmark/images", "wikiart/images",
)


def normalise_turns(turns, fixes) -> list[list[str]]:
    """`conversations` -> [[role, value], ...] alternating human/gpt, starting with human; raises Skip."""
    if not isinstance(turns, list) or not turns:
        raise Skip("malformed", "'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Skip("malformed", f"turn {i} is a {type(turn).__name__}, not a JSON object")
        role, value = ROLES.get(turn.get("from")), turn.get("value")
        if role is None:
            raise Skip("malformed", f"turn {i} is from {turn.get('from')!r} (known: {', '.join(ROLES)})")
        if not isinstance(value, str):
            raise Skip("malformed", f"turn {i} 'value' must be a string, got {type(value).__name__}")
        out.append([role, value])
    while out and out[0][0] != "human":
        fixes[f"dropped a leading {out.pop(0)[0]} turn"] += 1
    if out and out[-1][0] == "human":
        out.pop()
        fixes["dropped an unanswered last human turn"] += 1
    if not out:
        raise Skip("malformed", "no human/gpt pair")
    for i, (role, _) in enumerate(out):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise Skip("malformed", f"turn {i} (after dropping leading turns) is {role!r}, expected {expected!r}")
    return out


def place_image_tag(turns: list[list[str]], has_image: bool, fixes) -> None:
    """One `<image>` at the front of the first human turn with an image, none without; in place."""
    tags = sum(value.count(DEFAULT_IMAGE_TOKEN) for _, value in turns)
    if not has_image:
        if tags:
            fixes["removed <image> tags of a record without image"] += 1
            for turn in turns:
                turn[1] = turn[1].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        return
    if tags > 1:
        raise Skip("malformed", f"{tags} <image> tags for one image")
    first = turns[0][1]
    if tags == 0:
        fixes["added the missing <image> tag"] += 1
    elif DEFAULT_IMAGE_TOKEN not in first:
        fixes["moved <image> from a later turn to the first"] += 1
        for turn in turns[1:]:
            turn[1] = turn[1].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    # the expression of training's turn_values, so what is written is what training would build
    placed = (DEFAULT_IMAGE_TOKEN + "\n" + first.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
    if tags and DEFAULT_IMAGE_TOKEN in first and placed != first:
        fixes["moved <image> to the front of the first turn"] += 1
    turns[0][1] = placed


def image_folder_of(path: str, folders=SHAREGPT4V_FOLDERS) -> str:
    """The longest known folder `path` starts with, else its first component marked unknown."""
    known = [f for f in folders if path.startswith(f + "/")]
    if known:
        return max(known, key=len)
    head = path.split("/", 1)[0] if "/" in path else "."
    return f"{head}/ (unknown)"


def normalise_record(item: Item, paths: ImagePaths, report: Report, stem: str,
                     count_folders: bool = False) -> dict:
    """One LLaVA / ShareGPT-style record -> a checked LLaVA record; raises Skip."""
    record = json_object(item)
    fixes = report.fixes
    image = record.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise Skip("multi_image", f"{len(image)} images (multi-image records are not supported)")
        image = image[0] if image else None
    turns = normalise_turns(record.get("conversations"), fixes)
    place_image_tag(turns, image is not None, fixes)
    if image is not None:
        folder = image_folder_of(image) if count_folders and isinstance(image, str) else None
        try:
            image = paths.resolve(image, report)
        except Skip as err:
            if folder:
                report.groups[(folder, err.kind)] += 1
            raise
        if folder:
            report.groups[(folder, "ok")] += 1
    elif count_folders:
        report.groups[("(text only)", "ok")] += 1
    out = {"id": record.get("id")}
    if out["id"] is None:
        out["id"] = f"{stem}-{item.key or item.index}"
        fixes["added a missing id"] += 1
    if image is not None:
        out["image"] = image
    out["conversations"] = [{"from": role, "value": value} for role, value in turns]
    out.update((k, v) for k, v in record.items() if k not in ("id", "image", "conversations"))
    try:  # training's own structure check: what it would skip, this must not write
        turn_values(out, image_path(out) is not None)
    except BadSample as err:
        raise Skip(err.kind, str(err)) from err
    return out


def file_stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
