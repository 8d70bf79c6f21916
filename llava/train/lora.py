"""LoRA finetuning in LLaVA's checkpoint layout: adapter files + `non_lora_trainables.bin` (the projector).

`llava.model.builder.load_pretrained_model(lora_dir, model_base=...)` loads it back and merges the adapter.
"""

from __future__ import annotations

import os

import torch
from torch import nn

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
    extra = {
        n: p.detach().cpu().contiguous()
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" not in n
    }
    torch.save(extra, os.path.join(out_dir, "non_lora_trainables.bin"))
