"""Can a text stage 0 stand in for a pretrained LLM in the tiny preset? The measurement behind docs/tiny_world.md.

A real LLaVA starts from an LLM pretrained on text; its stage 1 trains the projector alone, pulling visual
tokens into the word space the LLM already reads. `bench_tiny_learnability.py --pretrain-steps N
--align-steps M` shows that this recipe aligns the tiny world's visual tokens too, once the LLM reads the
scenes in words. This script measures the part that decides whether the recipe fits the preset's budget:
how fast the tiny LLM (random init, `llava.tiny.configs`) learns every question family *in words*, trained
on full multi-turn conversations in the preset's templates (captions in `plain`, questions in the chat one;
the loss over every answer token, as `llava.train` computes it). The image is given as 9 word slots: each
grid cell becomes the mean input embedding of the words naming its content (" large red circle", the
written word " cat"), an empty cell a zero vector. Scenes are fresh draws from the world's generator (train
colour/shape pairs only); each question conversation asks every askable family `--turns` times (decision
families twice by default: a yes and a no about one scene). Greedy first-answer-token accuracy on fresh
single-turn questions is printed per family every `--eval-every` steps.

    python -m llava.tiny.preset prepare                 # the tokenizer (cached)
    python benchmarks/bench_tiny_stage0.py --steps 900  # ~18 min on 2 CPU cores (teacher size)
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict

import torch
from tiny_common import GRID_CELLS, add_run_args, cell_phrases, setup, slot_embeddings
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import tokenize_conversation
from llava.tiny.configs import llm_config
from llava.tiny.questions import (
    CAPTION_PROMPTS,
    FAMILIES,
    SHORT_SUFFIX,
    Balancer,
    askable,
    caption_scene,
    make_question,
    text_only_question,
)
from llava.tiny.scenes import HELDOUT_COMBOS, TRAIN_COMBOS, Scene, sample_scene
from llava.train.data import build_conversation

# Questions per family in one stage-0 conversation (multi-turn, shuffled).
DEFAULT_TURNS = {"attribute": 1, "existence": 2, "counting": 1, "spatial": 2, "reading": 1, "choice": 1, "describe": 1}


class WorldStream:
    """Fresh (scene, conversation) examples: captions in the `plain` template, questions in the chat one.

    Each example is (input_ids with one IMAGE_TOKEN_INDEX or none, labels, per-cell word ids or None).
    """

    def __init__(self, tokenizer, template: str, seed: int, caption_prob: float = 0.3, text_prob: float = 0.3,
                 text_only_prob: float = 0.05, describe_prob: float = 0.3, turns: dict[str, int] | None = None):
        self.tok, self.template, self.rng, self.balancer = tokenizer, template, random.Random(seed), Balancer()
        self.caption_prob, self.text_prob, self.text_only_prob, self.describe_prob = (
            caption_prob, text_prob, text_only_prob, describe_prob)
        self.turns = {**DEFAULT_TURNS, **(turns or {})}
        self.banned = set(HELDOUT_COMBOS)

    def question(self, family: str) -> tuple[Scene, str, str]:
        """One fresh question of `family` (for validation): (scene, question text, answer)."""
        while True:
            scene = sample_scene(self.rng, TRAIN_COMBOS, text_prob=self.text_prob,
                                 min_objects=2 if family == "spatial" else 1, force_text=family == "reading")
            if askable(family, scene):
                q = make_question(family, scene, self.rng, self.balancer, self.banned)
                return scene, q.text, q.answer

    def encode(self, turns: list[tuple[str, str]], template: str, scene: Scene | None):
        conv = [{"from": who, "value": text} for pair in turns for who, text in zip(("human", "gpt"), pair)]
        input_ids, labels, _ = tokenize_conversation(
            build_conversation({"conversations": conv}, template, has_image=scene is not None), self.tok)
        cells = None if scene is None else [
            None if p is None else self.tok(p, add_special_tokens=False).input_ids for p in cell_phrases(scene)
        ]
        return input_ids, labels, cells

    def __next__(self):
        rng = self.rng
        if rng.random() < self.text_only_prob:
            q, a = text_only_question(rng)
            return self.encode([(q + SHORT_SUFFIX, a)], self.template, None)
        scene = sample_scene(rng, TRAIN_COMBOS, text_prob=self.text_prob)
        if rng.random() < self.caption_prob:
            return self.encode([(rng.choice(CAPTION_PROMPTS), caption_scene(scene))], "plain", scene)
        # Every askable family, the decision ones several times: their skills need the most examples, and
        # yes and no about one scene are the most telling pair. Long descriptions are learned fast and cost
        # many tokens, so they come only in some sequences.
        families = [f for f in FAMILIES for _ in range(self.turns[f]) if askable(f, scene)
                    and (f != "describe" or rng.random() < self.describe_prob)]
        if not families:  # every askable family turned off with --turns
            return self.encode([(rng.choice(CAPTION_PROMPTS), caption_scene(scene))], "plain", scene)
        rng.shuffle(families)
        qs = [make_question(f, scene, rng, self.balancer, self.banned) for f in families]
        return self.encode([(q.text, q.answer) for q in qs], self.template, scene)


def splice(batch: list, embed: torch.nn.Embedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a batch, putting the 9 word slots where the image token is; right-pad. -> embeds, mask, labels."""
    seqs, labels = [], []
    for input_ids, lab, cells in batch:
        at = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if not at:
            seqs.append(embed(input_ids))
            labels.append(lab)
            continue
        i = at[0]
        seqs.append(torch.cat([embed(input_ids[:i]), slot_embeddings(cells, embed), embed(input_ids[i + 1:])]))
        labels.append(torch.cat([lab[:i], torch.full((GRID_CELLS,), IGNORE_INDEX), lab[i + 1:]]))
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    y = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
    return x, mask, y


