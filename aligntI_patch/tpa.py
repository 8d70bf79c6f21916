"""Transition Probability Alignment (TPA): the exact parallel pass over the candidates (paper section 3.2).

Eq. 7 aligns, at every response position k, the transition distributions
P(y_{k+1} | y_k^(u), x, y_<k) of d candidates y_k^(u) sampled from the student's (detached) P_S(. | x, y_<k).

Design choices
- Layout: candidates (``candidates.py``: sampling, rows, exact dedupe) are appended after the T ground-truth
  tokens with a 4D ribbon mask (``ribbon_mask.py``), equivalent to the paper's interleaved ribbon (Fig. 5).
- Two exact forms of the pass, both returning final-layer hidden states (after the final norm, before
  lm_head; the losses apply lm_head in chunks): ``appended_pass`` (one forward over T + M tokens) and
  ``cached_pass`` (the ordinary ground-truth forward with a ``DynamicCache``, then only the M candidate rows
  against that cache). They agree in values and parameter gradients. The cached form lets the student's
  ground-truth pass (with grad) also be the sampling pass: 1 student pass + 1 teacher pass per step instead
  of the paper's 2 student passes (its Table 14).
- Activation checkpointing: HF drops the cache in every checkpointed layer (``cache_available``). The
  ground-truth pass then returns each layer's input instead (``output_hidden_states``, with the graph through
  the checkpoints) and the cache is rebuilt from them outside HF's checkpoints (``layer_keys_values``: the
  layer's own input_layernorm, k/v projections, Qwen3's k_norm and RoPE). The M candidate rows run with the
  layers' checkpointing off (``checkpointing_disabled``: a checkpointed layer would drop the cache they attend
  to) in L checkpointed segments of ceil(M / L) rows (L layers), each replayed in the backward on a copy of the
  ground-truth cache. Exact: the rows' gradients reach the checkpointed layers through the rebuilt keys and
  values. Per step this saves the no-grad sampling pass over T of the former fallback (``appended_pass`` after
  it); keeping the rows' activations instead (M up to d*R tokens, more than T at the paper's mix) made an
  Align-TI step 45 % larger than the former fallback's, one segment of all M rows would hold L x M row-layers
  in its replay (docs/performance.md).
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
- Sliding-window attention (Qwen2/Qwen3 ``use_sliding_window``; released configs leave it off) is refused
  wherever it could cut something (``check_sliding_window``): the ribbon masks are full causal, a 4D mask
  bypasses transformers' window, and a sliding layer's cache keeps only the last ``sliding_window - 1``
  keys, which the candidate rows of ``candidate_pass`` need all of. Sequences shorter than the window are
  exact as they are.

Loss bookkeeping for the caller (Eq. 7): with ``rows = tpa_forward(...).rows``,
``L_tpa = sum_rows rows.weight * D(teacher_cand, student_cand) + sum_k rows.gt_weight[b, k] * D(teacher_gt[b, k], student_gt[b, k])``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from aligntI_patch.attention_hook import attention_keys, decoder_layers
from aligntI_patch.candidates import (
    DEFAULT_TOP_P,
    CandidateRows,
    Strategy,
    candidate_rows,
    check_sampling,
    dedupe_candidates,
    gather_positions,
    response_positions,
    sample_candidates_from_hidden,
)
from aligntI_patch.layout import batch_layout, embed
from aligntI_patch.ribbon_block_mask import candidate_rows_block_mask, ribbon_block_mask
from aligntI_patch.ribbon_mask import candidate_position_ids, candidate_rows_mask, ribbon_mask, to_additive

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the parallel pass


def check_sliding_window(config: PretrainedConfig, seq_len: int, name: str = "the model") -> None:
    """Raise ``ValueError`` if a sliding-window layer of ``config`` could cut a sequence of ``seq_len`` tokens.

    transformers' window keeps key j for query i when i - j < sliding_window, and a sliding layer's
    ``DynamicCache`` keeps the last sliding_window - 1 keys: with seq_len < sliding_window neither drops a
    key of the ground truth or of a candidate (at most seq_len - 1 back), so the full-causal ribbon is exact.
    Which layers slide is ``config.layer_types`` (Qwen2/Qwen3: layers >= max_window_layers when
    ``use_sliding_window``; ``sliding_window`` is None otherwise).
    """
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if window is not None and sliding and seq_len >= window:
        raise ValueError(
            f"{name} uses sliding-window attention (sliding_window={window} on layers {sliding}), which would "
            f"cut sequences of {seq_len} tokens; TPA's ribbon masks and KV cache assume full causal attention. "
            f"Use sequences shorter than {window} tokens or a config with use_sliding_window=false (as released)"
        )


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
    check_sliding_window(lm.config, attention_mask.shape[1], type(lm).__name__)
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


@contextmanager
def checkpointing_disabled(lm: nn.Module) -> Iterator[None]:
    """Activation checkpointing off in ``lm``'s decoder for the body; each flag restored on exit, also on error.

    For the candidate rows under checkpointing: a checkpointed layer drops the cache they must attend to. Sets
    the public ``gradient_checkpointing`` flag of each ``GradientCheckpointingLayer`` that has it on, and the
    decoder's (which would turn ``use_cache`` off).
    """
    flagged = [m for m in lm.get_decoder().modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def layer_keys_values(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a Qwen2/Qwen3 decoder layer caches for its input -> (k, v), each ``[B, nkv, T, D]``.

    As the layer computes them: ``input_layernorm``, then k_proj, Qwen3's k_norm and RoPE (``cos``/``sin``
    ``[B or 1, T, D]`` from the decoder's ``rotary_emb``) for the keys (``attention_hook.attention_keys``), and
    v_proj for the values. ``hidden``: ``[B, T, H]``, the layer's input.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)  # (B, T, H)
    values = attn.v_proj(normed).view(*normed.shape[:2], -1, attn.head_dim).transpose(1, 2)  # (B, nkv, T, D)
    return attention_keys(attn, normed, cos, sin), values


def check_cache_rebuild(lm: nn.Module) -> None:
    """Raise ``TypeError`` unless ``layer_keys_values`` computes exactly what ``lm``'s decoder layers cache."""
    kinds = {type(layer).__name__ for layer in decoder_layers(lm)
             if not isinstance(layer, (Qwen2DecoderLayer, Qwen3DecoderLayer))}
    if kinds:
        raise TypeError(
            f"TPA under activation checkpointing rebuilds the KV cache as Qwen2/Qwen3 decoder layers compute it; "
            f"{sorted(kinds)} may compute keys differently. Disable gradient checkpointing for this model"
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
    into the ground-truth keys and values exactly as in ``appended_pass``. Where HF drops the cache (activation
    checkpointing, ``cache_available``) it is rebuilt: the decoder returns each layer's input h_l
    (``hidden_states[l]``, graph through the checkpointed layers) and ``layer_keys_values`` recomputes that
    layer's keys and values from it, outside HF's checkpoints, into a ``DynamicCache`` (its ``update``).
    """
    decoder = lm.get_decoder()
    rebuild = use_cache and not cache_available(lm)
    if rebuild:
        check_cache_rebuild(lm)
    out = decoder(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache and not rebuild,
        output_hidden_states=rebuild,
    )
    if not use_cache:
        return out.last_hidden_state, None
    cache = out.cache
    if rebuild:
        cache = DynamicCache(config=decoder.config)
        cos, sin = decoder.rotary_emb(inputs_embeds, position_ids)  # (B or 1, T, D), as the layers get them
        layer_inputs = out.hidden_states[:-1]  # h_0 .. h_{L-1}; the last entry is the final (normed) output
        for layer, hidden in zip(decoder_layers(lm), layer_inputs, strict=True):
            # checkpointed like the layer: only h_l (already kept) stays, not the norm's and projections' inputs
            k, v = checkpoint(layer_keys_values, layer, hidden, cos, sin, use_reentrant=False)
            cache.update(k, v, layer.self_attn.layer_idx)
    if cache is None or cache.get_seq_length() != inputs_embeds.shape[1]:
        raise RuntimeError("the model returned no usable KV cache; use appended_pass instead")
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

    Under activation checkpointing the layers' checkpointing is off for the rows (``checkpointing_disabled``:
    a checkpointed layer would drop the cache) and the rows run instead as L checkpointed segments (L = the
    decoder's layers) of ceil(M / L) rows each, every segment replayed in the backward against a fresh cache of
    the T keys and values (``cache`` itself is left as it was). A segment being replayed holds all L layers'
    activations of its rows, so L x ceil(M / L) ~ M row-layers, about what one checkpointed layer holds for
    T + M tokens; one segment of all M rows would hold L x M (at the paper's mix M exceeds T). Exact for any
    grouping: a candidate row attends to the ground truth and itself only. L segments on every rank whatever
    its M (padding rows fill them): under ZeRO-3 all ranks must run the same modules.

    Args:
        attention_mask: ``[B, T]`` padding mask of the ground truth; ``position_ids``: its ``[B, T]`` ids.
        cand_pos, cand_ids: ``[B, M]`` rows (``CandidateRows.pos`` / ``.ids``).
    """
    B, M = cand_ids.shape
    decoder = lm.get_decoder()

    def rows(embeds: torch.Tensor, cache: object, pos: torch.Tensor) -> torch.Tensor:
        """The rows at ``pos`` ``[B, m]`` (embedded) against ``cache`` -> hidden ``[B, m, H]``."""
        mask = _ribbon_attention_mask(lm, attention_mask, pos, embeds.dtype, cached=True)  # (B, 1, m, T + m)
        with checkpointing_disabled(lm):
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=candidate_position_ids(
                position_ids, pos, 1), cache=cache, use_cache=True)
        return out.last_hidden_state

    if cache_available(lm):
        if M == 0:  # one padding row (it sees itself only), dropped below: all ZeRO-3 ranks run the same modules
            cand_pos, cand_ids = cand_pos.new_full((B, 1), -1), cand_ids.new_zeros(B, 1)
        return rows(lm.get_input_embeddings()(cand_ids), cache, cand_pos)[:, :M]
    past = [(layer.keys, layer.values) for layer in cache.layers]  # per layer 2 x (B, nkv, T, D)
    size = max(1, -(-M // len(past)))  # rows per segment
    pad = size * len(past) - M  # padding rows (position -1: they see themselves only), dropped below
    cand_pos = torch.cat([cand_pos, cand_pos.new_full((B, pad), -1)], dim=1)
    cand_ids = torch.cat([cand_ids, cand_ids.new_zeros(B, pad)], dim=1)
    embeds = lm.get_input_embeddings()(cand_ids)  # (B, L * size, H)

    def segment(embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        fresh = DynamicCache(config=decoder.config)  # the replay must see the T keys, not T + the rows'
        for idx, (k, v) in enumerate(past):
            fresh.update(k, v, idx)
        return rows(embeds, fresh, pos)

    parts = [checkpoint(segment, embeds[:, i : i + size], cand_pos[:, i : i + size], use_reentrant=False)
             for i in range(0, embeds.shape[1], size)]
    return torch.cat(parts, dim=1)[:, :M]


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
    gt_capture: AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ground_truth_pass`` with a cache, then ``candidate_pass``: same outputs as ``appended_pass``.
    `gt_capture` is entered around the ground-truth pass only (e.g. an `AttentionCapture`)."""
    with gt_capture or nullcontext():
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
    vocab_size: int | None = None  # candidates only from the shared tokenizer's ids (None: every lm_head row)

    def __post_init__(self) -> None:
        check_sampling(self.d, self.strategy, self.top_p, self.temperature)
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
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
    student_gt_capture: AbstractContextManager | None = None,
    teacher_gt_capture: AbstractContextManager | None = None,
) -> TPAForward:
    """One distillation step's forwards: student ground truth + candidates (grad), teacher (no grad).

    1 student pass (ground truth with a cache, sampling from its detached logits at the response positions,
    then the candidate rows) + 1 teacher pass (same form). Under activation checkpointing the student's cache
    is rebuilt from its layers' inputs (``ground_truth_pass``): still T + M student tokens with grad (which
    the backward replays, as checkpointing does), and no sampling pass.

    Args:
        student_embeds / teacher_embeds: ``[B, T, H]`` inputs_embeds of the same layout for each model.
        attention_mask, position_ids: ``[B, T]`` of that layout.
        response_mask: ``[B, T]`` bool, True at response tokens.
        gt_ids: ``[B, T]`` token ids, valid at response positions (the expanded labels work).
        student_gt_capture / teacher_gt_capture: entered around exactly that model's ground-truth pass (the
            candidate rows excluded), e.g. an `AttentionCapture` for IVA's alpha. Under checkpointing the layers
            run again in the backward, after the context has exited, so a capture sees them once.
    """
    cand_pos = response_positions(response_mask)  # (B, R)
    T = student_embeds.shape[1]

    def make_rows(hidden: torch.Tensor) -> CandidateRows:
        cands = sample_candidates_from_hidden(
            student, hidden, cand_pos, cfg.d, cfg.strategy, cfg.top_p, cfg.temperature, generator, cfg.chunk_size,
            cfg.vocab_size,
        )  # (B, R, d)
        if cfg.dedupe:
            return dedupe_candidates(cand_pos, cands, gt_ids)
        return candidate_rows(cand_pos, cands, T)

    if not cache_available(student):
        logger.debug("activation checkpointing drops HF's KV cache: rebuilt from the layers' inputs")
    with student_gt_capture or nullcontext():
        student_gt, cache = ground_truth_pass(student, student_embeds, attention_mask, position_ids)
    rows = make_rows(student_gt)
    student_cand = candidate_pass(student, cache, attention_mask, position_ids, rows.pos, rows.ids)
    with torch.no_grad():
        teacher_gt, teacher_cand = cached_pass(
            teacher, teacher_embeds, attention_mask, position_ids, rows.pos, rows.ids, teacher_gt_capture
        )
    return TPAForward(rows, student_gt, student_cand, teacher_gt, teacher_cand)


# ----------------------------------------------------------------------------- public reference API


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
    images the model's multimodal layout (``aligntI_patch.layout``) is mapped back through ``source_index``.
    """
    B, T, d = candidates.shape
    layout = batch_layout(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    embeds, source_index = embed(model, layout, images), layout.source_index
    src = source_index.clamp_min(0)  # (B, T')
    resp = response_mask.bool().gather(1, src) & (source_index >= 0)  # (B, T') response in expanded space
    cand_exp = candidates.gather(1, src[..., None].expand(-1, -1, d))  # (B, T', d)
    cand_pos = response_positions(resp)  # (B, R) expanded positions
    rows = candidate_rows(cand_pos, gather_positions(cand_exp, cand_pos), embeds.shape[1])
    attn, pos_ids = layout.attention_mask, layout.position_ids
    _, hidden = appended_pass(model, embeds, attn, pos_ids, rows.pos, rows.ids)  # (B, R*d, H)
    logits = model.get_output_embeddings()(hidden)  # (B, R*d, V)

    valid = rows.pos >= 0  # (B, R*d)
    orig = source_index.gather(1, rows.pos.clamp_min(0))  # (B, R*d) back to input_ids space
    u = torch.arange(d, device=logits.device).repeat(cand_pos.shape[1]).expand_as(valid)  # (B, R*d)
    b_idx = torch.arange(B, device=logits.device)[:, None].expand_as(valid)
    out = logits.new_zeros(B, T, d, logits.shape[-1])
    out[b_idx[valid], orig[valid], u[valid]] = logits[valid]
    return out
