"""token_divergence against closed forms and properties; align_vocab slicing; argument errors."""

import math

import pytest
import torch

from aligntI_patch.chunked_losses import chunked_divergence
from aligntI_patch.divergences import DIVERGENCES, align_vocab, fkl_sum_and_grad, token_divergence

# Two-token case, by hand: T = (0.5, 0.5), S = (0.8, 0.2) (logits = log-probabilities).
T2 = torch.tensor([[math.log(0.5), math.log(0.5)]])
S2 = torch.tensor([[math.log(0.8), math.log(0.2)]])
HAND = [
    # KL(T||S) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = ln 1.25
    ("fkl", {}, 0.22314355131420976),
    # KL(S||T) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5)
    ("rkl", {}, 0.19274475702175753),
    # M = (0.65, 0.35): 0.5 [0.5 ln(0.5/0.65) + 0.5 ln(0.5/0.35)] + 0.5 [0.8 ln(0.8/0.65) + 0.2 ln(0.2/0.35)]
    ("jsd", {"beta": 0.5}, 0.05067183698556589),
    # M = (0.725, 0.275): 0.25 [0.5 ln(0.5/0.725) + 0.5 ln(0.5/0.275)] + 0.75 [0.8 ln(0.8/0.725) + 0.2 ln(0.2/0.275)]
    ("jsd", {"beta": 0.25}, 0.03958016456056348),
    # M = 0.1 T + 0.9 S = (0.77, 0.23): 0.5 ln(0.5/0.77) + 0.5 ln(0.5/0.23)
    ("sfkl", {"alpha": 0.1}, 0.17237318653672903),
    # M = 0.1 S + 0.9 T = (0.53, 0.47): 0.8 ln(0.8/0.53) + 0.2 ln(0.2/0.47)
    ("srkl", {"alpha": 0.1}, 0.15850471126619436),
]


def _logits(n: int = 6, v: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, v, generator=gen, dtype=dtype)


@pytest.mark.parametrize(("kind", "kw", "value"), HAND)
def test_two_token_case_by_hand(kind: str, kw: dict, value: float) -> None:
    for dtype in (torch.float32, torch.float64):
        got = token_divergence(S2.to(dtype), T2.to(dtype), kind, **kw)
        assert got.shape == (1,)
        assert got.item() == pytest.approx(value, rel=1e-6)


def test_hand_values_invariant_to_logit_shift() -> None:
    # softmax is shift invariant: adding a constant per row changes nothing
    for kind, kw, value in HAND:
        got = token_divergence(S2 + 7.0, T2 - 3.0, kind, **kw)
        assert got.item() == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_for_equal_distributions(kind: str) -> None:
    x = _logits()
    torch.testing.assert_close(token_divergence(x, x.clone(), kind), torch.zeros(6, dtype=x.dtype))
    # equal up to a per-row shift is the same distribution
    torch.testing.assert_close(token_divergence(x, x + 5.0, kind), torch.zeros(6, dtype=x.dtype))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_nonnegative(kind: str) -> None:
    assert (token_divergence(_logits(seed=1), _logits(seed=2), kind) >= 0).all()


def test_fkl_is_rkl_with_arguments_swapped() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    torch.testing.assert_close(token_divergence(s, t, "fkl"), token_divergence(t, s, "rkl"))


def test_jsd_symmetric_at_half_and_bounded_by_log2() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    a, b = token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5)
    torch.testing.assert_close(a, b)
    assert (a <= math.log(2) + 1e-12).all()
    # general beta: swapping the arguments is swapping beta <-> 1 - beta
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", beta=0.3), token_divergence(t, s, "jsd", beta=0.7)
    )


def test_jsd_limits() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    # JSD_beta = beta KL(T||S) + O(beta^2), and symmetrically at beta -> 1 with KL(S||T); the O(beta^2)
    # term carries a chi-square that is large for these peaked rows, hence the small beta (float64)
    eps = 1e-8
    fkl, rkl = token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl")
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-3, atol=0)


def test_skew_kl_limits() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    torch.testing.assert_close(token_divergence(s, t, "sfkl", alpha=0.0), token_divergence(s, t, "fkl"))
    torch.testing.assert_close(token_divergence(s, t, "srkl", alpha=0.0), token_divergence(s, t, "rkl"))
    for kind in ("sfkl", "srkl"):
        # towards alpha = 1 the mixture becomes the first distribution: the divergence vanishes
        assert (token_divergence(s, t, kind, alpha=1 - 1e-9) < 1e-6).all()
        # skewing towards the first distribution can only shrink the divergence
        assert (token_divergence(s, t, kind, alpha=0.5) <= token_divergence(s, t, kind, alpha=0.1)).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_divides_logits(kind: str) -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    torch.testing.assert_close(
        token_divergence(s, t, kind, temperature=2.5), token_divergence(s / 2.5, t / 2.5, kind)
    )
    # no T^2 rescaling: scaling logits and temperature together changes nothing
    torch.testing.assert_close(
        token_divergence(4 * s, 4 * t, kind, temperature=4.0), token_divergence(s, t, kind)
    )
    # a hot softmax flattens both distributions towards uniform, and the divergence towards 0
    hot = token_divergence(s, t, kind, temperature=1e4)
    assert (hot < 1e-6).all() and (hot < token_divergence(s, t, kind)).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_masked_vocab_gives_no_nan(kind: str) -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[40:] = True  # entries masked in both (e.g. padded head rows)
    s_m, t_m = s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf)
    got = token_divergence(s_m, t_m, kind)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[:, 40:] == 0).all() and (t.grad[:, 40:] == 0).all()
    # equals the divergence on the unmasked entries alone (0 * log 0 = 0)
    torch.testing.assert_close(got, token_divergence(s[:, :40], t[:, :40], kind))


