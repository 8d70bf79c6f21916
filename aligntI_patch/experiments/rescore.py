"""Rescoring an out dir on other splits of the world: the kept students, nothing retrained.

    python -m aligntI_patch.experiments rescore --out DIR --val-split val_large=4200

A small val split (the preset's: 43 questions per family) makes the budget grid's choice noisy; a larger one
drawn like it (`llava.tiny.world.add_eval_split`) can replace it after cells have finished, from the weights
they kept (`run --keep-checkpoints`).

Design choices
- Only what changes: the named splits of the teacher and of every finished cell; a finished cell without its
  student's weights is named and nothing changes (delete its dir to retrain it).
- Stop the runners of DIR first: a cell being trained (its lock held) makes rescore refuse. setup.json gets a
  `rescoring` entry before the first cell, so a runner started meanwhile is refused (its setup differs), and
  the new setup only after the last cell, teacher.json and results.jsonl.
- Resumable: a rescored cell records the split it was scored on in its row (`splits`: {"val": "val_large"}),
  so a second call (after a crash, or a second process sharing the work through the cells' locks) skips it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aligntI_patch.experiments.context import has_weights
from aligntI_patch.experiments.runner import claimed, percent, shared_files, write_json

SPLIT_KEYS = {"test": "test_split", "val": "val_split"}  # split -> its name's key in setup.json


class Scorer(Protocol):
    """What rescore needs (`cell.DistillBackend`; tests pass a fake)."""

    def identity(self) -> dict: ...

    def evaluate(self, checkpoint: Path, answers_dir: Path | None = None,
                 splits: tuple[str, ...] = ...) -> dict[str, dict]: ...

    def evaluate_teacher(self, splits: tuple[str, ...] = ...) -> dict[str, dict]: ...


def _name(identity: dict, split: str) -> str:
    return identity.get(SPLIT_KEYS[split], split)


def rescore(out: Path | str, backend: Scorer, write: Callable[[str], object] = lambda s: None) -> list[str]:
    """Score the teacher and every finished cell of `out` on the splits whose names `backend.identity()` changes
    (its other fields must equal setup.json's); the ids of the cells rescored now."""
    out = Path(out)
    target = backend.identity()
    with shared_files(out):
        saved = json.loads((out / "setup.json").read_text())
        base = {k: v for k, v in saved.items() if k != "rescoring"}
        if saved.get("rescoring") not in (None, target):
            raise ValueError(f"{out} is being rescored to {saved['rescoring']}, not {target}: finish that first")
        others = {k: (base.get(k), target.get(k)) for k in sorted(base.keys() | target.keys())
                  if k not in SPLIT_KEYS.values() and base.get(k) != target.get(k)}
        if others:
            raise ValueError(f"rescore changes split names only; these differ from {out}/setup.json: {others}")
        splits = tuple(s for s in SPLIT_KEYS if _name(base, s) != _name(target, s))
        if not splits:
            write(f"{out} is scored on {target.get('test_split', 'test')} / {target.get('val_split', 'val')}: "
                  "nothing to do\n")
            return []
        results = sorted((out / "cells").glob("*/result.json"))
        busy = [d.name for d in sorted((out / "cells").glob("*")) if d.is_dir() and not (d / "result.json").exists()
                and _held(out, d.name)]
        if busy:
            raise RuntimeError(f"cells of {out} are being trained ({busy}): stop its runners first")
        wanted = {s: _name(target, s) for s in splits}
        todo = [p for p in results if json.loads(p.read_text()).get("splits", {}) != wanted]
        lost = [p.parent.name for p in todo if not has_weights(p.parent / "student")]
        if lost:
            raise FileNotFoundError(f"finished cells of {out} without their student's weights (run without "
                                    f"--keep-checkpoints?), nothing rescored: {lost}")
        write_json(out / "setup.json", {**base, "rescoring": target})
    write(f"rescoring {len(todo)} of {len(results)} finished cells on {wanted}\n")
    done = []
    for i, path in enumerate(todo, 1):
        cell = path.parent.name
        with claimed(out, cell) as mine:
            row = json.loads(path.read_text())
            if not mine or row.get("splits", {}) == wanted:
                continue  # another rescore process has it
            acc, n = percent(backend.evaluate(path.parent / "student", path.parent, splits))
            old = {s: row[s].get("overall") for s in splits}
            row |= acc
            row["n"] = {**row.get("n", {}), **n}
            row["splits"] = wanted
            write_json(path, row)
            done.append(cell)
            write(f"[{i}/{len(todo)}] {cell}: " + ", ".join(f"{s} overall {old[s]:.1f} -> {acc[s]['overall']:.1f}"
                                                            for s in splits) + "\n")
    with shared_files(out):
        if any(json.loads(p.read_text()).get("splits", {}) != wanted for p in results):
            write("other cells are still being rescored by another process; it finishes the out dir\n")
            return done
        teacher = json.loads((out / "teacher.json").read_text())
        write_json(out / "teacher.json", {**teacher, **percent(backend.evaluate_teacher(splits))[0]})
        rows = [json.loads(p.read_text()) for p in results]
        tmp = out / f".results.jsonl.{os.getpid()}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, out / "results.jsonl")
        write_json(out / "setup.json", target)
    write(f"{out} is now scored on {wanted}: run the grids with the same split flags\n")
    return done


def _held(out: Path, cell: str) -> bool:
    with claimed(out, cell) as mine:
        return not mine
