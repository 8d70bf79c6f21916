"""HF's `--resume_from_checkpoint`, honoured by both entries (`train_and_save`): unset = the newest complete
checkpoint of output_dir, a path = that checkpoint (it must exist and be complete), False = a fresh run with the
output_dir's checkpoints set aside."""

import json
import logging
import sys
from pathlib import Path

import pytest

from llava.tiny.fixtures import mini_llava, save_mini_checkpoint
from llava.train import train as train_module
from llava.train.llava_trainer import parse_resume_flag, resume_checkpoint, set_aside_checkpoints


def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_flag_values():
    assert parse_resume_flag(None) is None and parse_resume_flag("True") is None and parse_resume_flag(True) is None
    assert parse_resume_flag("False") is False and parse_resume_flag("false") is False and parse_resume_flag(False) is False
    assert parse_resume_flag("out/checkpoint-3") == "out/checkpoint-3"


def test_which_checkpoint_is_resumed(tmp_path):
    out = tmp_path / "out"
    assert resume_checkpoint(str(out), None) is None  # no output_dir yet: a fresh run
    two, _ = _checkpoint(out, 2), _checkpoint(out, 3, complete=False)
    assert resume_checkpoint(str(out), None) == str(two)  # the newest complete one
    assert resume_checkpoint(str(out), "False") is None
    assert resume_checkpoint(str(out), str(two)) == str(two)
    with pytest.raises(FileNotFoundError, match="checkpoint-7: no such checkpoint directory"):
        resume_checkpoint(str(out), str(out / "checkpoint-7"))
    with pytest.raises(ValueError, match="checkpoint-3 is incomplete.*newest complete checkpoint beside it is .*checkpoint-2"):
        resume_checkpoint(str(out), str(out / "checkpoint-3"))


def test_set_aside_moves_every_checkpoint_to_a_free_folder(tmp_path):
    out = tmp_path / "out"
    assert set_aside_checkpoints(str(out)) is None
    _checkpoint(out, 1), _checkpoint(out, 4, complete=False)
    (out / "irs.json").write_text("{}")
    first = set_aside_checkpoints(str(out))
    assert first == str(out / "previous-run-1")
    assert sorted(p.name for p in Path(first).iterdir()) == ["checkpoint-1", "checkpoint-4"]
    assert sorted(p.name for p in out.iterdir()) == ["irs.json", "previous-run-1"]
    _checkpoint(out, 1)
    assert set_aside_checkpoints(str(out)) == str(out / "previous-run-2")
    assert set_aside_checkpoints(str(out)) is None


@pytest.fixture(scope="module")
def start_ckpt(mini_root, tokenizer):
    return save_mini_checkpoint(mini_llava(tokenizer, num_layers=1), tokenizer, mini_root / "resume_flag_start")


def _losses(path: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads(path.read_text())["log_history"] if "loss" in e}


def _mark(checkpoint: Path, step: int, loss: float) -> None:
    """Overwrite one logged loss in the checkpoint's history: a run resumed from it carries the mark."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    for e in state["log_history"]:
        if e.get("step") == step and "loss" in e:
            e["loss"] = loss
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def test_train_entry_honours_the_flag(tmp_path, start_ckpt, mini_world, monkeypatch, caplog):
    out = tmp_path / "out"

    def train(max_steps: int, *extra: str) -> str:
        monkeypatch.setattr(sys, "argv", [
            "train", "--model_name_or_path", str(start_ckpt), "--version", "qwen_2",
            "--data_path", str(mini_world / "finetune.json"), "--image_folder", str(mini_world / "images"),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--model_max_length", "256", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "1", "--max_steps", str(max_steps), "--dataloader_num_workers", "0",
            "--disable_tqdm", "True", "--use_cpu", "True", *extra,
        ])  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llava.train.train"):
            train_module.train()
        return caplog.text

    train(2)
    _mark(out / "checkpoint-1", 1, -1.0)
    _mark(out / "checkpoint-2", 2, -2.0)

    # a path: that checkpoint, although a newer one is there
    log = train(3, "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert f"Resuming from {out / 'checkpoint-1'} (as asked)" in log
    losses = _losses(out / "trainer_state.json")
    assert sorted(losses) == [1, 2, 3] and losses[1] == -1.0 and losses[2] != -2.0  # step 2 trained again

    # unset: the newest complete checkpoint, named in the log
    log = train(4)
    assert f"Resuming from {out / 'checkpoint-3'} (the newest complete checkpoint of output_dir" in log
    losses = _losses(out / "trainer_state.json")
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == -1.0

    # False: a fresh run, the old checkpoints moved aside (not resumed, not rotated)
    log = train(1, "--resume_from_checkpoint", "False")
    assert f"moved to {out / 'previous-run-1'}" in log and "Resuming" not in log
    losses = _losses(out / "trainer_state.json")
    assert list(losses) == [1] and losses[1] != -1.0
    assert sorted(p.name for p in (out / "previous-run-1").iterdir()) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
