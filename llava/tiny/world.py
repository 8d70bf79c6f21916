"""The tiny built-in world: seeded synthetic images and LLaVA conversation data for tests and the CPU preset.

Scenes (`scenes.py`) are 3x3 grids of 1-4 objects and maybe a word or number; seven question families
(`questions.py`) mirror the paper's benchmarks. This module decides which questions go into which split.

Design choices
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
- Extra evaluation splits (`add_eval_split`, ``--add-split test_large=4200``): ``{name}.json``,
  ``{name}_questions.jsonl``, ``{name}_scenes.json``, ``images/{name}_NNNNNN.png`` and their own
  ``{name}_manifest.json``, beside an unchanged world.
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
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llava.tiny.questions import (
    CAPTION_PROMPTS,
    FAMILIES,
    SHORT_SUFFIX,
    Balancer,
    Question,
    askable,
    caption_scene,
    make_question,
    text_only_question,
)
from llava.tiny.scenes import HELDOUT_COMBOS, TRAIN_COMBOS, Scene, render_scene, sample_scene

logger = logging.getLogger(__name__)

WORLD_VERSION = 1


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
    banned, balancer = set(HELDOUT_COMBOS), Balancer()
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
        q, a = text_only_question(rng)
        conv = [{"from": "human", "value": q + SHORT_SUFFIX}, {"from": "gpt", "value": a}]
        finetune.append({"id": f"finetune_{len(finetune):06d}", "conversations": conv, "family": "text"})
    rng.shuffle(finetune)
    return pretrain, finetune


def _eval_split(
    split: str, n_questions: int, rng: random.Random, p: WorldParams, out_dir: Path, scenes: dict, bar: tqdm
) -> list[dict]:
    """Single-turn questions, several families per image (the least asked first), balanced to within one."""
    counts, balancer, records = Counter({f: 0 for f in FAMILIES}), Balancer(), []
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


def add_eval_split(world_dir: Path | str, name: str, n_questions: int, progress: bool = False) -> dict:
    """Add an evaluation split `name` of `n_questions` single-turn questions (families balanced) to a generated
    world, drawn like val/test from its own seeded stream and with the world's parameters: ``{name}.json``,
    ``{name}_questions.jsonl``, ``{name}_scenes.json``, ``images/{name}_NNNNNN.png`` and ``{name}_manifest.json``
    (written last). The world's own files, manifest and content hash are untouched, so checkpoints trained on it
    stay valid. Idempotent: an existing complete split of the same size is returned as it is.
    """
    world_dir = Path(world_dir)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("train", "val", "test", "pretrain", "finetune"):
        raise ValueError(f"split name must be lowercase [a-z0-9_] and not a split of the world itself, got {name!r}")
    manifest_path = world_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: generate the world first (python -m llava.tiny.world)")
    world = json.loads(manifest_path.read_text(encoding="utf-8"))
    params = WorldParams(**world["params"])
    split_manifest = world_dir / f"{name}_manifest.json"
    wanted = {"world_hash": world["content_hash"], "n_questions": n_questions}
    if split_manifest.is_file():
        done = json.loads(split_manifest.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in wanted} == wanted and all((world_dir / f).is_file() for f in done["files"]):
            return done
    split_manifest.unlink(missing_ok=True)
    rng = random.Random(f"tiny-world/{params.seed}/{name}")
    scenes: dict[str, dict] = {}
    n_images = math.ceil(n_questions / params.eval_questions_per_image)
    with tqdm(total=n_images, desc=f"tiny world {name} images", disable=not progress) as bar:
        records = _eval_split(name, n_questions, rng, params, world_dir, scenes, bar)
    texts = {f"{name}.json": json.dumps(records, indent=1, ensure_ascii=False),
             f"{name}_questions.jsonl": _questions_jsonl(records),
             f"{name}_scenes.json": json.dumps(scenes, indent=1)}
    for file, text in texts.items():
        _write_atomic(world_dir / file, text)
    families = dict(Counter(r["family"] for r in records))
    manifest = {**wanted, "families": families, "files": sorted(texts) + [f"images/{n}" for n in sorted(scenes)]}
    _write_atomic(split_manifest, json.dumps(manifest, indent=1))
    logger.info("split %s written to %s (%d questions, %d images)", name, world_dir, len(records), len(scenes))
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
    parser.add_argument("--add-split", metavar="NAME=N", action="append", default=[],
                        help="also add an evaluation split NAME of N questions drawn like test (add_eval_split), "
                             "e.g. test_large=4200 (600 per family); the world itself is unchanged")
    args = vars(parser.parse_args(argv))
    extra = []
    for spec in args.pop("add_split"):
        name, sep, n = spec.partition("=")
        if not sep or not n.isdigit() or int(n) < 1:
            parser.error(f"--add-split {spec!r}: expected NAME=N with N >= 1")
        extra.append((name, int(n)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.pop("out")
    manifest = generate_world(out, WorldParams(**args), progress=True)
    logger.info("content hash %s; test families %s", manifest["content_hash"], manifest["families"]["test"])
    for name, n in extra:
        split = add_eval_split(out, name, n, progress=True)
        logger.info("split %s: families %s", name, split["families"])


if __name__ == "__main__":
    main()
