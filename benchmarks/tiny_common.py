"""Pieces shared by the tiny-world learnability benches: command-line set-up and the scene as word slots."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llava.tiny.preset import preset_paths
from llava.tiny.scenes import Scene

GRID_CELLS = 9


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


def cell_phrases(scene: Scene) -> list[str | None]:
    """What each grid cell (row-major) holds, in words; None for an empty cell."""
    phrases: list[str | None] = [None] * GRID_CELLS
    for o in scene.objects:
        phrases[o.row * 3 + o.col] = f" {o.size} {o.color} {o.shape}"
    if scene.text is not None:
        row, col = scene.text_cell
        phrases[row * 3 + col] = f" {scene.text}"
    return phrases


def slot_embeddings(cells: list[list[int] | None], embed: torch.nn.Embedding) -> torch.Tensor:
    """[9, H]: the mean input embedding of each cell's words (zeros for an empty cell)."""
    out = embed.weight.new_zeros(GRID_CELLS, embed.embedding_dim)
    full = [i for i, c in enumerate(cells) if c is not None]
    means = torch.stack([embed(torch.tensor(cells[i], device=out.device)).mean(0) for i in full])
    return out.index_copy(0, torch.tensor(full, device=out.device), means)
