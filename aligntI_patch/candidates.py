"""TPA's candidates (paper section 3.2, Eq. 7): sampled from the student's detached P_S(. | x, y_<k), as rows.

- Sampling: nucleus (top-p, temperature) or greedy top-d (Fig. 6), d per response position k; the training path
  applies lm_head only at the positions k-1 that predict response tokens, in chunks (never ``[B, T, V]``).
- Rows: one position and one token id per candidate row (``CandidateRows``), position-major (row ``r*d + u``),
  so a de-duplicated set is just a batch with other rows. ``dedupe_candidates`` is exact: equal candidates at
  one position become one row of weight count/d, candidates equal to y_k reuse the ground-truth row.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llava.train.zero3 import gathered

Strategy = Literal["nucleus", "greedy"]
# The paper does not state p. 0.9 is the usual nucleus value (Holtzman et al., 2020) and keeps samples in
# the high-probability part the paper argues is adequate (section 4.2); top_p=1.0 samples P_S itself.
DEFAULT_TOP_P = 0.9


class CandidateRows(NamedTuple):
    """Candidate rows of one batch, position-major.

    pos: ``[B, M]`` long, position k each row stands at, -1 on padding rows.
    ids: ``[B, M]`` long, token placed at k (0 on padding rows).
    weight: ``[B, M]`` float, Eq. 7 weight of the row's divergence (1/d, or count/d after dedupe; 0 on padding).
    gt_weight: ``[B, T]`` float, Eq. 7 weight added to the ground-truth transition at k (candidates equal to y_k).
    """

    pos: torch.Tensor
    ids: torch.Tensor
    weight: torch.Tensor
    gt_weight: torch.Tensor


# ----------------------------------------------------------------------------- sampling


def check_sampling(d: int, strategy: str, top_p: float, temperature: float) -> None:
    if d < 1:
        raise ValueError(f"d (candidates per position) must be >= 1, got {d}")
    if strategy not in ("nucleus", "greedy"):
        raise ValueError(f"strategy must be 'nucleus' or 'greedy', got {strategy!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def sample_from_logits(
    logits: torch.Tensor,
    d: int,
    strategy: Strategy = "nucleus",
    top_p: float = DEFAULT_TOP_P,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """d candidates per row of ``logits [N, V]`` -> ``[N, d]`` long (the y_k^(u) of Eq. 7).

    greedy: the top-d distinct tokens (paper Fig. 6). nucleus: d draws with replacement from the
    temperature-scaled distribution truncated to its smallest top-p set.
    """
    check_sampling(d, strategy, top_p, temperature)
    if strategy == "greedy":
        if d > logits.shape[-1]:
            raise ValueError(f"greedy needs d <= vocabulary size, got d={d}, V={logits.shape[-1]}")
        return logits.topk(d, dim=-1).indices  # (N, d)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
        # keep a token while the mass strictly before it is < top_p: the smallest set reaching top_p
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, d, replacement=True, generator=generator)  # (N, d)


def response_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """Positions k of the response tokens: ``[B, T]`` bool -> ``[B, R]`` long, ascending, -1 padded."""
    B, T = response_mask.shape
    mask = response_mask.bool()
    counts = mask.sum(dim=1)  # (B,)
    R = int(counts.max()) if B else 0
    idx = torch.arange(T, device=mask.device).expand(B, T)
    order = torch.where(mask, idx, idx + T).sort(dim=1).values[:, :R]  # response positions first
    rank = torch.arange(R, device=mask.device)[None, :]
    return torch.where(rank < counts[:, None], order, torch.full_like(order, -1))  # (B, R)


def gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x [B, T, *rest]`` at ``pos [B, R]`` -> ``[B, R, *rest]``, zeros where ``pos == -1``."""
    index = pos.clamp_min(0).view(*pos.shape, *([1] * (x.ndim - 2))).expand(*pos.shape, *x.shape[2:])
    out = x.gather(1, index)
    return out.masked_fill((pos < 0).view(*index.shape[:2], *([1] * (x.ndim - 2))), 0)


def _check_positions(cand_pos: torch.Tensor) -> None:
    if bool((cand_pos == 0).any()):
        raise ValueError("a response token at position 0 has no preceding logits to sample its candidates from")


