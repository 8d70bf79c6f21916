"""The tiny built-in world: seeded synthetic images and LLaVA conversation data for tests and the CPU preset.

Design choices
- A scene is a 3x3 grid of cells holding 1-4 objects (shape, colour, size) and, in some images, one short
  word or number in another cell, drawn with PIL's default font. A (colour, shape) pair occurs at most once
  per image, so "the red circle" always names exactly one object; every question is asked only where its
  answer is unambiguous for the scene (e.g. "What color is the circle?" needs exactly one circle).
- Seven question families mirror the paper's benchmarks: attribute (GQA), existence (POPE, with adversarial
  negatives and balanced yes/no), counting, spatial, reading (TextVQA), choice (MMBench/ScienceQA lettered
  options) and describe (long answers, 20-60 words, for the exposure-bias analysis).
- Compositional hold-out: `HELDOUT_COMBOS` never appear in train images nor in any train text; a share
  `heldout_prob` (default 0.3) of the val/test images contains one (their records carry ``"heldout": true``).
- Val/test ask several questions of different families about each image (IRS compares instructions on one
  image) and balance the families to within one question.
- Determinism: every random draw comes from `random.Random` seeded with strings (sha512-based, independent
  of PYTHONHASHSEED) and PNGs carry no timestamps: same seed and parameters give the same bytes.

On-disk layout of ``out_dir``. Every "image" field is a file name relative to ``out_dir/images`` (LLaVA's
``--image_folder`` convention), e.g. ``"image": "train_000123.png"``.
- ``images/{split}_{index:06d}.png``: RGB PNGs, split in {train, val, test}.
- ``scenes.json``: {image file name: scene dict}: objects (shape, color, size, row, col, center in [0, 1]),
  background, text and text_cell.
- ``pretrain.json``: one caption conversation per train image.
- ``finetune.json``: instruction mix over the train images; records carry ``family`` ("multi" for
  multi-turn records, which also list ``families`` per turn; "text" for text-only records, which have no
  "image" key); ``<image>`` appears only in the first human turn.
- ``val.json`` / ``test.json``: single-turn records with ``family``, ``answer`` and ``heldout`` (choice
  records also ``options``); ``val_questions.jsonl`` / ``test_questions.jsonl`` hold
  {"question_id", "image", "text", "family", "answer"} as LLaVA's ``model_vqa_loader`` reads them.
- ``manifest.json``: parameters, file list, family counts and a content hash; written last, atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

logger = logging.getLogger(__name__)

WORLD_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (235, 195, 20),
          "purple": (140, 60, 180), "cyan": (30, 190, 200)}
SIZES = {"small": 0.21, "large": 0.38}  # radius as a fraction of the cell side
WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "map", "pen", "key", "bus", "car", "egg")
# One held-out colour per shape, so every colour and every shape still occurs in training.
HELDOUT_COMBOS = (("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square"))
TRAIN_COMBOS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
FAMILIES = ("attribute", "existence", "counting", "spatial", "reading", "choice", "describe")
# (row, col) -> phrase; the same phrases are used in questions, descriptions and the describe scorer.
POSITIONS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Summarize the visual content of the image.", "Write a terse but informative summary of the picture.",
)
DESCRIBE_PROMPTS = ("Describe the image in detail.", "Give a detailed description of the image.",
                    "What is in this image? Describe every object.")
BACKGROUND_RANGE = (225, 250)
TEXT_COLOR = (20, 20, 20)
TEXT_HEIGHT = 0.16  # font size as a fraction of the image side (about 10 px at 64 px)
MAX_JITTER = 0.12  # centre offset as a fraction of the cell side


def _arg(default: Any, doc: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help (and extra flag aliases)."""
    return field(default=default, metadata={"help": doc, **extra})


