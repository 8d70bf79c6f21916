"""Pretrain the tiny SigLIP tower, the stand-in for a pretrained vision encoder (none can be downloaded).

The paper's students and teachers all start from a pretrained SigLIP and keep it frozen. The tiny world has
no such tower, so one is trained here, before any LLaVA stage, on the world's scene annotations: the tower
sees 3x3 patches aligned with the scene's 3x3 cells, and one linear head per attribute reads the cell's
object colour, shape and size and its text from the patch token at `mm_vision_select_layer` (the features
LLaVA uses). Training an LLM and a tower jointly from scratch on captions alone learns no vision in CPU
minutes (measured: the tiny teacher stayed at chance on every family); this step fixes that.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import SiglipVisionModel

from llava.mm_utils import process_images
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.scenes import COLORS, SHAPES, SIZES, WORDS

logger = logging.getLogger(__name__)
TEXTS = (*WORDS, *map(str, range(100)))
HEADS = {"color": ("none", *COLORS), "shape": ("none", *SHAPES), "size": ("none", *SIZES), "text": ("none", *TEXTS)}


def cell_targets(scene: dict, grid: int = 3) -> dict[str, torch.Tensor]:
    """Per-cell class indices (row-major, grid*grid cells) for every head; 0 = empty."""
    targets = {name: torch.zeros(grid * grid, dtype=torch.long) for name in HEADS}
    for obj in scene["objects"]:
        cell = obj["row"] * grid + obj["col"]
        for name in ("color", "shape", "size"):
            targets[name][cell] = HEADS[name].index(obj[name])
    if scene.get("text") is not None:
        row, col = scene["text_cell"]
        targets["text"][row * grid + col] = HEADS["text"].index(scene["text"])
    return targets


def pretrain_vision_tower(world_dir: Path, init_dir: Path, out_dir: Path, epochs: int = 6, batch_size: int = 64,
                          lr: float = 2e-3, select_layer: int = -2, seed: int = 0) -> Path:
    """Train the tower at `init_dir` on the train images' cell attributes; save it (and its processor) to out_dir."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    torch.manual_seed(seed)
    tower = SiglipVisionModel.from_pretrained(init_dir, dtype=torch.float32)
    processor = load_image_processor(str(init_dir))
    grid = tower.config.image_size // tower.config.patch_size
    if grid != 3:
        raise ValueError(f"the tiny tower must see a 3x3 patch grid (image_size / patch_size), got {grid}")
    scenes = json.loads((Path(world_dir) / "scenes.json").read_text())
    names = sorted(n for n in scenes if n.startswith("train_"))
    images = process_images([Image.open(Path(world_dir) / "images" / n) for n in names], processor)  # (N,3,H,W)
    targets = {k: torch.stack([cell_targets(scenes[n])[k] for n in names]) for k in HEADS}  # (N, 9) each
    heads = nn.ModuleDict({k: nn.Linear(tower.config.hidden_size, len(v)) for k, v in HEADS.items()})
    opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    order = list(range(len(names)))
    steps = epochs * (len(order) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    rng = random.Random(seed)
    bar = tqdm(total=steps, desc="tiny SigLIP pretraining")
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            feats = tower(images[idx], output_hidden_states=True).hidden_states[select_layer]  # (b, 9, D)
            loss = sum(nn.functional.cross_entropy(heads[k](feats).flatten(0, 1), targets[k][idx].flatten())
                       for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    tmp = Path(str(out_dir) + ".tmp")
    tower.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir
