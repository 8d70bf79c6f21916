"""Transition Probability Alignment (TPA): candidates, and their exact parallel pass (paper section 3.2).

Eq. 7 aligns, at every response position k, the transition distributions
P(y_{k+1} | y_k^(u), x, y_<k) of d candidates y_k^(u) sampled from the student's (detached) P_S(. | x, y_<k).

Design choices
- Layout: candidates are appended after the T ground-truth tokens with a 4D ribbon mask
  (``ribbon_mask.py``), equivalent to the paper's interleaved ribbon (Fig. 5). Candidate rows are
  position-major (row ``r*d + u``) and are described by a ``CandidateRows``: one position and one token id
  per row, so a de-duplicated set is just a batch with other rows.
- Two exact forms of the pass, both returning final-layer hidden states (after the final norm, before
  lm_head; the losses apply lm_head in chunks): ``appended_pass`` (one forward over T + M tokens) and
  ``cached_pass`` (the ordinary ground-truth forward with a ``DynamicCache``, then only the M candidate rows
  against that cache). They agree in values and parameter gradients. The cached form lets the student's
  ground-truth pass (with grad) also be the sampling pass: 1 student pass + 1 teacher pass per step instead
  of the paper's 2 student passes (its Table 14). HF drops the cache under activation checkpointing
  (``cache_available``), where ``tpa_forward`` falls back to a no-grad sampling pass + ``appended_pass``.
- Exact savings (``dedupe_candidates``): Eq. 7 averages over d samples, so equal candidates at one
  position are evaluated once with weight count/d, and a candidate equal to y_k costs no row: its
  transition distribution is the ground-truth pass's output at k (weight in ``gt_weight``). Same samples,
  same loss, same gradients.
- Sampling computes logits only at the positions k-1 that predict response tokens, in chunks: never a
  ``[B, T, V]`` tensor in the training path.
- Masks follow the model's attention implementation: ``sdpa`` a bool 4D mask, ``eager`` an additive one,
  ``flex_attention`` a BlockMask (``ribbon_block_mask.py``: empty blocks skipped; CUDA for the student's pass,
  as torch has no FlexAttention backward on CPU). transformers passes any 4D mask through untouched.
  ``flash_attention_2`` takes no 4D mask and treats the candidates' repeated position ids as packed
  sequences: it runs ``ground_truth_pass`` only.

Loss bookkeeping for the caller (Eq. 7): with ``rows = tpa_forward(...).rows``,
``L_tpa = sum_rows rows.weight * D(teacher_cand, student_cand) + sum_k rows.gt_weight[b, k] * D(teacher_gt[b, k], student_gt[b, k])``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers.modeling_layers import GradientCheckpointingLayer

from aligntI_patch.ribbon_block_mask import candidate_rows_block_mask, ribbon_block_mask
from aligntI_patch.ribbon_mask import candidate_position_ids, candidate_rows_mask, ribbon_mask, to_additive
from aligntI_patch.zero3 import gathered

logger = logging.getLogger(__name__)

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


def _check_sampling(d: int, strategy: str, top_p: float, temperature: float) -> None:
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
    _check_sampling(d, strategy, top_p, temperature)
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
    _check_sampling(d, strategy, top_p, temperature)
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
) -> torch.Tensor:
    """Training-path sampler: lm_head only on the hidden states at k-1, ``chunk_size`` rows at a time.

    Args:
        lm: the student CausalLM (its ``get_output_embeddings()`` is applied).
        hidden: ``[B, T, H]`` final-layer hidden states of the ground-truth pass (detached here).
        cand_pos: ``[B, R]`` response positions k (``response_positions``), -1 padded.

    Returns:
        ``[B, R, d]`` long candidates (0 on padding groups).
    """
    _check_sampling(d, strategy, top_p, temperature)
    _check_positions(cand_pos)
    B, R = cand_pos.shape
    valid = cand_pos >= 0
    prev = gather_positions(hidden.detach(), (cand_pos - 1).masked_fill(~valid, -1))[valid]  # (N, H)
    head = lm.get_output_embeddings()
    # lm_head through its weight, gathered once: under ZeRO-3 each module call is a collective, and the number
    # of chunks differs between ranks
    with gathered(head.weight, head.bias):
        draws = [
            sample_from_logits(F.linear(chunk, head.weight, head.bias), d, strategy, top_p, temperature,
                               generator)
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


# ----------------------------------------------------------------------------- the parallel pass


def _ribbon_attention_mask(
    lm: nn.Module, attention_mask: torch.Tensor, cand_pos: torch.Tensor, dtype: torch.dtype, cached: bool
) -> torch.Tensor | BlockMask:
    """The ribbon mask (Fig. 5) in the form ``lm``'s attention implementation takes, passed through as-is.

    ``cached=False``: the appended pass, ``[B, 1, T+M, T+M]``; ``cached=True``: the M candidate rows against a
    cache of the T ground-truth keys, ``[B, 1, M, T+M]``. ``sdpa`` takes the bool mask, ``eager`` the additive
    one, ``flex_attention`` a BlockMask (transformers would add a tensor mask to the scores there, a bool one
    wrongly). ``flash_attention_2`` takes no 4D mask and reads the candidates' repeated position
    ids as packed sequences: it can run ``ground_truth_pass`` only.
    """
    impl = lm.config._attn_implementation
    if impl == "flex_attention":
        return (candidate_rows_block_mask if cached else ribbon_block_mask)(attention_mask, cand_pos, 1)
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"TPA candidate rows need a 4D mask; attn_implementation {impl!r} is not supported "
            "(use 'sdpa', 'eager' or 'flex_attention')"
        )
    mask = (candidate_rows_mask if cached else ribbon_mask)(attention_mask, cand_pos, 1)
    return mask if impl == "sdpa" else to_additive(mask, dtype)


def cache_available(lm: nn.Module) -> bool:
    """False where HF drops the KV cache: activation checkpointing while training with grad."""
    if not (lm.training and torch.is_grad_enabled()):
        return True
    return not any(
        m.gradient_checkpointing for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)
    )


def ground_truth_pass(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    use_cache: bool = True,
) -> tuple[torch.Tensor, object | None]:
    """The ordinary causal pass -> (hidden ``[B, T, H]``, ``DynamicCache`` or None).

    Run it under grad for the student: the cache keeps the graph, so ``candidate_pass`` gradients flow
    into the ground-truth keys and values exactly as in ``appended_pass``.
    """
    out = lm.get_decoder()(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
    )
    cache = out.cache if use_cache else None
    if use_cache and (cache is None or cache.get_seq_length() != inputs_embeds.shape[1]):
        raise RuntimeError(
            "the model returned no usable KV cache (activation checkpointing?); use appended_pass instead"
        )
    return out.last_hidden_state, cache


def candidate_pass(
    lm: nn.Module,
    cache: object,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cand_pos: torch.Tensor,
    cand_ids: torch.Tensor,
) -> torch.Tensor:
    """Only the M candidate rows against the ground-truth ``cache`` -> hidden ``[B, M, H]``.

    Mask ``[B, 1, M, T + M]`` (``candidate_rows_mask``), position ids of their positions k. The cache is
    extended by the candidate keys: call once per ``ground_truth_pass``.

    Args:
        attention_mask: ``[B, T]`` padding mask of the ground truth; ``position_ids``: its ``[B, T]`` ids.
        cand_pos, cand_ids: ``[B, M]`` rows (``CandidateRows.pos`` / ``.ids``).
    """
    B, M = cand_ids.shape
    if M == 0:  # one padding row (it sees itself only), dropped below: all ZeRO-3 ranks run the same modules
        cand_pos, cand_ids = cand_pos.new_full((B, 1), -1), cand_ids.new_zeros(B, 1)
    embeds = lm.get_input_embeddings()(cand_ids)  # (B, M, H)
    mask = _ribbon_attention_mask(lm, attention_mask, cand_pos, embeds.dtype, cached=True)  # (B, 1, M, T + M)
    out = lm.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=candidate_position_ids(position_ids, cand_pos, 1),
        cache=cache,
        use_cache=True,
    )
    return out.last_hidden_state[:, :M]


def appended_pass(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cand_pos: torch.Tensor,
    cand_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``[ground truth ; candidates]`` with the ribbon mask -> (gt ``[B,T,H]``, cand ``[B,M,H]``).

    The paper's parallel calculation (Fig. 5) in appended layout; works under activation checkpointing.
    """
    T = inputs_embeds.shape[1]
    embeds = torch.cat([inputs_embeds, lm.get_input_embeddings()(cand_ids)], dim=1)  # (B, T + M, H)
    mask = _ribbon_attention_mask(lm, attention_mask, cand_pos, embeds.dtype, cached=False)  # (B, 1, T+M, T+M)
    pos_ids = torch.cat(
        [position_ids.expand(inputs_embeds.shape[0], -1), candidate_position_ids(position_ids, cand_pos, 1)], dim=1
    )
    hidden = lm.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=pos_ids,
        use_cache=False,
    ).last_hidden_state
    return hidden[:, :T], hidden[:, T:]


