"""Exposure-bias analysis (Appendix B.4, Fig. 2 and Fig. 7): accumulated errors and %ExAccErr.

    E_train(l)   = sum_{t<=l} E_{(x, y) ~ D}     KL(P_T || P_S)(y_t | x, y_<t)    (Eq. 9, ground truth)
    E_test(l)    = sum_{t<=l} E_{x, y_<t ~ P_S}  KL(P_T || P_S)(y_t | x, y_<t)    (Eq. 10 = R(l), Eq. 12)
    E(l)         = sum_{t<=l} E_{x, y_<t ~ P_T}  KL(P_T || P_S)(y_t | x, y_<t)    (Eq. 13)
    %ExAccErr(l) = (R(l) - E(l)) / E(l) * 100                                      (Eq. 11)

Design choices:
- `accumulated_errors(prefix_source=...)` computes all three: "student" -> R = E_test, "teacher" -> E,
  "data" -> E_train (the questions' ground-truth "answer", tokenized as in training).
- One prefix of up to L tokens is sampled per prompt with the model's own `generate` (left padding; pure
  temperature sampling over the tokenizer's vocabulary, padded lm_head rows suppressed). Then ONE teacher
  and ONE student forward on prompt + prefix (right padded) give every step: step t reads the logits at
  the position before y_t, by causality equal to a separate forward on prompt + y_<t (tested).
- The expectation at step t is over the prompts still alive at t: a prefix ending with a stop token at
  step k (the prediction of that token included) counts for steps 1..k only. A step no prompt reaches
  adds 0, so R and E stay flat from there.
- %ExAccErr is defined as 0 where E(l) == 0 (the student equals the teacher on the teacher's prefixes).
- Logits are sliced to len(tokenizer) (lm_heads are padded differently); different tokenizers are an error.
- Positions are read in the expanded layout via `source_index` (`prepare_inputs_labels_for_multimodal`);
  only the hidden states at the L read positions go through lm_head: no [B, T', V] logits tensor.

CLI (see `main`): python -m aligntI_patch.exposure_bias --teacher-path T --student-path S [--student-path S2]
     --question-file Q.jsonl --image-folder F -> DIR/exposure_bias.json (R, E, %ExAccErr per step and
     student; E_train too when every record has an answer) and DIR/exposure_bias.png (as Fig. 7).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import AutoTokenizer

from aligntI_patch.divergences import token_divergence
from llava import generation
from llava.constants import IGNORE_INDEX
from llava.conversation import get_conv_template, tokenize_conversation
from llava.model.builder import load_pretrained_model

logger = logging.getLogger(__name__)


def load_questions(path: str | Path, num_prompts: int | None = None, seed: int = 0) -> list[dict]:
    """Questions {"text", "image"?, "answer"?} from a question jsonl (model_vqa_loader's format) or a LLaVA
    JSON with "conversations" (first human turn -> text, first gpt turn -> answer); a seeded subset."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = generation.read_questions(path)
    else:
        rows = []
        for rec in json.loads(path.read_text(encoding="utf-8")):
            first = {t["from"]: t["value"] for t in reversed(rec["conversations"])}  # first turn of each role
            rows.append({"question_id": rec.get("id"), "text": first["human"], "image": rec.get("image"),
                         "answer": first.get("gpt")})
    if num_prompts is not None and len(rows) > num_prompts:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), num_prompts))]
    return rows


def _prompts(model, tokenizer, image_processor, questions, image_folder, conv_mode) -> generation.QuestionDataset:
    aspect = getattr(model.config, "image_aspect_ratio", None) or "pad"
    return generation.QuestionDataset(questions, image_folder, tokenizer, image_processor, conv_mode, aspect)


