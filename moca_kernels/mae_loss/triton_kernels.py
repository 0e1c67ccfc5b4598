"""Triton ``mae_loss``: one program per row writes the row's sum of squared errors and, in the
same pass, the gradient with respect to pred (the CUDA kernel's contract, see
``csrc/cuda/mae_loss.cu``). Rows are walked in blocks, so any row length works; ``norm_pix``
first takes the row's mean and unbiased variance (two more passes over the target row)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import triton_interpret

MEAN, SUM, NONE = 0, 1, 2


@triton.jit
def _mae_rows_kernel(PRED, TARGET, MASK, COUNT, ROW_LOSS, DPRED, p, stride_pred, stride_target, eps,
                     MODE: tl.constexpr, HAS_MASK: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pred = PRED + row * stride_pred
    target = TARGET + row * stride_target
    dpred = DPRED + row * p
    offs = tl.arange(0, BLOCK)
    counted = True
    if HAS_MASK:
        counted = tl.load(MASK + row) != 0
    if counted:
        shift = 0.0
        inv_std = 1.0
        if NORM:
            total = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, p, BLOCK):
                total += tl.load(target + start + offs, mask=start + offs < p, other=0.0).to(tl.float32)
            shift = tl.sum(total, 0) / p
            squares = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, p, BLOCK):
                x = tl.load(target + start + offs, mask=start + offs < p, other=0.0).to(tl.float32)
                squares += tl.where(start + offs < p, (x - shift) * (x - shift), 0.0)
            var = tl.sum(squares, 0) / tl.maximum(p - 1, 1)
            inv_std = 1.0 / tl.sqrt(var + eps)
        if MODE == 0:
            scale = 2.0 / (tl.maximum(tl.load(COUNT), 1.0) * p)
        elif MODE == 1:
            scale = 2.0
        else:
            scale = 2.0 / p
        squares = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, p, BLOCK):
            inside = start + offs < p
            a = tl.load(pred + start + offs, mask=inside, other=0.0).to(tl.float32)
            t = tl.load(target + start + offs, mask=inside, other=0.0).to(tl.float32)
            d = tl.where(inside, a - (t - shift) * inv_std, 0.0)
            squares += d * d
            tl.store(dpred + start + offs, (d * scale).to(DPRED.dtype.element_ty), mask=inside)
        tl.store(ROW_LOSS + row, tl.sum(squares, 0))
    else:
        for start in range(0, p, BLOCK):
            tl.store(dpred + start + offs, tl.zeros((BLOCK,), DPRED.dtype.element_ty), mask=start + offs < p)
        tl.store(ROW_LOSS + row, 0.0)


def block_size(p: int) -> int:
    return min(triton.next_power_of_2(p), 64 if triton_interpret() else 4096)


def mae_rows(pred, target, mask, count, norm_pix: bool, eps: float, mode: int):
    """(row sums of squared errors (N,) float32, dpred like pred, contiguous)."""
    n, p = pred.shape
    row_loss = torch.empty(n, dtype=torch.float32, device=pred.device)
    dpred = torch.empty((n, p), dtype=pred.dtype, device=pred.device)
    if n:
        block = block_size(p)
        _mae_rows_kernel[(n,)](pred, target, mask if mask is not None else row_loss, count, row_loss, dpred, p,
                               pred.stride(0), target.stride(0), eps, MODE=mode, HAS_MASK=mask is not None,
                               NORM=norm_pix, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return row_loss, dpred
