"""How fast can the tiny teacher's LLM learn a question family? The measurement behind docs/tiny_world.md.

The tiny teacher's LLM (`llava.tiny.configs`, random init) is trained on questions from the world's own
generator (`llava.tiny.questions`) about freshly drawn scenes (an endless stream, no example seen twice),
with an upper bound on what the vision tower can give it: each visual token is the *perfect* one-hot code of
its grid cell (occupied, colour, shape, size; N_v = 9 as in the preset), through a fresh 2-layer GELU
projector. `--scene text` replaces the visual tokens with the scene's caption in words (the "pretrained LLM
reading a text scene" control); `--scene aligned` keeps 9 visual tokens but makes each the mean of the word
embeddings naming its cell's object (what a projector perfectly aligned to the LLM's word space would give).
`--text-first N` trains N steps on text scenes, then freezes the LLM and trains only the projector on visual
tokens (a text-skilled LLM, then LLaVA's projector-only alignment). `--caption-steps N` first trains N steps
on the scenes' captions (LLaVA's stage 1, LLM and projector together, as the tiny preset does); `--tie` ties
the LLM's input and output embeddings (as Qwen2-0.5B/1.5B do). `--pretrain-steps N --align-steps M` is
LLaVA's recipe for a pretrained LLM: N steps of the LLM alone on aligned scenes (caption and question batches
alternate), then M projector-only caption steps on the visual codes with the LLM frozen (validation during
those M steps measures the alignment: the frozen LLM answers from the projector's tokens), then questions on
visual codes with everything trained. Two curricula: `--curriculum "existence:500;existence,spatial:500"`
trains on those families for those steps before all of `--families`; `--max-objects "1:300,2:200"` draws
training scenes of at most 1 object for 300 steps, then at most 2 for 200, then 1-4 (validation: always 1-4). The loss and the accuracy are those of the answer's first token, after
the preset's chat template. Validation accuracy per family (and the majority-answer rate, i.e. chance) is
printed every `--eval-every` steps.

    python -m llava.tiny.preset prepare                                # the tokenizer (cached)
    python benchmarks/bench_tiny_learnability.py --families existence  # ~5 min on 2 CPU cores
    python benchmarks/bench_tiny_learnability.py --families existence,attribute,choice --steps 3000
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tiny_common import GRID_CELLS, add_run_args, cell_phrases, setup, slot_embeddings
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from llava.constants import IGNORE_INDEX
from llava.tiny.configs import llm_config
from llava.tiny.questions import FAMILIES, Balancer, askable, caption_scene, make_question
from llava.tiny.scenes import COLORS, HELDOUT_COMBOS, SHAPES, SIZES, TRAIN_COMBOS, Scene, sample_scene

CELL_FEATURES = 1 + len(COLORS) + len(SHAPES) + len(SIZES)


def cell_codes(scene: Scene) -> torch.Tensor:
    """[9, CELL_FEATURES]: occupied, one-hot colour, shape and size of each grid cell (row-major)."""
    x = torch.zeros(GRID_CELLS, CELL_FEATURES)
    offsets = (1, 1 + len(COLORS), 1 + len(COLORS) + len(SHAPES))
    for o in scene.objects:
        cell = o.row * 3 + o.col
        x[cell, 0] = 1
        for off, values, value in zip(offsets, (list(COLORS), SHAPES, list(SIZES)), (o.color, o.shape, o.size)):
            x[cell, off + values.index(value)] = 1
    return x


class QuestionStream:
    """Fresh (scene, question) pairs of the chosen families, encoded around an image placeholder."""

    def __init__(self, tokenizer, families: list[str], seed: int):
        self.tok, self.families, self.rng, self.balancer = tokenizer, families, random.Random(seed), Balancer()
        self.max_objects = 4  # the world's scenes hold 1-4 objects; a curriculum may lower this for a while
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n{q}"}], add_generation_prompt=True, tokenize=False
        )
        self.before, after = prompt.split("<image>")
        self.after_head, self.after_tail = after.split("{q}")

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def __next__(self) -> dict:
        while True:
            fewest = 2 if set(self.families) == {"spatial"} else 1  # spatial questions need two objects
            scene = sample_scene(self.rng, TRAIN_COMBOS, text_prob=0.0, min_objects=fewest,
                                 max_objects=max(fewest, self.max_objects))
            families = [f for f in self.families if askable(f, scene)]
            if families:
                break
        family = self.rng.choice(families)
        q = make_question(family, scene, self.rng, self.balancer, banned=set(HELDOUT_COMBOS))
        return {
            "family": family, "cells": cell_codes(scene), "caption": self.ids(caption_scene(scene)),
            "before": self.ids(self.before), "after": self.ids(self.after_head + q.text + self.after_tail),
            "answer": self.ids(q.answer)[0],
            "slots": [None if p is None else self.ids(p) for p in cell_phrases(scene)],
        }


class Bench(torch.nn.Module):
    def __init__(self, tokenizer, backbone: str, scene: str, tie: bool = False):
        super().__init__()
        config = llm_config("teacher", backbone, tokenizer)
        config.tie_word_embeddings = tie
        self.lm = AutoModelForCausalLM.from_config(config)
        hidden = self.lm.config.hidden_size
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(CELL_FEATURES, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
        )
        self.scene = scene
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _image(self, ex: dict) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()
        if self.scene == "visual":
            return self.projector(ex["cells"])
        if self.scene == "text":
            return emb(torch.tensor(ex["caption"]))
        return slot_embeddings(ex["slots"], emb)  # aligned

    def _run(self, seqs: list[torch.Tensor], labels: list[torch.Tensor] | None = None):
        lengths = torch.tensor([len(s) for s in seqs])
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
        if labels is not None:
            y = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
            return self.lm(inputs_embeds=x, attention_mask=mask, labels=y).loss
        return self.lm(inputs_embeds=x, attention_mask=mask).logits[torch.arange(len(seqs)), lengths - 1]

    def forward(self, batch: list[dict]) -> torch.Tensor:
        """Answer logits [B, V] at the last prompt position (sequences right-padded)."""
        emb = self.lm.get_input_embeddings()
        return self._run([
            torch.cat([emb(torch.tensor(ex["before"])), self._image(ex), emb(torch.tensor(ex["after"]))])
            for ex in batch
        ])

    def caption_loss(self, batch: list[dict]) -> torch.Tensor:
        """LLaVA's stage-1 loss (plain template): the caption after the visual tokens."""
        emb = self.lm.get_input_embeddings()
        seqs, labels = [], []
        for ex in batch:
            caption = torch.tensor([*ex["caption"], self.eos])
            image = self._image(ex)
            seqs.append(torch.cat([image, emb(caption)]))
            labels.append(torch.cat([torch.full((len(image),), IGNORE_INDEX), caption]))
        return self._run(seqs, labels)


