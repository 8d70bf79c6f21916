"""The demo's "visual focus": where the last question looks in the image (Eq. 3's alpha, the paper's Fig. 8).

    alpha_k = (1/N_i) sum_u A_{i->v}(u, k)    (mean over heads and the question's instruction tokens)

Design choices
- alpha comes from `aligntI_patch.iva.instruction_vision_importance` on a batch built exactly as the chat
  prompt is (`tokenize_conversation`), so the demo shows the quantity IVA weights with, at the layer IVA uses.
- Only the LAST question counts: in a multi-turn chat every user turn is INSTRUCTION, so the turns before
  it are re-typed TEMPLATE (tokenization is segment-wise, so the earlier turns are an exact token prefix).
  Earlier turns and replies still sit in the context, as when the model answers.
- Layer: an int fixes it; "auto" reads `best_layer` from irs.json beside the checkpoint (the IRS argmax,
  Eq. 4) when it is there and valid for this model, else takes the layer at about 3/4 depth.
- The map is drawn on the image as the model sees it: padded to a square for `image_aspect_ratio=pad`,
  stretched to a square otherwise (then the map is stretched back onto the original image). alpha is
  reshaped to the sqrt(N_v) x sqrt(N_v) patch grid, min-max scaled, upsampled bilinearly, coloured with a
  matplotlib colormap and alpha-blended over the image. PIL, numpy and matplotlib only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from aligntI_patch.attention_hook import decoder_layers
from aligntI_patch.irs import select_iva_layer
from aligntI_patch.iva import instruction_vision_importance
from llava.constants import TokenType
from llava.conversation import Conversation, tokenize_conversation
from llava.mm_utils import expand2square

__all__ = [
    "default_focus_layer",
    "display_size",
    "focus_alpha",
    "focus_heatmap",
    "last_question_types",
    "resolve_focus_layer",
]

logger = logging.getLogger(__name__)

MIN_DISPLAY_SIDE = 256  # tiny-world images are 32-64 px: upscale so the patch grid is visible
MAX_DISPLAY_SIDE = 512


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
        best = int(json.loads(irs_path.read_text())["best_layer"])
        if 0 <= best < num_layers:
            logger.info("focus layer %d: IRS argmax read from %s", best, irs_path)
            return best
        logger.warning("%s: best_layer %d is not a layer of this %d-layer model", irs_path, best, num_layers)
    layer = default_focus_layer(num_layers)
    logger.info("focus layer %d: about 3/4 of %d layers (no usable irs.json)", layer, num_layers)
    return layer


def last_question_types(conv: Conversation, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], token_types [T]) of `conv` (ending with the generation prompt), with INSTRUCTION
    kept only on the last user message's tokens."""
    input_ids, _, token_types = tokenize_conversation(conv, tokenizer)
    user = conv.roles[0]
    last = max((i for i, (role, _) in enumerate(conv.messages) if role == user), default=None)
    if last is None:
        raise ValueError("the conversation has no user message")
    prefix = conv.copy()
    prefix.messages = prefix.messages[:last]
    n_before = len(tokenize_conversation(prefix, tokenizer)[0]) if prefix.messages else 0
    earlier = torch.arange(len(token_types)) < n_before
    token_types = torch.where(
        earlier & (token_types == TokenType.INSTRUCTION), int(TokenType.TEMPLATE), token_types
    )
    return input_ids, token_types


@torch.no_grad()
def focus_alpha(
    model: nn.Module, tokenizer, conv: Conversation, pixels: torch.Tensor, layer: int
) -> torch.Tensor:
    """alpha (N_v,) of Eq. 3 for the last question of `conv` at `layer`; `pixels` is the image (3, H, W).

    `conv` must hold the image (`<image>` in a user turn) and end with the generation prompt.
    """
    input_ids, token_types = last_question_types(conv, tokenizer)
    param = next(model.parameters())
    batch = {
        "input_ids": input_ids[None].to(param.device),  # (1, T)
        "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long, device=param.device),
        "token_types": token_types[None].to(param.device),
        "images": pixels[None].to(param.device, param.dtype),  # (1, 3, H, W)
    }
    return instruction_vision_importance(model, batch, layer)[0].float().cpu()


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) scaled so the longer side lies in [MIN_DISPLAY_SIDE, MAX_DISPLAY_SIDE] when it did not."""
    side = max(size)
    scale = min(max(1.0, MIN_DISPLAY_SIDE / side), MAX_DISPLAY_SIDE / side)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _colormap(values: np.ndarray, cmap: str) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through a matplotlib colormap (no pyplot, no figure)."""
    from matplotlib import colormaps

    return (colormaps[cmap](values)[..., :3] * 255).round().astype(np.uint8)


def focus_heatmap(
    image: Image.Image,
    alpha: torch.Tensor | np.ndarray,
    image_aspect_ratio: str = "pad",
    background: tuple[int, int, int] = (127, 127, 127),
    cmap: str = "jet",
    opacity: float = 0.5,
) -> Image.Image:
    """alpha (N_v,) over the sqrt(N_v) x sqrt(N_v) patch grid, blended over `image` -> RGB image.

    `background` is the padding colour of `image_aspect_ratio=pad` (the image processor's mean).
    """
    alpha = np.asarray(alpha, dtype=np.float32).reshape(-1)
    grid = math.isqrt(alpha.size)
    if grid * grid != alpha.size or grid == 0:
        raise ValueError(f"alpha has {alpha.size} entries: not a square grid of patches")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    image = image.convert("RGB")
    if image_aspect_ratio == "pad":
        image = expand2square(image, background)  # the square the model saw: the grid covers it exactly
    size = display_size(image.size)
    base = image.resize(size, Image.Resampling.BICUBIC)
    low, high = float(alpha.min()), float(alpha.max())
    scaled = (alpha - low) / (high - low) if high > low else np.zeros_like(alpha)
    heat = Image.fromarray(scaled.reshape(grid, grid)).resize(size, Image.Resampling.BILINEAR)  # mode "F"
    colored = Image.fromarray(_colormap(np.clip(np.asarray(heat), 0.0, 1.0), cmap))  # (H, W, 3) uint8: RGB
    return Image.blend(base, colored, opacity)
