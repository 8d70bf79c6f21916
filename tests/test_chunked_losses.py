"""Chunked losses equal the plain formula (full logits) in value and gradients, and never build full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aligntI_patch.chunked_losses import (
    DEFAULT_CHUNK_ELEMENTS,
    MIN_STEP_CHUNK_ROWS,
    HeadGradSlot,
    SharedHeadGrad,
    chunk_rows,
    chunked_cross_entropy,
    chunked_divergence,
    step_chunk_rows,
)
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


def test_chunk_rows_from_the_element_budget() -> None:
    assert DEFAULT_CHUNK_ELEMENTS == 16_777_216  # a 64 MB fp32 [rows, V] block
    assert chunk_rows(151936, 1024) == 110  # Qwen's vocabulary: the budget binds
    assert chunk_rows(32000, 1024) == 524
    assert chunk_rows(32000, 100) == 100  # the row cap binds
    assert chunk_rows(10**9, 1024) == 1  # a vocabulary above the budget: still one row
    assert chunk_rows(37, 1024, 1) == 1
    assert chunk_rows(37, 1024, 36) == 1
    assert chunk_rows(37, 1024, 37 * 3 + 36) == 3  # floor
    assert chunk_rows(37, 2, 37 * 3) == 2
    for bad in ((0, 4, 4), (4, 0, 4), (4, 4, 0)):
        with pytest.raises(ValueError, match="chunk_rows"):
            chunk_rows(*bad)


# (chunk_size, chunk_elements) -> rows per chunk at VOCAB 37 (divergence) and VS 40 (cross-entropy)
BUDGETS = ((1024, 1), (1024, 2 * VS + 3), (3, 10**6), (1024, 10**6))  # 1 row, 2, 3, all 13 in one chunk


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_element_budget_many_chunks_equal_one_chunk_and_plain(kind: str) -> None:
    for dtype in (torch.float64, torch.float32):
        p = _problem(dtype, seed=9, bias=True)
        for chunk_size, elements in BUDGETS:
            got = chunked_divergence(**p, kind=kind, vocab_size=VOCAB, chunk_size=chunk_size,
                                     chunk_elements=elements)
            _assert_value_and_grads(got, _plain_divergence(p, kind), p, dtype)

        h, w, b, targets, weights = _ce_problem(dtype, seed=9)
        ce = F.cross_entropy(F.linear(h, w, b), targets, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
        ref = (weights * ce).sum()
        ref_grads = torch.autograd.grad(ref, (h, w, b))
        for chunk_size, elements in BUDGETS:
            got = chunked_cross_entropy(h, w, targets, weights, chunk_size=chunk_size, chunk_elements=elements,
                                        bias=b)
            torch.testing.assert_close(got, ref, **_tol(dtype))
            for g, r in zip(torch.autograd.grad(got, (h, w, b)), ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=_tol(dtype)["atol"] * r.abs().max().item())


@pytest.mark.parametrize(("chunk_size", "chunk_elements"), [(8, DEFAULT_CHUNK_ELEMENTS), (1024, 8 * VS)])
def test_no_full_logits_in_forward_or_backward(chunk_size: int, chunk_elements: int) -> None:
    n, chunk = 64, 8  # N * V (64 * 37) is far above chunk * V, N * H and V * H
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(n, HS, generator=gen, requires_grad=True)
    w = torch.randn(VS, HS, generator=gen, requires_grad=True)
    th, tw = torch.randn(n, HT, generator=gen), torch.randn(VT, HT, generator=gen)
    targets = torch.randint(0, VS, (n,), generator=gen)
    bound = max(chunk * VT, n * HT, VT * HT)
    assert bound < n * VOCAB

    with _LargestTensor() as probe:
        chunked_divergence(h, w, th, tw, torch.ones(n), "jsd", vocab_size=VOCAB, chunk_size=chunk_size,
                           chunk_elements=chunk_elements).backward()  # 8 rows: 320 // 37
        chunked_cross_entropy(h, w, targets, chunk_size=chunk_size, chunk_elements=chunk_elements).backward()
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
    with pytest.raises(ValueError, match="chunk_elements"):
        chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, chunk_elements=0)
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


# -- one head gradient for several terms (SharedHeadGrad) ---------------------------------------------------------


def _three_terms(p: dict, targets: torch.Tensor, sink: SharedHeadGrad | None, budget: int = 10**6) -> dict:
    """A cross-entropy over the full head and two divergences over its first VOCAB rows, on one student."""
    def slot(name: str) -> HeadGradSlot | None:
        return None if sink is None else sink.slot(name)

    h, w, b = p["student_hidden"], p["student_head"], p["student_bias"]
    div = {k: p[k] for k in ("teacher_hidden", "teacher_head", "teacher_bias")}
    return {
        "sft": chunked_cross_entropy(h, w, targets, chunk_elements=budget, bias=b, head_grad=slot("sft")),
        "kd": chunked_divergence(h, w, weights=p["weights"], kind="fkl", vocab_size=VOCAB, chunk_elements=budget,
                                 student_bias=b, head_grad=slot("kd"), **div),
        "iva": chunked_divergence(h[:7], w, weights=p["weights"][:7], kind="jsd", vocab_size=VOCAB,
                                  chunk_elements=budget, student_bias=b, head_grad=slot("iva"),
                                  **{**div, "teacher_hidden": p["teacher_hidden"][:7]}),
    }


def _saved_head_sized(total: torch.Tensor) -> int:
    """Head-sized tensors ([>= VOCAB, HS]: the head or its first VOCAB rows) that the custom autograd nodes of
    ``total``'s graph hold until the backward."""
    seen, stack, count = set(), [total.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.endswith("Backward") and hasattr(node, "saved_tensors"):
            count += sum(t is not None and t.dim() == 2 and t.shape[0] >= VOCAB for t in node.saved_tensors)
        stack.extend(n for n, _ in node.next_functions)
    return count


COEF = {"sft": 0.3, "kd": 1.7, "iva": 0.05}


@pytest.mark.parametrize("budget", [VS, 10**6])  # one row per chunk, one chunk
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_head_gradient_equals_one_per_term(dtype: torch.dtype, budget: int) -> None:
    p = _problem(dtype, seed=10, bias=True)
    targets = torch.randint(0, VS, (N,), generator=torch.Generator().manual_seed(10))
    params = _student_params(p)
    ref = _three_terms(p, targets, None, budget)
    sink = SharedHeadGrad(p["student_head"], p["student_bias"], COEF)
    got = _three_terms(p, targets, sink, budget)
    got = sink.attach(got)
    for k in COEF:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)  # the same sums
    # the head's gradient is held once, not once per term
    assert _saved_head_sized(sum(got.values())) == 1
    assert _saved_head_sized(sum(ref.values())) == 3
    # any multiple of sum_k c_k S_k (loss scaling, world size), with the trainer's division by counts
    total = 4.0 * sum(c * got[k] for k, c in COEF.items())
    want = 4.0 * sum(c * ref[k] for k, c in COEF.items())
    for _ in range(2):  # the graph can be reused
        for g, r in zip(torch.autograd.grad(total, params, retain_graph=True),
                        torch.autograd.grad(want, params, retain_graph=True)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=_tol(dtype)["atol"] * r.abs().max().item())


