"""`load_pretrained_model` as in LLaVA: full, projector-only (with `model_base`) and LoRA checkpoints.

The class is chosen from `config.model_type` (Auto* registration), never from the folder name. Our layout and
the released Align-TI layout both load (renaming only, see `checkpoint.py`); a weight that maps nowhere is
an error naming it.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoTokenizer

from llava.model import llava_class_for  # noqa: F401  (registers the LLaVA-Qwen classes)

from .checkpoint import IGNORED_KEYS, KEY_RENAMES, read_state_dict, rename_key
from .multimodal_encoder.open_clip_encoder import is_open_clip_name
from .multimodal_encoder.siglip_encoder import load_image_processor

logger = logging.getLogger(__name__)


def _check_loading_info(info: dict, path: str) -> None:
    unexpected = [k for k in info.get("unexpected_keys", ()) if not any(p.search(k) for p in IGNORED_KEYS)]
    if unexpected:
        raise ValueError(f"Checkpoint {path} has weights that map to no parameter: {sorted(unexpected)[:10]}")
    missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight"]
    if missing:
        raise ValueError(f"Checkpoint {path} lacks weights for: {sorted(missing)[:10]}")


def _from_pretrained(path: str, config=None, **kwargs):
    cls = llava_class_for((config or AutoConfig.from_pretrained(path)).model_type)
    model, info = cls.from_pretrained(
        path, config=config, key_mapping=KEY_RENAMES, output_loading_info=True, **kwargs
    )
    return model, info


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str = "cuda",
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    **kwargs,
):
    """Load a LLaVA-Qwen checkpoint -> `(tokenizer, model, image_processor, context_len)`.

    - full checkpoint: `model_path` holds config.json (`llava_qwen2` / `llava_qwen3`) and all weights;
    - projector-only: `model_path` holds config.json + `mm_projector.*` (pretrain stage), `model_base` the LLM;
    - LoRA: `model_path` holds `adapter_config.json` (+ `non_lora_trainables.bin`), `model_base` the LLM.
    `model_name` is accepted for LLaVA compatibility and ignored: the checkpoint's config decides.
    """
    if load_8bit or load_4bit:
        raise NotImplementedError("8/4-bit loading needs bitsandbytes on CUDA; load in bf16 instead")
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"--model-path {model_path!r} is not a local directory")
    if device != "cuda" and device_map is None:
        device_map = {"": device}
    elif device == "cuda" and device_map is None and torch.cuda.is_available():
        device_map = "auto"
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_available() else torch.float32
    load_kwargs = {"dtype": torch_dtype, "device_map": device_map, **kwargs}
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation

    is_lora = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    if is_lora or not _has_full_weights(model_path):
        if model_base is None:
            kind = "a LoRA adapter" if is_lora else "no full weights (projector-only?)"
            raise ValueError(f"{model_path} holds {kind}: pass --model-base with the base LLM checkpoint")
        config = AutoConfig.from_pretrained(model_path)
        model, _ = _from_pretrained(model_base, config=config, **load_kwargs)
        _attach_vision_tower(model, config)
        if is_lora:
            model = _merge_lora(model, model_path)
        else:
            from .llava_arch import load_projector_weights

            load_projector_weights(model.get_model().mm_projector, model_path)
        tokenizer_path = model_path if _has_tokenizer(model_path) else model_base
    else:
        model, info = _from_pretrained(model_path, **load_kwargs)
        _check_loading_info(info, model_path)
        tokenizer_path = model_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"Tokenizer at {tokenizer_path} has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().weight.shape[0]} rows"
        )
    model.eval()
    image_processor = None
    if model.get_vision_tower() is not None:
        for source in (model_path, model.config.mm_vision_tower):
            if source and os.path.isfile(os.path.join(source, "preprocessor_config.json")):
                image_processor = load_image_processor(source)
                break
        else:
            image_processor = load_image_processor(model.get_vision_tower().config)
    context_len = model.config.tokenizer_model_max_length or getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len


def _has_full_weights(path: str) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def _attach_vision_tower(model, config) -> None:
    """A base-LLM load builds the tower from config on meta/empty weights: fill it from its own checkpoint."""
    tower = model.get_vision_tower()
    if tower is None:
        return
    path = config.mm_vision_tower
    if not (path and (os.path.isdir(path) or is_open_clip_name(path))):  # open_clip names check their own files
        raise FileNotFoundError(f"Vision tower weights: {path!r} is not a local directory (set mm_vision_tower)")
    tower.load_pretrained(path)


def _merge_lora(model, model_path: str):
    """LLaVA's LoRA layout: non-LoRA trainables (projector...) in `non_lora_trainables.bin`, then the adapter."""
    from peft import PeftModel

    extra = os.path.join(model_path, "non_lora_trainables.bin")
    if os.path.isfile(extra):
        state = {rename_key(k.removeprefix("base_model.model.")): v for k, v in read_state_dict(extra).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{extra} has weights that map to no parameter: {unexpected[:10]}")
    logger.info("Merging LoRA weights from %s", model_path)
    return PeftModel.from_pretrained(model, model_path).merge_and_unload()
