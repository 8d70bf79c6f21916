"""Cost of one Align-TI TPA step against vanilla KD, side by side in one run (paper Table 6 / Table 14).

Four ways to run one distillation step (forward + backward, no optimizer) on a paper-like layout scaled
down (visual + instruction + response tokens, d candidates per response position):
  vanilla        student ground-truth pass (grad) + teacher ground-truth pass; KD loss (Eq. 2).
  paper          student no-grad sampling pass + student appended pass (grad) + teacher appended pass;
                 KD + TPA (Eq. 7): the paper's parallel calculation, 2 student passes.
  cached         student ground-truth pass with a KV cache (grad), candidates sampled from its detached
                 response logits, then only the candidate rows against that cache; teacher the same way.
  cached+dedupe  cached, with equal candidates evaluated once and ground-truth-equal candidates reusing
                 the ground-truth row (aligntI_patch.candidates.dedupe_candidates): same loss, fewer rows.

All four are exact (tests/test_tpa.py); only their cost differs. Per step it counts decoder calls, the tokens they
process and the matmul FLOPs (estimated from parameter counts, lm_head included) for each model, and times
the median step; both ratios are relative to vanilla. The FLOP ratio is machine-independent; the time
ratio on a small CPU also carries per-call overheads.
Variants run round-robin, so load on a shared machine hits them alike.

--confident mimics a trained student: its lm_head is sharpened and the response is its own greedy
continuation, so most nucleus samples equal the ground-truth token (where dedupe saves the most).
Random tiny models are near uniform, which is the worst case for dedupe.

    python benchmarks/bench_tpa.py                       # CPU, tiny Qwen2 pair (about a minute)
    python benchmarks/bench_tpa.py --confident
    python benchmarks/bench_tpa.py --device cuda --dtype bfloat16 --visual 729 --instruction 64 \\
        --response 64 --student-hidden 896 --student-layers 24 --teacher-hidden 1536 --teacher-layers 28 \\
        --vocab 151936 --batch 4
    python benchmarks/bench_tpa.py --device cuda --attn flex_attention    # ribbon as a BlockMask (compiled)
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from aligntI_patch.candidates import candidate_rows, response_positions, sample_candidates_from_hidden
from aligntI_patch.tpa import TPAConfig, appended_pass, ground_truth_pass, tpa_forward

VARIANTS = ("vanilla", "paper", "cached", "cached+dedupe")


def build_lm(hidden: int, layers: int, args: argparse.Namespace, seed: int) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    heads = max(hidden // 64, 2)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = args.attn
    return transformers.Qwen2ForCausalLM(cfg).to(args.device, getattr(torch, args.dtype))


class ForwardCounter:
    """Decoder calls, the tokens they process, and estimated FLOPs (2 * params per token, x3 with grad).

    Forward pre-hooks on the decoder and on lm_head (sampling and losses apply lm_head to chosen rows);
    attention's quadratic term is left out, so the estimate is the matmul cost of the step.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
        self.trunk_params = sum(p.numel() for p in decoder.parameters()) - lm.get_input_embeddings().weight.numel()
        self.head_params = head.weight.numel()
        self.calls = self.tokens = self.flops = 0
        decoder.register_forward_pre_hook(self._decoder_hook, with_kwargs=True)
        head.register_forward_pre_hook(self._head_hook)

    @staticmethod
    def _factor(x: torch.Tensor) -> int:
        return 3 if torch.is_grad_enabled() and x.requires_grad else 1

    def _decoder_hook(self, module, args, kwargs) -> None:
        x = kwargs["inputs_embeds"]
        self.calls += 1
        self.tokens += x.shape[:2].numel()
        self.flops += 2 * self.trunk_params * x.shape[:2].numel() * self._factor(x)

    def _head_hook(self, module, args) -> None:
        x = args[0]
        self.flops += 2 * self.head_params * x.shape[:-1].numel() * self._factor(x)

    def take(self) -> tuple[int, int, int]:
        out = (self.calls, self.tokens, self.flops)
        self.calls = self.tokens = self.flops = 0
        return out


