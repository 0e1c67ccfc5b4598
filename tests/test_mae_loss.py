"""mae_loss: the Triton backend (the interpreter on CPU) and the CUDA backend (GPU only) against
the PyTorch reference in float64, loss and gradient; the torch backend against He et al.'s
formula; bad inputs; the CUDA sources compile for sm_90a without spills."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from moca_kernels import mae_loss
from moca_kernels.mae_loss import mae_loss_reference
from moca_kernels.mae_loss import op as mae_op

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, "csrc", "cuda")


def _problem(n, p, dtype, device, seed, masked, target_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, p, generator=gen).to(device, dtype).requires_grad_()
    target = (torch.randn(n, p, generator=gen) * 3 + 1).to(device, target_dtype)
    mask = (torch.rand(n, generator=gen) < 0.5).to(device) if masked else None
    return pred, target, mask


def _check(backend, n, p, dtype, device, norm_pix, reduction, masked, seed=0, target_dtype=torch.float32,
           tolerance=1e-5):
    pred, target, mask = _problem(n, p, dtype, device, seed, masked, target_dtype)
    out = mae_loss(pred, target, mask=mask, norm_pix=norm_pix, reduction=reduction, backend=backend)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), pred)
    pred64 = pred.detach().double().requires_grad_()
    ref = mae_loss_reference(pred64, target.double(), mask, norm_pix, 1e-6, reduction)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), pred64)
    assert out.dtype == torch.float32 and out.shape == ref.shape and grad.dtype == pred.dtype
    scale = max(ref.abs().max().item(), 1e-12)
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance * scale)
    grad_scale = max(ref_grad.abs().max().item(), 1e-12)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tolerance, atol=tolerance * grad_scale)


@pytest.mark.parametrize("n,p", [(1, 1), (37, 37), (9, 1176), (3, 4704)])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_reference(n, p, norm_pix, reduction, masked, device):
    _check("triton", n, p, torch.float32, device, norm_pix, reduction, masked, seed=n + p)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16])
def test_triton_float16_pred(target_dtype, device):
    _check("triton", 21, 1176, torch.float16, device, True, "mean", True, target_dtype=target_dtype, tolerance=2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_mask_and_no_rows_give_zero(backend, device):
    for n, mask in ((5, torch.zeros(5, dtype=torch.bool)), (0, None)):
        pred = torch.randn(n, 16, device=device, requires_grad=True)
        target = torch.randn(n, 16, device=device)
        loss = mae_loss(pred, target, mask=mask.to(device) if mask is not None else None, backend=backend)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.equal(grad, torch.zeros_like(pred))


def test_reference_follows_he_et_al():
    # models_mae.forward_loss: unbiased per-patch variance, eps 1e-6, mean over the patch, then
    # the mean over removed patches.
    pred, target = torch.randn(6, 48, dtype=torch.float64), torch.randn(6, 48, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    per_patch = ((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(mae_loss(pred, target, mask=mask, norm_pix=True), expected)


def test_opcheck(device):
    pred, target, mask = _problem(7, 40, torch.float32, device, 3, True)
    for mode in (0, 1, 2):
        torch.library.opcheck(mae_op.mae_loss_fused, (pred, target, mask, True, 1e-6, mode, "triton"))


@pytest.mark.parametrize("change,message", [
    (dict(pred=torch.randn(4, 8, 1)), r"pred must be a 2-D tensor \(N, P\)"),
    (dict(target=torch.randn(4, 9)), r"target has shape \(4, 9\), pred has \(4, 8\)"),
    (dict(target=torch.ones(4, 8, dtype=torch.int64)), "target must be a floating-point tensor"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), r"mask must be a bool tensor of shape \(4,\)"),
    (dict(mask=torch.ones(4)), r"mask must be a bool tensor of shape \(4,\), got torch.float32"),
    (dict(pred=torch.randn(4, 0), target=torch.randn(4, 0)), "at least one value per row"),
    (dict(eps=-1.0), "eps must be a finite number >= 0"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(backend="cuda"), "backend='cuda' cannot run mae_loss here"),
])
def test_bad_input(change, message):
    args = dict(pred=torch.randn(4, 8), target=torch.randn(4, 8))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        mae_loss(**args)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(f for f in os.listdir(CSRC) if f.endswith(".cu")))
def test_cuda_sources_compile_for_sm90a_without_spills(source, tmp_path):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "-Xptxas", "-v", "-c",
                             os.path.join(CSRC, source), "-o", str(tmp_path / "out.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    assert spills and not any(spills), "register spills:\n" + result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,target_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                                (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("p", [4704, 37])  # vectorized rows, and the scalar path
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_matches_reference(dtype, target_dtype, p, norm_pix, reduction):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    _check("cuda", 300, p, dtype, "cuda", norm_pix, reduction, True, target_dtype=target_dtype, tolerance=tolerance)


@pytest.mark.gpu
def test_gpu_default_backend_is_cuda_and_falls_back_for_long_norm_pix_rows():
    pred, target = torch.randn(4, 20000, device="cuda"), torch.randn(4, 20000, device="cuda")
    torch.testing.assert_close(mae_loss(pred, target, norm_pix=True),
                               mae_loss(pred, target, norm_pix=True, backend="torch"))
    with pytest.raises(ValueError, match="norm_pix rows longer than 12000"):
        mae_loss(pred, target, norm_pix=True, backend="cuda")


def test_cuda_backend_says_why_it_is_absent(monkeypatch):
    from moca_kernels import _cuda
    monkeypatch.setattr(_cuda, "library_path", lambda: None)
    monkeypatch.setattr(_cuda, "_STATE", {})
    assert "the CUDA library was not built" in _cuda.unavailable_reason()
    assert any("not built" in why for why in _cuda.device_reasons(torch.device("cuda"), torch.float32))


def test_cuda_launcher_refuses_bad_arguments_before_touching_the_device():
    from moca_kernels import _cuda
    lib = _cuda.library()
    if lib is None:
        pytest.skip("the CUDA library is not built here")
    null = _cuda.pointer(None)
    args = lambda pred_dtype, n, p, norm_pix, mode: (null, pred_dtype, null, 0, null, null, n, p, p, p,  # noqa: E731
                                                     norm_pix, 1e-6, mode, null, null, null)
    assert lib.moca_mae_loss(*args(7, 1, 8, 0, 0)) == -1
    assert lib.moca_mae_loss(*args(0, 1, 0, 0, 0)) == -2
    assert lib.moca_mae_loss(*args(0, 1, 12008, 1, 0)) == -3
    assert lib.moca_mae_loss(*args(0, 1, 8, 0, 9)) == -4
    assert lib.moca_mae_loss(*args(0, 0, 8, 0, 0)) == 0  # no rows: nothing to launch
    assert b"norm_pix rows longer" in lib.moca_cuda_error_string(-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_rows_and_mask(backend, device):
    # pred a column slice of a wider tensor (row stride 43), target transposed, mask every other
    # element of a longer one: no copies are required of the caller.
    gen = torch.Generator().manual_seed(12)
    wide = torch.randn(9, 43, generator=gen).to(device)
    pred = wide[:, :40].detach().requires_grad_()
    target = torch.randn(40, 9, generator=gen).to(device).T
    mask = (torch.rand(18, generator=gen) < 0.5).to(device)[::2]
    loss = mae_loss(pred, target, mask=mask, norm_pix=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    pred64 = pred.detach().double().requires_grad_()
    ref = mae_loss_reference(pred64, target.double().contiguous(), mask.contiguous(), True, 1e-6, "mean")
    (ref_grad,) = torch.autograd.grad(ref, pred64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
