"""Token-level divergences between teacher and student next-token distributions.

``D_KL(P_T || P_S)`` is the divergence of the paper's Eq. 2 (vanilla KD), Eq. 3 (IVA, weighted per visual
token) and Eq. 7 (TPA, per candidate); Eq. 8 sums those terms with L_sft. The other kinds are the
baselines of the paper's Tab. 3 (reverse KL, JSD) and DistiLLM's skew KL.

Design choices:
- Everything is computed in at least float32 (float64 stays float64) from ``log_softmax``; the mixtures of
  JSD and skew KL are formed in log space with ``logaddexp``, never by taking ``log`` of a sum of
  probabilities.
- ``-inf`` logits (masked vocabulary entries) are raised to ``finfo.min`` before the softmax: their
  probability is still exactly 0, their log-probability about ``finfo.min`` instead of ``-inf``, so
  ``0 * log 0`` evaluates to 0, every difference of log-probabilities stays finite, and neither values
  nor gradients become NaN. The one consequence: an entry masked in the second argument of a KL but not
  in the first, where the true value is ``+inf``, gives a very large finite value instead (its gradient
  with respect to the logits is the correct, finite one).
- ``temperature`` divides both logits before the softmax; the result is not multiplied by
  ``temperature**2`` (scale the loss weight instead if Hinton's convention is wanted).
- Teacher and student must share the tokenizer; their lm_heads may have different padded sizes.
  ``align_vocab`` slices both to the tokenizer's vocabulary, never pads.
"""

import math

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "sfkl", "srkl")


def check_divergence_args(kind: str, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> None:
    """Raise ``ValueError`` naming the offending argument if ``token_divergence`` would reject it.

    ``beta`` and ``alpha`` must lie in [0, 1] whatever the kind; the kind that uses one also rejects the end
    point where the mixture is the distribution compared with it: the divergence is then 0 for every input
    and gives the student no gradient (a loss that cannot train; the chunked losses cannot even run it).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; known kinds: {', '.join(DIVERGENCES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kind == "jsd" and beta in (0.0, 1.0):
        side = "T" if beta else "S"
        raise ValueError(
            f"beta must be in (0, 1) for jsd, got {beta}: M = beta*T + (1-beta)*S is then {side} "
            "and the divergence is identically 0"
        )
    if kind in ("sfkl", "srkl") and alpha == 1.0:
        first = "T" if kind == "sfkl" else "S"
        raise ValueError(
            f"alpha must be in [0, 1) for {kind}, got 1: the skew mixture is then {first} itself and the "
            "divergence is identically 0"
        )


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Slice student and teacher logits ``[..., V_s]``, ``[..., V_t]`` to the shared ``[..., vocab_size]``.

    lm_heads are padded past the tokenizer (Qwen2-7B: 152064 rows, Qwen2-0.5B: 151936, tokenizer: 151665);
    the extra rows are never real tokens, so they are dropped, never zero-padded (a zero logit would give
    a padded entry real probability mass).
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if vocab_size > logits.shape[-1]:
            raise ValueError(
                f"vocab_size {vocab_size} exceeds the {name} logits' last dimension {logits.shape[-1]}: "
                "teacher and student must share one tokenizer"
            )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Log-softmax over the last dim in >= float32, finite everywhere (see module doc)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:  # skip a [N, V] pass in the common case
        logits = logits / temperature
    # Clamping the input rather than the output keeps one [N, V] tensor fewer alive for backward.
    return torch.log_softmax(logits.clamp(min=torch.finfo(logits.dtype).min), dim=-1)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) per row, from log-probabilities ``[..., V]`` -> ``[...]``."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _log_mixture(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w * P + (1 - w) * Q) for w in [0, 1), computed with logaddexp; exactly Q at w = 0."""
    if w == 0.0:  # skew KL at alpha = 0 is plain KL, exactly
        return logq
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def fkl_sum_and_grad(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """sum_i w_i KL(T_i || S_i) and its gradient with respect to the student logits, in closed form.

    d KL(T || S) / d s = (S - T) / temperature (the tempered softmaxes), so the gradient needs no autograd
    graph over ``[N, V]`` blocks: the value of ``(weights * token_divergence(s, t, "fkl")).sum()`` and its
    gradient from three ``[N, V]`` blocks. Logits ``[N, V]``, weights ``[N]``; returns (0-dim sum, ``[N, V]``
    gradient in >= float32). For finite student logits (a linear layer's) the gradient is autograd's.
    """
    log_s = _log_probs(student_logits, temperature)  # (N, V)
    log_t = _log_probs(teacher_logits, temperature)  # (N, V)
    p_t = log_t.exp()
    w = weights.to(log_s.dtype)
    total = (w * log_t.sub_(log_s).mul_(p_t).sum(dim=-1)).sum()  # log_t is not needed after p_t
    grad = log_s.exp_().sub_(p_t).mul_(w[:, None] / temperature)  # (S - T) w / temperature, in place
    return total, grad


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-row divergence between teacher and student distributions, ``[N, V]`` logits -> ``[N]``.

    Any leading shape works (``[..., V] -> [...]``). With T = softmax(teacher / temperature) and
    S = softmax(student / temperature):

    - ``"fkl"``: KL(T || S), the paper's D_KL(P_T || P_S) (Eq. 2, 3, 7);
    - ``"rkl"``: KL(S || T);
    - ``"jsd"``: beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S, beta in (0, 1)
      (symmetric at beta = 0.5; divided by beta it tends to KL(T || S) as beta -> 0, divided by
      1 - beta it tends to KL(S || T) as beta -> 1);
    - ``"sfkl"``: KL(T || alpha * T + (1 - alpha) * S), DistiLLM's skew forward KL, alpha in [0, 1);
    - ``"srkl"``: KL(S || alpha * S + (1 - alpha) * T), DistiLLM's skew reverse KL, alpha in [0, 1).

    The excluded end points (jsd beta = 0 or 1, skew alpha = 1) make the divergence identically 0
    (``check_divergence_args``); alpha = 0 gives plain KL(T || S) / KL(S || T) exactly.

    Computed in float32 (float64 inputs stay float64). Gradients flow to both arguments; detach the
    teacher's logits if it is frozen. Rows need at least one finite logit.
    """
    check_divergence_args(kind, temperature, beta, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; slice both with align_vocab first"
        )
    log_s = _log_probs(student_logits, temperature)  # (N, V)
    log_t = _log_probs(teacher_logits, temperature)  # (N, V)
    if kind == "fkl":
        return _kl(log_t, log_s)
    if kind == "rkl":
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mixture(log_t, log_s, beta)  # (N, V)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if kind == "sfkl":
        return _kl(log_t, _log_mixture(log_t, log_s, alpha))
    return _kl(log_s, _log_mixture(log_s, log_t, alpha))  # "srkl"
