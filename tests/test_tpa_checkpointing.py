"""TPA under activation checkpointing (issue 16). HF drops the KV cache in every checkpointed layer, so the student's
ground-truth pass returns its layers' inputs and the cache is rebuilt from them outside the checkpoints
(`tpa.ground_truth_pass`); the M candidate rows then run with checkpointing off. The definition of correct: loss and
every parameter gradient equal the naive loop's (one plain forward per candidate), with the same sampled candidates.
The tiny models, batches and the Eq. 7 loss come from tests/test_tpa.py.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from test_tpa import kl_rows, padded_batch, tiny_lm, tpa_loss
from torch import nn

from aligntI_patch.arguments import DistillArguments
from aligntI_patch.attention_hook import capture_attention
from aligntI_patch.candidates import gather_positions, response_positions
from aligntI_patch.tpa import (
    TPAConfig,
    cache_available,
    checkpointing_disabled,
    ground_truth_pass,
    tpa_forward,
)
from aligntI_patch.trainer import AlignTITrainer
from llava.model.llava_arch import positions_from_mask
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import mini_llava
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset

CASES = {  # name -> (TPAConfig kwargs, which response tokens are the student's own greedy choice)
    "nucleus": (dict(d=4, strategy="nucleus", top_p=0.9), "none"),
    "hit": (dict(d=2, strategy="greedy"), "first"),  # one of the candidates at each sample's first response k is y_k
    "all_hits": (dict(d=1, strategy="greedy"), "all"),  # every candidate is y_k: M = 0 after dedupe
}


def checkpointed(model: nn.Module, reentrant: bool = False, every_n_layers: int = 1) -> nn.Module:
    model.activation_checkpointing_enable({"use_reentrant": reentrant}, every_n_layers=every_n_layers)
    assert not cache_available(model)
    return model


def greedy_response(student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, which: str) -> torch.Tensor:
    """input_ids whose response tokens at `which` positions ("first" per sample, "all", "none") are the student's
    top-1 after the tokens before them, set left to right, so greedy candidates there equal y_k."""
    ids = input_ids.clone()
    if which == "none":
        return ids
    first = response_positions(response_mask)[:, 0]
    with torch.no_grad():
        for b, k in response_mask.nonzero().tolist():
            if which == "first" and k != first[b]:
                continue
            logits = student(input_ids=ids, attention_mask=attention_mask,
                             position_ids=positions_from_mask(attention_mask)).logits  # (B, T, V)
            ids[b, k] = logits[b, k - 1].argmax()
    return ids


def step(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
         response_mask: torch.Tensor, cfg: TPAConfig, capture=None) -> tuple:
    """tpa_forward, then KD at the response positions + Eq. 7 (test_tpa.tpa_loss), backward.
    -> (TPAForward, loss, {name: grad})"""
    student.zero_grad()
    out = tpa_forward(
        student, teacher, student.get_input_embeddings()(input_ids), teacher.get_input_embeddings()(input_ids),
        attention_mask, positions_from_mask(attention_mask), response_mask, input_ids, cfg,
        generator=torch.Generator().manual_seed(0), student_gt_capture=capture,
    )
    kd = kl_rows(out.teacher_gt[response_mask], out.student_gt[response_mask], teacher, student).sum()
    loss = kd + tpa_loss(out, student, teacher)
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def fkl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_T || P_S) of one position's logits."""
    t_logp = F.log_softmax(t_logits, -1)
    return (t_logp.exp() * (t_logp - F.log_softmax(s_logits, -1))).sum()


