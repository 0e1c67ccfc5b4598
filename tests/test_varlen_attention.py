"""varlen_attention: the Triton path against the PyTorch reference, forward and every gradient
(through the output and through lse), on fresh random inputs; bad inputs; opcheck; torch.compile."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moca_kernels import varlen_attention
from moca_kernels.varlen import lengths_to_cu_seqlens
from moca_kernels.varlen_attention import triton_kernels
from moca_kernels.varlen_attention.op import varlen_attention_bwd, varlen_attention_fwd

LENGTHS = [0, 1, 17, 129, 300]
# Largest error allowed against the float64 reference, relative to the reference's largest value.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def make_problem(lens_q, lens_k, hq, hkv, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(sum(lens_q), hq, dim), rand(sum(lens_k), hkv, dim), rand(sum(lens_k), hkv, dim)
    dout = torch.randn(sum(lens_q), hq, dim, generator=gen).to(device=device, dtype=dtype)
    dlse = torch.randn(hq, sum(lens_q), generator=gen).to(device)
    return q, k, v, lengths_to_cu_seqlens(lens_q, device), lengths_to_cu_seqlens(lens_k, device), dout, dlse


def run(q, k, v, cu_q, cu_k, dout, dlse, **kwargs):
    """Output, lse and the gradients of q, k, v of ``<out, dout> + <lse, dlse>`` (rows with
    lse = -inf left out of the second term)."""
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    finite = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (torch.where(finite, lse, 0.0).double() * dlse.double()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads


def reference64(q, k, v, cu_q, cu_k, dout, dlse, **kwargs):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return run(*leaves, cu_q, cu_k, dout, dlse, backend="torch", **kwargs)


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    if not expected.numel():
        return
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"


def check_against_reference(lens_q, lens_k, hq, hkv, dim, dtype, device, causal, seed=0, **kwargs):
    problem = make_problem(lens_q, lens_k, hq, hkv, dim, dtype, device, seed)
    out, lse, grads = run(*problem, causal=causal, backend="triton", **kwargs)
    ref_out, ref_lse, ref_grads = reference64(*problem, causal=causal)
    assert out.dtype == dtype and out.shape == problem[0].shape
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lens_q))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without keys differ"
    finite = torch.isfinite(ref_lse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse[finite], ref_lse[finite], dtype, "lse")
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, ref, dtype, f"d{name}")
    return out, lse, grads


def use_designs(monkeypatch, fwd: str, bwd: str) -> None:
    monkeypatch.setenv(triton_kernels.DESIGN_ENV["fwd"], fwd)
    monkeypatch.setenv(triton_kernels.DESIGN_ENV["bwd"], bwd)


# Each backward design with one forward design: (wide, atomic), (short, split), (wide, fused).
DESIGN_PAIRS = [(triton_kernels.DESIGNS["fwd"][i % len(triton_kernels.DESIGNS["fwd"])], bwd)
                for i, bwd in enumerate(triton_kernels.DESIGNS["bwd"])]


def _reference_cases():
    """hdim 64/80/128 x causal x (fp32, fp16) with two heads, each under one pair of designs,
    alternating so that every pair meets every head dim and dtype, causal and not; GQA 8:1 on the
    same grid at hdim 64, and once per pair at hdim 80 and 128 (the interpreter is slow: these
    few cover what the head layout changes)."""
    cases = []

    def add(dim, heads, causal, dtype, designs):
        layout = "gqa8" if heads == (8, 1) else "mha"
        name = f"{dim}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-{'-'.join(designs)}"
        cases.append(pytest.param(dim, heads, causal, dtype, designs, id=name))

    for i, dim in enumerate([64, 80, 128]):
        for causal in (False, True):
            for j, dtype in enumerate((torch.float32, torch.float16)):
                designs = DESIGN_PAIRS[(i + causal + j) % len(DESIGN_PAIRS)]
                add(dim, (2, 2), causal, dtype, designs)
                if dim == 64:
                    add(dim, (8, 1), causal, dtype, designs)
    add(80, (8, 1), True, torch.float16, DESIGN_PAIRS[0])
    add(128, (8, 1), False, torch.float16, DESIGN_PAIRS[1])
    return cases


@pytest.mark.parametrize("dim,heads,causal,dtype,designs", _reference_cases())
def test_matches_reference(dim, heads, causal, dtype, designs, device, monkeypatch):
    use_designs(monkeypatch, *designs)
    check_against_reference(LENGTHS, LENGTHS, *heads, dim, dtype, device, causal, seed=dim + causal)


def test_choose_design_times_once_and_remembers(monkeypatch):
    # On a GPU with autotuning on: each design of a shape class is timed once, the fastest kept
    # (also for later calls, CUDA-graph capture included); the environment and determinism override.
    import triton.testing
    monkeypatch.setattr(triton_kernels, "triton_interpret", lambda: False)
    monkeypatch.setattr(triton_kernels, "autotune_off", lambda: False)
    monkeypatch.setattr(triton_kernels, "_DESIGN_CHOICE", {})
    timed = []
    speed = {"atomic": 3.0, "split": 2.0}

    def fake_do_bench(fn, return_mode):
        return speed[fn()]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)

    def run(design):
        timed.append(design)
        return design

    names = ("atomic", "split")
    choose = lambda *args, **kw: triton_kernels.choose_design(*args, **kw)[0]  # noqa: E731
    assert choose("bwd", names, ("k",), run) == "split"
    assert timed == ["atomic", "split"]
    assert choose("bwd", names, ("k",), run) == "split" and len(timed) == 2
    speed.update(atomic=1.0)
    assert choose("bwd", names, ("other",), run) == "atomic"
    assert choose("bwd", names, ("k",), run, forced="atomic") == "atomic"
    monkeypatch.setenv(triton_kernels.DESIGN_ENV["bwd"], "atomic")
    assert choose("bwd", names, ("k",), run) == "atomic" and len(timed) == 4
    assert "split" in triton_kernels.tuning_report()["designs"].values()


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_design_names_are_checked(kind, device, monkeypatch):
    monkeypatch.setenv(triton_kernels.DESIGN_ENV[kind], "no-such-design")
    problem = make_problem([5, 9], [5, 9], 2, 1, 64, torch.float32, device, seed=18)
    with pytest.raises(ValueError, match=f"{triton_kernels.DESIGN_ENV[kind]}='no-such-design'"):
        run(*problem, backend="triton")


def test_each_design_runs_its_own_kernels(device, monkeypatch):
    # The forced design is the one launched: the short forward's one loop, the split backward's dQ
    # kernel, the fused backward's single kernel.
    seen = []
    for name in ("_fwd", "_bwd", "_bwd_dq", "_bwd_fused"):
        tuner = getattr(triton_kernels, name)
        monkeypatch.setattr(tuner, "run", lambda *a, _run=tuner.run, _name=name, **kw: seen.append(
            (_name, kw.get("ONE_LOOP", kw.get("ATOMIC_DQ")))) or _run(*a, **kw))
    problem = make_problem([5, 70], [5, 70], 2, 1, 64, torch.float32, device, seed=19)
    for fwd, bwd in DESIGN_PAIRS:
        use_designs(monkeypatch, fwd, bwd)
        seen.clear()
        run(*problem, backend="triton")
        expected = [("_fwd", fwd == "short")]
        expected += [("_bwd_fused", None)] if bwd == "fused" else [("_bwd", bwd == "atomic")]
        expected += [("_bwd_dq", None)] if bwd == "split" else []
        assert seen == expected


def test_designs_on_offer():
    # A design serves a head dim only where each of its kernels has a candidate whose products
    # all fit wgmma: hdim 136 (128 + a padded 16) has no atomic candidate, large dims no short forward.
    assert triton_kernels.offered("fwd", 128) == ("wide", "short")
    assert triton_kernels.offered("fwd", 256) == ("wide",)
    assert triton_kernels.offered("bwd", 128) == ("atomic", "split", "fused")
    assert triton_kernels.offered("bwd", 136) == ("split", "fused")
    assert [c[0] for c in triton_kernels.candidates("bwd", "atomic", 80)] == [64]
    # 64-row backward steps spill at hdim 96 and 128: those take 32-row steps, and hdim 96 (whose
    # second piece of 32 columns is too narrow for the dQ^T product) has no atomic backward.
    assert {c[0] for c in triton_kernels.candidates("bwd", "atomic", 128)} == {32}
    assert {c[0] for c in triton_kernels.candidates("bwd", "split", 128)} == {32}
    assert {c[0] for c in triton_kernels.candidates("bwd", "split", 96)} == {32}
    assert triton_kernels.offered("bwd", 96) == ("split", "fused")


@pytest.mark.parametrize("dim", [8, 40, 96, 136, 200, 256])
def test_other_head_dims(dim, device):
    # 8: below the smallest dot operand; 40, 200: split with a padded remainder; 96: 64 + 32; 136: no
    # atomic backward on offer; 256: the largest
    check_against_reference([1, 33, 70], [1, 33, 70], 2, 1, dim, torch.float32, device, causal=False, seed=dim)


@pytest.mark.parametrize("causal", [False, True])
def test_key_documents_differ_from_query_documents(causal, device):
    # Empty query documents with keys, documents without keys (their rows give 0 and lse -inf),
    # and, causal, more queries than keys (their first rows see no key).
    out, lse, _ = check_against_reference([3, 0, 50, 20, 9], [5, 7, 0, 33, 2], 4, 2, 64, torch.float32, device, causal)
    no_keys = slice(3, 53)
    assert torch.all(out[no_keys] == 0) and torch.all(torch.isneginf(lse[:, no_keys]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", [([150, 70], [200, 20]), ([200, 20], [130, 90])])
def test_unequal_documents_over_several_blocks(lens_q, lens_k, causal, device):
    check_against_reference(lens_q, lens_k, 2, 1, 64, torch.float32, device, causal, seed=sum(lens_q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_strongly_negative_scores_keep_gradients_finite(dtype, deterministic, device):
    # One-key documents whose score is far below 0 (lse << 0): the padding keys of their partial
    # key block must not turn exp(-lse) into inf and then NaN in dQ.
    lens = [1, 1, 3]
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(5, 1, 64, generator=gen)
    scale = -120.0 if dtype == torch.float32 else -15.0
    q = (scale * 8 * k / (k * k).sum(-1, keepdim=True)).to(dtype)  # score q.k / sqrt(64) = scale
    k, v = k.to(dtype), torch.randn(5, 1, 64, generator=gen).to(dtype)
    q, k, v = (x.to(device).requires_grad_() for x in (q, k, v))
    cu = lengths_to_cu_seqlens(lens, device)
    dout = torch.randn(5, 1, 64, generator=gen).to(device=device, dtype=dtype)
    out, lse, grads = run(q, k, v, cu, cu, dout, torch.zeros(1, 5, device=device), backend="triton",
                          deterministic=deterministic)
    assert lse[0, :2].max() < -10, "the case must have strongly negative scores"
    ref_grads = reference64(q, k, v, cu, cu, dout, torch.zeros(1, 5, device=device))[2]
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        assert_close(g, ref, dtype, f"d{name}")


def test_nan_lse_gradient_on_rows_without_keys_is_ignored(device):
    # Causal with more queries than keys: the first rows see no key (lse = -inf). A NaN gradient
    # arriving there (as from merging partial attention states) must not reach q, k or v.
    q, k, v, cu_q, cu_k, dout, dlse = make_problem([40], [25], 2, 1, 64, torch.float32, device, seed=14)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True, backend="triton")
    assert torch.isneginf(lse[:, :15]).all()
    dlse = torch.where(torch.isneginf(lse), float("nan"), dlse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    assert all(torch.isfinite(g).all() for g in grads)


def test_only_lse_used(device):
    # The output's gradient never arrives (None): the backward must still give lse's gradient.
    q, k, v, cu, _, _, dlse = make_problem([30, 70], [30, 70], 2, 1, 64, torch.float32, device, seed=12)
    grads = torch.autograd.grad((varlen_attention(q, k, v, cu, return_lse=True, backend="triton")[1] * dlse).sum(),
                                (q, k, v), allow_unused=True)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_lse = varlen_attention(*leaves, cu, return_lse=True, backend="torch")[1]
    ref_grads = torch.autograd.grad((ref_lse * dlse.double()).sum(), leaves, allow_unused=True)
    for name, g, ref in zip("qkv", grads, ref_grads):
        ref = torch.zeros_like(leaves[0 if name == "q" else 1]) if ref is None else ref
        assert g is not None, f"d{name} missing"
        assert_close(g, ref, torch.float32, f"d{name}")


class _OpLog(TorchDispatchMode):
    """The aten operators that run while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _count_tile_builds(monkeypatch) -> list:
    built = []
    original = triton_kernels.build_tiles
    monkeypatch.setattr(triton_kernels, "build_tiles", lambda *a: built.append(a[3]) or original(*a))
    return built


