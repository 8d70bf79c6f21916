"""capture_attention: recomputed rows equal eager output_attentions; the hook is scoped."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.nn.attention.flex_attention import create_block_mask

from aligntI_patch.attention_hook import _additive_mask, _select_queries, capture_attention, decoder_layers

B, T, VOCAB = 3, 12, 128


def tiny_model(arch: str, attn: str = "sdpa") -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
    )
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:  # Qwen3: explicit head_dim (its default is 128) and q_norm / k_norm
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    model.set_attn_implementation(attn)
    return model.eval()


def padded_inputs(padding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids with rows of lengths 12, 9, 7 padded on `padding`'s side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding != "none":
        for b, length in enumerate((T, 9, 7)):
            if padding == "left":
                mask[b, : T - length] = 0
            else:
                mask[b, length:] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def query_mask_for(mask: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (torch.rand(mask.shape, generator=g) < 0.5) & mask.bool()


def eager_attentions(model, ids, mask, positions, layer: int) -> torch.Tensor:
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    return out.attentions[layer]  # (B, heads, T, T)


@pytest.fixture(scope="module")
def flex_models() -> dict[str, transformers.PreTrainedModel]:
    """One flex_attention model per arch for the module, on CUDA (flex_attention's only device here: torch's CPU
    kernel is unreliable, llava/model/builder.py); transformers compiles flex_attention once per process."""
    return {arch: tiny_model(arch, "flex_attention").cuda() for arch in ("qwen2", "qwen3")}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_rows_equal_eager_output_attentions(request, arch: str, padding: str, attn: str) -> None:
    flex = attn == "flex_attention"
    if flex and not torch.cuda.is_available():
        pytest.skip("flex_attention runs on CUDA only")
    model = request.getfixturevalue("flex_models")[arch] if flex else tiny_model(arch, attn)
    ids, mask, positions = padded_inputs(padding)
    queries = query_mask_for(mask)
    ids, mask, positions, queries = (x.to(model.device) for x in (ids, mask, positions, queries))
    layer = 1
    with torch.no_grad(), capture_attention(model, layer, queries) as cap:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert model.config._attn_implementation == attn  # never switched
    ref = eager_attentions(model, ids, mask, positions, layer)
    heads = model.config.num_attention_heads
    q_max = int(queries.sum(1).max())
    assert cap.attn.shape == (B, heads, q_max, T)
    assert cap.attn.dtype == torch.float32 and not cap.attn.requires_grad
    for b in range(B):
        idx = queries[b].nonzero().squeeze(1)
        n = idx.numel()
        assert torch.equal(cap.query_index[b, :n], idx)
        assert cap.query_valid[b].tolist() == [True] * n + [False] * (q_max - n)
        torch.testing.assert_close(cap.attn[b, :, :n], ref[b, :, idx], atol=1e-6, rtol=0)
        assert torch.all(cap.attn[b, :, n:] == 0)
    # The hooked pass computes what an unhooked pass computes.
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits, plain, atol=0, rtol=0)


def test_several_layers_and_head_average_in_one_pass() -> None:
    model = tiny_model("qwen3")
    ids, mask, positions = padded_inputs("left")
    queries = query_mask_for(mask)
    with torch.no_grad(), capture_attention(model, [0, -1], queries, average_heads=True) as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert cap.layers == [0, 1]
    for layer in (0, 1):
        ref = eager_attentions(model, ids, mask, positions, layer).mean(dim=1)  # (B, T, T)
        for b in range(B):
            idx = queries[b].nonzero().squeeze(1)
            torch.testing.assert_close(cap.rows[layer][b, : idx.numel()], ref[b, idx], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="read .rows"):
        _ = cap.attn


def test_base_model_and_grad_enabled_forward() -> None:
    model = tiny_model("qwen2")
    ids, mask, positions = padded_inputs("right")
    queries = query_mask_for(mask)
    with capture_attention(model.model, 0, queries) as cap:  # base model: .layers
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert out.last_hidden_state.requires_grad and not cap.attn.requires_grad


def test_lora_wrapped_model_is_hooked_like_the_plain_one() -> None:
    """A LoRA student (`--lora_enable`) with `--iva_weight_source student`: the hook finds its layers."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2")
    ids, mask, positions = padded_inputs("right")
    queries = query_mask_for(mask)
    with torch.no_grad(), capture_attention(model, 1, queries) as plain:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoder_layers(lora) is decoder_layers(model)
    with torch.no_grad(), capture_attention(lora, 1, queries) as wrapped:
        lora(input_ids=ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(wrapped.attn, plain.attn)  # LoRA's B starts at zero: same attention


def test_hook_removed_after_context_and_after_exception() -> None:
    model = tiny_model("qwen2")
    attn = decoder_layers(model)[1].self_attn
    ids, mask, positions = padded_inputs("none")
    with capture_attention(model, 1, mask.bool()):
        assert len(attn._forward_pre_hooks) == 1
    assert len(attn._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model, 1, mask.bool()):
        raise RuntimeError("boom")
    assert len(attn._forward_pre_hooks) == 0
    # A second forward inside one context raises (and still cleans up).
    with pytest.raises(RuntimeError, match="ran twice"), torch.no_grad():
        with capture_attention(model, 1, mask.bool()):
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
    assert len(attn._forward_pre_hooks) == 0
    # Built first, entered around one chosen pass only (the trainer's way): the other passes are not recorded.
    capture = capture_attention(model, 1, mask.bool())
    assert len(attn._forward_pre_hooks) == 0  # nothing hooked until entered
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with capture:
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert capture.attn.shape[0] == ids.shape[0] and len(attn._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError, match="records one forward"), capture:
        pass


def test_errors() -> None:
    model = tiny_model("qwen2")
    ids, mask, _ = padded_inputs("none")
    with pytest.raises(IndexError, match="out of range"), capture_attention(model, 2, mask.bool()):
        pass
    with pytest.raises(ValueError, match="does not match"), torch.no_grad():
        with capture_attention(model, 0, mask[:, :5].bool()):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="did not run"), capture_attention(model, 0, mask.bool()) as cap:
        _ = cap.attn


