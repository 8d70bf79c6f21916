"""LLaVA-Qwen models (importing this registers them with AutoConfig / AutoModelForCausalLM)."""

from .language_model.llava_qwen import (
    LlavaQwen3Config,
    LlavaQwen3ForCausalLM,
    LlavaQwenConfig,
    LlavaQwenForCausalLM,
    llava_class_for,
)
from .llava_arch import MultimodalInputs

__all__ = [
    "LlavaQwenConfig",
    "LlavaQwenForCausalLM",
    "LlavaQwen3Config",
    "LlavaQwen3ForCausalLM",
    "MultimodalInputs",
    "llava_class_for",
]