# The torch operators that build a tile list (the Triton interpreter adds copies of its own).
TILE_OPS = {"aten.sort", "aten.cumsum", "aten.searchsorted", "aten.arange", "aten.where", "aten.index"}


@pytest.mark.parametrize("bwd", triton_kernels.DESIGNS["bwd"])
def test_repeated_calls_launch_no_tile_building(bwd, device, monkeypatch):
    # Every layer of a model calls with the same cu_seqlens: only the first call reads and tiles
    # them; later forwards and backwards (over every tiling the backward design uses) run the
    # attention kernels alone.
    use_designs(monkeypatch, "wide", bwd)
    built = _count_tile_builds(monkeypatch)
    q, k, v, cu, _, dout, _ = make_problem([40, 0, 90], [40, 0, 90], 4, 2, 64, torch.float32, device, seed=16)
    first = run(q, k, v, cu, cu, dout, torch.zeros(4, 130, device=device), backend="triton")
    tilings = len(built)
    assert tilings >= 2, "the forward and the dK/dV kernel tile differently"
    out = varlen_attention(q, k, v, cu, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(built) == tilings, "a repeated call built tile lists again"
    torch.testing.assert_close(out, first[0], rtol=0, atol=0)
    for g, g_first in zip(grads, first[2]):
        torch.testing.assert_close(g, g_first, rtol=1e-6, atol=1e-6)
    # Below the op: what runs besides the kernels, on a first and on a repeated call.
    memo = {}
    for call in ("first", "repeated"):
        log = _OpLog()
        with log:
            o, lse = triton_kernels.forward(q.detach(), k.detach(), v.detach(), cu, cu, 0.125, False, memo)
            triton_kernels.backward(dout, None, q.detach(), k.detach(), v.detach(), o, lse, cu, cu, 0.125, False,
                                    False, memo)
        tile_work = TILE_OPS & set(log.ops)
        if call == "first":
            assert tile_work, "the op log must see the tile lists being built"
        else:
            assert not tile_work, f"a repeated call ran tile-building operators {sorted(tile_work)}"


def test_in_place_change_of_cu_seqlens_is_seen(device, monkeypatch):
    built = _count_tile_builds(monkeypatch)
    q, k, v, cu, _, _, _ = make_problem([40, 60], [40, 60], 2, 1, 64, torch.float32, device, seed=13)
    before = varlen_attention(q, k, v, cu, backend="triton")
    varlen_attention(q, k, v, cu, backend="triton")
    assert len(built) == 1
    cu[1] = 70  # tracked by the version counter: the documents are checked and tiled again
    after = varlen_attention(q, k, v, cu, backend="triton")
    assert len(built) == 2
    ref = varlen_attention(q.double(), k.double(), v.double(), cu, backend="torch")
    assert_close(after, ref, torch.float32, "out after the change")
    assert (after - before).abs().max() > 1e-3
    cu[1] = 101
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        varlen_attention(q, k, v, cu, backend="triton")


def test_cache_entries_go_with_their_tensors(device):
    from moca_kernels.varlen_attention.op import _CACHE
    q, k, v, _, _, _, _ = make_problem([10, 20], [10, 20], 2, 1, 16, torch.float32, device, seed=17)
    before = len(_CACHE)
    cu = lengths_to_cu_seqlens([10, 20], device)
    varlen_attention(q, k, v, cu, backend="triton")
    assert len(_CACHE) == before + 1
    del cu
    assert len(_CACHE) == before


def spy_tma(monkeypatch) -> dict[str, list]:
    """Turn TMA on and record what each request for descriptors got: K/V loads, the dQ reduce."""
    monkeypatch.setenv(triton_kernels.TMA_ENV, "1")
    used = {"load": [], "reduce": []}
    original = triton_kernels._tma_descriptors

    def spy(*args, **kwargs):
        descriptors = original(*args, **kwargs)
        used["reduce" if kwargs.get("reduce") else "load"].append(descriptors)
        return descriptors

    monkeypatch.setattr(triton_kernels, "_tma_descriptors", spy)
    return used


@pytest.mark.parametrize("dim,heads", [(64, (4, 1)), (80, (4, 2)), (72, (2, 1)), (128, (2, 2))])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward(dim, heads, causal, device, monkeypatch):
    # Opt-in TMA loads of K/V: blocks past a document read the next one's rows (or zeros past the
    # end); they must still get probability 0. 72 pads its second piece into the next head.
    used = spy_tma(monkeypatch)
    check_against_reference([0, 1, 17, 129, 60], [3, 1, 17, 129, 0], *heads, dim, torch.float16, device, causal,
                            seed=dim)
    assert used["load"] and all(d is not None for d in used["load"]), "the TMA path was not taken"


def test_tma_keeps_non_finite_values_in_their_document_and_head(device, monkeypatch):
    # TMA reads whole blocks: rows of the next document and, for hdim 72, columns of the next head.
    # NaN in document 1's keys and values of KV head 1 must reach nothing else.
    monkeypatch.setenv(triton_kernels.TMA_ENV, "1")
    q, k, v, cu, _, _, _ = make_problem([30, 50], [30, 50], 4, 2, 72, torch.float16, device, seed=15)
    k, v = k.detach().clone(), v.detach().clone()
    k[30:, 1] = float("nan")
    v[30:, 1] = float("nan")
    out = varlen_attention(q.detach(), k, v, cu, backend="triton")
    ref = varlen_attention(q.detach().double(), k.double(), v.double(), cu, backend="torch")
    clean = torch.isfinite(ref)
    assert clean[:30].all() and clean[30:, :2].all() and not clean[30:, 2:].any()
    assert torch.isfinite(out[clean]).all()
    assert_close(out[clean], ref[clean], torch.float16, "out")


@pytest.mark.parametrize("dim,heads", [(64, (8, 1)), (80, (4, 2)), (72, (2, 1)), (128, (2, 2))])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_dq_reduce(dim, heads, causal, device, monkeypatch):
    # The atomic backward adds dQ by TMA bulk reduce-add of whole boxes: rows past a document
    # and (hdim 72) padding columns land in the next document's rows and the next head's columns.
    # hdim 128 runs 32-row query steps (the dQ^T product, transposed into the box), the others 64.
    use_designs(monkeypatch, "wide", "atomic")
    used = spy_tma(monkeypatch)
    check_against_reference(LENGTHS, LENGTHS, *heads, dim, torch.float16, device, causal, seed=dim + 1)
    assert used["reduce"] and all(d is not None for d in used["reduce"]), "dQ did not go through TMA"


def test_tma_dq_keeps_non_finite_values_in_their_document_and_head(device, monkeypatch):
    # NaN in document 1's keys of KV head 0 (query heads 0 and 1): the dQ boxes of its key blocks
    # cover document 2's first rows, and head 1's padding columns (hdim 72 = 64 + 16) are head 2's
    # first columns. Those, and everything else outside document 1's heads 0-1, stay finite and right.
    monkeypatch.setenv(triton_kernels.TMA_ENV, "1")
    use_designs(monkeypatch, "wide", "atomic")
    q, k, v, cu, _, dout, _ = make_problem([30, 50, 40], [30, 50, 40], 4, 2, 72, torch.float16, device, seed=16)
    k = k.detach().clone()
    k[30:80, 0] = float("nan")
    k.requires_grad_()
    dq = torch.autograd.grad((varlen_attention(q, k, v, cu, backend="triton") * dout).sum(), q)[0]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad((varlen_attention(qd, kd, vd, cu, backend="torch") * dout.double()).sum(), qd)[0]
    clean = torch.isfinite(ref)
    assert not clean[30:80, :2].any() and clean[:30].all() and clean[80:].all() and clean[:, 2:].all()
    assert torch.isfinite(dq[clean]).all()
    assert_close(dq[clean], ref[clean], torch.float16, "dq")


def test_tma_falls_back_where_rows_are_not_aligned(device, monkeypatch):
    # fp16 rows of 1 x 12 values are 24 bytes: TMA cannot read them, the pointer path does.
    monkeypatch.setenv(triton_kernels.TMA_ENV, "1")
    check_against_reference([9, 40], [9, 40], 2, 1, 12, torch.float16, device, causal=False)
    k = torch.zeros(49, 1, 12, dtype=torch.float16, device=device)
    assert triton_kernels._tma_descriptors(k, *triton_kernels.head_dim_split(12)) is None
    # float32 tiles would not fit in shared memory (compile_check): never TMA
    k = torch.zeros(49, 1, 64, dtype=torch.float32, device=device)
    assert triton_kernels._tma_descriptors(k, *triton_kernels.head_dim_split(64)) is None


def test_deterministic_backward(device, monkeypatch):
    # Bitwise equality of two runs only means something on a GPU (the interpreter runs atomics in
    # order); the comparison with the reference holds everywhere. deterministic=True takes the
    # split design (no atomics) even where the environment asks for the atomic one.
    monkeypatch.setenv(triton_kernels.DESIGN_ENV["bwd"], "atomic")
    designs = []
    original = triton_kernels._backward
    monkeypatch.setattr(triton_kernels, "_backward", lambda design, *a: designs.append(design) or original(design, *a))
    problem = make_problem([5, 140, 61], [5, 140, 61], 4, 2, 80, torch.float32, device, seed=3)
    first = run(*problem, backend="triton", deterministic=True)[2]
    second = run(*problem, backend="triton", deterministic=True)[2]
    assert designs == ["split", "split"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ref_grads = reference64(*problem)[2]
    for name, g, ref in zip("qkv", first, ref_grads):
        assert_close(g, ref, torch.float32, f"d{name}")


def test_deterministic_follows_torch_flag(device, monkeypatch):
    seen = []
    original = triton_kernels.backward

    def spy(*args):
        seen.append(args[-2])  # the deterministic flag (the last argument is the tile memo)
        return original(*args)

    problem = make_problem([20, 7], [20, 7], 2, 2, 64, torch.float32, device, seed=4)
    monkeypatch.setattr(triton_kernels, "backward", spy)
    torch.use_deterministic_algorithms(True)
    try:
        run(*problem, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    run(*problem, backend="triton")
    assert seen == [True, False]


def test_non_contiguous_inputs(device):
    # q, k, v as views into one fused projection, the layout a QKV linear produces.
    gen = torch.Generator().manual_seed(5)
    lens = [33, 1, 90]
    qkv = torch.randn(sum(lens), 3, 2, 64, generator=gen).to(device).requires_grad_()
    q, k, v = qkv.unbind(1)
    cu = lengths_to_cu_seqlens(lens, device)
    dout = torch.randn(sum(lens), 2, 64, generator=gen).to(device)
    out = varlen_attention(q, k, v, cu, backend="triton")
    (grad,) = torch.autograd.grad((out * dout).sum(), qkv)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = varlen_attention(*ref_qkv.unbind(1), cu, backend="torch")
    (ref_grad,) = torch.autograd.grad((ref * dout.double()).sum(), ref_qkv)
    assert_close(out, ref, torch.float32, "out")
    assert_close(grad, ref_grad, torch.float32, "dqkv")


def test_softmax_scale_and_max_seqlen(device):
    problem = make_problem([12, 40], [12, 40], 2, 1, 64, torch.float32, device, seed=6)
    q, k, v, cu, _, _, _ = problem
    out = varlen_attention(q, k, v, cu, None, 40, 40, softmax_scale=0.3, backend="triton")
    ref = varlen_attention(q.double(), k.double(), v.double(), cu, softmax_scale=0.3, backend="torch")
    assert_close(out, ref, torch.float32, "out")
    plain = varlen_attention(q, k, v, cu, backend="triton")
    assert (plain - out).abs().max() > 1e-3, "softmax_scale had no effect"
    with pytest.raises(ValueError, match="max_seqlen_q=39 is shorter than the longest document"):
        varlen_attention(q, k, v, cu, None, 39, backend="triton")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(0, 80), min_size=1, max_size=4),
    dim=st.sampled_from([16, 48, 64, 80]),
    heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_documents(lens, dim, heads, causal, seed, device):
    check_against_reference(lens, lens, *heads, dim, torch.float32, device, causal, seed=seed)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _good():
    q = torch.randn(10, 4, 64)
    k = torch.randn(10, 2, 64)
    return dict(q=q, k=k, v=torch.randn(10, 2, 64), cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32))


BAD = {
    "cu int64": (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), "cu_seqlens_q must be int32"),
    "cu 2-D": (dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)),
               r"cu_seqlens_q must have shape \(B\+1,\)"),
    "cu strided": (dict(cu_seqlens_q=torch.tensor([[0, 9], [4, 9], [10, 9]], dtype=torch.int32)[:, 0]),
                   "cu_seqlens_q must be contiguous"),
    "cu start": (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
    "cu decreasing": (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)),
                      "cu_seqlens_q must be non-decreasing"),
    "cu end": (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)),
               "cu_seqlens_q must end at the token count 10"),
    "cu_k end": (dict(cu_seqlens_k=torch.tensor([0, 4, 12], dtype=torch.int32)),
                 "cu_seqlens_k must end at the token count 10"),
    "cu_k count": (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), "cu_seqlens_k .* as many documents"),
    "gqa": (dict(k=torch.randn(10, 3, 64), v=torch.randn(10, 3, 64)),
            r"query heads of q \(4\) must be a positive multiple"),
    "head dim": (dict(q=torch.randn(10, 4, 264), k=torch.randn(10, 2, 264), v=torch.randn(10, 2, 264)),
                 "head_dim of q must be between 1 and 256"),
    "k head dim": (dict(k=torch.randn(10, 2, 32), v=torch.randn(10, 2, 32)), "k has head_dim 32, q has 64"),
    "v shape": (dict(v=torch.randn(10, 2, 32)), "v must have the shape of k"),
    "dtype": (dict(k=torch.randn(10, 2, 64, dtype=torch.float16)), "k is torch.float16 but q is torch.float32"),
    "int q": (dict(q=torch.ones(10, 4, 64, dtype=torch.int32), k=torch.ones(10, 2, 64, dtype=torch.int32),
                   v=torch.ones(10, 2, 64, dtype=torch.int32)), "q must be a floating-point tensor"),
    "device": (dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")),
               "cu_seqlens_q is on meta but the tensor it describes is on cpu"),
    "rank": (dict(q=torch.randn(10, 256)), r"q must have shape \(total_q, heads, head_dim\)"),
    "k rank": (dict(k=torch.randn(1, 10, 2, 64)), r"k must have shape \(total_k, heads, head_dim\)"),
    "backend": (dict(backend="cuda"), "varlen_attention has no cuda backend"),
    "backend name": (dict(backend="fast"), "backend='fast' is not one of"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, backend):
    change, message = BAD[case]
    args = {**_good(), "backend": backend, **change}
    with pytest.raises(ValueError, match=message):
        varlen_attention(**args)


