"""Peak memory and time of the chunked losses against the plain formula (one forward + backward step).

Three ways to compute sum_i w_i D(T_i || S_i) (or the SFT cross-entropy) from hidden states and heads:
  plain       full [N, V] logits for student and teacher, autograd through everything;
  fused       aligntI_patch.chunked_losses (gradients computed chunk by chunk in the forward pass; the
              forward KL's gradient in closed form);
  fused_autograd  the same chunks with dL/dlogits by autograd on each block (what every other kind uses,
              and fkl before its closed form): fused / fused_autograd is what the closed form saves;
  checkpoint  torch.utils.checkpoint per chunk (the chunk's logits, teacher's included, recomputed in
              the backward pass).
Both chunked variants use the rows per chunk the losses use: at most --chunk-size rows and at most
--chunk-elements logits elements (`chunk_rows`: 110 rows at V = 151936 with the defaults).

Peak memory is the extra memory a step needs above its inputs: on CUDA from
torch.cuda.max_memory_allocated, on CPU from the peak resident set size (ru_maxrss) of a fresh process per
measurement, since CPU tensors have no allocator statistics. The theoretical size of one fp32 [N, V]
logits tensor is printed beside it.

    python benchmarks/bench_chunked_losses.py                      # CPU default: N 1024, V 32000 (< 1 min)
    python benchmarks/bench_chunked_losses.py --device cuda        # N {1024, 4096} x V {32000, 152064}
"""

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from aligntI_patch.chunked_losses import (
    DEFAULT_CHUNK_ELEMENTS,
    _linear_loss,
    chunk_rows,
    chunked_cross_entropy,
    chunked_divergence,
)
from aligntI_patch.divergences import DIVERGENCES, token_divergence

VARIANTS = ("plain", "fused", "fused_autograd", "checkpoint")
TEACHER_EXTRA_ROWS = 128  # teacher head padded past the student's (Qwen2-7B 152064 vs 0.5B 151936 rows)


def _inputs(n: int, v: int, args: argparse.Namespace) -> dict:
    gen = torch.Generator(device=args.device).manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def randn(*shape: int, scale: float, grad: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, device=args.device, dtype=dtype).mul_(
            scale
        )  # no transient copy
        return x.requires_grad_(grad)

    return {
        "sh": randn(n, args.hidden, scale=1.0, grad=True),
        "sw": randn(v, args.hidden, scale=args.hidden**-0.5, grad=True),
        "th": randn(n, args.teacher_hidden, scale=1.0),
        "tw": randn(v + TEACHER_EXTRA_ROWS, args.teacher_hidden, scale=args.teacher_hidden**-0.5),
        "weights": torch.ones(n, device=args.device),
        "targets": torch.randint(0, v, (n,), generator=gen, device=args.device),
    }