def test_entry_masked_in_teacher_only() -> None:
    # T has mass 0 on an entry S still covers: KL(T||S) is finite and exact, gradients finite
    s = _logits(seed=1).requires_grad_(True)
    t = _logits(seed=2)
    t[:, 0] = -math.inf
    fkl = token_divergence(s, t, "fkl")
    p_t, log_s = torch.softmax(t, -1), torch.log_softmax(s, -1)
    expected = (p_t[:, 1:] * (torch.log(p_t[:, 1:]) - log_s[:, 1:])).sum(-1)
    torch.testing.assert_close(fkl, expected)
    fkl.sum().backward()
    # d KL(T||S) / d s = softmax(s) - T
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - p_t)
    for kind in DIVERGENCES:
        assert torch.isfinite(token_divergence(s, t, kind)).all()


def test_low_precision_inputs_computed_in_float32() -> None:
    s, t = _logits(seed=1, dtype=torch.bfloat16), _logits(seed=2, dtype=torch.bfloat16)
    got = token_divergence(s, t, "fkl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_divergence(s.float(), t.float(), "fkl"))


def test_any_leading_shape() -> None:
    s, t = _logits(seed=1).view(2, 3, 50), _logits(seed=2).view(2, 3, 50)
    got = token_divergence(s, t, "jsd")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.flatten(), token_divergence(s.view(6, 50), t.view(6, 50), "jsd"))


def test_argument_errors() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'.*fkl, rkl, jsd, sfkl, srkl"):
        token_divergence(s, t, "kl")
    for kw, name in (
        ({"beta": 1.5}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"alpha": 2.0}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
    ):
        with pytest.raises(ValueError, match=name):
            token_divergence(s, t, "jsd", **kw)
    with pytest.raises(ValueError, match="align_vocab"):
        token_divergence(s, t[:, :40], "fkl")


@pytest.mark.parametrize(
    "kind, kw, name",
    [("sfkl", {"alpha": 1.0}, "alpha"), ("srkl", {"alpha": 1.0}, "alpha"),
     ("jsd", {"beta": 0.0}, "beta"), ("jsd", {"beta": 1.0}, "beta")],
)
def test_end_points_that_vanish_identically_are_rejected(kind, kw, name) -> None:
    """Skew alpha = 1 and JSD beta = 0 / 1 make the mixture equal one side: the divergence is 0 for every input,
    so a loss built on it cannot train the student; the chunked loss used to fail inside autograd instead."""
    s, t = _logits(seed=1), _logits(seed=2)
    with pytest.raises(ValueError, match=rf"{name} must be in .*identically 0"):
        token_divergence(s, t, kind, **kw)
    hidden, head = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{name} must be in .*identically 0"):
        chunked_divergence(hidden, head, torch.randn(6, 8), torch.randn(24, 8), torch.ones(6), kind,
                           vocab_size=20, **kw)
    # the other kinds ignore the parameter: no error
    token_divergence(s, t, "fkl", **kw)


def test_align_vocab_slices_never_pads() -> None:
    # Qwen2-0.5B head 151936 rows, Qwen2-7B 152064, tokenizer 151665 (scaled down here)
    s, t = torch.randn(3, 36), torch.randn(3, 40)
    s_a, t_a = align_vocab(s, t, 30)
    assert s_a.shape == t_a.shape == (3, 30)
    assert torch.equal(s_a, s[:, :30]) and torch.equal(t_a, t[:, :30])
    with pytest.raises(ValueError, match="student"):
        align_vocab(s, t, 37)
    with pytest.raises(ValueError, match="teacher"):
        align_vocab(torch.randn(3, 50), t, 41)
    with pytest.raises(ValueError, match="vocab_size"):
        align_vocab(s, t, 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fkl_closed_form_gradient_is_autograds(temperature: float) -> None:
    """fkl_sum_and_grad against autograd through the plain formula sum_i w_i sum_v T (log T - log S)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3, torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    t[1, 4] = float("-inf")  # an entry the teacher masks: probability 0, no gradient from it
    w = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5], dtype=torch.float64)
    s_ref = s.clone().requires_grad_(True)
    log_s, log_t = torch.log_softmax(s_ref / temperature, -1), torch.log_softmax(t / temperature, -1)
    plain = (w * torch.where(log_t.exp() > 0, log_t.exp() * (log_t - log_s), 0.0).sum(-1)).sum()
    (ref_grad,) = torch.autograd.grad(plain, s_ref)
    total, grad = fkl_sum_and_grad(s, t, w, temperature)
    torch.testing.assert_close(total, plain.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(grad[3], torch.zeros(11, dtype=torch.float64))  # weight 0: no gradient
