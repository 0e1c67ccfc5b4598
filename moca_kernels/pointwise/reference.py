"""Pure-PyTorch definitions of the pointwise ops, written the way Hugging Face's Qwen2.5-VL computes
them (same dtype casts, same rounding points): the test oracle and the CPU backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qwen2RMSNorm of ``x`` (``x + residual`` when given, summed in x's dtype), over the last
    dimension: ``weight * (s * rsqrt(mean(s^2) + eps)).to(x.dtype)`` with the statistics in float32
    (float64 for float64 input). Returns (normalized, the sum or None)."""
    total = x + residual if residual is not None else None
    s = total if total is not None else x
    s32 = s.to(torch.promote_types(s.dtype, torch.float32))
    normalized = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(s.dtype), total


def section_planes(cos: torch.Tensor, mrope_section: list[int] | None) -> torch.Tensor:
    """Per-token cos (or sin) ``(T, D)`` from M-RoPE planes ``(3, T, D)``: column block i of
    ``mrope_section * 2`` comes from plane ``i % 3`` (temporal, height, width), as Qwen2-VL's
    ``apply_multimodal_rotary_pos_emb`` selects them. Without sections ``cos`` is already ``(T, D)``."""
    if mrope_section is None:
        return cos
    pieces = cos.split(list(mrope_section) * 2, dim=-1)
    return torch.cat([piece[i % 3] for i, piece in enumerate(pieces)], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               mrope_section: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q ``(T, Hq, D)`` and k ``(T, Hk, D)`` by per-token cos/sin ``(T, D)``,
    or M-RoPE planes ``(3, T, D)`` with ``mrope_section``: ``x * cos + rotate_half(x) * sin``."""
    cos, sin = (section_planes(c, mrope_section)[:, None, :] for c in (cos, sin))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the activation of Qwen's MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``)."""
    return F.silu(gate) * up
