"""Vision tower builder: SigLIP from transformers by default, open_clip as an optional extra.

`mm_vision_tower` names starting with `open_clip:` or `hf-hub:` are open_clip towers (`open_clip_encoder.py`);
anything else is a SigLIP checkpoint: a local directory or a hub id (`google/siglip-so400m-patch14-384`,
`org/name@revision`) resolved through the Hugging Face cache (`llava/hub.py`).
"""

from __future__ import annotations

import os

from transformers import AutoConfig, SiglipVisionConfig

from llava.hub import ModelNotFoundError, resolve_file

from .base import TOWER_ARG
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
    if not path:
        raise ValueError("No vision tower: the config names no `mm_vision_tower` (pass --vision_tower)")
    try:  # the config alone: a tower whose weights come from the checkpoint needs no download of its own
        config_file = resolve_file(path, "config.json", TOWER_ARG)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"{err} (the tower's config.json is read from there: the model's config embeds no "
                                 "`mm_vision_config`)") from err
    loaded = AutoConfig.from_pretrained(os.path.dirname(config_file))
    return getattr(loaded, "vision_config", loaded)


def build_vision_tower(config) -> SiglipVisionTower | OpenCLIPVisionTower:
    vision_config = resolve_vision_config(config)
    tower_class = OpenCLIPVisionTower if isinstance(vision_config, OpenCLIPVisionConfig) else SiglipVisionTower
    return tower_class(
        vision_config,
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
    )
