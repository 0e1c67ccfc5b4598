"""``linear_cross_entropy``: validation, backend choice, the ``torch.library`` ops of the Triton
backend, autograd."""
from __future__ import annotations

import torch

from .._registry import TORCH, TRITON, check_float_matrix, described, last_dim_contiguous, register_op, select_backend
from .reference import linear_cross_entropy_reference

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")

register_op(OP, [TRITON, TORCH])


def _triton_impl():
    from . import triton_kernels  # imported on first use: importing triton costs time
    return triton_kernels


@torch.library.custom_op("moca::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (per-row losses (N,), row log-sum-exp (N,)), float32. A label of -1 (an
    ignored row) matches no column: the row's loss is its log-sum-exp, and it receives no gradient
    where its upstream gradient is 0."""
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    with torch.cuda.device_of(hidden):
        return _triton_impl().forward(hidden, weight, bias.contiguous() if bias is not None else None, labels)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, labels):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32), hidden.new_empty(hidden.shape[0],
                                                                                    dtype=torch.float32)


@torch.library.custom_op("moca::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, labels: torch.Tensor,
                             lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (d hidden, d weight, d bias; empty without a bias) of sum(grad * losses)."""
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    with torch.cuda.device_of(hidden):
        dh, dw, db = _triton_impl().backward(grad.contiguous(), hidden, weight,
                                             bias.contiguous() if bias is not None else None, labels, lse)
    return dh, dw, db if db is not None else weight.new_empty(0)


@linear_cross_entropy_bwd.register_fake
def _(grad, hidden, weight, bias, labels, lse):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), \
        bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _unused):
    if grad is None:
        return None, None, None, None
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    dh, dw, db = linear_cross_entropy_bwd(grad, hidden, weight, bias, labels, lse)
    return dh, dw, db if bias is not None else None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(hidden, weight, labels, bias, ignore_index, reduction) -> None:
    """Shapes, dtypes and devices: checks that read no tensor's values."""
    check_float_matrix("hidden", hidden)
    check_float_matrix("weight", weight)
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(f"weight has hidden size {weight.shape[1]}, hidden has {h}")
    if weight.shape[0] == 0 or h == 0:
        raise ValueError(f"weight must have at least one row and one column, got {tuple(weight.shape)}")
    named = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {described(bias)}")
        named.append(("bias", bias))
    for name, x in named:
        if x.dtype != hidden.dtype:
            raise ValueError(f"{name} is {x.dtype} but hidden is {hidden.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
        raise ValueError(f"labels must be int64 of shape ({n},), got {described(labels)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_labels(labels, vocab: int, ignore_index: int) -> None:
    """The torch backend's check of the label values (a host synchronization on a GPU)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"labels must index the vocabulary (0 <= label < {vocab}) or equal "
                         f"ignore_index={ignore_index}; found {int(labels[bad][0])}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T (+ bias)`` against ``labels``, holding the
    ``(N, V)`` logits only where they are small (a few rows).

    Args:
        hidden: ``(N, H)``. weight: ``(V, H)``, the LM head (it may be tied to the input
            embedding: autograd adds the two gradients). bias: ``(V,)`` or None.
        labels: int64 ``(N,)``, a vocabulary index or ``ignore_index``.
        reduction: "mean" over the rows not ignored (0.0, with zero gradients, when every row is
            ignored), "sum", or "none" (``(N,)``, 0 for ignored rows).

    Returns float32 (float64 for float64 inputs on the torch backend); differentiable in hidden,
    weight and bias.

    The Triton backend reads no tensor value on the host (no synchronization): ignored rows are
    computed with the others and dropped from the result (callers with many ignored rows select
    the counted rows first, as MoCa's MLM head does), and a label that is neither a vocabulary
    index nor ``ignore_index`` makes its row's loss NaN, where the torch backend raises
    ``ValueError``. Rows whose float32 logits fit ``moca_kernels._dense_lse.DENSE_MAX_BYTES`` are
    computed densely with cuBLAS, larger ones tile by tile; the first call of a shape class checks its
    engine on a sample of the call (a host read, once: ``moca_kernels._lse_engine``).
    """
    _check(hidden, weight, labels, bias, ignore_index, reduction)
    if select_backend(OP, backend, hidden.device, hidden.dtype) == "torch":
        _check_labels(labels, weight.shape[0], ignore_index)
        return linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, reduction)
    valid = labels != ignore_index
    ok = valid & (labels.clamp(0, weight.shape[0] - 1) == labels)
    losses = linear_cross_entropy_fwd(hidden, weight, bias, torch.where(ok, labels, -1))[0]  # -1 matches no column
    losses = torch.where(ok, losses, torch.where(valid, float("nan"), 0.0))
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1)
