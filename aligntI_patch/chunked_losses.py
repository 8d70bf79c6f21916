"""Memory-bounded losses computed from final hidden states and lm_head weights, chunk by chunk.

Every term of Eq. 8 (L_sft, and L_kd / L_iva / L_tpa through Eq. 2, 3, 7) needs next-token logits, and
Qwen's vocabulary is ~152k: the full ``[positions x vocab]`` logits of a batch are 0.6 GB per 1k
positions in float32, more than the rest of a 0.5B student's activations. So the losses here take
hidden states ``[N, H]`` and the head weight ``[V, H]`` and never build more than ``[chunk_size, V]``
logits at a time, in the forward pass or in the backward pass.

Design choices:
- Gradients are computed in the forward pass (``_FusedLinearLoss``): per chunk, logits = h W^T (+ b),
  the loss, dL/dlogits by autograd on that block alone, then dL/dh = g W and dL/dW += g^T h. The
  backward only scales the stored gradients by ``grad_output``. Against recomputing each chunk in the
  backward (a recomputing autograd.Function or ``torch.utils.checkpoint`` per chunk) this does no extra
  matmul; above all the teacher's logits, the largest matmul, are computed once, where a recomputing
  backward needs them again. The price is one head-sized gradient held from forward to backward, which
  plain autograd allocates in its backward anyway. ``benchmarks/bench_chunked_losses.py`` measures the
  plain formula, this, and checkpointing.
- Rows that cannot contribute (weight 0, target ``IGNORE_INDEX``) are dropped before chunking: a KD
  batch aligns response positions only, IVA visual positions only.
- Both losses return SUMS over positions, not means: the trainer divides by the global token count, so
  gradient accumulation and data parallelism give the same update as one large batch.
- The teacher side is constant: its hidden states and head are detached, its logits built without grad.
- Under DeepSpeed ZeRO-3 the caller must pass gathered (full) head weights (`zero3.py`: the trainer holds the
  student's for its whole forward and backward, so dL/dW reaches the parameter's own AccumulateGrad and ZeRO-3's
  gradient hook, and gathers the teacher's around the losses).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from aligntI_patch.divergences import check_divergence_args, token_divergence
from llava.constants import IGNORE_INDEX

# chunk_loss(logits (c, V), start, end) -> scalar sum over the chunk's rows start:end
ChunkLoss = Callable[[Tensor, int, int], Tensor]


def _linear_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_loss: ChunkLoss,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Sum of ``chunk_loss`` over row chunks of ``hidden @ weight.T + bias``; gradients where asked.

    Returns ``(loss, grad_hidden (N, H), grad_weight (V, H), grad_bias (V,))`` for a unit upstream
    gradient; a gradient not asked for is None.
    """
    need_h, need_w, need_b = needs_grad
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # accumulate dL/dW across chunks in >= fp32
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end]  # (c, H)
        logits = F.linear(h, weight, bias)  # (c, V): the only vocab-sized block alive
        if not (need_h or need_w or need_b):
            total += chunk_loss(logits, start, end)
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_loss(logits, start, end)
        (g,) = torch.autograd.grad(loss, logits)  # (c, V), dtype of logits
        del logits
        total += loss.detach()
        if grad_h is not None:
            grad_h[start:end] = g @ weight  # (c, H)
        if grad_w is not None:
            if grad_w.dtype == h.dtype:
                grad_w.addmm_(g.t(), h)  # (V, H), in place
            else:
                grad_w += (g.t() @ h).to(acc_dtype)  # low-precision matmul, fp32 accumulation
        if grad_b is not None:
            grad_b += g.sum(dim=0).to(acc_dtype)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
    return total, grad_h, grad_w, grad_b


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked linear + loss whose gradients are computed in the forward pass (see module doc)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        chunk_loss: ChunkLoss,
        chunk_size: int,
    ) -> Tensor:
        needs = tuple(ctx.needs_input_grad[:3])
        total, grad_h, grad_w, grad_b = _linear_chunks(hidden, weight, bias, chunk_loss, chunk_size, needs)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Out of place, so that backward(retain_graph=True) can run twice.
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None)


