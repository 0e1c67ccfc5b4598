"""info_nce's Triton backend (the interpreter on CPU, fp32 and fp16) against the dense float64
computation of test_info_nce: the loss and every gradient, with chunking forced on small shapes;
opcheck; and, on a GPU, bf16 against the chunked reference and the peak-memory rule."""
import pytest
import torch
from test_info_nce import dense

from moca_kernels import _tiled_lse
from moca_kernels.info_nce import info_nce, info_nce_reference
from moca_kernels.info_nce import op as info_nce_op
from moca_kernels.info_nce import triton_kernels as tk


@pytest.fixture(autouse=True)
def tiled(monkeypatch):
    """These tests are about the tiled kernels: small problems must not take the dense engine
    (tests/test_loss_fixed_cost.py checks that one)."""
    monkeypatch.setenv("MOCA_KERNELS_DENSE_MAX_BYTES", "0")

def make(batch, m, k, dim, seed, dtype, device, duplicate_labels=False):
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    query, docs = leaf(batch, dim), leaf(m, dim)
    hard = leaf(batch, k, dim) if k else None
    if duplicate_labels:
        labels = torch.randint(0, m, (batch,), generator=gen)
    else:
        labels = torch.randperm(m, generator=gen)[:batch]
    return query, docs, hard, labels.to(device), torch.rand(batch, generator=gen, dtype=torch.float64)


