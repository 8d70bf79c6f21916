"""AlignTITrainer: LLaVA's trainer whose `compute_loss` is Eq. 8,

    L = w_sft * L_sft + w_kd * L_kd (Eq. 2) + w_iva * L_iva (Eq. 3) + w_tpa * L_tpa (Eq. 7).

Design choices:
- One layout for both models: each splices its own visual embeddings into the same expanded sequence
  (N_v must agree), so every term indexes the same positions (`token_types`, `labels`).
- Forwards per step: 1 student pass with grad and 1 teacher pass without grad; with TPA both also run the
  candidate rows against their KV cache (`tpa.tpa_forward`), sampling from the student's own detached
  ground-truth logits. The teacher's IVA attention is recomputed by a hook during its ground-truth pass.
- Every term is a token SUM divided by its count over the whole global batch (all accumulation micro-batches
  and processes, counted in `get_batch_samples`): 2 x 4 accumulation equals one batch of 8 exactly.
  Response terms divide by response tokens, IVA by the samples that have an image (Eq. 3 is per sample).
- The term sums run as the student's forward called through its DeepSpeed engine or DDP wrapper, so the
  wrapper's bookkeeping runs as for `model(**inputs)`. Under ZeRO-3 the teacher is partitioned too
  (`zero3.py`), directly read lm_head weights are gathered, and every rank calls the same modules in order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random

import torch
from torch import nn

from aligntI_patch.attention_hook import capture_attention
from aligntI_patch.iva import importance_from_attention, iva_weights
from aligntI_patch.losses import iva_loss, kd_loss, prediction_rows, sft_loss, tpa_loss
from aligntI_patch.on_policy import on_policy_batch
from aligntI_patch.tpa import TPAConfig, ground_truth_pass, tpa_forward
from aligntI_patch.zero3 import gathered, hold_lm_head, needs_blank_image, through_wrapper
from llava.constants import IMAGE_TOKEN_INDEX, TokenType
from llava.train.llava_trainer import LLaVATrainer

logger = logging.getLogger(__name__)
TERMS = ("sft", "kd", "iva", "tpa")


class AlignTITrainer(LLaVATrainer):
    def __init__(self, *args, teacher: nn.Module, iva_layer: int, vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        hold_lm_head(self.model, self.args)
        self.iva_layer = iva_layer
        self.vocab_size = vocab_size
        a = self.args
        self.weights = {"sft": a.w_sft, "kd": a.w_kd, "iva": a.w_iva, "tpa": a.w_tpa}
        self.tpa_cfg = TPAConfig(d=a.tpa_num_samples, strategy=a.tpa_sampling, top_p=a.tpa_top_p,
                                 temperature=a.tpa_temperature, dedupe=a.tpa_dedupe, chunk_size=a.loss_chunk_size)
        self.generator = torch.Generator().manual_seed(a.seed)
        self.on_policy_rng = random.Random(a.seed)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by global counts itself
        self.global_counts = {"response": 1.0, "images": 1.0}
        self.term_log: dict[str, float] = {}

    # -- normalisation ------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count, over all accumulation micro-batches and processes, response tokens and image samples."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.on_policy_prob:  # before counting, so that on-policy tokens are normalised by their own count
            batches = [self.maybe_on_policy(b) for b in batches]
        counts = torch.zeros(2, device=device)
        for b in batches:
            counts[0] += prediction_rows(b["labels"])[0].sum()
            counts[1] += (b["input_ids"] == IMAGE_TOKEN_INDEX).any(1).sum()
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        self.global_counts = {"response": max(float(counts[0]), 1.0), "images": max(float(counts[1]), 1.0)}
        return batches, num_items

    def maybe_on_policy(self, batch: dict) -> dict:
        """GKD baseline: with probability `on_policy_prob`, the batch's responses sampled from the student.

        The seeded draw is the same on every process, so all ranks generate together, and a text-only batch
        still runs the vision path (ZeRO-3 needs both: every module call is a collective)."""
        if self.on_policy_rng.random() >= self.args.on_policy_prob:
            return batch
        student = self.accelerator.unwrap_model(self.model)
        blank = needs_blank_image(batch.get("images"), self.args)
        return on_policy_batch(student, batch, self.processing_class, self.args.on_policy_max_new_tokens, blank)

    # -- the loss -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Eq. 8: the weighted sum of the enabled terms, each normalised by its global count."""
        self.pop_skipped(inputs)
        student = self.accelerator.unwrap_model(model)
        sums = through_wrapper(model, student, functools.partial(self.term_sums, student), inputs)
        scale = {"sft": "response", "kd": "response", "tpa": "response", "iva": "images"}
        terms = {k: v / self.global_counts[scale[k]] for k, v in sums.items()}
        total = sum(self.weights[k] * terms[k] for k in terms)
        for k, v in terms.items():
            self.term_log[k] = self.term_log.get(k, 0.0) + float(v.detach())
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            total = total * self.args.world_size  # data parallelism averages gradients; counts are global
        return (total, None) if return_outputs else total

    def term_sums(self, student: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """Weighted token sums of every enabled term for one micro-batch."""
        a = self.args
        enabled = {k for k in TERMS if self.weights[k] > 0}
        images = inputs.get("images")
        blank = needs_blank_image(images, a)
        s_mm = student.prepare_inputs_labels_for_multimodal(
            inputs["input_ids"], None, inputs["attention_mask"], None, inputs["labels"], images,
            token_types=inputs["token_types"], vision_in_step=blank)
        labels, types, mask = s_mm.labels, s_mm.token_types, s_mm.attention_mask
        position_ids = s_mm.position_ids
        needs_teacher = bool(enabled - {"sft"})
        t_embeds = None
        if needs_teacher:
            with torch.no_grad():
                t_mm = self.teacher.prepare_inputs_labels_for_multimodal(
                    inputs["input_ids"], None, inputs["attention_mask"], None, None, images,
                    token_types=inputs["token_types"], vision_in_step=blank)
            t_embeds = t_mm.inputs_embeds.to(self.teacher.dtype)
        use_iva = "iva" in enabled and a.iva_weight_source != "uniform"
        iva_model = student if a.iva_weight_source == "student" else self.teacher
        instruction = types == TokenType.INSTRUCTION
        ctx = capture_attention(iva_model, self.iva_layer, instruction, first_call_only=True) if use_iva else None
        with ctx if ctx is not None else contextlib.nullcontext() as capture:
            if "tpa" in enabled:
                response = types == TokenType.RESPONSE
                response[:, 0] = False
                fwd = tpa_forward(student, self.teacher, s_mm.inputs_embeds, t_embeds, mask, position_ids, response,
                                  labels, self.tpa_cfg, self.generator)
                s_hidden, t_hidden = fwd.student_gt, fwd.teacher_gt
            else:
                s_hidden, _ = ground_truth_pass(student, s_mm.inputs_embeds, mask, position_ids, use_cache=False)
                t_hidden = None
                if needs_teacher:
                    with torch.no_grad():
                        t_hidden, _ = ground_truth_pass(self.teacher, t_embeds, mask, position_ids, use_cache=False)
        s_head = student.get_output_embeddings().weight
        t_head = self.teacher.get_output_embeddings().weight if needs_teacher else None
        common = {"kind": a.divergence, "vocab_size": self.vocab_size, "chunk_size": a.loss_chunk_size,
                  **a.divergence_kwargs}
        sums = {}
        with gathered(s_head, t_head):  # ZeRO-3: the teacher's head is read directly (the student's is held)
            if "sft" in enabled:
                sums["sft"] = sft_loss(s_hidden, s_head, labels, a.loss_chunk_size)
            if "kd" in enabled:
                sums["kd"] = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, **common)
            if "iva" in enabled:
                alpha = None
                if use_iva:
                    visual = types == TokenType.VISUAL
                    alpha = importance_from_attention(capture.attn, capture.query_valid, visual)
                weights = iva_weights(alpha, types, a.iva_weight_source, a.iva_normalize)
                sums["iva"] = iva_loss(s_hidden, s_head, t_hidden, t_head, weights, **common)
            if "tpa" in enabled:
                sums["tpa"] = tpa_loss(fwd.rows, fwd.student_gt, fwd.student_cand, fwd.teacher_gt,
                                       fwd.teacher_cand, s_head, t_head, **common)
        return sums

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Each term on its own (mean over the micro-batches since the last log), beside HF's total loss."""
        if "loss" in logs and self.term_log:
            steps = max(self.state.global_step - getattr(self, "_last_term_log_step", 0), 1)
            # per-micro-batch and per-process shares of a step add up to the step's term
            shares = torch.tensor(list(self.term_log.values()), device=self.args.device)
            if self.args.world_size > 1:
                shares = self.accelerator.reduce(shares, reduction="sum")
            for k, v in zip(self.term_log, shares.tolist()):
                logs[f"loss_{k}"] = round(v / steps, 4)
            logs["tokens_response"] = self.global_counts["response"]
            logs["samples_image"] = self.global_counts["images"]
            self.term_log = {}
            self._last_term_log_step = self.state.global_step
        super().log(logs, *args, **kwargs)

