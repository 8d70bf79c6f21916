"""Checkpoint files and key layouts.

Our layout is LLaVA's: `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`.
The released Align-TI / LLaVA-MoD checkpoints use `model.image_tower.*` and
`model.mm_projector.image_spatial_proj.*`; they are mapped onto ours by renaming only.
"""

from __future__ import annotations

import json
import os
import re

import torch

# (pattern, replacement) applied in order; also given to `from_pretrained(key_mapping=...)`.
KEY_RENAMES: dict[str, str] = {
    r"^model\.image_tower\.": "model.vision_tower.",
    r"mm_projector\.image_spatial_proj\.": "mm_projector.",
    # transformers 4.x nested SiglipVisionModel under `vision_model`; 5.x flattened it.
    r"(vision_tower\.vision_tower\.)vision_model\.": r"\1",
}

# Checkpoint keys that may be present but are unused by design (SigLIP's pooling head: LLaVA takes patch tokens).
IGNORED_KEYS = (re.compile(r"vision_tower\.vision_tower\.head\."),)


def rename_key(key: str) -> str:
    for pattern, repl in KEY_RENAMES.items():
        key = re.sub(pattern, repl, key)
    return key


def weight_files(path: str) -> list[str]:
    """Weight files of a checkpoint directory (safetensors first, sharded or not), or the file itself."""
    if os.path.isfile(path):
        return [path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "mm_projector.safetensors", "mm_projector.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise FileNotFoundError(f"No weights (*.safetensors or *.bin) found in {path}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read all tensors of a checkpoint; `.bin` only through `torch.load(weights_only=True)`."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(file))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state
