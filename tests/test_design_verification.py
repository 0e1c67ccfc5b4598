"""Designs prove their numbers before they are chosen (``moca_kernels._verify``,
``moca_kernels.varlen_attention.verify``): a design whose results are perturbed is rejected with a
warning that names it and its numbers, once per process, while the correct designs still compete;
where every design fails, the call runs the PyTorch reference. In the interpreter, with autotuning
left on as users run it (conftest turns it off for the rest of the suite)."""
from __future__ import annotations

import warnings

import pytest
import torch

from moca_kernels import _verify, varlen_attention
from moca_kernels.varlen_attention import reference, triton_kernels
from moca_kernels.varlen_attention import verify as design_verify

pytestmark = pytest.mark.skipif(not triton_kernels.triton_interpret() and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter or a GPU")

LENGTHS = [1, 17, 40, 0, 33]
HEAD_DIM = 64


@pytest.fixture
def fresh(monkeypatch):
    """Autotuning on, nothing chosen or warned about yet, and a record of the designs timed."""
    monkeypatch.delenv("MOCA_KERNELS_AUTOTUNE", raising=False)
    for kind in ("fwd", "bwd"):
        monkeypatch.delenv(triton_kernels.DESIGN_ENV[kind], raising=False)
    monkeypatch.setattr(triton_kernels, "_DESIGN_CHOICE", {})
    monkeypatch.setattr(triton_kernels, "_VERIFIED", {})
    monkeypatch.setattr(_verify, "_WARNED", set())
    timed = []

    def time_designs(names, run):  # the interpreter times nothing; record who would compete
        timed.append(list(names))
        return {name: float(i) for i, name in enumerate(names)}

    monkeypatch.setattr(triton_kernels, "_time_designs", time_designs)
    return timed


def _problem(lengths=LENGTHS, seed=0):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, h, HEAD_DIM, generator=g).to(device) for h in (4, 2, 2, 4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, dout, cu


def _perturb(monkeypatch, name: str, bad: str, index: int, rows: slice):
    """Make design ``bad`` of ``triton_kernels.<name>`` return output ``index`` off by 0.05 on ``rows``."""
    real = getattr(triton_kernels, name)

    def wrong(design, *args, **kwargs):
        result = list(real(design, *args, **kwargs))
        if design == bad:
            result[index] = result[index].clone()
            result[index][rows] += 0.05
        return tuple(result)

    monkeypatch.setattr(triton_kernels, name, wrong)


def _run(q, k, v, dout, cu):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*leaves, cu, backend="triton")
    return out, torch.autograd.grad(out, leaves, dout)


def _reference(q, k, v, dout, cu):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = reference.varlen_attention_reference(*leaves, cu, cu, HEAD_DIM ** -0.5)
    return out, torch.autograd.grad(out, leaves, dout)


def _numerics_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, _verify.KernelNumericsWarning)]


def _assert_matches_reference(problem, out, grads):
    ref_out, ref_grads = _reference(*problem)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def _verdict(kind):
    (verdict,) = [v for key, v in triton_kernels._VERIFIED.items() if key[0] == kind]
    return verdict


@pytest.mark.parametrize("bad,rows", [("short", slice(20, 22)), ("wide", slice(0, 1))])
def test_a_wrong_forward_design_is_rejected_and_the_others_compete(fresh, monkeypatch, bad, rows):
    offered = triton_kernels.offered("fwd", HEAD_DIM)
    assert bad in offered and len(offered) > 1
    _perturb(monkeypatch, "_forward", bad, 0, rows)
    problem = _problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _run(*problem)
        _run(*problem)  # the same shape class again: nothing checked or warned twice
    said = _numerics_warnings(caught)
    assert len(said) == 1 and f"design {bad!r}" in said[0] and "out error" in said[0], said
    assert _verdict("fwd") == {"passed": [d for d in offered if d != bad], "rejected": [bad]}
    left = [d for d in offered if d != bad]
    assert all(bad not in names for names in fresh), "a rejected design was timed"
    assert len(left) == 1 or left in fresh, "the designs left did not compete"
    assert [d for key, d in triton_kernels._DESIGN_CHOICE.items() if key[0] == "fwd"] == left[:1]
    _assert_matches_reference(problem, out, grads)