def check(query, docs, hard, labels, weights, temperature, symmetric, normalize, rtol, atol):
    """Loss and gradients of the Triton path against float64 dense ones, on the same inputs."""
    temp = torch.tensor(temperature, requires_grad=True)
    leaves = [x for x in (query, docs, hard, temp) if x is not None]
    loss = info_nce(query, docs, labels=labels, temperature=temp, hard_negatives=hard, symmetric=symmetric,
                    normalize=normalize, reduction="none", backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == (query.shape[0],)
    grads = torch.autograd.grad((loss * weights.to(loss)).sum(), leaves)
    cpu64 = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = dense(cpu64[0], cpu64[1], labels.cpu(), cpu64[-1], cpu64[2] if hard is not None else None, symmetric,
                normalize)
    ref_grads = torch.autograd.grad((ref * weights).sum(), cpu64)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=rtol, atol=atol)
    names = ["query", "docs", "hard_negatives", "temperature"] if hard is not None else ["query", "docs", "temperature"]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "temperature" else query.dtype)
        scale = r.abs().max().item()  # gradients compared relative to their largest entry
        torch.testing.assert_close(g.cpu().double(), r, rtol=rtol, atol=atol * max(scale, 1e-12),
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("chunks", ["none", "docs", "queries and docs"])
def test_float32_matches_dense(symmetric, normalize, k, chunks, device, monkeypatch):
    # B and M are not multiples of the 32 x 32 interpreter tiles; d = 40 is not a multiple of BLOCK_K.
    if chunks != "none":  # a budget so small that the forward and backward walk many chunks
        monkeypatch.setattr(tk, "SCRATCH_FRACTION", 1e-4)
    if chunks == "queries and docs":  # the backward's float32 accumulator over query chunks
        monkeypatch.setattr(_tiled_lse, "MAX_SINGLE_PASS_DOC_CHUNKS", 0)
        monkeypatch.setattr(_tiled_lse, "QUERY_CHUNK_ROWS", 32)
    query, docs, hard, labels, weights = make(37, 70, k, 40, seed=k + 3 * symmetric + 7 * normalize,
                                              dtype=torch.float32, device=device)
    check(query, docs, hard, labels, weights, 0.05 if normalize else 1.5, symmetric, normalize,
          rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("batch,m", [(1, 1), (1, 33), (33, 33), (64, 96)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_float32_shapes_and_repeated_labels(batch, m, symmetric, device):
    query, docs, hard, labels, weights = make(batch, m, 2, 64, seed=batch + m, dtype=torch.float32, device=device,
                                              duplicate_labels=True)
    check(query, docs, hard, labels, weights, 0.1, symmetric, True, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_float16(symmetric, device):
    query, docs, hard, labels, weights = make(45, 50, 2, 48, seed=11, dtype=torch.float16, device=device)
    check(query, docs, hard, labels, weights, 0.05, symmetric, True, rtol=2e-2, atol=2e-2)


def test_float16_gradients_do_not_underflow(device):
    # Upstream gradients of 1e-3 (a mean over a large batch) and docs of norm ~500: each entry of
    # dLoss/dS * (1/|q|) * (1/|doc|) is ~1e-8, below float16's smallest number, although the
    # gradients themselves are representable. The backward's range scaling must keep them.
    query, docs, hard, labels, weights = make(40, 40, 0, 32, seed=5, dtype=torch.float16, device=device)
    docs = (docs.detach() * 100).requires_grad_()
    check(query, docs, hard, labels, weights * 1e-3, 0.05, False, True, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_match_the_reference(reduction, device):
    query, docs, hard, labels, _ = make(20, 30, 1, 32, seed=3, dtype=torch.float32, device=device)
    out = info_nce(query, docs, labels=labels, hard_negatives=hard, reduction=reduction, backend="triton")
    ref = info_nce(query, docs, labels=labels, hard_negatives=hard, reduction=reduction, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (g_out,) = torch.autograd.grad(out, [query])
    (g_ref,) = torch.autograd.grad(ref, [query])
    torch.testing.assert_close(g_out, g_ref, rtol=1e-3, atol=1e-5)  # softmax minus one-hot: cancellation


def test_all_zero_upstream_gradient_gives_zero_gradients(device):
    query, docs, hard, labels, _ = make(10, 12, 1, 32, seed=4, dtype=torch.float32, device=device)
    loss = info_nce(query, docs, labels=labels, hard_negatives=hard, symmetric=True, reduction="none",
                    backend="triton")
    grads = torch.autograd.grad((loss * 0).sum(), [query, docs, hard])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_opcheck(device):
    query, docs, hard, labels, _ = make(9, 11, 2, 32, seed=8, dtype=torch.float32, device=device)
    inv_t = torch.tensor(10.0, device=device, requires_grad=True)
    for symmetric in (False, True):
        torch.library.opcheck(info_nce_op.info_nce_fwd, (query, docs, hard, labels, inv_t, symmetric, True))


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [False, True])
def test_bf16_on_gpu_matches_the_reference(symmetric):
    query, docs, hard, labels, weights = make(1000, 3000, 2, 1024, seed=21, dtype=torch.bfloat16, device="cuda")
    temp = torch.tensor(0.03, device="cuda", requires_grad=True)
    leaves = [query, docs, hard, temp]
    loss = info_nce(query, docs, labels=labels, temperature=temp, hard_negatives=hard, symmetric=symmetric,
                    reduction="none")  # CUDA tensors pick the Triton backend
    ref = info_nce_reference(query, docs, labels, temp, hard, symmetric, True, "none")
    w = weights.cuda().float()
    grads = torch.autograd.grad((loss * w).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        err = (g.float() - r.float()).norm() / r.float().norm()
        assert err < 2e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("batch,hard,symmetric", [(4096, 0, False), (16384, 2, True)])
def test_peak_memory_on_gpu_stays_near_inputs_plus_gradients(batch, hard, symmetric):
    query, docs, hard, labels, _ = make(batch, batch, hard, 2048, seed=0, dtype=torch.bfloat16, device="cuda")
    inputs = sum(x.numel() * x.element_size() for x in (query, docs, hard) if x is not None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the inputs and whatever else is alive
    loss = info_nce(query, docs, labels=labels, hard_negatives=hard, symmetric=symmetric)
    loss.backward()
    torch.cuda.synchronize()
    ratio = (inputs + torch.cuda.max_memory_allocated() - before) / (2 * inputs)
    print(f"peak / (inputs + gradients) = {ratio:.3f}")
    assert ratio <= 1.2, f"peak memory {ratio:.3f}x the inputs plus their gradients"
