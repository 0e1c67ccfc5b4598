"""Which attention designs may be chosen: each one's results on the call that first meets a shape
class, checked on a sample of that call against a float64 reference by the numerics rule
(``moca_kernels._verify``) and against a trusted design over the whole call.

The sample is a few whole documents of at most ``SAMPLE_ROWS`` query and key rows (the first, the
last and the longest such), over the query heads of the first and last KV heads. Where no
document is that short, it is the last ``PARTIAL_ROWS`` query rows of the shortest one against all
its keys (the last rows, so that a causal mask keeps its bottom-right alignment): out, lse and dQ
are then checked on it, and dK, dV by the comparison with the trusted design alone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._verify import bound, disagreement, error, largest, warn_once
from .reference import varlen_attention_reference, varlen_attention_reference_backward

SAMPLE_ROWS = 1024
PARTIAL_ROWS = 256
# The design each kind is compared with over the whole call: the one without atomics or a fused
# launch (the forward designs differ only in their loop structure).
TRUSTED = {"fwd": "wide", "bwd": "split"}


@dataclass(frozen=True)
class Sample:
    """Rows and heads of a call that the reference recomputes.

    ``q_rows``/``k_rows``: int64 row indices into q and k; ``cu_q``/``cu_k``: int32 offsets of the
    sampled documents within them; ``q_heads``/``kv_heads``: head indices; ``whole``: every
    sampled document has all its query rows (dK and dV can be checked)."""
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    whole: bool


def _pick(cu_q: list[int], cu_k: list[int]) -> tuple[list[tuple[int, int, int, int]], bool]:
    """(documents as (q0, q1, k0, k1), whether they are whole): see the module docstring."""
    docs = list(zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]))
    short = [d for d in docs if 0 < d[1] - d[0] <= SAMPLE_ROWS and d[3] - d[2] <= SAMPLE_ROWS]
    if short:
        longest = max(range(len(short)), key=lambda i: short[i][1] - short[i][0])
        return [short[i] for i in sorted({0, longest, len(short) - 1})], True
    rows = [d for d in docs if d[1] > d[0]]
    if not rows:
        return [], True
    q0, q1, k0, k1 = min(rows, key=lambda d: (d[1] - d[0]) * max(1, d[3] - d[2]))
    return [(max(q0, q1 - PARTIAL_ROWS), q1, k0, k1)], q1 - q0 <= PARTIAL_ROWS


def sample(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, hq: int, hkv: int) -> Sample | None:
    """The sample of a call (None when it has no query rows)."""
    docs, whole = _pick(cu_seqlens_q.tolist(), cu_seqlens_k.tolist())
    if not docs:
        return None
    device = cu_seqlens_q.device
    spans = lambda a, b: torch.cat([torch.arange(s, e) for s, e in zip(a, b)])  # noqa: E731
    offsets = lambda a, b: torch.tensor([0] + [e - s for s, e in zip(a, b)]).cumsum(0).int()  # noqa: E731
    q0, q1, k0, k1 = zip(*docs)
    group = hq // hkv
    kv_heads = sorted({0, hkv - 1})
    q_heads = [h * group + g for h in kv_heads for g in range(group)]
    return Sample(spans(q0, q1).to(device), spans(k0, k1).to(device), offsets(q0, q1).to(device),
                  offsets(k0, k1).to(device), torch.tensor(q_heads, device=device),
                  torch.tensor(kv_heads, device=device), whole)


def _rows(x: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``x[rows][:, heads]`` of a (total, H, D) tensor."""
    return x.index_select(0, rows).index_select(1, heads)


def _lse_rows(lse: torch.Tensor, s: Sample) -> torch.Tensor:
    return lse.index_select(0, s.q_heads).index_select(1, s.q_rows)


def _attention(q, k, v, s: Sample, scale: float, causal: bool, dtype: torch.dtype | None):
    """The sampled call's (out, lse), in float64 (``dtype=None``) or plainly in the inputs' own
    precision (``dtype``: scores, softmax and products all in it)."""
    if dtype is None:
        return varlen_attention_reference(q.double(), k.double(), v.double(), s.cu_q, s.cu_k, scale, causal)
    return varlen_attention_reference(q, k, v, s.cu_q, s.cu_k, scale, causal, accumulate=dtype)