def test_forced_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    message = "backend='triton' cannot run varlen_attention here: CPU tensors need TRITON_INTERPRET=1"
    with pytest.raises(ValueError, match=message):
        varlen_attention(**_good(), backend="triton")


def test_backend_from_environment(monkeypatch):
    args = _good()
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="MOCA_KERNELS_BACKEND='triton' cannot run"):
        varlen_attention(**args)
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "torch")
    out = varlen_attention(**args)
    assert torch.allclose(out, varlen_attention(**args, backend="torch"))


def test_automatic_backend_on_cpu_is_the_reference(monkeypatch):
    # The interpreter is a test vehicle: CPU tensors pick the torch reference unless forced.
    seen = []
    monkeypatch.setattr(triton_kernels, "forward", lambda *args: seen.append(args))
    out = varlen_attention(**_good())
    assert seen == [] and out.shape == (10, 4, 64)


# ------------------------------------------------------------------------------------------------
# backend="flash" (FlashAttention-2)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal given without a GPU")
def test_flash_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="backend='flash' cannot run varlen_attention here: FlashAttention-2 runs on "
                                         "CUDA tensors only, got cpu tensors"):
        varlen_attention(**_good(), backend="flash")
    args = {name: (x.half() if name in "qkv" else x) for name, x in _good().items()}
    with pytest.raises(ValueError, match="FlashAttention-2 runs on CUDA tensors only"):
        varlen_attention(**args, backend="flash")


