"""``varlen_attention``: validation, backend choice, ``torch.library`` registration and autograd."""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._registry import TORCH, TRITON, Backend, last_dim_contiguous, register_op, select_backend
from ..varlen import check_cu_seqlens, check_cu_seqlens_layout
from .flash import check_call, flash_reasons, flash_varlen_attention
from .reference import varlen_attention_reference

OP = "varlen_attention"
MAX_HEAD_DIM = 256
# FlashAttention-2 serves only when asked for: the default stays the Triton kernel until a GPU
# run shows the peer faster on a workload.
FLASH = Backend("flash", flash_reasons, auto=lambda device: False)
register_op(OP, [TRITON, FLASH, TORCH])


class _ValueCache:
    """Results derived from the values of small index tensors (``cu_seqlens``), kept while the very
    same tensor objects are alive and unmodified (by PyTorch: writes through numpy, DLPack or a
    kernel of one's own do not bump the version counter and go unseen). Every layer of a model
    sees the same ``cu_seqlens`` object, so its values are read, checked and tiled once per batch,
    for the forward and the backward alike. An entry goes when one of its tensors is freed."""

    def __init__(self, size: int = 64):
        self._entries: OrderedDict = OrderedDict()
        self._size = size

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, compute: Callable):
        if any(t.is_inference() for t in tensors):  # no version counter to trust
            return compute()
        key = (tuple(id(t) for t in tensors), extra)
        stamp = tuple(t._version for t in tensors)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == stamp and all(ref() is t for ref, t in zip(hit[0], tensors)):
            self._entries.move_to_end(key)
            return hit[2]
        value = compute()
        forget = lambda _ref, entries=self._entries, key=key: entries.pop(key, None)  # noqa: E731
        self._entries[key] = ([weakref.ref(t, forget) for t in tensors], stamp, value)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _ValueCache()


@dataclass
class Documents:
    """What every call over one pair of ``cu_seqlens`` shares: the longest query and key documents
    (read once on the host) and the kernels' tile lists, built on first use for each (tiling,
    block) and kept with the pair (``triton_kernels.tiles``)."""
    longest_q: int
    longest_k: int
    tiles: dict = field(default_factory=dict)


