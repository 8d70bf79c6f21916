"""Cost of one whole training step per recipe (paper Table 6): time, memory, decoder passes and FLOPs, as ratios to KD.

One optimizer step exactly as `Trainer.train` runs it, through an `AlignTITrainer` per recipe around the same
two models and the same batch: `get_batch_samples` (GKD's on-policy generation happens there), `training_step`
(`compute_loss` -> `step_forward` -> `loss_term_sums`, then backward), gradient clipping, the optimizer step and
`zero_grad`. Recipes: sft, kd, kd_iva, kd_tpa, aligntI and gkd (`aligntI_patch/recipes.py`).

Design choices:
- Models: random LLaVA-Qwen2 student and teacher, each with its own frozen SigLIP tower whose geometry gives
  N_v visual tokens the way SigLIP-so400m gives 729 (patch 14, 27 x 27 patches; --visual must be a square). On
  CPU the towers are tiny (width 32, 2 layers) and the LLMs follow bench_tpa.py's conventions (heads = hidden /
  64, key-value heads = heads / 4, MLP 4 x hidden); with --real (CUDA only) they have the real shapes: a
  Qwen2-0.5B (or --real-student 1.5b) student, a Qwen2-7B teacher, SigLIP-so400m towers, bf16.
- Batch: B samples of [image] + instruction + response tokens (random ids, a random image), typed VISUAL /
  INSTRUCTION / RESPONSE as the collator types them; no template tokens. --confident sharpens the student's
  logits (its final norm x --sharpen, which also works for a tied lm_head) and makes the response its greedy
  continuation, so most TPA candidates equal the ground truth and dedupe removes their rows (bench_tpa.py).
- The learning rate is 0: AdamW does all of its work but the weights never change, so every recipe and every
  repeat sees the same models. One AdamW (the trainer's default optimizer) is shared by the trainers.
- GKD runs with on_policy_prob 1 (the recipe's 0.5 would time a mix of both kinds of step): every step
  generates the replies (at most --response new tokens) from the student, then aligns on them.
- Time: median over --iters round-robin rounds (every recipe once per round, after --warmup rounds), so load
  on a shared machine hits all recipes alike.
- Memory: the step's peak minus what was held just before it (models, optimizer state), after one warm-up
  step. CPU: peak RSS, each recipe in its own process forked before any model is built (glibc returns freed
  blocks of 128 KiB or more at once, the kernel's VmHWM is reset right before the step); CUDA: in this
  process, torch.cuda.max_memory_allocated. `total_mb` adds what the models and the optimizer state hold.
- FLOPs: measured by torch.utils.flop_counter.FlopCounterMode over one more step per recipe: every matmul,
  convolution and attention that runs (vision towers, decoders, lm_head chunks, backward, generation; masked
  attention blocks included where the kernel computes them), nothing elementwise. Decoder calls and the
  tokens they process come from forward pre-hooks on each model's decoder.

    python benchmarks/bench_step.py                                   # CPU, paper mix scaled down (minutes)
    python benchmarks/bench_step.py --confident --json step.json
    python benchmarks/bench_step.py --grad-ckpt --json step_ckpt.json # the student under activation checkpointing
    python benchmarks/bench_step.py --smoke --json /tmp/s.json        # tiny shapes, seconds (the test)
    python benchmarks/bench_step.py --device cuda --real --batch 4    # Qwen2-0.5B / 7B shapes, bf16
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from tokenizers import Tokenizer, models
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerFast, SiglipVisionConfig

from aligntI_patch.arguments import DistillArguments
from aligntI_patch.on_policy import VocabularyMask
from aligntI_patch.trainer import AlignTITrainer
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.model import LlavaQwenConfig, LlavaQwenForCausalLM

RECIPES = ("sft", "kd", "kd_iva", "kd_tpa", "aligntI", "gkd")
BASE = "kd"
PATCH = 14  # SigLIP-so400m-patch14: 27 x 27 = 729 patches


@dataclass(frozen=True)
class LMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rows: int  # lm_head rows (>= the shared vocabulary)
    tied: bool = False

    @classmethod
    def small(cls, hidden: int, layers: int, rows: int) -> LMShape:
        """bench_tpa.py's conventions."""
        heads = max(hidden // 64, 2)
        return cls(hidden, layers, heads, max(heads // 4, 1), 4 * hidden, rows)


# Qwen2's released configs (random weights here); the shared tokenizer has 151646 ids
QWEN2 = {"0.5b": LMShape(896, 24, 14, 2, 4864, 151936, tied=True),
         "1.5b": LMShape(1536, 28, 12, 2, 8960, 151936, tied=True),
         "7b": LMShape(3584, 28, 28, 4, 18944, 152064)}
QWEN2_VOCAB = 151646
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SMOKE = dict(visual=16, instruction=4, response=4, student_hidden=32, student_layers=1, teacher_hidden=64,
             teacher_layers=2, vocab=4096, warmup=0, iters=1)


# ----------------------------------------------------------------------------- models, batch, trainers


def build_llava(shape: LMShape, vision: dict, args: argparse.Namespace, seed: int) -> LlavaQwenForCausalLM:
    """A random LLaVA-Qwen2 model built directly on the device in the benchmark's dtype."""
    side = math.isqrt(args.visual)
    tower = SiglipVisionConfig(**vision, image_size=side * PATCH, patch_size=PATCH, vision_use_head=False)
    cfg = LlavaQwenConfig(
        vocab_size=shape.rows, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied, max_position_embeddings=4096, pad_token_id=args.vocab - 2,
        eos_token_id=args.vocab - 1, mm_vision_tower="random-siglip", mm_vision_config=tower.to_dict(),
        mm_hidden_size=tower.hidden_size, use_cache=False,
    )
    cfg._attn_implementation = args.attn
    torch.manual_seed(seed)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(args.device):
            model = LlavaQwenForCausalLM(cfg)
    finally:
        torch.set_default_dtype(dtype)
    return model


def build_models(args: argparse.Namespace, with_teacher: bool = True):
    """(student in train mode, teacher or None); the student's vision tower is frozen (LLaVA's finetune stage)."""
    vision = SIGLIP_SO400M if args.real else TINY_SIGLIP
    if args.real:
        s_shape, t_shape = QWEN2[args.real_student], QWEN2["7b"]
    else:
        s_shape = LMShape.small(args.student_hidden, args.student_layers, args.vocab)
        t_shape = LMShape.small(args.teacher_hidden, args.teacher_layers, args.vocab)
    student = build_llava(s_shape, vision, args, seed=0).train()
    if args.grad_ckpt:  # what --gradient_checkpointing True does (HF's default kwargs are non-reentrant too)
        student.activation_checkpointing_enable({"use_reentrant": False})
    teacher = build_llava(t_shape, vision, args, seed=1) if with_teacher else None
    return student, teacher


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `vocab` ids (the last two: pad and <|im_end|>): on-policy generation reads its
    end and pad ids, the losses its length."""
    words = {f"w{i}": i for i in range(vocab - 2)} | {"<|endoftext|>": vocab - 2, "<|im_end|>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def make_batch(student: LlavaQwenForCausalLM, args: argparse.Namespace) -> dict:
    """A collator batch: [image] + instruction + response per sample (the response random, or with --confident
    the sharpened student's greedy continuation)."""
    g = torch.Generator().manual_seed(0)
    B, n_i, n_r = args.batch, args.instruction, args.response
    text = torch.randint(0, args.vocab - 2, (B, n_i + n_r), generator=g)
    input_ids = torch.cat([torch.full((B, 1), IMAGE_TOKEN_INDEX), text], 1).to(args.device)
    size = student.get_vision_tower().config.image_size
    images = torch.randn(B, 3, size, size, generator=g).to(args.device, getattr(torch, args.dtype))
    if args.confident:
        with torch.no_grad():
            student.get_model().norm.weight.mul_(args.sharpen)  # logits x sharpen, tied lm_head or not
        prompt = input_ids[:, : 1 + n_i]
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n_r, min_new_tokens=n_r, eos_token_id=args.vocab - 1,
                               pad_token_id=args.vocab - 2)
        input_ids[:, 1 + n_i :] = student.generate(prompt, images=images, attention_mask=torch.ones_like(prompt),
                                                   generation_config=cfg,
                                                   logits_processor=LogitsProcessorList([VocabularyMask(args.vocab)]))
        student.train()
    types = torch.full_like(input_ids, int(TokenType.INSTRUCTION))
    types[:, 0] = int(TokenType.VISUAL)
    types[:, 1 + n_i :] = int(TokenType.RESPONSE)
    labels = torch.where(types == TokenType.RESPONSE, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "token_types": types, "images": images}


def build_trainer(recipe: str, student, teacher, tokenizer, args: argparse.Namespace, out_dir: str,
                  optimizer: torch.optim.Optimizer | None) -> AlignTITrainer:
    """The recipe's trainer as distill.py builds it (teacher only where a term reads it), learning rate 0."""
    targs = DistillArguments(
        recipe=recipe, output_dir=out_dir, teacher_model_path="random weights, built in memory",
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", report_to="none", save_strategy="no",
        learning_rate=0.0, per_device_train_batch_size=args.batch, iva_layer=str(args.iva_layer),
        model_max_length=max(16, args.visual + args.instruction + args.response), tpa_num_samples=args.d,
        tpa_top_p=args.top_p, on_policy_prob=1.0 if recipe == "gkd" else None,
        on_policy_max_new_tokens=args.response, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = AlignTITrainer(model=student, args=targs, processing_class=tokenizer,
                             teacher=teacher if targs.needs_teacher else None, iva_layer=args.iva_layer,
                             vocab_size=args.vocab)
    if optimizer is None:
        trainer.create_optimizer()
    else:
        trainer.optimizer = optimizer
    return trainer


def step_fn(trainer: AlignTITrainer, batch: dict) -> Callable[[], None]:
    """One optimizer step of `Trainer._inner_training_loop`, gradient accumulation 1."""
    model, args = trainer.model, trainer.args

    def step() -> None:
        inputs, num_items = trainer.get_batch_samples(iter([batch]), 1, args.device)  # GKD generates here
        trainer.training_step(model, inputs[0], num_items)
        if args.max_grad_norm > 0:
            trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        model.zero_grad()

    return step


def build_steps(args: argparse.Namespace, recipes: tuple[str, ...], out_dir: str, with_teacher: bool = True):
    """Models, batch and one step function per recipe, all sharing the models, the batch and one optimizer."""
    student, teacher = build_models(args, with_teacher)
    batch = make_batch(student, args)
    tokenizer = build_tokenizer(args.vocab)
    steps, optimizer = {}, None
    for r in recipes:
        trainer = build_trainer(r, student, teacher, tokenizer, args, out_dir, optimizer)
        optimizer = trainer.optimizer
        steps[r] = step_fn(trainer, batch)
    return student, teacher, optimizer, steps


# ----------------------------------------------------------------------------- measurements


class DecoderCounter:
    """Calls of a model's decoder and the positions they process (a forward pre-hook on `get_decoder()`)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.calls = self.tokens = 0
        lm.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += x.shape[:2].numel()

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.tokens)
        self.calls = self.tokens = 0
        return out


def held_mb(*modules: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> float:
    """What the models (parameters, buffers) and the optimizer state hold between steps, in MiB."""
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    states = optimizer.state.values() if optimizer is not None else ()
    tensors += [t for state in states for t in state.values() if torch.is_tensor(t)]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # tied weights once
    return sum(unique.values()) / 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_memory(recipe: str, args: argparse.Namespace, out_dir: str) -> dict:
    """In a fresh (forked) process: the recipe's step peak RSS over the RSS just before it (MiB)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed: blocks >= 128 KiB are mmapped, unmapped when freed
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed heap tops back too
    student, teacher, optimizer, steps = build_steps(args, (recipe,), out_dir, with_teacher=recipe != "sft")
    steps[recipe]()  # warm-up: the optimizer state, lazily built buffers
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    steps[recipe]()
    peak_mb = (_rss_kib("VmHWM") - before) / 1024
    return {"peak_mb": peak_mb, "total_mb": peak_mb + held_mb(student, teacher, optimizer=optimizer)}


def _child(conn, fn, *fn_args) -> None:
    try:
        conn.send(("ok", fn(*fn_args)))
    except BaseException:  # the parent raises it, naming the recipe
        conn.send(("error", traceback.format_exc()))
    conn.close()


def cpu_memory(args: argparse.Namespace, out_dir: str) -> dict[str, dict] | None:
    """Each recipe in its own process, forked from this one before it built any model (Linux: glibc, /proc);
    None elsewhere."""
    if platform.system() != "Linux" or not os.access("/proc/self/clear_refs", os.W_OK):
        print("CPU memory is measured on Linux only (glibc, /proc/self/clear_refs): not measured here")
        return None
    extract_model_from_parallel(torch.nn.Identity())  # accelerate's lazy imports (deepspeed), once, before forking
    ctx = multiprocessing.get_context("fork")
    out = {}
    for r in RECIPES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, _cpu_memory, r, args, out_dir))
        proc.start()
        child.close()  # this end is the child's: recv then fails, rather than waits, if the child dies
        try:
            status, value = parent.recv()
        except EOFError:
            status, value = "error", "the process died without a result (out of memory?)"
        proc.join()
        if status != "ok":
            raise RuntimeError(f"memory measurement of {r} failed:\n{value}")
        out[r] = value
    return out


def cuda_memory(steps: dict[str, Callable[[], None]], held: dict[str, float]) -> dict[str, dict]:
    """Each recipe's (already warm) step: max allocated over allocated just before it (MiB)."""
    out = {}
    for r, step in steps.items():
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out[r] = {"peak_mb": (peak - before) / 2**20, "total_mb": (peak - before) / 2**20 + held[r]}
    return out


def _registered(formula: Callable) -> Callable:
    """A formula from torch's registry (already taking tensors), marked so that FlopCounterMode uses it as is."""
    raw = functools.partial(formula)
    raw._get_raw = True
    return raw


# torch's FLOP registry lacks the CPU flash-attention kernel that sdpa runs on CPU: count it as its CUDA siblings
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _registered(sdpa_flop),
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                           _registered(sdpa_backward_flop)}


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


def profile(step: Callable[[], None], device: str, rows: int = 20) -> str:
    """torch.profiler's top operators of one step, by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----------------------------------------------------------------------------- report


def _ratio(x: float | None, base: float | None) -> float | None:
    if x is None or base is None:
        return None
    return x / base if base else 1.0 if x == base else math.inf


def summarize(times, counts, flops, memory: dict | None) -> dict[str, dict]:
    """Per recipe: medians, measurements and their ratios to kd (memory fields None when not measured)."""
    base_ms = 1e3 * statistics.median(times[BASE])
    mem = memory or {r: {"peak_mb": None, "total_mb": None} for r in RECIPES}
    out = {}
    for r in RECIPES:
        ms = 1e3 * statistics.median(times[r])
        s_calls, s_tok, t_calls, t_tok = (statistics.mean(c) for c in zip(*counts[r]))
        peak, total = mem[r]["peak_mb"], mem[r]["total_mb"]
        out[r] = {
            "ms": ms, "time_ratio": ms / base_ms,
            "peak_mb": peak, "memory_ratio": _ratio(peak, mem[BASE]["peak_mb"]),
            "total_mb": total, "total_memory_ratio": _ratio(total, mem[BASE]["total_mb"]),
            "gflop": flops[r] / 1e9, "flop_ratio": flops[r] / flops[BASE],
            "student_calls": s_calls, "student_tokens": s_tok, "teacher_calls": t_calls, "teacher_tokens": t_tok,
            "times_ms": [1e3 * t for t in times[r]],
        }
    return out


def markdown(results: dict[str, dict]) -> str:
    head = ("| recipe | ms/step | time / kd | step MB | memory / kd | total MB | total / kd | GFLOP | FLOP / kd "
            "| student calls | student tokens | teacher calls | teacher tokens |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r, x in results.items():
        lines.append(
            f"| {r} | {x['ms']:.0f} | {x['time_ratio']:.2f} | {f(x['peak_mb'], '.0f')} | {f(x['memory_ratio'], '.2f')} | "
            f"{f(x['total_mb'], '.0f')} | {f(x['total_memory_ratio'], '.2f')} | {x['gflop']:.1f} | {x['flop_ratio']:.2f} | "
            f"{x['student_calls']:g} | {x['student_tokens']:.0f} | {x['teacher_calls']:g} | {x['teacher_tokens']:.0f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32, bfloat16 with --real)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"],
                   help="both models' attention; flex_attention needs CUDA (no FlexAttention backward on CPU)")
    p.add_argument("--real", action="store_true",
                   help="CUDA only: Qwen2-7B-shaped teacher, Qwen2-0.5B student, SigLIP-so400m towers, vocab 151646 "
                        "(lm_head 151936 / 152064 rows); the size flags below are then ignored")
    p.add_argument("--real-student", default="0.5b", choices=["0.5b", "1.5b"], help="student shape with --real")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round: checks that everything runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--visual", type=int, default=729, help="N_v, a square (paper: 729 SigLIP patches)")
    p.add_argument("--instruction", type=int, default=64, help="instruction tokens")
    p.add_argument("--response", type=int, default=64, help="response tokens (GKD: at most this many generated)")
    p.add_argument("--d", type=int, default=4, help="TPA candidates per response position (paper: 4)")
    p.add_argument("--top-p", type=float, default=0.9, help="TPA nucleus mass")
    p.add_argument("--vocab", type=int, default=32000, help="shared vocabulary = lm_head rows of both models")
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--teacher-hidden", type=int, default=768)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--iva-layer", type=int, default=None,
                   help="teacher layer whose attention gives IVA's weights (default: 3/4 of its depth, as 21 of 28)")
    p.add_argument("--confident", action="store_true", help="sharpened student, response = its greedy output")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing (non-reentrant) on the student's decoder layers, every recipe")
    p.add_argument("--sharpen", type=float, default=30.0, help="logit scale with --confident")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings stable on a shared machine)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    p.add_argument("--profile", default="", help="comma-separated recipes: print torch.profiler's top operators")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    cuda = args.device.startswith("cuda")
    if args.real:
        if not cuda:
            p.error("--real needs --device cuda (a 7B teacher)")
        args.vocab, args.visual = QWEN2_VOCAB, 729
        args.teacher_layers = QWEN2["7b"].layers
    args.dtype = args.dtype or ("bfloat16" if args.real else "float32")
    if args.attn == "flex_attention" and not cuda:
        p.error("--attn flex_attention needs --device cuda: torch has no FlexAttention backward on CPU")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if math.isqrt(args.visual) ** 2 != args.visual:
        p.error(f"--visual must be a square number of patches, got {args.visual}")
    if args.iva_layer is None:
        args.iva_layer = int(0.75 * args.teacher_layers)
    unknown = set(filter(None, args.profile.split(","))) - set(RECIPES)
    if unknown:
        p.error(f"--profile: unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    return args


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as out_dir:
        memory = None
        if args.memory and not cuda:  # fork before this process builds models or starts threads
            memory = cpu_memory(args, out_dir)
        student, teacher, optimizer, steps = build_steps(args, RECIPES, out_dir)
        counters = (DecoderCounter(student), DecoderCounter(teacher))

        times: dict[str, list[float]] = {r: [] for r in RECIPES}
        counts: dict[str, list[tuple]] = {r: [] for r in RECIPES}
        for it in range(args.warmup + args.iters):
            for r in RECIPES:
                for c in counters:
                    c.take()
                sync()
                t0 = time.perf_counter()
                steps[r]()
                sync()
                if it >= args.warmup:
                    times[r].append(time.perf_counter() - t0)
                    counts[r].append(counters[0].take() + counters[1].take())
        if args.memory and cuda:
            # sft's training loads no teacher (here it is resident for the other recipes)
            held = {r: held_mb(student, teacher if r != "sft" else None, optimizer=optimizer) for r in RECIPES}
            memory = cuda_memory(steps, held)
        flops = {r: count_flops(steps[r]) for r in RECIPES}
        for r in filter(None, args.profile.split(",")):
            print(f"torch.profiler, one {r} step:\n{profile(steps[r], args.device)}")

    results = summarize(times, counts, flops, memory)
    T = args.visual + args.instruction + args.response
    s, t = student.config, teacher.config
    device = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("json", "profile")},
        "seq_len": T, "device_name": device, "torch": torch.__version__, "transformers": transformers.__version__,
        "student": asdict(LMShape(s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
                                  s.intermediate_size, s.vocab_size, s.tie_word_embeddings)),
        "teacher": asdict(LMShape(t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                                  t.intermediate_size, t.vocab_size, t.tie_word_embeddings)),
        "flop_method": "torch.utils.flop_counter.FlopCounterMode, one step per recipe",
        "memory_method": ("CUDA max_memory_allocated" if cuda else "peak RSS (VmHWM) of a forked process per recipe")
        + ": peak_mb = the step's peak over what was held just before it (after a warm-up step); total_mb = "
          "peak_mb + the models' parameters and buffers and the optimizer state",
        "gkd_on_policy_prob": 1.0,
    }
    print(f"{device}, {args.dtype}, {args.attn}, {args.threads} thread(s); B={args.batch} T={T} (visual "
          f"{args.visual} + instruction {args.instruction} + response {args.response}), d={args.d}; student "
          f"{s.hidden_size}x{s.num_hidden_layers}, teacher {t.hidden_size}x{t.num_hidden_layers}, vocab {args.vocab}"
          f"{', confident student' if args.confident else ''}"
          f"{', student activation checkpointing' if args.grad_ckpt else ''}; median of {args.iters} round-robin "
          f"rounds after {args.warmup} warm-up; GKD generates every step\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"recipes": results, "config": config}, f, indent=1)


if __name__ == "__main__":
    main()