def test_flash_backend_reasons():
    from moca_kernels.varlen_attention.flash import flash_reasons
    assert "float32 inputs (FlashAttention-2 takes float16 or bfloat16)" in " ".join(
        flash_reasons(torch.device("cpu"), torch.float32))
    assert any("CUDA tensors only" in r for r in flash_reasons(torch.device("cpu"), torch.bfloat16))


def _pretend_flash_can_run(monkeypatch):
    """The registry's flash backend with no reasons against it: the per-call checks run next."""
    import dataclasses

    from moca_kernels._registry import REGISTRY
    entry = REGISTRY["varlen_attention"]
    backends = tuple(dataclasses.replace(b, reasons=lambda device, dtype: []) if b.name == "flash" else b
                     for b in entry.backends)
    monkeypatch.setattr(entry, "backends", backends)


def test_flash_backend_is_never_picked_automatically(monkeypatch):
    from moca_kernels._registry import select_backend
    _pretend_flash_can_run(monkeypatch)
    assert select_backend("varlen_attention", None, torch.device("cpu"), torch.float16) == "torch"
    assert select_backend("varlen_attention", "flash", torch.device("cpu"), torch.float16) == "flash"


@pytest.mark.parametrize("dim,message", [(12, "multiple of 8"), (264, "between 1 and 256")])
def test_flash_backend_head_dim_limits(dim, message, monkeypatch):
    _pretend_flash_can_run(monkeypatch)
    q, k, v = torch.randn(10, 2, dim).half(), torch.randn(10, 1, dim).half(), torch.randn(10, 1, dim).half()
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32), backend="flash")


