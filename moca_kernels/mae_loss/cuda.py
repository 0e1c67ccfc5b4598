"""The CUDA kernel of ``mae_loss`` (``csrc/cuda/mae_loss.cu``) on torch tensors."""
from __future__ import annotations

import torch

from .. import _cuda


def max_norm_pix_row() -> int | None:
    lib = _cuda.library()
    return lib.moca_mae_max_norm_pix_row() if lib is not None else None


def mae_rows(pred, target, mask, count, norm_pix: bool, eps: float, mode: int):
    """(row sums of squared errors (N,) float32, dpred like pred, contiguous)."""
    n, p = pred.shape
    row_loss = torch.empty(n, dtype=torch.float32, device=pred.device)
    dpred = torch.empty((n, p), dtype=pred.dtype, device=pred.device)
    code = _cuda.library().moca_mae_loss(
        _cuda.pointer(pred), _cuda.DTYPE_CODES[pred.dtype], _cuda.pointer(target), _cuda.DTYPE_CODES[target.dtype],
        _cuda.pointer(mask), _cuda.pointer(count), n, p, pred.stride(0), target.stride(0), int(norm_pix), eps, mode,
        _cuda.pointer(row_loss), _cuda.pointer(dpred), _cuda.stream_of(pred))
    _cuda.check(code, "moca_mae_loss")
    return row_loss, dpred
