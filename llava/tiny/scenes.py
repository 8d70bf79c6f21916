"""Scenes of the tiny world: a 3x3 grid of cells holding 1-4 objects and maybe one word or number.

A (colour, shape) pair occurs at most once per scene, so "the red circle" always names exactly one object.
`HELDOUT_COMBOS` are the (colour, shape) pairs kept out of training (compositional hold-out, `world.py`).
Rendering draws at 4x and downsamples (cheap anti-aliasing, legible text at 64 px); PNGs carry no timestamps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (235, 195, 20),
          "purple": (140, 60, 180), "cyan": (30, 190, 200)}
SIZES = {"small": 0.21, "large": 0.38}  # radius as a fraction of the cell side
WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "map", "pen", "key", "bus", "car", "egg")
# One held-out colour per shape, so every colour and every shape still occurs in training.
HELDOUT_COMBOS = (("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square"))
TRAIN_COMBOS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
# (row, col) -> phrase; the same phrases are used in questions, descriptions and the describe scorer.
POSITIONS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
BACKGROUND_RANGE = (225, 250)
TEXT_COLOR = (20, 20, 20)
TEXT_HEIGHT = 0.16  # font size as a fraction of the image side (about 10 px at 64 px)
MAX_JITTER = 0.12  # centre offset as a fraction of the cell side


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    center: tuple[float, float]  # (x, y) in [0, 1] image coordinates


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order (row, then column)
    background: tuple[int, int, int]
    text: str | None = None
    text_cell: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(SceneObject(**{**o, "center": tuple(o["center"])}) for o in d["objects"])
        cell = tuple(d["text_cell"]) if d["text_cell"] is not None else None
        return cls(objs, tuple(d["background"]), d["text"], cell)

    @property
    def heldout(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_COMBOS for o in self.objects)


def sample_scene(
    rng: random.Random, combos: list[tuple[str, str]], *, min_objects: int = 1, max_objects: int = 4,
    text_prob: float = 0.3, force_text: bool = False, force_combo: tuple[str, str] | None = None,
) -> Scene:
    """Draw 1-4 objects with distinct (colour, shape) pairs from `combos` into distinct grid cells."""
    n = rng.randint(min_objects, max_objects)
    has_text = force_text or rng.random() < text_prob
    cells = rng.sample(range(9), n + has_text)
    pairs = rng.sample(combos, n)
    if force_combo is not None and force_combo not in pairs:
        pairs[0] = force_combo
    objects = []
    for (color, shape), cell in zip(pairs, cells):
        size = rng.choice(tuple(SIZES))
        row, col = divmod(cell, 3)
        jx, jy = (rng.uniform(-MAX_JITTER, MAX_JITTER) for _ in range(2))
        center = (round((col + 0.5 + jx) / 3, 4), round((row + 0.5 + jy) / 3, 4))
        objects.append(SceneObject(shape, color, size, row, col, center))
    objects.sort(key=lambda o: (o.row, o.col))
    background = tuple(rng.randint(*BACKGROUND_RANGE) for _ in range(3))
    text = text_cell = None
    if has_text:
        text = rng.choice(WORDS) if rng.random() < 0.6 else str(rng.randint(0, 99))
        text_cell = divmod(cells[-1], 3)
    return Scene(tuple(objects), background, text, text_cell)


@lru_cache(maxsize=8)
def _font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size_px)


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw at `supersample` x the size and downsample (cheap anti-aliasing, legible text at 64 px)."""
    side = image_size * supersample
    img = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = o.center[0] * side, o.center[1] * side
        r = SIZES[o.size] * side / 3
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            h = 0.85 * r  # similar area to the circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill)
        elif o.shape == "cross":
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
    if scene.text is not None:
        row, col = scene.text_cell
        xy = ((col + 0.5) * side / 3, (row + 0.5) * side / 3)
        draw.text(xy, scene.text, fill=TEXT_COLOR, font=_font(round(TEXT_HEIGHT * side)), anchor="mm")
    return img.resize((image_size, image_size), Image.Resampling.BOX)
