"""IVA importance weights (Eq. 3) and the Instruction-Relevance Score (Eq. 4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from aligntI_patch.irs import (
    instruction_relevance_score,
    irs_per_layer,
    pair_samples,
    select_iva_layer,
    single_turn_records,
    write_irs,
)
from aligntI_patch.iva import (
    importance_from_attention,
    importance_per_layer,
    instruction_vision_importance,
    iva_weights,
    llm_inputs,
    normalize_alpha,
    source_model,
)
from llava.constants import TokenType

P, V, N, R, TM = (
    TokenType.PAD,
    TokenType.VISUAL,
    TokenType.INSTRUCTION,
    TokenType.RESPONSE,
    TokenType.TEMPLATE,
)
N_V = 4
# One sample's layout in the expanded space: template, 4 visual, 3 instruction, template, 2 response.
LAYOUT = [TM, TM, V, V, V, V, N, N, N, TM, R, R]


def tiny_model(arch: str = "qwen2", layers: int = 2, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common)).eval()


def make_batch(rows: list[list[int]], seed: int = 0, pad_left: bool = False) -> dict[str, torch.Tensor]:
    """A collator-like batch; token_types mark VISUAL / INSTRUCTION directly in the expanded space."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if pad_left else slice(0, len(row))
        ids[b, span] = torch.randint(1, 128, (len(row),), generator=g)
        types[b, span] = torch.tensor([int(t) for t in row])
        mask[b, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_types": types}


# ---------------------------------------------------------------- alpha (Eq. 3)


def test_alpha_is_a_nonnegative_slice_of_softmax_rows() -> None:
    model = tiny_model()
    batch = make_batch([LAYOUT, LAYOUT[:-2], [TM, V, V, V, V, N, TM, R]], seed=3)
    for layer in (0, 1):
        alpha = instruction_vision_importance(model, batch, layer)
        assert alpha.shape == (3, N_V) and alpha.dtype == torch.float32
        assert torch.all(alpha > 0) and torch.all(alpha.sum(1) <= 1 + 1e-6)
        normed = instruction_vision_importance(model, batch, layer, normalize=True)
        torch.testing.assert_close(normed.mean(1), torch.ones(3))
        torch.testing.assert_close(normed, normalize_alpha(alpha))


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding written out: x (heads, T, D) at positions 0..T-1."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq[None]  # (T, D/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_alpha_matches_hand_computation_on_one_layer() -> None:
    model = tiny_model(layers=1, seed=5)
    batch = make_batch([LAYOUT], seed=4)
    alpha = instruction_vision_importance(model, batch, 0)
    cfg, layer = model.config, model.model.layers[0]
    heads, kv, d = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(batch["input_ids"][0]))  # (T, H)
        q = (
            (h @ layer.self_attn.q_proj.weight.T + layer.self_attn.q_proj.bias)
            .view(-1, heads, d)
            .transpose(0, 1)
        )
        k = (
            (h @ layer.self_attn.k_proj.weight.T + layer.self_attn.k_proj.bias)
            .view(-1, kv, d)
            .transpose(0, 1)
        )
        theta = cfg.rope_parameters["rope_theta"]
        q, k = rope(q, theta), rope(k, theta)
        k = k.repeat_interleave(heads // kv, dim=0)  # (heads, T, D)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        t = scores.shape[-1]
        scores = scores.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
        probs = scores.softmax(-1).mean(0)  # (T, T): mean over heads
    types = torch.tensor([int(x) for x in LAYOUT])
    expected = probs[types == N][:, types == V].mean(0)  # mean over instruction rows, visual columns
    torch.testing.assert_close(alpha[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("pad_left", [False, True])
def test_alpha_does_not_depend_on_padding(arch: str, pad_left: bool) -> None:
    model = tiny_model(arch)
    batch = make_batch([LAYOUT, LAYOUT[:-2], [TM, V, V, V, V, N, N, TM, R]], seed=7, pad_left=pad_left)
    alpha = instruction_vision_importance(model, batch, 1)
    for b in range(3):
        keep = batch["attention_mask"][b].bool()
        solo = {k: v[b : b + 1, keep] for k, v in batch.items()}  # the same row, unpadded
        torch.testing.assert_close(
            alpha[b], instruction_vision_importance(model, solo, 1)[0], atol=1e-6, rtol=0
        )


def test_importance_from_attention_handles_missing_image_and_instruction() -> None:
    attn = torch.rand(3, 2, 5, 8).softmax(-1)  # (B, heads, Q, T)
    valid = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    visual = torch.zeros(3, 8, dtype=torch.bool)
    visual[0, 1:4] = visual[1, 2:5] = True  # sample 2: no image
    alpha = importance_from_attention(attn, valid, visual)
    expected0 = attn[0, :, :2, 1:4].mean(dim=(0, 1))
    torch.testing.assert_close(alpha[0], expected0)
    assert torch.all(alpha[1] == 0) and torch.all(alpha[2] == 0)  # no instruction / no image
    assert torch.all(importance_from_attention(attn, valid, visual, normalize=True)[1:] == 0)
    # Head-averaged rows give the same alpha.
    torch.testing.assert_close(importance_from_attention(attn.mean(1), valid, visual), alpha)
    visual[2, :2] = True  # 2 visual positions where the others hold 3
    with pytest.raises(ValueError, match="different numbers of visual positions"):
        importance_from_attention(attn, valid, visual)


# ---------------------------------------------------------------- weights in sequence layout


def test_iva_weights_layout_sources_and_scales() -> None:
    types = make_batch([LAYOUT, [TM, N, R, R]], seed=0)["token_types"]  # sample 1: text only
    alpha = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.5, 0.5]])
    w = iva_weights(alpha, types, "teacher")
    assert w.shape == types.shape
    torch.testing.assert_close(w[0, 2:6], alpha[0])
    assert torch.all(w[0, :2] == 0) and torch.all(w[0, 6:] == 0) and torch.all(w[1] == 0)
    torch.testing.assert_close(iva_weights(alpha, types, "student"), w)  # same layout, other model's alpha
    torch.testing.assert_close(
        iva_weights(alpha, types, "teacher", normalize=True)[0, 2:6], alpha[0] / 0.6 * 4
    )
    uniform = iva_weights(None, types, "uniform")
    torch.testing.assert_close(uniform[0, 2:6], torch.full((4,), 0.25))  # sums to 1, like raw alpha at most
    assert uniform[0].sum() == pytest.approx(1.0) and torch.all(uniform[1] == 0)
    torch.testing.assert_close(iva_weights(None, types, "uniform", normalize=True)[0, 2:6], torch.ones(4))
    with pytest.raises(ValueError, match="needs alpha"):
        iva_weights(None, types, "student")
    with pytest.raises(ValueError, match="one of"):
        iva_weights(alpha, types, "random")
    with pytest.raises(ValueError, match="does not match"):
        iva_weights(alpha[:, :3], types, "teacher")


