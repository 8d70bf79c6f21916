"""The demo's "visual focus": where the last question looks in the image (Eq. 3's alpha, the paper's Fig. 8).

    alpha_k = (1/N_i) sum_u A_{i->v}(u, k)    (mean over heads and the question's instruction tokens)

Design choices
- alpha and the layer come from a plugin found through the `llava.visual_focus` entry point group, so that
  `llava/` imports nothing of Align-TI: the installed one is `aligntI_patch.focus` (IVA's alpha, the IRS layer).
  It reads a batch built exactly as the chat prompt is (`tokenize_conversation`, `focus_batch`), so the demo
  shows the quantity IVA weights with, at the layer IVA uses.
- Only the LAST question counts: in a multi-turn chat every user turn is INSTRUCTION, so the turns before
  it are re-typed TEMPLATE (tokenization is segment-wise, so the earlier turns are an exact token prefix).
  Earlier turns and replies still sit in the context, as when the model answers.
- The map is drawn on the image as the model sees it: padded to a square for `image_aspect_ratio=pad`,
  stretched to a square otherwise (then the map is stretched back onto the original image). alpha is
  reshaped to the sqrt(N_v) x sqrt(N_v) patch grid, min-max scaled, upsampled bilinearly, coloured with a
  matplotlib colormap and alpha-blended over the image. PIL, numpy and matplotlib only.
"""

from __future__ import annotations

import logging
import math
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from llava.constants import TokenType
from llava.conversation import Conversation, tokenize_conversation
from llava.mm_utils import expand2square

__all__ = [
    "FocusReader",
    "display_size",
    "focus_batch",
    "focus_heatmap",
    "last_question_types",
    "load_focus_reader",
]

logger = logging.getLogger(__name__)

FOCUS_ENTRY_POINT_GROUP = "llava.visual_focus"
MIN_DISPLAY_SIDE = 256  # tiny-world images are 32-64 px: upscale so the patch grid is visible
MAX_DISPLAY_SIDE = 512


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


def focus_batch(model: nn.Module, tokenizer, conv: Conversation, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The one-sample batch (our collator's keys) of `conv`'s last question, on the model's device; `pixels` is
    the image (3, H, W). `conv` must hold the image (`<image>` in a user turn) and end with the generation
    prompt."""
    input_ids, token_types = last_question_types(conv, tokenizer)
    param = next(model.parameters())
    return {
        "input_ids": input_ids[None].to(param.device),  # (1, T)
        "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long, device=param.device),
        "token_types": token_types[None].to(param.device),
        "images": pixels[None].to(param.device, param.dtype),  # (1, 3, H, W)
    }


class FocusReader(Protocol):
    """What a visual-focus plugin provides (entry point group `llava.visual_focus`)."""

    def resolve_layer(self, spec: str | int, model: nn.Module, checkpoint_dir: str | Path | None) -> int:
        """The layer to read: an int (or digit string), or "auto"."""

    def alpha(self, model: nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        """(B, N_v) importance of each visual token for the batch's instruction tokens at `layer`."""


def load_focus_reader() -> FocusReader | None:
    """The installed visual-focus plugin (Align-TI's: `aligntI_patch.focus`), or None when none is installed."""
    found = list(entry_points(group=FOCUS_ENTRY_POINT_GROUP))
    if not found:
        logger.warning("no %s plugin installed: the demo shows no focus maps", FOCUS_ENTRY_POINT_GROUP)
        return None
    if len(found) > 1:
        logger.info("%d %s plugins installed; using %s", len(found), FOCUS_ENTRY_POINT_GROUP, found[0].name)
    return found[0].load()


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
