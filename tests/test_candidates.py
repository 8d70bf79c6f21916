"""TPA's candidates (`aligntI_patch.candidates`, paper section 3.2, Eq. 5-6): sampling reads the logits at k-1,
greedy is the top d, nucleus draws inside its support, only tokenizer ids, deduplication. The tiny models and
batches come from tests/test_tpa.py."""

import torch
from test_tpa import V, embedded, tiny_lm

from aligntI_patch import tpa
from aligntI_patch.candidates import (
    dedupe_candidates,
    gather_positions,
    response_positions,
    sample_candidates,
    sample_candidates_from_hidden,
    sample_from_logits,
)
from aligntI_patch.tpa import appended_pass, cached_pass


def test_sampling_reads_logits_at_k_minus_1_and_greedy_is_top_d():
    B, T, d = 2, 6, 3
    logits = torch.randn(B, T, V)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    response_mask[0, 3:] = True
    response_mask[1, 4] = True
    cands = sample_candidates(logits, response_mask, d, strategy="greedy")
    assert cands.shape == (B, T, d)
    for b, k in response_mask.nonzero().tolist():
        assert torch.equal(cands[b, k], logits[b, k - 1].topk(d).indices)
        assert len(set(cands[b, k].tolist())) == d
    assert cands[~response_mask].abs().max() == 0


def test_sample_from_hidden_matches_logits_path():
    model = tiny_lm("qwen2")
    input_ids, embeds, attention_mask, position_ids, response_mask = embedded(model, "left")
    with torch.no_grad():
        hidden, _ = tpa.ground_truth_pass(model, embeds, attention_mask, position_ids, use_cache=False)
        logits = model.lm_head(hidden)
    cand_pos = response_positions(response_mask)
    for strategy in ("greedy", "nucleus"):
        ref = sample_candidates(logits, response_mask, 2, strategy, generator=torch.Generator().manual_seed(0))
        got = sample_candidates_from_hidden(
            model, hidden, cand_pos, 2, strategy, generator=torch.Generator().manual_seed(0), chunk_size=100
        )
        assert torch.equal(got, gather_positions(ref, cand_pos))


def test_sampler_draws_only_tokenizer_ids_from_a_padded_head():
    """lm_head rows past the tokenizer's vocabulary (padding, as Qwen2's) never become candidates, even when
    they carry almost all of the probability mass."""
    model = tiny_lm("qwen2")
    vocab = V - 8
    with torch.no_grad():  # the padded rows point along every hidden state: they dominate the softmax
        model.lm_head.weight[vocab:] = 0
        input_ids, embeds, attention_mask, position_ids, response_mask = embedded(model, "left")
        hidden, _ = tpa.ground_truth_pass(model, embeds, attention_mask, position_ids, use_cache=False)
        model.lm_head.weight[vocab:] = 50 * hidden.reshape(-1, hidden.shape[-1]).mean(0)
        assert bool((model.lm_head(hidden).argmax(-1) >= vocab).all())
    cand_pos = response_positions(response_mask)
    valid = cand_pos >= 0
    for strategy in ("greedy", "nucleus"):
        gen = torch.Generator().manual_seed(0)
        unrestricted = sample_candidates_from_hidden(model, hidden, cand_pos, 4, strategy, generator=gen)
        assert bool((unrestricted[valid] >= vocab).any())  # the control: the padded rows would be drawn
        gen = torch.Generator().manual_seed(0)
        got = sample_candidates_from_hidden(model, hidden, cand_pos, 4, strategy, generator=gen, vocab_size=vocab)
        assert bool((got[valid] < vocab).all())
        with torch.no_grad():  # greedy = the top-4 of the tokenizer's columns of the plain logits
            ref = model.lm_head(hidden)[..., :vocab].topk(4, dim=-1).indices
        if strategy == "greedy":
            assert torch.equal(got, gather_positions(ref, (cand_pos - 1).masked_fill(~valid, -1)).masked_fill(
                ~valid[..., None], 0))


def test_nucleus_support_and_determinism():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(500, 4)
    for top_p, support in [(0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3}), (0.4, {0})]:
        draws = sample_from_logits(logits, 4, "nucleus", top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert draws.shape == (500, 4)
        assert set(draws.unique().tolist()) == support
    a = sample_from_logits(logits, 4, "nucleus", generator=torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, 4, "nucleus", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # low temperature concentrates the nucleus on the mode
    cold = sample_from_logits(logits, 4, "nucleus", temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert set(cold.unique().tolist()) == {0}


def test_response_positions_and_gather():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    pos = response_positions(mask)
    assert torch.equal(pos, torch.tensor([[1, 3, 4], [4, -1, -1]]))
    x = torch.arange(10).view(2, 5) + 1
    assert torch.equal(gather_positions(x, pos), torch.tensor([[2, 4, 5], [10, 0, 0]]))


def test_all_candidates_equal_ground_truth_needs_no_rows():
    model = tiny_lm("qwen2")
    input_ids, embeds, attention_mask, position_ids, response_mask = embedded(model, "left")
    cand_pos = response_positions(response_mask)
    cands = gather_positions(input_ids, cand_pos)[..., None].expand(-1, -1, 3)  # every sample is y_k
    rows = dedupe_candidates(cand_pos, cands, input_ids)
    assert rows.pos.shape == (2, 0)
    torch.testing.assert_close(rows.gt_weight, response_mask.float())
    with torch.no_grad():
        for fn in (appended_pass, cached_pass):
            gt_h, cand_h = fn(model, embeds, attention_mask, position_ids, rows.pos, rows.ids)
            assert gt_h.shape == (2, input_ids.shape[1], 32) and cand_h.shape == (2, 0, 32)