def test_shared_head_gradient_refuses_other_combinations() -> None:
    p = _problem(torch.float64, seed=11)
    targets = torch.randint(0, VS, (N,), generator=torch.Generator().manual_seed(11))
    for combine in (lambda s: sum(s.values()), lambda s: s["kd"], lambda s: COEF["kd"] * s["kd"] + s["sft"]):
        sink = SharedHeadGrad(p["student_head"], None, COEF)
        got = sink.attach(_three_terms(p, targets, sink))
        with pytest.raises(RuntimeError, match="not one multiple"):
            torch.autograd.grad(combine(got), _student_params(p))


def test_shared_head_gradient_contract() -> None:
    p = _problem(torch.float64, seed=12)
    with pytest.raises(ValueError, match="positive and finite"):
        SharedHeadGrad(p["student_head"], None, {"kd": 0.0})
    sink = SharedHeadGrad(p["student_head"], None, COEF)
    sink.slot("kd")
    with pytest.raises(ValueError, match="taken already"):
        sink.slot("kd")
    with pytest.raises(ValueError, match="not among"):
        sink.slot("tpa")
    late = SharedHeadGrad(p["student_head"], None, COEF)
    late.attach({})
    with pytest.raises(ValueError, match="after attach"):
        late.slot("iva")
    other = SharedHeadGrad(p["student_head"].detach().clone().requires_grad_(True), None, COEF)
    with pytest.raises(ValueError, match="another head"):
        chunked_divergence(**p, kind="fkl", vocab_size=VOCAB, head_grad=other.slot("kd"))
    # a frozen head: no buffer, each term's hidden-state gradient as without the sink
    frozen = {**p, "student_head": p["student_head"].detach()}
    sink = SharedHeadGrad(frozen["student_head"], None, COEF)
    got = sink.attach({"kd": chunked_divergence(**frozen, kind="fkl", vocab_size=VOCAB, head_grad=sink.slot("kd"))})
    ref = chunked_divergence(**frozen, kind="fkl", vocab_size=VOCAB)
    (g,) = torch.autograd.grad(got["kd"], frozen["student_hidden"])
    (r,) = torch.autograd.grad(ref, frozen["student_hidden"])
    torch.testing.assert_close(g, r)


