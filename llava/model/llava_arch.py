"""LLaVA's multimodal mixins, Qwen only: the vision tower + projector, and the sequence layout.

Design choices:
- `input_ids` keep LLaVA's contract: one `IMAGE_TOKEN_INDEX` per image. `build_layout` expands each to N_v
  positions once and carries the token-type map (`TokenType`) and a `source_index` back to `input_ids` along, so
  every later stage (losses, masks, hooks) indexes this layout and never rebuilds it; `embed_layout` places a
  model's own projected features there with `masked_scatter` behind a count check. Two models that read the
  same batch (a teacher and its student) share one layout. `prepare_inputs_labels_for_multimodal` (LLaVA's
  entry point) is the two in a row.
- Each row keeps its padding side (a row whose first position is padding is left-padded; a row with no padding
  takes its batch's side, and `generate` asks for left), so training (right padding) and batched generation
  (left padding) share one code path; position ids follow the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType

from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector


class MultimodalInputs(NamedTuple):
    """Output of `prepare_inputs_labels_for_multimodal`; all [B, T'] tensors share the expanded layout.

    `position_ids` is always set (from the mask unless the caller gave some for a text-only batch);
    `source_index[b, j]` is the index in `input_ids` of position j, -1 wherever the mask is 0.
    """

    input_ids: None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    past_key_values: object
    inputs_embeds: torch.Tensor
    labels: torch.Tensor | None
    token_types: torch.Tensor | None
    source_index: torch.Tensor | None


class LlavaMetaModel:
    """Mixin for the base model (`LlavaQwenModel`): owns `vision_tower` and `mm_projector`."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_use_im_start_end", False) or getattr(config, "mm_use_im_patch_token", False):
            # LLaVA-1.5 and every Qwen LLaVA checkpoint use neither; a model trained with them would silently get
            # prompts without its image delimiters here.
            raise ValueError("mm_use_im_start_end / mm_use_im_patch_token = true is not supported (LLaVA-1.5's "
                             "layout, one <image> placeholder with no delimiters, is the only one)")
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(
                config.mm_projector_type, config.mm_hidden_size, config.hidden_size
            )

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args) -> None:
        """Attach a SigLIP tower (weights from a local dir) and a fresh or pretrained projector (LLaVA's API)."""
        from .multimodal_encoder.builder import resolve_vision_config

        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = model_args.mm_vision_select_layer
        config.mm_vision_select_feature = model_args.mm_vision_select_feature
        config.mm_projector_type = model_args.mm_projector_type
        config.mm_vision_config = None
        vision_config = resolve_vision_config(config)
        config.mm_vision_config = vision_config.to_dict()
        config.mm_hidden_size = vision_config.hidden_size
        if self.get_vision_tower() is None:
            self.vision_tower = build_vision_tower(config)
            self.vision_tower.load_pretrained(model_args.vision_tower)
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(
                config.mm_projector_type, config.mm_hidden_size, config.hidden_size
            )
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        self.vision_tower.to(device=device, dtype=dtype)
        self.mm_projector.to(device=device, dtype=dtype)
        if model_args.pretrain_mm_mlp_adapter:
            load_projector_weights(self.mm_projector, model_args.pretrain_mm_mlp_adapter)


def load_projector_weights(projector: nn.Module, path: str) -> None:
    """Load `mm_projector.bin` / `.safetensors` saved by the pretrain stage (keys `...mm_projector.*`)."""
    from llava.model.checkpoint import read_state_dict, rename_key

    state = {rename_key(k): v for k, v in read_state_dict(path).items()}
    proj = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not proj:
        raise ValueError(f"{path} holds no mm_projector weights (keys: {list(state)[:5]})")
    projector.load_state_dict(proj, strict=True)


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: image encoding and the multimodal sequence layout."""

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    @property
    def num_image_tokens(self) -> int:
        return self.get_vision_tower().num_patches

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] -> projected visual embeddings [n, N_v, hidden]."""
        features = self.get_vision_tower()(images)
        return self.get_model().mm_projector(features)

    def build_layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        padding_side: str | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SequenceLayout:
        """`build_layout` with this model's N_v (read only when `input_ids` hold an image token)."""
        has_image = bool((input_ids == IMAGE_TOKEN_INDEX).any())
        num_patches = self.num_image_tokens if has_image else None
        return build_layout(input_ids, attention_mask, labels, token_types, num_patches, padding_side, position_ids)

    def embed_layout(
        self, layout: SequenceLayout, images: torch.Tensor | None, vision_in_step: bool = False
    ) -> torch.Tensor:
        """inputs_embeds [B, T', H] of `layout`: this model's text embeddings with its projected visual features
        placed at the visual positions (one image per visual run, in order).

        `vision_in_step`: a batch without images still encodes one blank image and adds 0 x its features, so
        that every rank of a multi-process run calls the same modules (`llava.train.zero3.needs_blank_image`);
        the result is unchanged and the projector gets a zero gradient.
        """
        # the tower and projector run before the embedding on every path: the same module order on every rank
        embed_tokens = self.get_model().embed_tokens
        n_visual = int(layout.visual.sum())
        if n_visual == 0:
            if not vision_in_step:
                return embed_tokens(layout.ids)
            size = self.get_vision_tower().config.image_size
            blank = self.encode_images(torch.zeros(1, 3, size, size, dtype=self.dtype, device=self.device))
            return embed_tokens(layout.ids) + 0 * blank.sum()
        n_tokens = n_visual // self.num_image_tokens
        if images is None:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but no images were given")
        features = self.encode_images(images)  # (n_img, N_v, H)
        if features.shape[0] != n_tokens or features.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"Number of images ({features.shape[0]}, {features.shape[1]} features each) does not match the "
                f"number of image tokens ({n_tokens}, {self.num_image_tokens} positions each) in input_ids"
            )
        inputs_embeds = embed_tokens(layout.ids)
        flat = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(layout.visual.unsqueeze(-1), flat)

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values,
        labels: torch.Tensor | None,
        images: torch.Tensor | None,
        image_sizes=None,
        token_types: torch.Tensor | None = None,
        vision_in_step: bool = False,
        padding_side: str | None = None,
    ) -> MultimodalInputs:
        """LLaVA's entry point: `build_layout` then `embed_layout` (see the module docstring for the layout).

        `padding_side`: where rows that expand to fewer positions than the longest are padded ("left" for
        generation); by default each row keeps the side it was padded on. `position_ids` are kept only for a
        batch without image tokens (e.g. generation steps past the prompt).
        """
        layout = self.build_layout(input_ids, attention_mask, labels, token_types, padding_side, position_ids)
        inputs_embeds = self.embed_layout(layout, images, vision_in_step)
        return MultimodalInputs(
            None, layout.position_ids, layout.attention_mask, past_key_values, inputs_embeds, layout.labels,
            layout.token_types, layout.source_index,
        )


