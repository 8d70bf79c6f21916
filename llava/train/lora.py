"""LoRA finetuning in LLaVA's checkpoint layout: adapter files + `non_lora_trainables.bin` (the projector).

`llava.model.builder.load_pretrained_model(lora_dir, model_base=...)` loads it back and merges the adapter.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)
NON_LORA_FILE = "non_lora_trainables.bin"

# The LLM's linear layers (attention and MLP); the vision tower, projector and lm_head stay out of LoRA.
LORA_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, bias: str) -> nn.Module:
    """Wrap the LLM's linear layers with LoRA adapters; the projector keeps training as before."""
    from peft import LoraConfig, get_peft_model

    trainable_extra = {n for n, p in model.named_parameters() if p.requires_grad and "mm_projector" in n}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.base_model.model.named_parameters():
        if name in trainable_extra:
            param.requires_grad_(True)
    return peft_model


def save_lora(peft_model: nn.Module, out_dir: str) -> None:
    """adapter_config.json + adapter weights, the base config, and the non-LoRA trainables (LLaVA's names)."""
    peft_model.save_pretrained(out_dir)
    peft_model.base_model.model.config.save_pretrained(out_dir)
    extra = {n: p.detach().cpu().contiguous() for n, p in non_lora_trainables(peft_model).items()}
    torch.save(extra, os.path.join(out_dir, NON_LORA_FILE))


def non_lora_trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the LoRA adapters (the projector), by their PeftModel names."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def load_non_lora_trainables(model: nn.Module, checkpoint: str) -> None:
    """Load `checkpoint/non_lora_trainables.bin` into `model`; it must cover every non-LoRA trainable."""
    path = os.path.join(checkpoint, NON_LORA_FILE)
    if not os.path.isfile(path):
        logger.warning("%s has no %s (saved before checkpoints held it): the projector and other non-LoRA "
                       "trainables resume from their initial weights", checkpoint, NON_LORA_FILE)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(non_lora_trainables(model)) - set(state))
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model's non-LoRA trainables: missing {missing}, "
                         f"unexpected {sorted(unexpected)}")

