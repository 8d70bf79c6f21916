"""What every vision tower shares: LLaVA's feature selection arguments, the frozen module's dtype/device, and
the PIL image processor class."""

from __future__ import annotations

import torch
from torch import nn

# How errors name a tower: `--vision_tower` when training, the checkpoint's `mm_vision_tower` when loading.
TOWER_ARG = "vision tower (--vision_tower / mm_vision_tower)"


class VisionTowerBase(nn.Module):
    """Subclasses set `self.vision_tower` (the frozen encoder) and define `config`, `num_patches`, `forward`."""

    def __init__(self, select_layer: int, select_feature: str):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device


def pil_image_processor_class() -> type:
    """transformers' PIL SigLIP image processor (the torchvision-backed one is avoided: see DESIGN.md traps)."""
    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor as Processor
    return Processor
