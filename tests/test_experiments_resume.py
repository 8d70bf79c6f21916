"""An interrupted cell of the experiment runner resumes from its student's trainer checkpoint and ends as the cell
left uninterrupted, bitwise (real distillation on the mini world; the runner's side with a fake backend is in
tests/test_experiments.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from aligntI_patch.experiments.cell import TinyBackend, distill_command, student_args
from aligntI_patch.experiments.context import REPO, Setup
from aligntI_patch.experiments.grids import build_grid, expand
from aligntI_patch.experiments.runner import run_grid


@pytest.mark.slow
def test_an_interrupted_cell_resumes_bitwise(tmp_path, mini_world, mini_checkpoint, mini_teacher):
    setup = Setup(teacher=mini_teacher, pretrain=mini_checkpoint, world=mini_world, vision_tower=None,
                  version="qwen_2")
    grid = build_grid("loss_terms", 3)
    steps = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--per_device_train_batch_size", "2")
    (cell,) = expand(grid, [0], 1, only=("aligntI",), extra_args=steps)

    straight = tmp_path / "straight"  # the reference: the cell's command, never interrupted
    cmd = distill_command(setup, student_args(setup, cell, straight, mini_world / "finetune.json"))
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    out = tmp_path / "out"
    cell_dir = out / "cells" / cell.id
    (cell_dir / "student").mkdir(parents=True)
    (cell_dir / "cell.json").write_text(json.dumps(asdict(cell)))
    (cell_dir / "train.log").write_text("the interrupted run's log\n")
    shutil.copytree(straight / "checkpoint-2", cell_dir / "student" / "checkpoint-2")  # killed after this save
    shutil.copy(straight / "irs.json", cell_dir / "student" / "irs.json")
    backend = TinyBackend(setup, keep_checkpoints=True)
    assert "--resume_from_checkpoint" in backend.describe(cell, cell_dir)

    (row,) = run_grid(grid, [cell], out, backend)
    log = (cell_dir / "train.log").read_text()
    assert log.startswith("the interrupted run's log\n") and "# resumed from" in log
    assert "Resuming from" in log and "checkpoint-2" in log and "IRS not recomputed" in log  # distill's own words
    assert (row["resumed_from_step"], row["steps"]) == (2, 4)
    assert row["earlier_s"] > 0 and row["train_s"] == pytest.approx(row["train_s_this_run"] + row["earlier_s"])
    assert not list((cell_dir / "student").glob("checkpoint-*"))  # pruned once scored
    weights, expected = load_file(cell_dir / "student" / "model.safetensors"), load_file(straight / "model.safetensors")
    assert set(weights) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)