def sample_candidates(
    logits: torch.Tensor,
    response_mask: torch.Tensor,
    d: int,
    strategy: Strategy = "nucleus",
    top_p: float = DEFAULT_TOP_P,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Candidates y_k^(u) ~ P_S(. | x, y_<k) for every response position k (Eq. 7).

    Args:
        logits: ``[B, T, V]`` student logits, detached; ``logits[:, k-1]`` predicts position k.
        response_mask: ``[B, T]`` bool, True at response tokens (unshifted, as HF labels).
        d, strategy, top_p, temperature, generator: see ``sample_from_logits``.

    Returns:
        ``[B, T, d]`` long; entries where ``response_mask`` is False are 0 and meaningless.
    """
    check_sampling(d, strategy, top_p, temperature)
    B, T, _ = logits.shape
    cand_pos = response_positions(response_mask)  # (B, R)
    _check_positions(cand_pos)
    valid = cand_pos >= 0
    b_idx = torch.arange(B, device=logits.device)[:, None].expand_as(cand_pos)[valid]  # (N,)
    k = cand_pos[valid]  # (N,)
    rows = logits.detach()[b_idx, k - 1]  # (N, V) the logits predicting position k
    out = torch.zeros(B, T, d, dtype=torch.long, device=logits.device)
    out[b_idx, k] = sample_from_logits(rows, d, strategy, top_p, temperature, generator)
    return out


@torch.no_grad()
def sample_candidates_from_hidden(
    lm: nn.Module,
    hidden: torch.Tensor,
    cand_pos: torch.Tensor,
    d: int,
    strategy: Strategy = "nucleus",
    top_p: float = DEFAULT_TOP_P,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Training-path sampler: lm_head only on the hidden states at k-1, ``chunk_size`` rows at a time.

    Args:
        lm: the student CausalLM (its ``get_output_embeddings()`` is applied).
        hidden: ``[B, T, H]`` final-layer hidden states of the ground-truth pass (detached here).
        cand_pos: ``[B, R]`` response positions k (``response_positions``), -1 padded.
        vocab_size: draw only ids below it, the shared tokenizer's (lm_head rows past it are padding, e.g.
            Qwen2-0.5B's 151936 rows for 151665 tokens: no tokenizer decodes them). None: every row.

    Returns:
        ``[B, R, d]`` long candidates (0 on padding groups).
    """
    check_sampling(d, strategy, top_p, temperature)
    _check_positions(cand_pos)
    B, R = cand_pos.shape
    valid = cand_pos >= 0
    prev = gather_positions(hidden.detach(), (cand_pos - 1).masked_fill(~valid, -1))[valid]  # (N, H)
    head = lm.get_output_embeddings()
    # lm_head through its weight, gathered once: under ZeRO-3 each module call is a collective, and the number
    # of chunks differs between ranks
    with gathered(head.weight, head.bias):
        weight = head.weight[:vocab_size]  # (V, H): the tokenizer's rows only
        bias = None if head.bias is None else head.bias[:vocab_size]
        draws = [
            sample_from_logits(F.linear(chunk, weight, bias), d, strategy, top_p, temperature, generator)
            for chunk in prev.split(chunk_size)
        ]
    out = torch.zeros(B, R, d, dtype=torch.long, device=hidden.device)
    if draws:
        out[valid] = torch.cat(draws)
    return out


# ----------------------------------------------------------------------------- candidate rows


def candidate_rows(cand_pos: torch.Tensor, candidates: torch.Tensor, seq_len: int) -> CandidateRows:
    """All d candidates of each position as rows (no dedupe): row ``r*d + u``, weight 1/d (Eq. 7)."""
    B, R, d = candidates.shape
    pos = cand_pos.repeat_interleave(d, dim=1)  # (B, R*d)
    ids = candidates.reshape(B, R * d).masked_fill(pos < 0, 0)
    weight = (pos >= 0).float() / d
    gt_weight = torch.zeros(B, seq_len, device=candidates.device)
    return CandidateRows(pos, ids, weight, gt_weight)


def dedupe_candidates(cand_pos: torch.Tensor, candidates: torch.Tensor, input_ids: torch.Tensor) -> CandidateRows:
    """Exact savings below the cost floor: the rows Eq. 7 really needs, with their weights.

    Equal candidates at one position become one row of weight count/d; candidates equal to the
    ground-truth token y_k become ``gt_weight[b, k] += count/d`` and no row (the ground-truth pass's
    output at k is that transition). The weighted loss equals the plain one exactly.

    Args:
        cand_pos: ``[B, R]`` response positions k, -1 padded.
        candidates: ``[B, R, d]`` long, candidates of each position.
        input_ids: ``[B, T]`` ground-truth token ids, valid at least at ``cand_pos`` (labels work too).
    """
    B, R, d = candidates.shape
    T = input_ids.shape[1]
    device = candidates.device
    valid = cand_pos >= 0  # (B, R)
    gt = input_ids.gather(1, cand_pos.clamp_min(0))  # (B, R) y_k
    srt = candidates.sort(dim=-1).values  # (B, R, d)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    count = (srt[..., :, None] == srt[..., None, :]).sum(dim=-1)  # (B, R, d) multiplicity of each entry
    keep = (first & (srt != gt[..., None]) & valid[..., None]).reshape(B, R * d)  # (B, R*d)

    gt_count = ((candidates == gt[..., None]).sum(dim=-1) * valid).float()  # (B, R)
    gt_weight = torch.zeros(B, T, device=device).scatter_add(1, cand_pos.clamp_min(0), gt_count / d)

    M = int(keep.sum(dim=1).max()) if keep.numel() else 0
    b_idx, j = keep.nonzero(as_tuple=True)
    slot = (keep.cumsum(dim=1) - 1)[b_idx, j]  # compact kept rows to the left
    pos = torch.full((B, M), -1, dtype=torch.long, device=device)
    ids = torch.zeros(B, M, dtype=torch.long, device=device)
    weight = torch.zeros(B, M, device=device)
    pos[b_idx, slot] = cand_pos.repeat_interleave(d, dim=1)[b_idx, j]
    ids[b_idx, slot] = srt.reshape(B, R * d)[b_idx, j]
    weight[b_idx, slot] = count.reshape(B, R * d)[b_idx, j].float() / d
    return CandidateRows(pos, ids, weight, gt_weight)
