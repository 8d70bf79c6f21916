"""LLaVA's Trainer: skip accounting, modality-grouped batches, projector learning rate, the same module calls on
every rank of a multi-process run (ZeRO-3), safe saving/resume."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import torch
from transformers import Trainer, TrainerCallback

from aligntI_patch.zero3 import needs_blank_image

logger = logging.getLogger(__name__)


class LLaVATrainer(Trainer):
    """HF Trainer plus what LLaVA training needs; `compute_loss` stays the model's own (SFT)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_samples: list[dict] = []
        self.add_callback(SkipReportCallback(self))

    def pop_skipped(self, inputs: dict) -> None:
        self.skipped_samples.extend(inputs.pop("skipped", ()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.pop_skipped(inputs)
        if needs_blank_image(inputs.get("images"), self.args):
            inputs = {**inputs, "vision_in_step": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.group_by_modality_length and hasattr(self.train_dataset, "modality_lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return ModalityGroupedSampler(self.train_dataset.modality_lengths, batch, seed=self.args.seed)
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
    """Shuffled indices where every global batch holds a single modality (image or text-only)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
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


class SkipReportCallback(TrainerCallback):
    """Logs how many samples were skipped and writes them to `output_dir/skipped_samples.json`."""

    def __init__(self, trainer: LLaVATrainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        skipped = self.trainer.skipped_samples
        if not state.is_world_process_zero:
            return
        logger.warning("Skipped %d bad samples in total (this process)", len(skipped))
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "skipped_samples.json"), "w") as f:
            json.dump({"count": len(skipped), "samples": skipped}, f, indent=1)


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


def atomic_save(save_fn, output_dir: str) -> None:
    """Run `save_fn(tmp_dir)`, then move each file into `output_dir`; a crash never leaves half a file there."""
    tmp = os.path.join(output_dir, ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
