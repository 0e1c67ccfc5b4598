"""linear_cross_entropy, both backends, against float64 dense logits + cross_entropy: the loss
and the gradients of hidden, weight and bias; odd vocabularies, ignored rows, a tied weight,
forced chunking; opcheck; bad inputs; on a GPU, bf16 and the numerics rule."""
import pytest
import torch

from moca_kernels import _tiled_lse, linear_cross_entropy
from moca_kernels.linear_cross_entropy import op as lce_op
from moca_kernels.linear_cross_entropy import triton_kernels as tk


def dense(hidden, weight, labels, bias, reduction, ignore_index=-100):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)



@pytest.fixture(autouse=True)
def tiled(monkeypatch):
    """These tests are about the tiled kernels: small problems must not take the dense engine
    (tests/test_loss_fixed_cost.py checks that one)."""
    monkeypatch.setenv("MOCA_KERNELS_DENSE_MAX_BYTES", "0")

def make(n, v, h, dtype, device, seed, with_bias=True, ignored_every=5):
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()  # noqa: E731,E501
    hidden, weight = leaf(n, h), leaf(v, h, scale=0.3)
    bias = leaf(v) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        labels[1::ignored_every] = -100  # never all rows: dense cross_entropy would give NaN
    return hidden, weight, bias, labels.to(device)


def check(backend, hidden, weight, bias, labels, reduction, rtol, atol):
    leaves = [x for x in (hidden, weight, bias) if x is not None]
    out = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, backend=backend)
    assert out.dtype in (torch.float32, torch.float64)
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = dense(ref_leaves[0], ref_leaves[1], labels.cpu(), ref_leaves[2] if bias is not None else None, reduction)
    ref_grads = torch.autograd.grad((ref * w.cpu().double()).sum(), ref_leaves)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=rtol, atol=atol)
    for name, g, r in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert g.dtype == hidden.dtype, name
        scale = max(r.abs().max().item(), 1e-12)
        torch.testing.assert_close(g.cpu().double(), r, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("v", [1001, 37, 128])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunks", ["none", "vocab", "rows and vocab"])
def test_triton_float32_matches_dense(v, with_bias, reduction, chunks, device, monkeypatch):
    if chunks != "none":
        monkeypatch.setattr(tk, "SCRATCH_FRACTION", 1e-4)
    if chunks == "rows and vocab":
        monkeypatch.setattr(_tiled_lse, "MAX_SINGLE_PASS_DOC_CHUNKS", 0)
        monkeypatch.setattr(_tiled_lse, "QUERY_CHUNK_ROWS", 32)
    hidden, weight, bias, labels = make(37, v, 40, torch.float32, device, seed=v, with_bias=with_bias)
    check("triton", hidden, weight, bias, labels, reduction, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backend_matches_dense(n, reduction):
    hidden, weight, bias, labels = make(n, 1001, 24, torch.float64, "cpu", seed=n, ignored_every=3)
    check("torch", hidden, weight, bias, labels, reduction, rtol=1e-10, atol=1e-10)


def test_triton_float16(device):
    hidden, weight, bias, labels = make(45, 257, 64, torch.float16, device, seed=4)
    check("triton", hidden, weight, bias, labels, "mean", rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n", [0, 6])
def test_all_rows_ignored_gives_zero_and_zero_gradients(backend, n, device):
    hidden, weight, bias, _ = make(n, 50, 32, torch.float32, device, seed=2)
    labels = torch.full((n,), -100, dtype=torch.int64, device=device)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, [hidden, weight, bias]):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tied_weight_gradient_adds_to_the_embedding(backend, device):
    # The MLM head shares its weight with the input embedding: both uses' gradients must add up.
    gen = torch.Generator().manual_seed(9)
    table = (torch.randn(97, 32, generator=gen) * 0.3).to(device).requires_grad_()
    tokens = torch.randint(0, 97, (29,), generator=gen).to(device)
    labels = torch.randint(0, 97, (29,), generator=gen).to(device)
    mix = torch.randn(32, 32, generator=gen).to(device) / 6

    def loss_with(fn):
        hidden = torch.tanh(table[tokens] @ mix)
        return fn(hidden)

    ours = loss_with(lambda h: linear_cross_entropy(h, table, labels, backend=backend))
    (grad,) = torch.autograd.grad(ours, [table])
    table64 = table.detach().double().requires_grad_()
    hidden64 = torch.tanh(table64[tokens] @ mix.double())
    (ref,) = torch.autograd.grad(dense(hidden64, table64, labels, None, "mean"), [table64])
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_opcheck(device):
    hidden, weight, bias, labels = make(9, 70, 32, torch.float32, device, seed=5, ignored_every=0)
    torch.library.opcheck(lce_op.linear_cross_entropy_fwd, (hidden, weight, bias, labels))
    torch.library.opcheck(lce_op.linear_cross_entropy_fwd, (hidden, weight, None, labels))


@pytest.mark.parametrize("change,message", [
    (dict(hidden=torch.randn(4, 8, 1)), "hidden must be a 2-D tensor"),
    (dict(weight=torch.randn(10, 9)), "weight has hidden size 9, hidden has 8"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "weight is torch.float64 but hidden is torch.float32"),
    (dict(bias=torch.randn(11)), r"bias must have shape \(10,\)"),
    (dict(labels=torch.tensor([0, 1, 2])), r"labels must be int64 of shape \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), r"labels must be int64 of shape \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 10, 3])), "labels must index the vocabulary .* found 10"),
    (dict(labels=torch.tensor([0, -1, 2, 3])), "labels must index the vocabulary .* found -1"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(backend="cuda"), "linear_cross_entropy has no cuda backend"),
])
def test_bad_input(change, message):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 1, 2, -100]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("n,v,h", [(1000, 151936, 2048), (333, 152065, 256)])
def test_bf16_numerics_rule_gpu(n, v, h):
    # Error against float64 at most 2x that of plain bf16 PyTorch (bf16 logits, cross_entropy).
    hidden, weight, bias, labels = make(n, v, h, torch.bfloat16, "cuda", seed=v, with_bias=False)
    ours = linear_cross_entropy(hidden, weight, labels)
    grads = torch.autograd.grad(ours, [hidden, weight])
    plain = dense(hidden, weight, labels, None, "mean")
    plain_grads = torch.autograd.grad(plain, [hidden, weight])
    exact_leaves = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    exact = dense(*exact_leaves, labels, None, "mean")
    exact_grads = torch.autograd.grad(exact, exact_leaves)
    for name, mine, theirs, truth in zip(["loss", "hidden", "weight"], (ours, *grads), (plain, *plain_grads),
                                         (exact, *exact_grads)):
        err = (mine.double() - truth).abs().max().item()
        plain_err = (theirs.double() - truth).abs().max().item()
        assert err <= 2 * plain_err + 1e-6, f"{name}: error {err:.3e} > 2 x plain bf16 error {plain_err:.3e}"
