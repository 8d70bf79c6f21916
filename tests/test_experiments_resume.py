"""An interrupted cell of the experiment runner resumes from its student's trainer checkpoint and ends as the cell
left uninterrupted, bitwise (real distillation on the mini world; the runner's side with a fake backend is in
tests/test_experiments.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from aligntI_patch.experiments.cell import (
    ATTEMPTS,
    DistillBackend,
    distill_command,
    earlier_seconds,
    resumed_timings,
    student_args,
)
from aligntI_patch.experiments.context import REPO, Setup
from aligntI_patch.experiments.grids import build_grid, expand
from aligntI_patch.experiments.runner import run_grid


@pytest.mark.slow
def test_an_interrupted_cell_resumes_bitwise(tmp_path, mini_world, mini_checkpoint, mini_teacher):
    setup = Setup(teacher=mini_teacher, pretrain=mini_checkpoint, world=mini_world, vision_tower=None,
                  version="qwen_2")
    grid = build_grid("loss_terms", 3)
    # --save_total_limit 1 as the preset: the resumed checkpoint is rotated away once the run saves step 4
    steps = ("--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2")
    (cell,) = expand(grid, [0], 1, only=("aligntI",), extra_args=steps)

    straight = tmp_path / "straight"  # the reference: the cell's command, never interrupted (keeping checkpoint-2)
    args = student_args(setup, cell, straight, mini_world / "finetune.json") + ["--save_total_limit", "3"]
    cmd = distill_command(setup, args)
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    out = tmp_path / "out"
    cell_dir = out / "cells" / cell.id
    (cell_dir / "student").mkdir(parents=True)
    (cell_dir / "cell.json").write_text(json.dumps(asdict(cell)))
    (cell_dir / "train.log").write_text("the interrupted run's log\n")
    shutil.copytree(straight / "checkpoint-2", cell_dir / "student" / "checkpoint-2")  # killed after this save
    shutil.copy(straight / "irs.json", cell_dir / "student" / "irs.json")
    backend = DistillBackend(setup, keep_checkpoints=True)
    assert "--resume_from_checkpoint" in backend.describe(cell, cell_dir)

    (row,) = run_grid(grid, [cell], out, backend)
    log = (cell_dir / "train.log").read_text()
    assert log.startswith("the interrupted run's log\n") and "# resumed from" in log
    assert "Resuming from" in log and "checkpoint-2" in log and "IRS not recomputed" in log  # distill's own words
    assert (row["resumed_from_step"], row["steps"]) == (2, 4)
    assert row["earlier_s"] > 0 and row["train_s"] == pytest.approx(row["train_s_this_run"] + row["earlier_s"], abs=0.11)
    attempts = [json.loads(line) for line in (cell_dir / ATTEMPTS).read_text().splitlines()]
    assert [a["resumed_from_step"] for a in attempts] == [2]  # no record of the copied run: its time estimated
    assert not list((cell_dir / "student").glob("checkpoint-*"))  # pruned once scored
    weights, expected = load_file(cell_dir / "student" / "model.safetensors"), load_file(straight / "model.safetensors")
    assert set(weights) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)


def _checkpoint(path, step: int, saved: float | None = None):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if saved is not None:
        os.utime(path / "trainer_state.json", (saved, saved))
    return path


def test_the_earlier_runs_time_is_measured_from_the_attempts_record(tmp_path):
    """Run 1 starts at t=1000 and saves step 200 at t=1400; run 2 resumes it at t=2000 (inheriting 400 s) and
    saves step 400 at t=2500: resuming that costs 400 + 500 = 900 s of earlier training."""
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / ATTEMPTS).write_text(json.dumps({"start": 1000.0, "resumed_from_step": None, "earlier_s": None}) + "\n"
                                 + json.dumps({"start": 2000.0, "resumed_from_step": 200, "earlier_s": 400.0}) + "\n")
    assert earlier_seconds(cell, _checkpoint(tmp_path / "c200", 200, saved=1400.0)) == 400.0
    assert earlier_seconds(cell, _checkpoint(tmp_path / "c400", 400, saved=2500.0)) == 900.0
    assert earlier_seconds(cell, _checkpoint(tmp_path / "c0", 0, saved=900.0)) is None  # saved before any run
    (cell / ATTEMPTS).write_text(json.dumps({"start": 2000.0, "resumed_from_step": 200, "earlier_s": None}) + "\n")
    assert earlier_seconds(cell, tmp_path / "c400") is None  # that run's own inheritance was unknown
    assert earlier_seconds(tmp_path / "no-record", tmp_path / "c400") is None


def test_resumed_timings_without_a_record(tmp_path):
    """No record: estimated at this run's rate (200 steps of 400 took 50 s: the first 200 took 50 s too); a
    run that trained no step (resumed from the final checkpoint) leaves the time unknown, not 0."""
    student = tmp_path / "student"
    student.mkdir()
    (student / "trainer_state.json").write_text(json.dumps({"global_step": 400}))
    t = resumed_timings(student, 200, 50.0, None)
    assert (t["earlier_s"], t["train_s"], t["train_s_this_run"], t["steps"]) == (50.0, 100.0, 50.0, 400)
    assert resumed_timings(student, 200, 50.0, 900.0)["train_s"] == 950.0  # measured wins
    (student / "trainer_state.json").write_text(json.dumps({"global_step": 200}))
    t = resumed_timings(student, 200, 3.0, None)
    assert t["earlier_s"] is None and t["train_s"] is None and t["resumed_from_step"] == 200
