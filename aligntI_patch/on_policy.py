"""GKD-style on-policy baseline (Table 3): replace the ground-truth responses by the student's own samples.

The first user turn of every sample is kept as the prompt; the student samples a reply (temperature 1)
that becomes the supervised response, closed by the end-of-turn token. Distillation terms then align the
teacher and the student on the student's own trajectories (Agarwal et al., 2024).
"""

from __future__ import annotations

import torch

from llava.constants import IGNORE_INDEX, TokenType


@torch.no_grad()
def on_policy_batch(student, batch: dict, tokenizer, max_new_tokens: int, vision_in_step: bool = False) -> dict:
    """A batch of the same prompts with student-generated responses (right-padded, as the collator does).

    `vision_in_step`: encode a blank image for a text-only batch (`aligntI_patch.zero3.needs_blank_image`)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id
    prompts = []
    for ids, types in zip(batch["input_ids"], batch["token_types"]):
        first = (types == TokenType.RESPONSE).nonzero()
        end = int(first[0]) if len(first) else int((types != TokenType.PAD).sum())
        prompts.append((ids[:end], types[:end]))
    width = max(len(p) for p, _ in prompts)
    left = torch.full((len(prompts), width), pad, dtype=torch.long, device=batch["input_ids"].device)
    mask = torch.zeros_like(left)
    for i, (p, _) in enumerate(prompts):
        left[i, width - len(p):], mask[i, width - len(p):] = p, 1
    was_training = student.training
    student.eval()
    generated = student.generate(left, images=batch.get("images"), vision_in_step=vision_in_step,
                                 attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    student.train(was_training)
    rows = []
    for (p, t), reply in zip(prompts, generated):
        stop = (reply == eos).nonzero()
        reply = reply[: int(stop[0])] if len(stop) else reply[reply != pad]
        reply = torch.cat([reply, reply.new_tensor([eos])])
        ids = torch.cat([p, reply])
        types = torch.cat([t, torch.full_like(reply, int(TokenType.RESPONSE))])
        rows.append((ids, types, torch.cat([torch.full_like(p, IGNORE_INDEX), reply])))
    width = max(len(r[0]) for r in rows)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "token_types", "attention_mask")}
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=left.device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    types = torch.full_like(ids, int(TokenType.PAD))
    for i, (a, t, lab) in enumerate(rows):
        ids[i, : len(a)], types[i, : len(a)], labels[i, : len(a)] = a, t, lab
    out.update(input_ids=ids, labels=labels, token_types=types, attention_mask=(types != TokenType.PAD).long())
    return out
