"""Helpers for packed variable-length batches.

A packed batch stores ``B`` documents back to back along dim 0 (``total`` rows); ``cu_seqlens`` is
int32 ``(B+1,)`` with ``cu_seqlens[i]`` the first row of document ``i`` and ``cu_seqlens[-1] == total``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "lengths_to_cu_seqlens",
    "cu_seqlens_to_lengths",
    "check_cu_seqlens",
    "check_cu_seqlens_layout",
    "pack",
    "unpack",
    "segment_mean",
]


def lengths_to_cu_seqlens(lengths: torch.Tensor | Sequence[int],
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Document lengths ``(B,)`` -> int32 ``cu_seqlens`` ``(B+1,)`` starting at 0."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integers, got {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("lengths must be non-negative")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    return cu


def cu_seqlens_to_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens`` ``(B+1,)`` -> int32 lengths ``(B,)``."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)


def check_cu_seqlens_layout(cu_seqlens: torch.Tensor, name: str = "cu_seqlens",
                            device: torch.device | None = None) -> None:
    """The checks that need no values (so they also hold while torch.compile traces): a contiguous
    int32 tensor of shape ``(B+1,)`` with B >= 1, on ``device`` when given."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 1, got {tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels read it with stride 1)")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but the tensor it describes is on {device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens",
                     device: torch.device | None = None) -> int:
    """Validate ``cu_seqlens`` for a packed tensor of ``total`` rows; return the longest length.

    Raises ``ValueError`` naming ``name`` when it is not int32 ``(B+1,)`` with B >= 1, on ``device``
    (when given), starting at 0, non-decreasing and ending at ``total``. Reads the values on the
    host (one device synchronization).
    """
    check_cu_seqlens_layout(cu_seqlens, name, device)
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}]={values[bad + 1]} < "
                         f"{name}[{bad}]={values[bad]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the token count {total}, got {values[-1]}")
    return max(lengths)


def pack(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded ``(B, S, *rest)`` + ``mask`` ``(B, S)`` (True/1 on real tokens, any padding side) ->
    (packed ``(total, *rest)``, int32 ``cu_seqlens`` ``(B+1,)``, ``max_seqlen``)."""
    if padded.dim() < 2:
        raise ValueError(f"padded must have shape (B, S, ...), got {tuple(padded.shape)}")
    if mask.shape != padded.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(padded.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=padded.device, dtype=torch.bool)
    lengths = mask.sum(1)
    return padded[mask], lengths_to_cu_seqlens(lengths), int(lengths.max()) if lengths.numel() else 0


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
    """Packed ``(total, *rest)`` -> right-padded ``(B, max_seqlen, *rest)``, zeros in the padding."""
    longest = check_cu_seqlens(cu_seqlens, packed.shape[0], device=packed.device)
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest document ({longest})")
    lengths = cu_seqlens_to_lengths(cu_seqlens).long()
    batch = lengths.numel()
    mask = torch.arange(max_seqlen, device=packed.device)[None, :] < lengths[:, None]
    out = packed.new_zeros((batch, max_seqlen, *packed.shape[1:]))
    out[mask] = packed
    return out


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean over each document's rows: packed ``(total, *rest)`` -> ``(B, *rest)``.

    Documents of length 0 give zeros. Differentiable in ``x``; the sum runs in float32 (or float64
    for float64 input) and the result has ``x``'s dtype.
    """
    check_cu_seqlens(cu_seqlens, x.shape[0], device=x.device)
    lengths = cu_seqlens_to_lengths(cu_seqlens).long()
    batch = lengths.numel()
    doc_of_row = torch.repeat_interleave(torch.arange(batch, device=x.device), lengths, output_size=x.shape[0])
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    sums = x.new_zeros((batch, *x.shape[1:]), dtype=acc_dtype).index_add(0, doc_of_row, x.to(acc_dtype))
    counts = lengths.clamp(min=1).to(acc_dtype).view(batch, *([1] * (x.dim() - 1)))
    return (sums / counts).to(x.dtype)
