"""Triton ``info_nce`` on the tiled log-sum-exp engine (``moca_kernels._tiled_lse``): S = q docs^T
with q and docs scaled by their inverse norms (``normalize``) and 1/t, row LSE and, for
``symmetric``, column LSE in one forward pass over the tiles; the backward recomputes each tile
once (8 * B * M * d FLOPs in all).

``normalize`` never materializes normalized copies: the kernels scale by the inverse norms, and
the backward of the normalization is applied to the O((B + M) d) results. Hard negatives (B*K*d,
private to their query) are scored in float32 PyTorch, a row chunk at a time. Temporaries stay
within ``SCRATCH_FRACTION`` of the inputs plus their gradients, so that peak memory stays near
1.1x of that floor at every batch size. Score matrices within ``_dense_lse.DENSE_MAX_BYTES``
take the dense engine instead (one cuBLAS product each way, a few launches in all).
"""
from __future__ import annotations

import torch

from .. import _dense_lse, _lse_engine
from .._lse_engine import ProductsOptions
from .._tiled_lse import _remove_radial, _row_chunks, scratch_budget

# Temporaries (partial LSEs, E, float32 accumulators) may take this fraction of the bytes of the
# inputs plus their gradients. Tests lower it to force many chunks on small problems.
SCRATCH_FRACTION = 0.1


def _rows_budget(batch: int, m: int, budget: int) -> int:
    """Bytes for the O(rows * d) temporaries of the row loops (inverse norms, hard negatives, the
    normalization's backward). A problem within the dense budget is small by definition: its row
    loops run in one chunk instead of many tiny ones of a few launches each."""
    return 1 << 62 if _dense_lse.fits(batch, m) else budget


def inverse_norms(x: torch.Tensor, normalize: bool, budget: int) -> torch.Tensor:
    """float32 1/||x|| over the last dimension (ones when not normalizing), a chunk at a time."""
    flat = x.reshape(-1, x.shape[-1])
    rows = max(1, budget // max(1, 4 * x.shape[-1]))
    if normalize and rows >= flat.shape[0]:  # one chunk: three launches, no copy
        norm = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32)
        return norm.clamp_min_(1e-12).reciprocal_().reshape(x.shape[:-1])  # normalize's eps
    out = torch.ones(flat.shape[0], dtype=torch.float32, device=x.device)
    if normalize:
        for r0, r1 in _row_chunks(flat.shape[0], rows):
            norm = torch.linalg.vector_norm(flat[r0:r1].float(), dim=-1)
            out[r0:r1] = 1.0 / norm.clamp_min(1e-12)  # torch.nn.functional.normalize's eps
    return out.reshape(x.shape[:-1])


def _hard_scores(q, hard, rq, rh, inv_t):
    """float32 scores (rows, K) of each query against its own hard negatives."""
    raw = torch.einsum("bd,bkd->bk", q.float(), hard.float())
    return raw * rq[:, None] * rh * inv_t


