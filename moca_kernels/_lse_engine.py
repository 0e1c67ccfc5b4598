"""The one entry to the log-sum-exp engines under ``info_nce`` and ``linear_cross_entropy``: what a
score matrix is (``Scores``), what the backward computes beyond the two gradients
(``ProductsOptions``), which engine serves a size (``engine``), and the float32 product both
engines use (``matmul_fp32``).

Both engines (``_dense_lse``: the float32 scores held whole, a few cuBLAS calls; ``_tiled_lse``:
tiles that never leave the kernel) take the same keyword arguments and return the same results,
so the losses call ``forward_lse`` and ``backward_products`` here and never name an engine.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Scores:
    """The (B, M) score matrix S = (q . k) * rq * rk * inv_t (+ bias), described, never held.

    q: (B, d) and k: (M, d) of one dtype; rq: (B,) and rk: (M,) float32 per-row scales (inverse
    norms for info_nce, ones for the cross-entropy); inv_t: 0-dim float32 on q's device;
    bias: (M,) or None."""

    q: torch.Tensor
    k: torch.Tensor
    rq: torch.Tensor
    rk: torch.Tensor
    inv_t: torch.Tensor
    bias: torch.Tensor | None = None


def scores(q: torch.Tensor, k: torch.Tensor, *, rq: torch.Tensor | None = None, rk: torch.Tensor | None = None,
           inv_t: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Scores:
    """``Scores`` of q (B, d) against k (M, d); a scale left out is one."""
    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float32, device=q.device)
    return Scores(q, k, ones(q.shape[0]) if rq is None else rq, ones(k.shape[0]) if rk is None else rk,
                  ones() if inv_t is None else inv_t, bias)


@dataclass(frozen=True)
class ProductsOptions:
    """What ``backward_products`` computes beyond dq and dk, and in how much memory.

    symmetric: the column softmax terms of dLoss/dS (col_lse, col_w, col_center are read).
    normalize_k: dk through the backward of k / |k| (rk the inverse norms).
    bias_grad: return dbias (rq and rk must then be ones).
    budget: bytes the tiled engine's temporaries may take (``_tiled_lse.scratch_budget``)."""

    symmetric: bool = False
    normalize_k: bool = False
    bias_grad: bool = False
    budget: int = 0


_FP32_OUT: dict[str, bool] = {}  # per device: whether torch.addmm(out_dtype=float32) works there


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
    """float32 a (n, k) @ b (k, m) into ``out`` (n, m) float32 (a new one when None), plus ``out``'s
    values when ``accumulate``. Products of two half-precision operands of one dtype are summed in
    float32 by cuBLAS (``out_dtype``) where this torch offers it; anything else (mixed dtypes, CPU,
    an older torch) is multiplied in float32 copies."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    beta = 1 if accumulate else 0
    if a.dtype == b.dtype != torch.float32 and a.is_cuda and _FP32_OUT.get(str(a.device), True):
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, beta=beta, out=out)
            _FP32_OUT[str(a.device)] = True
            return out
        except (RuntimeError, TypeError) as exc:
            _FP32_OUT[str(a.device)] = False
            warnings.warn(f"torch.addmm(out_dtype=torch.float32) failed on {a.device} ({exc}); the losses fall "
                          "back to float32 copies of the operands: slower, and more memory than planned", stacklevel=2)
    return torch.addmm(out, a.float(), b.float(), beta=beta, out=out)


def engine(rows: int, cols: int) -> ModuleType:
    """The engine for a (rows, cols) score matrix: ``_dense_lse`` where its float32 scores fit the
    dense budget (``_dense_lse.fits``), else ``_tiled_lse``."""
    from . import _dense_lse, _tiled_lse  # they import this module's types
    return _dense_lse if _dense_lse.fits(rows, cols) else _tiled_lse


def forward_lse(s: Scores, *, labels: torch.Tensor, symmetric: bool = False,
                budget: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse (B,), pos (B,), col_lse (M,) or (0,)), float32: the row log-sum-exp of S, each row's
    score at its label ``labels`` (B,) int64 (0 where the label is outside [0, M)), and for
    ``symmetric`` the column log-sum-exp."""
    return engine(s.q.shape[0], s.k.shape[0]).forward_lse(s, labels=labels, symmetric=symmetric, budget=budget)


def backward_products(s: Scores, *, labels: torch.Tensor, row_lse: torch.Tensor, row_w: torch.Tensor,
                      g: torch.Tensor, row_center: torch.Tensor | None = None, col_lse: torch.Tensor | None = None,
                      col_w: torch.Tensor | None = None, col_center: torch.Tensor | None = None,
                      options: ProductsOptions = ProductsOptions()
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The gradients through S of a loss whose dLoss/dS is row_w[i] p_row + col_w[j] p_col - g[i]
    [j is i's label], p_row = exp(S - row_lse[i]) and p_col = exp(S - col_lse[j]) (the column
    terms only with ``options.symmetric``); row_lse, row_w, g, row_center (B,) and col_lse,
    col_w, col_center (M,) float32; a centre left out is zero.

    Returns (dq, dk, dbias, part): dq (B, d) as rq * dLoss/d(q rq), float32 or q's dtype; dk like
    k, through the backward of k / |k| with ``options.normalize_k``; dbias (M,) float32 with
    ``options.bias_grad``, else None; part (0-dim), the softmax terms of sum(coef * (S - bias)),
    each centred on a value of its row or column: sum(row_w[i] p_row (S - bias - row_center[i]) +
    col_w[j] p_col (S - bias - col_center[j])).

    Centred, because sum(p * S) is the difference of large nearly equal sums when every score is
    near one large value (all-positive embeddings: cosines near 0.75 over a temperature of 0.07):
    an error of e in a row's LSE, through sum(p) = 1 - e, gives sum(p * S) an error of e * S;
    with centres near the scores (the label score) it is e * (S - centre). Then sum(coef * (S -
    bias)) = part + sum(row_w row_center) + sum(col_w col_center) - sum(g * label score), which
    the caller forms without the large sums (info_nce: zero but for repeated labels)."""
    if not options.symmetric:
        col_lse = col_w = col_center = row_lse.new_empty(0)
    elif col_lse is None or col_w is None:
        raise ValueError("options.symmetric needs col_lse and col_w")
    if row_center is None:
        row_center = torch.zeros_like(row_lse)
    if col_center is None:
        col_center = torch.zeros_like(col_lse)
    return engine(s.q.shape[0], s.k.shape[0]).backward_products(
        s, labels=labels, row_lse=row_lse, row_w=row_w, g=g, row_center=row_center, col_lse=col_lse, col_w=col_w,
        col_center=col_center, options=options)
