"""Ribbon masks as FlexAttention ``BlockMask``s (paper section 3.2, Fig. 5), for ``flex_attention`` models.

The two masks of ``ribbon_mask.py`` (same semantics, same appended layout, see its docstring), described by a
``mask_mod`` instead of a dense tensor, so FlexAttention skips the empty blocks: ground-truth rows x candidate
columns, and all but the diagonal of candidates x candidates.

Design choices
- One rule for every row: query q sees key j iff ``(j < limit[b, q] and key_ok[b, j]) or j == q + offset``.
  ``key_ok [B, T+M]`` is the padding mask of the ground-truth keys (False on candidate keys); ``limit`` is
  ``q + 1`` on ground-truth rows (causal) and the position k on candidate rows (prefix ``j < k``, empty on
  padding rows, ``k == -1``); ``j == q + offset`` is each row's own key, which also keeps padding rows from
  being all-masked. The ``mask_mod`` closes over these two small index tensors only.
- Both index tensors span the full query / key axes, so every index the ``mask_mod`` is called with is in range.
- ``create_block_mask`` is not compiled: it evaluates the ``mask_mod`` once over the grid (B x Q x KV bools,
  a few MB at paper scale) to find the non-empty blocks, cheaper than a compile per new sequence length.
  Attention itself runs through transformers' compiled ``flex_attention`` and never sees a dense mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from aligntI_patch.ribbon_mask import _check

__all__ = ["candidate_rows_block_mask", "ribbon_block_mask", "ribbon_mask_mod"]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ribbon_mask_mod(limit: torch.Tensor, key_ok: torch.Tensor, offset: int) -> MaskMod:
    """The rule of every ribbon row: ``(j < limit[b, q] & key_ok[b, j]) | (j == q + offset)`` at (b, h, q, j).

    Args:
        limit: ``[B, Q]`` long, exclusive bound on the ground-truth keys row q sees.
        key_ok: ``[B, KV]`` bool, keys any row may see under its limit (valid ground-truth keys).
        offset: key index of query 0's own key (0 in the appended pass, T against a cache of T keys).
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # h unused: one mask for all heads (create_block_mask with H=None)
        return ((kv_idx < limit[b, q_idx]) & key_ok[b, kv_idx]) | (kv_idx == q_idx + offset)

    return mask_mod


def _key_ok(attention_mask: torch.Tensor, M: int) -> torch.Tensor:
    """Valid ground-truth keys, then M candidate keys that only their own row sees: ``[B, T + M]`` bool."""
    cand_keys = torch.zeros(attention_mask.shape[0], M, dtype=torch.bool, device=attention_mask.device)
    return torch.cat([attention_mask.bool(), cand_keys], dim=1)


def candidate_rows_block_mask(attention_mask: torch.Tensor, cand_pos: torch.Tensor, d: int) -> BlockMask:
    """``candidate_rows_mask`` as a BlockMask ``[B, 1, R*d, T + R*d]``: the candidates against T cached keys.

    Row ``r*d + u`` sees valid ground-truth keys ``j < cand_pos[b, r]`` and its own key ``T + r*d + u``.
    """
    _check(attention_mask, cand_pos, d)
    B, T = attention_mask.shape
    limit = cand_pos.repeat_interleave(d, dim=1)  # (B, M) position k of each row, -1 on padding rows
    M = limit.shape[1]
    mask_mod = ribbon_mask_mod(limit, _key_ok(attention_mask, M), offset=T)
    return create_block_mask(mask_mod, B, None, M, T + M, device=attention_mask.device)


def ribbon_block_mask(attention_mask: torch.Tensor, cand_pos: torch.Tensor, d: int) -> BlockMask:
    """``ribbon_mask`` as a BlockMask of shape ``[B, 1, T+R*d, T+R*d]``: the appended pass of Fig. 5.

    Ground-truth row i: valid keys ``j <= i`` and itself. Candidate rows: as ``candidate_rows_block_mask``.
    """
    _check(attention_mask, cand_pos, d)
    B, T = attention_mask.shape
    cand_limit = cand_pos.repeat_interleave(d, dim=1)  # (B, M)
    M = cand_limit.shape[1]
    causal_limit = torch.arange(1, T + 1, device=cand_pos.device).expand(B, T)  # (B, T) row i sees j <= i
    limit = torch.cat([causal_limit, cand_limit], dim=1)  # (B, T + M)
    mask_mod = ribbon_mask_mod(limit, _key_ok(attention_mask, M), offset=0)
    return create_block_mask(mask_mod, B, None, T + M, T + M, device=attention_mask.device)