def test_a_wrong_backward_design_is_rejected(fresh, monkeypatch):
    offered = triton_kernels.offered("bwd", HEAD_DIM)
    assert "atomic" in offered and len(offered) > 1
    _perturb(monkeypatch, "_backward", "atomic", 1, slice(20, 21))  # dK of a row of the longest document
    problem = _problem(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _run(*problem)
    said = _numerics_warnings(caught)
    assert len(said) == 1 and "bwd design 'atomic'" in said[0] and "dk error" in said[0], said
    assert _verdict("bwd") == {"passed": [d for d in offered if d != "atomic"], "rejected": ["atomic"]}
    assert [d for d in offered if d != "atomic"] in fresh
    _assert_matches_reference(problem, out, grads)


def test_a_fault_outside_the_sample_is_caught_by_the_trusted_design(fresh, monkeypatch):
    # Documents longer than the sample allows: the sample is the last rows of one document (dQ
    # only), so a wrong dV elsewhere is found by the whole-call comparison with the trusted design.
    monkeypatch.setattr(design_verify, "SAMPLE_ROWS", 16)
    monkeypatch.setattr(design_verify, "PARTIAL_ROWS", 8)
    lengths = [20, 40, 33]
    s = design_verify.sample(_problem(lengths)[4], _problem(lengths)[4], 4, 2)
    assert not s.whole and s.q_rows.tolist() == list(range(12, 20))
    _perturb(monkeypatch, "_backward", "fused", 2, slice(50, 51))
    problem = _problem(lengths, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _run(*problem)
    said = _numerics_warnings(caught)
    assert len(said) == 1 and "'fused'" in said[0] and "dv differs from the trusted design" in said[0], said
    _assert_matches_reference(problem, out, grads)


def test_when_every_design_fails_the_call_runs_the_reference(fresh, monkeypatch):
    for design in triton_kernels.offered("fwd", HEAD_DIM):  # the same error in the sample's first document
        _perturb(monkeypatch, "_forward", design, 0, slice(0, 1))
    problem = _problem(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _run(*problem)
    assert len(_numerics_warnings(caught)) == len(triton_kernels.offered("fwd", HEAD_DIM))
    assert _verdict("fwd")["passed"] == [] and None in triton_kernels._DESIGN_CHOICE.values()
    _assert_matches_reference(problem, out, grads)


def test_correct_designs_all_pass_and_verification_can_be_turned_off(fresh, monkeypatch):
    problem = _problem(seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(*problem)
    assert _numerics_warnings(caught) == []
    assert _verdict("fwd")["rejected"] == [] and _verdict("bwd")["rejected"] == []
    monkeypatch.setattr(triton_kernels, "_DESIGN_CHOICE", {})
    monkeypatch.setattr(triton_kernels, "_VERIFIED", {})
    monkeypatch.setenv(_verify.VERIFY_ENV, "0")
    _perturb(monkeypatch, "_forward", triton_kernels.offered("fwd", HEAD_DIM)[0], 0, slice(1, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(*problem)
    assert _numerics_warnings(caught) == [] and triton_kernels._VERIFIED == {}


def test_the_rule_allows_twice_plain_error_plus_a_floor():
    ref = torch.tensor([1.0, -2.0, float("-inf")], dtype=torch.float64)
    plain = torch.tensor([1.01, -2.0, float("-inf")])
    allowed = _verify.bound(ref, plain)
    floor = _verify.FLOOR_ULPS * torch.finfo(torch.float32).eps * 2
    assert allowed == pytest.approx(0.02 + floor, rel=1e-6)
    assert _verify.disagreement("d", {"x": ref + 0.019}, {"x": ref}, {"x": plain}) is None
    said = _verify.disagreement("d", {"x": ref + 0.03}, {"x": ref}, {"x": plain})
    assert said.startswith("d: x error 0.03 > allowed 0.02")
    assert _verify.error(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")


@pytest.mark.parametrize("causal", [False, True])
def test_the_closed_form_reference_backward_is_autograds(causal):
    # The check and the fallback take gradients in closed form (a custom op's implementation runs
    # below autograd): equal to autograd through the reference forward, empty documents, GQA and
    # the lse's gradient included.
    g = torch.Generator().manual_seed(int(causal))
    cu_q = torch.tensor([0, 3, 3, 8, 15], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6, 9], dtype=torch.int32)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64).requires_grad_() for n, h in
               ((15, 4), (9, 2), (9, 2)))
    out, lse = reference.varlen_attention_reference(q, k, v, cu_q, cu_k, 0.3, causal)
    dout, dlse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g)
    seen = torch.isfinite(lse)
    want = torch.autograd.grad([out, torch.where(seen, lse, 0.0)], [q, k, v], [dout, dlse])
    got = reference.varlen_attention_reference_backward(dout, dlse, q.detach(), k.detach(), v.detach(), cu_q, cu_k,
                                                        0.3, causal)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.fixture
def fresh_pointwise(monkeypatch):
    monkeypatch.setattr(_verify, "_TRUSTED", {})
    monkeypatch.setattr(_verify, "_WARNED", set())
    return _verify


def _perturbed(monkeypatch, name: str, index: int | None):
    """Make ``pointwise.triton_kernels.<name>`` return its output ``index`` (None: its only one) off by 0.05."""
    from moca_kernels.pointwise import triton_kernels as kernels
    real = getattr(kernels, name)

    def wrong(*args, **kwargs):
        result = real(*args, **kwargs)
        if index is None:
            return result + 0.05
        return tuple(r + 0.05 if i == index else r for i, r in enumerate(result))

    monkeypatch.setattr(kernels, name, wrong)


@pytest.mark.parametrize("op,kernel,index", [("rms_norm", "rms_norm_forward", 0),
                                             ("rms_norm", "rms_norm_backward", 1),
                                             ("swiglu", "swiglu_backward", 0),
                                             ("rotary_embedding", "rotary", 1)])
def test_a_wrong_pointwise_kernel_is_not_used(fresh_pointwise, monkeypatch, op, kernel, index):
    from moca_kernels import pointwise
    from moca_kernels.pointwise import reference as pointwise_reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(3, 70, 48, generator=g).to(device) for _ in range(2))
    weight, cos, sin = torch.randn(48, generator=g).to(device), *(torch.randn(210, 48, generator=g).to(device)
                                                                   for _ in range(2))
    calls = {"rms_norm": (lambda x, y: pointwise.rms_norm(x, weight, backend="triton"),
                          lambda x, y: pointwise_reference.rms_norm_reference(x, weight, 1e-6)[0]),
             "swiglu": (lambda x, y: pointwise.swiglu(x, y, backend="triton"), pointwise_reference.swiglu_reference),
             "rotary_embedding": (
                 lambda x, y: torch.cat(pointwise.rotary_embedding(x.view(210, 1, 48), y.view(210, 1, 48), cos, sin,
                                                                    backend="triton"), 1),
                 lambda x, y: torch.cat(pointwise_reference.rotary_embedding_reference(
                     x.view(210, 1, 48), y.view(210, 1, 48), cos, sin), 1))}
    ours, theirs = calls[op]

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, y)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        return out, [gr if gr is not None else torch.zeros_like(x) for gr in grads]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(ours)  # a correct kernel passes and is remembered as such
    assert _numerics_warnings(caught) == [] and list(fresh_pointwise._TRUSTED.values()) == [True]
    fresh_pointwise._TRUSTED.clear()
    _perturbed(monkeypatch, kernel, index)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = run(ours)
        run(ours)
    said = _numerics_warnings(caught)
    assert len(said) == 1 and said[0].startswith(f"{op}: the fused kernel is not used"), said
    assert list(fresh_pointwise._TRUSTED.values()) == [False]
    want, want_grads = run(theirs)
    for got, ref in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got, ref)


