"""Vision tower builder: SigLIP from transformers by default, open_clip as an optional extra.

`mm_vision_tower` names starting with `open_clip:` or `hf-hub:` are open_clip towers (`open_clip_encoder.py`);
anything else is a local SigLIP checkpoint directory.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, SiglipVisionConfig

from .open_clip_encoder import (
    OpenCLIPVisionConfig,
    OpenCLIPVisionTower,
    describe_open_clip_tower,
    is_open_clip_name,
)
from .siglip_encoder import SiglipVisionTower


def resolve_vision_config(config) -> SiglipVisionConfig | OpenCLIPVisionConfig:
    """The tower's config: embedded in our checkpoints (`mm_vision_config`), else read from `mm_vision_tower`."""
    path = config.mm_vision_tower
    embedded = getattr(config, "mm_vision_config", None)
    if is_open_clip_name(path):
        return OpenCLIPVisionConfig(**embedded) if embedded else describe_open_clip_tower(path)
    if embedded:
        return SiglipVisionConfig(**embedded)
    if path and os.path.isdir(path):
        loaded = AutoConfig.from_pretrained(path)
        return getattr(loaded, "vision_config", loaded)
    raise FileNotFoundError(
        f"Vision tower {path!r} is not a local directory and the checkpoint embeds no `mm_vision_config`. "
        "Download the SigLIP checkpoint and set `mm_vision_tower` in config.json (or --vision_tower) to its path."
    )


def build_vision_tower(config) -> SiglipVisionTower | OpenCLIPVisionTower:
    vision_config = resolve_vision_config(config)
    tower_class = OpenCLIPVisionTower if isinstance(vision_config, OpenCLIPVisionConfig) else SiglipVisionTower
    return tower_class(
        vision_config,
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
    )