def _step_forward(dtype: torch.dtype = torch.float64):  # noqa: ANN202
    """A synthetic StepForward with all four terms: B=2, T=10 (4 visual, 2 instruction, 3 response positions)."""
    from aligntI_patch.candidates import CandidateRows
    from aligntI_patch.tpa import TPAForward
    from aligntI_patch.trainer import StepForward
    from llava.constants import TokenType

    gen = torch.Generator().manual_seed(13)
    B, T, M = 2, 10, 3
    types = torch.full((B, T), TokenType.TEMPLATE)
    types[:, 1:5], types[:, 5:7], types[:, 7:] = TokenType.VISUAL, TokenType.INSTRUCTION, TokenType.RESPONSE
    labels = torch.where(types == TokenType.RESPONSE, torch.randint(0, VOCAB, (B, T), generator=gen), IGNORE_INDEX)
    rows = CandidateRows(pos=torch.tensor([[8, 9, -1], [8, 8, 9]]), ids=torch.randint(0, VOCAB, (B, M), generator=gen),
                         weight=torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 1.0]]), gt_weight=torch.zeros(B, T))
    rows.gt_weight[0, 8] = 0.5
    s = torch.randn(B, T, HS, generator=gen, dtype=dtype, requires_grad=True)
    t = torch.randn(B, T, HT, generator=gen, dtype=dtype)
    s_cand = torch.randn(B, M, HS, generator=gen, dtype=dtype, requires_grad=True)
    tpa = TPAForward(rows, s, s_cand, t, torch.randn(B, M, HT, generator=gen, dtype=dtype))
    head = torch.randn(VS, HS, generator=gen, dtype=dtype, requires_grad=True)
    t_head = torch.randn(VT, HT, generator=gen, dtype=dtype)
    return StepForward(labels, types, s, t, None, tpa, True), head, t_head


def test_loss_term_sums_with_coefficients_shares_the_head_gradient() -> None:
    from aligntI_patch.trainer import loss_term_sums

    fwd, head, t_head = _step_forward()
    enabled = {"sft", "kd", "iva", "tpa"}
    coef = {"sft": 0.5 / 6, "kd": 1.0 / 6, "iva": 0.7 / 2, "tpa": 0.9 / 6}  # weight / global count
    params = [fwd.student_hidden, fwd.tpa.student_cand, head]

    def sums(coefficients: dict | None, elements: int) -> dict:
        return loss_term_sums(fwd, head, t_head, enabled, "fkl", VOCAB, 1024, "uniform", False, elements,
                              coefficients, temperature=1.0)

    ref = sums(None, 10**6)
    want = torch.autograd.grad(sum(c * ref[k] for k, c in coef.items()), params)
    for elements in (1, 10**6):  # one row per chunk, one chunk
        got = sums(coef, elements)
        assert set(got) == enabled
        for k in enabled:
            assert float(ref[k].detach()) > 0, k
            torch.testing.assert_close(got[k], ref[k], msg=k)
        assert _saved_head_sized(sum(got.values())) == 1  # one head gradient held, not four
        for g, r in zip(torch.autograd.grad(2.0 * sum(c * got[k] for k, c in coef.items()), params), want):
            torch.testing.assert_close(g, 2.0 * r)
    got = sums(coef, 10**6)
    with pytest.raises(RuntimeError, match="not one multiple"):
        torch.autograd.grad(sum(got.values()), params)


def test_step_chunk_rows_never_exceed_the_response_terms_own():
    """IVA's visual rows and TPA's candidate rows come in chunks no larger than the response rows (floor 64)."""
    assert step_chunk_rows(64, 32000, 1024) == 64  # CPU bench shape: 729 IVA rows in 12 chunks, not 524 + 205
    assert step_chunk_rows(10, 32000, 1024) == MIN_STEP_CHUNK_ROWS  # few response rows: the floor
    assert step_chunk_rows(900, 151936, 1024) == chunk_rows(151936, 1024)  # real sizes: the element budget rules
    assert step_chunk_rows(900, 32000, 300) == 300  # and the row cap
