"""`load_pretrained_model` as in LLaVA: full, projector-only (with `model_base`) and LoRA checkpoints.

The class is chosen from `config.model_type` (Auto* registration), never from the folder name. Our layout and
the released Align-TI layout both load (renaming only, see `checkpoint.py`); a weight that maps nowhere is
an error naming it, and so is a parameter that no file fills (it would otherwise stay randomly initialised).
`model_path`, `model_base` and the config's `mm_vision_tower` are local directories or hub ids (`org/name`,
`org/name@revision`), resolved through the Hugging Face cache (`llava/hub.py`).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.utils import is_flash_attn_2_available

from llava.hub import ModelNotFoundError, resolve_dir, resolve_file
from llava.model import llava_class_for

from .checkpoint import IGNORED_KEYS, KEY_RENAMES, read_state_dict, rename_key
from .multimodal_encoder.base import TOWER_ARG
from .multimodal_encoder.open_clip_encoder import is_open_clip_name
from .multimodal_encoder.siglip_encoder import load_image_processor

logger = logging.getLogger(__name__)

TOWER_PREFIX, PROJECTOR_PREFIX = "model.vision_tower.", "model.mm_projector."


def _raise_if_missing(missing, path: str, hint: str = "") -> None:
    if missing:
        names = sorted(missing)
        raise ValueError(
            f"Checkpoint {path} lacks {len(names)} weights (they would stay randomly initialised): {names[:10]}{hint}"
        )


def _raise_if_unexpected(info: dict, path: str) -> None:
    unexpected = [k for k in info["unexpected_keys"] if not any(p.search(k) for p in IGNORED_KEYS)]
    if unexpected:
        raise ValueError(f"Checkpoint {path} has weights that map to no parameter: {sorted(unexpected)[:10]}")


def _load_config(path: str) -> PretrainedConfig:
    """The checkpoint's config as its LLaVA class reads it (a plain `qwen2` config gains the LLaVA fields)."""
    return llava_class_for(AutoConfig.from_pretrained(path).model_type).config_class.from_pretrained(path)


def _from_pretrained(path: str, config: PretrainedConfig, **kwargs):
    return llava_class_for(config.model_type).from_pretrained(
        path, config=config, key_mapping=KEY_RENAMES, output_loading_info=True, **kwargs
    )


def _placement(
    device: str | torch.device, device_map: str | dict | None, torch_dtype: torch.dtype | str | None
) -> tuple[str | dict | None, torch.dtype | str]:
    """LLaVA's rules: plain "cuda" spreads over the visible GPUs, any other device pins the whole model there;
    bf16 on any CUDA device unless a dtype is given."""
    device = torch.device(device)
    is_cuda = device.type == "cuda" and torch.cuda.is_available()
    if device_map is None:
        if device.type != "cuda" or device.index is not None:
            device_map = {"": device}
        elif is_cuda:
            device_map = "auto"
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if is_cuda else torch.float32
    return device_map, torch_dtype


def _attention(attn_implementation: str | None, use_flash_attn: bool, device: str | torch.device) -> str | None:
    """LLaVA's `use_flash_attn=True` is `attn_implementation="flash_attention_2"`; check it can run before loading
    (flash_attention_2 and flex_attention: CUDA only)."""
    if use_flash_attn:
        if attn_implementation not in (None, "flash_attention_2"):
            raise ValueError(f"use_flash_attn=True contradicts attn_implementation={attn_implementation!r}")
        attn_implementation = "flash_attention_2"
    if attn_implementation == "flash_attention_2" and (
        torch.device(device).type != "cuda" or not is_flash_attn_2_available()
    ):
        raise ValueError(
            f"flash_attention_2 needs the flash-attn package (the `gpu` extra) and a CUDA device, got device "
            f"{str(device)!r} (flash-attn usable on this host: {is_flash_attn_2_available()}); use sdpa instead"
        )
    if attn_implementation == "flex_attention" and torch.device(device).type != "cuda":
        # Measured with torch 2.13 on an AVX2 CPU: the compiled CPU kernel returned wrong values (errors of 1-4, NaN)
        # for head_dim 8 and 16 at some lengths, and failed to compile once shapes turned dynamic (head_dim 32).
        raise ValueError(
            f"flex_attention needs a CUDA device, got {str(device)!r}: torch {torch.__version__}'s compiled CPU "
            "FlexAttention kernel can return wrong values silently or fail to compile mid-run; use sdpa (the same "
            "attention) on CPU"
        )
    return attn_implementation


