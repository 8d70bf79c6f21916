"""Score several checkpoints on the tiny test split, one row each: the main job's closing table.

    python -m aligntI_patch.report --world playground/tiny/data --output-dir OUT
        --model teacher=PATH --model sft=PATH --model align-ti=PATH

Prints the per-family table and writes it to OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llava.eval.eval_tiny import evaluate_tiny
from llava.tiny.score import format_table

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="tiny world directory (holds test_questions.jsonl)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="checkpoint to score")
    parser.add_argument("--output-dir", required=True, help="where results.md / results.json go")
    parser.add_argument("--split", default="test", help="test or val")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[report] %(message)s")

    rows = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--model {spec!r}: expected NAME=PATH with an existing checkpoint directory")
        logger.info("scoring %s (%s)", name, path)
        rows[name] = evaluate_tiny(path, args.world, split=args.split, batch_size=args.batch_size,
                                   device=args.device, progress=True)
    table = format_table(rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"Tiny world, {args.split} split (accuracy %)\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    sys.stdout.write(f"\n{table}\n\nwritten to {out}/results.md and results.json\n")


if __name__ == "__main__":
    main()
