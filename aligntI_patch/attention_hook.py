"""Scoped capture of one decoder layer's attention rows for selected queries (input to Eq. 3 and Eq. 4).

Design choices:
- `sdpa` (and flash / flex) never return attention weights, and switching a 7B teacher to eager with
  `output_attentions=True` would materialise [B, heads, T, T] at every layer. Instead a forward
  pre-hook on `layer.self_attn` reads the layer's own inputs (hidden_states, position_embeddings,
  attention_mask) and recomputes softmax(q k^T * scaling + mask) for the selected query rows only:
  q/k projections, Qwen3's q_norm/k_norm when the module has them, RoPE, GQA repeat, scaling, mask.
  The keys come from `attention_keys`, which TPA also uses to rebuild the KV cache under checkpointing.
  The layer itself then runs unchanged with whatever `config._attn_implementation` says.
- The mask the module receives is used as given: a 4D bool mask (True = attend, sdpa), a 4D additive
  float mask (eager), a 2D padding mask (flash attention), None (sdpa's `is_causal` fast path, i.e. no
  padding), in which case causality is rebuilt from sequence indices, or a FlexAttention `BlockMask`
  (flex_attention). A BlockMask's `mask_mod` is evaluated at the selected query rows x all keys only
  (B x h x Q_max x T bools, never T x T); its `to_dense()` has one entry per block (is any query-key pair
  of that tile allowed), not per token, so it is not used.
- Scores and softmax are computed in float32 whatever the model dtype (like eager's softmax), and the
  result is always detached: it serves as importance weights (teacher, or student for Tab. 8), never
  as something to backpropagate through.
- One forward per context: the hooked layer running twice inside one context raises, so a capture can
  never silently mix two passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_mask

__all__ = ["AttentionCapture", "attention_keys", "capture_attention", "decoder_layers", "rotary_rows"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers CausalLM (`model.model.layers`) or base model (`model.layers`), also
    inside a peft `PeftModel` (a LoRA student)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "layers"):
        return model.layers
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    raise TypeError(
        f"cannot find decoder layers on {type(model).__name__} (expected .model.layers or .layers)"
    )


def rotary_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as in transformers' `apply_rotary_pos_emb`: x (B, h, n, D), cos/sin (B, n, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, n, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_keys(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys of `attn` (a Qwen2/Qwen3 attention module) as its forward computes them -> (B, nkv, T, D).

    hidden: (B, T, H), the module's input (the decoder layer's `input_layernorm` output); cos/sin: (B or 1, T, D)
    from the decoder's `rotary_emb`. k_proj, Qwen3's k_norm (RMSNorm over head_dim, before RoPE), RoPE; no GQA
    repeat. IVA's attention rows and TPA's rebuilt KV cache (`tpa.layer_keys_values`) both read keys from here.
    """
    batch, t, _ = hidden.shape
    k = attn.k_proj(hidden).view(batch, t, -1, attn.head_dim)  # (B, T, nkv, D)
    if hasattr(attn, "k_norm"):  # Qwen3: RMSNorm over head_dim before RoPE
        k = attn.k_norm(k)
    return rotary_rows(k.transpose(1, 2), cos, sin)  # (B, nkv, T, D)