def test_a_wrong_mae_kernel_is_not_used(fresh_pointwise, monkeypatch):
    from moca_kernels import mae_loss
    from moca_kernels.mae_loss import reference as mae_reference
    from moca_kernels.mae_loss import triton_kernels as kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    pred, target = (torch.randn(150, 48, generator=g).to(device) for _ in range(2))
    mask = torch.arange(150, device=device) % 3 != 0

    def run(fn):
        leaf = pred.clone().requires_grad_()
        loss = fn(leaf, target, mask, True, 1e-6, "mean")
        return loss, torch.autograd.grad(loss, leaf)[0]

    ours = lambda p, t, m, norm, eps, red: mae_loss(p, t, mask=m, norm_pix=norm, eps=eps, reduction=red,  # noqa: E731
                                                     backend="triton")
    real = kernels.mae_rows
    monkeypatch.setattr(kernels, "mae_rows", lambda *a: (lambda r: (r[0], r[1] * 1.01))(real(*a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grad = run(ours)
        run(ours)
    said = _numerics_warnings(caught)
    assert len(said) == 1 and said[0].startswith("mae_loss: the fused kernel is not used") and "grad0" in said[0]
    want, want_grad = run(mae_reference.mae_loss_reference)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("how", ["deterministic", "environment"])
def test_a_design_forced_by_determinism_or_the_environment_is_checked_too(fresh, monkeypatch, how):
    _perturb(monkeypatch, "_backward", "split", 0, slice(20, 21))
    if how == "environment":
        monkeypatch.setenv(triton_kernels.DESIGN_ENV["bwd"], "split")
    problem = _problem(seed=7)
    leaves = [x.clone().requires_grad_() for x in problem[:3]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = varlen_attention(*leaves, problem[4], backend="triton", deterministic=how == "deterministic")
        grads = torch.autograd.grad(out, leaves, problem[3])
    said = _numerics_warnings(caught)
    assert len(said) == 1 and "bwd design 'split'" in said[0], said
    _assert_matches_reference(problem, out, grads)  # the reference served, not the wrong design
