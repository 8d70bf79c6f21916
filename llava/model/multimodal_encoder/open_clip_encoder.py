"""open_clip vision towers (optional extra `openclip`, open_clip_torch >= 3.0), interchangeable with SigLIP's.

`mm_vision_tower` names:
- `open_clip:<dir>`: a directory in open_clip's hub layout (`open_clip_config.json` + weights, e.g. a copy of
  `timm/ViT-B-16-SigLIP`), built with `open_clip.create_model("local-dir:<dir>")`;
- `open_clip:<model name>:<weights file>`: a built-in architecture and a local checkpoint,
  `open_clip.create_model(name, pretrained=<file>)`. open_clip then uses its default preprocessing (OpenAI
  mean/std, shortest-edge resize), not the one of the tag the weights came from: prefer the directory form;
- `hf-hub:<org>/<repo>`: resolved like every hub id (`llava/hub.py`: the Hugging Face cache, downloaded when
  online and not cached, the cache only with `HF_HUB_OFFLINE=1`), then read as a directory.

Design choices:
- Features are `model.visual.forward_intermediates(x, indices=[block], intermediates_only=True,
  output_fmt="NLC")`, implemented by both ViT visual classes of open_clip (>= 2.32): `VisionTransformer`
  (src/open_clip/transformer.py: a class token, `transformer.resblocks`) and `TimmModel`
  (src/open_clip/timm_model.py: `trunk`, a timm ViT with `blocks` and `num_prefix_tokens`; the SigLIP models).
  It returns a block's raw output (no final norm) with the prefix tokens split off. `mm_vision_select_layer`
  keeps LLaVA's hidden-state indexing (k > 0: output of block k; -1: last block; -2: penultimate; 0, the
  embeddings, is not available); `mm_vision_select_feature` `patch` keeps the patch tokens only, `cls_patch`
  puts the prefix (class) tokens first.
- Only `model.visual` is kept, as `vision_tower`, so its weights live at `model.vision_tower.vision_tower.*`
  like the SigLIP tower's (`checkpoint.py` needs no rule for it).
- The config is open_clip's own `open_clip_config.json` content (`model_cfg`, `preprocess_cfg`) plus the sizes
  LLaVA reads. It is embedded in our checkpoints (`mm_vision_config`): the architecture is rebuilt from it
  through a temporary `local-dir:`, without the original files; weights then come from the checkpoint.
- Images: open_clip's transforms need torchvision (a trap here, DESIGN.md), so `load_image_processor` sets
  transformers' PIL processor from `preprocess_cfg`: `squash` resizes to the size; `shortest` resizes the
  short edge and center-crops; mean, std and interpolation as configured. transformers floors the crop offset
  where torchvision rounds it (half to even), so an odd overhang can shift the crop by one pixel; LLaVA's
  default `image_aspect_ratio=pad` squares images first, which leaves nothing to crop.
- The tower stays in eval mode: it is a frozen feature extractor, and patch dropout would change N_v.
- Towers with a text tower from transformers (`hf_model_name`) need that model's config in the local HF cache:
  open_clip reads it to build the text tower, which is then dropped.

Tested with a stand-in `open_clip` module that has the attribute structure of the real classes
(tests/test_open_clip_tower.py); the real package is exercised only on machines that can install it (here
its torchvision dependency breaks imports).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .base import VisionTowerBase, pil_image_processor_class

OPEN_CLIP_PREFIX = "open_clip:"
HF_HUB_PREFIX = "hf-hub:"


def is_open_clip_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith((OPEN_CLIP_PREFIX, HF_HUB_PREFIX))


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("open_clip towers need the optional extra: pip install 'align-ti[openclip]'") from err
    return open_clip


@dataclass(frozen=True)
class OpenCLIPVisionConfig:
    """What LLaVA reads of an open_clip tower; `open_clip_config` is an `open_clip_config.json`'s content."""

    open_clip_config: dict
    hidden_size: int
    image_size: int
    patch_size: int
    num_hidden_layers: int
    num_prefix_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_open_clip_name(name: str) -> tuple[str, str | None]:
    """`mm_vision_tower` -> (open_clip model name, local weights file; None when the name holds them)."""
    if name.startswith(HF_HUB_PREFIX):
        return f"local-dir:{_hf_hub_snapshot(name)}", None
    identifier = name.removeprefix(OPEN_CLIP_PREFIX)
    if os.path.isdir(identifier):
        return f"local-dir:{identifier}", None
    model_name, _, weights = identifier.partition(":")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"open_clip tower {name!r}: expected 'open_clip:<local dir>' (open_clip_config.json + weights) or "
            f"'open_clip:<model name>:<local weights file>'; {weights or identifier!r} is neither. Pretrained tags "
            "download weights, which is not possible here: download them elsewhere and give their local path."
        )
    return model_name, weights