@torch.no_grad()
def first_token_accuracy(model, stream: WorldStream, per_family: int = 60) -> dict[str, float]:
    """Greedy first answer token on fresh questions, per family (the skill stage 0 gives the LLM)."""
    embed, hits = model.get_input_embeddings(), defaultdict(list)
    for family in FAMILIES:
        for _ in range(per_family):
            scene, q, a = stream.question(family)
            ids, labels, cells = stream.encode([(q, a)], stream.template, scene)
            start = int((labels != IGNORE_INDEX).nonzero()[0])  # the answer's first token
            x, mask, _ = splice([(ids[:start], labels[:start], cells)], embed)
            pred = int(model(inputs_embeds=x, attention_mask=mask).logits[0, -1].argmax())
            hits[family].append(pred == int(ids[start]))
    return {f: round(100 * sum(v) / len(v), 1) for f, v in hits.items()}


def parse_turns(text: str) -> dict[str, int]:
    """'existence=2,spatial=2' -> {'existence': 2, 'spatial': 2}."""
    turns = {}
    for item in filter(None, text.split(",")):
        family, _, n = item.partition("=")
        if family not in FAMILIES or not n.isdigit():
            raise argparse.ArgumentTypeError(f"--turns item {item!r}: expected FAMILY=N with FAMILY in {FAMILIES}")
        turns[family] = int(n)
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("teacher", "student"), default="teacher", help="tiny LLM size")
    parser.add_argument("--backbone", choices=("qwen2", "qwen3"), default="qwen2")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--turns", type=parse_turns, default={}, help="questions per family, e.g. existence=3")
    parser.add_argument("--caption-prob", type=float, default=0.3, help="share of caption conversations")
    parser.add_argument("--describe-prob", type=float, default=0.3, help="share of question conversations "
                        "that also ask for a description")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--per-family", type=int, default=60, help="validation questions per family")
    add_run_args(parser)
    args = parser.parse_args()
    tok = setup(parser, args)
    template = {"qwen2": "qwen_2", "qwen3": "qwen_3"}[args.backbone]
    model = AutoModelForCausalLM.from_config(llm_config(args.role, args.backbone, tok))
    stream = WorldStream(tok, template, args.seed, caption_prob=args.caption_prob,
                         describe_prob=args.describe_prob, turns=args.turns)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / args.warmup, 0.5 * (1 + math.cos(
        math.pi * min(s, args.steps) / args.steps))))
    embed, start = model.get_input_embeddings(), time.time()
    bar = tqdm(range(args.steps), desc="stage 0 (world in words)", mininterval=5)
    for step in bar:
        x, mask, y = splice([next(stream) for _ in range(args.batch_size)], embed)
        loss = model(inputs_embeds=x, attention_mask=mask, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            val = WorldStream(tok, template, seed=args.seed + 10_000)
            acc = first_token_accuracy(model, val, args.per_family)
            model.train()
            tqdm.write(f"step {step + 1:5d}  " + "  ".join(f"{f} {a:5.1f}" for f, a in acc.items())
                       + f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
