"""The one entry to the log-sum-exp engines under ``info_nce`` and ``linear_cross_entropy``: what a
score matrix is (``Scores``), what the backward computes beyond the two gradients
(``ProductsOptions``), which engine serves a call, and the float32 product both engines use
(``matmul_fp32``).

Both engines (``_dense_lse``: the float32 scores held whole, a few cuBLAS calls; ``_tiled_lse``:
tiles that never leave the kernel) take the same keyword arguments and return the same results,
so the losses call ``forward_lse`` and ``backward_products`` here and never name an engine.

Neither engine has been checked on every card a user may own, so each proves its numbers where it
runs: the first call of a shape class (device, dtype, d, size class, bias, symmetric) checks the
chosen engine's results on that very call, on ``SAMPLE`` rows and columns, against float64
PyTorch by the numerics rule of ``_verify`` (at most twice the error of plain PyTorch in the
inputs' dtype, plus a floor; each output relative to its largest reference entry). An engine that
disagrees is warned about once (``KernelNumericsWarning``, with the numbers) and never used for
that class again: the other engine serves where its memory allows (the dense one up to
``DENSE_FALLBACK_BYTES`` of scores), else, or when it disagrees too, ``_lse_reference`` in float32.
Later calls of the class cost a dictionary lookup; nothing is checked while torch.compile traces,
during CUDA-graph capture, or with ``MOCA_KERNELS_VERIFY=0``. The temperature's share (``part``,
a sum over all of S) is not sampled.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _verify


@dataclass(frozen=True)
class Scores:
    """The (B, M) score matrix S = (q . k) * rq * rk * inv_t (+ bias), described, never held.

    q: (B, d) and k: (M, d) of one dtype; rq: (B,) and rk: (M,) float32 per-row scales (inverse
    norms for info_nce, ones for the cross-entropy); inv_t: 0-dim float32 on q's device;
    bias: (M,) or None."""

    q: torch.Tensor
    k: torch.Tensor
    rq: torch.Tensor
    rk: torch.Tensor
    inv_t: torch.Tensor
    bias: torch.Tensor | None = None


def scores(q: torch.Tensor, k: torch.Tensor, *, rq: torch.Tensor | None = None, rk: torch.Tensor | None = None,
           inv_t: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Scores:
    """``Scores`` of q (B, d) against k (M, d); a scale left out is one."""
    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float32, device=q.device)
    return Scores(q, k, ones(q.shape[0]) if rq is None else rq, ones(k.shape[0]) if rk is None else rk,
                  ones() if inv_t is None else inv_t, bias)


@dataclass(frozen=True)
class ProductsOptions:
    """What ``backward_products`` computes beyond dq and dk, and in how much memory.

    symmetric: the column softmax terms of dLoss/dS (col_lse, col_w, col_center are read).
    normalize_k: dk through the backward of k / |k| (rk the inverse norms).
    bias_grad: return dbias (rq and rk must then be ones).
    budget: bytes the tiled engine's temporaries may take (``_tiled_lse.scratch_budget``)."""

    symmetric: bool = False
    normalize_k: bool = False
    bias_grad: bool = False
    budget: int = 0


@dataclass(frozen=True)
class Softmaxes:
    """What dLoss/dS = row_w[i] p_row + col_w[j] p_col - g[i] [j is i's label] is made of (the
    keyword arguments of ``backward_products``): labels (B,) int64; row_lse, row_w, g, row_center
    (B,) and, for symmetric losses, col_lse, col_w, col_center (M,) (else empty), float32."""

    labels: torch.Tensor
    row_lse: torch.Tensor
    row_w: torch.Tensor
    g: torch.Tensor
    row_center: torch.Tensor
    col_lse: torch.Tensor
    col_w: torch.Tensor
    col_center: torch.Tensor