def _linear_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_loss: ChunkLoss, chunk_size: int
) -> Tensor:
    """Dispatch: the fused autograd.Function when a gradient is needed, a no-grad loop otherwise."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedLinearLoss.apply(hidden, weight, bias, chunk_loss, chunk_size)
    with torch.no_grad():
        return _linear_chunks(hidden, weight, bias, chunk_loss, chunk_size, (False, False, False))[0]


def _check_head(prefix: str, hidden: Tensor, head: Tensor, bias: Tensor | None, n: int) -> None:
    """Shape contract: hidden (N, H), head (V, H), bias (V,); ``prefix`` names the arguments."""
    if hidden.dim() != 2 or hidden.shape[0] != n:
        raise ValueError(f"{prefix}hidden must be [N={n}, H], got {tuple(hidden.shape)}")
    if head.dim() != 2 or head.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}head must be [V, H={hidden.shape[1]}], got {tuple(head.shape)}")
    if bias is not None and tuple(bias.shape) != (head.shape[0],):
        raise ValueError(f"{prefix}bias must be [V={head.shape[0]}], got {tuple(bias.shape)}")


def _check_weights(weights: Tensor, n: int) -> None:
    if tuple(weights.shape) != (n,):
        raise ValueError(f"weights must be [N={n}], got {tuple(weights.shape)}")
    if weights.requires_grad:
        raise ValueError("weights are constants (no gradient flows to them): pass weights.detach()")


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    weights: Tensor,
    kind: str,
    *,
    vocab_size: int,
    chunk_size: int = 1024,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **div_kw: float,
) -> Tensor:
    """Weighted SUM of per-position divergences, sum_i w_i D(T_i || S_i), without full logits.

    The building block of L_kd (Eq. 2: weights 1 on response positions), L_iva (Eq. 3: weights the
    instruction-aware importance of each visual position) and L_tpa (Eq. 7: weights count / d on
    candidate positions). Equal to
    ``(weights * token_divergence(s[:, :vocab_size], t[:, :vocab_size], kind, **div_kw)).sum()`` with
    ``s = student_hidden @ student_head.T + student_bias`` and ``t`` likewise for the teacher, but only
    ``[chunk_size, vocab_size]`` logits exist at a time, in forward and in backward.

    Args:
        student_hidden: ``[N, Hs]`` final (post-norm) hidden states of the student.
        student_head: ``[Vs, Hs]`` student lm_head weight, ``Vs >= vocab_size``.
        teacher_hidden: ``[N, Ht]`` teacher hidden states for the same positions; treated as constant.
        teacher_head: ``[Vt, Ht]`` teacher lm_head weight, ``Vt >= vocab_size``; treated as constant.
        weights: ``[N]`` per-position weights, constant; rows with weight 0 are skipped.
        kind: one of ``DIVERGENCES``; ``div_kw``: ``temperature``, ``beta``, ``alpha`` of token_divergence.
        vocab_size: the shared tokenizer's vocabulary size; both heads are sliced to it.
        chunk_size: positions per chunk. Peak extra memory is about six fp32 ``[chunk_size, vocab_size]``
            blocks (0.6 GB each at 1024 x 152k) plus a head-sized fp32 gradient accumulator.
        student_bias, teacher_bias: optional lm_head biases ``[Vs]``, ``[Vt]`` (None for Qwen).

    Returns:
        A 0-dim tensor in >= float32: the SUM over positions (not a mean; the trainer divides by the
        global token count so gradient accumulation and data parallelism match one large batch).
        Gradients flow to ``student_hidden``, ``student_head`` and ``student_bias``.
    """
    check_divergence_args(kind, **div_kw)
    n = student_hidden.shape[0]
    _check_head("student_", student_hidden, student_head, student_bias, n)
    _check_head("teacher_", teacher_hidden, teacher_head, teacher_bias, n)
    _check_weights(weights, n)
    for name, head in (("student", student_head), ("teacher", teacher_head)):
        if not 0 < vocab_size <= head.shape[0]:
            raise ValueError(f"vocab_size {vocab_size} must be in [1, {name}_head rows = {head.shape[0]}]")

    rows = weights.nonzero().squeeze(1)  # (n,) positions that contribute
    t_hidden = teacher_hidden.detach()
    if rows.numel() < n:
        student_hidden = student_hidden.index_select(0, rows)  # (n, Hs); autograd scatters the grad back
        t_hidden = t_hidden.index_select(0, rows)  # (n, Ht)
        weights = weights.index_select(0, rows)  # (n,)
    t_head = teacher_head.detach()[:vocab_size]  # (V, Ht)
    t_bias = None if teacher_bias is None else teacher_bias.detach()[:vocab_size]
    s_bias = None if student_bias is None else student_bias[:vocab_size]

    def chunk_loss(s_logits: Tensor, start: int, end: int) -> Tensor:
        with torch.no_grad():
            t_logits = F.linear(t_hidden[start:end], t_head, t_bias)  # (c, V)
        div = token_divergence(s_logits, t_logits, kind, **div_kw)  # (c,)
        return (weights[start:end].to(div.dtype) * div).sum()

    return _linear_loss(student_hidden, student_head[:vocab_size], s_bias, chunk_loss, chunk_size)


def chunked_cross_entropy(
    hidden: Tensor,
    head: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
) -> Tensor:
    """Weighted SUM of next-token cross-entropies, sum_i w_i CE(hidden_i W^T, targets_i): L_sft of Eq. 8.

    Args:
        hidden: ``[N, H]`` final hidden states.
        head: ``[V, H]`` lm_head weight (all rows: a padded head row is still a class of the softmax).
        targets: ``[N]`` token ids already shifted (``targets[i]`` is predicted from ``hidden[i]``);
            ``IGNORE_INDEX`` (-100) rows contribute 0 and are skipped.
        weights: ``[N]`` constant per-position weights, or None for all ones; weight-0 rows are skipped.
        chunk_size: positions per chunk; only ``[chunk_size, V]`` logits exist at a time.
        bias: optional lm_head bias ``[V]``.

    Returns:
        A 0-dim tensor in >= float32: the SUM over positions (not a mean; the trainer divides by the
        global count of supervised tokens so gradient accumulation and data parallelism match one large
        batch). Gradients flow to ``hidden``, ``head`` and ``bias``.
    """
    n = hidden.shape[0]
    _check_head("", hidden, head, bias, n)
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be [N={n}], got {tuple(targets.shape)}")
    keep = targets != IGNORE_INDEX  # (N,)
    if weights is not None:
        _check_weights(weights, n)
        keep &= weights != 0
    rows = keep.nonzero().squeeze(1)  # (n,)
    if rows.numel() < n:
        hidden = hidden.index_select(0, rows)  # (n, H)
        targets = targets.index_select(0, rows)  # (n,)
        weights = None if weights is None else weights.index_select(0, rows)

    def chunk_loss(logits: Tensor, start: int, end: int) -> Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(logits, targets[start:end], reduction="none")  # (c,)
        return ce.sum() if weights is None else (weights[start:end].to(ce.dtype) * ce).sum()

    return _linear_loss(hidden, head, bias, chunk_loss, chunk_size)
