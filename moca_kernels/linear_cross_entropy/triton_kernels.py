"""Triton ``linear_cross_entropy`` on the tiled log-sum-exp engine (``moca_kernels._tiled_lse``):
the rows of ``hidden`` against the rows of the LM head's ``weight`` (plus ``bias``), each row's
log-sum-exp over the vocabulary and its target logit in one pass over (128 x 128) tiles, the
logits never stored; the backward recomputes each tile once into dLoss/dlogits and two cuBLAS
products give the gradients. The weight gradient accumulates in float32 over all rows of a
vocabulary chunk before it is written; the hidden gradient in float32 where it fits half the
scratch budget (N * H * 4 bytes), else in the input dtype with one rounding per vocabulary chunk.
A few rows whose (N, V) float32 logits fit ``_dense_lse.DENSE_MAX_BYTES`` take the dense engine.
"""
from __future__ import annotations

import torch

from .. import _dense_lse, _tiled_lse
from .._tiled_lse import scratch_budget

# Temporaries may take this fraction of the bytes of hidden and weight plus their gradients.
SCRATCH_FRACTION = 0.1


def _ones(n: int, device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32, device=device)


def forward(hidden, weight, bias, labels):
    """(per-row losses (N,) float32, row log-sum-exp (N,) float32). Every label indexes weight."""
    budget = scratch_budget(SCRATCH_FRACTION, hidden, weight)
    one = torch.ones((), dtype=torch.float32, device=hidden.device)
    engine = _dense_lse if _dense_lse.fits(hidden.shape[0], weight.shape[0]) else _tiled_lse
    lse, target, _ = engine.forward_lse(hidden, weight, _ones(hidden.shape[0], hidden.device),
                                        _ones(weight.shape[0], hidden.device), bias, labels, one, False, budget)
    return lse - target, lse


def backward(grad, hidden, weight, bias, labels, lse):
    """(d hidden, d weight, d bias or None) of sum(grad * losses)."""
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias) if bias is not None else None
    grad = grad.float()
    budget = scratch_budget(SCRATCH_FRACTION, hidden, weight)
    one = torch.ones((), dtype=torch.float32, device=hidden.device)
    no_columns = torch.zeros(v, dtype=torch.float32, device=hidden.device)
    engine = _dense_lse if _dense_lse.fits(n, v) else _tiled_lse
    dh, dw, db, _ = engine.backward_products(hidden, weight, _ones(n, hidden.device), _ones(v, hidden.device), bias,
                                             labels, one, lse, grad, grad, no_columns, no_columns, lse, no_columns,
                                             False, False, budget, want_bias_grad=bias is not None)
    return dh.to(hidden.dtype), dw, db.to(bias.dtype) if bias is not None else None
