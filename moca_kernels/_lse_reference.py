"""The log-sum-exp engines in plain PyTorch, on whole rows and columns of S in a chosen precision:
``forward_lse`` and ``backward_products`` of ``_lse_engine`` for any subset of S's rows and columns.

``_lse_engine`` uses it three ways: in float64 on a few rows and columns of a call, the truth an
engine's results are checked against; with the products in the inputs' dtype, the plain PyTorch
computation whose error sets the bound (the numerics rule of ``_verify``); and in float32 on every
row and column, a chunk at a time, the engine of last resort when both Triton-path engines disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._lse_engine import ProductsOptions, Scores, Softmaxes

# A block of S, or a slice of q or k in the product's dtype, holds at most this many elements.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Precision:
    """product: the dtype q and k are multiplied in (its result is rounded to it); accumulate: the
    dtype of everything else."""

    product: torch.dtype
    accumulate: torch.dtype


FLOAT64 = Precision(torch.float64, torch.float64)
FLOAT32 = Precision(torch.float32, torch.float32)


def plain(dtype: torch.dtype) -> Precision:
    """Plain PyTorch: products in the inputs' ``dtype``, the softmax in float32."""
    return Precision(dtype, torch.float32)


def _chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """a (n, K) @ b (m, K)^T (n, m) in ``dtype``, converted to ``out_dtype``, walking b's rows."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    a = a.to(dtype)
    for r0, r1 in _chunks(b.shape[0], b.shape[1]):
        out[:, r0:r1] = a @ b[r0:r1].to(dtype).T
    return out


def _contract(e: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """e (n, m) @ x (m, d) in ``dtype`` (each chunk's product rounded to it), summed in ``out_dtype``."""
    out = torch.zeros(e.shape[0], x.shape[1], dtype=out_dtype, device=e.device)
    for r0, r1 in _chunks(x.shape[0], x.shape[1]):
        out += (e[:, r0:r1].to(dtype) @ x[r0:r1].to(dtype)).to(out_dtype)
    return out


def _rows(s: Scores, rows: torch.Tensor, p: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(S[rows, :] without the bias, with it), (r, M) in p.accumulate."""
    raw = _product(s.q[rows], s.k, p.product, p.accumulate)
    acc = p.accumulate
    scaled = raw.mul_((s.rq[rows].to(acc) * s.inv_t.to(acc))[:, None]).mul_(s.rk.to(acc)[None, :])
    return scaled, scaled + s.bias.to(acc) if s.bias is not None else scaled


def _cols(s: Scores, cols: torch.Tensor, p: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(S[:, cols] without the bias, with it), (B, c) in p.accumulate."""
    raw = _product(s.k[cols], s.q, p.product, p.accumulate).T
    acc = p.accumulate
    scaled = raw.mul_((s.rq.to(acc) * s.inv_t.to(acc))[:, None]).mul_(s.rk[cols].to(acc)[None, :])
    return scaled, scaled + s.bias[cols].to(acc) if s.bias is not None else scaled


def row_forward(s: Scores, labels: torch.Tensor, rows: torch.Tensor, p: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lse[rows], pos[rows]): the log-sum-exp of S's rows and their scores at their labels
    (0 where a label is outside [0, M))."""
    _, biased = _rows(s, rows, p)
    label = labels[rows]
    inside = (label >= 0) & (label < s.k.shape[0])
    pos = biased.gather(1, label.clamp(0, s.k.shape[0] - 1)[:, None])[:, 0]
    return torch.logsumexp(biased, 1), torch.where(inside, pos, 0.0)


def col_forward(s: Scores, cols: torch.Tensor, p: Precision) -> torch.Tensor:
    """col_lse[cols]: the log-sum-exp of S's columns."""
    return torch.logsumexp(_cols(s, cols, p)[1], 0)


def row_backward(s: Scores, w: Softmaxes, rows: torch.Tensor, symmetric: bool,
                 p: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq[rows] (r, d) as rq * dLoss/d(q rq), part's share of these rows (0-dim)), p.accumulate."""
    scaled, biased = _rows(s, rows, p)
    acc = p.accumulate
    coef = torch.exp(biased - w.row_lse[rows].to(acc)[:, None]) * w.row_w[rows].to(acc)[:, None]
    part = (coef * (scaled - w.row_center[rows].to(acc)[:, None])).sum()
    if symmetric:
        p_col = torch.exp(biased - w.col_lse.to(acc)[None, :]) * w.col_w.to(acc)[None, :]
        part = part + (p_col * (scaled - w.col_center.to(acc)[None, :])).sum()
        coef += p_col
    label = w.labels[rows]
    inside = (label >= 0) & (label < s.k.shape[0])
    coef.scatter_add_(1, label.clamp(0, s.k.shape[0] - 1)[:, None], torch.where(inside, -w.g[rows].to(acc), 0)[:, None])
    e = coef * (s.rq[rows].to(acc) * s.inv_t.to(acc))[:, None] * s.rk.to(acc)[None, :]
    return _contract(e, s.k, p.product, acc), part


def col_backward(s: Scores, w: Softmaxes, cols: torch.Tensor, options: ProductsOptions,
                 p: Precision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dk[cols] (c, d), through the backward of k / |k| with ``options.normalize_k``; dbias[cols]
    (c,) with ``options.bias_grad``, else None), p.accumulate."""
    _, biased = _cols(s, cols, p)
    acc = p.accumulate
    coef = torch.exp(biased - w.row_lse.to(acc)[:, None]) * w.row_w.to(acc)[:, None]
    if options.symmetric:
        coef += torch.exp(biased - w.col_lse[cols].to(acc)[None, :]) * w.col_w[cols].to(acc)[None, :]
    coef -= torch.where(w.labels[:, None] == cols[None, :], w.g.to(acc)[:, None], 0)
    dbias = coef.sum(0) if options.bias_grad else None
    e = coef * (s.rq.to(acc) * s.inv_t.to(acc))[:, None] * s.rk[cols].to(acc)[None, :]
    dk = _contract(e.T, s.q, p.product, acc)
    if options.normalize_k:
        unit = s.k[cols].to(acc) * s.rk[cols].to(acc)[:, None]
        dk -= unit * (unit * dk).sum(-1, keepdim=True)
    return dk, dbias


def forward_lse(s: Scores, *, labels: torch.Tensor, symmetric: bool,
                budget: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``_lse_engine.forward_lse``, in float32 a block of rows (and columns) at a time."""
    batch, m = s.q.shape[0], s.k.shape[0]
    row_lse = torch.empty(batch, dtype=torch.float32, device=s.q.device)
    pos = torch.empty_like(row_lse)
    for r0, r1 in _chunks(batch, m):
        row_lse[r0:r1], pos[r0:r1] = row_forward(s, labels, torch.arange(r0, r1, device=s.q.device), FLOAT32)
    col_lse = row_lse.new_empty(m if symmetric else 0)
    if symmetric:
        for c0, c1 in _chunks(m, batch):
            col_lse[c0:c1] = col_forward(s, torch.arange(c0, c1, device=s.q.device), FLOAT32)
    return row_lse, pos, col_lse


def backward_products(s: Scores, *, labels: torch.Tensor, row_lse: torch.Tensor, row_w: torch.Tensor,
                      g: torch.Tensor, row_center: torch.Tensor, col_lse: torch.Tensor, col_w: torch.Tensor,
                      col_center: torch.Tensor, options: ProductsOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """As ``_lse_engine.backward_products``, in float32 a block of rows, then of columns, at a time."""
    batch, m = s.q.shape[0], s.k.shape[0]
    w = Softmaxes(labels, row_lse, row_w, g, row_center, col_lse, col_w, col_center)
    device = s.q.device
    dq = torch.empty(batch, s.q.shape[1], dtype=torch.float32, device=device)
    part = torch.zeros((), dtype=torch.float32, device=device)
    for r0, r1 in _chunks(batch, m):
        dq[r0:r1], share = row_backward(s, w, torch.arange(r0, r1, device=device), options.symmetric, FLOAT32)
        part += share
    dk = torch.empty(m, s.k.shape[1], dtype=torch.float32, device=device)
    dbias = torch.empty(m, dtype=torch.float32, device=device) if options.bias_grad else None
    for c0, c1 in _chunks(m, batch):
        dk[c0:c1], bias_share = col_backward(s, w, torch.arange(c0, c1, device=device), options, FLOAT32)
        if dbias is not None:
            dbias[c0:c1] = bias_share
    return dq, dk.to(s.k.dtype), dbias, part
