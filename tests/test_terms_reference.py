"""The trainer's four terms against the paper's formulas written out here with Python loops over plain
`model(input_ids=..., images=...)` forwards: Eq. 2 per response token, Eq. 3 per visual token with alpha from
eager `output_attentions`, Eq. 7 per response position and candidate with one plain forward per candidate.
Qwen2 and Qwen3 pairs; a right-padded batch (the collator's) with a two-turn image sample, a one-turn image
sample and a text-only sample; values to 1e-5 relative and the student's gradients too.
"""

import json

import pytest
import torch

from aligntI_patch.arguments import DistillArguments
from aligntI_patch.trainer import AlignTITrainer
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.model.builder import load_pretrained_model
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset

IVA_LAYER, D = 1, 2


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def setup(request, mini_root, tokenizer, mini_world, tmp_path_factory):
    backbone = request.param
    student = mini_llava(tokenizer, backbone, num_layers=2, seed=5)
    teacher = mini_llava(tokenizer, backbone, num_layers=3, hidden=48, role="teacher", seed=6)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    s_dir = save_mini_checkpoint(student, tokenizer, mini_root / f"ref_{backbone}_student")
    t_dir = save_mini_checkpoint(teacher, tokenizer, mini_root / f"ref_{backbone}_teacher")
    records = json.loads((mini_world / "finetune.json").read_text())
    two_turn = next(r for r in records if "image" in r and len(r["conversations"]) == 4)
    one_turn = next(r for r in records if "image" in r and len(r["conversations"]) == 2)
    text = next(r for r in records if "image" not in r)
    data_path = tmp_path_factory.mktemp("ref") / "data.json"
    data_path.write_text(json.dumps([two_turn, one_turn, text]))
    out = tmp_path_factory.mktemp("ref_out")
    args = DistillArguments(output_dir=str(out), teacher_model_path=str(t_dir), use_cpu=True, report_to="none",
                            tpa_sampling="greedy", tpa_num_samples=D, iva_layer=str(IVA_LAYER),
                            model_max_length=256, kd_temperature=1.0)
    _, s_model, processor, _ = load_pretrained_model(str(s_dir), device="cpu")
    _, t_model, _, _ = load_pretrained_model(str(t_dir), device="cpu")
    _, t_eager, _, _ = load_pretrained_model(str(t_dir), device="cpu", attn_implementation="eager")
    data = LazySupervisedDataset(str(data_path), tokenizer, processor, str(mini_world / "images"),
                                 "qwen_2" if backbone == "qwen2" else "qwen_3", 256, s_model.num_image_tokens)
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([data[i] for i in range(3)])
    batch.pop("skipped", None)
    trainer = AlignTITrainer(model=s_model.train(), args=args, processing_class=tokenizer,
                             teacher=t_model.eval(), iva_layer=IVA_LAYER, vocab_size=len(tokenizer),
                             train_dataset=data, data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id))
    return trainer, t_eager.eval(), batch, len(tokenizer)


def fkl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_T || P_S) of one position's logits, the plain formula."""
    p_t = t_logits.softmax(-1)
    return (p_t * (t_logits.log_softmax(-1) - s_logits.log_softmax(-1))).sum()


def image_batch(batch: dict, b: int) -> torch.Tensor | None:
    """Row b's image (the collator stacks the image rows in order)."""
    has = [bool((ids == IMAGE_TOKEN_INDEX).any()) for ids in batch["input_ids"]]
    return batch["images"][sum(has[:b]): sum(has[:b]) + 1] if has[b] else None