_FP32_OUT: dict[str, bool] = {}  # per device: whether torch.addmm(out_dtype=float32) works there


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
    """float32 a (n, k) @ b (k, m) into ``out`` (n, m) float32 (a new one when None), plus ``out``'s
    values when ``accumulate``. Products of two half-precision operands of one dtype are summed in
    float32 by cuBLAS (``out_dtype``) where this torch offers it; anything else (mixed dtypes, CPU,
    an older torch) is multiplied in float32 copies."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    beta = 1 if accumulate else 0
    if a.dtype == b.dtype != torch.float32 and a.is_cuda and _FP32_OUT.get(str(a.device), True):
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, beta=beta, out=out)
            _FP32_OUT[str(a.device)] = True
            return out
        except (RuntimeError, TypeError) as exc:
            _FP32_OUT[str(a.device)] = False
            warnings.warn(f"torch.addmm(out_dtype=torch.float32) failed on {a.device} ({exc}); the losses fall "
                          "back to float32 copies of the operands: slower, and more memory than planned", stacklevel=2)
    return torch.addmm(out, a.float(), b.float(), beta=beta, out=out)


def size_class(rows: int, cols: int) -> int:
    """A coarse problem size (factors of 4 in rows x cols): the tiled kernels' autotuning key, and
    part of the shape class an engine is verified for."""
    return max(0, (rows * cols).bit_length() // 2)


def engine(rows: int, cols: int) -> ModuleType:
    """The engine a (rows, cols) score matrix's size picks: ``_dense_lse`` where its float32 scores
    fit the dense budget (``_dense_lse.fits``), else ``_tiled_lse``."""
    from . import _dense_lse, _tiled_lse  # they import this module's types
    return _dense_lse if _dense_lse.fits(rows, cols) else _tiled_lse


# The rows and columns of a call whose results a first call checks; the dense engine stands in
# for a rejected tiled one up to this many bytes of float32 scores (B = M = 8,192).
SAMPLE = 8
DENSE_FALLBACK_BYTES = 256 << 20

_REJECTED: dict[tuple, str] = {}  # (engine name, shape class) -> why
_TRUSTED: set[tuple] = set()  # (engine name, "forward" or "backward" and its options, shape class)


def _engines(rows: int, cols: int, shape: tuple) -> list[ModuleType]:
    """The engines that may serve a call, in order: the one its size picks, the other where it may
    stand in, the float32 reference; less those rejected for its shape class."""
    from . import _dense_lse, _lse_reference, _tiled_lse
    first = engine(rows, cols)
    order = [first]
    if first is _dense_lse or 4 * rows * cols <= DENSE_FALLBACK_BYTES:
        order.append(_tiled_lse if first is _dense_lse else _dense_lse)
    return [e for e in order if (_name(e), shape) not in _REJECTED] + [_lse_reference]


def _name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def _shape_class(s: Scores, symmetric: bool) -> tuple:
    rows, cols = s.q.shape[0], s.k.shape[0]
    return str(s.q.device), s.q.dtype, s.q.shape[1], size_class(rows, cols), s.bias is not None, symmetric


def _sample(n: int, device: torch.device) -> torch.Tensor:
    """SAMPLE indices spread over [0, n), the first and the last among them (partial tiles)."""
    return torch.linspace(0, n - 1, min(n, SAMPLE), device=device).round().long().unique()


def _relative(outputs: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    return {name: x.double() / scales[name] for name, x in outputs.items()}


def _verdict(module: ModuleType, s: Scores, what: str, ours: dict, reference: dict, plain: dict) -> str | None:
    """``_verify.disagreement`` of each output divided by its reference's largest finite entry:
    gradients of any scale are held to the same relative rule."""
    scales = {name: _verify.largest(ref) or 1.0 for name, ref in reference.items()}
    rows, cols = s.q.shape[0], s.k.shape[0]
    label = f"the {_name(module)} engine's {what} ({s.q.dtype}, B={rows}, M={cols}, d={s.q.shape[1]}, {s.q.device})"
    return _verify.disagreement(label, _relative(ours, scales), _relative(reference, scales),
                                _relative(plain, scales))


def _check_forward(module: ModuleType, s: Scores, labels: torch.Tensor, symmetric: bool,
                   out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> str | None:
    """Why ``out`` (forward_lse's results) breaks the numerics rule on a sample, or None."""
    from . import _lse_reference as ref
    rows = _sample(s.q.shape[0], s.q.device)
    ours = {"row_lse": out[0][rows], "pos": out[1][rows]}
    truth, plain = ({}, {})
    for result, precision in ((truth, ref.FLOAT64), (plain, ref.plain(s.q.dtype))):
        result["row_lse"], result["pos"] = ref.row_forward(s, labels, rows, precision)
    if symmetric:
        cols = _sample(s.k.shape[0], s.q.device)
        ours["col_lse"] = out[2][cols]
        truth["col_lse"] = ref.col_forward(s, cols, ref.FLOAT64)
        plain["col_lse"] = ref.col_forward(s, cols, ref.plain(s.q.dtype))
    return _verdict(module, s, "forward", ours, truth, plain)


def _check_backward(module: ModuleType, s: Scores, w: Softmaxes, options: ProductsOptions,
                    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]) -> str | None:
    """Why ``out`` (backward_products' results) breaks the numerics rule on a sample, or None."""
    from . import _lse_reference as ref
    rows, cols = _sample(s.q.shape[0], s.q.device), _sample(s.k.shape[0], s.q.device)
    ours = {"dq": out[0][rows], "dk": out[1][cols]}
    if options.bias_grad:
        ours["dbias"] = out[2][cols]
    truth, plain = ({}, {})
    for result, precision in ((truth, ref.FLOAT64), (plain, ref.plain(s.q.dtype))):
        result["dq"] = ref.row_backward(s, w, rows, options.symmetric, precision)[0]
        result["dk"], dbias = ref.col_backward(s, w, cols, options, precision)
        if options.bias_grad:
            result["dbias"] = dbias
    return _verdict(module, s, "backward", ours, truth, plain)