def test_source_switch_picks_the_model() -> None:
    teacher, student = tiny_model(seed=0), tiny_model(seed=1)
    batch = make_batch([LAYOUT, LAYOUT], seed=2)
    assert source_model("teacher", teacher, student) is teacher
    assert source_model("student", teacher, student) is student
    assert source_model("uniform", teacher, student) is None
    with pytest.raises(ValueError, match="one of"):
        source_model("both", teacher, student)
    a_t = instruction_vision_importance(source_model("teacher", teacher, student), batch, 1)
    a_s = instruction_vision_importance(source_model("student", teacher, student), batch, 1)
    assert not torch.allclose(a_t, a_s)
    assert not torch.allclose(iva_weights(a_t, batch["token_types"], "teacher"),
                              iva_weights(a_s, batch["token_types"], "student"))  # fmt: skip


# ---------------------------------------------------------------- IRS (Eq. 4)


def test_irs_identical_orthogonal_and_hand_case() -> None:
    alpha = torch.rand(5, 7)
    assert instruction_relevance_score(alpha, alpha.clone()) == pytest.approx(0.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    assert instruction_relevance_score(a, b) == pytest.approx(1.0)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert instruction_relevance_score(a, b) == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2)
    # A pair with an all-zero alpha (no instruction) is skipped.
    a0, b0 = torch.cat([a, torch.zeros(1, 2)]), torch.cat([b, torch.ones(1, 2)])
    assert instruction_relevance_score(a0, b0) == pytest.approx(instruction_relevance_score(a, b))
    with pytest.raises(ValueError, match="no pair"):
        instruction_relevance_score(torch.zeros(2, 3), torch.ones(2, 3))


