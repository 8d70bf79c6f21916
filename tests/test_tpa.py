"""TPA (paper section 3.2): the parallel candidate pass equals the naive loop; its fast forms stay exact."""


import pytest
import torch
import torch.nn.functional as F
import transformers

from aligntI_patch import tpa
from aligntI_patch.candidates import (
    candidate_rows,
    dedupe_candidates,
    gather_positions,
    response_positions,
    sample_candidates,
)
from aligntI_patch.tpa import (
    TPAConfig,
    appended_pass,
    cache_available,
    cached_pass,
    tpa_forward,
    transition_logits,
)
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.llava_arch import build_layout, positions_from_mask

V = 96
N_V = 5  # visual positions per image of the splicing stand-in


def tiny_lm(
    family: str, impl: str = "sdpa", seed: int = 0, hidden: int = 32, **config_kw
) -> transformers.PreTrainedModel:
    """A 2-layer Qwen2/Qwen3 with large init, so attention patterns (and mask errors) change the logits."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        **config_kw,
    )
    cfg = transformers.Qwen3Config(head_dim=8, **kw) if family == "qwen3" else transformers.Qwen2Config(**kw)
    cfg._attn_implementation = impl
    cls = transformers.Qwen3ForCausalLM if family == "qwen3" else transformers.Qwen2ForCausalLM
    return cls(cfg).eval()


def padded_batch(padding: str, T: int = 8, seed: int = 1):
    """B=2, one sample padded by 2 (left or right); the last 3 real tokens of each sample are the response."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, V, (2, T), generator=g)
    attention_mask = torch.ones(2, T, dtype=torch.long)
    response_mask = torch.zeros(2, T, dtype=torch.bool)
    if padding == "left":
        attention_mask[0, :2] = 0
        response_mask[:, T - 3 :] = True
    else:
        attention_mask[1, T - 2 :] = 0
        response_mask[0, T - 3 :] = True
        response_mask[1, T - 5 : T - 2] = True
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask, response_mask


def naive_transition_logits(model, input_ids, attention_mask, response_mask, candidates):
    """The definition: one plain, unpadded forward per (b, k, u) on prefix + [candidate]."""
    B, T, d = candidates.shape
    out = torch.zeros(B, T, d, V)
    for b in range(B):
        for k in range(T):
            if not response_mask[b, k]:
                continue
            prefix = input_ids[b, :k][attention_mask[b, :k].bool()]
            for u in range(d):
                seq = torch.cat([prefix, candidates[b, k, u : u + 1]])[None]
                out[b, k, u] = model(input_ids=seq).logits[0, -1]
    return out


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_transition_logits_equals_naive_loop(family, impl, padding, d):
    model = tiny_lm(family, impl)
    input_ids, attention_mask, response_mask = padded_batch(padding)
    candidates = torch.randint(1, V, (2, input_ids.shape[1], d), generator=torch.Generator().manual_seed(2))
    fast = transition_logits(model, input_ids, attention_mask, response_mask, candidates)
    naive = naive_transition_logits(model, input_ids, attention_mask, response_mask, candidates)
    assert fast.shape == (2, input_ids.shape[1], d, V)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)
    assert fast[~response_mask].abs().max() == 0
    # the candidate matters: transition logits are not the ground-truth logits at k
    gt = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (fast[response_mask][:, 0] - gt[response_mask]).abs().max() > 1e-2




class SplicingQwen2(transformers.Qwen2ForCausalLM):
    """Stand-in for the LLaVA model: ``images`` are ready features ``[B, N_v, H]`` placed at the image token."""

    def build_layout(self, input_ids, attention_mask=None, labels=None, token_types=None, padding_side=None,
                     position_ids=None):
        return build_layout(input_ids, attention_mask, labels, token_types, N_V, padding_side, position_ids)

    def embed_layout(self, layout, images, vision_in_step=False):
        embeds = self.get_input_embeddings()(layout.ids)
        return embeds.masked_scatter(layout.visual[..., None], images.reshape(-1, images.shape[-1]))


