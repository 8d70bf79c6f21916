"""SigLIP vision tower from transformers (`SiglipVisionModel`), LLaVA's `vision_tower` wrapper around it.

SigLIP has no CLS token: every patch token is a visual token (N_v = (image_size / patch_size)^2).
`mm_vision_select_layer` picks the hidden state (-2 = penultimate, LLaVA's default) and
`mm_vision_select_feature` is `patch` (all patches; `cls_patch` is accepted as a synonym for SigLIP).
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel

from llava.hub import resolve_dir, resolve_file

from .base import TOWER_ARG, VisionTowerBase, pil_image_processor_class
from .open_clip_encoder import OpenCLIPVisionConfig, is_open_clip_name
from .open_clip_encoder import load_image_processor as load_open_clip_image_processor


def load_image_processor(path_or_config: str | SiglipVisionConfig | OpenCLIPVisionConfig | dict):
    """The tower's PIL image processor: SigLIP's, or built from an open_clip tower's preprocess config.

    A name (local directory or hub id) gives its preprocessor_config.json, else SigLIP's defaults at the size of
    its config.json."""
    if isinstance(path_or_config, OpenCLIPVisionConfig) or is_open_clip_name(path_or_config):
        return load_open_clip_image_processor(path_or_config)
    Processor = pil_image_processor_class()
    if isinstance(path_or_config, str):
        preprocessor = resolve_file(path_or_config, "preprocessor_config.json", TOWER_ARG, required=False)
        if preprocessor:
            return Processor.from_pretrained(os.path.dirname(preprocessor))
        # a SigLIP checkpoint without preprocessor_config.json
        loaded = AutoConfig.from_pretrained(os.path.dirname(resolve_file(path_or_config, "config.json", TOWER_ARG)))
        cfg = getattr(loaded, "vision_config", loaded)
    elif isinstance(path_or_config, dict):
        cfg = SiglipVisionConfig(**path_or_config)
    else:
        cfg = path_or_config
    size = cfg.image_size
    return Processor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


class SiglipVisionTower(VisionTowerBase):
    """Wraps `SiglipVisionModel` so its weights live at `vision_tower.vision_model.*` (LLaVA's layout)."""

    def __init__(self, vision_config: SiglipVisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__(select_layer, select_feature)
        self.vision_tower = SiglipVisionModel(vision_config)
        self.vision_tower.requires_grad_(False)

    @property
    def config(self) -> SiglipVisionConfig:
        return self.vision_tower.config

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def load_pretrained(self, path: str) -> None:
        """Load SigLIP weights from a SigLIP (or full SigLIP) checkpoint: a local directory or a hub id."""
        local = resolve_dir(path, TOWER_ARG, allow_patterns=["*.json", "*.safetensors"])  # no tokenizer, no .bin
        loaded = SiglipVisionModel.from_pretrained(local, dtype=self.dtype)
        missing, unexpected = self.vision_tower.load_state_dict(loaded.state_dict(), strict=False)
        if missing:
            raise ValueError(f"Vision tower at {path} lacks weights: {missing[:5]}")

    def _selected_module(self) -> torch.nn.Module:
        """The module whose output is hidden state `select_layer` (0: the embeddings, i: encoder layer i - 1)."""
        # transformers 5.24 flattened `vision_model` into SiglipVisionModel; earlier 5.x releases nest it.
        model = getattr(self.vision_tower, "vision_model", self.vision_tower)
        n = len(model.encoder.layers)
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"mm_vision_select_layer={self.select_layer} is out of range for a SigLIP tower with "
                             f"{n} layers (hidden states {-(n + 1)}..{n})")
        index = self.select_layer % (n + 1)
        return model.embeddings if index == 0 else model.encoder.layers[index - 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] -> features [n, N_v, mm_hidden_size]: hidden state `select_layer`, as in LLaVA."""
        # A hook on the selected module rather than `output_hidden_states=True`: transformers 5 installs its
        # hidden-state recorders lazily, and once the LLM around this tower is asked for hidden states or attentions
        # it installs them on this tower a second time; every layer is then recorded twice and index -2 silently
        # becomes the last layer.
        captured: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._selected_module().register_forward_hook(keep)
        try:
            self.vision_tower(images.to(self.dtype))
        finally:
            handle.remove()
        return captured[0]
