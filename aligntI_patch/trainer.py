"""AlignTITrainer: LLaVA's trainer whose `compute_loss` is Eq. 8,

    L = w_sft * L_sft + w_kd * L_kd (Eq. 2) + w_iva * L_iva (Eq. 3) + w_tpa * L_tpa (Eq. 7).

Design choices:
- One layout for both models: each splices its own visual embeddings into the same expanded sequence
  (N_v must agree), so every term indexes the same positions (`token_types`, `labels`).
- Forwards per step: 1 student pass with grad and 1 teacher pass without grad; with TPA both also run the
  candidate rows against their KV cache (`tpa.tpa_forward`), sampling from the student's own detached
  ground-truth logits. The IVA source's attention is recomputed by a hook entered around exactly its
  ground-truth pass. `step_forward` runs all of it and returns a `StepForward`; `loss_term_sums` is the pure
  function that turns it and the two lm_head weights into the term sums.
- Every term is a token SUM divided by its count over the whole global batch (all accumulation micro-batches
  and processes, counted in `get_batch_samples`): 2 x 4 accumulation equals one batch of 8 exactly.
  Response terms divide by response tokens, IVA by the samples that have an image (Eq. 3 is per sample),
  L_sft by the response tokens it trains on (GKD's on-policy batches carry no L_sft unless --on_policy_sft).
- The term sums run as the student's forward called through its DeepSpeed engine or DDP wrapper, so the
  wrapper's bookkeeping runs as for `model(**inputs)`. Under ZeRO-3 the teacher is partitioned too
  (`aligntI_patch/zero3.py`, `llava/train/zero3.py`), directly read lm_head weights are gathered, and every rank calls the same modules in order.
- Resume is exact: each checkpoint holds every process's sampling state (TPA's candidate generator, which lives
  on the device of the logits it samples, and the on-policy draws) in `sampling_state_{rank}.pth`. On-policy
  generation runs on its own seeded torch stream, so it never touches the global RNG that HF restores after
  the first resumed step's batches are fetched.
- Logs: `loss_<term>`, `tokens_response` and `samples_image` are per optimizer step, means over the logging
  window (global counts: all micro-batches and processes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from dataclasses import dataclass

import torch
from torch import nn

from aligntI_patch.attention_hook import capture_attention
from aligntI_patch.chunked_losses import DEFAULT_CHUNK_ELEMENTS, SharedHeadGrad, chunk_rows, step_chunk_rows
from aligntI_patch.iva import importance_from_attention, iva_weights
from aligntI_patch.layout import batch_layout, embed
from aligntI_patch.losses import iva_loss, kd_loss, prediction_rows, sft_loss, tpa_loss
from aligntI_patch.on_policy import on_policy_batch
from aligntI_patch.tpa import TPAConfig, TPAForward, ground_truth_pass, tpa_forward
from aligntI_patch.zero3 import hold_lm_head
from llava.constants import IMAGE_TOKEN_INDEX, TokenType
from llava.train.llava_trainer import LLaVATrainer
from llava.train.zero3 import gathered, needs_blank_image, through_wrapper

logger = logging.getLogger(__name__)
TERMS = ("sft", "kd", "iva", "tpa")
COUNTS = ("tokens_response", "samples_image")


def sampling_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """TPA's candidate generator, on `device`: torch.multinomial needs its generator where the logits are."""
    return torch.Generator(device=device).manual_seed(seed)


def sft_applies(batch: dict, on_policy_sft: bool) -> bool:
    """L_sft trains on ground-truth replies, and on the student's own (on-policy) ones only when asked."""
    return on_policy_sft or not batch.get("on_policy", False)


def batch_counts(batch: dict, on_policy_sft: bool = False) -> torch.Tensor:
    """[response tokens predicted, samples with an image, response tokens L_sft trains on] of one micro-batch:
    the terms' normalisers."""
    response = prediction_rows(batch["labels"])[0].sum()
    sft = response if sft_applies(batch, on_policy_sft) else torch.zeros_like(response)
    return torch.stack([response, (batch["input_ids"] == IMAGE_TOKEN_INDEX).any(1).sum(), sft]).float()  # (3,)