@torch.inference_mode()
def sample_prefixes(
    model, tokenizer, image_processor, questions: Sequence[dict], image_folder: str, conv_mode: str,
    max_len: int, batch_size: int = 16, temperature: float = 1.0, seed: int = 0,
) -> list[Tensor]:
    """Responses y ~ P_model(. | x) (Eq. 10, 12, 13): [n_i <= max_len] each, cut after the first stop token.

    Pure temperature sampling (temperature 0: greedy). Seeded once, so samples depend on `batch_size`.
    """
    dataset = _prompts(model, tokenizer, image_processor, questions, image_folder, conv_mode)
    kwargs = generation.generation_kwargs(model, tokenizer, temperature, max_new_tokens=max_len)
    if temperature > 0:
        kwargs.update(top_k=0, top_p=1.0)  # sample from the full distribution, not a truncated one
    rows = model.get_output_embeddings().weight.shape[0]
    if rows > len(tokenizer):  # padded lm_head rows are no tokens (and the other model may lack them)
        kwargs["suppress_tokens"] = list(range(len(tokenizer), rows))
    stops = torch.tensor(generation.stop_token_ids(model, tokenizer))
    torch.manual_seed(seed)
    prefixes: list[Tensor] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="sampling prefixes", leave=False):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ids, mask, images = generation.collate_left_padded(batch, kwargs["pad_token_id"])  # (B, T) left padded
        if images is not None:
            images = images.to(model.device, model.dtype)  # (n_img, 3, H, W)
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model.generate(ids, images=images, attention_mask=mask, **kwargs)  # (B, G), G <= max_len
        for row in out.cpu():  # (G,), padded after the stop token
            ends = torch.isin(row, stops).nonzero()
            prefixes.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return prefixes


def reference_prefixes(questions: Sequence[dict], tokenizer, conv_mode: str, max_len: int) -> list[Tensor]:
    """Ground-truth responses (Eq. 9) as tokenized in training (answer + turn end), first `max_len` tokens."""
    prefixes = []
    for i, q in enumerate(questions):
        if q.get("answer") is None:
            raise ValueError(f"question {q.get('question_id', i)} has no answer: E_train (Eq. 9) needs one")
        conv = get_conv_template(conv_mode)
        conv.append_message(conv.roles[0], q["text"])
        conv.append_message(conv.roles[1], q["answer"])
        ids, labels, _ = tokenize_conversation(conv, tokenizer)
        prefixes.append(ids[labels != IGNORE_INDEX][:max_len])
    return prefixes


def _step_logits(model, input_ids: Tensor, attention_mask: Tensor, items, query: Tensor, vocab: int):
    """Logits [B, L, vocab] at positions `query` [B, L] of right-padded, unexpanded rows (one forward);
    `items` are the rows' QuestionDataset items (their pixels [3, H, W] or None)."""
    device = model.device
    pixels = [p for _, p in items if p is not None]
    images = torch.stack(pixels).to(device, model.dtype) if pixels else None  # (n_img, 3, H, W)
    ids, mask = input_ids.to(device), attention_mask.to(device)
    mm = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)  # expanded layout
    hidden = model.get_decoder()(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
                                 position_ids=mm.position_ids).last_hidden_state  # (B, T', H)
    # Text tokens map one to one: the expanded index of a query is the last j with source_index[j] <= query.
    source = mm.source_index.masked_fill(mm.source_index < 0, torch.iinfo(torch.long).max).contiguous()
    index = torch.searchsorted(source, query.to(device), right=True) - 1  # (B, L)
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, L, H)
    return model.lm_head(picked)[..., :vocab]  # (B, L, V)