def _hf_hub_snapshot(name: str) -> str:
    """`hf-hub:<org>/<repo>` -> its snapshot directory, with open_clip_config.json and the weights."""
    from llava.hub import ModelNotFoundError, parse_hub_id, resolve_dir

    repo_id = name.removeprefix(HF_HUB_PREFIX)
    if parse_hub_id(repo_id) is None:
        raise ValueError(f"open_clip tower {name!r}: expected 'hf-hub:<org>/<repo>'")
    arg = f"open_clip tower {name!r}"
    try:  # open_clip reads open_clip_model.safetensors before open_clip_pytorch_model.bin: the .bin only if needed
        snapshot = resolve_dir(repo_id, arg, allow_patterns=["open_clip_config.json", "open_clip_*.safetensors"])
        if not any(f.startswith("open_clip_") and f.endswith(".safetensors") for f in os.listdir(snapshot)):
            snapshot = resolve_dir(repo_id, arg, allow_patterns=["open_clip_config.json", "open_clip_*.bin"])
        return snapshot
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"{err}; or set the vision tower to 'open_clip:<local dir>' holding "
                                 "open_clip_config.json and weights") from err


def _create_model(model_name: str, weights: str | None, load_weights: bool) -> nn.Module:
    open_clip = import_open_clip()
    return open_clip.create_model(
        model_name,
        pretrained=weights if load_weights else None,
        load_weights=load_weights,
        require_pretrained=load_weights,  # a directory without weights would otherwise give a random tower
        pretrained_text=False,  # only `visual` is kept: never fetch text-tower weights
        device=torch.get_default_device(),  # "meta" inside transformers' from_pretrained: no copy out of meta
    )


