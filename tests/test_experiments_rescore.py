"""`rescore`: finished cells and the teacher scored again on a new split, resumably; what it refuses.
(The real path, evaluate_tiny on a new val split of the mini world, is in test_experiments.py's end to end.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_experiments import FakeBackend, _run, _summary

from aligntI_patch.experiments.rescore import rescore
from aligntI_patch.experiments.runner import claimed, read_rows
from aligntI_patch.experiments.status import status

NEW_VAL = {"attribute": 0.30, "counting": 0.20, "overall": 0.25}


class Rescorer(FakeBackend):
    """FakeBackend on the val split `val_large`: val scores NEW_VAL (the teacher's too); `crash_after` cells."""

    def __init__(self, crash_after: int | None = None, **kw):
        super().__init__(**kw)
        self.scored: list[str] = []
        self.crash_after = crash_after

    def identity(self) -> dict:
        return {**super().identity(), "val_split": "val_large"}

    def evaluate(self, checkpoint: Path, answers_dir: Path | None = None, splits=("test", "val")) -> dict:
        assert splits == ("val",) and checkpoint == answers_dir / "student"
        if self.crash_after is not None and len(self.scored) == self.crash_after:
            raise KeyboardInterrupt
        self.scored.append(answers_dir.name)
        return {"val": _summary(NEW_VAL)}

    def evaluate_teacher(self, splits=("test", "val")) -> dict:
        return {s: _summary(NEW_VAL) for s in splits}


def _finished(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    _run(out, FakeBackend(), seeds=(0,))
    for cell in (out / "cells").iterdir():
        (cell / "student").mkdir()
        (cell / "student" / "model.safetensors").write_text("kept weights")
    return out


def test_rescore_changes_the_val_split_only_and_resumes_after_a_crash(tmp_path):
    out = _finished(tmp_path)
    before = read_rows(out)
    with pytest.raises(KeyboardInterrupt):
        rescore(out, Rescorer(crash_after=1))
    assert json.loads((out / "setup.json").read_text())["rescoring"]["val_split"] == "val_large"
    assert "A rescore to {'val_split': 'val_large'} is unfinished" in status(out)
    with pytest.raises(ValueError, match="another setup"):  # a runner started meanwhile is refused
        _run(out, FakeBackend(), seeds=(0,))
    second = Rescorer()
    done = rescore(out, second)
    assert len(second.scored) == 2 and len(done) == 2  # the cell rescored before the crash is not redone
    rows = read_rows(out)
    assert sorted(rows) == sorted(before)
    for cell, row in rows.items():
        assert row["val"]["overall"] == pytest.approx(25.0) and row["splits"] == {"val": "val_large"}
        assert row["test"] == before[cell]["test"] and row["n"]["test"] == before[cell]["n"]["test"]
        assert json.loads((out / "cells" / cell / "result.json").read_text()) == row
    teacher = json.loads((out / "teacher.json").read_text())
    assert teacher["val"]["overall"] == pytest.approx(25.0) and teacher["test"]["overall"] == pytest.approx(65.0)
    assert json.loads((out / "setup.json").read_text()) == {"teacher": "fake-teacher", "val_split": "val_large"}
    assert rescore(out, Rescorer()) == [] and "unfinished" not in status(out)  # nothing left
    with pytest.raises(ValueError, match="another setup"):  # runs on the old val split are refused now
        _run(out, FakeBackend(), seeds=(0,))
    assert _run(out, Rescorer(), seeds=(0,)) == []


def test_rescore_refuses_lost_weights_running_cells_and_other_setups(tmp_path):
    out = _finished(tmp_path)
    setup = (out / "setup.json").read_text()
    (out / "cells" / "kd-ep1-seed0" / "student" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"without their student's weights.*\['kd-ep1-seed0'\]"):
        rescore(out, Rescorer())
    (out / "cells" / "kd-ep1-seed0" / "student" / "model.safetensors").write_text("kept weights")
    (out / "cells" / "sft-ep1-seed1").mkdir()
    with claimed(out, "sft-ep1-seed1"):  # a runner training a cell
        with pytest.raises(RuntimeError, match=r"being trained \(\['sft-ep1-seed1'\]\): stop its runners"):
            rescore(out, Rescorer())
    with pytest.raises(ValueError, match="changes split names only.*teacher"):
        rescore(out, Rescorer(teacher="another-teacher"))
    assert (out / "setup.json").read_text() == setup  # nothing changed by the refusals