def kl(teacher: torch.nn.Module, student: torch.nn.Module, t_h: torch.Tensor, s_h: torch.Tensor,
       w: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """sum_i w_i KL(P_T || P_S) over rows of hidden states, lm_head applied chunk by chunk."""
    total = s_h.new_zeros((), dtype=torch.float32)
    for i in range(0, s_h.shape[0], chunk):
        t = F.log_softmax(teacher.lm_head(t_h[i : i + chunk]).float(), dim=-1)
        s = F.log_softmax(student.lm_head(s_h[i : i + chunk]).float(), dim=-1)
        total = total + (w[i : i + chunk] * (t.exp() * (t - s)).sum(-1)).sum()
    return total


def make_batch(student: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Random visual + instruction tokens, then the response (random, or the confident student's own)."""
    g = torch.Generator().manual_seed(0)
    T = args.visual + args.instruction + args.response
    input_ids = torch.randint(0, args.vocab, (args.batch, T), generator=g).to(args.device)
    if args.confident:
        with torch.no_grad():
            student.lm_head.weight.mul_(args.sharpen)
            for k in range(T - args.response, T):  # greedy continuation: the student predicts y_k well
                input_ids[:, k] = student(input_ids=input_ids[:, :k]).logits[:, -1].argmax(-1)
    response_mask = torch.zeros(args.batch, T, dtype=torch.bool, device=args.device)
    response_mask[:, T - args.response :] = True
    attention_mask = torch.ones(args.batch, T, dtype=torch.long, device=args.device)
    position_ids = torch.arange(T, device=args.device).expand(args.batch, T)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                response_mask=response_mask)


def step_fn(variant: str, student, teacher, batch: dict, args: argparse.Namespace,
            stats: dict) -> Callable[[], None]:
    ids, attn, pos, resp = batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["response_mask"]
    cand_pos = response_positions(resp)  # (B, R)
    prev = (cand_pos - 1)  # hidden at k-1 predicts y_k (Eq. 2)
    b_idx = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(prev)
    ones = torch.ones(prev.numel(), device=ids.device)
    gen = torch.Generator(device=args.device)

    def kd(t_gt, s_gt):
        return kl(teacher, student, t_gt[b_idx, prev].flatten(0, 1), s_gt[b_idx, prev].flatten(0, 1), ones)

    def tpa(t_gt, s_gt, t_c, s_c, rows):
        valid = rows.pos >= 0
        loss = kl(teacher, student, t_c[valid], s_c[valid], rows.weight[valid])
        k = rows.gt_weight > 0
        if k.any():
            loss = loss + kl(teacher, student, t_gt[k], s_gt[k], rows.gt_weight[k])
        stats.setdefault(variant, []).append(int(valid.sum()))
        return loss

    def run() -> None:
        gen.manual_seed(0)  # the same samples in every variant and step
        s_emb, t_emb = student.get_input_embeddings()(ids), teacher.get_input_embeddings()(ids)
        if variant == "vanilla":
            s_gt, _ = ground_truth_pass(student, s_emb, attn, pos, use_cache=False)
            with torch.no_grad():
                t_gt, _ = ground_truth_pass(teacher, t_emb, attn, pos, use_cache=False)
            loss = kd(t_gt, s_gt)
        elif variant == "paper":
            with torch.no_grad():
                h, _ = ground_truth_pass(student, s_emb, attn, pos, use_cache=False)
            cands = sample_candidates_from_hidden(student, h, cand_pos, args.d, top_p=args.top_p, generator=gen)
            rows = candidate_rows(cand_pos, cands, ids.shape[1])
            s_gt, s_c = appended_pass(student, s_emb, attn, pos, rows.pos, rows.ids)
            with torch.no_grad():
                t_gt, t_c = appended_pass(teacher, t_emb, attn, pos, rows.pos, rows.ids)
            loss = kd(t_gt, s_gt) + tpa(t_gt, s_gt, t_c, s_c, rows)
        else:
            cfg = TPAConfig(d=args.d, top_p=args.top_p, dedupe=variant == "cached+dedupe")
            out = tpa_forward(student, teacher, s_emb, t_emb, attn, pos, resp, ids, cfg, generator=gen)
            loss = kd(out.teacher_gt, out.student_gt) + tpa(
                out.teacher_gt, out.student_gt, out.teacher_cand, out.student_cand, out.rows)
        loss.backward()
        student.zero_grad(set_to_none=True)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"],
                   help="flex_attention: the ribbon as a BlockMask, CUDA only (no FlexAttention backward on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--visual", type=int, default=182, help="visual tokens (paper: 729 SigLIP patches)")
    p.add_argument("--instruction", type=int, default=16, help="instruction tokens (paper-like: 64)")
    p.add_argument("--response", type=int, default=16, help="response tokens (paper-like: 64)")
    p.add_argument("--d", type=int, default=4, help="candidates per response position (paper: 4)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--confident", action="store_true", help="sharpened student, response = its greedy output")
    p.add_argument("--sharpen", type=float, default=30.0, help="lm_head scale with --confident")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 keeps timings stable on a shared machine)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args()
    if args.attn == "flex_attention" and not args.device.startswith("cuda"):
        p.error("--attn flex_attention needs --device cuda: torch has no FlexAttention backward on CPU")
    torch.set_num_threads(args.threads)

    student = build_lm(args.student_hidden, args.student_layers, args, seed=0).train()
    teacher = build_lm(args.teacher_hidden, args.teacher_layers, args, seed=1).eval().requires_grad_(False)
    batch = make_batch(student, args)
    counters = {"student": ForwardCounter(student), "teacher": ForwardCounter(teacher)}
    rows: dict[str, list[int]] = {}
    steps = {v: step_fn(v, student, teacher, batch, args, rows) for v in VARIANTS}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    passes: dict[str, tuple] = {}
    for it in range(args.warmup + args.iters):
        for v in VARIANTS:
            for c in counters.values():
                c.take()
            sync()
            t0 = time.perf_counter()
            steps[v]()
            sync()
            if it >= args.warmup:
                times[v].append(time.perf_counter() - t0)
            passes[v] = counters["student"].take() + counters["teacher"].take()

    B, T = batch["input_ids"].shape
    R = int(batch["response_mask"].sum(1).max())
    print(f"device {args.device} {args.dtype} {args.attn}; B={B} T={T} (visual {args.visual} + instruction "
          f"{args.instruction} + response {args.response}), d={args.d}: full candidate set {R * args.d} rows "
          f"per sample (+{100 * R * args.d / T:.0f}% tokens); student {args.student_hidden}x{args.student_layers}"
          f", teacher {args.teacher_hidden}x{args.teacher_layers}, vocab {args.vocab}"
          f"{', confident student' if args.confident else ''}")
    base = statistics.median(times["vanilla"])
    base_flops = passes["vanilla"][2] + passes["vanilla"][5]
    print(f"{'variant':<15}{'student calls':>14}{'student tok':>12}{'teacher calls':>14}{'teacher tok':>12}"
          f"{'cand rows':>10}{'GFLOP':>8}{'ratio':>7}{'ms/step':>10}{'ratio':>7}")
    for v in VARIANTS:
        s_calls, s_tok, s_flops, t_calls, t_tok, t_flops = passes[v]
        n_rows = statistics.mean(rows[v]) if v in rows else 0
        med = statistics.median(times[v])
        flops = s_flops + t_flops
        print(f"{v:<15}{s_calls:>14}{s_tok:>12}{t_calls:>14}{t_tok:>12}{n_rows:>10.0f}"
              f"{flops / 1e9:>8.2f}{flops / base_flops:>7.2f}{1e3 * med:>10.1f}{med / base:>7.2f}")


if __name__ == "__main__":
    main()