def _resolve_tower_path(config: PretrainedConfig, *roots: str | None) -> None:
    """A relative `mm_vision_tower` that is no directory from the current one may be relative to the checkpoint
    (or its base): point the config at the first match, so building, loading and the image processor agree.
    Otherwise it stays as it is (a hub id, or a path that the tower's loader reports missing if it is needed)."""
    path = config.mm_vision_tower
    if not path or os.path.isabs(path) or os.path.isdir(path) or is_open_clip_name(path):
        return
    for root in roots:
        if root and os.path.isdir(os.path.join(root, path)):
            config.mm_vision_tower = os.path.join(root, path)
            return


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str | torch.device = "cuda",
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    use_flash_attn: bool = False,
    **kwargs,
):
    """Load a LLaVA-Qwen checkpoint -> `(tokenizer, model, image_processor, context_len)`.

    - full checkpoint: `model_path` holds config.json (`llava_qwen2` / `llava_qwen3`) and all weights;
    - projector-only: `model_path` holds config.json + `mm_projector.*` (pretrain stage), `model_base` the LLM;
    - LoRA: `model_path` holds `adapter_config.json` (+ `non_lora_trainables.bin`), `model_base` the LLM.
    Each path is a local directory or a hub id (`Qwen/Qwen2-0.5B`, `org/name@revision`): the hub snapshot in
    the Hugging Face cache (`HF_HOME`), downloaded when online and missing, the cache only with HF_HUB_OFFLINE=1.
    `model_name` is accepted for LLaVA compatibility and ignored: the checkpoint's config decides.
    `use_flash_attn=True` (LLaVA's keyword) means `attn_implementation="flash_attention_2"`.
    """
    if load_8bit or load_4bit:
        raise NotImplementedError("8/4-bit loading needs bitsandbytes on CUDA; load in bf16 instead")
    device_map, torch_dtype = _placement(device, device_map, torch_dtype)
    load_kwargs = {"dtype": torch_dtype, "device_map": device_map, **kwargs}
    attn_implementation = _attention(attn_implementation, use_flash_attn, device)
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    model_path = resolve_dir(model_path, "--model-path")
    model_base = None if model_base is None else resolve_dir(model_base, "--model-base")

    config = _load_config(model_path)
    _resolve_tower_path(config, model_path, model_base)
    is_lora = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    if is_lora or not _has_full_weights(model_path):
        if model_base is None:
            kind = "a LoRA adapter" if is_lora else "no full weights (projector-only?)"
            raise ValueError(f"{model_path} holds {kind}: pass --model-base with the base LLM checkpoint")
        model = _load_on_base(model_path, model_base, config, is_lora, load_kwargs)
        tokenizer_path = model_path if _has_tokenizer(model_path) else model_base
    else:
        model, info = _from_pretrained(model_path, config, **load_kwargs)
        _raise_if_unexpected(info, model_path)
        _raise_if_missing(info["missing_keys"], model_path)
        tokenizer_path = model_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"Tokenizer at {tokenizer_path} has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().weight.shape[0]} rows"
        )
    model.eval()
    image_processor = _image_processor(model, model_path) if model.get_vision_tower() is not None else None
    context_len = model.config.tokenizer_model_max_length or getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len


def _image_processor(model, model_path: str):
    """The checkpoint's own preprocessor_config.json, else its tower's (a directory or a hub id: that file alone),
    else the defaults for the tower's config."""
    tower = model.config.mm_vision_tower
    if os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
        return load_image_processor(model_path)
    found = None
    if tower and not is_open_clip_name(tower):
        found = resolve_file(tower, "preprocessor_config.json", TOWER_ARG, required=False)
    return load_image_processor(os.path.dirname(found) if found else model.get_vision_tower().config)


def _load_on_base(model_path: str, model_base: str, config: PretrainedConfig, is_lora: bool, load_kwargs: dict):
    """`model_base`'s weights, then the tower (only where the base has none), then `model_path`'s own weights.

    Every parameter must come from one of these: a base with the wrong shape of model, or a LoRA checkpoint
    without its `non_lora_trainables.bin`, is an error rather than a model with random layers.
    """
    model, info = _from_pretrained(model_base, config, **load_kwargs)
    _raise_if_unexpected(info, model_base)
    names = model.state_dict().keys()
    if is_lora:
        own = _non_lora_trainables(model, model_path)
        own_keys = set(own)
    else:
        own_keys = {k for k in names if k.startswith(PROJECTOR_PREFIX)}  # load_projector_weights is strict
    missing = set(info["missing_keys"]) - own_keys
    tower_keys = {k for k in names if k.startswith(TOWER_PREFIX)}
    if tower_keys and tower_keys <= set(info["missing_keys"]) and not tower_keys <= own_keys:
        _attach_vision_tower(model, config, model_base)  # a plain-LLM base: the tower comes from its own checkpoint
        missing -= tower_keys
    hint = "; a LoRA checkpoint keeps them in non_lora_trainables.bin" if is_lora else ""
    _raise_if_missing(missing, f"{model_base} (the base of {model_path})", hint)
    if is_lora:
        model.load_state_dict(own, strict=False)
        logger.info("Merging LoRA weights from %s", model_path)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, model_path).merge_and_unload()
    from .llava_arch import load_projector_weights

    load_projector_weights(model.get_model().mm_projector, model_path)
    return model


def _has_full_weights(path: str) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def _attach_vision_tower(model, config: PretrainedConfig, model_base: str) -> None:
    """Fill the tower (built from config with random weights) from `mm_vision_tower`'s own checkpoint."""
    try:
        model.get_vision_tower().load_pretrained(config.mm_vision_tower)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"Vision tower weights: the base {model_base} holds none, and {err} (set "
                                 "mm_vision_tower)") from err


def _non_lora_trainables(model, model_path: str) -> dict[str, torch.Tensor]:
    """LLaVA's LoRA layout: the non-LoRA trainables (projector...) in `non_lora_trainables.bin`, by model key."""
    extra = os.path.join(model_path, "non_lora_trainables.bin")
    if not os.path.isfile(extra):
        return {}
    state = {rename_key(k.removeprefix("base_model.model.")): v for k, v in read_state_dict(extra).items()}
    unexpected = sorted(state.keys() - model.state_dict().keys())
    if unexpected:
        raise ValueError(f"{extra} has weights that map to no parameter: {unexpected[:10]}")
    return state
