"""GKD's on-policy batches (Table 3): full-distribution sampling over the tokenizer's ids, truncated replies
left truncated, first turn kept, and no L_sft on the student's own replies unless asked."""

import json

import torch
from test_distill import _args, _trainer, pair  # noqa: F401  (pair is a fixture)

from aligntI_patch.on_policy import VocabularyMask, on_policy_batch
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType


def _batch(trainer, rows=(0, 1, 2)):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    batch.pop("skipped", None)
    return batch


def test_replies_are_the_students_first_turn_samples(tmp_path, pair, tokenizer, mini_world):  # noqa: F811
    """Same prompts (images kept); a reply ends with the end token it sampled, or is cut at max_new_tokens with
    no end token added; only reply tokens are supervised."""
    student_path, teacher_path = pair
    trainer = _trainer(_args(tmp_path, teacher_path), student_path, tokenizer, mini_world)
    batch = _batch(trainer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ended = cut = 0
    for seed in range(4):
        torch.manual_seed(seed)
        new = on_policy_batch(trainer.model, batch, tokenizer, max_new_tokens=6)
        assert new["on_policy"] is True
        assert int((new["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        for b in range(3):
            first = int((batch["token_types"][b] == TokenType.RESPONSE).nonzero()[0])
            assert torch.equal(new["input_ids"][b, :first], batch["input_ids"][b, :first])  # the first user turn
            supervised = new["labels"][b] != IGNORE_INDEX
            reply = new["labels"][b][supervised]
            assert bool((new["token_types"][b][supervised] == TokenType.RESPONSE).all())
            assert int(supervised.sum()) == int((new["token_types"][b] != TokenType.PAD).sum()) - first  # nothing after
            if eos in reply.tolist():
                assert int(reply[-1]) == eos and reply.tolist().count(eos) == 1
                ended += 1
            else:
                assert len(reply) == 6  # cut: every sampled token, no end token forced
                cut += 1
    assert cut > 0  # an untrained student rarely stops within 6 tokens: the cut case is exercised
    assert trainer.model.training  # training mode restored


def test_sampling_is_the_full_distribution_over_tokenizer_ids(tmp_path, pair, tokenizer, mini_world):  # noqa: F811
    """A token outside the student's top 50 is drawn (transformers' default top_k=50 and a checkpoint's own
    generation_config.json, here top_k=5 and top_p=0.5, do not apply), and never an lm_head row past the
    tokenizer's vocabulary (the mini student has padded rows)."""
    student_path, teacher_path = pair
    trainer = _trainer(_args(tmp_path, teacher_path), student_path, tokenizer, mini_world)
    model = trainer.model
    assert model.get_output_embeddings().weight.shape[0] > len(tokenizer)  # padded head
    model.generation_config.top_k, model.generation_config.top_p = 5, 0.5
    batch = _batch(trainer)
    torch.manual_seed(0)
    new = on_policy_batch(model, batch, tokenizer, max_new_tokens=6)
    supervised = new["labels"] != IGNORE_INDEX
    assert bool((new["labels"][supervised] < len(tokenizer)).all())
    with torch.no_grad():  # the rank of every drawn token among the tokenizer's ids, from a plain forward
        mm = model.prepare_inputs_labels_for_multimodal(new["input_ids"], None, new["attention_mask"], None,
                                                        new["labels"], new["images"], token_types=new["token_types"])
        model.eval()
        logits = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask).logits[..., :len(tokenizer)]
    b, k = (mm.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    drawn = mm.labels[b, k + 1]
    ranks = (logits[b, k] > logits[b, k].gather(1, drawn[:, None])).sum(1)  # (N,) 0 = the most likely
    assert int(ranks.max()) >= 50, ranks.tolist()


def test_vocabulary_mask_leaves_only_tokenizer_ids():
    scores = torch.randn(3, 10)
    scores[:, 7:] = 1e4  # padded rows that would win every draw
    masked = VocabularyMask(7)(None, scores.clone())
    assert torch.equal(masked[:, :7], scores[:, :7]) and bool(torch.isneginf(masked[:, 7:]).all())
    assert bool((torch.multinomial(masked.softmax(-1), 50, replacement=True) < 7).all())


def test_on_policy_batches_carry_no_sft_unless_asked(tmp_path, pair, tokenizer, mini_world):  # noqa: F811
    """With every batch on-policy, L_sft is 0 and its normaliser counts no token; --on_policy_sft trains it."""
    student_path, teacher_path = pair
    for on_policy_sft in (False, True):
        args = _args(tmp_path / str(on_policy_sft), teacher_path, recipe="gkd", on_policy_prob=1.0,
                     on_policy_max_new_tokens=4, on_policy_sft=on_policy_sft)
        trainer = _trainer(args, student_path, tokenizer, mini_world)
        trainer.train()
        log = trainer.state.log_history[0]
        if on_policy_sft:
            assert log["loss_sft"] > 0 and trainer.global_counts["sft"] == trainer.global_counts["response"] > 1
        else:
            assert log["loss_sft"] == 0 and trainer.global_counts["sft"] == 1.0  # floored: no token
        assert log["loss_kd"] > 0
        assert json.loads(json.dumps(args.resolved_recipe))["settings"]["divergence"] == "jsd"
