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

from .. import _lse_engine
from .._tiled_lse import scratch_budget

# Temporaries may take this fraction of the bytes of hidden and weight plus their gradients.
SCRATCH_FRACTION = 0.1


def forward(hidden, weight, bias, labels):
    """(per-row losses (N,) float32, row log-sum-exp (N,) float32) of hidden (N, H) against
    weight (V, H) and bias (V,) or None. A label outside [0, V) matches no column."""
    logits = _lse_engine.scores(hidden, weight, bias=bias)
    lse, target, _ = _lse_engine.forward_lse(logits, labels=labels,
                                             budget=scratch_budget(SCRATCH_FRACTION, hidden, weight))
    return lse - target, lse


def backward(grad, hidden, weight, bias, labels, lse):
    """(d hidden, d weight, d bias or None) of sum(grad * losses): dLoss/dlogits is grad * softmax
    minus grad at the target."""
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias) if bias is not None else None
    grad = grad.float()
    options = _lse_engine.ProductsOptions(bias_grad=bias is not None,
                                          budget=scratch_budget(SCRATCH_FRACTION, hidden, weight))
    dh, dw, db, _ = _lse_engine.backward_products(_lse_engine.scores(hidden, weight, bias=bias), labels=labels,
                                                  row_lse=lse, row_w=grad, g=grad, options=options)
    return dh.to(hidden.dtype), dw, db.to(bias.dtype) if bias is not None else None
