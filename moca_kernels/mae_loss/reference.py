"""Pure-PyTorch ``mae_loss``: the test oracle and the CPU backend."""
from __future__ import annotations

import torch


def normalized_target(target: torch.Tensor, eps: float) -> torch.Tensor:
    """He et al.'s MAE ``norm_pix`` target, in float32: each row minus its mean, over
    sqrt(its unbiased variance + eps)."""
    t = target.float()
    mean = t.mean(-1, keepdim=True)
    var = t.var(-1, keepdim=True, unbiased=True) if t.shape[-1] > 1 else torch.zeros_like(mean)
    return (t - mean) / torch.sqrt(var + eps)


def mae_loss_reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                       norm_pix: bool = False, eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """Squared error of ``pred`` (N, P) against ``target`` (N, P) over the rows ``mask`` (N,) bool
    selects (all when None). "mean": over every element of the counted rows (0.0 when none count);
    "sum": their sum; "none": each row's mean over P, 0 for rows that do not count. float32
    result (float64 for float64 pred); differentiable in ``pred``. Inputs are assumed valid."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    t = normalized_target(target, eps).to(acc) if norm_pix else target.to(acc)
    per_row = (pred.to(acc) - t).square().mean(-1)
    if mask is not None:
        per_row = torch.where(mask, per_row, per_row.new_zeros(()))
    if reduction == "none":
        return per_row
    total = per_row.sum() * pred.shape[-1]
    if reduction == "sum":
        return total
    count = mask.sum() if mask is not None else torch.tensor(pred.shape[0], device=pred.device)
    return total / (count.to(acc) * pred.shape[-1]).clamp_min(1)
