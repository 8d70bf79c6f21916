"""LLaVA's Trainer: skip accounting, modality-grouped batches, projector learning rate, the same module calls on
every rank of a multi-process run (ZeRO-3), safe saving/resume.

Skipped samples: each process keeps the unique (index, image, reason) records its batches carried; at every
checkpoint save and at the end they are gathered from all processes and written to `skipped_samples.json` in
the checkpoint (before its trainer_state.json, which marks it complete) and in `output_dir`, so a crashed run
leaves its list, and a resumed run reloads it from the checkpoint it resumes. Their count (unique, all
processes, cumulative) is logged as `skipped_samples` at every logging step; each step sends only new records.

LoRA: HF's checkpoint-N holds only the adapter (PEFT's save), so the non-LoRA trainables (the projector) are
written beside it as `non_lora_trainables.bin` (the final save's name) and loaded back on resume.
Subclasses add their own resume state through `save_resume_state` / `load_resume_state`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from llava.train.lora import NON_LORA_FILE, load_non_lora_trainables, non_lora_trainables
from llava.train.zero3 import gathered, needs_blank_image

logger = logging.getLogger(__name__)
SKIPPED_FILE = "skipped_samples.json"


class SkippedSamples:
    """The unique skipped-sample records of a run, keyed by (index, image, reason)."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.unshared: list[dict] = []  # this process's new records, not yet sent to the others (`count`)

    def add(self, records: Iterable[dict], local: bool = True) -> None:
        for r in records:
            # the image may be a list (multi-image records): key on its JSON text
            key = json.dumps([r["index"], r["image"], r["reason"]])
            if key not in self.records:
                self.records[key] = r
                if local:
                    self.unshared.append(r)

    def count(self) -> int:
        """The number of unique records of all processes so far (a collective: it sends only the new ones)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, self.unshared)
            for part in parts:
                self.add(part, local=False)
        self.unshared = []
        return len(self.records)

    def gather(self) -> list[dict]:
        """The union over all processes, sorted by index (a collective: every rank calls it)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, list(self.records.values()))
            for part in parts:
                self.add(part, local=False)
        self.unshared = []
        return sorted(self.records.values(), key=lambda r: r["index"])

    def load(self, checkpoint: str) -> None:
        """Add the list saved in `checkpoint` (absent in checkpoints written before it was saved there)."""
        path = os.path.join(checkpoint, SKIPPED_FILE)
        if not os.path.isfile(path):
            logger.info("%s has no %s: the skipped-sample list restarts empty", checkpoint, SKIPPED_FILE)
            return
        with open(path, encoding="utf-8") as f:
            self.add(json.load(f)["samples"], local=False)