def row(batch: dict, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row b unpadded: ids, labels, types (unexpanded)."""
    n = int(batch["attention_mask"][b].sum())
    return batch["input_ids"][b, :n], batch["labels"][b, :n], batch["token_types"][b, :n]


def plain_logits(model, ids: torch.Tensor, image: torch.Tensor | None, **kw):
    """One sample through the public forward; returns (logits [T', V], number of visual positions)."""
    out = model(input_ids=ids[None], images=image, attention_mask=torch.ones_like(ids)[None], **kw)
    return out, (out.logits.shape[1] - len(ids) + 1 if image is not None else 0)


def expanded(seq: torch.Tensor, ids: torch.Tensor, n_v: int, fill) -> torch.Tensor:
    """A per-token sequence in the expanded layout: the image token's entry becomes n_v entries of `fill`."""
    if n_v == 0:
        return seq
    i = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
    return torch.cat([seq[:i], torch.full((n_v,), fill, dtype=seq.dtype), seq[i + 1:]])


def reference_terms(trainer, t_eager, batch: dict, vocab: int) -> dict[str, torch.Tensor]:
    student, teacher = trainer.model, trainer.teacher
    sums = {k: torch.zeros(()) for k in ("sft", "kd", "iva", "tpa")}
    for b in range(batch["input_ids"].shape[0]):
        ids, labels, types = row(batch, b)
        image = image_batch(batch, b)
        s_out, n_v = plain_logits(student, ids, image)
        s = s_out.logits[0]  # (T', V) with grad
        with torch.no_grad():
            t = teacher(input_ids=ids[None], images=image, attention_mask=torch.ones_like(ids)[None]).logits[0]
        lab = expanded(labels, ids, n_v, IGNORE_INDEX)
        typ = expanded(types, ids, n_v, int(TokenType.VISUAL))
        for k in range(1, len(lab)):
            if lab[k] == IGNORE_INDEX:
                continue
            # Eq. 2 and SFT: the output at k-1 predicts response token y_k
            sums["sft"] = sums["sft"] - s[k - 1].log_softmax(-1)[lab[k]]
            sums["kd"] = sums["kd"] + fkl(t[k - 1, :vocab], s[k - 1, :vocab])
            if k == 1 or typ[k] != TokenType.RESPONSE:
                continue
            # Eq. 7: candidate y_k^(u) (greedy top-d of P_S at k-1) replaces y_k; one plain forward each
            orig = k - n_v + 1 if n_v else k  # the position of y_k in the unexpanded ids
            for u in s[k - 1, :vocab].detach().topk(D).indices:
                cand = torch.cat([ids[:orig], u[None]])
                s_c, _ = plain_logits(student, cand, image)
                with torch.no_grad():
                    t_c, _ = plain_logits(teacher, cand, image)
                sums["tpa"] = sums["tpa"] + fkl(t_c.logits[0, -1, :vocab], s_c.logits[0, -1, :vocab]) / D
        if n_v:  # Eq. 3: alpha from the teacher's eager attention at the IVA layer, one term per visual token
            with torch.no_grad():
                att = t_eager(input_ids=ids[None], images=image, attention_mask=torch.ones_like(ids)[None],
                              output_attentions=True).attentions[IVA_LAYER][0]  # (heads, T', T')
            visual = (typ == TokenType.VISUAL).nonzero().flatten()
            instruction = (typ == TokenType.INSTRUCTION).nonzero().flatten()
            for k in visual:
                alpha = att[:, instruction, k].mean()
                sums["iva"] = sums["iva"] + alpha * fkl(t[k, :vocab], s[k, :vocab])
    return sums


@pytest.mark.slow  # about a minute per backbone on 2 cores (one plain forward per candidate)
def test_terms_equal_the_formulas_in_value_and_gradient(setup):
    trainer, t_eager, batch, vocab = setup
    student = trainer.model
    params = [p for p in student.parameters() if p.requires_grad]
    got = trainer.term_sums(student, batch)
    assert set(got) == {"sft", "kd", "iva", "tpa"}
    got_grads = torch.autograd.grad(sum(got.values()), params, allow_unused=True)
    want = reference_terms(trainer, t_eager, batch, vocab)
    for k in got:
        assert float(want[k]) > 0, k
        torch.testing.assert_close(got[k].detach(), want[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    want_grads = torch.autograd.grad(sum(want.values()), params, allow_unused=True)
    for (name, _), g, w in zip(((n, p) for n, p in student.named_parameters() if p.requires_grad), got_grads,
                               want_grads):
        if w is None:
            assert g is None or float(g.abs().max()) == 0, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
