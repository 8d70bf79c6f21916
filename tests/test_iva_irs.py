"""IVA importance weights (Eq. 3) against eager attention. The IRS tests (Eq. 4) are in tests/test_irs.py, which
reuses the tiny models, batches and eager reference defined here."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import transformers

from aligntI_patch.iva import (
    importance_from_attention,
    instruction_vision_importance,
    iva_weights,
    normalize_alpha,
    source_model,
)
from llava.constants import IMAGE_TOKEN_INDEX, TokenType

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


def tiny_model(
    arch: str = "qwen2", layers: int = 2, seed: int = 0, init: float = 0.02
) -> transformers.PreTrainedModel:
    """A random tiny LM; `init` 0.3 instead of 0.02 gives peaked attention, hence IRS far from 0 and layers
    that differ (at 0.02 every attention row is nearly uniform and IRS is about 1e-5 on every layer)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=init)  # fmt: skip
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


@contextlib.contextmanager
def eager(model: torch.nn.Module):
    """`model` under eager attention for the block (it returns attention weights), then back."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(impl)


def eager_alphas(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], layers: list[int]
) -> dict[int, torch.Tensor]:
    """Reference alpha (B, N_v) per layer: each row unpadded through the plain forward (`model(input_ids=...,
    images=...)`, eager, `output_attentions=True`), then Eq. 3 as loops: alpha_k = 1/(heads N_i) sum_h sum_u
    A_h(u, k) over the instruction rows u and visual columns k (the image token's type spread over its N_v
    expanded positions)."""
    images = iter(batch["images"]) if batch.get("images") is not None else None
    alphas: dict[int, list] = {layer: [] for layer in layers}
    for b in range(len(batch["input_ids"])):
        keep = batch["attention_mask"][b].bool()
        ids, types = batch["input_ids"][b, keep], batch["token_types"][b, keep].tolist()
        kwargs = {"images": next(images)[None]} if (ids == IMAGE_TOKEN_INDEX).any() else {}
        with torch.no_grad(), eager(model):
            attentions = model(input_ids=ids[None], output_attentions=True, **kwargs).attentions
        if kwargs:  # the image token became T' - T + 1 visual positions
            at = ids.tolist().index(IMAGE_TOKEN_INDEX)
            types = types[:at] + [int(V)] * (attentions[0].shape[-1] - len(ids) + 1) + types[at + 1 :]
        rows = [u for u, t in enumerate(types) if t == N]
        cols = [k for k, t in enumerate(types) if t == V]
        for layer in layers:
            attn = attentions[layer][0].cpu()  # (heads, T', T')
            heads = range(attn.shape[0])
            total = len(heads) * len(rows)
            alpha = [sum(float(attn[h, u, k]) for h in heads for u in rows) / total for k in cols]
            alphas[layer].append(alpha)
    return {layer: torch.tensor(a) for layer, a in alphas.items()}


def eager_alpha(model: torch.nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """`eager_alphas` of one layer."""
    return eager_alphas(model, batch, [layer])[layer]


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
        ratio = normed / alpha  # a rescaling of each row: one factor per sample
        torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, N_V))


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
def test_alpha_equals_eager_attention_row_by_row(arch: str, pad_left: bool) -> None:
    """alpha of a padded batch (rows of different lengths) against `eager_alpha`: each row alone, unpadded."""
    model = tiny_model(arch, init=0.3)
    batch = make_batch([LAYOUT, LAYOUT[:-2], [TM, V, V, V, V, N, N, TM, R]], seed=7, pad_left=pad_left)
    expected = eager_alphas(model, batch, [0, 1])
    for layer in (0, 1):
        alpha = instruction_vision_importance(model, batch, layer)
        torch.testing.assert_close(alpha, expected[layer], atol=1e-6, rtol=0)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the layers differ


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
    torch.testing.assert_close(importance_from_attention(attn.mean(1), valid, visual)[0], expected0)
    visual[2, :2] = True  # 2 visual positions where the others hold 3
    with pytest.raises(ValueError, match="different numbers of visual positions"):
        importance_from_attention(attn, valid, visual)


# ---------------------------------------------------------------- weights in sequence layout


def test_iva_weights_layout_sources_and_scales() -> None:
    """Weights written out by hand: alpha_k at the k-th visual position (LAYOUT's 2..5), 0 elsewhere."""
    types = make_batch([LAYOUT, [TM, N, R, R]], seed=0)["token_types"]  # sample 1: text only
    teacher_alpha = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.5, 0.5]])
    student_alpha = torch.tensor([[0.4, 0.0, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]])
    zeros = [0.0] * 12
    teacher_row = [0.0, 0.0, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    student_row = [0.0, 0.0, 0.4, 0.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    teacher_w = iva_weights(teacher_alpha, types, "teacher")
    student_w = iva_weights(student_alpha, types, "student")
    torch.testing.assert_close(teacher_w, torch.tensor([teacher_row, zeros]))
    torch.testing.assert_close(student_w, torch.tensor([student_row, zeros]))
    # normalized: alpha / sum(alpha) * N_v, i.e. [0.1, 0.2, 0.3, 0] / 0.6 * 4 and [0.4, 0, 0.1, 0.2] / 0.7 * 4
    torch.testing.assert_close(iva_weights(teacher_alpha, types, "teacher", normalize=True)[0, 2:6],
                               torch.tensor([2 / 3, 4 / 3, 2.0, 0.0]))  # fmt: skip
    torch.testing.assert_close(iva_weights(student_alpha, types, "student", normalize=True)[0, 2:6],
                               torch.tensor([16 / 7, 0.0, 4 / 7, 8 / 7]))  # fmt: skip
    torch.testing.assert_close(normalize_alpha(torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])),
                               torch.tensor([[2 / 3, 4 / 3, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # fmt: skip
    uniform = iva_weights(None, types, "uniform")
    torch.testing.assert_close(uniform[0, 2:6], torch.full((4,), 0.25))  # sums to 1, like raw alpha at most
    assert uniform[0].sum() == pytest.approx(1.0) and torch.all(uniform[1] == 0)
    torch.testing.assert_close(iva_weights(None, types, "uniform", normalize=True)[0, 2:6], torch.ones(4))
    with pytest.raises(ValueError, match="needs alpha"):
        iva_weights(None, types, "student")
    with pytest.raises(ValueError, match="one of"):
        iva_weights(teacher_alpha, types, "random")
    with pytest.raises(ValueError, match="does not match"):
        iva_weights(teacher_alpha[:, :3], types, "teacher")


def test_source_switch_picks_the_model() -> None:
    """Teacher and student alpha each equal `eager_alpha` of their own model, and differ from each other."""
    teacher, student = tiny_model(seed=0, init=0.3), tiny_model(seed=1, init=0.3)
    batch = make_batch([LAYOUT, LAYOUT[:-1]], seed=2)
    assert source_model("teacher", teacher, student) is teacher
    assert source_model("student", teacher, student) is student
    assert source_model("uniform", teacher, student) is None
    with pytest.raises(ValueError, match="one of"):
        source_model("both", teacher, student)
    a_t = instruction_vision_importance(source_model("teacher", teacher, student), batch, 1)
    a_s = instruction_vision_importance(source_model("student", teacher, student), batch, 1)
    torch.testing.assert_close(a_t, eager_alpha(teacher, batch, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(a_s, eager_alpha(student, batch, 1), atol=1e-6, rtol=0)
    assert not torch.allclose(a_t, a_s, atol=1e-2)


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

    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    cfg = llava_qwen.LlavaQwenConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, mm_vision_tower="tiny",
                                     mm_vision_config=vision.to_dict(), mm_hidden_size=16,
                                     initializer_range=0.3)  # fmt: skip
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
