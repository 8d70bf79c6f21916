"""Running a grid into an out dir: resumable cells, one JSONL row per cell, the teacher scored once.

Layout of DIR (the report reads only these files):
- `setup.json`: teacher, pretrain, world, vision tower and template shared by every cell; a run into DIR with
  other ones is refused (its numbers would not be comparable).
- `teacher.json`: the teacher's {split: summary}, evaluated on the first run.
- `grids/<grid>.json`: the grid's paper reference, claims and the cells it asked for (variant, epochs, data
  fraction, seed -> cell id), merged over runs (more seeds later extend it).
- `cells/<cell-id>/`: cell.json (what it trains), train.log, student/ (recipe.json, irs.json, ...), and
  result.json, written last: a cell with it is finished and never rerun; a cell dir without it was interrupted:
  the same cell (cell.json) with a trainer checkpoint (`Backend.resume_point`) resumes from it, any other is
  deleted and trained again from the start.
- `results.jsonl`: one row per finished cell (result.json's content; rows missing after a crash between the
  two writes are appended on the next run). Accuracies are percentages.
- `.lock` and `locks/<cell-id>.lock`: OS locks (released when a process ends, however it ends). Several runners
  may share DIR (one per core, node or GPU, on a file system with working `flock`): each cell is trained by
  the runner that claims it first, the others pass it by; the shared files are written under `.lock`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from aligntI_patch.experiments.cell import Outcome
from aligntI_patch.experiments.context import REPO
from aligntI_patch.experiments.grids import Cell, Grid, canonical_options

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """What the runner needs to train and score (`cell.DistillBackend`; tests pass a fake)."""

    def identity(self) -> dict: ...

    def describe(self, cell: Cell, cell_dir: Path) -> str: ...

    def resume_point(self, cell: Cell, cell_dir: Path) -> Path | None: ...

    def evaluate_teacher(self) -> dict[str, dict]: ...

    def train_and_evaluate(self, cell: Cell, cell_dir: Path) -> Outcome: ...


def write_json(path: Path, data) -> None:
    """Write atomically (a crash leaves the old file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def provenance() -> dict:
    """The git commit of the code (with '+dirty' for uncommitted changes to tracked files) and the host."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        commit += "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    except OSError:
        commit = "unknown"
    return {"commit": commit, "host": socket.gethostname()}


def percent(summaries: dict[str, dict]) -> tuple[dict, dict]:
    """({split: {family: accuracy %}}, {split: {family: n}}) from evaluate_tiny's summaries."""
    acc = {s: {f: 100 * v["accuracy"] for f, v in summary.items()} for s, summary in summaries.items()}
    return acc, {s: {f: v["n"] for f, v in summary.items()} for s, summary in summaries.items()}


def make_row(cell: Cell, outcome: Outcome, wall_s: float, prov: dict) -> dict:
    acc, n = percent(outcome.scores)
    return {"grid": cell.grid, "cell": cell.id, "variant": cell.variant, "recipe": cell.recipe,
            "options": canonical_options(cell.recipe, cell.options), "seed": cell.seed, "epochs": cell.epochs,
            "data_fraction": cell.data_fraction, "extra_args": list(cell.extra_args), **acc, "n": n,
            "wall_s": round(wall_s, 1), **outcome.timings, **prov,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def read_rows(out: Path) -> dict[str, dict]:
    """results.jsonl as {cell id: row} (a later row of the same cell wins)."""
    path = out / "results.jsonl"
    if not path.is_file():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut by a crash: its cell's result.json restores the row
            logger.warning("%s line %d is not JSON: skipped", path, number)
            continue
        if row is not None:
            rows[row["cell"]] = row
    return rows


def append_row(out: Path, row: dict) -> None:
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(out / "results.jsonl", "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # after a line cut by a crash, start a new one
        f.write(line.encode("utf-8"))


@contextmanager
def shared_files(out: Path) -> Iterator[None]:
    """Exclusive use of DIR's shared files (setup, grids/, teacher.json, results.jsonl) among the runners of DIR;
    waits while another runner writes them."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def claimed(out: Path, cell_id: str) -> Iterator[bool]:
    """Whether this runner holds the cell (False: another runner of DIR is training it); held until the exit."""
    locks = out / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{cell_id}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True


def check_setup(out: Path, identity: dict) -> None:
    """Record the shared setup on the first run; refuse a later run with another one."""
    path = out / "setup.json"
    if not path.is_file():
        write_json(path, identity)
        return
    saved = json.loads(path.read_text())
    # both ways: a key recorded but absent now (a field back at its default, e.g. a run without the --test-split
    # of the out dir) changes the setup as much as a new one
    changed = {k: (saved.get(k), identity.get(k)) for k in sorted(saved.keys() | identity.keys())
               if saved.get(k) != identity.get(k)}
    if changed:
        raise ValueError(f"{out} holds cells of another setup ({changed}, as (recorded, now)): use another --out")


def record_grid(out: Path, grid: Grid, cells: list[Cell]) -> None:
    """grids/<grid>.json: the grid's definition and every cell it asked for, merged with earlier runs."""
    path = out / "grids" / f"{grid.name}.json"
    entries = json.loads(path.read_text())["cells"] if path.is_file() else []
    known = {e["cell"] for e in entries}
    variants = {v.name: v for v in grid.variants}
    for c in cells:
        if c.id not in known:
            v = variants[c.variant]
            entries.append({"variant": c.variant, "recipe": c.recipe, "options": canonical_options(c.recipe, c.options),
                            "epochs": c.epochs, "data_fraction": c.data_fraction, "seed": c.seed, "cell": c.id,
                            "series": v.series, "x": v.x, "extra_args": list(c.extra_args)})
            known.add(c.id)
    for e in entries:  # entries recorded before options were
        if "options" not in e and e["variant"] in variants:
            e["options"] = canonical_options(e["recipe"], variants[e["variant"]].options)
    order = [v.name for v in grid.variants]
    write_json(path, {"grid": grid.name, "paper": grid.paper, "split": grid.split, "x_label": grid.x_label,
                      "variants": order, "paper_rows": {v.name: v.paper for v in grid.variants if v.paper},
                      "claims": [asdict(c) for c in grid.claims], "cells": entries})


def sync_rows(out: Path) -> None:
    """Append the rows of finished cells that results.jsonl lacks (a crash between result.json and the append)."""
    rows = read_rows(out)
    for result in sorted((out / "cells").glob("*/result.json")):
        row = json.loads(result.read_text())
        if row["cell"] not in rows:
            append_row(out, row)


def resumable(cell: Cell, cell_dir: Path, backend: Backend) -> bool:
    """Whether an interrupted cell dir holds a run of this very cell (its cell.json) with a checkpoint to resume."""
    try:
        recorded = json.loads((cell_dir / "cell.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == json.loads(json.dumps(asdict(cell))) and backend.resume_point(cell, cell_dir) is not None


def run_cell(cell: Cell, out: Path, backend: Backend, prov: dict) -> dict | None:
    """Train and score `cell` unless finished (None then); an interrupted cell dir resumes (`resumable`) or is
    deleted first. The caller holds the cell (`claimed`). A resumed cell's wall_s adds the earlier runs' training
    time that the backend reports (`earlier_s`)."""
    cell_dir = out / "cells" / cell.id
    if (cell_dir / "result.json").is_file():
        return None
    if cell_dir.exists() and not resumable(cell, cell_dir, backend):
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell_dir / "cell.json", asdict(cell))
    start = time.monotonic()
    outcome = backend.train_and_evaluate(cell, cell_dir)
    row = make_row(cell, outcome, time.monotonic() - start + (outcome.timings.get("earlier_s") or 0.0), prov)
    write_json(cell_dir / "result.json", row)
    with shared_files(out):
        if row["cell"] not in read_rows(out):  # another runner's sync_rows may have appended it already
            append_row(out, row)
    return row


def dry_run(grid: Grid, cells: list[Cell], out: Path, backend: Backend, write: Callable[[str], object]) -> None:
    """Print what `run` would do: the teacher's scoring and each cell's command (finished cells marked done)."""
    if not (out / "teacher.json").is_file():
        write("# score the teacher on val and test -> teacher.json\n")
    for cell in cells:
        cell_dir = out / "cells" / cell.id
        if (cell_dir / "result.json").is_file():
            write(f"# {cell.id}: done\n")
        else:
            write(f"# {cell.id} ({grid.name}: {cell.variant})\n{backend.describe(cell, cell_dir)}\n")


def run_grid(grid: Grid, cells: list[Cell], out: Path, backend: Backend, *, keep_going: bool = False,
             write: Callable[[str], object] = lambda s: None) -> list[dict]:
    """Run every unfinished cell of `cells` into `out` with `backend`; the rows of the cells run now.

    `backend` does the training and scoring (`cell.DistillBackend` from the CLI; any object with its five
    methods in tests). Cells already started come first, then the others in the order given. With `keep_going`, a failed cell is reported and the next one runs; otherwise the
    first failure raises (the failed cell stays unfinished and reruns next time). A cell that another runner
    of `out` is training is passed by (its row comes from that runner)."""
    out = Path(out)
    done: list[dict] = []
    with shared_files(out):
        check_setup(out, backend.identity())
        record_grid(out, grid, cells)
        sync_rows(out)
        if not (out / "teacher.json").is_file():  # the other runners wait here: the teacher is scored once
            write("scoring the teacher\n")
            write_json(out / "teacher.json", percent(backend.evaluate_teacher())[0])
    prov = provenance()
    failed, elsewhere = [], []
    # cells already started (interrupted, or held by another runner) first: their checkpoints resume, and the
    # seeds they belong to complete before new work begins
    cells = sorted(cells, key=lambda c: not (out / "cells" / c.id).is_dir())
    for i, cell in enumerate(cells, 1):
        with claimed(out, cell.id) as mine:
            if not mine:
                elsewhere.append(cell.id)
                write(f"[{i}/{len(cells)}] {cell.id}: running in another runner\n")
                continue
            try:
                row = run_cell(cell, out, backend, prov)
            except Exception as err:
                if not keep_going:
                    raise
                failed.append(cell.id)
                write(f"[{i}/{len(cells)}] {cell.id}: FAILED ({err})\n")
                continue
        status = "done before" if row is None else f"overall test {row['test']['overall']:.1f} in {row['wall_s']:.0f} s"
        write(f"[{i}/{len(cells)}] {cell.id}: {status}\n")
        if row is not None:
            done.append(row)
    if elsewhere:
        write(f"{len(elsewhere)} cells were left to the other runners of {out}: their rows come when they finish\n")
    if failed:
        raise RuntimeError(f"{len(failed)} cells failed (their logs: {out}/cells/<id>/train.log): {failed}")
    return done
