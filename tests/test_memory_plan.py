"""benchmarks/memory_plan.py (docs/scaling.md): its arithmetic on a toy config against numbers worked out by hand,
its activation formula against the bytes autograd saves in transformers' own Qwen2/Qwen3 decoder layers, and the
doc's tables against the script's output."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mp():
    spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(mp):
    # hidden 8, 2 layers, 2 heads of 4, 1 kv head, MLP 16, vocab 10, tied embeddings (Qwen2-like: q/k/v biases)
    return mp.LLM("toy", hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10, tied=True)


def test_parameter_counts_by_hand(mp, toy):
    # layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, biases 8+4+4 = 16, MLP 3*8*16 = 384, norms 2*8 = 16 -> 608
    assert toy.layer_params() == 608
    assert toy.params() == 2 * 608 + 10 * 8 + 8  # + tied embedding + final norm = 1304
    tower = mp.Tower("t", hidden=4, layers=1, intermediate=8, image_size=4, patch_size=2, use_head=False)
    # layer 4*(16+4) + 2*4*8 + 8 + 4 + 2 LayerNorms 16 = 172; patches 3*2*2*4 + 4 = 52; positions 4*4 = 16; post LN 8
    assert (tower.tokens, tower.params()) == (4, 172 + 52 + 16 + 8)
    assert mp.projector_params(4, 8) == 4 * 8 + 8 + 8 * 8 + 8  # 112
    # the public configs' well-known sizes (billions)
    sizes = {name: round(m.params() / 1e9, 2) for name, m in mp.MODELS.items()}
    assert sizes == {"Qwen2-0.5B": 0.49, "Qwen2-1.5B": 1.54, "Qwen2-7B": 7.62, "Qwen3-0.6B": 0.6,
                     "Qwen3-1.7B": 1.72, "Qwen3-8B": 8.19}  # fmt: skip
    assert mp.SIGLIP_SO400M.tokens == 729


def test_activations_by_hand(mp, toy):
    # per query token, trained, masked: norms 16h = 128, rsqrt 8, cos/sin 4*hd = 16, q + output 2*2*nq*hd = 32,
    # lse 4*nq = 8, MLP 8*I = 128, mask 2*tk; per key: k, v repeated to both heads 2*2*nq*hd = 32
    assert mp.layer_activation_bytes(toy, 3, 3, trainable=True, masked=True) == 3 * (320 + 6) + 3 * 32
    # frozen, no mask: norms 8h = 64, MLP 6*I = 96, no mask; k, v with the single kv head 2*2*1*4 = 16
    assert mp.layer_activation_bytes(toy, 3, 3, trainable=False, masked=False) == 3 * 224 + 3 * 16
    # checkpointing: each layer's input 2h per token, one layer recomputed, final norm 8h per token
    t = 6
    assert mp.stack_activation_bytes(toy, t, True, ckpt=True) == 2 * t * 16 + (t * 332 + t * 32) + t * 64
    assert mp.stack_activation_bytes(toy, t, True, ckpt=False) == 2 * (t * 332 + t * 32) + t * 64  # 4752


def test_stage_plans_by_hand(mp, toy):
    tower = mp.Tower("t", hidden=4, layers=1, intermediate=8, image_size=4, patch_size=2, use_head=False)
    setup = mp.Setup(gpus=2, gpu_gib=1, zero=2, seq_len=6, response_share=0.5, tpa_d=2, loss_chunk=4)
    trainable, frozen = 1304 + 112, 248

    p = mp.plan("finetune", toy, tower, setup)
    assert p.fixed == {"weights": 2 * (trainable + frozen), "gradients": 2 * trainable // 2,
                       "optimizer": 12 * trainable // 2, "ZeRO buffers": 4 * 8 * 8}  # fmt: skip
    assert p.per_sample == {"projector activations": 4 * (2 * 4 + 4 * 8), "decoder activations": 4752,
                            "logits (HF loss)": 12 * 6 * 10}  # fmt: skip
    assert p.peak(3) == sum(p.fixed.values()) + 3 * (160 + 4752 + 720)

    p3 = mp.plan("pretrain", toy, tower, mp.Setup(gpus=2, zero=3, seq_len=6))
    assert p3.fixed["weights"] == 2 * (trainable + frozen) // 2 and p3.fixed["optimizer"] == 12 * 112 // 2
    assert p3.fixed["ZeRO buffers"] == 2 * max(10 * 8, 2 * 608)  # two layers gathered

    # distill: 2 text tokens, 1 response token, d = 2 -> 2 candidate rows attending to 6 + 2 keys
    d = mp.plan("distill", toy, tower, setup, teacher=toy)
    assert d.fixed["teacher weights"] == 2 * (1304 + 112 + 248)  # replicated under ZeRO-2
    assert d.fixed["loss chunks"] == 24 * 4 * 10 + 4 * 10 * 8  # six [4, 10] fp32 blocks, one shared fp32 head gradient
    cand_layer = 2 * (320 + 2 * 8) + 8 * 32  # queries with an 8-key mask, repeated k/v of 8 keys
    kv_cache = 2 * 8 * (2 * 2 * 1 * 4)  # layers x tokens x k, v of one kv head, bf16
    assert d.per_sample["decoder activations"] == 4752 + 2 * cand_layer + 2 * 64 + kv_cache
    # teacher: its KV cache, hidden states of 8 rows, MLP working set of the larger pass (6 tokens), the mask
    assert d.per_sample["teacher forward"] == kv_cache + 2 * 8 * 8 + 6 * 8 * 16 + 2 * 2 * 8
    assert d.per_sample["loss row gradients"] == 2 * 8 * (2 * 1 + 4 + 2 + 1)
    # checkpointing: T checkpointed, its keys and values kept, the 2 rows in 2 segments of 1, one replayed at a time
    ck = mp.plan("distill", toy, tower, replace(setup, ckpt=True), teacher=toy)
    one_row = mp.layer_activation_bytes(toy, 1, 7, True)
    kept = 2 * 6 * (2 * 2 * 1 * 4)  # the rebuilt keys and values of the 6 ground-truth tokens, bf16
    assert ck.per_sample["decoder activations"] == mp.stack_activation_bytes(toy, 6, True, ckpt=True) + kept + 2 * one_row
    zero3 = mp.plan("distill", toy, tower, mp.Setup(gpus=2, zero=3, seq_len=6, tpa_d=2), teacher=toy)
    assert zero3.fixed["teacher weights"] == 2 * (1304 + 112 + 248) // 2


def test_micro_batch_recommendation(mp, toy):
    p = mp.Plan("s", "m", {"weights": 10 * mp.GIB}, {"activations": 4 * mp.GIB})
    # fits when 1.1 * (10 + 4b) + 2 <= 40: b <= 6.13 -> the largest power of two dividing 16 is 4
    assert p.best_micro_batch(16, 40.0) == 4
    assert p.best_micro_batch(16, 80.0) == 8  # 16: 1.1 * 74 + 2 = 83.4 > 80
    assert p.best_micro_batch(16, 16.0) is None  # 1.1 * 14 + 2 = 17.4 > 16


def _saved_bytes(layer_cls, rope_cls, cfg, trainable: bool, masked: bool, t: int = 16, b: int = 2) -> float:
    """Bytes autograd saves per sequence in one bf16 decoder layer (parameters and the mask input excluded)."""
    cfg._attn_implementation = "sdpa"
    layer = layer_cls(cfg, 0).to(torch.bfloat16).requires_grad_(trainable)
    x = torch.randn(b, t, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope_cls(cfg)(x, pos)
    mask = torch.ones(b, 1, t, t, dtype=torch.bool).tril() if masked else None
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    if mask is not None:
        skip.add(mask.untyped_storage().data_ptr())
    seen = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return sum(seen.values()) / b


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_activation_formula_matches_transformers_layers(mp, family, trainable, masked):
    from transformers import Qwen2Config, Qwen3Config
    from transformers.models.qwen2 import modeling_qwen2 as q2
    from transformers.models.qwen3 import modeling_qwen3 as q3

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=88,
                 num_hidden_layers=1, vocab_size=50)  # fmt: skip
    if family == "qwen2":
        cfg, layer_cls, rope_cls = Qwen2Config(**shape), q2.Qwen2DecoderLayer, q2.Qwen2RotaryEmbedding
        llm = mp.LLM("q2", 32, 1, 4, 2, 88, 50)
    else:
        cfg, layer_cls, rope_cls = Qwen3Config(**shape, head_dim=16), q3.Qwen3DecoderLayer, q3.Qwen3RotaryEmbedding
        llm = mp.LLM("q3", 32, 1, 4, 2, 88, 50, head_dim=16, qkv_bias=False, qk_norm=True)
    measured = _saved_bytes(layer_cls, rope_cls, cfg, trainable, masked)
    assert measured == mp.layer_activation_bytes(llm, 16, 16, trainable, masked)


def test_scaling_doc_holds_the_scripts_tables(mp):
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert mp.markdown() in doc, "docs/scaling.md is stale: paste `python benchmarks/memory_plan.py` into it"
    assert "computed, not measured" in doc.lower()


def test_cli_reads_a_local_config(mp, tmp_path, capsys):
    config = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}
    path = tmp_path / "my-model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config), encoding="utf-8")
    assert mp.llm_from_config(path) == replace(mp.MODELS["Qwen2-0.5B"], name="my-model")
    mp.main(["--stage", "distill", "--config", str(path), "--teacher", "Qwen2-7B", "--gpu-gib", "40", "--zero", "3"])
    out = capsys.readouterr().out
    assert "distill: my-model <- Qwen2-7B, 8 x 40 GB, ZeRO-3" in out and "micro-batch x accumulation" in out