@torch.inference_mode()
def step_divergences(
    teacher, student, tokenizer, image_processor, questions: Sequence[dict], image_folder: str,
    conv_mode: str, prefixes: Sequence[Tensor], batch_size: int = 16, max_len: int | None = None,
    teacher_image_processor=None,
) -> tuple[Tensor, Tensor]:
    """KL(P_T || P_S)(y_t | x, y_<t) for every prompt i and step t -> (kl [N, L], alive [N, L] bool).

    Step t (0-based here) is alive while t < len(prefixes[i]); `max_len` defaults to the longest prefix.
    `teacher_image_processor` defaults to `image_processor` (the towers may differ).
    """
    steps = max_len or max(len(p) for p in prefixes)
    proc_t = teacher_image_processor or image_processor
    data_t = _prompts(teacher, tokenizer, proc_t, questions, image_folder, conv_mode)
    data_s = _prompts(student, tokenizer, image_processor, questions, image_folder, conv_mode)
    kl = torch.zeros(len(questions), steps)
    alive = torch.zeros(len(questions), steps, dtype=torch.bool)
    for start in tqdm(range(0, len(questions), batch_size), desc="teacher/student forwards", leave=False):
        rows = list(range(start, min(start + batch_size, len(questions))))
        items_t, items_s = [data_t[i] for i in rows], [data_s[i] for i in rows]
        seqs = [torch.cat([ids, prefixes[i][:steps]]) for (ids, _), i in zip(items_t, rows)]
        ids = pad_sequence(seqs, batch_first=True, padding_value=0)  # (B, T) right padded; pads are masked
        mask = pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)  # (B, T)
        prompt_len = torch.tensor([len(x) for x, _ in items_t])  # (B,)
        # step t reads position prompt_len - 1 + t; steps past a short prefix read its last token (masked out)
        query = (prompt_len[:, None] - 1 + torch.arange(steps)).minimum(mask.sum(1, keepdim=True) - 1)
        logits_t = _step_logits(teacher, ids, mask, items_t, query, len(tokenizer))  # (B, L, V)
        logits_s = _step_logits(student, ids, mask, items_s, query, len(tokenizer))  # (B, L, V)
        live = torch.arange(steps) < torch.tensor([len(prefixes[i]) for i in rows])[:, None]  # (B, L)
        kl[rows] = token_divergence(logits_s, logits_t, "fkl").float().cpu() * live
        alive[rows] = live
    return kl, alive


def accumulate(kl: Tensor, alive: Tensor) -> Tensor:
    """[N, L] per-step divergences -> [L]: the mean over alive prompts per step, summed up to l (Eq. 9-13)."""
    return ((kl * alive).sum(0) / alive.sum(0).clamp(min=1)).cumsum(0)


def accumulated_errors(
    teacher, student, tokenizer, image_processor, questions: Sequence[dict], image_folder: str = "",
    conv_mode: str | None = None, max_len: int = 32, batch_size: int = 16, prefix_source: str = "student",
    temperature: float = 1.0, seed: int = 0, teacher_image_processor=None,
) -> Tensor:
    """Accumulated error [max_len] for l = 1..max_len, with prefixes from `prefix_source`: "student" ->
    R(l) (Eq. 12) = E_test(l) (Eq. 10); "teacher" -> E(l) (Eq. 13); "data" -> E_train(l) (Eq. 9)."""
    if prefix_source not in ("student", "teacher", "data"):
        raise ValueError(f"prefix_source must be 'student', 'teacher' or 'data', got {prefix_source!r}")
    conv_mode = conv_mode or generation.default_conv_mode(student)
    proc_t = teacher_image_processor or image_processor
    common = dict(questions=questions, image_folder=image_folder, conv_mode=conv_mode)
    if prefix_source == "data":
        prefixes = reference_prefixes(questions, tokenizer, conv_mode, max_len)
    else:
        model, proc = (student, image_processor) if prefix_source == "student" else (teacher, proc_t)
        prefixes = sample_prefixes(model, tokenizer, proc, **common, max_len=max_len, batch_size=batch_size,
                                   temperature=temperature, seed=seed)
    kl, alive = step_divergences(teacher, student, tokenizer, image_processor, **common, prefixes=prefixes,
                                 batch_size=batch_size, max_len=max_len, teacher_image_processor=proc_t)
    return accumulate(kl, alive)