def test_irs_per_layer_matches_alpha_layer_by_layer() -> None:
    model = tiny_model("qwen3", layers=3)
    rows_a = [LAYOUT, [TM, V, V, V, V, N, N, TM, R]]
    rows_b = [[TM, V, V, V, V, N, N, N, N, TM, R], LAYOUT]
    batches_a = [make_batch(rows_a, seed=1), make_batch(rows_a, seed=2, pad_left=True)]
    batches_b = [make_batch(rows_b, seed=3), make_batch(rows_b, seed=4, pad_left=True)]
    scores = irs_per_layer(model, batches_a, batches_b)
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    for layer in range(3):
        alpha_a = torch.cat([instruction_vision_importance(model, b, layer) for b in batches_a])
        alpha_b = torch.cat([instruction_vision_importance(model, b, layer) for b in batches_b])
        assert scores[layer] == pytest.approx(instruction_relevance_score(alpha_a, alpha_b), abs=1e-6)
    assert irs_per_layer(model, batches_a, batches_b, layers=[2]) == pytest.approx(scores[2:], abs=1e-6)
    per_layer = importance_per_layer(model, batches_a[0], [0, 2])
    torch.testing.assert_close(per_layer[2], instruction_vision_importance(model, batches_a[0], 2))


def record(image: str | None, question: str, rid: int) -> dict:
    conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}]
    return {"id": rid, "conversations": conv, **({"image": image} if image else {})}


def test_pair_samples_prefers_same_image_different_instruction() -> None:
    records = [
        record("a.png", "What color is the circle?", 0),
        record("b.png", "How many squares?", 1),
        record("a.png", "Is there a cross?", 2),
        record("a.png", "What color is the circle?", 3),  # same instruction as 0: never paired with it
        record(None, "Tell me a joke.", 4),
        record("b.png", "What is on the left?", 5),
    ]
    pairs = pair_samples(records, seed=0, pairing="same_image")
    assert sorted(tuple(sorted(p)) for p in pairs) in ([(0, 2), (1, 5)], [(1, 5), (2, 3)])
    for i, j in pairs:
        assert records[i]["image"] == records[j]["image"]
        assert records[i]["conversations"][0] != records[j]["conversations"][0]
    assert pair_samples(records, seed=0, pairing="same_image") == pairs  # deterministic
    assert len(pair_samples(records, num_pairs=1, seed=0, pairing="same_image")) == 1


def test_pair_samples_falls_back_to_random_different_images() -> None:
    records = [record(f"{i % 5}.png", f"q{i}", i) for i in range(5)] + [record(None, "text", 5)]
    pairs = pair_samples(records, seed=1, pairing="same_image")
    assert len(pairs) == 2
    used = [i for p in pairs for i in p]
    assert len(set(used)) == 4 and 5 not in used
    assert all(records[i]["image"] != records[j]["image"] for i, j in pairs)
    assert pair_samples(records, seed=1, pairing="same_image") == pairs
    assert len(pair_samples(records, num_pairs=1, seed=1, pairing="same_image")) == 1


def test_iid_pairs_are_random_disjoint_pairs_of_image_samples() -> None:
    """Eq. 4's expectation over i.i.d. inputs: any two image samples may pair (same image or not)."""
    records = [record(f"{i % 3}.png", f"q{i}", i) for i in range(40)] + [record(None, "text", 40)]
    pairs = pair_samples(records, seed=0)
    assert len(pairs) == 20 and len({i for p in pairs for i in p}) == 40  # disjoint, every image sample once
    same = sum(records[i]["image"] == records[j]["image"] for i, j in pairs)
    assert 0 < same < 20  # neither forced nor excluded
    assert pair_samples(records, seed=0) == pairs and pair_samples(records, seed=1) != pairs
    assert pair_samples(records, num_pairs=5, seed=0) == pairs[:5]
    with pytest.raises(ValueError, match="pairing must be one of"):
        pair_samples(records, pairing="same")