def write_skipped(path: str, records: list[dict]) -> None:
    """Write atomically: a crash while writing leaves the previous list."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"count": len(records), "samples": records}, f, indent=1)
    os.replace(tmp, path)


class LLaVATrainer(Trainer):
    """HF Trainer plus what LLaVA training needs; `compute_loss` stays the model's own (SFT)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = SkippedSamples()
        self.modality_sampler: ModalityGroupedSampler | None = None
        self.add_callback(SkipReportCallback(self))
        self.add_callback(SamplerEpochCallback(self))

    def pop_skipped(self, inputs: dict) -> None:
        self.skipped.add(inputs.pop("skipped", ()))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """HF's log plus `skipped_samples`: the unique bad samples of all processes so far (training logs)."""
        if "loss" in logs:  # a training log step: every rank reaches it together (the loss is all-gathered)
            logs["skipped_samples"] = self.skipped.count()
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.pop_skipped(inputs)
        if needs_blank_image(inputs.get("images"), self.args):
            inputs = {**inputs, "vision_in_step": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """HF's train, after `load_resume_state` of the checkpoint it resumes from."""
        last = resume_from_checkpoint is True
        checkpoint = get_last_checkpoint(self.args.output_dir) if last else resume_from_checkpoint
        if isinstance(checkpoint, str):
            self.load_resume_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def load_resume_state(self, checkpoint: str) -> None:
        """What HF's resume does not restore: the skipped-sample list and, with LoRA, the non-LoRA trainables.

        Runs before HF loads the checkpoint's weights and before DeepSpeed wraps the model (whole tensors)."""
        self.skipped.load(checkpoint)
        if self.args.lora_enable:
            load_non_lora_trainables(self.model, checkpoint)

    def save_resume_state(self, checkpoint: str) -> None:
        """Write what HF's checkpoint lacks into `checkpoint`. Every rank calls it (it gathers)."""
        records = self.skipped.gather()
        if self.args.lora_enable:
            params = non_lora_trainables(self.model)
            with gathered(*params.values()):  # ZeRO-3: a collective; rank 0 writes the whole tensors
                if self.args.should_save:
                    torch.save({n: p.detach().cpu().clone() for n, p in params.items()},
                               os.path.join(checkpoint, NON_LORA_FILE))
        if self.args.should_save:
            write_skipped(os.path.join(checkpoint, SKIPPED_FILE), records)
            write_skipped(os.path.join(self.args.output_dir, SKIPPED_FILE), records)

    def _save_checkpoint(self, model, trial) -> None:
        # written before HF's checkpoint files, so trainer_state.json (the completeness mark) comes after them
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoint = os.path.join(self._get_output_dir(trial=trial), name)
        os.makedirs(checkpoint, exist_ok=True)  # every rank: per-process files go there too (as HF's rng_state_N)
        self.save_resume_state(checkpoint)
        super()._save_checkpoint(model, trial)

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.group_by_modality_length and hasattr(self.train_dataset, "modality_lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            self.modality_sampler = ModalityGroupedSampler(
                self.train_dataset.modality_lengths, batch, seed=self.args.seed
            )
            return self.modality_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and self.args.mm_projector_lr is not None:
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            proj = [p for n, p in params if "mm_projector" in n]
            rest = [p for n, p in params if "mm_projector" not in n]
            groups = [
                {"params": rest, "weight_decay": self.args.weight_decay},
                {"params": proj, "weight_decay": self.args.weight_decay, "lr": self.args.mm_projector_lr},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """Shuffled indices where every global batch holds a single modality (image or text-only).

    The order depends only on (seed, epoch): the trainer sets the epoch (`set_epoch`), so a resumed run
    replays the order of the epoch it resumes."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        full, partial = [], []
        for is_image in (True, False):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == is_image]
            rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                (full if len(chunk) == self.batch_size else partial).append(chunk)
        rng.shuffle(full)
        # partial chunks go last so that they cannot shift later batches across modalities
        return iter([i for chunk in full + partial for i in chunk])


class SamplerEpochCallback(TrainerCallback):
    """Sets the modality sampler's epoch from the trainer state at each epoch start.

    accelerate forwards `set_epoch` to the sampler, except through the batch-skipping loader of a resumed
    multi-process run (SkipBatchSampler over BatchSamplerShard): without this, that epoch would be shuffled
    as epoch 0."""

    def __init__(self, trainer: LLaVATrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.modality_sampler is not None:
            # state.epoch is e + step/steps_per_epoch: an exact integer when epoch e starts
            self.trainer.modality_sampler.set_epoch(int(state.epoch or 0))


class SkipReportCallback(TrainerCallback):
    """At the end: logs how many unique samples were skipped, writes `output_dir/skipped_samples.json`."""

    def __init__(self, trainer: LLaVATrainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        records = self.trainer.skipped.gather()  # every rank: a collective
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, SKIPPED_FILE)
        write_skipped(path, records)
        logger.warning("Skipped %d unique bad samples in all (every process): list in %s", len(records), path)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """Newest `checkpoint-N` whose trainer_state.json exists (written last, so the save completed)."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name.split("-")[-1].isdigit():
            if os.path.isfile(os.path.join(path, "trainer_state.json")):
                steps.append((int(name.split("-")[-1]), path))
    return max(steps)[1] if steps else None


def parse_resume_flag(flag: str | bool | None) -> str | bool | None:
    """HF's `--resume_from_checkpoint` (a str on the command line) -> None (unset or "True": resume automatically),
    False ("False": a fresh run) or the checkpoint path."""
    if flag is None or str(flag).lower() == "true":
        return None
    if str(flag).lower() == "false":
        return False
    return str(flag)


def resume_checkpoint(output_dir: str, flag: str | bool | None) -> str | None:
    """The checkpoint a run resumes from: by default the newest complete `checkpoint-N` of `output_dir` (None on
    a fresh one), None for `--resume_from_checkpoint False`, else the path given, which must be complete."""
    wanted = parse_resume_flag(flag)
    if wanted is None:
        return last_complete_checkpoint(output_dir)
    if wanted is False:
        return None
    if not os.path.isdir(wanted):
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(wanted, "trainer_state.json")):
        newest = last_complete_checkpoint(os.path.dirname(os.path.abspath(wanted)))
        raise ValueError(
            f"--resume_from_checkpoint {wanted} is incomplete: it has no trainer_state.json (a save writes it last)"
            + (f"; the newest complete checkpoint beside it is {newest}" if newest else "")
        )
    return wanted


def set_aside_checkpoints(output_dir: str) -> str | None:
    """Move every `checkpoint-N` of `output_dir` into `output_dir/previous-run-K` (the first free K); returns it,
    or None when there were none.

    A fresh run in a used output_dir would otherwise resume them after a crash, and HF's rotation
    (`--save_total_limit`, which keeps the highest step numbers) would delete its own newer checkpoints."""
    if not os.path.isdir(output_dir):
        return None
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.split("-")[-1].isdigit()]
    if not names:
        return None
    k = 1
    while os.path.exists(os.path.join(output_dir, f"previous-run-{k}")):
        k += 1
    target = os.path.join(output_dir, f"previous-run-{k}")
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def atomic_save(save_fn, output_dir: str) -> None:
    """Run `save_fn(tmp_dir)`, then move each file into `output_dir`; a crash never leaves half a file there."""
    tmp = os.path.join(output_dir, ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