def _reject(kind: str, key: tuple, verdicts: dict[str, str | None],
            full: Callable[[str, str], str | None]) -> list[str]:
    """The designs that pass: each passed the sample check (``verdicts``: None or why not) and,
    beside the anchor (the trusted design when it passed, else the first that did), the whole-call
    comparison ``full(design, anchor)``. Each failure is warned about once per process."""
    passed = [d for d, why in verdicts.items() if why is None]
    if passed:
        anchor = TRUSTED[kind] if TRUSTED[kind] in passed else passed[0]
        for d in [d for d in passed if d != anchor]:
            verdicts[d] = full(d, anchor)
    for d, why in verdicts.items():
        if why is not None:
            warn_once(("varlen_attention", kind, d),
                      f"varlen_attention: the {kind} design {d!r} is not used on this machine (shape class {key}): "
                      f"its results break the numerics rule: {why}. Please report it with "
                      "`python -m moca_kernels.check --json report.json`.")
    return [d for d, why in verdicts.items() if why is None]


def _whole_call(ours: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], allowed: dict[str, float],
                scale_of: dict[str, float]) -> str | None:
    """Why ``ours`` differs from ``anchor`` over the whole call by more than both may err: twice
    the sample's allowance, scaled by how much larger the call's values are than the sample's."""
    bad = []
    for what, a in anchor.items():
        grow = max(1.0, largest(a) / max(scale_of[what], 1e-30))
        err, tol = error(ours[what], a), 2 * allowed[what] * grow
        if not err <= tol:
            bad.append(f"{what} differs from the trusted design's by {err:.3g} over the call (> {tol:.3g})")
    return "; ".join(bad) or None


def forward_designs(results: dict[str, tuple[torch.Tensor, torch.Tensor]], key: tuple, q, k, v,
                    cu_seqlens_q, cu_seqlens_k, scale: float, causal: bool) -> list[str]:
    """The forward designs whose (out, lse) in ``results`` may be chosen."""
    s = sample(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1])
    if s is None:
        return list(results)
    qs, ks, vs = _rows(q, s.q_rows, s.q_heads), _rows(k, s.k_rows, s.kv_heads), _rows(v, s.k_rows, s.kv_heads)
    ref = dict(zip(("out", "lse"), _attention(qs, ks, vs, s, scale, causal, None)))
    plain = dict(zip(("out", "lse"), _attention(qs, ks, vs, s, scale, causal, q.dtype)))
    allowed = {w: bound(ref[w], plain[w]) for w in ref}
    scale_of = {w: largest(ref[w]) for w in ref}
    whole = {d: {"out": out, "lse": lse} for d, (out, lse) in results.items()}
    verdicts = {d: disagreement(d, {"out": _rows(out, s.q_rows, s.q_heads), "lse": _lse_rows(lse, s)}, ref, plain)
                for d, (out, lse) in results.items()}
    return _reject("fwd", key, verdicts, lambda d, anchor: _whole_call(whole[d], whole[anchor], allowed, scale_of))


def backward_designs(results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], key: tuple, dout, dlse,
                     q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, causal: bool) -> list[str]:
    """The backward designs whose (dq, dk, dv) in ``results`` may be chosen (``dlse``: None or the
    gradient of the lse)."""
    s = sample(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1])
    if s is None:
        return list(results)
    names = ("dq", "dk", "dv") if s.whole else ("dq",)

    def grads(dtype):
        dq, dk, dv = varlen_attention_reference_backward(
            _rows(dout, s.q_rows, s.q_heads), None if dlse is None else _lse_rows(dlse, s),
            *(_rows(x, r, h) for x, r, h in ((q, s.q_rows, s.q_heads), (k, s.k_rows, s.kv_heads),
                                             (v, s.k_rows, s.kv_heads))),
            s.cu_q, s.cu_k, scale, causal, dtype or torch.float64)
        return dict(zip(names, (dq, dk, dv)))

    ref, plain = grads(None), grads(q.dtype)
    allowed = {w: bound(ref[w], plain[w]) for w in ref}
    scale_of = {w: largest(ref[w]) for w in ref}
    whole = {d: dict(zip(("dq", "dk", "dv"), r)) for d, r in results.items()}
    picks = {"dq": (s.q_rows, s.q_heads), "dk": (s.k_rows, s.kv_heads), "dv": (s.k_rows, s.kv_heads)}
    verdicts = {d: disagreement(d, {w: _rows(whole[d][w], *picks[w]) for w in names}, ref, plain) for d in results}
    allowed.update({w: allowed["dq"] for w in ("dk", "dv") if w not in allowed})
    scale_of.update({w: scale_of["dq"] for w in ("dk", "dv") if w not in scale_of})
    return _reject("bwd", key, verdicts, lambda d, anchor: _whole_call(whole[d], whole[anchor], allowed, scale_of))