def excess_accumulated_error(R: Tensor, E: Tensor) -> Tensor:
    """%ExAccErr(l) = (R(l) - E(l)) / E(l) * 100 (Eq. 11), [L] -> [L]; defined as 0 where E(l) == 0."""
    positive = E > 0
    return torch.where(positive, (R - E) / torch.where(positive, E, 1.0) * 100.0, 0.0)


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_path: str, student_path: str) -> None:
    """Eq. 9-13 compare distributions over one vocabulary: different tokenizers are an error."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"teacher {teacher_path} ({len(teacher_tokenizer)} tokens) and student {student_path} "
            f"({len(student_tokenizer)} tokens) use different tokenizers; Eq. 9-13 need a shared vocabulary"
        )


def write_plot(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """%ExAccErr vs generation step, one line per student (the paper's Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, row in results.items():
        ax.plot(range(1, len(row["ExAccErr"]) + 1), row["ExAccErr"], label=name)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("generation step l")
    ax.set_ylabel("%ExAccErr (Eq. 11)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: R, E and %ExAccErr of each student against the teacher; writes exposure_bias.json and .png."""
    parser = argparse.ArgumentParser(description="Exposure bias: %ExAccErr per step (Align-TI Eq. 11).")
    parser.add_argument("--teacher-path", required=True, help="teacher checkpoint folder")
    parser.add_argument("--student-path", action="append", required=True, help="student checkpoint (repeat)")
    parser.add_argument("--name", action="append", help="legend name per student (default: folder name)")
    parser.add_argument("--question-file", required=True, help="question jsonl or LLaVA JSON")
    parser.add_argument("--image-folder", default="", help="folder the image names are relative to")
    parser.add_argument("--max-len", type=int, default=32, help="generation steps L")
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts to average over (paper: 1000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=".", help="where exposure_bias.json and .png go")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the teacher's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompt subset and the sampling")
    args = parser.parse_args(argv)
    names = args.name or [generation.model_name_from_path(p) for p in args.student_path]
    if len(names) != len(args.student_path) or args.max_len < 1:
        parser.error("give one --name per --student-path, and --max-len >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    teacher_tok = AutoTokenizer.from_pretrained(args.teacher_path)
    for path in args.student_path:  # fail before any model is loaded
        check_same_tokenizer(teacher_tok, AutoTokenizer.from_pretrained(path), args.teacher_path, path)
    tokenizer, teacher, teacher_proc, _ = load_pretrained_model(args.teacher_path, device=args.device)
    conv_mode = args.conv_mode or generation.default_conv_mode(teacher)
    questions = load_questions(args.question_file, args.num_prompts, args.seed)
    common = dict(questions=questions, image_folder=args.image_folder, conv_mode=conv_mode,
                  max_len=args.max_len, batch_size=args.batch_size)
    teacher_prefixes = sample_prefixes(teacher, tokenizer, teacher_proc, **common, seed=args.seed)  # Eq. 13
    has_answers = all(q.get("answer") is not None for q in questions)
    data_prefixes = reference_prefixes(questions, tokenizer, conv_mode, args.max_len) if has_answers else None
    if not has_answers:
        logger.info("E_train (Eq. 9) skipped: not every question of %s has an answer", args.question_file)
    results: dict[str, dict[str, Any]] = {}
    for name, path in tqdm(list(zip(names, args.student_path)), desc="students"):
        _, student, student_proc, _ = load_pretrained_model(path, device=args.device)
        student_prefixes = sample_prefixes(student, tokenizer, student_proc, **common, seed=args.seed)
        errors = partial(step_divergences, teacher, student, tokenizer, student_proc, **common,
                         teacher_image_processor=teacher_proc)
        kl_r, alive_r = errors(prefixes=student_prefixes)
        kl_e, alive_e = errors(prefixes=teacher_prefixes)
        R, E = accumulate(kl_r, alive_r), accumulate(kl_e, alive_e)
        exacc = excess_accumulated_error(R, E)
        row = {"path": path, "R": R.tolist(), "E": E.tolist(), "ExAccErr": exacc.tolist(),
               "alive_R": alive_r.sum(0).tolist(), "alive_E": alive_e.sum(0).tolist()}  # prompts per step
        if data_prefixes is not None:  # E_train (Eq. 9); E_test (Eq. 10) is R
            row["E_train"] = accumulate(*errors(prefixes=data_prefixes)).tolist()
        results[name] = row
        del student, errors  # free before the next student loads
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": args.teacher_path, "question_file": args.question_file, "num_prompts": len(questions),
            "max_len": args.max_len, "seed": args.seed, "conv_mode": conv_mode, "students": results}
    (out / "exposure_bias.json").write_text(json.dumps(meta, indent=2))
    write_plot(out / "exposure_bias.png", results)
    summary = ", ".join(f"{n} {r['ExAccErr'][-1]:+.1f}%" for n, r in results.items())
    sys.stdout.write(f"%ExAccErr at l={args.max_len}: {summary}; wrote {out}/exposure_bias.json and .png\n")


if __name__ == "__main__":
    main()