def test_single_turn_records_split_multi_turn_conversations() -> None:
    multi = {
        "id": "m",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "Two."},
        ],
    }
    out = single_turn_records([multi, record(None, "text", 1)])
    assert [r["id"] for r in out] == ["m_turn0", "m_turn1", 1]
    assert out[1]["conversations"] == [
        {"from": "human", "value": "<image>\nHow many?"},
        {"from": "gpt", "value": "Two."},
    ]
    assert pair_samples(out, pairing="same_image") in ([(0, 1)], [(1, 0)])


# ---------------------------------------------------------------- layer selection


def test_select_iva_layer(tmp_path) -> None:
    model = tiny_model(layers=3)
    assert select_iva_layer(2, model) == 2 and select_iva_layer("1", model) == 1
    for bad in (3, -1, "7"):
        with pytest.raises(ValueError, match=r"out of range: the model has layers 0\.\.2"):
            select_iva_layer(bad, model)
    with pytest.raises(ValueError, match="'auto' or a layer index"):
        select_iva_layer("best", model)
    with pytest.raises(ValueError, match="needs an irs.json"):
        select_iva_layer("auto", model, irs_path=tmp_path / "missing.json")
    best = write_irs(tmp_path, [0, 1, 2], [0.1, 0.4, 0.2], num_pairs=8)
    assert best == 1 and (tmp_path / "irs.png").stat().st_size > 0
    saved = json.loads((tmp_path / "irs.json").read_text())
    assert saved == {"layers": [0, 1, 2], "irs": [0.1, 0.4, 0.2], "best_layer": 1, "num_pairs": 8, "pairing": "iid"}
    both = write_irs(tmp_path / "both", [0, 1, 2], [0.3, 0.1, 0.2], 8, "iid", {"same_image": ([0.1, 0.2, 0.5], 6)})
    curves = json.loads((tmp_path / "both" / "irs.json").read_text())["curves"]
    assert both == 0 and curves == {"iid": {"irs": [0.3, 0.1, 0.2], "num_pairs": 8},
                                    "same_image": {"irs": [0.1, 0.2, 0.5], "num_pairs": 6}}
    assert select_iva_layer("auto", model, irs_path=tmp_path / "irs.json") == 1
    (tmp_path / "bad.json").write_text(json.dumps({**saved, "best_layer": 9}))
    with pytest.raises(ValueError, match="best_layer 9 out of range for the teacher, which has 3 layers"):
        select_iva_layer("auto", model, irs_path=tmp_path / "bad.json", name="the teacher")
    # IRS of a deeper model (a teacher's irs.json for the student): caught even where best_layer fits
    (tmp_path / "deeper.json").write_text(json.dumps({**saved, "layers": [0, 1, 2, 3, 4], "best_layer": 1}))
    with pytest.raises(ValueError, match="scores layers up to 4 but the student has 3: .*another model"):
        select_iva_layer("auto", model, irs_path=tmp_path / "deeper.json", name="the student")
    # Without a file: computed on the given pairs, argmax of IRS.
    batches_a = [make_batch([LAYOUT, LAYOUT], seed=1)]
    batches_b = [make_batch([[TM, V, V, V, V, N, TM, R], LAYOUT], seed=2)]
    scores = irs_per_layer(model, batches_a, batches_b)
    chosen = select_iva_layer("auto", model, paired_batches=(batches_a, batches_b))
    assert chosen == max(range(3), key=scores.__getitem__)