@dataclass(frozen=True)
class WorldParams:
    """Everything that decides a world's bytes; recorded in manifest.json, one CLI flag per field."""

    seed: int = _arg(0, "random seed; the same seed and parameters give identical bytes")
    n_train: int = _arg(3000, "train images (a caption and finetune questions each)", aliases=("--n-images",))
    n_val: int = _arg(300, "validation questions (families balanced)")
    n_test: int = _arg(600, "test questions (families balanced)")
    image_size: int = _arg(64, "image side in pixels")
    questions_per_image: int = _arg(3, "finetune questions (of different families) per train image")
    eval_questions_per_image: int = _arg(3, "val/test questions (of different families) per image")
    text_prob: float = _arg(0.3, "share of images carrying a word or number")
    multi_turn_prob: float = _arg(0.3, "share of train images whose questions form one multi-turn record")
    text_only_frac: float = _arg(0.05, "share of text-only finetune records")
    heldout_prob: float = _arg(0.3, "share of val/test images containing a held-out (colour, shape) pair")
    version: int = WORLD_VERSION

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            assert getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}"
        assert self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}"
        # Every train image can take 5 families (spatial and reading need 2 objects / text).
        q = self.questions_per_image
        assert 1 <= q <= 5, f"questions_per_image must lie in [1, 5], got {q}"
        assert 1 <= self.eval_questions_per_image <= len(FAMILIES), (
            f"eval_questions_per_image must lie in [1, {len(FAMILIES)}], got {self.eval_questions_per_image}"
        )
        for name in ("text_prob", "multi_turn_prob", "heldout_prob"):
            assert 0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1], got {getattr(self, name)}"
        frac = self.text_only_frac
        assert 0.0 <= frac < 1.0, f"text_only_frac must lie in [0, 1), got {frac}"


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


@dataclass(frozen=True)
class Question:
    family: str
    text: str  # what the user types, suffix included, without "<image>"
    answer: str
    options: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------------------------- scenes
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


# -------------------------------------------------------------------------------------------- questions
def _name(o: SceneObject) -> str:
    return f"{o.color} {o.shape}"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _text_phrase(scene: Scene) -> str:
    if scene.text is None:
        return "There is no text in the image."
    kind = "number" if scene.text.isdigit() else "word"
    return f'The {kind} "{scene.text}" is written {POSITIONS[scene.text_cell]}.'


def describe_scene(scene: Scene) -> str:
    """Long deterministic answer: every object with size, colour, shape and position, then the text."""
    items = [f"{_article(f'{o.size} {_name(o)}')} {POSITIONS[o.row, o.col]}" for o in scene.objects]
    n = len(items)
    listing = items[0] if n == 1 else ", ".join(items[:-1]) + (", and " if n > 2 else " and ") + items[-1]
    head = f"The image shows {NUMBER_WORDS[n]} object{'s' * (n > 1)} on a plain light background."
    return f"{head} There is {listing}. {_text_phrase(scene)}"


def caption_scene(scene: Scene) -> str:
    """Short pretraining caption: the objects by size, colour and shape, plus the text if any."""
    items = [_article(f"{o.size} {_name(o)}") for o in scene.objects]
    cap = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if scene.text is not None:
        cap += f', with the {"number" if scene.text.isdigit() else "word"} "{scene.text}"'
    return cap[0].upper() + cap[1:] + "."


