"""Instruction-Relevance Score (IRS, Definition 3.1, Eq. 4) and the principled choice of the IVA layer.

    IRS(l) = 1 - E_{x1, x2} [ cos(alpha^(l)(x1), alpha^(l)(x2)) ]

Design choices:
- A layer whose instruction->vision importance barely changes between inputs is instruction-agnostic
  (low IRS); IVA reads alpha from the layer with the highest IRS (section 3.1, Fig. 4, Tab. 7).
- Pairs: Eq. 4 is an expectation over i.i.d. pairs of inputs, so `iid` (the default) pairs random samples
  (disjoint, seeded; as many as the data allows up to the count asked, the paper's 1K). `same_image` is the
  controlled variant: different instructions on one image (Appendix B.5's "two different queries"), so that
  only the instruction changes; LLaVA records hold many turns on one image, so `single_turn_records` splits
  them into one record per turn first, and data with one question per image falls back to random pairs of
  different images. The CLI reports both curves by default (`--pairs both`); the first one picks the layer.
- One forward per batch captures every layer at once (head-averaged rows, see `capture_attention`).
- Pairs where either alpha is all zero (no instruction token) carry no direction and are skipped.

CLI: python -m aligntI_patch.irs --model-path P --data-path D.json --image-folder F [--num-pairs 1000]
     [--pairs both|iid|same_image] [--batch-size 8] [--output-dir DIR] [--conv-mode qwen_2]
     ->  DIR/irs.json, DIR/irs.png
(model via `llava.model.builder.load_pretrained_model`, data via `llava.train.data`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from aligntI_patch.attention_hook import decoder_layers
from aligntI_patch.iva import importance_per_layer
from llava.constants import DEFAULT_IMAGE_TOKEN

__all__ = [
    "instruction_relevance_score",
    "irs_per_layer",
    "pair_samples",
    "select_iva_layer",
    "single_turn_records",
]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
PAIRINGS = ("iid", "same_image")
PAPER_NUM_PAIRS = 1000  # "1K" input pairs (section 3.1)


def _pair_cosines(alpha_a: torch.Tensor, alpha_b: torch.Tensor) -> torch.Tensor:
    """cos(alpha_a_i, alpha_b_i) for the pairs where neither vector is all zero: (P_kept,)."""
    if alpha_a.shape != alpha_b.shape or alpha_a.dim() != 2:
        raise ValueError(
            f"paired alphas must both be (P, N_v), got {tuple(alpha_a.shape)} and {tuple(alpha_b.shape)}"
        )
    a, b = alpha_a.float(), alpha_b.float()
    keep = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)  # (P,)
    return F.cosine_similarity(a[keep], b[keep], dim=1)


def instruction_relevance_score(alpha_a: torch.Tensor, alpha_b: torch.Tensor) -> float:
    """Eq. 4: 1 - mean_i cos(alpha_a[i], alpha_b[i]) over P paired inputs; alpha_* are (P, N_v).

    Alpha is non-negative, so the score lies in [0, 1]. Pairs with an all-zero alpha are skipped.
    """
    cos = _pair_cosines(alpha_a, alpha_b)
    if cos.numel() == 0:
        raise ValueError("no pair with non-zero alpha on both sides (do the inputs have instruction tokens?)")
    return float(1.0 - cos.mean())


@torch.no_grad()
def irs_per_layer(
    model: nn.Module,
    batches_a: Sequence[Batch],
    batches_b: Sequence[Batch],
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> list[float]:
    """IRS(l) (Eq. 4) for each of `layers` (default all), averaged over every pair of samples.

    Row r of batches_a[i] is paired with row r of batches_b[i]. Each batch costs one forward that
    captures all layers at once.
    """
    if len(batches_a) != len(batches_b):
        raise ValueError(f"{len(batches_a)} batches on side a but {len(batches_b)} on side b")
    layers = list(range(len(decoder_layers(model)))) if layers is None else list(layers)
    param = next(model.parameters())
    cos_sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    for batch_a, batch_b in tqdm(list(zip(batches_a, batches_b)), desc="IRS", disable=not progress):
        alpha_a = importance_per_layer(model, _to_model(batch_a, param), layers)  # layer -> (B, N_v)
        alpha_b = importance_per_layer(model, _to_model(batch_b, param), layers)
        for i, layer in enumerate(layers):
            cos = _pair_cosines(alpha_a[layer], alpha_b[layer])
            cos_sums[i] += cos.double().sum().cpu()
            counts[i] += cos.numel()
    if bool((counts == 0).any()):
        raise ValueError("no pair with non-zero alpha on both sides (do the inputs have instruction tokens?)")
    return (1.0 - cos_sums / counts).tolist()


def _to_model(batch: Batch, param: torch.Tensor) -> dict[str, Any]:
    """Batch tensors on the model's device; floating ones (images) in its dtype."""
    return {
        k: (
            v.to(param.device, param.dtype if v.is_floating_point() else None)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in batch.items()
    }


def _instruction_text(record: Mapping[str, Any]) -> str:
    """The first human turn without the image placeholder: what makes two queries on one image differ."""
    turns = [t for t in record.get("conversations", []) if t.get("from") == "human"]
    return turns[0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip() if turns else ""


def single_turn_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Split multi-turn LLaVA records into one record per (human, gpt) turn, each with the image token.

    LLaVA's instruction data asks several questions about one image in one record; as single turns they
    become the same-image, different-instruction pairs that IRS wants. Records without an image are kept
    as they are.
    """
    out: list[dict[str, Any]] = []
    for record in records:
        conv = record.get("conversations", [])
        if "image" not in record or len(conv) <= 2:
            out.append(dict(record))
            continue
        for turn in range(0, len(conv) - 1, 2):
            human, gpt = conv[turn], conv[turn + 1]
            text = human["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            out.append(
                {
                    **record,
                    "id": f"{record.get('id', '')}_turn{turn // 2}",
                    "conversations": [
                        {"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{text}"},
                        dict(gpt),
                    ],
                }
            )
    return out


def pair_samples(
    records: Sequence[Mapping[str, Any]], num_pairs: int | None = None, seed: int = 0, pairing: str = "iid"
) -> list[tuple[int, int]]:
    """Index pairs (i, j) of records for Eq. 4's expectation.

    iid: random disjoint pairs of records (one seeded shuffle, consecutive records paired).
    same_image: same image with different instructions when the data has any such pair (disjoint pairs inside
    each image group, groups shuffled); otherwise random disjoint pairs of records with different images.
    Records without an image are never paired. Deterministic for a given seed.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"IRS pairing must be one of {PAIRINGS}, got {pairing!r}")
    rng = random.Random(seed)
    if pairing == "iid":
        pool = [i for i, record in enumerate(records) if "image" in record]
        rng.shuffle(pool)
        pairs = list(zip(pool[0::2], pool[1::2]))
        logger.info("IRS pairs: %d random (i.i.d.) pairs of samples", len(pairs))
        return pairs[:num_pairs] if num_pairs is not None else pairs
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        if "image" in record:
            by_image[str(record["image"])].append(i)
    same: list[tuple[int, int]] = []
    for members in by_image.values():
        # One record per distinct instruction, then disjoint pairs among them.
        distinct = list({_instruction_text(records[i]): i for i in members}.values())
        rng.shuffle(distinct)
        same.extend(zip(distinct[0::2], distinct[1::2]))
    if same:
        logger.info("IRS pairs: %d same-image pairs with different instructions", len(same))
        rng.shuffle(same)
        return same[:num_pairs] if num_pairs is not None else same
    with_image = [i for members in by_image.values() for i in members]
    rng.shuffle(with_image)
    pairs: list[tuple[int, int]] = []
    pool = with_image
    while len(pool) >= 2 and (num_pairs is None or len(pairs) < num_pairs):
        i = pool.pop()
        partner = next(
            (k for k in range(len(pool) - 1, -1, -1) if records[pool[k]]["image"] != records[i]["image"]),
            None,
        )
        if partner is None:
            break
        pairs.append((i, pool.pop(partner)))
    logger.info("IRS pairs: no image has two instructions; %d random pairs of different images", len(pairs))
    return pairs


def select_iva_layer(
    spec: str | int,
    model: nn.Module,
    irs_path: str | Path | None = None,
    paired_batches: tuple[Sequence[Batch], Sequence[Batch]] | None = None,
    name: str = "the model",
) -> int:
    """The IVA layer: an int (or digit string) fixes it (Tab. 7); "auto" takes IRS's argmax (section 3.1).

    "auto" reads `best_layer` from `irs_path` (an irs.json written by this module's CLI) when that file
    exists, else computes IRS on `paired_batches` (a small subset: (batches_a, batches_b)). IRS ranks the
    layers of the model whose attention it reads, so `model` is that model (the IVA source) and an irs.json
    that scores layers it does not have is an error; `name` says which model in the messages.
    """
    num_layers = len(decoder_layers(model))
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        if not 0 <= spec < num_layers:
            raise ValueError(f"IVA layer {spec} out of range: {name} has layers 0..{num_layers - 1}")
        return spec
    if spec != "auto":
        raise ValueError(f"IVA layer must be 'auto' or a layer index, got {spec!r}")
    if irs_path is not None and Path(irs_path).is_file():
        saved = json.loads(Path(irs_path).read_text())
        best = int(saved["best_layer"])
        if not 0 <= best < num_layers:
            raise ValueError(
                f"{irs_path}: best_layer {best} out of range for {name}, which has {num_layers} layers"
            )
        # A shallower model's best layer can fall in range by chance: the scored layers tell the depth.
        deepest = max(saved.get("layers", [best]))
        if deepest >= num_layers:
            raise ValueError(
                f"{irs_path} scores layers up to {deepest} but {name} has {num_layers}: it was computed on "
                "another model (IRS must come from the model that supplies the attention)"
            )
        logger.info("IVA layer %d read from %s", best, irs_path)
        return best
    if paired_batches is None:
        raise ValueError("IVA layer 'auto' needs an irs.json (irs_path) or paired batches to compute IRS on")
    scores = irs_per_layer(model, *paired_batches)
    best = max(range(num_layers), key=scores.__getitem__)
    logger.info("IVA layer %d chosen by IRS (%.4f)", best, scores[best])
    return best


def write_irs(output_dir: str | Path, layers: Sequence[int], scores: Sequence[float], num_pairs: int,
              pairing: str = "iid", other_curves: Mapping[str, tuple[Sequence[float], int]] | None = None) -> int:
    """Write irs.json and irs.png (IRS vs layer, best layer marked) to output_dir; returns the best layer.

    `scores` (from `pairing`, `num_pairs` pairs) choose the layer; `other_curves` (pairing -> (scores, number of
    pairs)) are reported beside them in both files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    best_i = max(range(len(scores)), key=scores.__getitem__)
    best = int(layers[best_i])
    result = {
        "layers": list(map(int, layers)),
        "irs": list(map(float, scores)),
        "best_layer": best,
        "num_pairs": num_pairs,
        "pairing": pairing,
    }
    curves = {pairing: (scores, num_pairs), **(other_curves or {})}
    if other_curves:
        result["curves"] = {k: {"irs": list(map(float, v)), "num_pairs": n} for k, (v, n) in curves.items()}
    (output_dir / "irs.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (values, n) in curves.items():
        ax.plot(layers, values, marker="o", label=f"{name} pairs ({n})")
    ax.axvline(best, color="tab:red", linestyle="--", label=f"best layer {best} ({pairing})")
    ax.set_xlabel("layer")
    ax.set_ylabel("IRS (Eq. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "irs.png", dpi=120)
    plt.close(fig)
    return best


def load_paired_batches(
    tokenizer: Any,
    image_processor: Any,
    model: nn.Module,
    data_path: str,
    image_folder: str,
    conv_mode: str,
    num_pairs: int,
    batch_size: int,
    seed: int = 0,
    context_len: int = 2048,
    pairing: str = "iid",
) -> tuple[list[Batch], list[Batch], int]:
    """Collated (batches_a, batches_b, number of pairs) from a LLaVA JSON file, through our own data pipeline.

    Records are split into single turns (`single_turn_records`) and paired (`pair_samples`); a pair with a
    bad sample on either side (missing image, too long) is dropped, never replaced, so pairs stay pairs.
    Batches are built up front: about 1.7 MB per 384 px image, so 1000 pairs hold ~3.5 GB of pixels.
    """
    from llava.train.data import BadSample, DataCollatorForSupervisedDataset, LazySupervisedDataset

    dataset = LazySupervisedDataset(
        data_path,
        tokenizer,
        image_processor=image_processor,
        image_folder=image_folder,
        template=conv_mode,
        model_max_length=context_len,
        num_image_tokens=model.num_image_tokens,
        image_aspect_ratio=getattr(model.config, "image_aspect_ratio", "pad"),
    )
    dataset.records = single_turn_records(dataset.records)
    collate = DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)
    items_a, items_b = [], []
    for i, j in pair_samples(dataset.records, seed=seed, pairing=pairing):  # all: bad pairs are dropped below
        if len(items_a) == num_pairs:
            break
        try:
            item_i, item_j = dataset.load(i), dataset.load(j)
        except BadSample as err:
            logger.warning("IRS: dropping pair (%d, %d): %s", i, j, err)
            continue
        items_a.append(item_i)
        items_b.append(item_j)
    if not items_a:
        raise ValueError(f"{data_path}: no usable pair of samples with images")
    starts = range(0, len(items_a), batch_size)
    batches_a = [collate(items_a[s : s + batch_size]) for s in starts]
    batches_b = [collate(items_b[s : s + batch_size]) for s in starts]
    return batches_a, batches_b, len(items_a)


def irs_curves(model: nn.Module, tokenizer, image_processor, context_len: int, data_path: str, image_folder: str,
               conv_mode: str, num_pairs: int, batch_size: int, seed: int,
               pairings: Sequence[str] = PAIRINGS) -> dict[str, tuple[list[float], int]]:
    """{pairing: (IRS of every decoder layer, pairs used)} of a loaded LLaVA model on the data's pairs (`seed`
    draws them)."""
    layers = list(range(len(decoder_layers(model))))
    curves = {}
    for pairing in pairings:
        batches_a, batches_b, used = load_paired_batches(
            tokenizer, image_processor, model, data_path, image_folder, conv_mode, num_pairs, batch_size, seed,
            context_len, pairing,
        )  # fmt: skip
        curves[pairing] = (irs_per_layer(model, batches_a, batches_b, layers, progress=True), used)
    return curves


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: IRS per layer of a LLaVA checkpoint on paired inputs; writes irs.json and irs.png."""
    parser = argparse.ArgumentParser(description="Instruction-Relevance Score per layer (Align-TI Eq. 4).")
    parser.add_argument(
        "--model-path", required=True, help="checkpoint for llava.model.builder.load_pretrained_model"
    )
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    parser.add_argument("--data-path", required=True, help="LLaVA conversation JSON")
    parser.add_argument("--image-folder", required=True, help="folder the JSON's image paths are relative to")
    parser.add_argument("--num-pairs", type=int, default=PAPER_NUM_PAIRS,
                        help="input pairs to average over, at most (the paper's 1000; fewer if the data has fewer)")
    parser.add_argument("--pairs", choices=(*PAIRINGS, "both"), default="both",
                        help="iid (Eq. 4's random pairs), same_image (one image, two instructions), or both curves "
                             "(the layer is chosen from iid)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    parser.add_argument("--output-dir", default=".", help="where irs.json and irs.png go")
    parser.add_argument(
        "--conv-mode", default=None, help="conversation template (default: the checkpoint's, else qwen_2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for pairing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, context_len = load_pretrained_model(args.model_path, args.model_base)
    model.eval()
    conv_mode = args.conv_mode or getattr(model.config, "conv_template", None) or "qwen_2"
    pairings = PAIRINGS if args.pairs == "both" else (args.pairs,)
    curves = irs_curves(model, tokenizer, image_processor, context_len, args.data_path, args.image_folder,
                        conv_mode, args.num_pairs, args.batch_size, args.seed, pairings)
    layers = list(range(len(decoder_layers(model))))
    (first, (scores, num_pairs)), *others = curves.items()
    best = write_irs(args.output_dir, layers, scores, num_pairs, first, dict(others))
    logger.info("best layer %d (IRS %.4f); wrote %s", best, scores[best], Path(args.output_dir) / "irs.json")


if __name__ == "__main__":
    main()