def eager_alpha(model: torch.nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Reference alpha (B, N_v) from eager output_attentions in the expanded layout, whatever `model` runs."""
    inputs = llm_inputs(model, batch)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids, output_attentions=True).attentions[layer]  # fmt: skip
    finally:
        model.set_attn_implementation(impl)
    attn = attn.mean(1)  # (B, T', T'): mean over heads
    types = inputs.token_types
    rows = [attn[b][types[b] == N][:, types[b] == V] for b in range(len(attn))]  # (N_i, N_v) each
    return torch.stack([r.mean(0) for r in rows])  # (B, N_v)


# flex_attention runs on CUDA only (torch's CPU kernel is unreliable: llava/model/builder.py)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention runs on CUDA only")


def _on(device: torch.device | str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.fixture(scope="module")
def flex_lms() -> dict[str, transformers.PreTrainedModel]:
    """flex_attention tiny models on CUDA, one per arch, shared by the module (flex compiles once per process)."""
    models = {arch: tiny_model(arch).cuda() for arch in ("qwen2", "qwen3")}
    for model in models.values():
        model.set_attn_implementation("flex_attention")
    return models


@needs_cuda
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("pad_left", [False, True])
def test_alpha_under_flex_attention_equals_eager(flex_lms, arch: str, pad_left: bool) -> None:
    """The teacher's ground-truth pass under flex_attention hands the hook a BlockMask (causal + padding)."""
    model = flex_lms[arch]
    batch = _on(model.device, make_batch([LAYOUT, LAYOUT[:-2], [TM, V, V, V, V, N, N, TM, R]], seed=7,
                                         pad_left=pad_left))
    alpha = instruction_vision_importance(model, batch, 1)
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(alpha, eager_alpha(model, batch, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("flex_attention", marks=needs_cuda)])
def test_alpha_through_the_llava_layout_with_images(attn: str) -> None:
    """With images, alpha is read in the expanded layout made by prepare_inputs_labels_for_multimodal."""
    llava_qwen = pytest.importorskip("llava.model.language_model.llava_qwen")
    from llava.constants import IMAGE_TOKEN_INDEX

    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    cfg = llava_qwen.LlavaQwenConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, mm_vision_tower="tiny",
                                     mm_vision_config=vision.to_dict(), mm_hidden_size=16)  # fmt: skip
    torch.manual_seed(0)
    # from_config sets the LLM's attention only; the SigLIP tower keeps sdpa (no flex compile for it)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    model.to("cuda" if attn == "flex_attention" else "cpu")
    assert type(model) is llava_qwen.LlavaQwenForCausalLM and model.config._attn_implementation == attn
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 0], [0, 0, 5, IMAGE_TOKEN_INDEX, 7, 8, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    types = torch.tensor([[TM, V, N, N, N, R, P], [P, P, TM, V, N, N, R]])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_types": types,
        "images": torch.randn(2, 3, 16, 16),
    }
    batch = _on(model.device, batch)
    alpha = instruction_vision_importance(model, batch, 1)
    assert alpha.shape == (2, model.num_image_tokens)
    torch.testing.assert_close(alpha, eager_alpha(model, batch, 1), atol=1e-6, rtol=0)


def test_irs_cli_end_to_end(tmp_path) -> None:
    """python -m aligntI_patch.irs on a tiny saved LLaVA checkpoint and a LLaVA JSON with multi-turn records."""
    pytest.importorskip("llava.train.data")
    from PIL import Image

    from aligntI_patch.irs import main
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
    from llava.tiny.tokenizer import train_tokenizer

    questions = [
        "What color is the circle?",
        "How many squares?",
        "Is there a cross?",
        "What is on the left?",
    ]
    records = []
    for k in range(3):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
        turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": questions[t // 2] if t % 2 == 0 else "Red."}
                 for t in range(8)]  # fmt: skip
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append({"id": k, "image": f"{k}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(records))
    tokenizer = train_tokenizer(
        questions + ["Red.", "user\n", "assistant\n"], tmp_path / "ckpt", vocab_size=300
    )
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    cfg = LlavaQwenConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, mm_vision_tower="tiny",
                          mm_vision_config=vision.to_dict(), mm_hidden_size=16,
                          pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlavaQwenForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    main(["--model-path", str(tmp_path / "ckpt"), "--data-path", str(tmp_path / "data.json"),
          "--image-folder", str(tmp_path), "--num-pairs", "5", "--batch-size", "2",
          "--output-dir", str(tmp_path / "out")])  # fmt: skip
    result = json.loads((tmp_path / "out" / "irs.json").read_text())
    # 12 single turns: 6 disjoint iid pairs >= 5; same-image: 3 images x 2 disjoint turn pairs >= 5
    assert result["layers"] == [0, 1, 2] and result["num_pairs"] == 5 and result["pairing"] == "iid"
    assert {k: v["num_pairs"] for k, v in result["curves"].items()} == {"iid": 5, "same_image": 5}
    assert result["curves"]["iid"]["irs"] == result["irs"]
    assert all(0 <= s <= 1 for c in result["curves"].values() for s in c["irs"]) and len(result["irs"]) == 3
    assert result["best_layer"] == max(range(3), key=result["irs"].__getitem__)
    assert (tmp_path / "out" / "irs.png").stat().st_size > 0