def test_flash_backend_refuses_a_differentiable_lse(monkeypatch):
    _pretend_flash_can_run(monkeypatch)
    q = torch.randn(10, 2, 64, dtype=torch.float16, requires_grad=True)
    k, v = torch.randn(10, 1, 64, dtype=torch.float16), torch.randn(10, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='flash' cannot differentiate lse"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32), return_lse=True, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim,heads", [(128, (16, 2)), (80, (8, 8)), (64, (8, 1))])
def test_flash_backend_matches_reference_gpu(dim, heads, causal):
    # FlashAttention-2 behind the op's contract: output, lse (-inf where no key), gradients.
    lens_q, lens_k = [0, 1, 17, 129, 300, 40], [3, 1, 17, 129, 300, 0]
    q, k, v, cu_q, cu_k, dout, _ = make_problem(lens_q, lens_k, *heads, dim, torch.bfloat16, "cuda", seed=dim)
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=causal, backend="flash")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    with torch.no_grad():
        _, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=causal, return_lse=True, backend="flash")
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = varlen_attention(*leaves, cu_q, cu_k, causal=causal, return_lse=True, backend="torch")
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-2, rtol=0)
    for name, mine, exact in zip(["out", "dq", "dk", "dv"], (out, *grads), (ref, *ref_grads)):
        err = (mine.double() - exact).abs().max().item() / max(1.0, exact.abs().max().item())
        assert err < 3e-2, f"{name}: relative error {err:.3e}"


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------

