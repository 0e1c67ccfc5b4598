"""The pointwise ops of a Qwen decoder (RMSNorm, rotary embedding with M-RoPE sections, SwiGLU):
validation, backend choice, ``torch.library`` registration (each op one node under
``torch.compile``) and autograd."""
from __future__ import annotations

import torch

from .._registry import TORCH, TRITON, described, last_dim_contiguous, register_op, select_backend
from .._verify import rows_sample, trusted
from .reference import rms_norm_reference, rotary_embedding_reference, swiglu_reference

register_op("rms_norm", [TRITON, TORCH])
register_op("rotary_embedding", [TRITON, TORCH])
register_op("swiglu", [TRITON, TORCH])


def _triton_impl():
    from . import triton_kernels  # imported on first use: importing triton costs time
    return triton_kernels


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# --- RMSNorm -----------------------------------------------------------------------------------

@torch.library.custom_op("moca::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward over rows ``(N, H)``: (y, x + residual (empty without one), rstd float32 (N,))."""
    x = last_dim_contiguous(x)
    residual = last_dim_contiguous(residual) if residual is not None else None
    with torch.cuda.device_of(x):
        y, total, rstd = _triton_impl().rms_norm_forward(x, weight.contiguous(), residual, eps)
    return y, total if total is not None else _empty(x), rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    total = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), total,
            x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("moca::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, dtotal: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (d s, d weight); ``dtotal`` (the gradient reaching the residual sum
    itself) is added to d s."""
    dy, s = last_dim_contiguous(dy), last_dim_contiguous(s)
    dtotal = last_dim_contiguous(dtotal) if dtotal is not None else None
    with torch.cuda.device_of(s):
        return _triton_impl().rms_norm_backward(dy, dtotal, s, weight.contiguous(), rstd)


@rms_norm_bwd.register_fake
def _(dy, dtotal, s, weight, rstd):
    return s.new_empty(s.shape), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, total, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(total if ctx.has_residual else x, weight, rstd)
    ctx.set_materialize_grads(False)


def _rms_backward(ctx, dy, dtotal, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(s.shape, dtype=torch.promote_types(s.dtype, weight.dtype), device=s.device)
    dx, dw = rms_norm_bwd(dy, dtotal if ctx.has_residual else None, s, weight, rstd)
    return dx, dw, dx if ctx.has_residual else None, None


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def _check_rms(x, weight, residual, eps) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor (..., H), got {described(x)}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},), the last dimension of x; got {described(weight)}")
    if not weight.dtype.is_floating_point or weight.device != x.device:
        raise ValueError(f"weight must be a floating-point tensor on {x.device}, got {described(weight)}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must match x ({described(x)}), got {described(residual)}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: torch.Tensor | None = None,
             backend: str | None = None):
    """Qwen2RMSNorm over the last dimension, optionally of ``x + residual`` (the decoder's residual
    add fused in).

    Args:
        x: ``(..., H)`` float16, bfloat16 or float32 (float64 on the torch backend).
        weight: ``(H,)``; the output has dtype ``promote(x, weight)``, as the module computes it.
        eps: added to the mean square.
        residual: like x, or None.
        backend: ``"triton"``, ``"torch"`` or None (``MOCA_KERNELS_BACKEND``, else Triton on CUDA
            tensors and the PyTorch definition elsewhere).

    Returns ``weight * (s * rsqrt(mean(s^2) + eps))`` with s = x (+ residual, summed in x's
    dtype), the statistics in float32; with ``residual``, the pair (that, s), s being the next
    residual. Differentiable in x, weight and residual.
    """
    _check_rms(x, weight, residual, eps)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    residual_rows = residual.reshape(-1, shape[-1]) if residual is not None else None
    if select_backend("rms_norm", backend, x.device, x.dtype) == "torch" or not _rms_trusted(rows, weight,
                                                                                              residual_rows, eps):
        y, total = rms_norm_reference(x, weight, eps, residual)
        return (y, total) if residual is not None else y
    y, total, _ = rms_norm_fwd(rows, weight, residual_rows, float(eps))
    return (y.view(shape), total.view(shape)) if residual is not None else y.view(shape)


def _rms_trusted(rows: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float) -> bool:
    """The Triton RMSNorm checked on a sample of these rows on first use (``_verify.trusted``)."""
    def fast(x, w, r=None):
        y, total, _ = rms_norm_fwd(x, w, r, float(eps))
        return (y, total) if r is not None else y

    inputs = [rows_sample(rows), weight] + ([rows_sample(residual)] if residual is not None else [])
    key = (rows.dtype, weight.dtype, rows.shape[-1], residual is not None)
    return trusted("rms_norm", key, fast, lambda x, w, r=None: rms_norm_reference(x, w, eps, r), inputs,
                   range(len(inputs)))


# --- Rotary embedding ---------------------------------------------------------------------------

@torch.library.custom_op("moca::rotary_embedding", mutates_args=())
def rotary_embedding_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        sections: list[int], transpose: bool,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotation of q ``(T, Hq, D)`` and k ``(T, Hk, D)`` (``transpose``: its backward)."""
    q, k, cos, sin = (last_dim_contiguous(x) for x in (q, k, cos, sin))
    with torch.cuda.device_of(q):
        return _triton_impl().rotary(q, k, cos, sin, sections, transpose, out_dtype)


