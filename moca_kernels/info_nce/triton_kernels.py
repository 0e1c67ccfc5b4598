"""Triton ``info_nce``: two tiled kernels over the (B, M) score matrix S = q docs^T, and cuBLAS.

Forward (``_fwd_kernel``, 2*B*M*d FLOPs): each program takes BLOCK_M queries and a range of
docs, walks it in (BLOCK_M x BLOCK_N) tiles (the full d-long dot products are reduced inside
the tile) and keeps an online row log-sum-exp in registers. It also picks each query's positive
score out of the tile that holds it and, for ``symmetric``, writes the tile's column
log-sum-exp, which the host merges over row blocks. Only O(B + M) floats leave the kernel.

Backward, one pass over the tiles (6*B*M*d FLOPs): ``_coef_kernel`` recomputes a chunk of S
once and writes E = dLoss/dS times the inverse norms and 1/t, in the input dtype; two cuBLAS
products turn E into the gradients: docs from E^T q, queries from E docs (see ``scratch_plan``
for how they accumulate over chunks). float16 lacks the range for E, so there E is scaled to
about E_RANGE and the products have float32 outputs. The chunk sizes are planned to keep the
temporaries within ``SCRATCH_FRACTION`` of the inputs plus their gradients, so that peak memory
stays near 1.1x of that floor at every batch size.

``normalize`` never materializes normalized copies: the kernels scale by the inverse norms,
and the backward of the normalization is applied to the O((B + M) d) results. Hard negatives
(B*K*d, private to their query) are scored in float32 PyTorch, a row chunk at a time.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .._registry import triton_interpret

# Temporaries (partial LSEs, E, float32 accumulators) may take this fraction of the bytes of the
# inputs plus their gradients. Tests lower it to force many chunks on small problems.
SCRATCH_FRACTION = 0.1
# E is kept near 1 (not near g * p / B, which underflows float16 at large batches).
E_RANGE = 1024.0
# The one-query-chunk backward (no float32 accumulator) is taken when it needs at most this many doc
# chunks, each one more rounding of the query gradient.
MAX_SINGLE_PASS_DOC_CHUNKS = 8
QUERY_CHUNK_ROWS = 2048  # otherwise: enough for float32-output products that stay compute-bound
AUTOTUNE_ENV = "MOCA_KERNELS_AUTOTUNE"

# (BLOCK_K, num_warps, num_stages); the first is used when MOCA_KERNELS_AUTOTUNE=0. Tiles are
# BLOCK_M x BLOCK_N = 128 x 128 (32 x 32 with BLOCK_K 32 in the interpreter, to cover odd shapes cheaply).
CANDIDATES = [(64, 8, 3), (64, 8, 4), (128, 8, 2)]  # 4 warps spill at 128 x 128 (compile_check)


def blocks() -> tuple[int, int]:
    return (32, 32) if triton_interpret() else (128, 128)


@triton.jit
def _score_tile(q_ptr, k_ptr, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """Raw dot products q[rows] . k[cols] (float32). Out-of-range rows and columns are clamped to
    the last one (so no loads are masked); callers mask them out of every result."""
    r = tl.minimum(rows, n_rows - 1).to(tl.int64)
    c = tl.minimum(cols, n_cols - 1).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + r[:, None] * stride_q + offs[None, :]
    k_ptrs = k_ptr + c[None, :] * stride_k + offs[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(q_ptrs)
            b = tl.load(k_ptrs)
        else:
            a = tl.load(q_ptrs, mask=offs[None, :] < dim - k0, other=0.0)
            b = tl.load(k_ptrs, mask=offs[:, None] < dim - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        q_ptrs += BLOCK_K
        k_ptrs += BLOCK_K
    return acc


@triton.jit
def _fwd_kernel(Q, K, RQ, RK, LABELS, INV_T, ROW_LSE, POS, COL_LSE,
                n_rows, n_cols, dim, stride_q, stride_k, cols_per_split, size_class,
                SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row block, column split): ROW_LSE[split, rows], the LSE of the split's scores;
    POS[rows] where the label falls in the split; COL_LSE[row block, cols] when SYMMETRIC."""
    rb = tl.program_id(0)
    split = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    row_scale = tl.load(RQ + rows, mask=row_ok, other=0.0) * (tl.load(INV_T) * 1.4426950408889634)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc_l = tl.zeros((BLOCK_M,), tl.float32)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    c_begin = split * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, n_cols)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_end
        rk = tl.load(RK + cols, mask=col_ok, other=0.0)
        raw = _score_tile(Q, K, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
        s = raw * row_scale[:, None] * rk[None, :]  # log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        acc_l = acc_l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
        pos += tl.sum(tl.where(cols[None, :] == label[:, None], s, 0.0), 1)
        if SYMMETRIC:
            sc = tl.where(row_ok[:, None], s, float("-inf"))
            cm = tl.where(col_ok, tl.max(sc, 0), 0.0)  # columns past the end hold only -inf
            cl = tl.where(col_ok, tl.sum(tl.exp2(sc - cm[None, :]), 0), 1.0)
            tl.store(COL_LSE + rb.to(tl.int64) * n_cols + cols, (cm + tl.log2(cl)) * 0.6931471805599453,
                     mask=col_ok)
    tl.store(ROW_LSE + split.to(tl.int64) * n_rows + rows, (m + tl.log2(acc_l)) * 0.6931471805599453, mask=row_ok)
    has_label = (label >= c_begin) & (label < c_end)
    tl.store(POS + rows, pos * 0.6931471805599453, mask=row_ok & has_label)


@triton.jit
def _coef_kernel(Q, K, RQ, RK, LABELS, INV_T, ROW_LSE, ROW_W, G, COL_LSE, COL_W, E_SCALE, E, PART,
                 n_rows, n_cols, dim, stride_q, stride_k, stride_e, col_offset, size_class,
                 SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of E = coef * rq * rk * E_SCALE, where coef = dLoss/dS:
    ROW_W[i] p_row + COL_W[j] p_col - G[i] [j is i's positive]. PART[tile] = sum(coef * S), the
    tile's share of the temperature gradient."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    inv_t = tl.load(INV_T)
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    rk = tl.load(RK + cols, mask=col_ok, other=0.0)
    raw = _score_tile(Q, K, rows, cols, n_rows, n_cols, dim, stride_q, stride_k,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    s = raw * (rq * inv_t)[:, None] * rk[None, :]
    lse = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(ROW_W + rows, mask=row_ok, other=0.0)[:, None] * \
        tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    if SYMMETRIC:
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        col_w = tl.load(COL_W + cols, mask=col_ok, other=0.0)
        coef += col_w[None, :] * tl.exp2((s - col_lse[None, :]) * 1.4426950408889634)
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    coef -= tl.where((cols + col_offset)[None, :] == label[:, None], g[:, None], 0.0)
    coef = tl.where(row_ok[:, None] & col_ok[None, :], coef, 0.0)
    tl.store(PART + rb * tl.num_programs(1) + cb, tl.sum(tl.sum(coef * s, 1), 0))
    e = coef * (rq * tl.load(E_SCALE))[:, None] * rk[None, :]
    tl.store(E + rows.to(tl.int64)[:, None] * stride_e + cols[None, :], e.to(E.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _bench_unless_disabled(fn, quantiles):
    if os.environ.get(AUTOTUNE_ENV) == "0":
        return [0.0, 0.0, 0.0]
    return triton.testing.do_bench(fn, quantiles=quantiles)


def _autotune(kernel):
    if triton_interpret():
        configs = [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    else:
        configs = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in CANDIDATES]

    def prune(configs, named_args, **kwargs):
        return configs[:1] if os.environ.get(AUTOTUNE_ENV) == "0" else configs

    return triton.autotune(configs, key=["dim", "size_class", "SYMMETRIC", "EVEN_K", "PRECISION"],
                           prune_configs_by={"early_config_prune": prune}, do_bench=_bench_unless_disabled)(kernel)


_fwd = _autotune(_fwd_kernel)
_coef = _autotune(_coef_kernel)


def _size_class(rows: int, cols: int) -> int:
    """The autotuning key's coarse problem size (factors of 4 in rows x cols): configurations
    are tuned on a problem of about the size they serve, not on the first one seen."""
    return max(0, (rows * cols).bit_length() // 2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 inputs are for exactness, not speed


def _even_k(dim: int) -> bool:
    return dim % (32 if triton_interpret() else 128) == 0  # every candidate's BLOCK_K divides 128


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def scratch_budget(q: torch.Tensor, docs: torch.Tensor, hard: torch.Tensor) -> int:
    """Bytes the temporaries may take: SCRATCH_FRACTION of the inputs plus their gradients."""
    floor = 2 * sum(x.numel() * x.element_size() for x in (q, docs, hard))
    return int(SCRATCH_FRACTION * floor)


def _rows_fitting(budget: int, bytes_per_row: int, total: int, multiple: int) -> int:
    """The most rows (a multiple of ``multiple``, at least one multiple, at most ``total``
    rounded up) whose temporaries of ``bytes_per_row`` each fit in ``budget``."""
    rows = max(multiple, budget // max(1, bytes_per_row) // multiple * multiple)
    return min(rows, triton.cdiv(total, multiple) * multiple)


def scratch_plan(batch: int, m: int, dim: int, elt: int, budget: int, fp32_out: bool) -> tuple[int, int]:
    """(query rows, doc columns) per backward chunk, so that the temporaries fit in ``budget``.

    With all queries in one chunk (small batches), a doc chunk's gradient is a single product
    and needs only E (B x cols). Otherwise it accumulates over query chunks (QUERY_CHUNK_ROWS) in a
    float32 (cols x d) buffer beside E (rows x cols). ``fp32_out`` (float16 inputs) adds a float32
    (rows x d) product for the query gradient. The query gradient takes one rounding per doc chunk.
    """
    block_m, block_n = blocks()
    if not fp32_out:
        cols = _rows_fitting(budget, elt * batch, m, block_n)
        if triton.cdiv(m, cols) <= MAX_SINGLE_PASS_DOC_CHUNKS:
            return batch, cols
    rows = min(triton.cdiv(batch, block_m) * block_m, QUERY_CHUNK_ROWS)
    product = 4 * rows * dim if fp32_out else 0
    return rows, _rows_fitting(budget - product, 4 * dim + elt * rows, m, block_n)


def _row_chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def inverse_norms(x: torch.Tensor, normalize: bool, budget: int) -> torch.Tensor:
    """float32 1/||x|| over the last dimension (ones when not normalizing), a chunk at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ones(flat.shape[0], dtype=torch.float32, device=x.device)
    if normalize:
        rows = max(1, budget // max(1, 4 * x.shape[-1]))
        for r0, r1 in _row_chunks(flat.shape[0], rows):
            norm = torch.linalg.vector_norm(flat[r0:r1].float(), dim=-1)
            out[r0:r1] = 1.0 / norm.clamp_min(1e-12)  # torch.nn.functional.normalize's eps
    return out.reshape(x.shape[:-1])


def _hard_scores(q, hard, rq, rh, inv_t):
    """float32 scores (rows, K) of each query against its own hard negatives."""
    raw = torch.einsum("bd,bkd->bk", q.float(), hard.float())
    return raw * rq[:, None] * rh * inv_t


def forward(q, docs, hard, labels, inv_t, symmetric: bool, normalize: bool):
    """Per-query losses (B,) float32, and what the backward needs: row LSE (B,), column LSE
    (M,) (empty unless symmetric) and the inverse norms of q, docs and hard."""
    batch, dim = q.shape
    m = docs.shape[0]
    budget = scratch_budget(q, docs, hard)
    rq, rk = inverse_norms(q, normalize, budget), inverse_norms(docs, normalize, budget)
    rh = inverse_norms(hard, normalize, budget)
    block_m, block_n = blocks()
    # Rows per launch: SYMMETRIC writes a column LSE per row block (4*M bytes each).
    rows = triton.cdiv(batch, block_m) * block_m
    if symmetric:
        rows = _rows_fitting(budget, 4 * m // block_m, batch, block_m)
    row_lse = torch.empty(batch, dtype=torch.float32, device=q.device)
    pos = torch.empty(batch, dtype=torch.float32, device=q.device)
    col_lse = torch.full((m,) if symmetric else (0,), float("-inf"), dtype=torch.float32, device=q.device)
    for r0, r1 in _row_chunks(batch, rows):
        n_rb = triton.cdiv(r1 - r0, block_m)
        splits = max(1, min(triton.cdiv(m, block_n), triton.cdiv(2 * _sm_count(q.device), n_rb)))
        cols_per_split = triton.cdiv(triton.cdiv(m, splits), block_n) * block_n
        splits = triton.cdiv(m, cols_per_split)
        parts = torch.empty(splits, r1 - r0, dtype=torch.float32, device=q.device)
        col_parts = torch.empty((n_rb, m) if symmetric else (1,), dtype=torch.float32, device=q.device)
        _fwd[(n_rb, splits)](q[r0:r1], docs, rq[r0:r1], rk, labels[r0:r1], inv_t, parts, pos[r0:r1], col_parts,
                             r1 - r0, m, dim, q.stride(0), docs.stride(0), cols_per_split, _size_class(r1 - r0, m),
                             SYMMETRIC=symmetric, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_K=_even_k(dim),
                             PRECISION=_precision(q.dtype))
        row_lse[r0:r1] = torch.logsumexp(parts, 0)
        if symmetric:
            torch.logaddexp(col_lse, torch.logsumexp(col_parts, 0), out=col_lse)
        del parts, col_parts  # before the next chunk allocates its own
    if hard.shape[1]:
        per_row = 4 * hard.shape[1] * dim * 2 + 4 * dim
        for r0, r1 in _row_chunks(batch, max(1, budget // per_row)):
            scores = _hard_scores(q[r0:r1], hard[r0:r1], rq[r0:r1], rh[r0:r1], inv_t)
            row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(scores, 1))
    loss = row_lse - pos
    if symmetric:
        loss = 0.5 * (row_lse + col_lse[labels]) - pos
    return loss, row_lse, col_lse, rq, rk, rh


_FP32_OUT: dict[str, bool] = {}


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (float32) = a @ b (+ out when ``accumulate``), products of half-precision inputs summed
    in float32 by cuBLAS (``out_dtype``) where this torch offers it, else in float32 copies."""
    if a.dtype != torch.float32 and a.is_cuda and _FP32_OUT.get(str(a.device), True):
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, beta=1 if accumulate else 0, out=out)
            _FP32_OUT[str(a.device)] = True
            return
        except (RuntimeError, TypeError) as exc:
            _FP32_OUT[str(a.device)] = False
            warnings.warn(f"torch.addmm(out_dtype=torch.float32) failed on {a.device} ({exc}); info_nce falls back "
                          "to float32 copies of the operands: slower, and more memory than planned")
    torch.addmm(out, a.float(), b.float(), beta=1 if accumulate else 0, out=out)


def _remove_radial(grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor, rows: int) -> None:
    """Backward of x / |x| in place: grad -= u (u . grad) per row, u = x * r (r = 1 / |x|), in
    float32 a chunk of ``rows`` rows at a time. ``grad`` holds r * (gradient at the unit vector)."""
    for s0, s1 in _row_chunks(grad.shape[0], max(1, rows)):
        unit = x[s0:s1].to(torch.float32, copy=True)
        unit *= r[s0:s1, None]
        g = grad[s0:s1].float()  # the very rows when grad is float32, else a copy
        g.addcmul_(unit, torch.bmm(unit[:, None, :], g[:, :, None])[:, 0], value=-1)
        if g.data_ptr() != grad[s0:s1].data_ptr():
            grad[s0:s1] = g
        del unit, g  # before the next chunk allocates its own


def backward(grad, q, docs, hard, labels, inv_t, row_lse, col_lse, rq, rk, rh, symmetric: bool, normalize: bool):
    """Gradients (dq, ddocs, dhard, dinv_t) of sum(grad * losses)."""
    batch, dim = q.shape
    m, k = docs.shape[0], hard.shape[1]
    grad = grad.float()
    row_w = grad * (0.5 if symmetric else 1.0)
    col_w = torch.zeros(m, dtype=torch.float32, device=q.device)
    if symmetric:
        col_w.index_add_(0, labels, row_w)
    # E = dLoss/dS * rq * rk * e_scale. bfloat16 and float32 have the range for e_scale = 1/t, so
    # the products give the gradients directly. float16 does not: E is kept near E_RANGE, the
    # products have float32 outputs, and ``post`` scales them back.
    fp32_out = q.dtype == torch.float16
    post = None
    if fp32_out:
        big = torch.stack([grad.abs().max(), col_w.abs().max()]).max() * rq.max() * rk.max()
        e_scale = (E_RANGE / big.clamp_min(1e-30)).reshape(1)
        post = inv_t / e_scale
    else:
        e_scale = inv_t.reshape(1)
    budget = scratch_budget(q, docs, hard)
    rows, cols = scratch_plan(batch, m, dim, q.element_size(), budget, fp32_out)
    block_m, block_n = blocks()
    dq = torch.empty_like(q)
    ddocs = torch.empty_like(docs)
    parts = []
    product = torch.empty(min(rows, batch), dim, dtype=torch.float32, device=q.device) if fp32_out else None
    for c0, c1 in _row_chunks(m, cols):
        one_product = rows >= batch and not fp32_out
        acc = None if one_product else torch.zeros(c1 - c0, dim, dtype=torch.float32, device=q.device)
        for r0, r1 in _row_chunks(batch, rows):
            e = torch.empty(r1 - r0, c1 - c0, dtype=q.dtype, device=q.device)
            grid = (triton.cdiv(r1 - r0, block_m), triton.cdiv(c1 - c0, block_n))
            part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device)
            _coef[grid](q[r0:r1], docs[c0:c1], rq[r0:r1], rk[c0:c1], labels[r0:r1], inv_t, row_lse[r0:r1],
                        row_w[r0:r1], grad[r0:r1], col_lse[c0:c1] if symmetric else col_lse, col_w[c0:c1],
                        e_scale, e, part, r1 - r0, c1 - c0, dim, q.stride(0), docs.stride(0), e.stride(0), c0,
                        _size_class(rows, cols),
                        SYMMETRIC=symmetric, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_K=_even_k(dim),
                        PRECISION=_precision(q.dtype))
            parts.append(part.sum())
            if one_product:
                torch.mm(e.T, q, out=ddocs[c0:c1])
            else:
                _matmul_fp32(e.T, q[r0:r1], acc, accumulate=True)
            if fp32_out:
                _matmul_fp32(e, docs[c0:c1], product[:r1 - r0], accumulate=False)
                product[:r1 - r0] *= post
                if c0 == 0:
                    dq[r0:r1] = product[:r1 - r0]
                else:
                    dq[r0:r1] += product[:r1 - r0]
            else:
                torch.addmm(dq[r0:r1], e, docs[c0:c1], beta=0 if c0 == 0 else 1, out=dq[r0:r1])
            del e
        # E's share of the budget is free again: the normalization backward works in it.
        sub_rows = q.element_size() * min(rows, batch) * (c1 - c0) // (8 * dim)
        if acc is not None:
            if post is not None:
                acc *= post
            if normalize:
                _remove_radial(acc, docs[c0:c1], rk[c0:c1], sub_rows)
            ddocs[c0:c1] = acc
            del acc
        elif normalize:
            _remove_radial(ddocs[c0:c1], docs[c0:c1], rk[c0:c1], sub_rows)
    dinv_t = torch.stack(parts).sum() / inv_t.reshape(())
    dhard = torch.empty_like(hard)
    if k:  # the hard negatives' share of the query gradient, and theirs
        for r0, r1 in _row_chunks(batch, max(1, budget // (4 * dim * (4 + 5 * k)))):  # float32 temporaries
            unit_q = q[r0:r1].to(torch.float32, copy=True)
            unit_q *= rq[r0:r1, None]
            unit_h = hard[r0:r1].to(torch.float32, copy=True)
            unit_h *= rh[r0:r1, :, None]
            scores = torch.bmm(unit_h, unit_q[:, :, None])[:, :, 0] * inv_t
            coef = row_w[r0:r1, None] * torch.exp(scores - row_lse[r0:r1, None])
            dinv_t = dinv_t + (coef * scores).sum() / inv_t.reshape(())
            grad_q = dq[r0:r1].float()  # rq * dLoss/d(q / |q|) so far
            grad_q += torch.bmm(coef[:, None, :], unit_h)[:, 0] * (inv_t * rq[r0:r1, None])
            dq[r0:r1] = grad_q
            grad_h = coef[:, :, None] * unit_q[:, None, :] * inv_t
            if normalize:
                grad_h -= unit_h * (unit_h * grad_h).sum(-1, keepdim=True)
                grad_h *= rh[r0:r1, :, None]
            dhard[r0:r1] = grad_h
            del unit_q, unit_h, grad_q, grad_h  # before the next chunk allocates its own
    if normalize:
        _remove_radial(dq, q, rq, budget // (8 * dim))
    return dq, ddocs, dhard, dinv_t.reshape(inv_t.shape)