def _documents(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> Documents:
    """Validate the values of ``cu_seqlens_*`` (cached with their tile lists)."""
    def check():
        longest_q = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
        if cu_seqlens_k is cu_seqlens_q and k.shape[0] == q.shape[0]:  # self-attention: one read of the values
            return Documents(longest_q, longest_q)
        return Documents(longest_q, check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k"))
    return _CACHE.get((cu_seqlens_q, cu_seqlens_k), ("documents", q.shape[0], k.shape[0]), check)


def _check_offsets(longest: int, *named: tuple[str, torch.Tensor]) -> None:
    """Offsets inside one document are 32-bit in the kernels (document starts and heads are
    64-bit). Outputs and gradients are allocated contiguous, hence the row stride of H * D."""
    for name, x in named:
        row_stride = max(x.stride(0), x.shape[1] * x.shape[2])
        if longest * row_stride >= 2**31:
            raise ValueError(f"{name}: a document of {longest} rows with row stride {row_stride} exceeds the "
                             "kernels' 32-bit in-document offsets; split the document")


def _triton_impl():
    from . import triton_kernels  # imported on first use: importing triton costs time
    return triton_kernels


@torch.library.custom_op("moca::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. Returns (out like q, lse float32 (Hq, total_q)). ``deterministic`` is kept
    for the backward."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    docs = _documents(q, k, cu_seqlens_q, cu_seqlens_k)
    _check_offsets(docs.longest_q, ("q", q))
    _check_offsets(docs.longest_k, ("k", k), ("v", v))
    with torch.cuda.device_of(q):  # Triton launches on the current device, not the tensors'
        return _triton_impl().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, docs.tiles)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("moca::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward. Returns (dq, dk, dv) like (q, k, v). ``dlse`` may be None (lse unused)."""
    q, k, v, out, dout = (last_dim_contiguous(x) for x in (q, k, v, out, dout))
    if dlse is not None:  # the kernels index it like lse; autograd may hand in an expanded view
        dlse = dlse.contiguous()
    docs = _documents(q, k, cu_seqlens_q, cu_seqlens_k)
    _check_offsets(docs.longest_q, ("q", q), ("out", out), ("dout", dout))
    _check_offsets(docs.longest_k, ("k", k), ("v", v))
    with torch.cuda.device_of(q):
        return _triton_impl().backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                       causal, deterministic, docs.tiles)


@varlen_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.softmax_scale, ctx.causal, ctx.deterministic = softmax_scale, causal, deterministic
    ctx.set_materialize_grads(False)  # an unused lse then costs nothing in the backward


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                      ctx.softmax_scale, ctx.causal, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    """Checks that need no tensor values (so they also run while torch.compile traces)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (total_{'q' if name == 'q' else 'k'}, heads, head_dim), "
                             f"got {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[2] != dim:
        raise ValueError(f"k has head_dim {k.shape[2]}, q has {dim}")
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads of q ({hq}) must be a positive multiple of the KV heads of k ({hkv})")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim of q must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} is {x.dtype} but q is {q.dtype}; q, k and v must share a dtype")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    check_cu_seqlens_layout(cu_seqlens_q, "cu_seqlens_q", q.device)
    check_cu_seqlens_layout(cu_seqlens_k, "cu_seqlens_k", k.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} must describe as many documents as "
                         f"cu_seqlens_q {tuple(cu_seqlens_q.shape)}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, *, softmax_scale: float | None = None, causal: bool = False,
                     return_lse: bool = False, deterministic: bool = False, backend: str | None = None):
    """Attention inside each document of a packed batch.

    Args:
        q: ``(total_q, Hq, D)`` float16, bfloat16 or float32 (float64 on the torch backend).
        k, v: ``(total_k, Hkv, D)``, same dtype and device; ``Hq % Hkv == 0`` (GQA), ``D <= 256``.
        cu_seqlens_q: int32 ``(B+1,)``: document i owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``;
            starts at 0, non-decreasing (empty documents allowed), ends at ``total_q``.
        cu_seqlens_k: int32 ``(B+1,)`` for the keys; default ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: longest documents, as flash-attn takes them. Optional: the
            kernels do not need them; a value below the real longest document is an error.
        softmax_scale: default ``1 / sqrt(D)``.
        causal: False (MoCa): each token sees its whole document. True: query row i of a document
            sees keys ``j <= i + len_k - len_q`` (bottom-right aligned, as flash-attn >= 2.1).
        return_lse: also return the log-sum-exp, float32 ``(Hq, total_q)``, natural log.
        deterministic: a backward without atomics (dQ by its own kernel; slower). Also on when
            ``torch.use_deterministic_algorithms(True)`` is in effect.
        backend: ``"triton"``, ``"torch"``, ``"flash"`` or None (the ``MOCA_KERNELS_BACKEND``
            variable, else the fastest one available: Triton on CUDA tensors, the torch reference
            otherwise). ``"flash"`` is FlashAttention-2 (``torch.nn.attention.varlen``, or the
            ``flash_attn`` package): CUDA, float16/bfloat16, head dims a multiple of 8 up to 256, and
            an ``lse`` that is not differentiated.

    Returns:
        ``out`` like q, or ``(out, lse)`` with ``return_lse``. Rows that see no key (an empty key
        document; the first rows of a causal document with ``len_q > len_k``) give 0 and
        ``lse = -inf``. Differentiable in q, k, v (and through ``lse``).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    chosen = select_backend(OP, backend, q.device, q.dtype)
    if not torch.compiler.is_compiling():
        docs = _documents(q, k, cu_seqlens_q, cu_seqlens_k)
        for name, given, longest in (("max_seqlen_q", max_seqlen_q, docs.longest_q),
                                     ("max_seqlen_k", max_seqlen_k, docs.longest_k)):
            if given is not None and given < longest:
                raise ValueError(f"{name}={given} is shorter than the longest document ({longest})")
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if chosen == "torch":
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    elif chosen == "flash":
        check_call(q, k, v, return_lse, deterministic)
        docs = _documents(q, k, cu_seqlens_q, cu_seqlens_k)
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        out, lse = flash_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, docs.longest_q, docs.longest_k,
                                          float(softmax_scale), bool(causal), deterministic)
    else:
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, float(softmax_scale), bool(causal),
                                        bool(deterministic))
    return (out, lse) if return_lse else out
