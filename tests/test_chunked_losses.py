"""Chunked losses equal the plain formula (full logits) in value and gradients, and never build full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aligntI_patch.chunked_losses import chunked_cross_entropy, chunked_divergence
from aligntI_patch.divergences import DIVERGENCES, align_vocab, token_divergence
from llava.constants import IGNORE_INDEX

N, HS, HT, VS, VT, VOCAB = 13, 8, 12, 40, 48, 37  # teacher head larger than student head, both > vocab
CHUNKS = (4, 5, 13, 64)  # divides N? no, no, equal, larger


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-12 if dtype == torch.float64 else 1e-6}


def _problem(dtype: torch.dtype, seed: int = 0, bias: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    weights = torch.rand(N, generator=gen, dtype=dtype)
    weights[[0, 6, 7]] = 0.0  # e.g. non-response positions
    return {
        "student_hidden": randn(N, HS, grad=True),
        "student_head": randn(VS, HS, grad=True),
        "teacher_hidden": randn(N, HT),
        "teacher_head": randn(VT, HT),
        "weights": weights,
        "student_bias": randn(VS, grad=True) if bias else None,
        "teacher_bias": randn(VT) if bias else None,
    }


def _plain_divergence(p: dict, kind: str, **div_kw: float) -> torch.Tensor:
    """The reference: full [N, V] logits, align_vocab, token_divergence, weighted sum."""
    s = F.linear(p["student_hidden"], p["student_head"], p["student_bias"])  # (N, VS)
    with torch.no_grad():
        t = F.linear(p["teacher_hidden"], p["teacher_head"], p["teacher_bias"])  # (N, VT)
    s, t = align_vocab(s, t, VOCAB)
    return (p["weights"] * token_divergence(s, t, kind, **div_kw)).sum()


def _student_params(p: dict) -> list[torch.Tensor]:
    return [p[k] for k in ("student_hidden", "student_head", "student_bias") if p[k] is not None]


def _assert_value_and_grads(got: torch.Tensor, ref: torch.Tensor, p: dict, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got, ref, **_tol(dtype))
    params = _student_params(p)
    for g, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=_tol(dtype)["atol"] * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_divergence_equals_plain(kind: str, chunk_size: int, dtype: torch.dtype) -> None:
    p = _problem(dtype)
    got = chunked_divergence(**p, kind=kind, vocab_size=VOCAB, chunk_size=chunk_size)
    _assert_value_and_grads(got, _plain_divergence(p, kind), p, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_divergence_bias_and_keywords(dtype: torch.dtype) -> None:
    p = _problem(dtype, seed=1, bias=True)
    for kind, kw in (
        ("fkl", {"temperature": 2.0}),
        ("jsd", {"beta": 0.3, "temperature": 0.7}),
        ("sfkl", {"alpha": 0.2}),
        ("srkl", {"alpha": 0.4, "temperature": 3.0}),
    ):
        got = chunked_divergence(**p, kind=kind, vocab_size=VOCAB, chunk_size=5, **kw)
        _assert_value_and_grads(got, _plain_divergence(p, kind, **kw), p, dtype)


def test_all_weights_nonzero_and_all_zero() -> None:
    p = _problem(torch.float64, seed=2)
    p["weights"] = torch.ones(N, dtype=torch.float64)
    got = chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, chunk_size=4)
    _assert_value_and_grads(got, _plain_divergence(p, "fkl"), p, torch.float64)

    p["weights"] = torch.zeros(N, dtype=torch.float64)
    got = chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, chunk_size=4)
    assert got.item() == 0.0
    for g in torch.autograd.grad(got, _student_params(p)):
        assert (g == 0).all()


def test_zero_weight_rows_get_zero_gradient_and_teacher_none() -> None:
    p = _problem(torch.float64, seed=3)
    p["teacher_hidden"].requires_grad_(True)  # a teacher tensor that requires grad still gets none
    chunked_divergence(**p, kind="rkl", vocab_size=VOCAB, chunk_size=4).backward()
    assert (p["student_hidden"].grad[[0, 6, 7]] == 0).all()
    assert (p["student_hidden"].grad[[1, 2, 3]] != 0).all()
    assert p["teacher_hidden"].grad is None
    assert (p["student_head"].grad[VOCAB:] == 0).all()  # head rows past the tokenizer: no gradient


def test_upstream_gradient_scales_and_graph_reusable() -> None:
    p = _problem(torch.float64, seed=4)
    ref_grads = torch.autograd.grad(_plain_divergence(p, "jsd"), _student_params(p))
    loss = chunked_divergence(**p, kind="jsd", vocab_size=VOCAB, chunk_size=5)
    for _ in range(2):  # backward twice through one graph
        grads = torch.autograd.grad(3.0 * loss, _student_params(p), retain_graph=True)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, 3.0 * r)


def test_no_grad_mode_gives_value_only() -> None:
    p = _problem(torch.float32, seed=5)
    with torch.no_grad():
        got = chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, chunk_size=4)
        ref = _plain_divergence(p, "fkl")
    assert got.grad_fn is None
    torch.testing.assert_close(got, ref)


def test_gradcheck() -> None:
    p = _problem(torch.float64, seed=6, bias=True)
    fixed = {k: v for k, v in p.items() if k not in ("student_hidden", "student_head", "student_bias")}

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return chunked_divergence(h, w, **fixed, kind="sfkl", vocab_size=VOCAB, chunk_size=5, student_bias=b)

    assert torch.autograd.gradcheck(fn, tuple(_student_params(p)), fast_mode=True)


def test_bfloat16_inputs_close_to_float32() -> None:
    p = _problem(torch.float32, seed=7)
    ref = _plain_divergence(p, "fkl")
    p16 = {
        k: None if v is None else v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in p.items()
    }
    got = chunked_divergence(**p16, kind="fkl", vocab_size=VOCAB, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=5e-2, atol=0)
    got.backward()
    assert p16["student_head"].grad.dtype == torch.bfloat16


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_full_logits_in_forward_or_backward() -> None:
    n, chunk = 64, 8  # N * V (64 * 37) is far above chunk * V, N * H and V * H
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(n, HS, generator=gen, requires_grad=True)
    w = torch.randn(VS, HS, generator=gen, requires_grad=True)
    th, tw = torch.randn(n, HT, generator=gen), torch.randn(VT, HT, generator=gen)
    targets = torch.randint(0, VS, (n,), generator=gen)
    bound = max(chunk * VT, n * HT, VT * HT)
    assert bound < n * VOCAB

    with _LargestTensor() as probe:
        chunked_divergence(h, w, th, tw, torch.ones(n), "jsd", vocab_size=VOCAB, chunk_size=chunk).backward()
        chunked_cross_entropy(h, w, targets, chunk_size=chunk).backward()
    assert probe.numel <= bound

    plain = torch.log_softmax(h @ w.t(), dim=-1).sum()  # full logits (n, VS), built outside the probe
    with _LargestTensor() as probe:  # the probe sees backward ops too: the plain backward is caught
        plain.backward()
    assert probe.numel >= n * VS


def test_chunked_divergence_errors() -> None:
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match="vocab_size 41"):
        chunked_divergence(**p, kind="fkl", vocab_size=41)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        chunked_divergence(**p, kind="kl", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence(**p, kind="jsd", vocab_size=VOCAB, beta=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, chunk_size=0)
    with pytest.raises(ValueError, match="weights are constants"):
        chunked_divergence(
            **{**p, "weights": p["weights"].clone().requires_grad_(True)}, kind="fkl", vocab_size=VOCAB
        )
    with pytest.raises(ValueError, match="teacher_hidden"):
        chunked_divergence(**{**p, "teacher_hidden": p["teacher_hidden"][:5]}, kind="fkl", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="student_head"):
        chunked_divergence(**{**p, "student_head": p["student_head"][:, :5]}, kind="fkl", vocab_size=VOCAB)


def _ce_problem(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, HS, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(VS, HS, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(VS, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VS, (N,), generator=gen)
    targets[[1, 2, 9]] = IGNORE_INDEX
    weights = torch.rand(N, generator=gen, dtype=dtype)
    weights[[3, 4]] = 0.0
    return h, w, b, targets, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_cross_entropy_equals_plain(weighted: bool, chunk_size: int, dtype: torch.dtype) -> None:
    h, w, b, targets, weights = _ce_problem(dtype)
    weights = weights if weighted else None
    ce = F.cross_entropy(F.linear(h, w, b), targets, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
    ref = (ce if weights is None else weights * ce).sum()
    got = chunked_cross_entropy(h, w, targets, weights, chunk_size=chunk_size, bias=b)
    torch.testing.assert_close(got, ref, **_tol(dtype))
    for g, r in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=_tol(dtype)["atol"] * r.abs().max().item())


def test_chunked_cross_entropy_all_ignored_and_errors() -> None:
    h, w, _, targets, _ = _ce_problem(torch.float32, seed=1)
    got = chunked_cross_entropy(h, w, torch.full_like(targets, IGNORE_INDEX), chunk_size=4)
    assert got.item() == 0.0
    got.backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, w, targets[:4])
    with pytest.raises(ValueError, match="weights"):
        chunked_cross_entropy(h, w, targets, torch.ones(4))
