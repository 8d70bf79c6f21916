"""The four terms of Eq. 8 from final hidden states, as weighted SUMS (the trainer normalises them).

Row conventions in the expanded layout (HF's unshifted labels: position k holds token y_k):
- L_sft and L_kd (Eq. 2) use the output at k-1, which predicts the response token y_k;
- L_iva (Eq. 3) uses the output at each visual position itself, weighted by alpha_k;
- L_tpa (Eq. 7) uses the candidate rows (outputs after y_k^(u) at position k) with weight count/d, plus the
  ground-truth output at k for candidates equal to y_k (weight in `gt_weight`).

Every term computes its logits in chunks of at most `chunk_size` rows and `chunk_elements` logits elements
(`chunked_losses.chunk_rows`); with `head_grad` (a `chunked_losses.SharedHeadGrad` slot) its head gradient goes
into the step's one shared buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aligntI_patch.candidates import CandidateRows
from aligntI_patch.chunked_losses import (
    DEFAULT_CHUNK_ELEMENTS,
    HeadGradSlot,
    chunked_cross_entropy,
    chunked_divergence,
)
from llava.constants import IGNORE_INDEX


def prediction_rows(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose output predicts a supervised token: (row mask [B, T], targets [B, T]) with shifted labels."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def sft_loss(student_hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int,
             chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, head_grad: HeadGradSlot | None = None) -> Tensor:
    """Sum of token cross-entropies of the response tokens (the SFT term)."""
    rows, targets = prediction_rows(labels)
    return chunked_cross_entropy(student_hidden[rows], head, targets[rows], chunk_size=chunk_size,
                                 chunk_elements=chunk_elements, head_grad=head_grad)


def kd_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
            labels: Tensor, kind: str, vocab_size: int, chunk_size: int,
            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, head_grad: HeadGradSlot | None = None,
            **div_kw) -> Tensor:
    """Eq. 2: sum_k D(P_T || P_S)(y_k | x, y_<k) over response tokens (next-token alignment)."""
    rows, _ = prediction_rows(labels)
    weights = torch.ones(int(rows.sum()), device=student_hidden.device)
    return chunked_divergence(student_hidden[rows], student_head, teacher_hidden[rows], teacher_head, weights,
                              kind, vocab_size=vocab_size, chunk_size=chunk_size, chunk_elements=chunk_elements,
                              head_grad=head_grad, **div_kw)


def iva_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
             weights: Tensor, kind: str, vocab_size: int, chunk_size: int,
             chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, head_grad: HeadGradSlot | None = None,
             **div_kw) -> Tensor:
    """Eq. 3: sum_k alpha_k D(P_T || P_S)(v_k | v_<k) over visual positions; `weights` [B, T] hold alpha."""
    rows = weights > 0
    return chunked_divergence(student_hidden[rows], student_head, teacher_hidden[rows], teacher_head,
                              weights[rows], kind, vocab_size=vocab_size, chunk_size=chunk_size,
                              chunk_elements=chunk_elements, head_grad=head_grad, **div_kw)


def tpa_loss(rows: CandidateRows, student_gt: Tensor, student_cand: Tensor, teacher_gt: Tensor,
             teacher_cand: Tensor, student_head: Tensor, teacher_head: Tensor, kind: str, vocab_size: int,
             chunk_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, head_grad: HeadGradSlot | None = None,
             **div_kw) -> Tensor:
    """Eq. 7: sum_k (1/d) sum_u D(P_T || P_S)(y_{k+1} | y_k^(u), x, y_<k), candidates de-duplicated exactly."""
    valid = rows.weight > 0  # (B, M)
    s = torch.cat([student_cand[valid], student_gt[rows.gt_weight > 0]])
    t = torch.cat([teacher_cand[valid], teacher_gt[rows.gt_weight > 0]])
    w = torch.cat([rows.weight[valid], rows.gt_weight[rows.gt_weight > 0]]).float()
    return chunked_divergence(s, student_head, t, teacher_head, w, kind, vocab_size=vocab_size,
                              chunk_size=chunk_size, chunk_elements=chunk_elements, head_grad=head_grad, **div_kw)