class _Balancer:
    """Alternates yes/no targets per family so yes/no answers are balanced to within one."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def want_yes(self, family: str) -> bool:
        self.counts[family] += 1
        return self.counts[family] % 2 == 1


def askable(family: str, scene: Scene) -> bool:
    """Whether `scene` supports an unambiguous question of `family`."""
    if family == "spatial":
        return len(scene.objects) >= 2
    if family == "reading":
        return scene.text is not None
    return family in FAMILIES


def _unique(scene: Scene, attr: str) -> list[SceneObject]:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, attr)] == 1]


def _by_unique(scene: Scene) -> list[str]:
    """Question kinds naming an object by its shape alone or by its colour alone, where unambiguous."""
    return ["shape_color"] * bool(_unique(scene, "shape")) + ["color_shape"] * bool(_unique(scene, "color"))


def _attribute(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["size", "position", *_by_unique(scene)])
    if kind == "shape_color":
        o = rng.choice(_unique(scene, "shape"))
        return f"What color is the {o.shape}?", o.color
    if kind == "color_shape":
        o = rng.choice(_unique(scene, "color"))
        return f"What shape is the {o.color} object?", o.shape
    o = rng.choice(scene.objects)
    if kind == "size":
        return f"What size is the {_name(o)}?", o.size
    return f"What color is the object {POSITIONS[o.row, o.col]}?", o.color


def _existence(scene: Scene, rng: random.Random, yes: bool, banned: set[tuple[str, str]]) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in scene.objects}
    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    if yes:
        o = rng.choice(scene.objects)
        return f"Is there {_article(_name(o) if rng.random() < 0.7 else o.shape)} in the image?", "yes"
    # Adversarial negatives (POPE): a present shape in an absent colour, or a present colour with an absent
    # shape; plus a plainly absent shape. Combos in `banned` are never named (train text stays held-out-free).
    cands = {
        "absent_color": [(c, s) for s in sorted(shapes) for c in COLORS if c not in colors],
        "absent_shape": [(c, s) for c in sorted(colors) for s in SHAPES if s not in shapes],
    }
    cands = {k: [p for p in v if p not in banned and p not in present] for k, v in cands.items()}
    kinds = [k for k, v in cands.items() if v] + ["shape_only"] * (len(shapes) < len(SHAPES))
    kind = rng.choice(kinds)
    if kind == "shape_only":
        return f"Is there {_article(rng.choice([s for s in SHAPES if s not in shapes]))} in the image?", "no"
    c, s = rng.choice(cands[kind])
    return f"Is there {_article(f'{c} {s}')} in the image?", "no"


def _counting(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("shape", "color", "all"))
    pick = rng.choice(scene.objects) if rng.random() < 0.8 else None  # mostly ask about something present
    if kind == "shape":
        shape = pick.shape if pick else rng.choice(SHAPES)
        return f"How many {PLURALS[shape]} are there?", str(sum(o.shape == shape for o in scene.objects))
    if kind == "color":
        color = pick.color if pick else rng.choice(tuple(COLORS))
        return f"How many {color} objects are there?", str(sum(o.color == color for o in scene.objects))
    return "How many objects are there?", str(len(scene.objects))


# relation phrase -> (axis, sign of a's minus b's cell index that makes "a <relation> b" true)
_RELATIONS = {
    "to the left of": ("col", -1), "to the right of": ("col", 1), "above": ("row", -1), "below": ("row", 1),
}
_WHERE = {("col", -1): "left", ("col", 1): "right", ("row", -1): "above", ("row", 1): "below"}


def _spatial(scene: Scene, rng: random.Random, balancer: _Balancer) -> tuple[str, str]:
    a, b = rng.sample(scene.objects, 2)
    diff = {axis: getattr(a, axis) - getattr(b, axis) for axis in ("row", "col")}
    axes = [axis for axis in ("row", "col") if diff[axis] != 0]
    if len(axes) == 1 and rng.random() < 0.5:  # "where" only when a single relation holds
        where = _WHERE[axes[0], int(math.copysign(1, diff[axes[0]]))]
        return f"Where is the {_name(a)} relative to the {_name(b)}?", where
    axis = rng.choice(axes)  # a yes/no relation along an axis where the two objects differ
    yes = balancer.want_yes("spatial")
    sign = int(math.copysign(1, diff[axis])) * (1 if yes else -1)
    rel = next(r for r, v in _RELATIONS.items() if v == (axis, sign))
    return f"Is the {_name(a)} {rel} the {_name(b)}?", "yes" if yes else "no"


def _reading(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = "number" if scene.text.isdigit() else "word"
    q = f"What {kind} is written in the image?" if rng.random() < 0.7 else "What is written in the image?"
    return q, scene.text


def _choice(scene: Scene, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    kind = rng.choice(["count", *_by_unique(scene)])
    if kind == "shape_color":
        o = rng.choice(_unique(scene, "shape"))
        q, ans, pool = f"What color is the {o.shape}?", o.color, tuple(COLORS)
    elif kind == "color_shape":
        o = rng.choice(_unique(scene, "color"))
        q, ans, pool = f"What shape is the {o.color} object?", o.shape, SHAPES
    else:
        q, ans, pool = "How many objects are there?", str(len(scene.objects)), tuple(str(i) for i in range(6))
    options = [ans] + rng.sample([p for p in pool if p != ans], 3)
    rng.shuffle(options)
    lines = "".join(f"\n{'ABCD'[i]}. {opt}" for i, opt in enumerate(options))
    return q + lines, "ABCD"[options.index(ans)], tuple(options)


def make_question(
    family: str, scene: Scene, rng: random.Random, balancer: _Balancer, banned: set[tuple[str, str]]
) -> Question:
    """One question of `family` about `scene`, with its prompt suffix (LLaVA-1.5's short-answer prompts)."""
    assert askable(family, scene), f"family {family!r} is not askable for this scene"
    if family == "choice":
        q, ans, options = _choice(scene, rng)
        return Question(family, q + CHOICE_SUFFIX, ans, options)
    if family == "describe":
        return Question(family, rng.choice(DESCRIBE_PROMPTS), describe_scene(scene))
    if family == "attribute":
        q, ans = _attribute(scene, rng)
    elif family == "existence":
        q, ans = _existence(scene, rng, balancer.want_yes("existence"), banned)
    elif family == "counting":
        q, ans = _counting(scene, rng)
    elif family == "spatial":
        q, ans = _spatial(scene, rng, balancer)
    else:
        q, ans = _reading(scene, rng)
    return Question(family, q + SHORT_SUFFIX, ans)


def _text_only(rng: random.Random) -> tuple[str, str]:
    """A question needing no image (about 5% of finetune, as LLaVA mixes in ShareGPT)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        w = rng.choice(WORDS)
        return f'Spell the word "{w}" backwards.', w[::-1]
    if kind == 2:
        s = rng.choice(("triangle", "square"))
        return f"How many sides does a {s} have?", "3" if s == "triangle" else "4"
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    first, second = (color, shape) if rng.random() < 0.5 else (shape, color)
    return f"Which of these is a color: {first} or {second}?", color


# ------------------------------------------------------------------------------------------- generation
def _turns(questions: list[Question]) -> list[dict]:
    conv = []
    for i, q in enumerate(questions):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.text})
        conv.append({"from": "gpt", "value": q.answer})
    return conv


def _save(scene: Scene, out_dir: Path, name: str, image_size: int, scenes: dict) -> None:
    render_scene(scene, image_size).save(out_dir / "images" / name, format="PNG")
    scenes[name] = asdict(scene)


def _train_split(
    rng: random.Random, p: WorldParams, out_dir: Path, scenes: dict, bar: tqdm
) -> tuple[list[dict], list[dict]]:
    """Pretrain captions and the finetune mix; neither images nor text name a held-out pair."""
    banned, balancer = set(HELDOUT_COMBOS), _Balancer()
    pretrain, finetune = [], []
    for i in range(p.n_train):
        scene = sample_scene(rng, TRAIN_COMBOS, text_prob=p.text_prob)
        name = f"train_{i:06d}.png"
        _save(scene, out_dir, name, p.image_size, scenes)
        prompt = Question("caption", rng.choice(CAPTION_PROMPTS), caption_scene(scene))
        pretrain.append({"id": f"pretrain_{i:06d}", "image": name, "conversations": _turns([prompt])})
        fams = rng.sample([f for f in FAMILIES if askable(f, scene)], p.questions_per_image)
        qs = [make_question(f, scene, rng, balancer, banned) for f in fams]
        # Multi-turn: 2-3 turns on one image (the rest as single-turn records); else one record per question.
        if len(qs) >= 2 and rng.random() < p.multi_turn_prob:
            k = rng.randint(2, len(qs))
            groups = [qs[:k]] + [[q] for q in qs[k:]]
        else:
            groups = [[q] for q in qs]
        for g in groups:
            family, ident = g[0].family if len(g) == 1 else "multi", f"finetune_{len(finetune):06d}"
            rec = {"id": ident, "image": name, "conversations": _turns(g), "family": family}
            if len(g) > 1:
                rec["families"] = [q.family for q in g]
            finetune.append(rec)
        bar.update()
    for _ in range(round(p.text_only_frac * len(finetune) / (1 - p.text_only_frac))):
        q, a = _text_only(rng)
        conv = [{"from": "human", "value": q + SHORT_SUFFIX}, {"from": "gpt", "value": a}]
        finetune.append({"id": f"finetune_{len(finetune):06d}", "conversations": conv, "family": "text"})
    rng.shuffle(finetune)
    return pretrain, finetune


def _eval_split(
    split: str, n_questions: int, rng: random.Random, p: WorldParams, out_dir: Path, scenes: dict, bar: tqdm
) -> list[dict]:
    """Single-turn questions, several families per image (the least asked first), balanced to within one."""
    counts, balancer, records = Counter({f: 0 for f in FAMILIES}), _Balancer(), []
    for i in range(math.ceil(n_questions / p.eval_questions_per_image)):
        k = min(p.eval_questions_per_image, n_questions - len(records))
        fams = sorted(FAMILIES, key=lambda f: (counts[f], rng.random()))[:k]
        force = rng.choice(HELDOUT_COMBOS) if rng.random() < p.heldout_prob else None
        min_objects = 2 if "spatial" in fams else 1
        scene = sample_scene(rng, TRAIN_COMBOS, min_objects=min_objects, text_prob=p.text_prob,
                             force_text="reading" in fams, force_combo=force)
        name = f"{split}_{i:06d}.png"
        _save(scene, out_dir, name, p.image_size, scenes)
        for f in fams:
            q = make_question(f, scene, rng, balancer, banned=set())
            counts[f] += 1
            rec = {"id": f"{split}_{len(records):06d}", "image": name, "conversations": _turns([q])}
            rec.update(family=f, answer=q.answer, heldout=scene.heldout)
            if q.options is not None:
                rec["options"] = list(q.options)
            records.append(rec)
        bar.update()
    return records


def _questions_jsonl(records: list[dict]) -> str:
    """LLaVA's question jsonl: the prompt without "<image>" (model_vqa_loader adds it), plus the reference."""
    lines = []
    for r in records:
        text = r["conversations"][0]["value"].removeprefix("<image>\n")
        row = {"question_id": r["id"], "image": r["image"], "text": text}
        row.update(family=r["family"], answer=r["answer"])
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_complete(out_dir: Path, params: dict) -> dict | None:
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("params") != params or not all((out_dir / f).is_file() for f in manifest["files"]):
        return None
    return manifest


def generate_world(
    out_dir: Path | str, params: WorldParams | None = None, progress: bool = False, **overrides: Any
) -> dict:
    """Write the tiny world to `out_dir` (layout in the module docstring) and return its manifest.

    `overrides` are `WorldParams` fields (``generate_world(out, seed=0, n_train=40)``). Idempotent: returns
    the existing manifest at once if `out_dir` holds a complete world built with the same parameters.
    """
    out_dir, params = Path(out_dir), replace(params or WorldParams(), **overrides)
    p = asdict(params)
    if (manifest := _is_complete(out_dir, p)) is not None:
        logger.info("tiny world already complete at %s", out_dir)
        return manifest
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    n_eval_images = sum(math.ceil(n / params.eval_questions_per_image) for n in (params.n_val, params.n_test))
    rngs = {split: random.Random(f"tiny-world/{params.seed}/{split}") for split in ("train", "val", "test")}
    scenes: dict[str, dict] = {}
    with tqdm(total=params.n_train + n_eval_images, desc="tiny world images", disable=not progress) as bar:
        pretrain, finetune = _train_split(rngs["train"], params, out_dir, scenes, bar)
        val = _eval_split("val", params.n_val, rngs["val"], params, out_dir, scenes, bar)
        test = _eval_split("test", params.n_test, rngs["test"], params, out_dir, scenes, bar)
    splits = {"pretrain": pretrain, "finetune": finetune, "val": val, "test": test}
    texts = {f"{k}.json": json.dumps(v, indent=1, ensure_ascii=False) for k, v in splits.items()}
    texts["scenes.json"] = json.dumps(scenes, indent=1)
    texts.update({f"{k}_questions.jsonl": _questions_jsonl(splits[k]) for k in ("val", "test")})
    for name, text in texts.items():
        _write_atomic(out_dir / name, text)
    # Drop images of an earlier, larger world built here with other parameters.
    pattern = re.compile(r"(train|val|test)_\d{6}\.png")
    for f in (out_dir / "images").iterdir():
        if pattern.fullmatch(f.name) and f.name not in scenes:
            f.unlink()
    files = sorted(texts) + [f"images/{n}" for n in sorted(scenes)]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (out_dir / f).read_bytes())
    families = {k: dict(Counter(r["family"] for r in v)) for k, v in splits.items() if k != "pretrain"}
    manifest = {"params": p, "content_hash": digest.hexdigest(), "families": families, "files": files}
    _write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    logger.info("tiny world written to %s (%d images)", out_dir, len(scenes))
    return manifest


def load_scenes(world_dir: Path | str) -> dict[str, Scene]:
    """{image file name: Scene} from a generated world."""
    raw = json.loads((Path(world_dir) / "scenes.json").read_text(encoding="utf-8"))
    return {name: Scene.from_dict(d) for name, d in raw.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("playground/tiny/data"), help="folder to write")
    for f in fields(WorldParams):
        if f.name != "version":
            flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]
            parser.add_argument(*flags, type=type(f.default), default=f.default, help=f.metadata["help"])
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = generate_world(args.pop("out"), WorldParams(**args), progress=True)
    logger.info("content hash %s; test families %s", manifest["content_hash"], manifest["families"]["test"])


if __name__ == "__main__":
    main()