def _serve(rows: int, cols: int, shape: tuple, what: tuple, run, check):
    """``run(engine)``'s result from the first engine that may serve and, on its first call for
    ``shape`` (and ``what``: the pass and its options), passes ``check(engine, result)``."""
    from . import _lse_reference
    for module in _engines(rows, cols, shape):
        out = run(module)
        key = (_name(module), what, shape)
        if module is _lse_reference or key in _TRUSTED or not _verify.can_verify():
            return out
        why = check(module, out)
        if why is None:
            _TRUSTED.add(key)
            return out
        _REJECTED[(_name(module), shape)] = why
        _verify.warn_once((_name(module), shape), f"moca_kernels: {why}; it no longer serves such calls in this "
                                                   "process")
    raise AssertionError("unreachable: the reference engine always serves")


def forward_lse(s: Scores, *, labels: torch.Tensor, symmetric: bool = False,
                budget: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse (B,), pos (B,), col_lse (M,) or (0,)), float32: the row log-sum-exp of S, each row's
    score at its label ``labels`` (B,) int64 (0 where the label is outside [0, M)), and for
    ``symmetric`` the column log-sum-exp."""
    rows, cols = s.q.shape[0], s.k.shape[0]
    return _serve(rows, cols, _shape_class(s, symmetric), ("forward",),
                  lambda module: module.forward_lse(s, labels=labels, symmetric=symmetric, budget=budget),
                  lambda module, out: _check_forward(module, s, labels, symmetric, out))


def backward_products(s: Scores, *, labels: torch.Tensor, row_lse: torch.Tensor, row_w: torch.Tensor,
                      g: torch.Tensor, row_center: torch.Tensor | None = None, col_lse: torch.Tensor | None = None,
                      col_w: torch.Tensor | None = None, col_center: torch.Tensor | None = None,
                      options: ProductsOptions = ProductsOptions()
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The gradients through S of a loss whose dLoss/dS is row_w[i] p_row + col_w[j] p_col - g[i]
    [j is i's label], p_row = exp(S - row_lse[i]) and p_col = exp(S - col_lse[j]) (the column
    terms only with ``options.symmetric``); row_lse, row_w, g, row_center (B,) and col_lse,
    col_w, col_center (M,) float32; a centre left out is zero.

    Returns (dq, dk, dbias, part): dq (B, d) as rq * dLoss/d(q rq), float32 or q's dtype; dk like
    k, through the backward of k / |k| with ``options.normalize_k``; dbias (M,) float32 with
    ``options.bias_grad``, else None; part (0-dim), the softmax terms of sum(coef * (S - bias)),
    each centred on a value of its row or column: sum(row_w[i] p_row (S - bias - row_center[i]) +
    col_w[j] p_col (S - bias - col_center[j])).

    Centred, because sum(p * S) is the difference of large nearly equal sums when every score is
    near one large value (all-positive embeddings: cosines near 0.75 over a temperature of 0.07):
    an error of e in a row's LSE, through sum(p) = 1 - e, gives sum(p * S) an error of e * S;
    with centres near the scores (the label score) it is e * (S - centre). Then sum(coef * (S -
    bias)) = part + sum(row_w row_center) + sum(col_w col_center) - sum(g * label score), which
    the caller forms without the large sums (info_nce: zero but for repeated labels)."""
    if not options.symmetric:
        col_lse = col_w = col_center = row_lse.new_empty(0)
    elif col_lse is None or col_w is None:
        raise ValueError("options.symmetric needs col_lse and col_w")
    w = Softmaxes(labels, row_lse, row_w, g, torch.zeros_like(row_lse) if row_center is None else row_center,
                  col_lse, col_w, torch.zeros_like(col_lse) if col_center is None else col_center)
    rows, cols = s.q.shape[0], s.k.shape[0]
    return _serve(rows, cols, _shape_class(s, options.symmetric), ("backward", options.normalize_k, options.bias_grad),
                  lambda module: module.backward_products(s, options=options, **vars(w)),
                  lambda module, out: _check_backward(module, s, w, options, out))
