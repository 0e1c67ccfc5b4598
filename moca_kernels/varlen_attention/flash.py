"""``backend="flash"``: FlashAttention-2's varlen kernels, through PyTorch's ``torch.nn.attention.varlen``
or the ``flash_attn`` package, behind ``varlen_attention``'s contract.

The peer the project measures itself against, one argument away: same inputs, same output and
``lse`` conventions (natural log, ``-inf`` on rows that see no key). What FlashAttention-2 cannot do
is refused up front with a ValueError: CPU tensors, float32, head dims that are not a multiple of
8 or exceed 256, a differentiable ``lse`` (its backward takes no gradient of ``lse``), and
``deterministic=True`` without the ``flash_attn`` package (PyTorch's kernel has no such switch).
"""
from __future__ import annotations

import importlib.util
import inspect

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_reasons(device: torch.device | None, dtype: torch.dtype | None) -> list[str]:
    """Why FlashAttention-2 cannot serve a call on ``device`` with ``dtype`` (None: any)."""
    reasons = []
    if not torch_varlen_available() and not flash_attn_available():
        reasons.append(f"torch {torch.__version__} has no torch.nn.attention.varlen and flash_attn is not installed")
    if device is None:
        if not torch.cuda.is_available():
            reasons.append("no CUDA device (FlashAttention-2 runs on CUDA tensors only)")
    elif device.type != "cuda":
        reasons.append(f"FlashAttention-2 runs on CUDA tensors only, got {device.type} tensors")
    elif torch.cuda.get_device_capability(device) < (8, 0):
        reasons.append("FlashAttention-2 needs a GPU of compute capability 8.0 or newer")
    if dtype is not None and dtype not in FLASH_DTYPES:
        reasons.append(f"{dtype} inputs (FlashAttention-2 takes float16 or bfloat16)")
    return reasons


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool, deterministic: bool) -> None:
    """The per-call limits of FlashAttention-2 that the backend registry cannot see."""
    dim = q.shape[2]
    if dim % 8 or dim > 256:
        raise ValueError(f"backend='flash': head_dim of q must be a multiple of 8 up to 256, got {dim}")
    if return_lse and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("backend='flash' cannot differentiate lse (FlashAttention-2's backward takes no "
                         "gradient of it): use backend='triton', or return_lse=False, or no_grad")
    if deterministic and not flash_attn_available():
        raise ValueError("backend='flash' with deterministic=True needs the flash_attn package "
                         "(torch.nn.attention.varlen has no deterministic backward)")


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           causal: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32 ``(Hq, total_q)``) from FlashAttention-2: the ``flash_attn`` package
    when ``deterministic`` or when torch lacks ``torch.nn.attention.varlen``, else torch's kernel."""
    hq, total_q = q.shape[1], q.shape[0]
    if deterministic or not torch_varlen_available():
        from flash_attn import flash_attn_varlen_func
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale=softmax_scale, causal=causal,
                                             deterministic=deterministic, return_attn_probs=True)
    else:
        out, lse = _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                 causal)
    if lse.shape == (total_q, hq) and lse.shape != (hq, total_q):
        lse = lse.transpose(0, 1)
    if lse.shape != (hq, total_q):
        raise RuntimeError(f"FlashAttention-2 returned lse of shape {tuple(lse.shape)}, expected ({hq}, {total_q})")
    # FlashAttention-2 marks rows that see no key with +inf; the op's contract says -inf.
    lse = torch.where(lse == float("inf"), float("-inf"), lse.float())
    return out, lse


def _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """torch.nn.attention.varlen.varlen_attn, whose keywords differ between torch releases
    (GQA and causal switches), asked for its lse."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn
    params = inspect.signature(varlen_attn).parameters
    kwargs = dict(scale=softmax_scale, return_aux=AuxRequest(lse=True))
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
