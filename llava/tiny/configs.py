"""Tiny teacher / student / SigLIP configs of the built-in world, and their freshly initialised checkpoints.

Sizes are chosen so that the teacher trains on 2 CPU cores in minutes and is clearly stronger than the
student trained by SFT alone (distillation needs room to show); it learns the families answered by reading
one visual token, not the yes/no and lettered-choice ones (measured in docs/tiny_world.md). The teacher's lm_head
has 64 more rows than the student's, like Qwen2-7B (152064) vs Qwen2-0.5B (151936), so vocabulary slicing
is exercised on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava.model.multimodal_encoder.siglip_encoder import load_image_processor

LLM_SIZES = {
    "teacher": {
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    },
    "student": {
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
VISION = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    # 63 = 3 x 21: each patch is one cell of the world's 3x3 scene grid (64 px images are resized by 1 px),
    # which lets a tower trained from scratch in minutes see one object per visual token (N_v = 9).
    "image_size": 63,
    "patch_size": 21,
    "vision_use_head": False,
}


def padded_vocab(n_tokens: int, role: str) -> int:
    """lm_head rows: the tokenizer size rounded up to 64, plus 64 for the teacher (Qwen2-7B-like padding)."""
    rows = (n_tokens + 63) // 64 * 64
    return rows + 64 if role == "teacher" else rows


def llm_config(role: str, backbone: str, tokenizer) -> Qwen2Config | Qwen3Config:
    size = dict(LLM_SIZES[role])
    common = dict(
        vocab_size=padded_vocab(len(tokenizer), role),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **size,
    )
    if backbone == "qwen2":
        return Qwen2Config(**common)
    if backbone == "qwen3":
        # Qwen3Config's default head_dim is 128 whatever the hidden size: set it for tiny models.
        return Qwen3Config(head_dim=size["hidden_size"] // size["num_attention_heads"], **common)
    raise ValueError(f"backbone must be qwen2 or qwen3, got {backbone!r}")


def write_base_llm(out_dir: Path, role: str, backbone: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen LLM + the tiny tokenizer: the stand-in for a hub base model."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if backbone == "qwen2" else Qwen3ForCausalLM
    model = cls(llm_config(role, backbone, tokenizer))
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)  # model.safetensors last: its presence marks completion
    return out_dir


def write_base_siglip(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny SigLIP vision tower (trained in the teacher's first stage)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    torch.manual_seed(seed)
    config = SiglipVisionConfig(**VISION)
    load_image_processor(config).save_pretrained(out_dir)
    SiglipVisionModel(config).save_pretrained(out_dir)
    return out_dir
