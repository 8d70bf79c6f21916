"""Instruction-aware Vision Alignment (IVA, paper section 3.1): the importance weights alpha of Eq. 3.

    L_iva = sum_k alpha_k * D_KL(P_T || P_S)(v_k | v_<k),   alpha_k = (1/N_i) sum_u A_{i->v}(u, k)

Design choices:
- alpha is read from one layer's attention (chosen by IRS, Eq. 4, see `irs.py`), averaged over heads
  and over the N_i instruction queries (TokenType.INSTRUCTION); its columns are the N_v visual keys
  (TokenType.VISUAL) in sequence order. Raw alpha (the paper's) is a slice of softmax rows, so it is
  non-negative and sums to the share of instruction attention that lands on the image (<= 1).
- `normalize=True` rescales alpha to mean 1 over the visual tokens (alpha / sum(alpha) * N_v): the
  attention sink and text tokens no longer shrink the loss, a uniform alpha gives weight 1 everywhere,
  and a weighted sum divided by the visual-token count sits on the same scale as a per-token KD mean.
- Uniform weights (LLaVA-KD's alignment, Tab. 9) are the flat alpha on each scale: 1/N_v per visual
  token for raw alpha (the sum over visual tokens is 1, the most raw alpha can reach), 1 for normalized.
- Which output carries v_k: the divergence at the visual position k itself (its next-token
  distribution, computed from the hidden state whose key alpha_k scores), as the released code does.
  The alternative (position k-1, "predicting v_k") would align a template token's output for v_1 and
  none for v_N_v, and visual tokens are embeddings, not vocabulary entries to predict.
- Samples with no image or no instruction tokens get alpha = 0, hence no IVA loss (Eq. 3 needs both).
- This module only produces weights; the weighted divergence is `chunked_losses.chunked_divergence`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from aligntI_patch.attention_hook import capture_attention, decoder_layers
from aligntI_patch.layout import batch_layout, embed
from llava.constants import TokenType

__all__ = [
    "IVA_SOURCES",
    "LLMInputs",
    "importance_from_attention",
    "importance_per_layer",
    "instruction_vision_importance",
    "iva_weights",
    "llm_inputs",
    "normalize_alpha",
    "source_model",
    "visual_index",
]

IvaSource = Literal["teacher", "student", "uniform"]
IVA_SOURCES: tuple[str, ...] = ("teacher", "student", "uniform")


class LLMInputs(NamedTuple):
    """What the decoder stack sees: everything in the expanded (visual tokens spliced in) layout."""

    inputs_embeds: torch.Tensor  # (B, T', H)
    attention_mask: torch.Tensor  # (B, T')
    position_ids: torch.Tensor  # (B, T')
    token_types: torch.Tensor  # (B, T')


def visual_index(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices of the visual positions, (B, N_v), and which samples have an image, (B,).

    `is_visual` is (B, T') bool (token_types == VISUAL). Every sample holds either 0 or exactly N_v
    visual positions (one image of N_v patches, or none); rows of samples without an image are index 0
    and must be ignored through the second output.
    """
    is_visual = is_visual.bool()
    counts = is_visual.sum(dim=1)  # (B,)
    n_v = int(counts.max().item()) if counts.numel() else 0
    if bool(((counts != 0) & (counts != n_v)).any()):
        raise ValueError(
            f"samples hold different numbers of visual positions {counts.tolist()}: expected 0 or N_v"
        )
    order = torch.sort((~is_visual).to(torch.int8), dim=1, stable=True).indices[:, :n_v]  # (B, N_v)
    has_image = counts > 0
    return torch.where(has_image[:, None], order, torch.zeros_like(order)), has_image


def normalize_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """alpha / sum(alpha) * N_v per row (mean 1 over the visual tokens); all-zero rows stay zero."""
    total = alpha.sum(dim=1, keepdim=True)  # (B, 1)
    scaled = alpha / total.clamp(min=torch.finfo(alpha.dtype).tiny) * alpha.shape[1]
    return torch.where(total > 0, scaled, torch.zeros_like(alpha))


def importance_from_attention(
    attn_rows: torch.Tensor,
    query_valid: torch.Tensor,
    key_mask_visual: torch.Tensor,
    normalize: bool = False,
) -> torch.Tensor:
    """alpha of Eq. 3: mean over heads and instruction queries of the attention to each visual key.

    Args:
        attn_rows: (B, heads, Q, T) or head-averaged (B, Q, T) softmax rows of the instruction queries
            (as captured by `capture_attention` with the instruction positions as query_mask).
        query_valid: (B, Q) bool, real query slots; N_i = query_valid[b].sum().
        key_mask_visual: (B, T) bool, the visual positions (0 or N_v per sample).
        normalize: rescale each row to mean 1 (alpha / sum(alpha) * N_v); see the module docstring.

    Returns: alpha (B, N_v) float32, visual keys in sequence order; zero rows for samples with no image
    or no instruction token.
    """
    rows = attn_rows.float()
    if rows.dim() == 4:
        rows = rows.mean(dim=1)  # (B, Q, T): mean over heads
    valid = query_valid.to(rows.device, rows.dtype)  # (B, Q)
    n_i = valid.sum(dim=1, keepdim=True)  # (B, 1)
    per_key = (rows * valid[:, :, None]).sum(dim=1) / n_i.clamp(min=1)  # (B, T): (1/N_i) sum_u A(u, k)
    index, has_image = visual_index(key_mask_visual.to(per_key.device))
    alpha = torch.gather(per_key, 1, index) * has_image[:, None]  # (B, N_v)
    return normalize_alpha(alpha) if normalize else alpha


