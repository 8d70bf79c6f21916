"""LLaVA-Qwen models: forward/backward/generation, the multimodal layout, token types and masking."""

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.conversation import get_conv_template, tokenize_conversation
from llava.tiny.fixtures import mini_llava


def _batch(tokenizer, n=2, image_size=32):
    texts = ["What color is the circle?", "How many squares are there in the picture?"][:n]
    rows = []
    for t in texts:
        conv = get_conv_template("qwen_2")
        conv.append_message("user", "<image>\n" + t)
        conv.append_message("assistant", "red")
        rows.append(tokenize_conversation(conv, tokenizer))
    width = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((n, width), pad)
    labels = torch.full((n, width), IGNORE_INDEX)
    types = torch.zeros((n, width), dtype=torch.long)
    for i, (a, b, c) in enumerate(rows):
        ids[i, : len(a)], labels[i, : len(a)], types[i, : len(a)] = a, b, c
    return {"input_ids": ids, "labels": labels, "token_types": types, "attention_mask": (types != 0).long(),
            "images": torch.randn(n, 3, image_size, image_size)}


def test_forward_backward_generate(tokenizer, backbone):
    model = mini_llava(tokenizer, backbone).train()
    batch = _batch(tokenizer)
    out = model(**batch)
    n_v = model.num_image_tokens
    assert out.logits.shape[:2] == (2, batch["input_ids"].shape[1] - 1 + n_v)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.get_model().mm_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.get_vision_tower().parameters())  # frozen tower
    model.eval()
    gen = model.generate(batch["input_ids"][:1, :-2], images=batch["images"][:1], max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert gen.shape[0] == 1 and 1 <= gen.shape[1] <= 5


def test_layout_expands_images_and_carries_types(tokenizer):
    model = mini_llava(tokenizer)
    batch = _batch(tokenizer)
    mm = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
        token_types=batch["token_types"])
    n_v = model.num_image_tokens
    assert ((mm.token_types == TokenType.VISUAL).sum(1) == n_v).all()
    # visual embeddings are exactly the projected image features, in order
    feats = model.encode_images(batch["images"])
    for b in range(2):
        vis = mm.inputs_embeds[b][mm.token_types[b] == TokenType.VISUAL]
        torch.testing.assert_close(vis, feats[b])
    # every non-visual position maps back to its source token, with the same type and label
    for b in range(2):
        for j in range(mm.source_index.shape[1]):
            src = int(mm.source_index[b, j])
            if src < 0:
                assert mm.attention_mask[b, j] == 0 and mm.token_types[b, j] == TokenType.PAD
            elif mm.token_types[b, j] != TokenType.VISUAL:
                assert mm.token_types[b, j] == batch["token_types"][b, src]
                assert mm.labels[b, j] == batch["labels"][b, src]
    assert (mm.labels[mm.token_types == TokenType.VISUAL] == IGNORE_INDEX).all()


def test_left_and_right_padding_give_same_logits(tokenizer):
    model = mini_llava(tokenizer)
    batch = _batch(tokenizer)
    short = int(batch["attention_mask"][0].sum())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # left-pad the first (shorter) row
    shift = ids.shape[1] - short
    left_ids = ids.clone()
    left_ids[0] = torch.cat([ids[0, short:], ids[0, :short]])
    left_mask = mask.clone()
    left_mask[0] = torch.cat([mask[0, short:], mask[0, :short]])
    with torch.no_grad():
        right = model(input_ids=ids, attention_mask=mask, images=batch["images"]).logits
        left = model(input_ids=left_ids, attention_mask=left_mask, images=batch["images"]).logits
    n = short - 1 + model.num_image_tokens
    torch.testing.assert_close(right[0, :n], left[0, -n:], atol=1e-5, rtol=1e-4)
    assert shift > 0


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_vision_features_are_the_selected_hidden_state_and_stay_so(tokenizer, select_layer):
    """LLaVA's `mm_vision_select_layer` indexes SigLIP's hidden states; asking the composite model for hidden
    states or attentions once (transformers 5 then installs its recorders on the tower a second time) must not
    change which one later calls return."""
    model = mini_llava(tokenizer).eval()
    tower = model.get_vision_tower()
    tower.select_layer = select_layer
    batch = _batch(tokenizer)
    with torch.no_grad():
        reference = tower.vision_tower(batch["images"], output_hidden_states=True).hidden_states[select_layer]
        torch.testing.assert_close(tower(batch["images"]), reference)
        before = model(**batch).logits
        model(**batch, output_hidden_states=True, output_attentions=True)
        torch.testing.assert_close(tower(batch["images"]), reference)
        torch.testing.assert_close(model(**batch).logits, before)
    tower.select_layer = 99
    with pytest.raises(ValueError, match="out of range"):
        tower(batch["images"])


def test_image_count_mismatch_is_an_error(tokenizer):
    model = mini_llava(tokenizer)
    batch = _batch(tokenizer)
    with pytest.raises(ValueError, match="does not match"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=batch["images"][:1])
    with pytest.raises(ValueError, match="no images"):
        model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, None, None, None, None)


def test_template_masking_and_token_types_on_real_samples(tokenizer, mini_world):
    import json

    records = json.loads((mini_world / "finetune.json").read_text())
    multi = next(r for r in records if len(r["conversations"]) >= 4 and "image" in r)
    from llava.train.data import build_conversation

    conv = build_conversation(multi, "qwen_2", has_image=True)
    ids, labels, types = tokenize_conversation(conv, tokenizer)
    turns = multi["conversations"]
    replies = [t["value"] for t in turns[1::2]]
    questions = [t["value"].replace("<image>", "").strip() for t in turns[0::2]]
    # decoded supervised tokens are exactly the assistant replies (each closed by <|im_end|>)
    supervised = tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert supervised == "".join(r + "<|im_end|>" for r in replies)
    # decoded instruction tokens are exactly the user's words
    instr = tokenizer.decode(ids[types == TokenType.INSTRUCTION])
    assert instr == "".join(questions)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1 and (types[ids == IMAGE_TOKEN_INDEX] == TokenType.VISUAL).all()
    # template tokens decode to the ChatML scaffolding only
    assert "You are a helpful assistant." in tokenizer.decode(ids[types == TokenType.TEMPLATE])


def test_plain_template_supervises_caption_only(tokenizer):
    conv = get_conv_template("plain")
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "A red circle.")
    ids, labels, types = tokenize_conversation(conv, tokenizer)
    assert ids[0] == IMAGE_TOKEN_INDEX
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "A red circle.\n"