@rotary_embedding_op.register_fake
def _(q, k, cos, sin, sections, transpose, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype), k.new_empty(k.shape, dtype=out_dtype)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, sections, transpose, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sections, ctx.transpose, ctx.dtype = sections, transpose, q.dtype
    ctx.shapes = (q.shape, k.shape)
    ctx.set_materialize_grads(False)


def _rotary_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    like = dq if dq is not None else dk
    dq = dq if dq is not None else like.new_zeros(ctx.shapes[0])
    dk = dk if dk is not None else like.new_zeros(ctx.shapes[1])
    gq, gk = rotary_embedding_op(dq, dk, cos, sin, ctx.sections, not ctx.transpose, ctx.dtype)
    return gq, gk, None, None, None, None, None


rotary_embedding_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def _check_rotary(q, k, cos, sin, mrope_section) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor (T, heads, D), got {described(x)}")
    tokens, _, dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != dim or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must have q's tokens, head dim, dtype and device ({tokens}, *, {dim}) {q.dtype} "
                         f"on {q.device}; got {described(k)}")
    if dim % 2:
        raise ValueError(f"the head dim of q must be even (rotate_half splits it), got {dim}")
    planes = () if mrope_section is None else (3,)
    for name, x in (("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor) or x.shape != (*planes, tokens, dim) or not x.dtype.is_floating_point \
                or x.device != q.device:
            want = "(3, T, D) with mrope_section" if planes else "(T, D) without mrope_section"
            raise ValueError(f"{name} must be a floating-point tensor {want} = {(*planes, tokens, dim)} on {q.device}, "
                             f"got {described(x)}")
    if mrope_section is not None and (len(mrope_section) != 3 or sum(mrope_section) != dim // 2
                                      or min(mrope_section) < 0):
        raise ValueError(f"mrope_section must be 3 non-negative ints summing to half the head dim ({dim // 2}), "
                         f"got {mrope_section}")


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     mrope_section: list[int] | None = None, *,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys, ``x * cos + rotate_half(x) * sin``, in one
    launch for both.

    Args:
        q: ``(T, Hq, D)``, k: ``(T, Hk, D)``, same dtype; any token and head strides (the last
            dimension contiguous), e.g. the transposed views of a projection's output.
        cos, sin: per-token ``(T, D)``; or with ``mrope_section`` (Qwen2-VL's M-RoPE, e.g.
            ``[16, 24, 24]``, summing to D/2) the temporal, height and width planes ``(3, T, D)``:
            column block i of ``mrope_section * 2`` takes plane ``i % 3``. Not differentiated.
        backend: ``"triton"``, ``"torch"`` or None (as for every op).

    Returns rotated (q, k), contiguous ``(T, H, D)``, in ``promote(q, cos)`` (the dtype of
    PyTorch's ``q * cos``). The rotation runs in float32 and rounds once. Differentiable in q, k.
    """
    _check_rotary(q, k, cos, sin, mrope_section)
    sections = [int(s) for s in mrope_section] if mrope_section is not None else []
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    if select_backend("rotary_embedding", backend, q.device, q.dtype) == "torch" or not trusted(
            "rotary_embedding", (q.dtype, cos.dtype, q.shape[1], k.shape[1], q.shape[2], tuple(sections)),
            lambda *x: rotary_embedding_op(*x, sections, False, out_dtype),
            lambda *x: rotary_embedding_reference(*x, mrope_section),
            [rows_sample(q), rows_sample(k), rows_sample(cos, -2), rows_sample(sin, -2)], (0, 1)):
        return rotary_embedding_reference(q, k, cos, sin, mrope_section)
    return rotary_embedding_op(q, k, cos, sin, sections, False, out_dtype)


# --- SwiGLU ---------------------------------------------------------------------------------------

@torch.library.custom_op("moca::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up."""
    with torch.cuda.device_of(gate):
        return _triton_impl().swiglu_forward(gate.contiguous(), up.contiguous())


@swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("moca::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton (d gate, d up), silu recomputed from the gate."""
    with torch.cuda.device_of(gate):
        return _triton_impl().swiglu_backward(dout.contiguous(), gate.contiguous(), up.contiguous())


@swiglu_bwd.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dout, gate, up)


swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (Qwen's MLP activation), silu rounded to the input dtype before the
    product as PyTorch computes it. gate and up: one shape, one floating dtype, one device.
    Differentiable in both; ``backend`` as for every op."""
    for name, x in (("gate", gate), ("up", up)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {described(x)}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up must match gate ({described(gate)}), got {described(up)}")
    if select_backend("swiglu", backend, gate.device, gate.dtype) == "torch" or not trusted(
            "swiglu", (gate.dtype,), swiglu_fwd, swiglu_reference,
            [rows_sample(gate.reshape(-1, gate.shape[-1] if gate.dim() else 1)),
             rows_sample(up.reshape(-1, up.shape[-1] if up.dim() else 1))], (0, 1)):
        return swiglu_reference(gate, up)
    return swiglu_fwd(gate, up)
