"""The dense counterpart of ``moca_kernels._tiled_lse``, for score matrices small enough to hold:
the (B, M) float32 scores S = q k^T * rq * rk * inv_t (+ bias) in one cuBLAS product, their row
(and column) log-sum-exp, and the backward from one recomputed product. At small sizes the tiled
engine's fixed cost (several launches per chunk, autotuned kernels sized for large problems)
dominates; here a call is a handful of launches, and no host synchronization.

``forward_lse`` and ``backward_products`` take and return what the tiled engine's functions of
the same names do, so ``info_nce`` and ``linear_cross_entropy`` choose between the two by size
alone (``fits``).
"""
from __future__ import annotations

import os

import torch

from ._tiled_lse import _matmul_fp32

# The largest float32 score matrix (bytes) computed densely: B * M <= 16.8M, e.g. B = M = 4,096;
# the environment variable MOCA_KERNELS_DENSE_MAX_BYTES overrides it (0: always tiled).
DENSE_MAX_BYTES = 64 << 20
DENSE_ENV = "MOCA_KERNELS_DENSE_MAX_BYTES"


def fits(rows: int, cols: int) -> bool:
    """Whether a (rows, cols) float32 score matrix fits the dense budget."""
    limit = os.environ.get(DENSE_ENV)
    return 4 * rows * cols <= (int(limit) if limit else DENSE_MAX_BYTES)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 a @ b: bf16 operands summed in float32 by cuBLAS, float16 and float32 in float32
    (float16 would need the tiled engine's range scaling of E)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        _matmul_fp32(a, b, out, accumulate=False)
    else:
        torch.mm(a.float(), b.float(), out=out)
    return out


def _scores(q, k, rq, rk, bias, inv_t) -> torch.Tensor:
    """float32 (B, M) scores without the bias."""
    s = _product(q, k.T)
    s.mul_((rq * inv_t)[:, None]).mul_(rk[None, :])
    return s


def _label_index(labels: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels clamped into [0, M) for gathering, whether each label is inside [0, M))."""
    index = labels.clamp(0, m - 1)
    return index[:, None], index == labels


def forward_lse(q, k, rq, rk, bias, labels, inv_t, symmetric: bool, budget: int = 0):
    """Row log-sum-exp of S (B,), each row's score at its label (B,; 0 where the label is outside
    [0, M)), and for ``symmetric`` the column log-sum-exp (M,); all float32."""
    m = k.shape[0]
    s = _scores(q, k, rq, rk, bias, inv_t)
    if bias is not None:
        s += bias.float()
    index, inside = _label_index(labels, m)
    pos = torch.where(inside, s.gather(1, index)[:, 0], 0.0)
    col_lse = torch.logsumexp(s, 0) if symmetric else s.new_empty(0)
    return torch.logsumexp(s, 1), pos, col_lse


def backward_products(q, k, rq, rk, bias, labels, inv_t, row_lse, row_w, g, col_lse, col_w, row_center, col_center,
                      symmetric: bool, normalize_k: bool, budget: int = 0, want_bias_grad: bool = False):
    """As ``_tiled_lse.backward_products``: (dq float32 as rq * dLoss/d(q rq), dk like k (through
    the normalization backward when ``normalize_k``), dbias float32 or None, part: the centred
    softmax terms of sum(coef * (S - bias))) for dLoss/dS = ROW_W[i] p_row + COL_W[j] p_col - g[i]
    [j is i's label]."""
    m = k.shape[0]
    s = _scores(q, k, rq, rk, bias, inv_t)
    biased = s + bias.float() if bias is not None else s
    coef = torch.exp(biased - row_lse[:, None]).mul_(row_w[:, None])
    part = (s - row_center[:, None]).mul_(coef).sum()
    if symmetric:
        p_col = torch.exp(biased - col_lse[None, :]).mul_(col_w[None, :])
        part += (s - col_center[None, :]).mul_(p_col).sum()
        coef.add_(p_col)
        del p_col
    del biased
    index, inside = _label_index(labels, m)
    coef.scatter_add_(1, index, torch.where(inside, -g, 0.0)[:, None])
    dbias = coef.sum(0) if want_bias_grad else None
    e = coef.mul_((rq * inv_t)[:, None]).mul_(rk[None, :])  # dLoss/d(q . k), float32
    if q.dtype == torch.bfloat16:
        e = e.to(torch.bfloat16)
    dq = _product(e, k)
    dk = _product(e.T, q)
    if normalize_k:
        unit = k.float() * rk[:, None]
        dk -= unit * (unit * dk).sum(-1, keepdim=True)
    return dq, dk.to(k.dtype), dbias, part
