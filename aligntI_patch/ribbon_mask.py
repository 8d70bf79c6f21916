"""Ribbon attention masks for Transition Probability Alignment (paper section 3.2, Fig. 5).

Masks are data: pure functions of the padding mask and the candidate positions, no model inside.

Layout. The paper interleaves the d candidates of position k right after y_{k-1} (Fig. 5). We append them
instead, after the T ground-truth tokens, which is the same computation (attention depends on the mask and
the position ids, not on the storage order) and keeps the ground-truth block an ordinary causal pass:

    rows/cols:  [ y_0 ... y_{T-1} | c_{0,0} ... c_{0,d-1} | c_{1,0} ... | c_{R-1,d-1} ]
                 ground truth (T)    candidates, position-major: row T + r*d + u

Candidate row r*d + u stands at position ``k = cand_pos[b, r]`` (it replaces y_k), takes k's position id,
attends to the ground-truth columns j < k that the padding mask allows, and to itself; no ground-truth row
and no other candidate attends to it. Its output is P(y_{k+1} | y_k^(u), x, y_<k) (Eq. 7).

Conventions: True = attend (what ``sdpa`` takes); ``to_additive`` turns it into the 0 / finfo.min float mask
that ``eager`` adds to its scores. A user 4D mask bypasses transformers' own causal and padding masking, so
these masks contain both. Padding queries also attend to themselves and padding candidate rows
(``cand_pos == -1``) attend to themselves only, so that no row is all False: that gives NaN in some sdpa
kernels, and a NaN in a padding row's values would reach valid rows as 0 * NaN. Their outputs are never used.

Attention is full causal: no sliding window. ``tpa.check_sliding_window`` refuses a model whose window could
cut the sequence (a 4D mask bypasses transformers' own window); shorter sequences need none.
"""

from __future__ import annotations

import torch

__all__ = [
    "candidate_position_ids",
    "candidate_rows_mask",
    "ground_truth_mask",
    "ribbon_mask",
    "to_additive",
]


def _check(attention_mask: torch.Tensor, cand_pos: torch.Tensor, d: int) -> None:
    if d < 1:
        raise ValueError(f"d (candidates per position) must be >= 1, got {d}")
    if attention_mask.ndim != 2 or cand_pos.ndim != 2 or cand_pos.shape[0] != attention_mask.shape[0]:
        raise ValueError(
            f"expected attention_mask [B, T] and cand_pos [B, R], got {tuple(attention_mask.shape)} "
            f"and {tuple(cand_pos.shape)}"
        )
    if cand_pos.numel() and (cand_pos.min() < -1 or cand_pos.max() >= attention_mask.shape[1]):
        raise ValueError("cand_pos entries must be positions in [0, T) or -1 (padding)")


def ground_truth_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal & padding mask of the ground-truth block: bool ``[B, T, T]`` (query, key).

    Padding queries also see themselves (see the module docstring); valid rows are exactly causal & padding.
    """
    B, T = attention_mask.shape
    device = attention_mask.device
    valid = attention_mask.bool()  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & valid[:, None, :]) | eye  # (B, T, T)


def candidate_rows_mask(attention_mask: torch.Tensor, cand_pos: torch.Tensor, d: int) -> torch.Tensor:
    """The candidate rows of the ribbon mask: bool ``[B, 1, R*d, T + R*d]``.

    Row ``r*d + u`` (candidate u at position ``k = cand_pos[b, r]``) sees ground-truth columns ``j < k``
    with ``attention_mask[b, j] == 1`` and its own column ``T + r*d + u``. With a KV cache holding the T
    ground-truth keys, this is the whole mask of the candidate-only forward.
    """
    _check(attention_mask, cand_pos, d)
    B, T = attention_mask.shape
    device = attention_mask.device
    pos = cand_pos.repeat_interleave(d, dim=1)  # (B, M), M = R*d, position-major
    M = pos.shape[1]
    cols = torch.arange(T, device=device)
    # pos == -1 gives an empty prefix: padding candidate rows see themselves only
    prefix = (cols[None, None, :] < pos[:, :, None]) & attention_mask.bool()[:, None, :]  # (B, M, T)
    own = torch.eye(M, dtype=torch.bool, device=device).expand(B, M, M)  # (B, M, M)
    return torch.cat([prefix, own], dim=-1)[:, None]  # (B, 1, M, T + M)


def ribbon_mask(attention_mask: torch.Tensor, cand_pos: torch.Tensor, d: int) -> torch.Tensor:
    """Full mask of the appended pass ``[ground truth ; candidates]``: bool ``[B, 1, T+R*d, T+R*d]``.

    Ground-truth block: causal & padding. Ground-truth rows never see candidate columns. Candidate rows:
    ``candidate_rows_mask``. Equivalent to the interleaved ribbon of the paper's Fig. 5.

    Args:
        attention_mask: ``[B, T]`` 1 for tokens, 0 for padding (left or right).
        cand_pos: ``[B, R]`` long, the position k of each candidate group, -1 for padding groups.
        d: candidates per position; row ``T + r*d + u`` is candidate u of group r.
    """
    rows = candidate_rows_mask(attention_mask, cand_pos, d)[:, 0]  # (B, M, T + M)
    B, T = attention_mask.shape
    M = rows.shape[1]
    gt = ground_truth_mask(attention_mask)  # (B, T, T)
    top = torch.cat([gt, gt.new_zeros(B, T, M)], dim=-1)  # (B, T, T + M)
    return torch.cat([top, rows], dim=1)[:, None]  # (B, 1, T + M, T + M)


def candidate_position_ids(position_ids: torch.Tensor, cand_pos: torch.Tensor, d: int) -> torch.Tensor:
    """Position ids of the candidate rows: ``[B, R*d]``, candidate at k takes ``position_ids[b, k]``.

    Padding groups (``cand_pos == -1``) get position id 0.
    """
    if d < 1:
        raise ValueError(f"d (candidates per position) must be >= 1, got {d}")
    pos = cand_pos.repeat_interleave(d, dim=1)  # (B, M)
    ids = position_ids.expand(pos.shape[0], -1).gather(1, pos.clamp_min(0))  # (B, M)
    return ids.masked_fill(pos < 0, 0)


def to_additive(mask_bool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> float mask, 0 where attending and ``finfo(dtype).min`` elsewhere.

    ``eager`` attention adds the mask to its scores, so a bool mask there would be silently wrong.
    """
    return torch.zeros(mask_bool.shape, dtype=dtype, device=mask_bool.device).masked_fill(
        ~mask_bool, torch.finfo(dtype).min
    )
