"""Focus maps of several models on the same images, the paper's Fig. 8, and how well they agree.

    alpha_k = (1/N_i) sum_u A_{i->v}(u, k)    (Eq. 3: mean over heads and instruction tokens, at one layer)

Design choices:
- alpha is read exactly as the demo reads it (`llava.serve.focus.focus_batch` on the demo's conversation,
  `IVAFocus.alpha`), each model with its own tokenizer, template, image processor and layer: `--layer auto`
  resolves per checkpoint (`resolve_focus_layer`: irs.json's best_layer beside it, else about 3/4 depth).
- The first `--model` is the reference (the teacher). Agreement with it is the cosine similarity and the
  Spearman rank correlation of the two alphas over the N_v visual tokens (ties get their average rank): the
  quantitative reading of the figure. Both need the same N_v; models with another N_v are still drawn (each
  map on its own sqrt(N_v) grid) and get null agreement with the reason. Undefined values (an all-zero or
  constant alpha) are null too, never NaN.
- Models are loaded one at a time and freed before the next (a 7B teacher and its students need not fit
  together); only alphas and the small heatmap images are kept.
- The questions are a seeded sample of those with an image (file order kept); one grid row per question.

CLI: python -m aligntI_patch.focus_maps --model teacher=T --model sft=S1 --model aligntI=S2
     --question-file Q.jsonl --image-folder F [--num-images 6] [--layer auto] --output-dir DIR
     -> DIR/focus_maps.png (rows = questions; columns = the image, then one heatmap per model) and
        DIR/focus_maps.json (per model and question: layer, alpha, cosine and Spearman vs the reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from aligntI_patch.exposure_bias import load_questions
from aligntI_patch.focus import FOCUS
from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.generation import default_conv_mode
from llava.hub import ModelNotFoundError, resolve_dir
from llava.model.builder import load_pretrained_model
from llava.serve.focus import focus_batch, focus_heatmap
from llava.serve.inference import ChatModel, build_conversation

__all__ = ["agreement", "average_ranks", "cosine_similarity", "focus_grid", "spearman_correlation"]

logger = logging.getLogger(__name__)

PANEL_INCHES = 2.4  # one grid cell
DPI = 100  # the PNG is (240 * (1 + models)) x (240 * rows) pixels
LABEL_CHARS = 60  # a row label keeps the question's first line, shortened to this


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of `x` (n,) as float64; tied values share their average rank (scipy's 'average')."""
    x = x.detach().double().cpu().reshape(-1)
    order = x.argsort()
    ordered = x[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = starts.cumsum(0) - 1  # (n,): tie group of each sorted value
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    mean_rank = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    mean_rank /= torch.bincount(group)  # the average of the positions a tie group spans
    ranks = torch.empty_like(positions)
    ranks[order] = mean_rank[group]
    return ranks


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    """cos(a, b) of two (N_v,) vectors in float64 (as IRS compares alphas, Eq. 4); NaN if either is all zero."""
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else float("nan")


def spearman_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rho of two (N_v,) vectors: the Pearson correlation of their average ranks; NaN if either
    is constant (a rank vector without spread has no correlation)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norms = ra.norm() * rb.norm()
    return float(ra @ rb / norms) if norms > 0 else float("nan")


def agreement(alpha: Tensor, reference: Tensor) -> dict[str, Any]:
    """{"cosine", "spearman"} of `alpha` against the reference's alpha, both (N_v,); a value that cannot be
    computed is None and "reason" says why."""
    if alpha.numel() != reference.numel():
        return {"cosine": None, "spearman": None,
                "reason": f"N_v differs from the reference's ({alpha.numel()} vs {reference.numel()} visual tokens)"}
    values = {"cosine": cosine_similarity(alpha, reference), "spearman": spearman_correlation(alpha, reference)}
    out: dict[str, Any] = {k: None if math.isnan(v) else v for k, v in values.items()}  # JSON has no NaN
    if None in out.values():
        out["reason"] = "an all-zero or constant alpha (no instruction token, or a flat map)"
    return out


@dataclass
class ModelFocus:
    """One model's alphas and heatmaps on the sampled questions."""

    name: str
    path: str
    layer: int
    conv_mode: str
    alphas: list[Tensor]  # (N_v,) float32 per question
    heatmaps: list[Image.Image]


def read_focus(name: str, path: str, layer_spec: str, questions: Sequence[dict], images: Sequence[Image.Image],
               device: str, conv_mode: str | None = None) -> ModelFocus:
    """Load one checkpoint and read its alpha (Eq. 3) on every question, as the demo's focus panel does."""
    tokenizer, model, image_processor, _ = load_pretrained_model(path, device=device)
    layer = FOCUS.resolve_layer(layer_spec, model, path)
    chat = ChatModel(model, tokenizer, image_processor, conv_mode or default_conv_mode(model), FOCUS, layer, name)
    background = tuple(int(x * 255) for x in image_processor.image_mean)  # the pad colour of the model's view
    alphas, heatmaps = [], []
    for question, image in zip(questions, images):
        conv = build_conversation(chat.conv_mode, [[question["text"], None]], has_image=True)
        batch = focus_batch(model, tokenizer, conv, chat.pixels(image))
        alpha = chat.focus.alpha(model, batch, layer)[0].float().cpu()  # (N_v,)
        alphas.append(alpha)
        heatmaps.append(focus_heatmap(image, alpha, chat.image_aspect_ratio, background))
    logger.info("%s: layer %d, N_v %d, %d maps", name, layer, alphas[0].numel(), len(alphas))
    return ModelFocus(name, path, layer, chat.conv_mode, alphas, heatmaps)


def question_label(text: str) -> str:
    """The question's first line without the image placeholder, shortened and wrapped for a row label."""
    line = text.replace(DEFAULT_IMAGE_TOKEN, "").strip().splitlines()[0] if text.strip() else ""
    return textwrap.fill(textwrap.shorten(line, LABEL_CHARS, placeholder="..."), width=LABEL_CHARS // 2)


def focus_grid(images: Sequence[Image.Image], columns: Sequence[tuple[str, Sequence[Image.Image]]],
               labels: Sequence[str]):
    """A matplotlib Figure (Agg canvas) of len(images) rows x (1 + len(columns)) panels: each row's image,
    then one heatmap per (title, heatmaps) column; `labels` are the row labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(images), 1 + len(columns)
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), dpi=DPI)
    FigureCanvasAgg(fig)  # no pyplot: no global figure state, no display backend
    axes = fig.subplots(rows, cols, squeeze=False)  # (rows, cols)
    for r, (image, label) in enumerate(zip(images, labels)):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(label, fontsize=7)
        for c, (_, maps) in enumerate(columns, start=1):
            axes[r, c].imshow(maps[r])
    for c, title in enumerate(["image", *(title for title, _ in columns)]):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def summary(focus: Sequence[ModelFocus], questions: Sequence[dict]) -> dict[str, Any]:
    """The JSON's "models": per model its layer and N_v, per question alpha and agreement with the first
    model (the reference), and the mean of each agreement over the questions where it is defined."""
    reference = focus[0]
    models = {}
    for mf in focus:
        rows = []
        for q, alpha, ref in zip(questions, mf.alphas, reference.alphas):
            rows.append({"question_id": q.get("question_id"), "layer": mf.layer, "alpha": alpha.tolist(),
                         **agreement(alpha, ref)})
        means = {}
        for key in ("cosine", "spearman"):
            defined = [row[key] for row in rows if row[key] is not None]
            means[f"mean_{key}"] = sum(defined) / len(defined) if defined else None
        models[mf.name] = {"path": mf.path, "layer": mf.layer, "num_visual_tokens": mf.alphas[0].numel(),
                           "conv_mode": mf.conv_mode, **means, "questions": rows}
    return models


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. teacher=checkpoints/teacher), got {text!r}")
    return name.strip(), path.strip()


def _layer_spec(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a layer index, got {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: focus maps of every --model on the same images; writes focus_maps.png and focus_maps.json."""
    parser = argparse.ArgumentParser(description="Instruction-to-vision focus maps (Align-TI Eq. 3, Fig. 8).")
    parser.add_argument("--model", action="append", required=True, type=_model_spec, metavar="NAME=PATH",
                        help="a checkpoint and its column title (repeat); the first is the reference (teacher)")
    parser.add_argument("--question-file", required=True, help="question jsonl or LLaVA JSON")
    parser.add_argument("--image-folder", default="", help="folder the image names are relative to")
    parser.add_argument("--num-images", type=int, default=6, help="questions with an image to draw (grid rows)")
    parser.add_argument("--layer", action="append", type=_layer_spec,
                        help="'auto' (irs.json beside the checkpoint, else ~3/4 depth) or an index; once for "
                             "all models or once per --model, in order (default: auto)")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: each model's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the question sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", required=True, help="where focus_maps.png and .json go")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        parser.error(f"--model names must be distinct, got {names}")
    layers = args.layer or ["auto"]
    if len(layers) not in (1, len(args.model)):
        parser.error(f"give --layer once, or once per --model ({len(args.model)}), not {len(layers)} times")
    layers = layers * len(args.model) if len(layers) == 1 else layers
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # fail before any model is loaded
        paths = [resolve_dir(path, f"--model {name}") for name, path in args.model]
    except ModelNotFoundError as err:
        parser.error(str(err))
    with_image = [q for q in load_questions(args.question_file) if q.get("image")]
    if not with_image:
        parser.error(f"--question-file {args.question_file} has no question with an image: no focus to draw")
    if len(with_image) > args.num_images:
        picked = sorted(random.Random(args.seed).sample(range(len(with_image)), args.num_images))
        with_image = [with_image[i] for i in picked]
    images = [Image.open(Path(args.image_folder) / q["image"]).convert("RGB") for q in with_image]
    focus = []
    for (name, _), path, layer in zip(args.model, paths, layers):
        focus.append(read_focus(name, path, layer, with_image, images, args.device, args.conv_mode))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = summary(focus, with_image)
    result = {"reference": names[0], "question_file": args.question_file, "image_folder": args.image_folder,
              "seed": args.seed, "num_images": len(with_image), "device": args.device,
              "questions": [{k: q.get(k) for k in ("question_id", "image", "text")} for q in with_image],
              "models": models}
    (out / "focus_maps.json").write_text(json.dumps(result, indent=2))
    columns = [(f"{mf.name}\nlayer {mf.layer}", mf.heatmaps) for mf in focus]
    focus_grid(images, columns, [question_label(q["text"]) for q in with_image]).savefig(out / "focus_maps.png")
    means = ", ".join(f"{n} cos {_fmt(m['mean_cosine'])} rho {_fmt(m['mean_spearman'])}" for n, m in models.items())
    sys.stdout.write(f"agreement with {names[0]} (mean over {len(with_image)} images): {means}; "
                     f"wrote {out}/focus_maps.png and .json\n")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
