"""Triton kernels of the pointwise ops and their launchers.

Each kernel reads its inputs once and writes its outputs once, so the ops run at memory speed:
- RMSNorm, forward: one program per row (the row's sum of squares in registers), the optional
  residual sum written beside the output; backward: each program walks a range of rows, writes
  their input gradient and keeps a float32 partial of the weight gradient, summed by one
  reduction after the kernel.
- Rotary embedding: one program per token applies the rotation to every query and key head with
  the token's cos/sin read once; the M-RoPE section of each column is picked inside the kernel
  from the three position planes. The backward is the same kernel with the rotation transposed.
- SwiGLU: blocks of elements; the backward recomputes silu from the gate.
Statistics and products run in float32; results are rounded where the PyTorch definitions round.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import sm_count, triton_interpret


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _programs(device: torch.device) -> int:
    """Programs of the RMSNorm backward: a few per SM, so that the weight-gradient partials stay few."""
    return 4 * sm_count(device) if device.type == "cuda" else 3


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row ``row``: Y = W * round(s * rstd), s = X (+ R, rounded to X's dtype and stored in S)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(
            X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    s = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, 0) / n_cols + eps)
    normalized = (s * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normalized).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, DS, S, W, RSTD, DX, DW_PART, n_rows, n_cols, rows_per_program,
                         stride_dy, stride_ds, stride_s, stride_dx,
                         HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [pid * rows_per_program, ...): DX = rstd * (dn - n * mean(dn * n)) (+ DS), dn = DY * W,
    n = S * rstd; DW_PART[pid] = sum over the rows of DY * round(n)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    base = first.to(tl.int64)
    for i in range(0, last - first):
        row = base + i
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = s * rstd
        dw += dy * n.to(S.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, 0) / n_cols))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float):
    """x, residual ``(N, H)`` (last dim contiguous), weight ``(H,)`` -> (y ``(N, H)`` in
    promote(x, weight), the sum ``(N, H)`` like x (or None), rstd float32 ``(N,)``)."""
    n, h = x.shape
    y = torch.empty((n, h), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        block = triton.next_power_of_2(h)
        _rms_norm_fwd_kernel[(n,)](x, residual if residual is not None else x, weight, y,
                                   total if total is not None else y, rstd, h, x.stride(0),
                                   residual.stride(0) if residual is not None else 0, y.stride(0),
                                   total.stride(0) if total is not None else 0, eps,
                                   HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=_warps(block))
    return y, total, rstd


def rms_norm_backward(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor):
    """(dx like s, dweight like weight) of the normalization of ``s`` ``(N, H)``; ``ds`` is the
    gradient that reached the residual sum directly (added to dx)."""
    n, h = s.shape
    dx = torch.empty(n, h, dtype=s.dtype, device=s.device)
    programs = max(1, min(n, _programs(s.device)))
    part = torch.zeros(programs, h, dtype=torch.float32, device=s.device)
    if n:
        block = triton.next_power_of_2(h)
        _rms_norm_bwd_kernel[(programs,)](dy, ds if ds is not None else dy, s, weight, rstd, dx, part, n, h,
                                          triton.cdiv(n, programs), dy.stride(0),
                                          ds.stride(0) if ds is not None else 0, s.stride(0), dx.stride(0),
                                          HAS_DS=ds is not None, BLOCK_N=block, num_warps=_warps(block))
    return dx, part.sum(0).to(weight.dtype)


@triton.jit
def _rotary_kernel(Q, K, COS, SIN, QO, KO, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cp, stride_ct, stride_sp, stride_st,
                   HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Token ``t``: out = x * cos + rotate_half(x) * sin for its HQ query and HK key heads (the
    transposed rotation with TRANSPOSE, the backward). Column d < HALF (and d + HALF) takes its
    cos/sin from plane 0, 1 or 2 as it falls in the first S0, the next S1 or the rest of the
    columns (plane stride 0: one plane)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    plane = ((d >= S0).to(tl.int64) + (d >= S0 + S1).to(tl.int64))
    cos_row = COS + plane * stride_cp + t * stride_ct
    sin_row = SIN + plane * stride_sp + t * stride_st
    c1 = tl.load(cos_row + d, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    if TRANSPOSE:  # [o1; o2] = [c1 -s1; s2 c2] [x1; x2] transposed is [c1 s2; -s1 c2]
        s1, s2 = -s2, -s1
    hq = tl.arange(0, BLOCK_HQ)
    mask = (hq < HQ)[:, None] & d_ok[None, :]
    src = Q + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = QO + t * (HQ * 2 * HALF) + hq[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst, (x1 * c1[None, :] - x2 * s1[None, :]).to(QO.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(QO.dtype.element_ty), mask=mask)
    hk = tl.arange(0, BLOCK_HK)
    mask = (hk < HK)[:, None] & d_ok[None, :]
    src = K + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = KO + t * (HK * 2 * HALF) + hk[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst, (x1 * c1[None, :] - x2 * s1[None, :]).to(KO.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(KO.dtype.element_ty), mask=mask)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sections: list[int],
           transpose: bool, out_dtype: torch.dtype):
    """q ``(T, Hq, D)``, k ``(T, Hk, D)`` (last dim contiguous), cos/sin ``(3, T, D)`` planes with
    ``sections`` (3 ints summing to D/2) or ``(T, D)`` with ``sections`` empty -> rotated
    (q, k), contiguous, in ``out_dtype``."""
    t, hq, dim = q.shape
    hk = k.shape[1]
    qo = torch.empty(t, hq, dim, dtype=out_dtype, device=q.device)
    ko = torch.empty(t, hk, dim, dtype=out_dtype, device=q.device)
    if t:
        half = dim // 2
        if sections:
            s0, s1 = sections[0], sections[1]
            planes = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
        else:
            s0, s1 = half, 0
            planes = (0, cos.stride(0), 0, sin.stride(0))
        block_d = triton.next_power_of_2(half)
        _rotary_kernel[(t,)](q, k, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1), *planes,
                             HQ=hq, HK=hk, HALF=half, S0=s0, S1=s1, BLOCK_HQ=triton.next_power_of_2(hq),
                             BLOCK_HK=max(1, triton.next_power_of_2(hk)), BLOCK_D=block_d, TRANSPOSE=transpose,
                             num_warps=4 if triton.next_power_of_2(hq) * block_d <= 1024 else 8)
    return qo, ko


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    """OUT = round(silu(GATE)) * UP over a block of elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    """DUP = DOUT * silu(GATE); DGATE = DOUT * UP * silu'(GATE), silu' = sig * (1 + g * (1 - sig))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = (g * sig).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(DUP + offs, (dout * act).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)


def _swiglu_block() -> int:
    return 128 if triton_interpret() else 2048


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Contiguous gate, up of one shape and dtype -> silu(gate) * up."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _swiglu_block()
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=_warps(block))
    return out


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _swiglu_block()
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dout, gate, up, dgate, dup, n, BLOCK=block,
                                                     num_warps=_warps(block))
    return dgate, dup