def test_two_dimensional_padding_mask_matches_four_dimensional() -> None:
    """The flash-attention path (a 2D padding mask) gives the same additive mask as the 4D bool one."""
    _, mask, _ = padded_inputs("right")
    index, _ = _select_queries(query_mask_for(mask))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    four_d = (causal[None] & mask.bool()[:, None, :])[:, None]  # (B, 1, T, T)
    torch.testing.assert_close(_additive_mask(mask, index, T, None), _additive_mask(four_d, index, T, None))
    float_4d = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(
        _additive_mask(float_4d, index, T, None), _additive_mask(four_d, index, T, None)
    )


def test_block_mask_is_read_exactly_at_the_query_rows() -> None:
    """A BlockMask (flex_attention) gives the additive mask of the equal dense 4D mask, partial blocks included;
    per-head masks and a batch-broadcast (B=1) mask are read as flex reads them."""
    _, mask, _ = padded_inputs("left")
    index, _ = _select_queries(query_mask_for(mask))
    pad = mask.bool()

    def causal_padding(b, h, q, kv):
        return (kv <= q) & pad[b, kv]

    block_mask = create_block_mask(causal_padding, B, None, T, T, device="cpu", BLOCK_SIZE=8)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    four_d = (causal[None] & pad[:, None, :])[:, None]  # (B, 1, T, T)
    # to_dense() has one entry per 8 x 8 block, not per token: the hook must evaluate the mask_mod
    assert block_mask.to_dense().shape == (B, 1, 2, 2)
    expected = _additive_mask(four_d, index, T, None)
    torch.testing.assert_close(_additive_mask(block_mask, index, T, None), expected)

    def window_per_head(b, h, q, kv):  # head h sees the last h + 2 keys, causally; one mask for the batch
        return (kv <= q) & (kv > q - h - 2)

    heads = 2
    block_mask = create_block_mask(window_per_head, 1, heads, T, T, device="cpu")
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    dense = torch.stack([(kv <= q) & (kv > q - h - 2) for h in range(heads)])[None].expand(B, -1, -1, -1)
    expected = _additive_mask(dense, index, T, None)  # (B, heads, Q_max, T)
    torch.testing.assert_close(_additive_mask(block_mask, index, T, None), expected)
    with pytest.raises(ValueError, match="does not fit"):
        _additive_mask(block_mask, index, T + 1, None)
