"""Vision tower builder: SigLIP from transformers by default, open_clip as an optional extra."""

from __future__ import annotations

import os

from transformers import AutoConfig, SiglipVisionConfig

from .siglip_encoder import SiglipVisionTower


def resolve_vision_config(config) -> SiglipVisionConfig:
    """The SigLIP config: embedded in our checkpoints (`mm_vision_config`), else read from `mm_vision_tower`."""
    if getattr(config, "mm_vision_config", None):
        return SiglipVisionConfig(**config.mm_vision_config)
    path = config.mm_vision_tower
    if path and os.path.isdir(path):
        loaded = AutoConfig.from_pretrained(path)
        return getattr(loaded, "vision_config", loaded)
    raise FileNotFoundError(
        f"Vision tower {path!r} is not a local directory and the checkpoint embeds no `mm_vision_config`. "
        "Download the SigLIP checkpoint and set `mm_vision_tower` in config.json (or --vision_tower) to its path."
    )


def build_vision_tower(config) -> SiglipVisionTower:
    name = config.mm_vision_tower or ""
    if name.startswith(("open_clip:", "hf-hub:")):
        try:
            import open_clip  # noqa: F401
        except ImportError as err:
            raise ImportError("open_clip towers need the optional extra: pip install 'align-ti[openclip]'") from err
        raise NotImplementedError("open_clip towers are not wired in this release; use a SigLIP checkpoint")
    return SiglipVisionTower(
        resolve_vision_config(config),
        select_layer=config.mm_vision_select_layer,
        select_feature=config.mm_vision_select_feature,
    )
