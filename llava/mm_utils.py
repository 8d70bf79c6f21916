"""Image and prompt helpers (LLaVA's names)."""

from __future__ import annotations

import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `background` (LLaVA's `image_aspect_ratio=pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def process_images(images: list[Image.Image], image_processor, image_aspect_ratio: str = "pad") -> torch.Tensor:
    """PIL images -> pixel tensor [n, 3, H, W]."""
    if image_aspect_ratio == "pad":
        mean = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [expand2square(img.convert("RGB"), mean) for img in images]
    elif image_aspect_ratio not in ("square", "resize", None):
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
    return image_processor(images=[img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenize a prompt string, replacing every `<image>` by `image_token_index` (LLaVA's API)."""
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i > 0:
            ids.append(image_token_index)
        ids += tokenizer(chunk, add_special_tokens=False).input_ids
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    return ids
