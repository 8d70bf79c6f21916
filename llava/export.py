"""Export a LLaVA-Qwen checkpoint to transformers' own LLaVA format, loadable without this package.

    python -m llava.export --model-path CKPT --output-dir OUT [--model-base BASE] [--version qwen_2]

OUT then holds a `LlavaForConditionalGeneration` checkpoint (safetensors, config in the source dtype) and its
`LlavaProcessor` (image processor, tokenizer with an `<image>` token, chat template), for
`AutoModelForImageTextToText.from_pretrained(OUT)` / `AutoProcessor.from_pretrained(OUT)` (docs/export.md).

Design choices
- Our model is transformers' LLaVA in all but names: a SigLIP tower whose hidden state `mm_vision_select_layer`
  is kept with every patch (SigLIP has no CLS: `vision_feature_select_strategy="full"`), `mlp2x_gelu` =
  `linear_1`-GELU-`linear_2`, a Qwen2/Qwen3 decoder. Weights move submodule by submodule (tower -> tower,
  projector -> projector, decoder -> `language_model`, lm_head -> lm_head) with strict `load_state_dict`, so a
  weight that maps nowhere, or a parameter left unfilled, is an error; only the projector's layer names are
  written here (`0`/`2` -> `linear_1`/`linear_2`), the format fixes them.
- No weight is copied: the transformers model is built on the meta device and takes our tensors (`assign=True`).
- The layout: ours keeps one IMAGE_TOKEN_INDEX (-200) per image and expands it to N_v positions when splicing;
  theirs is a real `<image>` token that the processor repeats `image_seq_length` (= N_v) times. Both place the
  N_v projected features at those positions in order, so the sequences, position ids and logits are the same.
- `<image>` becomes a special token with the first free id. Qwen checkpoints pad their lm_head beyond the
  tokenizer (151936 rows for ~151650 tokens), so it takes one of those rows and nothing changes; only a
  checkpoint with no spare row grows by one row (embedding: the mean row, never read since image features
  replace it; lm_head: zeros), and `generation_config.suppress_tokens` keeps generation from choosing it.
- Image processing: `LlavaImageProcessorPil` with `do_pad` for `image_aspect_ratio="pad"` (the same square in the
  image processor's mean colour as `mm_utils.expand2square`), then the tower's SigLIP resize/rescale/normalise,
  no crop.
- Chat template: a Jinja rendering of our conversation template (`llava.conversation`, chosen as for
  evaluation: `--version`, else the checkpoint's `conv_template`, else its Qwen family), with a message's images
  first as `<image>\\n` then its text, which is where our prompts put the image.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AddedToken,
    AutoConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
)

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, get_conv_template
from llava.generation import default_conv_mode, stop_token_ids
from llava.model.language_model.llava_qwen import LlavaConfigFields
from llava.model.multimodal_encoder.open_clip_encoder import is_open_clip_name

logger = logging.getLogger(__name__)

# Our model_type -> the transformers text config it wraps (LLaVA's fields removed).
TEXT_MODEL_TYPES = {"llava_qwen2": "qwen2", "llava_qwen3": "qwen3"}
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)  # transformers' LlavaMultiModalProjector is linear_1 - act - linear_2
ASPECT_RATIOS = {"pad": True, "square": False, "resize": False}  # image_aspect_ratio -> do_pad


class ExportError(ValueError):
    """A checkpoint that transformers' LLaVA cannot represent; the message names the path and the field."""


def check_exportable(config, path: str) -> None:
    """Raise `ExportError` (naming `path` and the field) before any weight is loaded."""
    where = f"{path} (config.json)"
    if config.model_type not in TEXT_MODEL_TYPES and config.model_type not in ("qwen2", "qwen3"):
        raise ExportError(f"{where}: model_type {config.model_type!r} is not a LLaVA-Qwen checkpoint; "
                          f"known: {sorted(TEXT_MODEL_TYPES)}")
    tower = getattr(config, "mm_vision_tower", None)
    if not tower:
        raise ExportError(f"{where} has no vision tower (`mm_vision_tower` is unset): it is a plain language model, "
                          "and only a multimodal checkpoint can be exported to LlavaForConditionalGeneration")
    embedded = getattr(config, "mm_vision_config", None) or {}
    tower_type = embedded.get("model_type", "siglip_vision_model")
    if is_open_clip_name(tower) or tower_type != "siglip_vision_model":
        raise ExportError(f"{where}: unsupported vision tower `mm_vision_tower`={tower!r} (`mm_vision_config` "
                          f"model_type {tower_type!r}); the export supports SigLIP towers (siglip_vision_model)")
    projector = getattr(config, "mm_projector_type", "mlp2x_gelu")
    if projector not in SUPPORTED_PROJECTORS:
        raise ExportError(f"{where}: unsupported projector `mm_projector_type`={projector!r}; transformers' LLaVA "
                          f"projector is Linear-GELU-Linear, i.e. one of {SUPPORTED_PROJECTORS}")
    aspect = getattr(config, "image_aspect_ratio", None) or "pad"
    if aspect not in ASPECT_RATIOS:
        raise ExportError(f"{where}: unsupported `image_aspect_ratio`={aspect!r}; known: {sorted(ASPECT_RATIOS)}")
    for field in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if getattr(config, field, False):
            raise ExportError(f"{where}: unsupported `{field}`=true; the export writes LLaVA-1.5's layout, one "
                              "<image> placeholder without delimiter tokens")
    if not isinstance(getattr(config, "mm_vision_select_layer", -2), int):
        raise ExportError(f"{where}: `mm_vision_select_layer` must be one integer layer")


