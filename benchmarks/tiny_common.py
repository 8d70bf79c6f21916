"""Command-line pieces shared by the tiny-world learnability benches."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llava.tiny.preset import preset_paths


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, default=preset_paths()["tokenizer"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def setup(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Check the tokenizer, set threads and seed; -> the tiny tokenizer."""
    if not (args.tokenizer / "tokenizer.json").is_file():
        parser.error(f"no tokenizer at {args.tokenizer}: run `python -m llava.tiny.preset prepare` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return AutoTokenizer.from_pretrained(args.tokenizer)
