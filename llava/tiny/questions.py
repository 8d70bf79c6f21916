"""Question families of the tiny world, each asked only where its answer is unambiguous for the scene.

Seven families mirror the paper's benchmarks: attribute (GQA), existence (POPE, with adversarial negatives and
balanced yes/no), counting, spatial, reading (TextVQA), choice (MMBench/ScienceQA lettered options) and
describe (long answers, 20-60 words, for the exposure-bias analysis). Prompt suffixes are LLaVA-1.5's.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from llava.tiny.scenes import COLORS, POSITIONS, SHAPES, WORDS, Scene, SceneObject

FAMILIES = ("attribute", "existence", "counting", "spatial", "reading", "choice", "describe")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Summarize the visual content of the image.", "Write a terse but informative summary of the picture.",
)
DESCRIBE_PROMPTS = ("Describe the image in detail.", "Give a detailed description of the image.",
                    "What is in this image? Describe every object.")


@dataclass(frozen=True)
class Question:
    family: str
    text: str  # what the user types, suffix included, without "<image>"
    answer: str
    options: tuple[str, ...] | None = None




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


class Balancer:
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


def _spatial(scene: Scene, rng: random.Random, balancer: Balancer) -> tuple[str, str]:
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
    family: str, scene: Scene, rng: random.Random, balancer: Balancer, banned: set[tuple[str, str]]
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


def text_only_question(rng: random.Random) -> tuple[str, str]:
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