def naive_step(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor, rows) -> tuple[torch.Tensor, dict]:
    """The same loss by definition, with the rows `tpa_forward` sampled: one plain unpadded forward per sample for
    the ground-truth transitions and one per candidate row (prefix before k, then the candidate). -> (loss, grads)"""
    student.zero_grad()
    loss = torch.zeros(())
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        seq = input_ids[b, real]  # (n,)
        at = real.long().cumsum(0) - 1  # padded position -> index in seq
        s_gt = student(input_ids=seq[None]).logits[0]  # (n, V)
        with torch.no_grad():
            t_gt = teacher(input_ids=seq[None]).logits[0]
        for k in response_mask[b].nonzero().flatten().tolist():  # KD + the candidates equal to y_k
            loss = loss + (1 + rows.gt_weight[b, k]) * fkl(t_gt[at[k]], s_gt[at[k]])
        for m in (rows.pos[b] >= 0).nonzero().flatten().tolist():
            cand = torch.cat([seq[: at[rows.pos[b, m]]], rows.ids[b, m, None]])[None]  # prefix before k, y_k^(u)
            with torch.no_grad():
                t_cand = teacher(input_ids=cand).logits[0, -1]
            loss = loss + rows.weight[b, m] * fkl(t_cand, student(input_ids=cand).logits[0, -1])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same_step(got: tuple, want: tuple, atol: float = 1e-5) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("dedupe", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_checkpointed_tpa_equals_naive_loop_and_cached_form(family, padding, case, dedupe):
    """Loss and every student gradient: checkpointed (rebuilt cache) = uncheckpointed (HF's cache) = naive loop."""
    student, teacher = tiny_lm(family, seed=0).train(), tiny_lm(family, seed=5, hidden=48)
    input_ids, attention_mask, response_mask = padded_batch(padding)
    kwargs, greedy = CASES[case]
    input_ids = greedy_response(student, input_ids, attention_mask, response_mask, greedy)
    cfg = TPAConfig(dedupe=dedupe, **kwargs)

    cached, loss_c, grads_c = step(student, teacher, input_ids, attention_mask, response_mask, cfg)
    rows = cached.rows
    ckpt, loss_k, grads_k = step(checkpointed(student), teacher, input_ids, attention_mask, response_mask, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ckpt.rows, rows))  # the same samples
    y_k = gather_positions(input_ids, rows.pos.clamp_min(0))  # (B, M)
    if case == "hit":
        hits = rows.gt_weight.sum() if dedupe else ((rows.ids == y_k) & (rows.pos >= 0)).sum()
        assert hits > 0  # a candidate equal to y_k: no row after dedupe, an ordinary row without
    if case == "all_hits":
        assert rows.pos.shape[1] == (0 if dedupe else int(response_mask.sum(1).max()))
    assert_same_step((loss_k, grads_k), (loss_c, grads_c))
    student.activation_checkpointing_disable()
    assert_same_step((loss_k, grads_k), naive_step(student, teacher, input_ids, attention_mask, response_mask, rows))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_reentrant_checkpointing_is_exact_too(family):
    """use_reentrant=True (torch's legacy checkpoint; transformers 5 defaults to non-reentrant): the layers' outputs
    get their gradient from both the next layer and the rebuilt keys/values before the replay runs: same step."""
    student, teacher = tiny_lm(family, seed=0).train(), tiny_lm(family, seed=5, hidden=48)
    batch = padded_batch("left")
    cfg = TPAConfig(d=4, strategy="nucleus", top_p=0.9)
    _, *plain = step(student, teacher, *batch, cfg)
    _, *reentrant = step(checkpointed(student, reentrant=True), teacher, *batch, cfg)
    assert_same_step(reentrant, plain)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_partial_checkpointing_is_exact_and_every_flag_is_restored(impl):
    """every_n_layers=2 checkpoints layer 0 only: HF still drops the whole cache. The candidate calls (one per
    segment, and their replays in the backward) run with every flag off; each flag is back as it was after the step, and after a call that
    raises inside the candidate pass."""
    student, teacher = tiny_lm("qwen3", impl, seed=0).train(), tiny_lm("qwen3", impl, seed=5, hidden=48)
    batch = padded_batch("right")
    cfg = TPAConfig(d=3, strategy="nucleus", top_p=0.9)
    _, *plain = step(student, teacher, *batch, cfg)
    checkpointed(student, every_n_layers=2)

    def flags() -> list[bool]:
        return [m.gradient_checkpointing for m in student.modules() if hasattr(m, "gradient_checkpointing")]

    before = flags()
    assert True in before and False in before  # the decoder and layer 0 on, layer 1 off
    seen = []

    def spy(module, args, kwargs):  # the candidate call is the one that gets a cache
        if kwargs.get("cache") is not None:
            seen.append(flags())
            if fail:
                raise RuntimeError("inside the candidate pass")

    handle = student.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    fail = False
    _, *ckpt = step(student, teacher, *batch, cfg)
    segments = len(student.model.layers)  # each in the forward and in the backward's replay
    assert seen == [[False] * len(before)] * (2 * segments) and flags() == before
    assert_same_step(ckpt, plain)
    fail = True
    with pytest.raises(RuntimeError, match="inside the candidate pass"):
        step(student, teacher, *batch, cfg)
    handle.remove()
    assert flags() == before
    with pytest.raises(ValueError, match="raised in the body"), checkpointing_disabled(student):
        assert not any(flags())
        raise ValueError("raised in the body")
    assert flags() == before