def llm_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> LLMInputs:
    """Map a collator batch to the decoder's inputs in the expanded layout (`aligntI_patch.layout`); a plain
    transformers model gets its input_ids embedded, with token_types taken from the batch as they are (tests
    mark VISUAL positions directly)."""
    layout = batch_layout(model, batch)
    embeds = embed(model, layout, batch.get("images"))
    return LLMInputs(embeds, layout.attention_mask, layout.position_ids, layout.token_types)


@torch.no_grad()
def importance_per_layer(
    model: nn.Module, batch: Mapping[str, torch.Tensor], layers: Sequence[int], normalize: bool = False
) -> dict[int, torch.Tensor]:
    """alpha (B, N_v) at each of `layers` from one forward of `model` on a collator batch (Eq. 3)."""
    inputs = llm_inputs(model, batch)
    instruction = (inputs.token_types == TokenType.INSTRUCTION) & inputs.attention_mask.bool()  # (B, T')
    visual = inputs.token_types == TokenType.VISUAL  # (B, T')
    with capture_attention(model, list(layers), instruction, average_heads=True) as cap:
        model.get_decoder()(  # no lm_head: capturing attention never needs the [B, T, V] logits
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        )
    valid = cap.query_valid.to(visual.device)
    n = len(decoder_layers(model))
    rows = {idx: cap.rows[idx % n] for idx in layers}  # layer -> (B, Q_max, T')
    return {
        idx: importance_from_attention(r, valid, visual.to(r.device), normalize) for idx, r in rows.items()
    }


def instruction_vision_importance(
    model: nn.Module, batch: Mapping[str, torch.Tensor], layer: int, normalize: bool = False
) -> torch.Tensor:
    """alpha of Eq. 3, (B, N_v): mean over heads and instruction tokens of layer `layer`'s attention
    to each visual token, for a batch from our collator (no grad; raw alpha unless `normalize`)."""
    return importance_per_layer(model, batch, [layer], normalize)[layer]


def source_model(source: IvaSource, teacher: nn.Module, student: nn.Module) -> nn.Module | None:
    """The model whose attention gives alpha (Tab. 8: teacher or student), None for uniform (Tab. 9)."""
    if source not in IVA_SOURCES:
        raise ValueError(f"iva source must be one of {IVA_SOURCES}, got {source!r}")
    return {"teacher": teacher, "student": student, "uniform": None}[source]


def iva_weights(
    alpha: torch.Tensor | None,
    token_types: torch.Tensor,
    source: IvaSource = "teacher",
    normalize: bool = False,
) -> torch.Tensor:
    """Per-position IVA weights (B, T') for Eq. 3: alpha_k at the k-th visual position, 0 elsewhere.

    Args:
        alpha: (B, N_v) raw alpha from `instruction_vision_importance` on the `source` model (teacher or
            student); ignored (may be None) for "uniform".
        token_types: (B, T') in the expanded layout.
        source: "teacher" | "student" | "uniform" (LLaVA-KD's flat alignment).
        normalize: alpha rescaled to mean 1 per sample (`normalize_alpha`), uniform = 1 per visual token;
            otherwise raw alpha (Eq. 3 as written), uniform = 1/N_v per visual token.

    The IVA loss is then sum_j weights[b, j] * D(P_T || P_S) at position j's output, the output of the
    visual position itself (module docstring). Weights are detached.
    """
    index, has_image = visual_index(token_types == TokenType.VISUAL)  # (B, N_v), (B,)
    n_v = index.shape[1]
    if source == "uniform":
        fill = 1.0 if normalize else 1.0 / max(n_v, 1)
        values = torch.full(index.shape, fill, device=token_types.device)
    elif source in ("teacher", "student"):
        if alpha is None:
            raise ValueError(f"iva source {source!r} needs alpha from the {source} model")
        if alpha.shape != index.shape:
            raise ValueError(
                f"alpha {tuple(alpha.shape)} does not match the {n_v} visual positions per sample"
            )
        values = alpha.detach().float().to(token_types.device)
        values = normalize_alpha(values) if normalize else values
    else:
        raise ValueError(f"iva source must be one of {IVA_SOURCES}, got {source!r}")
    values = values * has_image[:, None]  # (B, N_v): no image, no weight
    weights = torch.zeros(token_types.shape, dtype=values.dtype, device=token_types.device)  # (B, T')
    return weights.scatter_(1, index, values) if n_v else weights
