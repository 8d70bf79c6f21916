"""How far an out dir is: per grid, cells finished, started and waiting, the time spent and the time left.

    python -m aligntI_patch.experiments status --out DIR

The time left is an estimate at the rate measured in DIR: seconds of training per epoch of the full finetune
data for each recipe and flags (the mean over its finished cells; a recipe with none takes the mean over the
others), times each unfinished cell's epochs and data fraction, less the share its newest checkpoint holds (a
rerun resumes from it), plus the mean scoring time. It is one runner's time: N runners sharing DIR take about
1/N of it if the machine has the cores for them. Each started cell gets a line: how far its training is (the
last epoch its train.log reports), the step it would resume from (its newest complete trainer checkpoint) and
how long ago its log was written (minutes: running; hours: interrupted, rerun the grid).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

from aligntI_patch.experiments.report import load_out, markdown_table


def _key(recipe: str, options: dict) -> str:
    return recipe + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def training_rates(rows: Iterable[dict]) -> dict[str, float]:
    """{recipe and flags: mean seconds of training per epoch of the full data} over finished rows."""
    per: dict[str, list[float]] = {}
    for r in rows:
        if r.get("train_s") is not None and r["epochs"] * r["data_fraction"] > 0:
            per.setdefault(_key(r["recipe"], r.get("options", {})), []).append(
                r["train_s"] / (r["epochs"] * r["data_fraction"]))
    return {k: sum(v) / len(v) for k, v in per.items()}


def done_share(cell_dir: Path) -> float:
    """The share of its training an interrupted cell will not redo: its newest complete checkpoint's steps."""
    from llava.train.llava_trainer import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(str(cell_dir / "student"))
    if checkpoint is None:
        return 0.0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return min(state.get("global_step", 0) / max(state.get("max_steps", 0), 1), 1.0)


def cell_seconds(entry: dict, rates: dict[str, float], scoring_s: float, done: float = 0.0) -> float | None:
    """Estimated seconds of one unfinished cell of a grids/<grid>.json (None before any cell has finished); `done`:
    the share of its training already checkpointed."""
    if not rates:
        return None
    exact = rates.get(_key(entry["recipe"], entry.get("options", {})))
    same_recipe = [v for k, v in rates.items() if k.split(" ")[0] == entry["recipe"]]
    rate = exact if exact is not None else (sum(same_recipe) / len(same_recipe) if same_recipe
                                            else sum(rates.values()) / len(rates))
    return rate * entry["epochs"] * entry["data_fraction"] * (1.0 - done) + scoring_s


EPOCH = re.compile(r"""['"]epoch['"]: '?([0-9.]+)""")


def started_line(entry: dict, cell_dir: Path, now: float) -> list[str]:
    """[cell, epoch reached of epochs, resumes from, log written ... ago] of a started, unfinished cell."""
    from llava.train.llava_trainer import last_complete_checkpoint

    log = cell_dir / "train.log"
    epochs = EPOCH.findall(log.read_text(errors="replace")) if log.is_file() else []
    reached = f"{float(epochs[-1]):.2f} of {entry['epochs']:g}" if epochs else f"- of {entry['epochs']:g}"
    checkpoint = last_complete_checkpoint(str(cell_dir / "student"))
    resumes = f"step {checkpoint.rsplit('-', 1)[-1]}" if checkpoint else "the start"
    age = _duration(now - log.stat().st_mtime) + " ago" if log.is_file() else "no log"
    return [entry["cell"], reached, resumes, age]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def status(out: str | Path) -> str:
    """Markdown: one line per grid and one for the out dir (a cell shared by grids counted once there)."""
    out = Path(out)
    manifests, rows, _ = load_out(out)
    rates = training_rates(rows.values())
    scoring = [r["eval_s"] for r in rows.values() if r.get("eval_s") is not None]
    scoring_s = sum(scoring) / len(scoring) if scoring else 0.0

    def seconds(entry: dict) -> float | None:  # spent on a finished cell, else the estimate of what is left
        row = rows.get(entry["cell"])
        return row.get("wall_s", 0.0) if row else cell_seconds(entry, rates, scoring_s,
                                                               done_share(out / "cells" / entry["cell"]))

    lines, every = [], {}
    for manifest in manifests:
        entries = manifest["cells"]
        done = [e for e in entries if e["cell"] in rows]
        todo = [e for e in entries if e["cell"] not in rows]
        started = sum((out / "cells" / e["cell"]).is_dir() for e in todo)
        left = [seconds(e) for e in todo]
        lines.append([manifest["grid"], str(len(entries)), str(len(done)), str(started), str(len(todo) - started),
                      _duration(sum(seconds(e) for e in done)),
                      _duration(None if None in left else sum(left))])
        every.update({e["cell"]: e for e in entries})
    done = [e for c, e in every.items() if c in rows]
    left = [seconds(e) for c, e in every.items() if c not in rows]
    now = time.time()
    started = [started_line(e, out / "cells" / c, now) for c, e in sorted(every.items())
               if c not in rows and (out / "cells" / c).is_dir()]
    lines.append(["all (a shared cell once)", str(len(every)), str(len(done)), "", "",
                  _duration(sum(seconds(e) for e in done)), _duration(None if None in left else sum(left))])
    header = ["grid", "cells", "finished", "started (running or interrupted)", "waiting", "spent",
              "left (one runner, estimated)"]
    rate_text = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(rates.items())) or "none yet"
    text = (f"# {out}\n\n" + markdown_table(header, lines) + "\n\nTraining per epoch of the full data, measured "
            f"here: {rate_text}; scoring {scoring_s:.0f} s per cell. A recipe's flags not measured yet take the "
            "recipe's mean rate, a recipe not measured yet the mean of all.\n")
    record = json.loads((out / "setup.json").read_text()) if (out / "setup.json").is_file() else {}
    if record.get("rescoring"):
        splits = {k: v for k, v in record["rescoring"].items() if k.endswith("_split")}
        text += (f"\nA rescore to {splits} is unfinished: `run` is refused until `rescore` with the same split "
                 "flags runs to its end.\n")
    if started:
        text += ("\nStarted cells (a log written minutes ago: running; hours ago: interrupted, rerun the grid to "
                 "resume it):\n\n" + markdown_table(["cell", "epoch reached", "resumes from", "log written"],
                                                     started) + "\n")
    return text
