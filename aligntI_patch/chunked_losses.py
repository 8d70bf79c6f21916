"""Memory-bounded losses computed from final hidden states and lm_head weights, chunk by chunk.

Every term of Eq. 8 (L_sft, and L_kd / L_iva / L_tpa through Eq. 2, 3, 7) needs next-token logits, and
Qwen's vocabulary is ~152k: the full ``[positions x vocab]`` logits of a batch are 0.6 GB per 1k
positions in float32, more than the rest of a 0.5B student's activations. So the losses here take
hidden states ``[N, H]`` and the head weight ``[V, H]`` and never build more than ``[chunk_size, V]``
logits at a time, in the forward pass or in the backward pass, where a chunk is at most ``chunk_size`` rows
and at most ``chunk_elements`` logits elements (`chunk_rows`).

Design choices:
- Gradients are computed in the forward pass (``_FusedLinearLoss``): per chunk, logits = h W^T (+ b),
  the loss, dL/dlogits by autograd on that block alone (for the paper's forward KL in closed form,
  ``w (S - T) / temperature``: no graph over [c, V] blocks), then dL/dh = g W and dL/dW += g^T h. The
  backward only scales the stored gradients by ``grad_output``. Against recomputing each chunk in the
  backward (a recomputing autograd.Function or ``torch.utils.checkpoint`` per chunk) this does no extra
  matmul; above all the teacher's logits, the largest matmul, are computed once, where a recomputing
  backward needs them again. The price is one head-sized gradient held from forward to backward, which
  plain autograd allocates in its backward anyway. ``benchmarks/bench_chunked_losses.py`` measures the
  plain formula, this, and checkpointing.
- One head gradient per step, not one per term (`SharedHeadGrad`): when the coefficients c_k of the total
  ``sum_k c_k S_k`` are known before the terms run (the trainer's weight over global count), every term adds
  ``c_k dS_k/dW`` into one buffer, and `SharedHeadGrad.attach` routes the sums through one node whose backward
  hands the head ``c * buffer``, c being the common factor of the upstream gradients (``g_k = c c_k``: loss
  scaling, world size). Any other combination of the sums raises in that backward rather than give a wrong
  gradient. Without coefficients each term holds its own (`_FusedLinearLoss`).
- A chunk is bounded in logits elements, not only in rows: its ``[c, V]`` blocks (student and teacher logits,
  their (log-)softmaxes, the gradient; about six alive at once) are what a chunk costs, and that grows with V.
  The default budget, 16M elements, is a 64 MB fp32 block: 110 rows at Qwen's V = 151936, 524 at V = 32000.
  ``chunk_size`` stays a row cap. Results do not depend on the chunking beyond float summation order.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aligntI_patch.divergences import check_divergence_args, fkl_sum_and_grad, token_divergence
from llava.constants import IGNORE_INDEX

# chunk_loss(logits (c, V), start, end) -> scalar sum over the chunk's rows start:end
ChunkLoss = Callable[[Tensor, int, int], Tensor]
# chunk_grad(logits, start, end) -> (that sum, its gradient (c, V)) in closed form, where one exists
ChunkGrad = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16,777,216 logits elements per chunk: a 64 MB fp32 [c, V] block
MIN_STEP_CHUNK_ROWS = 64  # a step with few response rows still takes the other terms' rows 64 at a time


def chunk_rows(vocab: int, max_rows: int, max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk: at most ``max_rows``, at most ``max_elements`` logits elements ``[rows, vocab]``, at least 1.

    >>> chunk_rows(151936, 1024), chunk_rows(32000, 1024), chunk_rows(32000, 100), chunk_rows(10**9, 1024)
    (110, 524, 100, 1)
    """
    if max_rows < 1 or max_elements < 1 or vocab < 1:
        raise ValueError(f"chunk_rows needs vocab, max_rows, max_elements >= 1, got {vocab}, {max_rows}, "
                         f"{max_elements}")
    return min(max_rows, max(1, max_elements // vocab))


def step_chunk_rows(response_rows: int, vocab: int, max_rows: int,
                    max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk for every term of one step: `chunk_rows`, and no more than the step's response rows
    (floor `MIN_STEP_CHUNK_ROWS`).

    Vanilla KD forms its logits over the R response rows; IVA's N_v visual rows (729 per image) and TPA's
    candidate rows would otherwise fill larger blocks, and the step's peak memory would be theirs. At the
    real sizes a batch has more response rows than the element budget allows, and nothing changes.

    >>> step_chunk_rows(64, 32000, 1024), step_chunk_rows(10, 32000, 1024), step_chunk_rows(900, 151936, 1024)
    (64, 64, 110)
    """
    return min(chunk_rows(vocab, max_rows, max_elements), max(response_rows, MIN_STEP_CHUNK_ROWS))


@dataclass
class HeadGradSlot:
    """Where one term adds its head gradient, times ``scale``: (views of) a `SharedHeadGrad`'s buffers."""

    weight: Tensor | None  # (V, H) >= fp32, None when the head needs no gradient
    bias: Tensor | None  # (V,)
    scale: float
    head: Tensor  # the head the buffers belong to


def _linear_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_loss: ChunkLoss,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
    into: HeadGradSlot | None = None,
    chunk_grad: ChunkGrad | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Sum of ``chunk_loss`` over row chunks of ``hidden @ weight.T + bias``; gradients where asked.
    dL/dlogits comes from ``chunk_grad`` when given (a closed form), else from autograd on the block.

    Returns ``(loss, grad_hidden (N, H), grad_weight (V, H), grad_bias (V,))`` for a unit upstream
    gradient; a gradient not asked for is None. With ``into``, ``into.scale`` times the head's gradients are
    added to ``into``'s buffers (their first V rows) instead, and None is returned for them.
    """
    need_h, need_w, need_b = needs_grad
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # accumulate dL/dW across chunks in >= fp32
    grad_h = torch.empty_like(hidden) if need_h else None
    scale = 1.0
    if into is None:
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
    else:  # the head slices [:V] of a shared buffer
        grad_w = into.weight[: weight.shape[0]] if need_w and into.weight is not None else None
        grad_b = into.bias[: weight.shape[0]] if need_b and into.bias is not None else None
        scale = into.scale
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end]  # (c, H)
        logits = F.linear(h, weight, bias)  # (c, V): the only vocab-sized block alive
        if not (need_h or need_w or need_b):
            total += chunk_loss(logits, start, end)
            continue
        if chunk_grad is not None:
            loss, g = chunk_grad(logits, start, end)
            g = g.to(logits.dtype)
        else:
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
                grad_w.addmm_(g.t(), h, alpha=scale)  # (V, H), in place
            else:
                grad_w.add_(g.t() @ h, alpha=scale)  # low-precision matmul, fp32 accumulation
        if grad_b is not None:
            grad_b.add_(g.sum(dim=0), alpha=scale)
    if into is not None:
        return total, grad_h, None, None
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
        into: HeadGradSlot | None,
        chunk_grad: ChunkGrad | None,
    ) -> Tensor:
        needs = tuple(ctx.needs_input_grad[:3])
        total, grad_h, grad_w, grad_b = _linear_chunks(hidden, weight, bias, chunk_loss, chunk_size, needs, into,
                                                       chunk_grad)
        ctx.save_for_backward(grad_h, grad_w, grad_b)  # with `into`, the head's gradients are None here
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Out of place, so that backward(retain_graph=True) can run twice.
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)  # chunk_loss, chunk_size, into, chunk_grad


class SharedHeadGrad:
    """One head gradient for several terms whose total is ``sum_k c_k S_k`` (module doc).

    Usage: ``sink = SharedHeadGrad(head, bias, {"kd": c_kd, "iva": c_iva})``; pass ``sink.slot(name)`` as
    ``head_grad`` of each term's loss (computed with this ``head``, or its first rows); then
    ``sums = sink.attach(sums)``. Backward through any combination of the attached sums other than a
    multiple of ``sum_k c_k S_k`` raises.
    """

    def __init__(self, head: Tensor, bias: Tensor | None, coefficients: dict[str, float]) -> None:
        bad = {k: c for k, c in coefficients.items() if not (c > 0 and c < float("inf"))}
        if bad:
            raise ValueError(f"coefficients must be positive and finite, got {bad}")
        acc_dtype = torch.promote_types(head.dtype, torch.float32)
        self.head, self.bias = head, bias
        self.coefficients = dict(coefficients)
        self.weight_grad = None
        if head.requires_grad:
            self.weight_grad = torch.zeros(head.shape, dtype=acc_dtype, device=head.device)  # (V, H)
        self.bias_grad = None
        if bias is not None and bias.requires_grad:
            self.bias_grad = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)  # (V,)
        self.used: list[str] = []
        self.attached = False

    def slot(self, name: str) -> HeadGradSlot:
        """Term ``name``'s slot (its coefficient); each name once, before `attach`."""
        if self.attached:
            raise ValueError(f"slot {name!r} after attach: the head's gradient is final")
        if name in self.used or name not in self.coefficients:
            raise ValueError(f"slot {name!r}: taken already or not among {sorted(self.coefficients)}")
        self.used.append(name)
        return HeadGradSlot(self.weight_grad, self.bias_grad, self.coefficients[name], self.head)

    def attach(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sums`` with the slotted terms routed through the node that hands the head its gradient."""
        self.attached = True
        if not self.used or not torch.is_grad_enabled() or self.weight_grad is self.bias_grad is None:
            return sums
        outs = _SharedHeadGradNode.apply(self, self.head, self.bias, *(sums[k] for k in self.used))
        return {**sums, **dict(zip(self.used, outs))}


class _SharedHeadGradNode(torch.autograd.Function):
    """Identity on the term sums; backward: the head's gradient ``c * buffer`` after checking ``g_k = c c_k``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, sink: SharedHeadGrad, head: Tensor, bias: Tensor | None, *sums: Tensor
    ) -> tuple[Tensor, ...]:
        grad_w = None if sink.weight_grad is None else sink.weight_grad.to(head.dtype)  # held in the head's dtype
        grad_b = None if sink.bias_grad is None else sink.bias_grad.to(bias.dtype)
        sink.weight_grad = sink.bias_grad = None  # the final gradient: drop the accumulator
        ctx.save_for_backward(grad_w, grad_b)
        ctx.names, ctx.coefficients = list(sink.used), [sink.coefficients[k] for k in sink.used]
        return tuple(x.clone() for x in sums)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        got = torch.stack([g.detach().to(torch.float64) for g in grads]).tolist()  # one sync per step
        coef = ctx.coefficients
        ref = max(range(len(coef)), key=lambda k: coef[k])
        factor = got[ref] / coef[ref]
        if any(abs(g - factor * c) > 1e-3 * abs(factor * c) for g, c in zip(got, coef)):
            raise RuntimeError(
                f"The shared head gradient holds sum_k c_k dS_k/dW for c = {dict(zip(ctx.names, coef))}, but the "
                f"term sums reached the backward with gradients {dict(zip(ctx.names, got))}, not one multiple of "
                "c: compute the terms without coefficients (one head gradient per term) to combine them otherwise")
        grad_w, grad_b = ctx.saved_tensors
        return (None, None if grad_w is None else grad_w * factor, None if grad_b is None else grad_b * factor,
                *grads)


def _linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_loss: ChunkLoss,
    chunk_size: int,
    chunk_elements: int,
    head_grad: HeadGradSlot | None = None,
    chunk_grad: ChunkGrad | None = None,
) -> Tensor:
    """Dispatch: the fused autograd.Function when a gradient is needed, a no-grad loop otherwise.

    ``chunk_size`` caps the rows of a chunk, ``chunk_elements`` its logits elements (`chunk_rows`);
    ``head_grad``: add the head's gradient there (`SharedHeadGrad`) instead of holding one."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if chunk_elements <= 0:
        raise ValueError(f"chunk_elements must be > 0, got {chunk_elements}")
    chunk_size = chunk_rows(weight.shape[0], chunk_size, chunk_elements)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if head_grad is not None and weight.data_ptr() != head_grad.head.data_ptr():
            raise ValueError("head_grad belongs to another head: a term's head must be the SharedHeadGrad's (rows)")
        return _FusedLinearLoss.apply(hidden, weight, bias, chunk_loss, chunk_size, head_grad, chunk_grad)
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
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    head_grad: HeadGradSlot | None = None,
    **div_kw: float,
) -> Tensor:
    """Weighted SUM of per-position divergences, sum_i w_i D(T_i || S_i), without full logits.

    The building block of L_kd (Eq. 2: weights 1 on response positions), L_iva (Eq. 3: weights the
    instruction-aware importance of each visual position) and L_tpa (Eq. 7: weights count / d on
    candidate positions). Equal to
    ``(weights * token_divergence(s[:, :vocab_size], t[:, :vocab_size], kind, **div_kw)).sum()`` with
    ``s = student_hidden @ student_head.T + student_bias`` and ``t`` likewise for the teacher, but only
    ``[c, vocab_size]`` logits exist at a time, in forward and in backward (``c = chunk_rows(vocab_size,
    chunk_size, chunk_elements)``).

    Args:
        student_hidden: ``[N, Hs]`` final (post-norm) hidden states of the student.
        student_head: ``[Vs, Hs]`` student lm_head weight, ``Vs >= vocab_size``.
        teacher_hidden: ``[N, Ht]`` teacher hidden states for the same positions; treated as constant.
        teacher_head: ``[Vt, Ht]`` teacher lm_head weight, ``Vt >= vocab_size``; treated as constant.
        weights: ``[N]`` per-position weights, constant; rows with weight 0 are skipped.
        kind: one of ``DIVERGENCES``; ``div_kw``: ``temperature``, ``beta``, ``alpha`` of token_divergence.
        vocab_size: the shared tokenizer's vocabulary size; both heads are sliced to it.
        chunk_size: positions per chunk at most.
        chunk_elements: logits elements per chunk at most (default 16M: 110 rows at V = 151936). Peak extra
            memory is about six fp32 ``[c, vocab_size]`` blocks (64 MB each by default) plus a head-sized fp32
            gradient accumulator.
        student_bias, teacher_bias: optional lm_head biases ``[Vs]``, ``[Vt]`` (None for Qwen).
        head_grad: a `SharedHeadGrad` slot of ``student_head``: its gradient goes there, not through this sum.

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

    def teacher_logits(start: int, end: int) -> Tensor:  # (c, V), a constant
        with torch.no_grad():
            return F.linear(t_hidden[start:end], t_head, t_bias)

    def chunk_loss(s_logits: Tensor, start: int, end: int) -> Tensor:
        div = token_divergence(s_logits, teacher_logits(start, end), kind, **div_kw)  # (c,)
        return (weights[start:end].to(div.dtype) * div).sum()

    def fkl_grad(s_logits: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:  # Eq. 2's D_KL, no graph
        return fkl_sum_and_grad(s_logits, teacher_logits(start, end), weights[start:end],
                                div_kw.get("temperature", 1.0))

    return _linear_loss(student_hidden, student_head[:vocab_size], s_bias, chunk_loss, chunk_size, chunk_elements,
                        head_grad, fkl_grad if kind == "fkl" else None)


def chunked_cross_entropy(
    hidden: Tensor,
    head: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    bias: Tensor | None = None,
    head_grad: HeadGradSlot | None = None,
) -> Tensor:
    """Weighted SUM of next-token cross-entropies, sum_i w_i CE(hidden_i W^T, targets_i): L_sft of Eq. 8.

    Args:
        hidden: ``[N, H]`` final hidden states.
        head: ``[V, H]`` lm_head weight (all rows: a padded head row is still a class of the softmax).
        targets: ``[N]`` token ids already shifted (``targets[i]`` is predicted from ``hidden[i]``);
            ``IGNORE_INDEX`` (-100) rows contribute 0 and are skipped.
        weights: ``[N]`` constant per-position weights, or None for all ones; weight-0 rows are skipped.
        chunk_size, chunk_elements: at most so many positions and so many logits elements per chunk; only
            ``[c, V]`` logits exist at a time (``c = chunk_rows(V, chunk_size, chunk_elements)``).
        bias: optional lm_head bias ``[V]``.
        head_grad: a `SharedHeadGrad` slot of ``head``: its gradient goes there, not through this sum.

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

    return _linear_loss(hidden, head, bias, chunk_loss, chunk_size, chunk_elements, head_grad)