@functools.lru_cache(maxsize=8)
def describe_open_clip_tower(name: str) -> OpenCLIPVisionConfig:
    """The config of tower `name`, read from an unweighted build (cached: one build of a large tower takes seconds)."""
    open_clip = import_open_clip()
    model_name, weights = resolve_open_clip_name(name)
    model = _create_model(model_name, weights, load_weights=False)
    visual = model.visual
    if hasattr(visual, "trunk"):  # TimmModel
        trunk = visual.trunk
        if not hasattr(trunk, "blocks"):
            raise ValueError(f"open_clip tower {name!r}: timm trunk {type(trunk).__name__} is not a ViT")
        hidden, layers, prefix = trunk.embed_dim, len(trunk.blocks), trunk.num_prefix_tokens
        patch = trunk.patch_embed.patch_size
    elif hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):  # VisionTransformer
        hidden, layers, prefix = visual.transformer.width, len(visual.transformer.resblocks), 1
        patch = visual.patch_size
    else:
        raise ValueError(f"open_clip tower {name!r}: {type(visual).__name__} is not a ViT (no patch tokens)")
    (height, width), (patch_h, patch_w) = _pair(visual.image_size), _pair(patch)
    if height != width or patch_h != patch_w:
        raise ValueError(f"open_clip tower {name!r}: only square images and patches, got {visual.image_size}, {patch}")
    return OpenCLIPVisionConfig(
        open_clip_config={
            "model_cfg": open_clip.get_model_config(model_name),
            "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(model)),
        },
        hidden_size=hidden,
        image_size=height,
        patch_size=patch_h,
        num_hidden_layers=layers,
        num_prefix_tokens=prefix,
    )


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _build_visual(open_clip_config: dict) -> nn.Module:
    """An unweighted `model.visual` from an `open_clip_config.json` content, through open_clip's `local-dir:`."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump(open_clip_config, f)
        return _create_model(f"local-dir:{tmp}", None, load_weights=False).visual


class OpenCLIPVisionTower(VisionTowerBase):
    """An open_clip ViT's `visual`, with `SiglipVisionTower`'s interface (see the module docstring)."""

    def __init__(self, vision_config: OpenCLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__(select_layer, select_feature)
        layers = vision_config.num_hidden_layers
        if not (1 <= select_layer <= layers or -layers <= select_layer <= -1):
            raise ValueError(
                f"mm_vision_select_layer {select_layer} is out of range for an open_clip tower with {layers} blocks "
                f"(1..{layers} or -{layers}..-1; 0, the embeddings, is not available)"
            )
        self.vision_config = vision_config
        # LLaVA indexes hidden states (index 0 = embeddings); forward_intermediates indexes blocks.
        self.block_index = select_layer - 1 if select_layer > 0 else select_layer
        self.keep_prefix = select_feature == "cls_patch" and vision_config.num_prefix_tokens > 0
        self.vision_tower = _build_visual(vision_config.open_clip_config)
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()

    @property
    def config(self) -> OpenCLIPVisionConfig:
        return self.vision_config

    @property
    def num_patches(self) -> int:
        prefix = self.config.num_prefix_tokens if self.keep_prefix else 0
        return (self.config.image_size // self.config.patch_size) ** 2 + prefix

    def train(self, mode: bool = True) -> OpenCLIPVisionTower:
        # Always eval: open_clip's patch dropout would drop tokens (N_v varies), drop path would add noise.
        return super().train(False)

    def load_pretrained(self, name: str) -> None:
        """Load the visual weights of open_clip tower `name` (see the module docstring for the forms)."""
        model_name, weights = resolve_open_clip_name(name)
        loaded = _create_model(model_name, weights, load_weights=True).visual
        self.vision_tower.load_state_dict(loaded.state_dict(), strict=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] -> features [n, N_v, mm_hidden_size]."""
        out = self.vision_tower.forward_intermediates(
            images.to(self.dtype),
            indices=[self.block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.keep_prefix,
        )
        features = out["image_intermediates"][0]  # [n, grid * grid, hidden]
        if self.keep_prefix:
            features = torch.cat([out["image_intermediates_prefix"][0], features], dim=1)
        return features


def load_image_processor(name_or_config: str | OpenCLIPVisionConfig):
    """transformers' PIL image processor doing open_clip's eval preprocessing (see the module docstring)."""
    from transformers.image_utils import PILImageResampling

    config = describe_open_clip_tower(name_or_config) if isinstance(name_or_config, str) else name_or_config
    cfg = config.open_clip_config["preprocess_cfg"]
    height, width = _pair(cfg["size"])
    if cfg["resize_mode"] == "squash":
        resize = {"size": {"height": height, "width": width}, "do_center_crop": False}
    elif cfg["resize_mode"] == "shortest" and height == width:
        resize = {"size": {"shortest_edge": height}, "do_center_crop": True,
                  "crop_size": {"height": height, "width": width}}
    else:
        raise ValueError(
            f"open_clip resize_mode {cfg['resize_mode']!r} at size {cfg['size']} has no PIL processor here "
            "(supported: 'squash', and 'shortest' with a square size)"
        )
    # open_clip's eval transform reads interpolation 'random' as bicubic
    resample = PILImageResampling.BILINEAR if cfg["interpolation"] == "bilinear" else PILImageResampling.BICUBIC
    return pil_image_processor_class()(
        **resize, resample=resample, image_mean=list(cfg["mean"]), image_std=list(cfg["std"])
    )
