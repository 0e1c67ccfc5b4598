"""Pure-PyTorch ``linear_cross_entropy``, chunked over rows and vocabulary, forward and backward,
so that the (N, V) logits never exist: the test oracle and the CPU backend."""
from __future__ import annotations

import torch


def _chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-row losses (N,) of rows whose labels all index the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int, vocab: int):
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        for v0, v1 in _chunks(weight.shape[0], vocab):
            for r0, r1 in _chunks(hidden.shape[0], rows):
                logits = hidden[r0:r1] @ weight[v0:v1].T
                if bias is not None:
                    logits += bias[v0:v1]
                lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(logits, 1))
        target = (hidden * weight[labels]).sum(-1)
        if bias is not None:
            target = target + bias[labels]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.rows, ctx.vocab = rows, vocab
        return lse - target

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dh, dw = torch.zeros_like(hidden), torch.zeros_like(weight)
        db = torch.zeros_like(bias) if bias is not None else None
        for v0, v1 in _chunks(weight.shape[0], ctx.vocab):
            for r0, r1 in _chunks(hidden.shape[0], ctx.rows):
                logits = hidden[r0:r1] @ weight[v0:v1].T
                if bias is not None:
                    logits += bias[v0:v1]
                coef = torch.exp(logits - lse[r0:r1, None]) * grad[r0:r1, None]  # softmax part
                dh[r0:r1] += coef @ weight[v0:v1]
                dw[v0:v1] += coef.T @ hidden[r0:r1]
                if db is not None:
                    db[v0:v1] += coef.sum(0)
        # the target logit's part, subtracted once
        dh -= grad[:, None] * weight[labels]
        dw.index_add_(0, labels, -grad[:, None] * hidden)
        if db is not None:
            db.index_add_(0, labels, -grad)
        return dh, dw, db, None, None, None


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", rows: int = 1024, vocab: int = 8192) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, in float32 (float64 for
    float64 input), a (rows x vocab) block of logits at a time. Rows labelled ``ignore_index``
    count nowhere: "mean" is over the others (0.0 when there are none), "none" gives them 0.
    Inputs are assumed valid (``moca_kernels.linear_cross_entropy`` checks them)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    valid = labels != ignore_index
    index = valid.nonzero().squeeze(1)
    h, w = hidden.index_select(0, index).to(acc), weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    losses = _ChunkedLinearCE.apply(h, w, b, labels[index], rows, vocab)
    if reduction == "none":
        return torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device).index_put((index,), losses)
    total = losses.sum()
    return total if reduction == "sum" else total / max(1, index.numel())
