"""One batch, one layout: the expanded sequence every model of a distillation step reads.

The layout (positions, position ids, token types, labels, `source_index`; `llava_arch.build_layout`) depends on
the batch and N_v only, so a step builds it once and each model places its own embeddings into it: a LLaVA
model its text embeddings and projected visual features (`embed_layout`), a plain transformers LM (the tests'
text-only models) its text embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llava.model.llava_arch import SequenceLayout, build_layout


def batch_layout(model: nn.Module, batch: Mapping[str, torch.Tensor | None]) -> SequenceLayout:
    """The expanded layout of a collator batch (`input_ids`, `attention_mask`, optional `labels`, `token_types`)
    for `model`'s N_v; a plain LM takes batches without image tokens only."""
    args = (batch["input_ids"], batch.get("attention_mask"), batch.get("labels"), batch.get("token_types"))
    if hasattr(model, "build_layout"):
        return model.build_layout(*args)
    return build_layout(*args)


def embed(
    model: nn.Module, layout: SequenceLayout, images: torch.Tensor | None = None, vision_in_step: bool = False
) -> torch.Tensor:
    """`model`'s inputs_embeds [B, T', H] for `layout`: its own visual features at the visual positions."""
    if hasattr(model, "embed_layout"):
        return model.embed_layout(layout, images, vision_in_step)
    if images is not None:
        raise TypeError(f"{type(model).__name__} has no embed_layout: it cannot take images")
    return model.get_input_embeddings()(layout.ids)
