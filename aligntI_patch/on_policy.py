"""GKD's on-policy batches (Agarwal et al., 2024; Table 3's GKD row): the student's own replies replace the
ground-truth ones, and the distillation terms align teacher and student on them.

Design choices (as in GKD and TRL's GKDTrainer):
- Sampling from the student's full distribution at `temperature`: no top-k or top-p (a fresh generation config,
  so nothing of the checkpoint's generation_config.json applies), and only ids of the shared tokenizer (padded
  lm_head rows masked).
- A reply cut at `max_new_tokens` stays cut: no end-of-turn token is added and nothing past the cut is
  supervised. A reply that ended by itself keeps the end-of-turn token it sampled.
- Only the first assistant turn is regenerated: each sample becomes its first user turn (image included) and
  the student's reply; later turns of a multi-turn sample are dropped from on-policy batches.
- The batch is marked `on_policy`: the trainer applies L_sft to it only when asked (`--on_policy_sft`).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from llava.constants import IGNORE_INDEX, TokenType


class VocabularyMask(LogitsProcessor):
    """Scores of ids >= `vocab_size` (lm_head rows no tokenizer decodes) set to -inf."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size:] = float("-inf")
        return scores


def sampling_config(max_new_tokens: int, temperature: float, eos: int, pad: int) -> GenerationConfig:
    """Plain ancestral sampling: every knob that would truncate or reshape P_S is off."""
    # set, not left None: generate fills None fields from the checkpoint's generation_config
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                            epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)


@torch.no_grad()
def on_policy_batch(student, batch: dict, tokenizer, max_new_tokens: int, vision_in_step: bool = False,
                    temperature: float = 1.0, vocab_size: int | None = None) -> dict:
    """The batch with each sample's first reply sampled from the student (right-padded, as the collator does),
    marked `on_policy=True`.

    `vision_in_step`: encode a blank image for a text-only batch (`llava.train.zero3.needs_blank_image`).
    `vocab_size`: ids drawn stay below it (default: the tokenizer's length)."""
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
                                 attention_mask=mask, generation_config=sampling_config(
                                     max_new_tokens, temperature, eos, pad),
                                 logits_processor=LogitsProcessorList([VocabularyMask(vocab_size or len(tokenizer))]))
    student.train(was_training)
    rows = []
    for (p, t), reply in zip(prompts, generated):
        stop = (reply == eos).nonzero()
        # ended by itself: up to and with its end token; cut: every token sampled (generate pads finished rows)
        reply = reply[: int(stop[0]) + 1] if len(stop) else reply[: max_new_tokens]
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
    out.update(input_ids=ids, labels=labels, token_types=types, attention_mask=(types != TokenType.PAD).long(),
               on_policy=True)
    return out