class SequenceLayout(NamedTuple):
    """A batch in the expanded layout, [B, T'] each: every image token repeated N_v times (`build_layout`).

    Built once from `input_ids` and shared by every model that reads the batch (a student and its teacher each
    place their own visual embeddings into it with `embed_layout`).
    """

    ids: torch.Tensor  # text token ids; 0 at visual and padding positions
    visual: torch.Tensor  # bool, the visual positions
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # from the mask (or the caller's, for a batch without image tokens)
    labels: torch.Tensor | None  # IGNORE_INDEX at visual and padding positions
    token_types: torch.Tensor  # TokenType
    source_index: torch.Tensor  # index into input_ids of each position, -1 where the mask is 0


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    token_types: torch.Tensor | None = None,
    num_patches: int | None = None,
    padding_side: str | None = None,
    position_ids: torch.Tensor | None = None,
) -> SequenceLayout:
    """The expanded layout of a batch of [B, T] `input_ids` with one `IMAGE_TOKEN_INDEX` per image, each
    expanded to `num_patches` (N_v) positions; a batch without image tokens keeps its layout (T' = T)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if token_types is None:
        token_types = default_token_types(input_ids, attention_mask, labels)
    is_image = input_ids == IMAGE_TOKEN_INDEX
    if not bool(is_image.any()):
        source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return SequenceLayout(input_ids, torch.zeros_like(is_image), attention_mask, position_ids, labels,
                              token_types, source.masked_fill(attention_mask == 0, -1))
    if num_patches is None:
        raise ValueError("input_ids hold image tokens: num_patches (the tower's N_v) is needed to expand them")
    source = expand_source_index(is_image, attention_mask, num_patches, padding_side)  # (B, T')
    valid = source >= 0
    gather = source.clamp(min=0)
    ids = torch.where(valid, input_ids.gather(1, gather), 0)
    mask = torch.where(valid, attention_mask.gather(1, gather), 0)
    types = torch.where(valid, token_types.gather(1, gather), int(TokenType.PAD))
    visual = ids == IMAGE_TOKEN_INDEX
    new_labels = None
    if labels is not None:
        new_labels = torch.where(valid & ~visual, labels.gather(1, gather), IGNORE_INDEX)
    return SequenceLayout(torch.where(visual, 0, ids), visual, mask, positions_from_mask(mask), new_labels, types,
                          source.masked_fill(mask == 0, -1))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the mask, so left- and right-padded rows get the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def expand_source_index(
    is_image: torch.Tensor, attention_mask: torch.Tensor, num_patches: int, padding_side: str | None = None
) -> torch.Tensor:
    """[B, T'] index into the original row for every expanded position, -1 on the padding added here.

    Every image token is repeated `num_patches` times; rows are re-padded on `padding_side`, by default on
    their own padding side. A row with no padding of its own (the longest in tokens, which may expand to
    fewer positions than a row with more images) takes the side of the batch's padded rows: left if any row is
    left-padded, so a text-only question batched with image questions for generation still ends at the last
    position.
    """
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    batch, length = is_image.shape
    device = is_image.device
    positions = torch.arange(length, device=device)
    rows = [torch.repeat_interleave(positions, torch.where(is_image[b], num_patches, 1)) for b in range(batch)]
    width = max(len(r) for r in rows)
    source = torch.full((batch, width), -1, dtype=torch.long, device=device)
    starts_padded = attention_mask[:, 0] == 0
    ends_padded = attention_mask[:, -1] == 0
    batch_left = bool(starts_padded.any())
    for b, row in enumerate(rows):
        if padding_side is not None:
            left = padding_side == "left"
        elif bool(starts_padded[b]) or bool(ends_padded[b]):
            left = bool(starts_padded[b])
        else:
            left = batch_left
        if left:
            source[b, width - len(row) :] = row
        else:
            source[b, : len(row)] = row
    return source


def default_token_types(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Token types when the caller has none: visual, response (from labels), padding, else template."""
    types = torch.full_like(input_ids, int(TokenType.TEMPLATE))
    if labels is not None:
        types[labels != IGNORE_INDEX] = int(TokenType.RESPONSE)
    types[input_ids == IMAGE_TOKEN_INDEX] = int(TokenType.VISUAL)
    types[attention_mask == 0] = int(TokenType.PAD)
    return types