def _select_queries(query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> query_index (B, Q_max) in increasing sequence order, query_valid (B, Q_max)."""
    counts = query_mask.sum(dim=1)  # (B,)
    q_max = int(counts.max().item()) if query_mask.numel() else 0
    # Stable sort puts the selected positions first, in sequence order.
    order = torch.sort((~query_mask).to(torch.int8), dim=1, stable=True).indices[:, :q_max]  # (B, Q_max)
    valid = torch.arange(q_max, device=query_mask.device)[None, :] < counts[:, None]  # (B, Q_max)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _block_mask_rows(block_mask: BlockMask, query_index: torch.Tensor, t_k: int) -> torch.Tensor:
    """Exact bool mask (B, 1|h, Q_max, T_k) of a FlexAttention BlockMask at the selected query rows.

    Evaluates `block_mask.mask_mod` (exact, unlike the block-granular `to_dense()`) through torch's
    `create_mask`, with query axis u standing for sequence index query_index[b, u].
    """
    batch = query_index.shape[0]
    mask_batch, heads = block_mask.shape[:2]
    if mask_batch not in (1, batch) or block_mask.seq_lengths[1] != t_k:
        raise ValueError(
            f"BlockMask of shape {block_mask.shape} does not fit a batch of {batch} with {t_k} keys"
        )
    mask_mod = block_mask.mask_mod
    broadcast = mask_batch == 1  # one mask for the whole batch: its mask_mod only knows b = 0

    def on_selected_rows(b: torch.Tensor, h: torch.Tensor, u: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mask_mod(torch.zeros_like(b) if broadcast else b, h, query_index[b, u], kv)

    return create_mask(on_selected_rows, batch, heads, query_index.shape[1], t_k, device=query_index.device)


def _additive_mask(
    mask: torch.Tensor | BlockMask | None, query_index: torch.Tensor, t_k: int, sliding_window: int | None
) -> torch.Tensor:
    """Additive float32 mask (B, 1|h, Q_max, T_k) for the selected queries, from what the layer received."""
    neg = torch.finfo(torch.float32).min
    device = query_index.device
    if isinstance(mask, BlockMask):
        # flex_attention: the mask_mod already holds causality, padding and any sliding window
        return torch.where(_block_mask_rows(mask, query_index, t_k), 0.0, neg)
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"unsupported attention mask type {type(mask).__name__}")
    if mask is None or mask.dim() == 2:
        # No mask (sdpa is_causal, no padding) or a 2D padding mask (flash): causal on sequence indices.
        keys = torch.arange(t_k, device=device)
        allowed = keys[None, None, :] <= query_index[:, :, None]  # (B, Q_max, T_k)
        if sliding_window is not None:
            allowed &= keys[None, None, :] > query_index[:, :, None] - sliding_window
        if mask is not None:
            allowed &= mask[:, None, :t_k].bool()
        return torch.where(allowed, 0.0, neg)[:, None]  # (B, 1, Q_max, T_k)
    if mask.dim() != 4:
        raise TypeError(f"unsupported attention mask of shape {tuple(mask.shape)} (expected 2D, 4D or None)")
    mask = mask[..., :t_k]  # static caches may hand a longer key axis
    batch, heads = query_index.shape[0], mask.shape[1]
    index = query_index[:, None, :, None].expand(batch, heads, -1, t_k)  # (B, h, Q_max, T_k)
    picked = torch.gather(mask.expand(batch, heads, -1, t_k), 2, index)
    if picked.dtype == torch.bool:
        return torch.where(picked, 0.0, neg)
    # Additive float mask: clamp so finfo.min of a half dtype stays a large negative in float32.
    return picked.float().clamp(min=neg)


def _attention_rows(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | BlockMask | None,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
) -> torch.Tensor:
    """Softmax rows (B, heads, Q_max, T) of `attn` (a Qwen2/Qwen3 attention module) for the selected queries."""
    batch, t, _ = hidden.shape
    hid_q = torch.gather(hidden, 1, query_index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, Q, H)
    q = attn.q_proj(hid_q).view(batch, query_index.shape[1], -1, attn.head_dim)  # (B, Q, nh, D)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim before RoPE
        q = attn.q_norm(q)
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # (B, T, D)
    rows_index = query_index[:, :, None].expand(-1, -1, cos.shape[-1])
    q = rotary_rows(q.transpose(1, 2), torch.gather(cos, 1, rows_index), torch.gather(sin, 1, rows_index))
    k = attention_keys(attn, hidden, cos, sin)  # (B, nkv, T, D)
    q, k = q.float(), k.float()  # (B, nh, Q, D), (B, nkv, T, D)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # GQA: (B, nh, T, D)
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # (B, nh, Q, T)
    scores = scores + _additive_mask(mask, query_index, t, getattr(attn, "sliding_window", None))
    probs = torch.softmax(scores, dim=-1)
    return probs * query_valid[:, None, :, None]  # zero the padding slots


class AttentionCapture:
    """Scoped capture of the attention rows of `query_mask`'s positions at `layer` during ONE forward of `model`.

    Use as a context manager around exactly the pass to read (`with capture_attention(...) as capture:`); it can
    also be built first and handed to the code that runs that pass (the trainer gives it to the teacher's
    ground-truth pass only). The hooks are removed on exit, also when the body raises.

    Attributes (filled once the forward has run; rows are float32 and detached):
        layers: the hooked layer indices, in the order given.
        query_index: (B, Q_max) long, sequence index of each selected query (0 on padding slots).
        query_valid: (B, Q_max) bool, which query slots are real (sample b has query_mask[b].sum() of them).
        rows: layer -> float32 rows, (B, heads, Q_max, T) or (B, Q_max, T) with `average_heads`;
            rows of padding slots are zero; row u of sample b is softmax over all T keys of query
            query_index[b, u] (so masked keys get 0).
    """

    def __init__(self, model: nn.Module, layer: int | Sequence[int], query_mask: torch.Tensor,
                 average_heads: bool = False):
        self._layer_modules = decoder_layers(model)
        wanted = [layer] if isinstance(layer, int) else list(layer)
        n = len(self._layer_modules)
        for idx in wanted:
            if not -n <= idx < n:
                raise IndexError(f"layer {idx} out of range for a model with {n} decoder layers")
        self.layers = [idx % n for idx in wanted]
        self.query_mask = query_mask.bool()
        self.query_index, self.query_valid = _select_queries(self.query_mask)
        self.average_heads = average_heads
        self.rows: dict[int, torch.Tensor] = {}
        self._handles: list = []

    @property
    def attn(self) -> torch.Tensor:
        """The rows of the single hooked layer (see `rows` for several)."""
        if len(self.layers) != 1:
            raise ValueError(f"{len(self.layers)} layers were captured; read .rows[layer] instead of .attn")
        layer = self.layers[0]
        if layer not in self.rows:
            raise RuntimeError(f"layer {layer} did not run inside the capture_attention context")
        return self.rows[layer]

    def _hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if idx in self.rows:
                raise RuntimeError(f"layer {idx} ran twice inside one capture_attention context")
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and cache.get_seq_length(module.layer_idx) > 0:
                raise RuntimeError("capture_attention needs a forward without past keys (cache is not empty)")
            if hidden.shape[:2] != self.query_mask.shape:
                raise ValueError(
                    f"query_mask {tuple(self.query_mask.shape)} does not match the layer input "
                    f"{tuple(hidden.shape[:2])}"
                )
            with torch.no_grad():
                rows = _attention_rows(
                    module,
                    hidden,
                    cos,
                    sin,
                    kwargs.get("attention_mask"),
                    self.query_index.to(hidden.device),
                    self.query_valid.to(hidden.device),
                )
            self.rows[idx] = rows.mean(dim=1) if self.average_heads else rows

        return hook

    def __enter__(self) -> AttentionCapture:
        if self._handles or self.rows:
            raise RuntimeError("an AttentionCapture records one forward: build a new one for another pass")
        self._handles = [
            self._layer_modules[idx].self_attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
            for idx in self.layers
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def capture_attention(
    model: nn.Module,
    layer: int | Sequence[int],
    query_mask: torch.Tensor,
    average_heads: bool = False,
) -> AttentionCapture:
    """Record the attention rows of `query_mask`'s positions at `layer` during one forward of `model`.

    Args:
        model: a transformers Qwen2/Qwen3 CausalLM or base model (or our LLaVA subclasses).
        layer: decoder layer index (negative counts from the end), or several to capture in one pass.
        query_mask: (B, T) bool over the sequence the LLM sees (after visual expansion).
        average_heads: store the mean over heads, (B, Q_max, T), to save memory when many layers are hooked.

    Returns an `AttentionCapture` to enter around that one forward; a second forward inside raises.
    """
    return AttentionCapture(model, layer, query_mask, average_heads)