def text_config(config):
    """Our LLaVA-Qwen config -> transformers' Qwen2Config / Qwen3Config (the same decoder, no LLaVA fields)."""
    fields = config.to_dict()
    for key in (*LlavaConfigFields.__dataclass_fields__, "model_type", "architectures", "_name_or_path",
                "transformers_version"):
        fields.pop(key, None)
    return AutoConfig.for_model(TEXT_MODEL_TYPES.get(config.model_type, config.model_type), **fields)


def add_image_token(tokenizer) -> int:
    """Give `<image>` a real vocabulary id (a special token, never split); returns it."""
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
    assert len(ids) == 1, f"{DEFAULT_IMAGE_TOKEN} encodes to {ids}, expected one id"
    return ids[0]


def _jinja_string(text: str) -> str:
    """A Jinja string literal for `text` (Jinja unescapes literals as Python does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_RENDER_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)


def chat_template(conv: Conversation) -> str:
    """A Jinja chat template that renders `conv`'s prompt exactly as `Conversation.get_prompt()` does.

    A message's content is a string (kept as it is, `<image>` included) or a list of `{"type": "image"}` /
    `{"type": "text", "text": ...}` items: images first, each as `<image>\\n`, then the texts, as our
    evaluation prompts put them. A leading system message replaces the template's default system prompt.
    """
    if conv.style == "plain":  # LLaVA's pretraining layout: the user's content, then the reply and "\n"
        return _RENDER_MACRO + (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ render(message['content']) }}"
            "{%- elif message['role'] == 'assistant' -%}{{ render(message['content']) + '\\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
    return _RENDER_MACRO + (
        f"{{%- set default_system = {_jinja_string(conv.system)} -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>\\n' }}"
        "{%- set rest = messages[1:] -%}"
        "{%- else -%}"
        "{%- if default_system -%}{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- set rest = messages -%}"
        "{%- endif -%}"
        "{%- for message in rest -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def image_processor_for(ours, aspect: str):
    """transformers' LLaVA image processor doing what `mm_utils.process_images(..., aspect)` + `ours` do."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = dict(ours.size)
    crop = getattr(ours, "crop_size", None)
    return LlavaImageProcessorPil(
        do_pad=ASPECT_RATIOS[aspect],
        do_resize=ours.do_resize, size=size, resample=ours.resample,
        do_center_crop=bool(getattr(ours, "do_center_crop", False)), crop_size=dict(crop) if crop else size,
        do_rescale=ours.do_rescale, rescale_factor=ours.rescale_factor,
        do_normalize=ours.do_normalize, image_mean=list(ours.image_mean), image_std=list(ours.image_std),
        do_convert_rgb=True,
    )


def _projector_state(projector: nn.Module) -> dict[str, torch.Tensor]:
    """Our `mlp2x_gelu` (Sequential: Linear, GELU, Linear) -> `linear_1.*`, `linear_2.*`."""
    layers = list(projector)
    if len(layers) != 3 or not isinstance(layers[1], nn.GELU) or layers[1].approximate != "none":
        raise ExportError(f"projector is not Linear-GELU-Linear: {projector}")
    return {f"linear_{i}.{name}": p for i, layer in ((1, layers[0]), (2, layers[2]))
            for name, p in layer.state_dict().items()}


def _vocabulary_rows(weight: torch.Tensor, rows: int, fill: str) -> torch.Tensor:
    """`weight` [V, H] grown to [rows, H] with the mean row ("mean") or zeros ("zeros")."""
    if rows == weight.shape[0]:
        return weight
    extra = weight.mean(0, keepdim=True) if fill == "mean" else torch.zeros_like(weight[:1])
    return torch.cat([weight, extra.expand(rows - weight.shape[0], -1)])


