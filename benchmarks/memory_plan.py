"""Planning figures: memory per GPU of each training stage, computed from model configs (docs/scaling.md).

    python benchmarks/memory_plan.py                      # the tables of docs/scaling.md (markdown)
    python benchmarks/memory_plan.py --stage distill --student Qwen2-0.5B --teacher Qwen2-7B --gpu-gib 40 --zero 3
    python benchmarks/memory_plan.py --stage finetune --config my_llm/config.json --tower-config siglip/config.json

Everything here is COMPUTED, NOT MEASURED: arithmetic over the configs, checked against what autograd saves in
transformers' own Qwen2/Qwen3 decoder layers on CPU (tests/test_memory_plan.py), never against a GPU run.
`benchmarks/bench_step.py --device cuda --real` measures a real step; put its numbers beside these when a GPU
is at hand.

Accounting (bytes; one function per term below):
- States: bf16 weights and gradients, fp32 Adam (master weights, m, v): 2 + 2 + 12 bytes per trainable
  parameter, 2 per frozen one. ZeRO-2 partitions gradients and optimizer states over the N GPUs and replicates
  weights; ZeRO-3 partitions all three (frozen weights too: the vision towers and the teacher). ZeRO-2 adds
  its reduce buckets (HF's "auto": hidden^2 elements, two buffers); ZeRO-3 adds what it gathers at a time: the
  largest of two decoder layers and a vocabulary matrix (distillation: the student's lm_head, held gathered
  for the whole step by the trainer, plus the larger of the teacher's head and two teacher layers).
- The frozen teacher (distillation): bf16 weights (LLM, projector, its own tower), replicated under ZeRO-2
  (the trainer wraps it at stage 0), partitioned under ZeRO-3.
- Activations per sample of `seq_len` tokens: what autograd saves in each decoder layer with sdpa, in bf16
  (`layer_activation_bytes`, exact for transformers 5.x's Qwen2/Qwen3 layers on CPU); a padding or TPA mask
  is assumed (sdpa then gets k/v repeated to every head and a bf16 copy of the mask). Gradient checkpointing
  keeps each layer's input and recomputes one layer at a time. The vision towers are frozen and run without
  grad (nothing saved); the projector saves its inputs.
- Pretrain / finetune use HF's causal-LM loss: full logits, upcast to fp32, for every position; its peak, at
  the start of the backward pass, is taken as 12 bytes per position per vocabulary entry.
- Distillation (`aligntI_patch`): one student pass over the sequence with grad plus TPA's candidate rows
  (d per response token) against its KV cache; under gradient checkpointing the ground-truth pass is
  checkpointed, its keys and values are rebuilt from the layers' inputs and kept, and the rows run in L
  checkpointed segments of ceil(rows / L), one of which is replayed at a time (`tpa.candidate_pass`). The
  teacher runs the same two passes without grad: its KV cache, final hidden states and one layer's working set
  (MLP) per sample. The chunked losses hold six fp32
  [chunk, vocab] blocks (chunk = `chunked_losses.chunk_rows`: at most --loss_chunk_size rows and
  --loss_chunk_elements elements, 110 rows at V = 151936) and the step's one fp32 head-sized gradient buffer,
  which all terms share (`SharedHeadGrad`); each term keeps its row gradients until the backward pass.
- Fit: peak = fixed + micro_batch x per-sample; it fits when 1.1 x peak + 2 GiB (CUDA context, NCCL, allocator
  fragmentation) is at most the card's memory. Terms from different phases of a step are added, not
  overlapped: an upper bound.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from aligntI_patch.chunked_losses import DEFAULT_CHUNK_ELEMENTS, chunk_rows

GIB = 2**30
OVERHEAD_GIB = 2.0  # CUDA context, cuBLAS workspace, NCCL buffers
FRAGMENTATION = 1.1  # caching-allocator slack on top of what the tensors need


@dataclass(frozen=True)
class LLM:
    """The decoder shapes that memory depends on (transformers' Qwen2Config / Qwen3Config field meanings)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # None: hidden // heads (Qwen2); Qwen3 sets it (128)
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = True  # Qwen2: biases on q/k/v; Qwen3: none, but q_norm / k_norm per head
    qk_norm: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, hd, nq, nkv = self.hidden, self.hd, self.heads, self.kv_heads
        attn = h * nq * hd + 2 * h * nkv * hd + nq * hd * h  # q, k, v, o
        attn += (nq + 2 * nkv) * hd if self.qkv_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        return attn + 3 * h * self.intermediate + 2 * h  # gate, up, down; two RMSNorms

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.hidden  # + final norm


@dataclass(frozen=True)
class Tower:
    """A SigLIP vision tower (SiglipVisionConfig field meanings); frozen in every stage."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    image_size: int
    patch_size: int
    use_head: bool = True  # SiglipVisionModel's attention-pooling head (loaded, unused by LLaVA)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # q k v o, fc1 fc2, two LayerNorms
        embed = 3 * self.patch_size**2 * h + h + self.tokens * h  # patch conv, positions
        head = (h + 4 * (h * h + h) + 2 * h + 2 * h * i + i + h) if self.use_head else 0
        return self.layers * layer + embed + 2 * h + head  # + post LayerNorm


def projector_params(mm_hidden: int, hidden: int) -> int:
    """LLaVA's mlp2x_gelu: Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden)."""
    return mm_hidden * hidden + hidden + hidden * hidden + hidden


# The public configs (config.json on the Hugging Face hub) of the paper's models, written from memory and
# cross-checked by parameter count (Qwen2-0.5B 494M, 1.5B 1.54B, 7B 7.62B; Qwen3-0.6B 0.60B, 1.7B 1.72B,
# 8B 8.19B; SigLIP-so400m ~0.43B): NOT verified against the hub here (no network). --config reads a real one.
MODELS = {
    m.name: m
    for m in [
        LLM("Qwen2-0.5B", 896, 24, 14, 2, 4864, 151936, tied=True),
        LLM("Qwen2-1.5B", 1536, 28, 12, 2, 8960, 151936, tied=True),
        LLM("Qwen2-7B", 3584, 28, 28, 4, 18944, 152064),
        LLM("Qwen3-0.6B", 1024, 28, 16, 8, 3072, 151936, head_dim=128, tied=True, qkv_bias=False, qk_norm=True),
        LLM("Qwen3-1.7B", 2048, 28, 16, 8, 6144, 151936, head_dim=128, tied=True, qkv_bias=False, qk_norm=True),
        LLM("Qwen3-8B", 4096, 36, 32, 8, 12288, 151936, head_dim=128, qkv_bias=False, qk_norm=True),
    ]
}
SIGLIP_SO400M = Tower("siglip-so400m-patch14-384", 1152, 27, 4304, 384, 14)  # 27 x 27 = 729 visual tokens
PAIRS = {"Qwen2-0.5B": "Qwen2-7B", "Qwen2-1.5B": "Qwen2-7B", "Qwen3-0.6B": "Qwen3-8B", "Qwen3-1.7B": "Qwen3-8B"}


def llm_from_config(path: str | Path) -> LLM:
    """An LLM from a local Qwen2/Qwen3 (or LLaVA-Qwen) config.json."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    qwen3 = "qwen3" in cfg.get("model_type", "")
    return LLM(
        name=Path(path).parent.name or str(path),
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        head_dim=cfg.get("head_dim"),
        tied=cfg.get("tie_word_embeddings", False),
        qkv_bias=not qwen3,
        qk_norm=qwen3,
    )


def tower_from_config(path: str | Path) -> Tower:
    """A tower from a local SigLIP config.json (the full model's "vision_config", or a vision-only config)."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = cfg.get("vision_config", cfg)
    return Tower(Path(path).parent.name or str(path), cfg["hidden_size"], cfg["num_hidden_layers"],
                 cfg["intermediate_size"], cfg["image_size"], cfg["patch_size"], cfg.get("vision_use_head", True))


# ------------------------------------------------------------------------------------------------ activations
def layer_activation_bytes(llm: LLM, tq: int, tk: int, trainable: bool, masked: bool = True) -> int:
    """Bytes autograd saves in one bf16 decoder layer (sdpa) for `tq` query tokens attending to `tk` keys.

    tq == tk: an ordinary pass; tq < tk: rows attending to a KV cache (TPA's candidates). `trainable`: the
    layer's weights take gradients (frozen linears do not save their inputs). `masked`: sdpa gets a 4D mask
    (padding or TPA's), so transformers repeats k/v to all heads and torch saves a bf16 copy of the mask.
    """
    h, i, hd, nq, nkv = llm.hidden, llm.intermediate, llm.hd, llm.heads, llm.kv_heads
    t = int(trainable)
    per_query = (
        8 * h + 8 * h * t  # two RMSNorms: fp32 input; + bf16 normalized and output (linear input) if trained
        + 8  # their fp32 rsqrt
        + 4 * hd  # rope cos / sin, bf16
        + 2 * nq * hd + 2 * nq * hd + 4 * nq  # q, attention output (o_proj input), logsumexp
        + 6 * i + 2 * i * t  # gate, silu(gate), up; + down_proj input if trained
        + ((4 + 2 * t) * (nq + nkv) * hd + 4 * (nq + nkv) if llm.qk_norm else 0)  # Qwen3 q_norm / k_norm
        + (2 * tk if masked else 0)  # the mask as sdpa keeps it (bf16)
    )
    per_key = 2 * 2 * (nq if masked else nkv) * hd  # k, v as sdpa saved them
    return tq * per_query + tk * per_key


def stack_activation_bytes(llm: LLM, tokens: int, trainable: bool, ckpt: bool, masked: bool = True) -> int:
    """One sample's saved activations over all decoder layers, plus the final norm (the head's input)."""
    layer = layer_activation_bytes(llm, tokens, tokens, trainable, masked)
    final_norm = tokens * (4 + 4 * int(trainable)) * llm.hidden
    if ckpt:  # each layer's input kept; one layer recomputed at a time in the backward pass
        return llm.layers * tokens * 2 * llm.hidden + layer + final_norm
    return llm.layers * layer + final_norm


def projector_activation_bytes(tower: Tower, llm: LLM) -> int:
    return tower.tokens * (2 * tower.hidden + 4 * llm.hidden)  # Linear1 input, GELU input and output


def hf_loss_bytes(tokens: int, vocab: int) -> int:
    """HF's causal-LM loss at its peak: logits for every position, fp32 log-softmax and its gradients."""
    return 12 * tokens * vocab


def kv_cache_bytes(llm: LLM, tokens: int) -> int:
    return llm.layers * tokens * 2 * 2 * llm.kv_heads * llm.hd  # k and v, bf16


# ----------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Setup:
    gpus: int = 8
    gpu_gib: float = 80.0
    zero: int = 2
    ckpt: bool = False
    seq_len: int = 2048  # the paper's model max length (Table 12)
    response_share: float = 0.5  # response tokens / non-visual tokens of a sample (assumption, docs/scaling.md)
    tpa_d: int = 4  # candidates per response token (paper: d = 4)
    loss_chunk: int = 1024  # aligntI_patch --loss_chunk_size
    loss_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS  # aligntI_patch --loss_chunk_elements


@dataclass
class Plan:
    """Bytes per GPU: `fixed[term]` whatever the micro-batch, `per_sample[term]` once per sample."""

    stage: str
    model: str
    fixed: dict[str, int]
    per_sample: dict[str, int]

    def peak(self, micro_batch: int) -> int:
        return sum(self.fixed.values()) + micro_batch * sum(self.per_sample.values())

    def fits(self, micro_batch: int, gpu_gib: float) -> bool:
        return FRAGMENTATION * self.peak(micro_batch) / GIB + OVERHEAD_GIB <= gpu_gib

    def best_micro_batch(self, per_gpu_batch: int, gpu_gib: float) -> int | None:
        """The largest power-of-two micro-batch dividing `per_gpu_batch` that fits; None if 1 does not."""
        sizes = [b for b in (2**k for k in range(per_gpu_batch.bit_length())) if per_gpu_batch % b == 0]
        fitting = [b for b in sizes if self.fits(b, gpu_gib)]
        return max(fitting) if fitting else None


def state_bytes(trainable: int, frozen: int, setup: Setup) -> dict[str, int]:
    """Weights, gradients and Adam states per GPU (2 + 2 + 12 bytes per trainable parameter, 2 per frozen)."""
    n = setup.gpus
    weights = 2 * (trainable + frozen)
    return {"weights": weights // n if setup.zero == 3 else weights, "gradients": 2 * trainable // n,
            "optimizer": 12 * trainable // n}  # fmt: skip


def plan(stage: str, llm: LLM, tower: Tower, setup: Setup, teacher: LLM | None = None) -> Plan:
    """Memory per GPU of one stage: "pretrain" (projector only), "finetune" (projector + LLM) or "distill"
    (finetune with the Align-TI losses against a frozen `teacher` that has its own tower and projector)."""
    if stage not in ("pretrain", "finetune", "distill"):
        raise ValueError(f"stage must be pretrain, finetune or distill, got {stage!r}")
    if stage == "distill" and teacher is None:
        raise ValueError("distill needs a teacher")
    n, t, h, v = setup.gpus, setup.seq_len, llm.hidden, llm.vocab
    proj = projector_params(tower.hidden, h)
    if stage == "pretrain":
        fixed = state_bytes(proj, llm.params() + tower.params(), setup)
    else:
        fixed = state_bytes(llm.params() + proj, tower.params(), setup)
    llm_trains = stage != "pretrain"
    per_sample = {"projector activations": projector_activation_bytes(tower, llm)}
    if setup.zero == 2:
        fixed["ZeRO buffers"] = 2 * 2 * h * h
    if stage != "distill":
        if setup.zero == 3:
            fixed["ZeRO buffers"] = 2 * max(v * h, 2 * llm.layer_params())
        per_sample["decoder activations"] = stack_activation_bytes(llm, t, llm_trains, setup.ckpt)
        per_sample["logits (HF loss)"] = hf_loss_bytes(t, v)
        return Plan(stage, llm.name, fixed, per_sample)

    text = t - tower.tokens
    response = round(setup.response_share * text)
    cand = setup.tpa_d * response  # TPA's candidate rows, before exact dedupe (worst case)
    teacher_params = teacher.params() + projector_params(tower.hidden, teacher.hidden) + tower.params()
    fixed["teacher weights"] = 2 * teacher_params // (n if setup.zero == 3 else 1)
    if setup.zero == 3:
        fixed["ZeRO buffers"] = 2 * (v * h + max(teacher.vocab * teacher.hidden, 2 * teacher.layer_params()))
    if setup.ckpt:  # checkpointed ground truth, its keys and values rebuilt and kept, the rows in L segments
        size = -(-cand // llm.layers)  # rows per segment (tpa.candidate_pass): one is replayed at a time
        per_sample["decoder activations"] = (
            stack_activation_bytes(llm, t, True, ckpt=True)
            + kv_cache_bytes(llm, t)
            + llm.layers * layer_activation_bytes(llm, size, t + size, True)
        )
    else:  # ground-truth pass with a KV cache, then the candidate rows against it
        per_sample["decoder activations"] = (
            stack_activation_bytes(llm, t, True, ckpt=False)
            + llm.layers * layer_activation_bytes(llm, cand, t + cand, True)
            + cand * 8 * h  # the candidates' final norm
            + kv_cache_bytes(llm, t + cand)
        )
    width = max(teacher.intermediate, 2 * teacher.heads * teacher.hd)
    per_sample["teacher forward"] = (
        kv_cache_bytes(teacher, t + cand)
        + 2 * teacher.hidden * (t + cand)  # its final hidden states, kept for the losses
        + max(t, cand) * 8 * width  # one layer's working set (MLP) in the larger of its two passes
        + 2 * cand * (t + cand)  # the candidates' mask
    )
    chunk = chunk_rows(v, setup.loss_chunk, setup.loss_chunk_elements)
    fixed["loss chunks"] = 6 * 4 * chunk * v + 4 * v * h
    rows = 2 * response + tower.tokens + cand + response  # sft, kd, iva, tpa (+ its ground-truth rows)
    per_sample["loss row gradients"] = 2 * h * rows
    return Plan(stage, f"{llm.name} <- {teacher.name}", fixed, per_sample)


# ------------------------------------------------------------------------------------------------ reporting
def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def stage_plans(setup: Setup) -> list[tuple[Plan, int]]:
    """(plan, global batch) for every stage of the paper: teachers' two stages, students' pretrain, SFT, Align-TI."""
    out = []
    for name in ("Qwen2-7B", "Qwen3-8B"):
        out += [(plan("pretrain", MODELS[name], SIGLIP_SO400M, setup), 256),
                (plan("finetune", MODELS[name], SIGLIP_SO400M, setup), 128)]  # fmt: skip
    for name, teacher in PAIRS.items():
        out += [(plan("pretrain", MODELS[name], SIGLIP_SO400M, setup), 256),
                (plan("finetune", MODELS[name], SIGLIP_SO400M, setup), 128),
                (plan("distill", MODELS[name], SIGLIP_SO400M, setup, MODELS[teacher]), 128)]  # fmt: skip
    return out


def recommendation(p: Plan, global_batch: int, setup: Setup) -> str:
    per_gpu = global_batch // setup.gpus
    mb = p.best_micro_batch(per_gpu, setup.gpu_gib)
    if mb is None:
        return f"**does not fit** ({gib(p.peak(1))} at 1)"
    return f"{mb} x {per_gpu // mb} ({gib(p.peak(mb))})"


def setting_table(gpu_gib: float, zero: int, base: Setup) -> str:
    """One markdown table: every stage on gpus x gpu_gib under ZeRO-`zero`, without and with checkpointing."""
    off, on = replace(base, gpu_gib=gpu_gib, zero=zero), replace(base, gpu_gib=gpu_gib, zero=zero, ckpt=True)
    lines = [
        f"#### {base.gpus} x {gpu_gib:g} GB, ZeRO-{zero}",
        "",
        "| stage | model | fixed GiB | per sample GiB | micro x accum (peak GiB) | per sample GiB, ckpt | "
        "micro x accum (peak GiB), ckpt |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for (p, batch), (q, _) in zip(stage_plans(off), stage_plans(on)):
        lines.append(f"| {p.stage} | {p.model} | {gib(sum(p.fixed.values()))} | {gib(sum(p.per_sample.values()))} "
                     f"| {recommendation(p, batch, off)} | {gib(sum(q.per_sample.values()))} "
                     f"| {recommendation(q, batch, on)} |")
    return "\n".join(lines)


def breakdown_table(setup: Setup) -> str:
    """Every term of every stage at micro-batch 1 (GiB), for one setup."""
    plans = [p for p, _ in stage_plans(setup)]
    terms = list(dict.fromkeys(k for p in plans for k in (*p.fixed, *p.per_sample)))
    lines = ["| stage | model | " + " | ".join(terms) + " | total |", "|---|---|" + "---:|" * (len(terms) + 1)]
    for p in plans:
        cells = [gib(p.fixed.get(k, 0) + p.per_sample.get(k, 0)) for k in terms]
        lines.append(f"| {p.stage} | {p.model} | " + " | ".join(cells) + f" | {gib(p.peak(1))} |")
    return "\n".join(lines)


def params_table() -> str:
    lines = ["| model | hidden | layers | heads / kv | head dim | MLP | vocab | tied | parameters |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for m in MODELS.values():
        lines.append(f"| {m.name} | {m.hidden} | {m.layers} | {m.heads} / {m.kv_heads} | {m.hd} | {m.intermediate} "
                     f"| {m.vocab} | {'yes' if m.tied else 'no'} | {m.params() / 1e9:.3f} B |")
    s = SIGLIP_SO400M
    lines.append(f"| {s.name} | {s.hidden} | {s.layers} | 16 | 72 | {s.intermediate} | - | - | "
                 f"{s.params() / 1e9:.3f} B ({s.tokens} tokens) |")
    return "\n".join(lines)


def markdown(base: Setup = Setup()) -> str:
    """The generated part of docs/scaling.md."""
    parts = ["### Model shapes", "", params_table(), "",
             "### Where the memory goes (8 x 80 GB, ZeRO-2, no checkpointing, micro-batch 1, GiB)", "",
             breakdown_table(base), "", "### Fits per setting", ""]  # fmt: skip
    for gpu_gib in (80.0, 40.0):
        for zero in (2, 3):
            parts += [setting_table(gpu_gib, zero, base), ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["pretrain", "finetune", "distill"], help="one stage (default: all tables)")
    parser.add_argument("--student", default="Qwen2-0.5B", choices=sorted(MODELS), help="built-in LLM config")
    parser.add_argument("--teacher", default=None, choices=sorted(MODELS), help="built-in teacher LLM config")
    parser.add_argument("--config", default=None, help="a local config.json for the trained LLM (overrides --student)")
    parser.add_argument("--teacher-config", default=None, help="a local config.json for the teacher LLM")
    parser.add_argument("--tower-config", default=None, help="a local SigLIP config.json (default: so400m-384)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU")
    parser.add_argument("--zero", type=int, choices=[2, 3], default=2)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, visual ones included")
    parser.add_argument("--response-share", type=float, default=0.5, help="response tokens / non-visual tokens")
    parser.add_argument("--tpa-d", type=int, default=4, help="TPA candidates per response token")
    parser.add_argument("--global-batch", type=int, default=None, help="default: 256 pretrain, 128 otherwise")
    args = parser.parse_args(argv)
    setup = Setup(args.gpus, args.gpu_gib, args.zero, args.grad_ckpt, args.seq_len, args.response_share, args.tpa_d)
    if args.stage is None:
        print(markdown(setup), end="")
        return
    llm = llm_from_config(args.config) if args.config else MODELS[args.student]
    tower = tower_from_config(args.tower_config) if args.tower_config else SIGLIP_SO400M
    teacher = llm_from_config(args.teacher_config) if args.teacher_config else None
    if teacher is None and args.stage == "distill":
        teacher = MODELS[args.teacher or PAIRS.get(llm.name, "Qwen2-7B")]
    p = plan(args.stage, llm, tower, setup, teacher)
    batch = args.global_batch or (256 if args.stage == "pretrain" else 128)
    print(f"{p.stage}: {p.model}, {setup.gpus} x {setup.gpu_gib:g} GB, ZeRO-{setup.zero}, "
          f"checkpointing {'on' if setup.ckpt else 'off'} (computed, not measured; GiB)")
    for k, x in p.fixed.items():
        print(f"  {k:<24} {gib(x):>7}  fixed")
    for k, x in p.per_sample.items():
        print(f"  {k:<24} {gib(x):>7}  per sample")
    per_gpu = math.ceil(batch / setup.gpus)
    print(f"global batch {batch}: micro-batch x accumulation (peak) = {recommendation(p, per_gpu * setup.gpus, setup)}")


if __name__ == "__main__":
    main()