def forward(q, docs, hard, labels, inv_t, symmetric: bool, normalize: bool):
    """Per-query losses (B,) float32, and what the backward needs: row LSE (B,), column LSE
    (M,) (empty unless symmetric), the positive scores (B,) and the inverse norms of q, docs and
    hard."""
    batch, dim = q.shape
    budget = scratch_budget(SCRATCH_FRACTION, q, docs, hard)
    rows_budget = _rows_budget(batch, docs.shape[0], budget)
    rq, rk, rh = (inverse_norms(x, normalize, rows_budget) for x in (q, docs, hard))
    scores = _lse_engine.scores(q, docs, rq=rq, rk=rk, inv_t=inv_t)
    row_lse, pos, col_lse = _lse_engine.forward_lse(scores, labels=labels, symmetric=symmetric, budget=budget)
    if hard.shape[1]:
        per_row = 4 * hard.shape[1] * dim * 2 + 4 * dim
        for r0, r1 in _row_chunks(batch, max(1, rows_budget // per_row)):
            scores = _hard_scores(q[r0:r1], hard[r0:r1], rq[r0:r1], rh[r0:r1], inv_t)
            row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(scores, 1))
    loss = row_lse - pos
    if symmetric:
        loss = 0.5 * (row_lse + col_lse[labels]) - pos
    return loss, row_lse, col_lse, pos, rq, rk, rh


def backward(grad, q, docs, hard, labels, inv_t, row_lse, col_lse, pos, rq, rk, rh, symmetric: bool,
             normalize: bool):
    """Gradients (dq, ddocs, dhard, dinv_t) of sum(grad * losses).

    The gradient of inv_t, sum(coef * S) / inv_t, sums the softmax terms centred on each query's
    positive score (``backward_products``): sum_i grad_i (E_p[S_i] - pos_i), without taking the
    difference of two sums of the size of S. In the column direction a doc is centred on the
    positive score of a query whose label it is; the difference from that query's own is added
    back once."""
    batch, dim = q.shape
    m, k = docs.shape[0], hard.shape[1]
    grad = grad.float()
    row_w = grad * (0.5 if symmetric else 1.0)
    col_w = col_center = None
    if symmetric:  # a doc's column weighs as much as the queries whose positive it is
        col_w = pos.new_zeros(m).index_add_(0, labels, row_w)
        col_center = pos.new_zeros(m).scatter_reduce_(0, labels, pos, "amax", include_self=False)  # deterministic
    budget = scratch_budget(SCRATCH_FRACTION, q, docs, hard)
    rows_budget = _rows_budget(batch, m, budget)
    dq, ddocs, _, part = _lse_engine.backward_products(
        _lse_engine.scores(q, docs, rq=rq, rk=rk, inv_t=inv_t), labels=labels, row_lse=row_lse, row_w=row_w, g=grad,
        row_center=pos, col_lse=col_lse, col_w=col_w, col_center=col_center,
        options=ProductsOptions(symmetric=symmetric, normalize_k=normalize, budget=budget))
    if symmetric:  # zero for each query whose column is centred on its own positive
        part = part + (row_w * (col_center[labels] - pos)).sum()
    dinv_t = part / inv_t.reshape(())
    dhard = torch.empty_like(hard)
    if k:  # the hard negatives' share of the query gradient, and theirs
        per_row = 4 * dim * (4 + 5 * k)  # float32 temporaries
        for r0, r1 in _row_chunks(batch, max(1, rows_budget // per_row)):
            unit_q = q[r0:r1].to(torch.float32, copy=True)
            unit_q *= rq[r0:r1, None]
            unit_h = hard[r0:r1].to(torch.float32, copy=True)
            unit_h *= rh[r0:r1, :, None]
            scores = torch.bmm(unit_h, unit_q[:, :, None])[:, :, 0] * inv_t
            coef = row_w[r0:r1, None] * torch.exp(scores - row_lse[r0:r1, None])
            dinv_t = dinv_t + (coef * (scores - pos[r0:r1, None])).sum() / inv_t.reshape(())
            grad_q = dq[r0:r1].float()  # rq * dLoss/d(q / |q|) so far
            grad_q += torch.bmm(coef[:, None, :], unit_h)[:, 0] * (inv_t * rq[r0:r1, None])
            dq[r0:r1] = grad_q
            grad_h = coef[:, :, None] * unit_q[:, None, :] * inv_t
            if normalize:
                grad_h -= unit_h * (unit_h * grad_h).sum(-1, keepdim=True)
                grad_h *= rh[r0:r1, :, None]
            dhard[r0:r1] = grad_h
            del unit_q, unit_h, grad_q, grad_h  # before the next chunk allocates its own
    if normalize:
        _remove_radial(dq, q, rq, rows_budget // (8 * dim))
    return dq.to(q.dtype), ddocs, dhard, dinv_t.reshape(inv_t.shape)