@dataclass
class StepForward:
    """What one micro-batch's forwards give the terms, in the expanded layout (T positions)."""

    labels: torch.Tensor  # (B, T) HF labels, IGNORE_INDEX off the responses
    token_types: torch.Tensor  # (B, T)
    student_hidden: torch.Tensor  # (B, T, H) final hidden states, with grad
    teacher_hidden: torch.Tensor | None  # (B, T, H') no grad; None without a teacher term
    alpha: torch.Tensor | None  # (B, N_v) Eq. 3's alpha from the IVA source's attention; None if uniform or off
    tpa: TPAForward | None  # candidate rows and their hidden states (Eq. 7); None without TPA
    sft: bool  # L_sft applies to this batch (not an on-policy batch, or --on_policy_sft)


def loss_term_sums(fwd: StepForward, student_head: torch.Tensor, teacher_head: torch.Tensor | None,
                   enabled: set[str], kind: str, vocab_size: int, chunk_size: int, iva_weight_source: str,
                   iva_normalize: bool, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                   coefficients: dict[str, float] | None = None, **div_kw) -> dict[str, torch.Tensor]:
    """Token sums of the enabled terms of Eq. 8 from a step's forwards and the two lm_head weights (full, not
    ZeRO-3 shards): L_sft, L_kd (Eq. 2), L_iva (Eq. 3), L_tpa (Eq. 7). The trainer divides them by global counts.
    Logits are built in chunks of at most `chunk_size` rows and `chunk_elements` elements, and no larger than
    the response terms' own (`chunked_losses.step_chunk_rows`).

    `coefficients` (each enabled term's factor in the step's total: weight / global count) give the terms one
    shared head gradient instead of one each (`chunked_losses.SharedHeadGrad`); the sums must then reach the
    backward as a multiple of sum_k coefficients[k] * sums[k] (anything else raises there)."""
    s, t = fwd.student_hidden, fwd.teacher_hidden
    chunk_size = step_chunk_rows(int(prediction_rows(fwd.labels)[0].sum()), student_head.shape[0], chunk_size,
                                 chunk_elements)
    sink = None
    if coefficients is not None and torch.is_grad_enabled() and student_head.requires_grad:
        sink = SharedHeadGrad(student_head, None, {k: coefficients[k] for k in enabled})

    def opts(name: str) -> dict:  # chunking and, with a shared head gradient, the term's slot in it
        return {"chunk_size": chunk_size, "chunk_elements": chunk_elements,
                "head_grad": None if sink is None else sink.slot(name)}

    common = {"kind": kind, "vocab_size": vocab_size, **div_kw}
    sums = {}
    if "sft" in enabled:  # zero on an on-policy batch (unless --on_policy_sft): GKD trains no SFT there
        sums["sft"] = sft_loss(s, student_head, fwd.labels, **opts("sft")) if fwd.sft else s.new_zeros(())
    if "kd" in enabled:
        sums["kd"] = kd_loss(s, student_head, t, teacher_head, fwd.labels, **common, **opts("kd"))
    if "iva" in enabled:
        weights = iva_weights(fwd.alpha, fwd.token_types, iva_weight_source, iva_normalize)
        sums["iva"] = iva_loss(s, student_head, t, teacher_head, weights, **common, **opts("iva"))
    if "tpa" in enabled:
        p = fwd.tpa
        sums["tpa"] = tpa_loss(p.rows, p.student_gt, p.student_cand, p.teacher_gt, p.teacher_cand, student_head,
                               teacher_head, **common, **opts("tpa"))
    return sums if sink is None else sink.attach(sums)