def to_transformers(model, image_token_id: int) -> LlavaForConditionalGeneration:
    """Our loaded LLaVA-Qwen model -> `LlavaForConditionalGeneration` sharing its tensors (meta-built, assigned)."""
    tower = model.get_vision_tower()
    if not isinstance(tower.config, SiglipVisionConfig):
        raise ExportError(f"unsupported vision tower {type(tower).__name__}: the export supports SigLIP towers")
    rows = max(model.lm_head.weight.shape[0], image_token_id + 1)
    text = text_config(model.config)
    text.vocab_size = rows
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=tower.num_patches,
        vision_feature_layer=tower.select_layer,
        vision_feature_select_strategy="full",  # SigLIP: every token is a patch, none to drop
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(model.config.tie_word_embeddings),
    )
    config.dtype = model.dtype
    config.text_config.dtype = config.vision_config.dtype = model.dtype
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)

    base = model.get_model()
    multimodal = ("vision_tower.", "mm_projector.")
    decoder = {k: v for k, v in base.state_dict().items() if not k.startswith(multimodal)}
    embed_key = "embed_tokens.weight"
    decoder[embed_key] = _vocabulary_rows(decoder[embed_key], rows, "mean")
    hf.model.vision_tower.load_state_dict(tower.vision_tower.state_dict(), strict=True, assign=True)
    hf.model.multi_modal_projector.load_state_dict(_projector_state(base.mm_projector), strict=True, assign=True)
    hf.model.language_model.load_state_dict(decoder, strict=True, assign=True)
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    else:
        hf.lm_head.load_state_dict({"weight": _vocabulary_rows(model.lm_head.weight, rows, "zeros")},
                                   strict=True, assign=True)
    return hf


def hub_layout_state_dict(hf: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """`hf`'s weights named as the llava-hf checkpoints on the hub name them: the tower under `vision_model.`.

    transformers 5.24 flattened `SiglipVisionModel` (no `vision_model.` level) and saves a LLaVA's tower so;
    every earlier release and vLLM read `vision_tower.vision_model.*`, and 5.24 reads that too.
    """
    state = hf.state_dict()
    if any(k.startswith("vision_model.") for k in hf.model.vision_tower.state_dict()):
        return state
    prefix = "model.vision_tower."
    return {prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def export(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    conv_mode: str | None = None,
) -> Path:
    """Write `output_dir` (model + processor in transformers' LLaVA format); returns it."""
    import llava.model  # noqa: F401  (registers our config classes with AutoConfig)
    from llava.model.builder import load_pretrained_model

    model_path, output_dir = os.fspath(model_path), Path(output_dir)
    config = AutoConfig.from_pretrained(model_path)
    check_exportable(config, model_path)

    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, model_base, device="cpu", torch_dtype="auto"
    )
    if model.get_vision_tower() is None:  # a plain-Qwen config that names a tower nobody attached
        raise ExportError(f"{model_path} (config.json): the loaded model has no vision tower (`mm_vision_tower`)")
    conv = get_conv_template(conv_mode or default_conv_mode(model))
    eos = stop_token_ids(model, tokenizer)

    image_token_id = add_image_token(tokenizer)
    hf = to_transformers(model, image_token_id)
    grown = list(range(model.lm_head.weight.shape[0], hf.lm_head.weight.shape[0]))
    if grown:
        logger.warning("lm_head has no spare row for %s: added %d row(s), suppressed in generation_config",
                       DEFAULT_IMAGE_TOKEN, len(grown))
    generation = GenerationConfig.from_dict(model.generation_config.to_dict())
    generation.eos_token_id = eos
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generation.suppress_tokens = grown or None
    hf.generation_config = generation

    template = chat_template(conv)
    tokenizer.chat_template = template
    aspect = getattr(model.config, "image_aspect_ratio", None) or "pad"
    processor = LlavaProcessor(
        image_processor=image_processor_for(image_processor, aspect),
        tokenizer=tokenizer,
        patch_size=model.get_vision_tower().config.patch_size,
        vision_feature_select_strategy="full",
        chat_template=template,
        image_token=DEFAULT_IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(output_dir, state_dict=hub_layout_state_dict(hf))
    processor.save_pretrained(output_dir)
    logger.info("exported %s (%s, template %s, image token %d x %d) to %s", model_path, model.config.model_type,
                conv.name, image_token_id, hf.config.image_seq_length, output_dir)
    return output_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava.export",
        description="Write a LLaVA-Qwen checkpoint as transformers' LlavaForConditionalGeneration + LlavaProcessor.",
    )
    parser.add_argument("--model-path", required=True, help="our checkpoint (full, projector-only or LoRA)")
    parser.add_argument("--output-dir", required=True, help="where the transformers checkpoint is written")
    parser.add_argument("--model-base", default=None,
                        help="the base LLM of a projector-only or LoRA checkpoint, as for load_pretrained_model")
    parser.add_argument("--version", default=None, choices=["qwen_2", "qwen_3", "plain"],
                        help="conversation template of the chat template (default: the checkpoint's "
                             "conv_template, else qwen_3 for Qwen3 and qwen_2 for Qwen2, as evaluation does)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        export(args.model_path, args.output_dir, args.model_base, args.version)
    except ExportError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
