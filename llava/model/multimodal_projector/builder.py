"""Vision-language projector (LLaVA's `mm_projector`): `linear` or `mlpNx_gelu` (the paper's `mlp2x_gelu`)."""

import re

from torch import nn


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Map vision features [..., mm_hidden_size] to LLM embeddings [..., hidden_size].

    `mlp2x_gelu` is Linear-GELU-Linear, so its weights are `0.*` and `2.*` as in LLaVA checkpoints.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        return nn.Identity()
    raise ValueError(
        f"Unknown mm_projector_type {projector_type!r}; known: 'linear', 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu'), 'identity'"
    )
