"""Pure-PyTorch ``info_nce``, chunked: the test oracle and the CPU backend.

Scores are computed a (chunk x chunk) tile at a time, forward and backward, so memory stays
O((B + M) * d) and the (B, M) score matrix never exists, however large the batch.
"""
from __future__ import annotations

import torch


def _tiles(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _lse_over(rows: torch.Tensor, cols: torch.Tensor, inv_t: torch.Tensor, chunk: int) -> torch.Tensor:
    """logsumexp_j(rows_i . cols_j * inv_t) for every row i, one tile at a time."""
    lse = torch.full((rows.shape[0],), float("-inf"), dtype=rows.dtype, device=rows.device)
    for c0, c1 in _tiles(cols.shape[0], chunk):
        for r0, r1 in _tiles(rows.shape[0], chunk):
            tile = (rows[r0:r1] @ cols[c0:c1].T) * inv_t
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(tile, 1))
    return lse


class _ChunkedInfoNCE(torch.autograd.Function):
    """Per-query losses ``(B,)`` of normalized-or-not embeddings; see ``info_nce_reference``."""

    @staticmethod
    def forward(ctx, query, docs, hard, labels, inv_t, symmetric: bool, chunk: int):
        positives = docs[labels]                                           # (B, d)
        pos = (query * positives).sum(-1) * inv_t                          # (B,)
        row_lse = _lse_over(query, docs, inv_t, chunk)
        if hard.shape[1]:
            hard_scores = torch.einsum("bd,bkd->bk", query, hard) * inv_t  # (B, K)
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(hard_scores, 1))
        loss = row_lse - pos
        col_lse = _lse_over(positives, query, inv_t, chunk) if symmetric else row_lse.new_zeros(0)
        if symmetric:
            loss = 0.5 * (row_lse + col_lse) - pos
        ctx.save_for_backward(query, docs, hard, labels, inv_t, row_lse, col_lse)
        ctx.symmetric, ctx.chunk = symmetric, chunk
        return loss

    @staticmethod
    def backward(ctx, grad):
        query, docs, hard, labels, inv_t, row_lse, col_lse = ctx.saved_tensors
        chunk, w = ctx.chunk, (0.5 if ctx.symmetric else 1.0)
        dq, ddocs, dhard = torch.zeros_like(query), torch.zeros_like(docs), torch.zeros_like(hard)
        dinv_t = torch.zeros((), dtype=query.dtype, device=query.device)
        positives = docs[labels]
        g = grad * w  # weight of each softmax direction in query i's loss

        # Row direction: query i against every doc (softmax over the row, weight g_i).
        for c0, c1 in _tiles(docs.shape[0], chunk):
            for r0, r1 in _tiles(query.shape[0], chunk):
                raw = query[r0:r1] @ docs[c0:c1].T
                coef = torch.exp(raw * inv_t - row_lse[r0:r1, None]) * g[r0:r1, None]   # dL/dscore
                dq[r0:r1] += coef @ docs[c0:c1] * inv_t
                ddocs[c0:c1] += coef.T @ query[r0:r1] * inv_t
                dinv_t += (coef * raw).sum()
        if hard.shape[1]:
            raw = torch.einsum("bd,bkd->bk", query, hard)
            coef = torch.exp(raw * inv_t - row_lse[:, None]) * g[:, None]
            dq += torch.einsum("bk,bkd->bd", coef, hard) * inv_t
            dhard = coef[:, :, None] * query[:, None, :] * inv_t
            dinv_t += (coef * raw).sum()
        # Column direction: query i's positive against every query (weight g_i).
        if ctx.symmetric:
            dpos = torch.zeros_like(positives)
            for c0, c1 in _tiles(query.shape[0], chunk):
                for r0, r1 in _tiles(positives.shape[0], chunk):
                    raw = positives[r0:r1] @ query[c0:c1].T
                    coef = torch.exp(raw * inv_t - col_lse[r0:r1, None]) * g[r0:r1, None]
                    dpos[r0:r1] += coef @ query[c0:c1] * inv_t
                    dq[c0:c1] += coef.T @ positives[r0:r1] * inv_t
                    dinv_t += (coef * raw).sum()
            ddocs.index_add_(0, labels, dpos)
        # The positive score, subtracted once in either case.
        raw = (query * positives).sum(-1)
        dq -= grad[:, None] * positives * inv_t
        ddocs.index_add_(0, labels, -grad[:, None] * query * inv_t)
        dinv_t -= (grad * raw).sum()
        return dq, ddocs, dhard, None, dinv_t, None, None


def info_nce_reference(query: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor,
                       temperature: float | torch.Tensor, hard_negatives: torch.Tensor | None = None,
                       symmetric: bool = False, normalize: bool = True, reduction: str = "mean",
                       chunk: int = 1024) -> torch.Tensor:
    """InfoNCE of ``query`` (B, d) against the shared ``docs`` (M, d) and each query's own
    ``hard_negatives`` (B, K, d); ``labels`` (B,) int64 index each query's positive in ``docs``.
    Computes in float32 (float64 for float64 input); returns a float32 (float64) loss. Inputs are
    assumed valid (``moca_kernels.info_nce`` checks them)."""
    acc = torch.promote_types(query.dtype, torch.float32)
    q, d = query.to(acc), docs.to(acc)
    h = hard_negatives.to(acc) if hard_negatives is not None else q.new_zeros(q.shape[0], 0, q.shape[1])
    if normalize:
        q, d, h = (torch.nn.functional.normalize(x, dim=-1) for x in (q, d, h))
    t = temperature.to(acc) if isinstance(temperature, torch.Tensor) else torch.tensor(temperature, dtype=acc,
                                                                                        device=q.device)
    losses = _ChunkedInfoNCE.apply(q, d, h, labels, 1.0 / t, symmetric, chunk)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