def _step_fn(variant: str, x: dict, v: int, args: argparse.Namespace) -> Callable[[], None]:
    """One forward + backward of the chosen loss, as a closure over the inputs."""
    rows = chunk_rows(v, args.chunk_size, args.chunk_elements)  # what the fused losses use at this V
    if args.loss == "ce":

        def chunk_value(h: torch.Tensor, start: int, end: int) -> torch.Tensor:
            return F.cross_entropy((h @ x["sw"].t()).float(), x["targets"][start:end], reduction="sum")

        def fused() -> torch.Tensor:
            return chunked_cross_entropy(
                x["sh"], x["sw"], x["targets"], chunk_size=args.chunk_size, chunk_elements=args.chunk_elements
            )
    else:

        def chunk_value(h: torch.Tensor, start: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                t = x["th"][start:end] @ x["tw"][:v].t()  # (c, V): teacher logits, recomputed in backward
            div = token_divergence(h @ x["sw"].t(), t, args.loss)  # (c,)
            return (x["weights"][start:end] * div).sum()

        def fused() -> torch.Tensor:
            return chunked_divergence(
                x["sh"],
                x["sw"],
                x["th"],
                x["tw"],
                x["weights"],
                args.loss,
                vocab_size=v,
                chunk_size=args.chunk_size,
                chunk_elements=args.chunk_elements,
            )

    n = x["sh"].shape[0]

    def chunk_of_logits(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:  # fused_autograd's loss
        if args.loss == "ce":
            return F.cross_entropy(logits.float(), x["targets"][start:end], reduction="sum")
        with torch.no_grad():
            t = x["th"][start:end] @ x["tw"][:v].t()
        return (x["weights"][start:end] * token_divergence(logits, t, args.loss)).sum()

    def loss() -> torch.Tensor:
        if variant == "plain":
            return chunk_value(x["sh"], 0, n)
        if variant == "fused":
            return fused()
        if variant == "fused_autograd":
            return _linear_loss(x["sh"], x["sw"][:v], None, chunk_of_logits, args.chunk_size, args.chunk_elements)
        return sum(
            checkpoint(
                chunk_value,
                x["sh"][s : s + rows],
                s,
                min(s + rows, n),
                use_reentrant=False,
            )
            for s in range(0, n, rows)
        )

    def step() -> None:
        loss().backward()
        x["sh"].grad = x["sw"].grad = None

    return step


def _measure(variant: str, n: int, v: int, args: argparse.Namespace) -> tuple[float, float]:
    """(median seconds per step, peak extra bytes) for one variant and size."""
    torch.manual_seed(0)
    x = _inputs(n, v, args)
    step = _step_fn(variant, x, v, args)
    cuda = args.device == "cuda"
    if cuda:
        step()  # warm-up: kernels, cuBLAS workspaces
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return statistics.median(times), float(peak)


def _measure_in_child(variant: str, n: int, v: int, args: argparse.Namespace) -> tuple[float, float]:
    # CPU peak RSS is a high-water mark per process: a fresh process per measurement. A fixed mmap
    # threshold makes glibc map every large tensor on its own and unmap it when freed, so RSS follows the
    # live tensors (by default the threshold grows and freed tensors stay in the heap).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (variant, n, v, args))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--n", type=int, nargs="+", help="positions N (default: 1024 on CPU, 1024 4096 on CUDA)"
    )
    parser.add_argument(
        "--v", type=int, nargs="+", help="vocabulary V (default: 32000 on CPU, 32000 152064 on CUDA)"
    )
    parser.add_argument("--hidden", type=int, default=896, help="student hidden size (Qwen2-0.5B: 896)")
    parser.add_argument(
        "--teacher-hidden", type=int, default=896, help="teacher hidden size (Qwen2-7B: 3584)"
    )
    parser.add_argument("--loss", default="fkl", choices=[*DIVERGENCES, "ce"], help="divergence kind or ce")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk at most")
    parser.add_argument(
        "--chunk-elements",
        type=int,
        default=DEFAULT_CHUNK_ELEMENTS,
        help="logits elements per chunk at most (the losses' default: 16M, a 64 MB fp32 block)",
    )
    parser.add_argument("--dtype", help="hidden/head dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, help="timed steps, median reported (default: 1 CPU, 5 CUDA)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    args.n = args.n or ([1024, 4096] if cuda else [1024])
    args.v = args.v or ([32000, 152064] if cuda else [32000])
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (5 if cuda else 1)
    measure = _measure if cuda else _measure_in_child

    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device {device}, loss {args.loss}, dtype {args.dtype}, H {args.hidden}, teacher H "
        f"{args.teacher_hidden}, chunk {args.chunk_size} rows / {args.chunk_elements} elements, repeats "
        f"{args.repeats}, torch {torch.__version__}"
    )
    print(
        f"{'N':>6} {'V':>7} {'rows':>5} {'fp32 [N,V] MB':>13} | {'variant':>10} {'ms/step':>9} {'time x':>7} "
        f"{'peak MB':>9} {'mem x':>6}"
    )
    for n in args.n:
        for v in args.v:
            results = {variant: measure(variant, n, v, args) for variant in VARIANTS}
            t0, m0 = results["plain"]
            for variant, (t, m) in results.items():
                print(
                    f"{n:>6} {v:>7} {chunk_rows(v, args.chunk_size, args.chunk_elements):>5} "
                    f"{n * v * 4 / 2**20:>13.0f} | {variant:>10} {t * 1e3:>9.1f} {t / t0:>7.2f} "
                    f"{m / 2**20:>9.0f} {m / max(m0, 1.0):>6.2f}"
                )


if __name__ == "__main__":
    main()
