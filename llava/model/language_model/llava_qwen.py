"""LLaVA on Qwen2 and Qwen3: transformers' models plus LLaVA's mixins; only what differs is written here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel

# Keys used by the released Align-TI / LLaVA-MoD configs, read as LLaVA's.
_CONFIG_ALIASES = {"mm_image_tower": "mm_vision_tower", "image_projector_type": "mm_projector_type"}


@dataclass(repr=False)
class LlavaConfigFields:
    """LLaVA's multimodal config fields (names as in LLaVA's config.json)."""

    mm_vision_tower: str | None = None
    mm_vision_config: dict | None = None  # the SigLIP config, embedded so checkpoints are self-contained
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    image_aspect_ratio: str = "pad"
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None
    conv_template: str | None = None

    def _apply_aliases(self, kwargs: dict) -> None:
        for old, new in _CONFIG_ALIASES.items():
            value = kwargs.pop(old, None)
            if value is not None and getattr(self, new) in (None, LlavaConfigFields.__dataclass_fields__[new].default):
                setattr(self, new, value)
        kwargs.pop("mm_video_tower", None)


@strict
class LlavaQwenConfig(Qwen2Config, LlavaConfigFields):
    model_type = "llava_qwen2"

    def __post_init__(self, **kwargs):
        self._apply_aliases(kwargs)
        super().__post_init__(**kwargs)


@strict
class LlavaQwen3Config(Qwen3Config, LlavaConfigFields):
    model_type = "llava_qwen3"

    def __post_init__(self, **kwargs):
        self._apply_aliases(kwargs)
        super().__post_init__(**kwargs)


class LlavaQwenModel(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwenConfig


class LlavaQwen3Model(LlavaMetaModel, Qwen3Model):
    config_class = LlavaQwen3Config


class _LlavaCausalLMMixin(LlavaMetaForCausalLM):
    """forward/generate that accept `images` (and `token_types`, ignored by the LM) as in LLaVA."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        image_sizes=None,
        token_types: torch.Tensor | None = None,
        vision_in_step: bool = False,
        **kwargs,
    ):
        if inputs_embeds is None and input_ids is not None and (images is not None or vision_in_step):
            mm = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, None, labels, images, token_types=token_types,
                vision_in_step=vision_in_step,
            )
            input_ids, position_ids, attention_mask = None, mm.position_ids, mm.attention_mask
            inputs_embeds, labels = mm.inputs_embeds, mm.labels
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: torch.Tensor | None = None, image_sizes=None,
                 vision_in_step: bool = False, **kwargs):
        """LLaVA's generate: splice the images in and generate from `inputs_embeds`; returns new tokens only, with
        or without images (a text-only prompt is embedded the same way). Rows are left-padded for generation.

        `vision_in_step` as in `prepare_inputs_labels_for_multimodal` (a text-only batch on one rank of a
        ZeRO-3 run must still call the vision tower with the others)."""
        if inputs is None or "inputs_embeds" in kwargs:
            return super().generate(inputs, **kwargs)
        mm = self.prepare_inputs_labels_for_multimodal(
            inputs, kwargs.pop("position_ids", None), kwargs.pop("attention_mask", None), None, None, images,
            vision_in_step=vision_in_step, padding_side="left",
        )
        return super().generate(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, **kwargs)


class LlavaQwenForCausalLM(_LlavaCausalLMMixin, Qwen2ForCausalLM):
    config_class = LlavaQwenConfig

    def __init__(self, config: LlavaQwenConfig):
        super(Qwen2ForCausalLM, self).__init__(config)
        self.model = LlavaQwenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class LlavaQwen3ForCausalLM(_LlavaCausalLMMixin, Qwen3ForCausalLM):
    config_class = LlavaQwen3Config

    def __init__(self, config: LlavaQwen3Config):
        super(Qwen3ForCausalLM, self).__init__(config)
        self.model = LlavaQwen3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register("llava_qwen2", LlavaQwenConfig)
AutoConfig.register("llava_qwen3", LlavaQwen3Config)
AutoModelForCausalLM.register(LlavaQwenConfig, LlavaQwenForCausalLM)
AutoModelForCausalLM.register(LlavaQwen3Config, LlavaQwen3ForCausalLM)

# Base Qwen checkpoints (model_type qwen2/qwen3) start the pretrain stage: which LLaVA class wraps which.
LLAVA_CLASSES = {
    "qwen2": LlavaQwenForCausalLM,
    "llava_qwen2": LlavaQwenForCausalLM,
    "qwen3": LlavaQwen3ForCausalLM,
    "llava_qwen3": LlavaQwen3ForCausalLM,
}


def llava_class_for(model_type: str):
    """The LLaVA class for a checkpoint's `config.model_type` (never for a path substring)."""
    try:
        return LLAVA_CLASSES[model_type]
    except KeyError:
        raise ValueError(f"Unsupported model_type {model_type!r}; known: {sorted(LLAVA_CLASSES)}") from None