@pytest.mark.parametrize("reentrant", [False, True])
def test_student_runs_t_plus_m_tokens_with_grad(reentrant):
    """Student decoder calls (forward pre-hooks) in the forward: B*T, then the M rows in L segments of ceil(M/L)
    rows, all with grad; no no-grad sampling pass over T, no appended pass over T + M (the former fallback's).
    The backward replays each checkpointed layer over T and each segment once (attention calls per layer)."""
    student, teacher = checkpointed(tiny_lm("qwen2", seed=0).train(), reentrant), tiny_lm("qwen2", seed=5, hidden=48)
    input_ids, attention_mask, response_mask = padded_batch("left")
    B, T = input_ids.shape
    calls, attn_tokens, phase = [], [], ["forward"]
    student.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: calls.append((phase[0], kw["inputs_embeds"].shape[:2].numel(), torch.is_grad_enabled())),
        with_kwargs=True)
    for layer in student.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: attn_tokens.append((phase[0], m.layer_idx, kw["hidden_states"].shape[1])),
            with_kwargs=True)
    out = tpa_forward(
        student, teacher, student.get_input_embeddings()(input_ids), teacher.get_input_embeddings()(input_ids),
        attention_mask, positions_from_mask(attention_mask), response_mask, input_ids,
        TPAConfig(d=4, strategy="nucleus", top_p=0.9, dedupe=False), generator=torch.Generator().manual_seed(0))
    M = out.rows.pos.shape[1]
    assert M == 4 * int(response_mask.sum(1).max())
    L = len(student.model.layers)
    size = -(-M // L)  # rows per segment: a replayed segment holds L x size ~ M row-layers, not L x M
    assert calls == [("forward", B * T, True)] + [("forward", B * size, True)] * L
    phase[0] = "backward"
    (out.student_gt.sum() + out.student_cand.sum()).backward()
    assert calls[L + 1:] == [("backward", B * size, True)] * L  # each segment, replayed
    layers = range(L)
    forward = [("forward", i, T) for i in layers] + [("forward", i, size) for _ in range(L) for i in layers]
    assert attn_tokens[: len(forward)] == forward
    replayed = sorted(attn_tokens[len(forward):])
    assert replayed == sorted([("backward", i, T) for i in layers] + [("backward", i, size) for _ in range(L)
                                                                      for i in layers])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_student_attention_capture_survives_the_replay(family):
    """student_gt_capture (IVA with the student as source) under checkpointing: the hook sees the ground-truth pass
    once (the backward's replay runs after the context has exited), rows as without checkpointing, same step."""
    student, teacher = tiny_lm(family, seed=0).train(), tiny_lm(family, seed=5, hidden=48)
    input_ids, attention_mask, response_mask = padded_batch("right")
    query = attention_mask.bool() & ~response_mask  # the "instruction": every real token before the response
    cfg = TPAConfig(d=2, strategy="nucleus", top_p=0.9)
    results = []
    for model in (student, checkpointed(student)):
        capture = capture_attention(model, 1, query)
        _, loss, grads = step(model, teacher, input_ids, attention_mask, response_mask, cfg, capture=capture)
        results.append((capture.attn, loss, grads))
    (rows_a, *plain), (rows_b, *ckpt) = results
    torch.testing.assert_close(rows_b, rows_a, rtol=0, atol=1e-6)
    assert_same_step(ckpt, plain)


def test_unsupported_layers_are_refused_before_the_pass():
    """The rebuilt keys mirror Qwen2/Qwen3 layers; any other layer class is refused, naming it."""

    class OtherLayer(torch.nn.Module):
        pass

    student = checkpointed(tiny_lm("qwen2").train())
    student.model.layers.append(OtherLayer())
    input_ids, attention_mask, _ = padded_batch("left")
    embeds = student.get_input_embeddings()(input_ids)
    with pytest.raises(TypeError, match=r"\['OtherLayer'\]"):
        ground_truth_pass(student, embeds, attention_mask, positions_from_mask(attention_mask))


# ----------------------------------------------------------------------------- the trainer's aligntI recipe


@pytest.mark.parametrize("source", ["teacher", "student"])
def test_aligntI_step_under_checkpointing_equals_the_plain_step(source, tokenizer, mini_world, tmp_path):
    """Recipe aligntI (SFT + KD + IVA + TPA) through AlignTITrainer.term_sums on a collated LLaVA batch (two image
    samples and a text-only one, right-padded), IVA weights from the teacher (the recipe) or the student: with the
    student under activation checkpointing, every term and every gradient as without."""
    student = mini_llava(tokenizer, num_layers=2, seed=1).train()
    teacher = mini_llava(tokenizer, num_layers=3, hidden=48, role="teacher", seed=2)
    records = json.loads((mini_world / "finetune.json").read_text())
    picked = [r for r in records if "image" in r][:2] + [next(r for r in records if "image" not in r)]
    (tmp_path / "data.json").write_text(json.dumps(picked))
    data = LazySupervisedDataset(str(tmp_path / "data.json"), tokenizer,
                                 load_image_processor(student.get_vision_tower().config), str(mini_world / "images"),
                                 "qwen_2", 256, student.num_image_tokens)
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([data[i] for i in range(3)])
    batch.pop("skipped", None)
    results = []
    for ckpt in (False, True):
        if ckpt:
            checkpointed(student)
        args = DistillArguments(output_dir=str(tmp_path / "out"), teacher_model_path="in memory", use_cpu=True,
                                report_to="none", recipe="aligntI", iva_weight_source=source, iva_layer="1",
                                tpa_num_samples=4, model_max_length=256, seed=0)
        trainer = AlignTITrainer(model=student, args=args, processing_class=tokenizer, teacher=teacher, iva_layer=1,
                                 vocab_size=len(tokenizer))
        student.zero_grad()
        sums = trainer.term_sums(student, batch)
        sum(sums.values()).backward()
        results.append(({k: v.detach() for k, v in sums.items()},
                        {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (terms_a, grads_a), (terms_b, grads_b) = results
    assert set(terms_a) == {"sft", "kd", "iva", "tpa"} and all(float(v) > 0 for v in terms_a.values())
    for k in terms_a:
        torch.testing.assert_close(terms_b[k], terms_a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)

