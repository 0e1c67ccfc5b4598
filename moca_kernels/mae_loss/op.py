"""``mae_loss``: validation, backend choice, the ``torch.library`` op of the fused backends, autograd."""
from __future__ import annotations

import math
import os

import torch

from .. import _cuda
from .._registry import (
    TORCH,
    TRITON,
    Backend,
    check_float_matrix,
    described,
    last_dim_contiguous,
    register_op,
    select_backend,
)
from .._verify import rows_sample, trusted
from .reference import mae_loss_reference

OP = "mae_loss"
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}  # the kernels' mode codes
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

register_op(OP, [Backend("cuda", _cuda.device_reasons, auto=lambda device: device.type == "cuda"), TRITON, TORCH])


def _impl(backend: str):
    if backend == "cuda":
        from . import cuda
        return cuda
    from . import triton_kernels  # imported on first use: importing triton costs time
    return triton_kernels


@torch.library.custom_op("moca::mae_loss_fused", mutates_args=())
def mae_loss_fused(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, norm_pix: bool, eps: float,
                   mode: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (0-dim, or (N,) for mode 2) and d(loss)/d(pred) for an upstream gradient of 1,
    both from one pass of the ``backend`` kernel ("cuda" or "triton")."""
    pred, target = last_dim_contiguous(pred), last_dim_contiguous(target)
    n, p = pred.shape
    if mask is not None:
        mask = mask.contiguous()  # the kernels read mask[row]
        count = mask.sum(dtype=torch.float32)
    else:
        count = torch.full((), float(n), dtype=torch.float32, device=pred.device)
    with torch.cuda.device_of(pred):
        row_loss, dpred = _impl(backend).mae_rows(pred, target, mask, count, norm_pix, eps, mode)
    if mode == 2:
        return row_loss / p, dpred
    if mode == 1:
        return row_loss.sum(), dpred
    return row_loss.sum() / (count.clamp_min(1) * p), dpred


@mae_loss_fused.register_fake
def _(pred, target, mask, norm_pix, eps, mode, backend):
    shape = (pred.shape[0],) if mode == 2 else ()
    return pred.new_empty(shape, dtype=torch.float32), pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _unused):
    (dpred,) = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None
    scale = grad[:, None] if grad.dim() else grad  # "none": one upstream gradient per row
    return dpred * scale.to(dpred.dtype), None, None, None, None, None, None


mae_loss_fused.register_autograd(_backward, setup_context=_setup_context)


def _check(pred, target, mask, norm_pix, eps, reduction) -> None:
    check_float_matrix("pred", pred, " (N, P)")
    check_float_matrix("target", target, " (N, P)")
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {tuple(target.shape)}, pred has {tuple(pred.shape)}")
    if pred.shape[1] == 0:
        raise ValueError("pred and target need at least one value per row (P >= 1)")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (pred.shape[0],):
            raise ValueError(f"mask must be a bool tensor of shape ({pred.shape[0]},), got {described(mask)}")
        if mask.device != pred.device:
            raise ValueError(f"mask is on {mask.device} but pred is on {pred.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")


def _fused_reasons(backend: str, pred, target, norm_pix) -> list[str]:
    """What the fused kernels do not take beyond the registry's device/dtype checks."""
    reasons = []
    if target.dtype not in _DTYPES:
        reasons.append(f"{target.dtype} targets (they take float32, float16 or bfloat16)")
    if backend == "cuda" and norm_pix:
        from .cuda import max_norm_pix_row
        longest = max_norm_pix_row()
        if longest is not None and pred.shape[1] > longest:
            reasons.append(f"norm_pix rows longer than {longest} values")
    return reasons


def mae_loss(pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None, norm_pix: bool = False,
             eps: float = 1e-6, reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """MAE reconstruction loss: squared error of ``pred`` against ``target``, both ``(N, P)``,
    over the rows that ``mask`` (bool ``(N,)``, default all) selects.

    "mean" averages over every element of the counted rows (0.0, and a zero gradient, when none
    count); "sum" adds them; "none" gives each row's mean (N,), 0 for rows that do not count.
    ``norm_pix=True`` first normalizes each target row by its own mean and unbiased variance,
    ``(t - mean) / sqrt(var + eps)``, as He et al.'s MAE does. Returns float32 (float64 for float64
    pred on the torch backend). Differentiable in ``pred``.

    The CUDA and Triton backends read each counted row once and write the gradient in the same
    pass; the backward only scales it by the upstream gradient.
    """
    _check(pred, target, mask, norm_pix, eps, reduction)
    chosen = select_backend(OP, backend, pred.device, pred.dtype)
    why = _fused_reasons(chosen, pred, target, norm_pix) if chosen != "torch" else []
    if why and (backend is not None or os.environ.get("MOCA_KERNELS_BACKEND")):
        raise ValueError(f"backend {chosen!r} cannot run mae_loss here: " + "; ".join(why))
    if why:  # picked automatically: the next backend that can
        chosen = "triton" if chosen == "cuda" and not _fused_reasons("triton", pred, target, norm_pix) else "torch"
    if chosen == "torch" or not _fused_trusted(chosen, pred, target, mask, norm_pix, eps, reduction):
        return mae_loss_reference(pred, target, mask, norm_pix, eps, reduction)
    return mae_loss_fused(pred, target, mask, norm_pix, float(eps), REDUCTIONS[reduction], chosen)[0]


def _fused_trusted(backend: str, pred, target, mask, norm_pix: bool, eps: float, reduction: str) -> bool:
    """The ``backend`` kernel checked on a sample of these rows on first use (``_verify.trusted``)."""
    def fast(p, t, m=None):
        return mae_loss_fused(p, t, m, norm_pix, float(eps), REDUCTIONS[reduction], backend)[0]

    inputs = [rows_sample(pred), rows_sample(target)] + ([rows_sample(mask)] if mask is not None else [])
    key = (backend, pred.dtype, target.dtype, pred.shape[1], norm_pix, mask is not None, reduction)
    return trusted("mae_loss", key, fast, lambda p, t, m=None: mae_loss_reference(p, t, m, norm_pix, eps, reduction),
                   inputs, (0,))
