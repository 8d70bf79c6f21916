"""Align-TI's visual-focus plugin for the demo (`llava.serve.focus`, entry point `llava.visual_focus`): Eq. 3's
alpha of the last question at the IVA layer, the paper's Fig. 8.

- alpha: `aligntI_patch.iva.instruction_vision_importance` (mean over heads and instruction tokens).
- Layer: an int fixes it; "auto" reads `best_layer` from irs.json beside the checkpoint (the IRS argmax,
  Eq. 4) when it is there and valid for this model, else takes the layer at about 3/4 depth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from aligntI_patch.attention_hook import decoder_layers
from aligntI_patch.irs import select_iva_layer
from aligntI_patch.iva import instruction_vision_importance

logger = logging.getLogger(__name__)


def default_focus_layer(num_layers: int) -> int:
    """The layer at about 3/4 depth (where the paper's IRS curves peak for 7B-class teachers, Fig. 4)."""
    if num_layers < 1:
        raise ValueError(f"a model needs at least one decoder layer, got {num_layers}")
    return min(num_layers - 1, (3 * num_layers) // 4)


def resolve_focus_layer(spec: str | int, model: nn.Module, checkpoint_dir: str | Path | None = None) -> int:
    """`spec` as an int (or digit string), or "auto": irs.json's `best_layer` beside the checkpoint when it
    is valid for this model, else `default_focus_layer`."""
    if spec != "auto":
        return select_iva_layer(spec, model)
    num_layers = len(decoder_layers(model))
    irs_path = Path(checkpoint_dir) / "irs.json" if checkpoint_dir is not None else None
    if irs_path is not None and irs_path.is_file():
        saved = json.loads(irs_path.read_text())
        best = int(saved["best_layer"])
        deepest = max(saved.get("layers", [best]))  # a deeper teacher's best layer can fall in range by chance
        if 0 <= best < num_layers and deepest < num_layers:
            logger.info("focus layer %d: IRS argmax read from %s", best, irs_path)
            return best
        logger.warning("%s scores layers up to %d (best %d), not those of this %d-layer model", irs_path, deepest,
                       best, num_layers)
    layer = default_focus_layer(num_layers)
    logger.info("focus layer %d: about 3/4 of %d layers (no usable irs.json)", layer, num_layers)
    return layer


class IVAFocus:
    """`llava.serve.focus.FocusReader` with IVA's alpha and the IRS layer."""

    resolve_layer = staticmethod(resolve_focus_layer)

    @staticmethod
    @torch.no_grad()
    def alpha(model: nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        return instruction_vision_importance(model, batch, layer)


FOCUS = IVAFocus()