def cached_pass(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cand_pos: torch.Tensor,
    cand_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ground_truth_pass`` with a cache, then ``candidate_pass``: same outputs as ``appended_pass``."""
    gt_hidden, cache = ground_truth_pass(lm, inputs_embeds, attention_mask, position_ids, use_cache=True)
    return gt_hidden, candidate_pass(lm, cache, attention_mask, position_ids, cand_pos, cand_ids)


# ----------------------------------------------------------------------------- one training step


@dataclass
class TPAConfig:
    """How TPA samples and evaluates candidates (Eq. 7)."""

    d: int = 4  # candidates per response position (the paper's d, section 4)
    strategy: Strategy = "nucleus"  # the paper's better choice at small d (Fig. 6)
    top_p: float = DEFAULT_TOP_P
    temperature: float = 1.0
    dedupe: bool = True  # exact: same loss and gradients, fewer rows
    chunk_size: int = 1024  # rows of logits per lm_head call while sampling

    def __post_init__(self) -> None:
        _check_sampling(self.d, self.strategy, self.top_p, self.temperature)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


class TPAForward(NamedTuple):
    """Everything the KD and TPA losses need: hidden states (after the final norm) and the rows' weights."""

    rows: CandidateRows
    student_gt: torch.Tensor  # (B, T, H) with grad
    student_cand: torch.Tensor  # (B, M, H) with grad
    teacher_gt: torch.Tensor  # (B, T, H') no grad
    teacher_cand: torch.Tensor  # (B, M, H') no grad


def tpa_forward(
    student: nn.Module,
    teacher: nn.Module,
    student_embeds: torch.Tensor,
    teacher_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
    gt_ids: torch.Tensor,
    cfg: TPAConfig,
    generator: torch.Generator | None = None,
) -> TPAForward:
    """One distillation step's forwards: student ground truth + candidates (grad), teacher (no grad).

    With a usable cache: 1 student pass (ground truth with a cache, sampling from its detached
    logits at the response positions, then the candidate rows) + 1 teacher pass (same form).
    Under activation checkpointing: a no-grad student sampling pass + the appended pass (the paper's 2).

    Args:
        student_embeds / teacher_embeds: ``[B, T, H]`` inputs_embeds of the same layout for each model.
        attention_mask, position_ids: ``[B, T]`` of that layout.
        response_mask: ``[B, T]`` bool, True at response tokens.
        gt_ids: ``[B, T]`` token ids, valid at response positions (the expanded labels work).
    """
    cand_pos = response_positions(response_mask)  # (B, R)
    T = student_embeds.shape[1]

    def make_rows(hidden: torch.Tensor) -> CandidateRows:
        cands = sample_candidates_from_hidden(
            student, hidden, cand_pos, cfg.d, cfg.strategy, cfg.top_p, cfg.temperature, generator, cfg.chunk_size
        )  # (B, R, d)
        if cfg.dedupe:
            return dedupe_candidates(cand_pos, cands, gt_ids)
        return candidate_rows(cand_pos, cands, T)

    if cache_available(student):
        student_gt, cache = ground_truth_pass(student, student_embeds, attention_mask, position_ids)
        rows = make_rows(student_gt)
        student_cand = candidate_pass(student, cache, attention_mask, position_ids, rows.pos, rows.ids)
    else:
        logger.debug("activation checkpointing drops the KV cache: sampling pass + appended pass")
        with torch.no_grad():
            sampling_hidden, _ = ground_truth_pass(
                student, student_embeds, attention_mask, position_ids, use_cache=False
            )
        rows = make_rows(sampling_hidden)
        student_gt, student_cand = appended_pass(
            student, student_embeds, attention_mask, position_ids, rows.pos, rows.ids
        )
    with torch.no_grad():
        teacher_gt, teacher_cand = cached_pass(
            teacher, teacher_embeds, attention_mask, position_ids, rows.pos, rows.ids
        )
    return TPAForward(rows, student_gt, student_cand, teacher_gt, teacher_cand)


# ----------------------------------------------------------------------------- public reference API


def _embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one place that touches the multimodal layout.

    Returns ``(inputs_embeds [B,T',H], attention_mask [B,T'], position_ids [B,T'], source_index [B,T'])``;
    ``source_index[b, j]`` is the index in ``input_ids`` of expanded position j (the image token's index
    for its N_v visual positions, -1 on padding). A plain transformers model, or ``images=None``, embeds
    ``input_ids`` directly (T' = T).
    """
    if images is not None:
        if not hasattr(model, "prepare_inputs_labels_for_multimodal"):
            raise ValueError(f"images given but {type(model).__name__} has no prepare_inputs_labels_for_multimodal")
        mm = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, attention_mask, None, None, images, token_types=None
        )
        return mm.inputs_embeds, mm.attention_mask, mm.position_ids, mm.source_index
    B, T = input_ids.shape
    source_index = torch.arange(T, device=input_ids.device).expand(B, T).masked_fill(attention_mask == 0, -1)
    return model.get_input_embeddings()(input_ids), attention_mask, _position_ids(attention_mask), source_index


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch, left or right padding: cumsum of the mask - 1 (0 on left padding)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def transition_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    candidates: torch.Tensor,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transition logits of Eq. 6-7 by the parallel pass: ``[B, T, d, V]``.

    Entry ``[b, k, u]`` = next-token logits after placing ``candidates[b, k, u]`` at position k (replacing
    ``input_ids[b, k]``) given the prefix before k, i.e. logits of P(y_{k+1} | y_k^(u), x, y_<k).
    Filled where ``response_mask[b, k]``, zeros elsewhere. All indices are in ``input_ids`` space; with
    images the model's multimodal layout is built by ``_embed`` and mapped back through ``source_index``.
    """
    B, T, d = candidates.shape
    embeds, attn, pos_ids, source_index = _embed(model, input_ids, attention_mask, images)
    src = source_index.clamp_min(0)  # (B, T')
    resp = response_mask.bool().gather(1, src) & (source_index >= 0)  # (B, T') response in expanded space
    cand_exp = candidates.gather(1, src[..., None].expand(-1, -1, d))  # (B, T', d)
    cand_pos = response_positions(resp)  # (B, R) expanded positions
    rows = candidate_rows(cand_pos, gather_positions(cand_exp, cand_pos), embeds.shape[1])
    _, hidden = appended_pass(model, embeds, attn, pos_ids, rows.pos, rows.ids)  # (B, R*d, H)
    logits = model.get_output_embeddings()(hidden)  # (B, R*d, V)

    valid = rows.pos >= 0  # (B, R*d)
    orig = source_index.gather(1, rows.pos.clamp_min(0))  # (B, R*d) back to input_ids space
    u = torch.arange(d, device=logits.device).repeat(cand_pos.shape[1]).expand_as(valid)  # (B, R*d)
    b_idx = torch.arange(B, device=logits.device)[:, None].expand_as(valid)
    out = logits.new_zeros(B, T, d, logits.shape[-1])
    out[b_idx[valid], orig[valid], u[valid]] = logits[valid]
    return out
