"""``info_nce``: validation, backend choice, and the ``torch.library`` ops of the Triton backend."""
from __future__ import annotations

import math

import torch

from .._registry import TORCH, TRITON, check_float_matrix, described, last_dim_contiguous, register_op, select_backend
from .reference import info_nce_reference

OP = "info_nce"
REDUCTIONS = ("mean", "sum", "none")

register_op(OP, [TRITON, TORCH])


def _triton_impl():
    from . import triton_kernels  # imported on first use: importing triton costs time
    return triton_kernels


@torch.library.custom_op("moca::info_nce_fwd", mutates_args=())
def info_nce_fwd(query: torch.Tensor, docs: torch.Tensor, hard: torch.Tensor, labels: torch.Tensor,
                 inv_t: torch.Tensor, symmetric: bool, normalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """Triton forward: (losses (B,), row LSE (B,), column LSE (M,) or (0,), positive scores (B,),
    1/|query| (B,), 1/|docs| (M,), 1/|hard| (B, K)), all float32. ``hard`` is (B, K, d) with K >= 0."""
    query, docs, hard = (last_dim_contiguous(x) for x in (query, docs, hard))
    with torch.cuda.device_of(query):
        return _triton_impl().forward(query, docs, hard, labels, inv_t, symmetric, normalize)


@info_nce_fwd.register_fake
def _(query, docs, hard, labels, inv_t, symmetric, normalize):
    f32 = dict(dtype=torch.float32)
    batch, m = query.shape[0], docs.shape[0]
    return (query.new_empty(batch, **f32), query.new_empty(batch, **f32), query.new_empty(m if symmetric else 0, **f32),
            query.new_empty(batch, **f32), query.new_empty(batch, **f32), query.new_empty(m, **f32),
            query.new_empty(hard.shape[:2], **f32))


@torch.library.custom_op("moca::info_nce_bwd", mutates_args=())
def info_nce_bwd(grad: torch.Tensor, query: torch.Tensor, docs: torch.Tensor, hard: torch.Tensor,
                 labels: torch.Tensor, inv_t: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                 pos: torch.Tensor, rq: torch.Tensor, rk: torch.Tensor, rh: torch.Tensor, symmetric: bool,
                 normalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of sum(grad * losses) for query, docs, hard and inv_t."""
    query, docs, hard = (last_dim_contiguous(x) for x in (query, docs, hard))
    with torch.cuda.device_of(query):
        return _triton_impl().backward(grad.contiguous(), query, docs, hard, labels, inv_t, row_lse, col_lse,
                                       pos, rq, rk, rh, symmetric, normalize)


@info_nce_bwd.register_fake
def _(grad, query, docs, hard, labels, inv_t, row_lse, col_lse, pos, rq, rk, rh, symmetric, normalize):
    return query.new_empty(query.shape), docs.new_empty(docs.shape), hard.new_empty(hard.shape), \
        inv_t.new_empty(inv_t.shape)


def _setup_context(ctx, inputs, output):
    query, docs, hard, labels, inv_t, symmetric, normalize = inputs
    _, row_lse, col_lse, pos, rq, rk, rh = output
    ctx.save_for_backward(query, docs, hard, labels, inv_t, row_lse, col_lse, pos, rq, rk, rh)
    ctx.symmetric, ctx.normalize = symmetric, normalize
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):
    if grad is None:
        return None, None, None, None, None, None, None
    query, docs, hard, labels, inv_t, row_lse, col_lse, pos, rq, rk, rh = ctx.saved_tensors
    dq, ddocs, dhard, dinv_t = info_nce_bwd(grad, query, docs, hard, labels, inv_t, row_lse, col_lse, pos, rq, rk,
                                            rh, ctx.symmetric, ctx.normalize)
    return dq, ddocs, dhard, None, dinv_t, None, None


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def _info_nce_triton(query, docs, labels, temperature, hard, symmetric, normalize, reduction):
    """The Triton path without a host synchronization: labels and a tensor temperature are checked
    on the device, a bad one turning the losses it touches into NaN (never an out-of-range read)."""
    if hard is None:
        hard = query.new_empty(query.shape[0], 0, query.shape[1])
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=query.device, dtype=torch.float32)
        inv_t = torch.where(t > 0, 1.0 / t, float("nan"))
    else:  # a fill, not a copy from host memory (which would wait for the stream)
        inv_t = torch.full((), 1.0 / temperature, dtype=torch.float32, device=query.device)
    safe = labels.clamp(0, docs.shape[0] - 1)
    losses = info_nce_fwd(query, docs, hard, safe, inv_t, symmetric, normalize)[0]
    losses = losses.masked_fill(safe != labels, float("nan"))
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def _check(query, docs, labels, hard_negatives, temperature, reduction) -> None:
    """Shapes, dtypes, devices, and a float temperature: checks that read no tensor's values."""
    check_float_matrix("query", query)
    check_float_matrix("docs", docs)
    batch, dim = query.shape
    if batch == 0 or docs.shape[0] == 0:
        raise ValueError(f"query and docs need at least one row, got {batch} and {docs.shape[0]}")
    if docs.shape[1] != dim:
        raise ValueError(f"docs has embedding size {docs.shape[1]}, query has {dim}")
    tensors = [("docs", docs)]
    if hard_negatives is not None:
        if not isinstance(hard_negatives, torch.Tensor) or hard_negatives.dim() != 3 \
                or hard_negatives.shape[0] != batch or hard_negatives.shape[2] != dim:
            shape = tuple(hard_negatives.shape) if isinstance(hard_negatives, torch.Tensor) else hard_negatives
            raise ValueError(f"hard_negatives must have shape ({batch}, K, {dim}), got {shape}")
        tensors.append(("hard_negatives", hard_negatives))
    for name, x in tensors:
        if x.dtype != query.dtype:
            raise ValueError(f"{name} is {x.dtype} but query is {query.dtype}")
        if x.device != query.device:
            raise ValueError(f"{name} is on {x.device} but query is on {query.device}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (batch,):
        raise ValueError(f"labels must be int64 of shape ({batch},), got {described(labels)}")
    if labels.device != query.device:
        raise ValueError(f"labels is on {labels.device} but query is on {query.device}")
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature must be a float or a 0-dim floating tensor, got {tuple(temperature.shape)} "
                             f"{temperature.dtype}")
    elif not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be positive and finite, got {float(temperature)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_values(docs, labels, temperature) -> None:
    """The checks that read tensor values (a host synchronization on a GPU): the torch backend's."""
    if bool(((labels < 0) | (labels >= docs.shape[0])).any()):
        raise ValueError(f"labels must index docs (0 <= label < {docs.shape[0]})")
    if isinstance(temperature, torch.Tensor):
        value = float(temperature.detach())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature must be positive and finite, got {value}")


def info_nce(query: torch.Tensor, docs: torch.Tensor, *, temperature: float | torch.Tensor = 0.03,
             labels: torch.Tensor | None = None, hard_negatives: torch.Tensor | None = None, symmetric: bool = False,
             normalize: bool = True, reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """InfoNCE with in-batch and hard negatives, holding the (B, M) score matrix only where it is small.

    Args:
        query: ``(B, d)``. docs: ``(M, d)`` candidates shared by every query.
        labels: int64 ``(B,)``, the index of each query's positive in ``docs`` (default
            ``arange(B)``, which needs ``M >= B``).
        hard_negatives: ``(B, K, d)``, scored only against their own query.
        temperature: a float, or a 0-dim tensor that receives a gradient.
        symmetric: the mean of the two directions: each query against all docs and its hard
            negatives, and each query's positive against every query.
        normalize: L2-normalize every embedding first (scores are cosines).
        reduction: "mean" (over queries), "sum" or "none" (``(B,)``).

    The loss of query i is ``logsumexp(s(i, docs) ++ s(i, hard_negatives[i])) - s(i, docs[labels[i]])``
    with ``s = score / temperature``. Differentiable in every tensor input.

    The Triton backend reads no tensor value on the host (no synchronization): a label outside
    ``[0, M)`` makes that query's loss NaN, and a tensor temperature that is not positive makes
    every loss NaN, where the torch backend raises ``ValueError``. It computes score matrices of
    up to ``moca_kernels._dense_lse.DENSE_MAX_BYTES`` (64 MiB of float32) densely with cuBLAS, the
    larger ones tile by tile; the first call of a shape class checks its engine on a sample of the
    call (a host read, once: ``moca_kernels._lse_engine``).
    """
    if labels is None and isinstance(query, torch.Tensor) and isinstance(docs, torch.Tensor) \
            and query.dim() == 2 and docs.dim() == 2:
        if docs.shape[0] < query.shape[0]:
            raise ValueError(f"labels default to arange(B), which needs at least B={query.shape[0]} docs, "
                             f"got {docs.shape[0]}")
        labels = torch.arange(query.shape[0], device=query.device)
    _check(query, docs, labels, hard_negatives, temperature, reduction)
    if select_backend(OP, backend, query.device, query.dtype) == "triton":
        return _info_nce_triton(query, docs, labels, temperature, hard_negatives, symmetric, normalize, reduction)
    _check_values(docs, labels, temperature)
    return info_nce_reference(query, docs, labels, temperature, hard_negatives, symmetric, normalize, reduction)
