"""Small, fast artefacts of the tiny world for tests: a mini world, its tokenizer, untrained checkpoints.

Everything is built from configs and generated data (no download), cached under one root directory.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM, Qwen3ForCausalLM, SiglipVisionConfig

from llava.model import LlavaQwen3Config, LlavaQwen3ForCausalLM, LlavaQwenConfig, LlavaQwenForCausalLM
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.configs import padded_vocab
from llava.tiny.tokenizer import build_tiny_tokenizer
from llava.tiny.world import generate_world

MINI_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8, "vision_use_head": False}  # N_v = 16


def mini_world(root: Path) -> Path:
    """A 40-image world with 32 px images (fast to render and to encode)."""
    out = Path(root) / "world"
    generate_world(out, n_train=40, n_val=14, n_test=14, image_size=32)
    return out


def mini_tokenizer(root: Path):
    return build_tiny_tokenizer(mini_world(root), Path(root) / "tokenizer", vocab_size=400)


def mini_llava(tokenizer, backbone: str = "qwen2", role: str = "student", seed: int = 0, num_layers: int = 2,
               hidden: int = 32, **overrides):
    """An untrained LLaVA-Qwen model with a tiny SigLIP tower (N_v = 16), fp32, eval mode."""
    torch.manual_seed(seed)
    cls, cfg_cls = (LlavaQwenForCausalLM, LlavaQwenConfig) if backbone == "qwen2" else (
        LlavaQwen3ForCausalLM, LlavaQwen3Config)
    extra = {"head_dim": hidden // 4} if backbone == "qwen3" else {}
    vision = SiglipVisionConfig(**MINI_VISION)
    fields = dict(
        vocab_size=padded_vocab(len(tokenizer), role), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        mm_vision_tower="mini-siglip", mm_vision_config=vision.to_dict(), mm_hidden_size=vision.hidden_size,
        tokenizer_model_max_length=256, conv_template="qwen_2" if backbone == "qwen2" else "qwen_3", **extra,
    )
    config = cfg_cls(**{**fields, **overrides})
    return cls(config).eval()


def save_mini_checkpoint(model, tokenizer, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    load_image_processor(model.get_vision_tower().config).save_pretrained(out_dir)
    return out_dir


def save_projector_only(model, tokenizer, root: Path) -> tuple[Path, Path]:
    """LLaVA's pretrain-stage layout: `root/base` (the LLM alone) and `root/proj` (config + mm_projector)."""
    base, proj = Path(root) / "base", Path(root) / "proj"
    llm_cls = Qwen2ForCausalLM if isinstance(model, LlavaQwenForCausalLM) else Qwen3ForCausalLM
    llm = llm_cls(model.config)
    llm.load_state_dict({k: v for k, v in model.state_dict().items() if "vision" not in k and "projector" not in k})
    llm.save_pretrained(base)
    tokenizer.save_pretrained(base)
    proj.mkdir(parents=True)
    state = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
    save_file(state, proj / "mm_projector.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(proj)
    return base, proj


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def free_port() -> str:
    """A TCP port free right now, for torchrun's `--master_port` (fixed ports collide across concurrent runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
