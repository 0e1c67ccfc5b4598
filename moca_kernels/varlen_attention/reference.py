"""Pure-PyTorch definition of ``varlen_attention``: the test oracle and the CPU backend.

One document at a time, scores in float32 (float64 for float64 input), differentiable by autograd
in q, k, v and through the returned log-sum-exp.
"""
from __future__ import annotations

import math

import torch


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               softmax_scale: float | None = None, causal: bool = False,
                               accumulate: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out like q, lse float32 ``(Hq, total_q)``).

    ``accumulate``: the dtype of the scores, softmax and products (default: float32, float64 for
    float64 inputs); the inputs' own dtype gives attention computed plainly in their precision.

    ``causal=True`` aligns the mask bottom-right, as flash-attn >= 2.1 does: query row i of a
    document with ``len_q`` rows and ``len_k`` keys sees keys ``j <= i + len_k - len_q``. Rows that
    see no key (an empty key document, or the first rows of a causal document with
    ``len_q > len_k``) give a zero output and ``lse = -inf``.
    """
    total_q, hq, dim = q.shape
    group = hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    acc = accumulate or torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
        lq, lk = q1 - q0, k1 - k0
        qd = q[q0:q1].to(acc).transpose(0, 1)                                       # (Hq, lq, D)
        kd = k[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)       # (Hq, lk, D)
        vd = v[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(qd, kd.transpose(1, 2)) * scale                     # (Hq, lq, lk)
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            rows, cols = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
            allowed = cols <= rows + (lk - lq)
        has_key = allowed.any(1)                                                     # (lq,)
        # Rows with no key get finite stand-in scores so neither value nor gradient turns NaN;
        # torch.where then discards them.
        allowed = allowed | ~has_key[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) if lk else scores.new_zeros(hq, lq)     # (Hq, lq)
        out = torch.matmul(torch.exp(scores - lse[..., None]), vd)                  # (Hq, lq, D)
        outs.append(torch.where(has_key[None, :, None], out, 0.0).transpose(0, 1))
        lses.append(torch.where(has_key[None, :], lse, float("-inf")))
    out = torch.cat(outs, 0).to(q.dtype) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1).float() if lses else q.new_zeros((hq, total_q), dtype=torch.float32)
    return out, lse


def varlen_attention_reference_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                                        k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                        cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool = False,
                                        accumulate: torch.dtype | None = None
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) like (q, k, v) for the gradients ``dout`` of out and ``dlse`` (None: lse
    unused) of lse, in closed form rather than by autograd, so that it also serves inside a custom
    op's implementation, below the autograd dispatch. ``accumulate`` as in the forward."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    acc = accumulate or torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qd = q[q0:q1].to(acc).transpose(0, 1)                                       # (Hq, lq, D)
        kd = k[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)       # (Hq, lk, D)
        vd = v[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        dod = dout[q0:q1].to(acc).transpose(0, 1)
        scores = torch.matmul(qd, kd.transpose(1, 2)) * softmax_scale
        if causal:
            rows, cols = torch.arange(lq, device=q.device)[:, None], torch.arange(lk, device=q.device)[None, :]
            scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        p = torch.where(torch.isfinite(lse), torch.exp(scores - lse), 0.0)           # rows with no key: 0
        delta = (dod * torch.matmul(p, vd)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(dod, vd.transpose(1, 2)) - delta)
        if dlse is not None:  # a row without keys ignores its lse's gradient, even a NaN one
            ds = ds + p * torch.where(torch.isfinite(lse), dlse[:, q0:q1].to(acc)[..., None], 0.0)
        dq[q0:q1] = (torch.matmul(ds, kd) * softmax_scale).transpose(0, 1)
        dk[k0:k1] = _per_kv_head(torch.matmul(ds.transpose(1, 2), qd) * softmax_scale, hkv)
        dv[k0:k1] = _per_kv_head(torch.matmul(p.transpose(1, 2), dod), hkv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _per_kv_head(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(Hq, lk, D) per query head -> (lk, Hkv, D) summed over each KV head's group."""
    hq, lk, dim = x.shape
    return x.reshape(hkv, hq // hkv, lk, dim).sum(1).transpose(0, 1)
