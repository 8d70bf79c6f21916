"""skipped_samples.json lists the unique skipped samples of all processes, survives crashes and resumes; the
modality sampler follows the trainer's epoch. A toy model and dataset keep these runs at about a second."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from llava.constants import TokenType
from llava.tiny.fixtures import free_port
from llava.train.arguments import TrainingArguments
from llava.train.data import DataCollatorForSupervisedDataset
from llava.train.distributed import end_distributed_run
from llava.train.llava_trainer import SKIPPED_FILE, LLaVATrainer, ModalityGroupedSampler, SkippedSamples


class ToyModel(nn.Module):
    """Accepts the collator's batch; the loss is a function of one weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, input_ids, labels=None, attention_mask=None, token_types=None, images=None, **kwargs):
        return {"loss": (self.w * input_ids.float().mean()).pow(2).sum()}  # a scalar


class ToyData(torch.utils.data.Dataset):
    """Item i reports bad sample i and bad sample 999 (so that one again and again); `crash_on_call` raises
    like a bug hours into a run; `calls` lists the items fetched."""

    def __init__(self, n: int = 16, crash_on_call: int | None = None, report: bool = True):
        self.n, self.crash_on_call, self.report, self.calls = n, crash_on_call, report, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.calls.append(i)
        if len(self.calls) == self.crash_on_call:
            raise RuntimeError("crash")
        skips = [{"index": j, "id": None, "image": f"{j}.png", "reason": "image file not found"} for j in (i, 999)]
        ids = torch.tensor([i + 1, 2])
        types = torch.tensor([int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)])
        return {"input_ids": ids, "labels": ids, "token_types": types, "image": None,
                "skipped": skips if self.report else []}


def _trainer(out, data, max_steps, save_steps=2, **kw):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             save_steps=save_steps, save_strategy="steps", report_to="none", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, logging_steps=100, **kw)
    return LLaVATrainer(model=ToyModel(), args=args, train_dataset=data,
                        data_collator=DataCollatorForSupervisedDataset(pad_token_id=0))


def _listed(path):
    saved = json.loads(path.read_text())
    assert saved["count"] == len(saved["samples"])
    return sorted(s["index"] for s in saved["samples"])


def test_skip_list_is_unique_written_at_each_save_and_survives_crash_and_resume(tmp_path):
    out = tmp_path / "run"
    # batches of 2; the loader fetches one batch ahead, so call 7 (batch 4) comes after step 2 and its save
    first = ToyData(crash_on_call=7)
    with pytest.raises(RuntimeError, match="crash"):
        _trainer(out, first, max_steps=6).train()
    expected = sorted(first.calls[:4]) + [999]  # the items of steps 1-2; sample 999 once, not 4 times
    assert _listed(out / "checkpoint-2" / SKIPPED_FILE) == expected
    assert _listed(out / SKIPPED_FILE) == expected  # left by the crashed run
    assert not (out / "checkpoint-4").exists()
    # the resumed run meets no bad sample: its list is the checkpoint's
    _trainer(out, ToyData(report=False), max_steps=4).train(resume_from_checkpoint=True)
    assert _listed(out / "checkpoint-4" / SKIPPED_FILE) == expected
    assert _listed(out / SKIPPED_FILE) == expected


def test_skip_lists_of_all_processes_are_gathered(monkeypatch):
    """Rank 0 writes the union of every rank's list (all_gather_object, stubbed here as a second rank)."""
    dist = torch.distributed
    other = [{"index": 7, "id": "b", "image": ["x.png", "y.png"], "reason": "multi-image"},
             {"index": 1, "id": "a", "image": "a.png", "reason": "missing"}]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda parts, mine: parts.__setitem__(slice(None), [mine, other]))
    skipped = SkippedSamples()
    skipped.add([{"index": 1, "id": "a", "image": "a.png", "reason": "missing"}] * 2)
    assert [r["index"] for r in skipped.gather()] == [1, 7]


@pytest.mark.slow
def test_skip_lists_of_two_processes_are_gathered(tmp_path):
    """torchrun x2 (gloo, --use_cpu): each rank meets half the items; rank 0's files list both halves."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(_listed(out / "checkpoint-1" / SKIPPED_FILE)) == 5  # step 1: 2 items per rank, and sample 999
    assert _listed(out / SKIPPED_FILE) == [*range(8), 999]  # 8 items = 2 steps x 2 ranks x 2


def test_modality_sampler_follows_the_trainer_epoch_on_resume(tmp_path):
    """A resumed multi-process epoch reaches the sampler through no set_epoch of accelerate: the callback sets it."""
    data = ToyData()
    data.modality_lengths = [1 if i % 3 else -1 for i in range(len(data))]
    trainer = _trainer(tmp_path, data, max_steps=2, group_by_modality_length=True)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityGroupedSampler)
    trainer.state.epoch = 2.5  # as loaded from a checkpoint saved half-way through epoch 2
    trainer.callback_handler.on_epoch_begin(trainer.args, trainer.state, trainer.control)
    expected = ModalityGroupedSampler(data.modality_lengths, sampler.batch_size, seed=trainer.args.seed)
    expected.set_epoch(2)
    assert list(sampler) == list(expected)


if __name__ == "__main__":  # one rank of test_skip_lists_of_two_processes_are_gathered
    _trainer(sys.argv[1], ToyData(n=8), max_steps=2, save_steps=1).train()
    end_distributed_run()
