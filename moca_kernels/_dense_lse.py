"""The dense counterpart of ``moca_kernels._tiled_lse``, for score matrices small enough to hold:
the (B, M) float32 scores S = q k^T * rq * rk * inv_t (+ bias) in one cuBLAS product, their row
(and column) log-sum-exp, and the backward from one recomputed product. At small sizes the tiled
engine's fixed cost (several launches per chunk, autotuned kernels sized for large problems)
dominates; here a call is a handful of launches, and no host synchronization.

``forward_lse`` and ``backward_products`` take and return what the tiled engine's functions of
the same names do, so ``_lse_engine.engine`` chooses between the two by size alone (``fits``).
"""
from __future__ import annotations

import os

import torch

from ._lse_engine import ProductsOptions, Scores, matmul_fp32

# The largest float32 score matrix (bytes) computed densely: B * M <= 16.8M, e.g. B = M = 4,096;
# the environment variable MOCA_KERNELS_DENSE_MAX_BYTES overrides it (0: always tiled).
DENSE_MAX_BYTES = 64 << 20
DENSE_ENV = "MOCA_KERNELS_DENSE_MAX_BYTES"


def fits(rows: int, cols: int) -> bool:
    """Whether a (rows, cols) float32 score matrix fits the dense budget."""
    limit = os.environ.get(DENSE_ENV)
    return 4 * rows * cols <= (int(limit) if limit else DENSE_MAX_BYTES)


def _scores(s: Scores) -> torch.Tensor:
    """float32 (B, M) scores without the bias."""
    out = matmul_fp32(s.q, s.k.T)
    return out.mul_((s.rq * s.inv_t)[:, None]).mul_(s.rk[None, :])


def _label_index(labels: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels clamped into [0, M) for gathering (B, 1), whether each label is inside [0, M) (B,))."""
    index = labels.clamp(0, m - 1)
    return index[:, None], index == labels


def forward_lse(s: Scores, *, labels: torch.Tensor, symmetric: bool,
                budget: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``_lse_engine.forward_lse``: (row_lse (B,), pos (B,), col_lse (M,) or (0,)), float32."""
    scores = _scores(s)
    if s.bias is not None:
        scores += s.bias.float()
    index, inside = _label_index(labels, s.k.shape[0])
    pos = torch.where(inside, scores.gather(1, index)[:, 0], 0.0)
    col_lse = torch.logsumexp(scores, 0) if symmetric else scores.new_empty(0)
    return torch.logsumexp(scores, 1), pos, col_lse


def backward_products(s: Scores, *, labels: torch.Tensor, row_lse: torch.Tensor, row_w: torch.Tensor,
                      g: torch.Tensor, row_center: torch.Tensor, col_lse: torch.Tensor, col_w: torch.Tensor,
                      col_center: torch.Tensor, options: ProductsOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """As ``_lse_engine.backward_products``: (dq (B, d) float32, dk like k, dbias (M,) float32 or
    None, part (0-dim)), from one recomputed product and two more."""
    scores = _scores(s)
    biased = scores + s.bias.float() if s.bias is not None else scores
    coef = torch.exp(biased - row_lse[:, None]).mul_(row_w[:, None])
    part = (scores - row_center[:, None]).mul_(coef).sum()
    if options.symmetric:
        p_col = torch.exp(biased - col_lse[None, :]).mul_(col_w[None, :])
        part += (scores - col_center[None, :]).mul_(p_col).sum()
        coef.add_(p_col)
        del p_col
    del biased
    index, inside = _label_index(labels, s.k.shape[0])
    coef.scatter_add_(1, index, torch.where(inside, -g, 0.0)[:, None])
    dbias = coef.sum(0) if options.bias_grad else None
    e = coef.mul_((s.rq * s.inv_t)[:, None]).mul_(s.rk[None, :])  # dLoss/d(q . k), float32
    if s.q.dtype == torch.bfloat16:  # float16 would need the tiled engine's range scaling of E
        e = e.to(torch.bfloat16)
    dq = matmul_fp32(e, s.k)
    dk = matmul_fp32(e.T, s.q)
    if options.normalize_k:
        unit = s.k.float() * s.rk[:, None]
        dk -= unit * (unit * dk).sum(-1, keepdim=True)
    return dq, dk.to(s.k.dtype), dbias, part