def reference_splice(model, input_ids, attention_mask, images):
    """The reference layout, one row at a time: (inputs_embeds, attention_mask, source_index) with the N_v
    features in place of each row's single image token (every row the same length here)."""
    B, T = input_ids.shape
    embeds, masks, sources = [], [], []
    for b in range(B):
        j = int((input_ids[b] == IMAGE_TOKEN_INDEX).nonzero())
        text = model.get_input_embeddings()(input_ids[b].clamp_min(0))  # (T, H)
        embeds.append(torch.cat([text[:j], images[b], text[j + 1 :]]))
        masks.append(torch.cat([attention_mask[b, :j], attention_mask.new_ones(N_V), attention_mask[b, j + 1 :]]))
        src = torch.arange(T, device=input_ids.device)
        sources.append(torch.cat([src[:j], src[j].repeat(N_V), src[j + 1 :]]))
    attn = torch.stack(masks)
    return torch.stack(embeds), attn, torch.stack(sources).masked_fill(attn == 0, -1)


@torch.no_grad()
def test_transition_logits_maps_multimodal_positions():
    torch.manual_seed(0)
    model = SplicingQwen2(tiny_lm("qwen2").config).eval()
    input_ids, attention_mask, response_mask = padded_batch("left")
    input_ids[:, 3] = IMAGE_TOKEN_INDEX  # one image per sample, before the response
    images = torch.randn(2, N_V, 32)  # N_v visual embeddings
    candidates = torch.randint(1, V, (2, input_ids.shape[1], 2), generator=torch.Generator().manual_seed(2))
    fast = transition_logits(model, input_ids, attention_mask, response_mask, candidates, images=images)
    embeds, mask, source_index = reference_splice(model, input_ids, attention_mask, images)
    for b, k in response_mask.nonzero().tolist():
        j = int((source_index[b] == k).nonzero())  # expanded position of k
        prefix = embeds[b, :j][mask[b, :j].bool()]
        for u in range(2):
            seq = torch.cat([prefix, model.get_input_embeddings()(candidates[b, k, u : u + 1])])[None]
            torch.testing.assert_close(fast[b, k, u], model(inputs_embeds=seq).logits[0, -1], rtol=0, atol=1e-5)
    assert fast[~response_mask].abs().max() == 0


def embedded(model, padding: str):
    input_ids, attention_mask, response_mask = padded_batch(padding)
    embeds = model.get_input_embeddings()(input_ids)
    return input_ids, embeds, attention_mask, positions_from_mask(attention_mask), response_mask