class AlignTITrainer(LLaVATrainer):
    def __init__(self, *args, teacher: nn.Module | None, iva_layer: int, vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None  # None: SFT only
        hold_lm_head(self.model, self.args)
        self.iva_layer = iva_layer
        self.vocab_size = vocab_size
        a = self.args
        self.weights = {"sft": a.w_sft, "kd": a.w_kd, "iva": a.w_iva, "tpa": a.w_tpa}
        self.enabled = {k for k in TERMS if self.weights[k] > 0}
        self.tpa_cfg = TPAConfig(d=a.tpa_num_samples, strategy=a.tpa_sampling, top_p=a.tpa_top_p,
                                 temperature=a.tpa_temperature, dedupe=a.tpa_dedupe,
                                 chunk_size=chunk_rows(vocab_size, a.loss_chunk_size, a.loss_chunk_elements),
                                 vocab_size=vocab_size)
        # the student's logits live on the training device (HF or DeepSpeed moves the model there)
        self.generator = sampling_generator(a.device, a.seed)
        self.on_policy_rng = random.Random(a.seed)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by global counts itself
        self.global_counts = {"response": 1.0, "images": 1.0, "sft": 1.0}
        self.log_keys = [f"loss_{k}" for k in TERMS if self.weights[k] > 0] + list(COUNTS)
        self.log_sums: torch.Tensor | None = None  # (len(log_keys),) this process's shares since the last log
        self.log_window_start = 0  # global step before the window's first step (set at its first micro-batch)

    # -- resume -----------------------------------------------------------------------------------------------
    def sampling_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"sampling_state_{self.args.process_index}.pth")

    def save_resume_state(self, checkpoint: str) -> None:
        """Also this process's sampling state; get_state() is a CPU byte tensor on any device."""
        super().save_resume_state(checkpoint)
        state = {"tpa": self.generator.get_state(), "on_policy": self.on_policy_rng.getstate()}
        torch.save(state, self.sampling_state_path(checkpoint))

    def load_resume_state(self, checkpoint: str) -> None:
        super().load_resume_state(checkpoint)
        path = self.sampling_state_path(checkpoint)
        if not os.path.isfile(path):
            logger.warning("%s is missing (a checkpoint from before it was saved, or fewer processes): TPA and "
                           "on-policy sampling restart from --seed, so the resumed run is not exact", path)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.generator.set_state(state["tpa"])
        self.on_policy_rng.setstate(state["on_policy"])

    # -- normalisation ------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count, over all accumulation micro-batches and processes, response tokens, image samples and the
        response tokens L_sft trains on."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.on_policy_prob:  # before counting, so that on-policy tokens are normalised by their own count
            batches = [self.maybe_on_policy(b) for b in batches]
        counts = sum((batch_counts(b, self.args.on_policy_sft).to(device) for b in batches),
                     torch.zeros(3, device=device))
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        self.global_counts = {k: max(float(c), 1.0) for k, c in zip(("response", "images", "sft"), counts)}
        return batches, num_items

    def maybe_on_policy(self, batch: dict) -> dict:
        """GKD baseline: with probability `on_policy_prob`, the batch's responses sampled from the student.

        The seeded draw is the same on every process, so all ranks generate together, and a text-only batch
        still runs the vision path (ZeRO-3 needs both: every module call is a collective). Sampling runs on a
        forked torch RNG seeded from `on_policy_rng` (per rank), so a resumed run samples the same replies."""
        if self.on_policy_rng.random() >= self.args.on_policy_prob:
            return batch
        seed = self.on_policy_rng.randrange(2**32) + self.args.process_index
        student = self.accelerator.unwrap_model(self.model)
        blank = needs_blank_image(batch.get("images"), self.args)
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return on_policy_batch(student, batch, self.processing_class, self.args.on_policy_max_new_tokens,
                                   blank, self.args.on_policy_temperature, self.vocab_size)

    # -- the loss -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Eq. 8: the weighted sum of the enabled terms, each normalised by its global count."""
        self.pop_skipped(inputs)
        student = self.accelerator.unwrap_model(model)
        scale = {"sft": "sft", "kd": "response", "tpa": "response", "iva": "images"}
        # each term's factor in `total`, known now: the terms share one lm_head gradient (loss_term_sums)
        coefficients = {k: self.weights[k] / self.global_counts[scale[k]] for k in self.enabled}
        term_sums = functools.partial(self.term_sums, student, coefficients=coefficients)
        sums = through_wrapper(model, student, term_sums, inputs)
        terms = {k: v / self.global_counts[scale[k]] for k, v in sums.items()}
        total = sum(self.weights[k] * terms[k] for k in terms)
        if self.log_sums is None:  # first micro-batch since the last log (or since the start / the resume)
            self.log_window_start = self.state.global_step
            self.log_sums = torch.zeros(len(self.log_keys), device=total.device)
        term_shares = torch.stack([terms[k].detach().float() for k in TERMS if k in terms])
        self.log_sums += torch.cat([term_shares, batch_counts(inputs)[:2].to(total.device)])
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            total = total * self.args.world_size  # data parallelism averages gradients; counts are global
        return (total, None) if return_outputs else total

    def term_sums(self, student: nn.Module, inputs: dict,
                  coefficients: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Token sums of every enabled term for one micro-batch: the step's forwards, then the pure terms
        (`coefficients`: see `loss_term_sums`)."""
        a = self.args
        fwd = self.step_forward(student, inputs)
        s_head = student.get_output_embeddings().weight
        t_head = self.teacher.get_output_embeddings().weight if fwd.teacher_hidden is not None else None
        with gathered(s_head, t_head):  # ZeRO-3: the teacher's head is read directly (the student's is held)
            return loss_term_sums(fwd, s_head, t_head, self.enabled, a.divergence, self.vocab_size,
                                  a.loss_chunk_size, a.iva_weight_source, a.iva_normalize, a.loss_chunk_elements,
                                  coefficients, **a.divergence_kwargs)

    def step_forward(self, student: nn.Module, inputs: dict) -> StepForward:
        """Every forward of one micro-batch: both models' ground-truth passes on one layout, TPA's candidate rows,
        and the IVA source's instruction->vision attention captured on its ground-truth pass."""
        a = self.args
        enabled = self.enabled
        images = inputs.get("images")
        blank = needs_blank_image(images, a)
        layout = batch_layout(student, inputs)  # one layout; each model places its own visual embeddings
        labels, types = layout.labels, layout.token_types
        mask, position_ids = layout.attention_mask, layout.position_ids
        s_embeds = embed(student, layout, images, blank)
        needs_teacher = bool(enabled - {"sft"})
        t_embeds = None
        if needs_teacher:
            with torch.no_grad():
                t_embeds = embed(self.teacher, layout, images, blank).to(self.teacher.dtype)
        capture = None
        if "iva" in enabled and a.iva_weight_source != "uniform":
            iva_model = student if a.iva_weight_source == "student" else self.teacher
            capture = capture_attention(iva_model, self.iva_layer, types == TokenType.INSTRUCTION)
        s_capture = capture if a.iva_weight_source == "student" else None
        t_capture = capture if a.iva_weight_source == "teacher" else None
        fwd = None
        if "tpa" in enabled:
            response = types == TokenType.RESPONSE
            response[:, 0] = False
            fwd = tpa_forward(student, self.teacher, s_embeds, t_embeds, mask, position_ids, response,
                              labels, self.tpa_cfg, self.generator, s_capture, t_capture)
            s_hidden, t_hidden = fwd.student_gt, fwd.teacher_gt
        else:
            with s_capture or contextlib.nullcontext():
                s_hidden, _ = ground_truth_pass(student, s_embeds, mask, position_ids, use_cache=False)
            t_hidden = None
            if needs_teacher:
                with torch.no_grad(), t_capture or contextlib.nullcontext():
                    t_hidden, _ = ground_truth_pass(self.teacher, t_embeds, mask, position_ids, use_cache=False)
        alpha = None
        if capture is not None:
            alpha = importance_from_attention(capture.attn, capture.query_valid, types == TokenType.VISUAL)
        return StepForward(labels, types, s_hidden, t_hidden, alpha, fwd, sft_applies(inputs, a.on_policy_sft))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Beside HF's total loss: each term and the global counts, per optimizer step, means over the window."""
        if "loss" in logs and self.log_sums is not None:
            steps = max(self.state.global_step - self.log_window_start, 1)
            # per-micro-batch and per-process shares of a step add up to the step's term (and global count)
            sums = self.log_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            for k, v in zip(self.log_keys, sums.tolist()):
                logs[k] = round(v / steps, 4)
            self.log_sums = None
        super().log(logs, *args, **kwargs)
