"""Typed arguments of the training entry (LLaVA's names); the distillation entry extends them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers.utils import is_torch_flex_attn_available

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# torch raises NotImplementedError for FlexAttention inputs that require grad on these devices (forward only)
NO_FLEX_BACKWARD_DEVICES = ("cpu", "mps")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "LLM (Qwen2/Qwen3) or LLaVA-Qwen checkpoint: a local dir or a hub id org/name[@rev]"})
    version: str = field(default="qwen_2", metadata={"help": "Conversation template: qwen_2, qwen_3 or plain"})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM (projector still trains)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Pretrain stage: train only the projector"})
    tune_vision_tower: bool = field(
        default=False, metadata={"help": "Also train the vision tower (the paper keeps SigLIP frozen)"}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "SigLIP checkpoint dir or hub id, or open_clip:<dir> / open_clip:<arch>:<weights> / hf-hub:<repo> (openclip extra)"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "Vision hidden state to use (-2: penultimate)"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "Projector from the pretrain stage"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear or mlp2x_gelu"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA's flag; only False is supported"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA's flag; only False is supported"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (SigLIP has no CLS token)"})
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "sdpa, eager, flash_attention_2 or flex_attention (the last two: CUDA only)"},
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required")
        if self.mm_use_im_start_end or self.mm_use_im_patch_token:
            raise ValueError("--mm_use_im_start_end / --mm_use_im_patch_token True is not supported: LLaVA-1.5's "
                             "layout (one <image> placeholder, no delimiter tokens) is the only one")
        if self.version not in ("qwen_2", "qwen_3", "plain"):
            raise ValueError(f"--version must be qwen_2, qwen_3 or plain, got {self.version!r}")
        if self.pretrain_mm_mlp_adapter and not os.path.isfile(self.pretrain_mm_mlp_adapter):
            # at argument parsing: before hours of model loading (the scripts pass PRETRAIN_DIR's projector)
            raise FileNotFoundError(
                f"--pretrain_mm_mlp_adapter {self.pretrain_mm_mlp_adapter} does not exist: pass the "
                "mm_projector.safetensors that pretrain.sh wrote into its OUTPUT_DIR (PRETRAIN_DIR in the scripts)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if self.attn_implementation == "flex_attention" and not is_torch_flex_attn_available():
            raise ValueError(
                f"--attn_implementation flex_attention: torch {torch.__version__} on this host has no FlexAttention "
                "(torch.nn.attention.flex_attention); use sdpa"
            )


def check_trainable_attention(attn_implementation: str, device: torch.device) -> None:
    """Fail before any weight loads when the model to train cannot backpropagate through its attention on `device`.

    FlexAttention's backward needs a GPU (and `load_pretrained_model` refuses flex off CUDA even for inference:
    torch's compiled CPU kernel is unreliable); without this check a CPU run would fail at the first `backward`.
    """
    if attn_implementation == "flex_attention" and device.type in NO_FLEX_BACKWARD_DEVICES:
        raise ValueError(
            f"--attn_implementation flex_attention cannot train on {device.type}: torch {torch.__version__} has no "
            "FlexAttention backward there; use sdpa or eager, or train on CUDA"
        )


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA conversation JSON (or JSONL)"})
    lazy_preprocess: bool = True
    is_multimodal: bool = False
    image_folder: str | None = field(default=None, metadata={"help": "Root of the images named in the data"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (LLaVA-1.5) or square"})
    max_bad_fraction: float = field(
        default=0.01,
        metadata={"help": "Stop before step 1 when more than this fraction of the samples is bad "
                          "(malformed, image missing or outside --image_folder; checked by stat); 1 never "
                          "stops. Bad samples met in training are skipped and replaced either way"},
    )

    def __post_init__(self):
        if self.data_path is None:
            raise ValueError("--data_path is required")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"--max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"--image_aspect_ratio must be pad or square, got {self.image_aspect_ratio!r}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "Max sequence length, visual tokens included"})
    freeze_mm_mlp_adapter: bool = False
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Separate learning rate for the projector"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "Batches of one modality each"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    remove_unused_columns: bool = False
    skip_log_limit: int = field(default=20, metadata={"help": "Skipped samples logged one by one before going quiet"})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "LLaVA scripts' flag (removed in transformers 5): sets warmup_steps to it"}
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
        if self.model_max_length < 16:
            raise ValueError(f"--model_max_length must be >= 16, got {self.model_max_length}")
        if self.lora_enable and self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