def probe_loss(gt_hidden, cand_hidden, attention_mask, rows, probe_gt, probe_cand):
    """A scalar touching every used output: valid ground-truth rows and valid candidate rows."""
    gt = (gt_hidden * probe_gt).sum(-1)[attention_mask.bool()].sum()
    cand = (cand_hidden * probe_cand[: cand_hidden.shape[1]]).sum(-1)[rows.pos >= 0].sum()
    return gt + cand


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_cached_pass_equals_appended_pass_values_and_gradients(family, impl, padding):
    model = tiny_lm(family, impl).train()
    input_ids, _, attention_mask, position_ids, response_mask = embedded(model, padding)
    cand_pos = response_positions(response_mask)
    cands = torch.randint(1, V, (*cand_pos.shape, 3), generator=torch.Generator().manual_seed(3))
    rows = candidate_rows(cand_pos, cands, input_ids.shape[1])
    probe_gt, probe_cand = torch.randn(32), torch.randn(rows.pos.shape[1], 32)
    results = []
    for fn in (appended_pass, cached_pass):
        model.zero_grad()
        embeds = model.get_input_embeddings()(input_ids)  # fresh graph, gradients reach the embedding
        gt_h, cand_h = fn(model, embeds, attention_mask, position_ids, rows.pos, rows.ids)
        probe_loss(gt_h, cand_h, attention_mask, rows, probe_gt, probe_cand).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}  # no lm_head
        results.append((gt_h.detach(), cand_h.detach(), grads))
    (gt_a, cand_a, grads_a), (gt_c, cand_c, grads_c) = results
    valid = attention_mask.bool()
    torch.testing.assert_close(gt_c[valid], gt_a[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cand_c[rows.pos >= 0], cand_a[rows.pos >= 0], rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_c.keys() and len(grads_a) > 10
    for name, g in grads_a.items():
        rel = (grads_c[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


# ----------------------------------------------------------------------------- FlexAttention (BlockMask ribbon)
# CUDA only: torch's compiled CPU FlexAttention kernel returned wrong values (head_dim 8/16) and failed to compile
# dynamic shapes on an AVX2 CPU, so load_pretrained_model refuses flex off CUDA. The BlockMasks themselves are checked
# on CPU against the dense masks (tests/test_ribbon_mask.py). Each flex model has an sdpa twin built from the same
# seed (the same weights), kept on CPU where the naive loop runs.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention runs on CUDA only")


@needs_cuda
@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_flex_attention_equals_naive_loop_and_sdpa(family, padding, d):
    flex, twin = tiny_lm(family, "flex_attention").cuda(), tiny_lm(family, "sdpa")
    input_ids, attention_mask, response_mask = padded_batch(padding)
    candidates = torch.randint(1, V, (2, input_ids.shape[1], d), generator=torch.Generator().manual_seed(2))
    fast = transition_logits(flex, *(x.cuda() for x in (input_ids, attention_mask, response_mask, candidates)))
    naive = naive_transition_logits(twin, input_ids, attention_mask, response_mask, candidates)
    torch.testing.assert_close(fast.cpu(), naive, rtol=0, atol=1e-5)

    _, embeds, attention_mask, position_ids, _ = embedded(twin, padding)
    cand_pos = response_positions(response_mask)
    rows = candidate_rows(cand_pos, gather_positions(candidates, cand_pos), input_ids.shape[1])
    valid, cand_valid = attention_mask.bool(), rows.pos >= 0
    gt_ref, cand_ref = appended_pass(twin, embeds, attention_mask, position_ids, rows.pos, rows.ids)
    for fn in (appended_pass, cached_pass):  # BlockMask [B,1,T+M,T+M], and [B,1,M,T+M] against T cached keys
        gt_h, cand_h = fn(flex, *(x.cuda() for x in (embeds, attention_mask, position_ids, rows.pos, rows.ids)))
        torch.testing.assert_close(gt_h.cpu()[valid], gt_ref[valid], rtol=0, atol=1e-5)
        torch.testing.assert_close(cand_h.cpu()[cand_valid], cand_ref[cand_valid], rtol=0, atol=1e-5)


@needs_cuda
@torch.no_grad()
def test_flex_attention_multimodal_equals_sdpa():
    """Images spliced before the response: flex equals sdpa (which the naive loop checks above)."""
    models = []
    for impl in ("flex_attention", "sdpa"):
        config = tiny_lm("qwen2", impl).config
        torch.manual_seed(0)
        models.append(SplicingQwen2(config).eval().cuda())
    input_ids, attention_mask, response_mask = padded_batch("left")
    input_ids[:, 3] = IMAGE_TOKEN_INDEX
    images = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    candidates = torch.randint(1, V, (2, input_ids.shape[1], 2), generator=torch.Generator().manual_seed(2))
    inputs = [x.cuda() for x in (input_ids, attention_mask, response_mask, candidates, images)]
    flex, twin = (transition_logits(m, *inputs) for m in models)
    torch.testing.assert_close(flex, twin, rtol=0, atol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FlexAttention has no CPU backward (torch's flex_attention raises NotImplementedError for "
    "inputs requiring grad on CPU): the student's pass under flex_attention needs CUDA",
)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_flex_attention_gradients_equal_sdpa(family):
    input_ids, attention_mask, response_mask = (x.cuda() for x in padded_batch("left"))
    position_ids = positions_from_mask(attention_mask)
    cand_pos = response_positions(response_mask)
    cands = torch.randint(1, V, (*cand_pos.shape, 3), generator=torch.Generator().manual_seed(3)).cuda()
    rows = candidate_rows(cand_pos, cands, input_ids.shape[1])
    probe_gt, probe_cand = torch.randn(32).cuda(), torch.randn(rows.pos.shape[1], 32).cuda()
    grads = []
    for impl, fn in [("sdpa", appended_pass), ("flex_attention", appended_pass), ("flex_attention", cached_pass)]:
        model = tiny_lm(family, impl).cuda().train()
        embeds = model.get_input_embeddings()(input_ids)
        gt_h, cand_h = fn(model, embeds, attention_mask, position_ids, rows.pos, rows.ids)
        probe_loss(gt_h, cand_h, attention_mask, rows, probe_gt, probe_cand).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for got in grads[1:]:
        assert got.keys() == grads[0].keys()
        for name, g in grads[0].items():
            rel = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def kl_rows(teacher_hidden, student_hidden, t_model, s_model):
    """Per-row KL(P_T || P_S) from hidden states (the divergence of Eq. 7)."""
    t_logp = F.log_softmax(t_model.get_output_embeddings()(teacher_hidden), dim=-1)
    s_logp = F.log_softmax(s_model.get_output_embeddings()(student_hidden), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def tpa_loss(out, student, teacher):
    """Eq. 7 with the rows' weights: candidate rows + reused ground-truth transitions."""
    rows = out.rows
    cand = (rows.weight * kl_rows(out.teacher_cand, out.student_cand, teacher, student)).sum()
    gt = (rows.gt_weight * kl_rows(out.teacher_gt, out.student_gt, teacher, student)).sum()
    return cand + gt


def _forward_with_rows(student, teacher, input_ids, attention_mask, position_ids, rows):
    s_gt, s_cand = cached_pass(
        student, student.get_input_embeddings()(input_ids), attention_mask, position_ids, rows.pos, rows.ids
    )
    with torch.no_grad():
        t_gt, t_cand = cached_pass(
            teacher, teacher.get_input_embeddings()(input_ids), attention_mask, position_ids, rows.pos, rows.ids
        )
    return tpa.TPAForward(rows, s_gt, s_cand, t_gt, t_cand)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_dedupe_gives_same_loss_and_gradients(family):
    student, teacher = tiny_lm(family, seed=0).train(), tiny_lm(family, seed=5, hidden=48)
    input_ids, _, attention_mask, position_ids, response_mask = embedded(student, "left")
    cand_pos = response_positions(response_mask)  # (2, 3)
    gt = gather_positions(input_ids, cand_pos)  # (2, 3) y_k
    d = 4
    cands = torch.randint(1, V, (2, 3, d), generator=torch.Generator().manual_seed(4))
    cands[0, 0] = torch.tensor([7, 7, 9, 7])  # repeats
    cands[0, 1] = gt[0, 1]  # all equal to the ground truth: no row at all
    cands[1, 0, 1:3] = gt[1, 0]  # two ground-truth hits and two others
    cands[1, 2] = torch.tensor([5, 6, 5, 6])
    plain = candidate_rows(cand_pos, cands, input_ids.shape[1])
    deduped = dedupe_candidates(cand_pos, cands, input_ids)
    assert deduped.pos.shape[1] < plain.pos.shape[1]
    assert torch.isclose(deduped.weight.sum() + deduped.gt_weight.sum(), plain.weight.sum())

    losses, grads = [], []
    for rows in (plain, deduped):
        student.zero_grad()
        loss = tpa_loss(
            _forward_with_rows(student, teacher, input_ids, attention_mask, position_ids, rows), student, teacher
        )
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    for name, g in grads[0].items():
        rel = (grads[1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def test_tpa_forward_under_checkpointing_equals_the_cached_form():
    student, teacher = tiny_lm("qwen2", seed=0).train(), tiny_lm("qwen2", seed=5, hidden=48)
    input_ids, _, attention_mask, position_ids, response_mask = embedded(student, "right")
    cfg = TPAConfig(d=4, strategy="nucleus", top_p=0.9, dedupe=True)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            student.activation_checkpointing_enable({"use_reentrant": False})
        assert cache_available(student) is not checkpointing
        student.zero_grad()
        out = tpa_forward(
            student,
            teacher,
            student.get_input_embeddings()(input_ids),
            teacher.get_input_embeddings()(input_ids),
            attention_mask,
            position_ids,
            response_mask,
            input_ids,
            cfg,
            generator=torch.Generator().manual_seed(0),
        )
        loss = tpa_loss(out, student, teacher)
        loss.backward()
        results.append((out.rows, loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (rows_a, loss_a, grads_a), (rows_b, loss_b, grads_b) = results
    assert torch.equal(rows_a.ids, rows_b.ids) and torch.equal(rows_a.pos, rows_b.pos)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    for name, g in grads_a.items():
        rel = (grads_b[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def test_invalid_arguments():
    logits = torch.randn(1, 4, V)
    response_mask = torch.tensor([[False, False, True, True]])
    with pytest.raises(ValueError, match="d .* >= 1"):
        sample_candidates(logits, response_mask, 0)
    with pytest.raises(ValueError, match="strategy"):
        sample_candidates(logits, response_mask, 2, strategy="beam")
    with pytest.raises(ValueError, match="top_p"):
        sample_candidates(logits, response_mask, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_candidates(logits, response_mask, 2, temperature=0.0)
    with pytest.raises(ValueError, match="position 0"):
        sample_candidates(logits, torch.tensor([[True, False, False, False]]), 2)
    with pytest.raises(ValueError, match="d .* >= 1"):
        TPAConfig(d=0)
    with pytest.raises(ValueError, match="not supported"):
        model = tiny_lm("qwen2")
        model.config._attn_implementation = "flash_attention_2"
        tpa._ribbon_attention_mask(model, torch.ones(1, 2), torch.tensor([[1]]), torch.float32, cached=True)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_sliding_window_is_refused_where_it_cuts_and_exact_where_it_cannot(family):
    """The ribbon is full causal: a window shorter than the sequence is an error before any pass (it used to
    give silently wrong transition logits); a window longer than the sequence cuts nothing and stays exact."""
    T = 8
    input_ids, attention_mask, response_mask = padded_batch("right", T)
    candidates = torch.randint(1, V, (2, T, 2), generator=torch.Generator().manual_seed(2))
    window = dict(use_sliding_window=True, max_window_layers=1)  # layer 1 slides, as Qwen2 applies it
    short = tiny_lm(family, sliding_window=T, **window)
    assert short.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=rf"sliding_window={T} on layers \[1\].*{T} tokens"):
        transition_logits(short, input_ids, attention_mask, response_mask, candidates)
    _, embeds, attn, position_ids, _ = embedded(short, "right")
    cand_pos = response_positions(response_mask)
    rows = candidate_rows(cand_pos, gather_positions(candidates, cand_pos), T)
    for fn in (appended_pass, cached_pass):  # the training forms
        with pytest.raises(ValueError, match="sliding-window attention"):
            fn(short, embeds, attn, position_ids, rows.pos, rows.ids)

    wide = tiny_lm(family, sliding_window=T + 1, **window)  # keeps every key of these sequences
    fast = transition_logits(wide, input_ids, attention_mask, response_mask, candidates)
    naive = naive_transition_logits(wide, input_ids, attention_mask, response_mask, candidates)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)
    _, embeds, attn, position_ids, _ = embedded(wide, "right")
    (gt_a, cand_a), (gt_c, cand_c) = (fn(wide, embeds, attn, position_ids, rows.pos, rows.ids)
                                      for fn in (appended_pass, cached_pass))
    valid = rows.pos >= 0
    torch.testing.assert_close(cand_c[valid], cand_a[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["qwen2", "qwen3"])
@torch.no_grad()
def test_transition_logits_llava_model(backbone, tmp_path_factory):
    """Our LLaVA model (images spliced by prepare_inputs_labels_for_multimodal) against the naive loop."""
    fixtures = pytest.importorskip("llava.tiny.fixtures")
    tokenizer = fixtures.mini_tokenizer(tmp_path_factory.getbasetemp() / "tpa_mini")
    model = fixtures.mini_llava(tokenizer, backbone=backbone)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 300, (2, 10), generator=g)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[0, :2] = 0
    input_ids[0, :2] = tokenizer.pad_token_id
    input_ids[0, 3] = input_ids[1, 1] = IMAGE_TOKEN_INDEX
    response_mask = torch.zeros(2, 10, dtype=torch.bool)
    response_mask[:, 7:] = True
    candidates = torch.randint(5, 300, (2, 10, 2), generator=g)
    images = torch.randn(2, 3, 32, 32, generator=g)
    fast = transition_logits(model, input_ids, attention_mask, response_mask, candidates, images=images)
    embed = model.get_input_embeddings()
    for b, k in response_mask.nonzero().tolist():
        prefix = input_ids[b, :k][attention_mask[b, :k].bool()]
        features = model.encode_images(images[b : b + 1])[0]  # (N_v, H)
        parts = [features if t == IMAGE_TOKEN_INDEX else embed(torch.tensor([t])) for t in prefix.tolist()]
        for u in range(2):
            seq = torch.cat([*parts, embed(candidates[b, k, u : u + 1])])[None]
            torch.testing.assert_close(fast[b, k, u], model(inputs_embeds=seq).logits[0, -1], rtol=0, atol=1e-5)