def test_opcheck(device):
    q, k, v, cu_q, cu_k, dout, _ = make_problem([3, 20, 0, 17], [5, 18, 2, 17], 4, 2, 80, torch.float32, device, seed=7)
    torch.library.opcheck(varlen_attention_fwd, (q, k, v, cu_q, cu_k, 0.125, False, False))
    torch.library.opcheck(varlen_attention_fwd, (q, k, v, cu_q, cu_k, 0.125, True, True))
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, 0.125, False, False)
    args = (dout, torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu_q, cu_k,
            0.125, False, False)
    torch.library.opcheck(varlen_attention_bwd, args)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, 0.125, True, True)
    args = (dout, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu_q, cu_k, 0.125, True, True)
    torch.library.opcheck(varlen_attention_bwd, args)


def test_torch_compile(device):
    problem = make_problem([9, 33], [9, 33], 2, 1, 64, torch.float32, device, seed=8)
    q, k, v, cu, _, dout, _ = problem

    def layer(q, k, v):
        return torch.tanh(varlen_attention(q * 2, k, v, cu, backend="triton")).sum(-1)

    def reference(q, k, v):
        return torch.tanh(varlen_attention(q * 2, k, v, cu, backend="torch")).sum(-1)

    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference(*leaves)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    assert_close(out, ref, torch.float32, "compiled out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "compiled grad")


# ------------------------------------------------------------------------------------------------
# GPU only: bf16, larger shapes, and the numerics rule: the kernel's error against a float32 reference
# at most 2x that of plain PyTorch attention in the same precision (docs/testing.md)
# ------------------------------------------------------------------------------------------------

def _plain_low_precision(q, k, v, cu, causal):
    """Attention computed the plain way in the inputs' own precision (SDPA per document)."""
    outs = []
    bounds = cu.tolist()
    group = q.shape[1] // k.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        qd, kd, vd = (x[a:b].transpose(0, 1) for x in (q, k, v))
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim,heads", [(128, (16, 2)), (80, (16, 16)), (64, (8, 8)), (256, (4, 2))])
def test_numerics_rule_gpu(dim, heads, causal, dtype):
    check_numerics_rule(dim, heads, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("design", ["atomic", "split", "fused", "atomic-tma"])
@pytest.mark.parametrize("dim,heads", [(128, (16, 2)), (80, (16, 16))])
def test_numerics_rule_of_each_backward_design_gpu(dim, heads, design, monkeypatch):
    # The rule above runs the first design only (tests do not time designs); here each backward
    # design, and the atomic one with dQ through TMA bulk reduce-adds, in bf16.
    monkeypatch.setenv(triton_kernels.DESIGN_ENV["bwd"], design.removesuffix("-tma"))
    monkeypatch.delenv(triton_kernels.TMA_ENV, raising=False)
    tma = design.endswith("-tma")
    used = spy_tma(monkeypatch) if tma else None
    check_numerics_rule(dim, heads, False, torch.bfloat16)
    if tma:
        assert used["reduce"] and all(d is not None for d in used["reduce"]), "dQ did not go through TMA"


def check_numerics_rule(dim, heads, causal, dtype):
    """Our error against float32 is at most twice that of plain attention in ``dtype``."""
    torch.manual_seed(dim)
    lens = [1, 31, 700, 129, 1280, 0, 517]
    q, k, v, cu, _, dout, _ = make_problem(lens, lens, *heads, dim, dtype, "cuda", seed=dim)
    out = varlen_attention(q, k, v, cu, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    plain = _plain_low_precision(q, k, v, cu, causal)
    plain_grads = torch.autograd.grad(plain, (q, k, v), dout)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _plain_low_precision(*leaves, cu, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())
    rows = zip(["out", "dq", "dk", "dv"], (out, *grads), (plain, *plain_grads), (ref, *ref_grads))
    for name, mine, theirs, exact in rows:
        err = (mine.float() - exact).abs().max().item()
        plain_err = (theirs.float() - exact).abs().max().item()
        assert err <= 2 * plain_err + 1e-5, f"{name}: error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e}"