@torch.no_grad()
def evaluate(model: Bench, val: list[dict], batch_size: int = 100) -> dict[str, float]:
    hits = defaultdict(list)
    for i in range(0, len(val), batch_size):
        chunk = val[i:i + batch_size]
        pred = model(chunk).argmax(-1)
        for ex, p in zip(chunk, pred.tolist()):
            hits[ex["family"]].append(p == ex["answer"])
    return {f: 100 * sum(v) / len(v) for f, v in sorted(hits.items())}


def parse_schedule(text: str, item: str, parse_value) -> list[tuple[object, int]]:
    """"a:300;b:200" -> [(value a, end step 300), (value b, end step 500)] (separator ';' or ',' per schedule)."""
    phases, end = [], 0
    for part in text.split(item):
        value, _, steps = part.rpartition(":")
        if not value or not steps.isdigit():
            raise argparse.ArgumentTypeError(f"bad schedule item {part!r}: expected VALUE:STEPS")
        end += int(steps)
        phases.append((parse_value(value), end))
    return phases


def phase_value(phases: list[tuple[object, int]], step: int, default: object) -> object:
    return next((value for value, end in phases if step < end), default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="existence", help=f"comma-separated, from {','.join(FAMILIES)}")
    parser.add_argument("--scene", choices=("visual", "text", "aligned"), default="visual")
    parser.add_argument("--text-first", type=int, default=0, help="text-scene steps before a projector-only phase")
    parser.add_argument("--caption-steps", type=int, default=0, help="caption steps before the question steps")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="stage 0: steps on aligned scenes (captions and questions alternate), LLM only")
    parser.add_argument("--align-steps", type=int, default=0,
                        help="then projector-only caption steps on visual codes, LLM frozen (LLaVA stage 1)")
    parser.add_argument("--curriculum", type=lambda t: parse_schedule(t, ";", lambda v: v.split(",")), default=[],
                        help='families before all of --families, e.g. "existence:500;existence,spatial:500"')
    parser.add_argument("--max-objects", type=lambda t: parse_schedule(t, ",", int), default=[],
                        help='objects per training scene at most, e.g. "1:300,2:200" (then 1-4)')
    parser.add_argument("--tie", action="store_true", help="tie the LLM's input and output embeddings")
    parser.add_argument("--backbone", choices=("qwen2", "qwen3"), default="qwen2")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--val-size", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    add_run_args(parser)
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    for phase, _ in args.curriculum:
        if not set(phase) <= set(families):
            parser.error(f"--curriculum families {phase} are not all in --families {families}")
    if any(not 1 <= n <= 4 for n, _ in args.max_objects):
        parser.error("--max-objects values must be 1-4 (the world's scenes hold 1-4 objects)")
    tok = setup(parser, args)
    val_stream = QuestionStream(tok, families, seed=args.seed + 10_000)
    val = [next(val_stream) for _ in range(args.val_size)]
    chance = {f: 100 * Counter(ex["answer"] for ex in val if ex["family"] == f).most_common(1)[0][1]
              / sum(ex["family"] == f for ex in val) for f in families}
    print("chance (majority answer): " + "  ".join(f"{f} {chance[f]:.1f}" for f in sorted(chance)))
    train = QuestionStream(tok, families, seed=args.seed)
    first = "text" if args.text_first else "aligned" if args.pretrain_steps else args.scene
    model = Bench(tok, args.backbone, first, tie=args.tie)
    staged = args.pretrain_steps + args.align_steps
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    start = time.time()
    for step in tqdm(range(args.steps + 1), desc="train", mininterval=5):
        if args.text_first and step == args.text_first:
            model.scene = "visual"
            model.lm.requires_grad_(False)
        if args.pretrain_steps and step == args.pretrain_steps:
            model.scene = "visual"
            model.lm.requires_grad_(False)
        if staged and step == staged:
            model.lm.requires_grad_(True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, val)
            tqdm.write(f"step {step:5d}  " + "  ".join(f"{f} {a:5.1f}" for f, a in acc.items())
                       + f"  ({time.time() - start:.0f} s)")
        if step == args.steps:
            break
        train.families = phase_value(args.curriculum, step, families)
        train.max_objects = phase_value(args.max_objects, step, 4)
        batch = [next(train) for _ in range(args.batch_size)]
        if step < args.caption_steps or args.pretrain_steps <= step < staged:
            loss = model.caption_loss(batch)
        elif step < args.pretrain_steps and step % 2:
            loss = model.caption_loss(batch)
        else:
            loss = F.cross_entropy(model(batch), torch.tensor([ex["answer"] for ex in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


if __name__ == "__main__":
    main()
