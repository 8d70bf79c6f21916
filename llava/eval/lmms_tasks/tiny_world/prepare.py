"""Write the jsonl the `tiny_world` lmms-eval tasks read, from a generated tiny world.

    python -m llava.eval.lmms_tasks.tiny_world.prepare [--world playground/tiny/data] [--split test]

One row per question: question_id, image_path (absolute, so lmms-eval may run from anywhere), question (the
user's text without `<image>`), family, answer, options (choice questions, else null) and heldout. The
task YAMLs read `playground/tiny/data/lmms_eval/test.jsonl` relative to the working directory: run this and
lmms-eval from the repository root, or pass `--out` and edit `data_files`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from llava.constants import DEFAULT_IMAGE_TOKEN

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("playground/tiny/data/lmms_eval")


def task_rows(world_dir: str | os.PathLike, split: str = "test") -> list[dict]:
    """The rows of `split` ({split}.json of a generated world)."""
    world_dir = Path(world_dir).resolve()
    records = json.loads((world_dir / f"{split}.json").read_text(encoding="utf-8"))
    rows = []
    for record in records:
        question = record["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        rows.append({
            "question_id": record["id"],
            "image_path": str(world_dir / "images" / record["image"]),
            "question": question,
            "family": record["family"],
            "answer": record["answer"],
            "options": record.get("options"),
            "heldout": bool(record.get("heldout", False)),
        })  # fmt: skip
    return rows


def write_task_jsonl(world_dir: str | os.PathLike, out: str | os.PathLike, split: str = "test") -> Path:
    """Write `task_rows` to `out` (a .jsonl file, or a folder that gets `{split}.jsonl`) atomically."""
    out = Path(out)
    if out.suffix != ".jsonl":
        out = out / f"{split}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in task_rows(world_dir, split))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="playground/tiny/data", help="a generated tiny world")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder (gets SPLIT.jsonl) or .jsonl file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_task_jsonl(args.world, args.out, args.split)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
