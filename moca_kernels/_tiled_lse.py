"""Tiled log-sum-exp over a (B, M) score matrix S = q k^T that never exists in memory, and its
one-pass backward: the engine under ``info_nce`` (k = docs) and ``linear_cross_entropy``
(k = the LM head's weight, a bias per column).

Forward (``_fwd_kernel``, 2*B*M*d FLOPs): each program takes BLOCK_M rows of q and a range of k's
rows, walks it in (BLOCK_M x BLOCK_N) tiles (the full d-long dot products reduced inside the
tile) and keeps an online row log-sum-exp in registers. It also picks each row's label score out
of the tile that holds it and, for ``symmetric``, writes the tile's column log-sum-exp, which the
host merges over row blocks. Only O(B + M) floats leave the kernel.

Backward, one pass over the tiles (6*B*M*d FLOPs): ``_coef_kernel`` recomputes a chunk of S once
and writes E = dLoss/dS (times per-row and per-column scales) in the input dtype; two cuBLAS
products turn E into the gradients, dk = E^T q and dq = E k. float16 lacks the range for E, so
there E is scaled to about E_RANGE and the products have float32 outputs. The chunk sizes keep
the temporaries within a byte budget (``scratch_plan``).

Scores are S = (q . k) * rq * rk * inv_t (+ bias) (``_lse_engine.Scores``): rq, rk are per-row
scales (inverse norms for info_nce, ones for the cross-entropy), inv_t a device scalar.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lse_engine import ProductsOptions, Scores, matmul_fp32, size_class
from ._registry import autotune_off, bench_unless_disabled, sm_count, triton_interpret

# E is kept near 1 (not near g * p / B, which underflows float16 at large batches).
E_RANGE = 1024.0
# The one-query-chunk backward (no float32 accumulator for dk) is taken when it needs at most
# this many column chunks, each one more rounding of dq (unless dq has a float32 accumulator).
MAX_SINGLE_PASS_DOC_CHUNKS = 8
QUERY_CHUNK_ROWS = 2048  # otherwise: enough for float32-output products that stay compute-bound

# (BLOCK_K, num_warps, num_stages); the first is used when MOCA_KERNELS_AUTOTUNE=0. Tiles are
# BLOCK_M x BLOCK_N = 128 x 128 (32 x 32 with BLOCK_K 32 in the interpreter, to cover odd shapes cheaply).
CANDIDATES = [(64, 8, 3), (64, 8, 4), (128, 8, 2)]  # 4 warps spill at 128 x 128 (compile_check)


def blocks() -> tuple[int, int]:
    return (32, 32) if triton_interpret() else (128, 128)


@triton.jit
def _score_tile(q_ptr, k_ptr, row0, col0, n_rows, n_cols, dim, stride_q, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """Raw dot products q[row0 + i] . k[col0 + j] of a (BLOCK_M, BLOCK_N) tile (float32). Rows and
    columns past the end read zeros; callers mask them out of every result. Block pointers keep the
    address arithmetic per tile (a tile of 64-bit pointers cost registers), and callers pass row0
    and col0 as the minimum of their index vectors: with the scalar rb * BLOCK_M instead, ptxas
    spilled 72 to 104 bytes in the symmetric forward (``python -m moca_kernels.compile_check``)."""
    q_block = tl.make_block_ptr(q_ptr, (n_rows, dim), (stride_q, 1), (row0, 0), (BLOCK_M, BLOCK_K), (1, 0))
    k_block = tl.make_block_ptr(k_ptr, (dim, n_cols), (1, stride_k), (0, col0), (BLOCK_K, BLOCK_N), (0, 1))
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(q_block, boundary_check=(0,), padding_option="zero")
            b = tl.load(k_block, boundary_check=(1,), padding_option="zero")
        else:
            a = tl.load(q_block, boundary_check=(0, 1), padding_option="zero")
            b = tl.load(k_block, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        q_block = tl.advance(q_block, (0, BLOCK_K))
        k_block = tl.advance(k_block, (BLOCK_K, 0))
    return acc


@triton.jit
def _fwd_kernel(Q, K, RQ, RK, BIAS, LABELS, INV_T, ROW_LSE, POS, COL_LSE,
                n_rows, n_cols, dim, stride_q, stride_k, cols_per_split, size_class,
                SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row block, column split): ROW_LSE[split, rows], the LSE of the split's scores;
    POS[rows] where the label falls in the split; COL_LSE[row block, cols] when SYMMETRIC."""
    rb = tl.program_id(0)
    split = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    inv_t = tl.load(INV_T)
    row_scale = rq * (inv_t * 1.4426950408889634)
    m = tl.full((BLOCK_M,), -1e30, tl.float32)  # finite: rows of -inf give 0, not NaN (masked out anyway)
    acc_l = tl.zeros((BLOCK_M,), tl.float32)
    pos_raw = tl.zeros((BLOCK_M,), tl.float32)
    c_begin = split * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, n_cols)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_end
        rk = tl.load(RK + cols, mask=col_ok, other=0.0)
        raw = _score_tile(Q, K, tl.min(rows, 0), tl.min(cols, 0), n_rows, n_cols, dim, stride_q, stride_k,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
        pos_raw += tl.sum(tl.where(cols[None, :] == label[:, None], raw, 0.0), 1)
        s = raw * row_scale[:, None] * rk[None, :]  # log2 units
        if HAS_BIAS:
            s += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        if SYMMETRIC:  # rows past the end out of the column LSE (their row LSE is never stored)
            s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
        else:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        acc_l = acc_l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
        if SYMMETRIC:
            cm = tl.maximum(tl.max(s, 0), -1e30)
            cl = tl.sum(tl.exp2(s - cm[None, :]), 0)
            # cl >= 1 where the column is in range (its maximum adds 1); past the end, no log2(0)
            tl.store(COL_LSE + rb.to(tl.int64) * n_cols + cols,
                     (cm + tl.log2(tl.maximum(cl, 1.0))) * 0.6931471805599453, mask=col_ok)
    acc_l = tl.where(row_ok, acc_l, 1.0)
    tl.store(ROW_LSE + split.to(tl.int64) * n_rows + rows, (m + tl.log2(acc_l)) * 0.6931471805599453, mask=row_ok)
    has_label = row_ok & (label >= c_begin) & (label < c_end)
    # In natural units and as _coef_kernel computes scores, not through the log2 units above:
    # their constants' rounding would bias every label score alike (see backward_products).
    pos = pos_raw * (rq * inv_t) * tl.load(RK + label, mask=has_label, other=0.0)
    if HAS_BIAS:
        pos += tl.load(BIAS + label, mask=has_label, other=0.0).to(tl.float32)
    tl.store(POS + rows, pos, mask=has_label)


@triton.jit
def _coef_kernel(Q, K, RQ, RK, BIAS, LABELS, INV_T, ROW_LSE, ROW_W, G, COL_LSE, COL_W, ROW_CENTER, COL_CENTER,
                 E_SCALE, E, PART,
                 n_rows, n_cols, dim, stride_q, stride_k, stride_e, col_offset, size_class,
                 SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of E = coef * rq * rk * E_SCALE, where coef = dLoss/dS:
    ROW_W[i] p_row + COL_W[j] p_col - G[i] [j is i's label]. PART[tile], the tile's share of
    the softmax terms of the gradient of inv_t (times inv_t), centred:
    sum(ROW_W[i] p_row (S - bias - ROW_CENTER[i]) + COL_W[j] p_col (S - bias - COL_CENTER[j]))."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    inv_t = tl.load(INV_T)
    rq = tl.load(RQ + rows, mask=row_ok, other=0.0)
    rk = tl.load(RK + cols, mask=col_ok, other=0.0)
    raw = _score_tile(Q, K, tl.min(rows, 0), tl.min(cols, 0), n_rows, n_cols, dim, stride_q, stride_k,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    scaled = raw * (rq * inv_t)[:, None] * rk[None, :]
    s = scaled
    if HAS_BIAS:
        s += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(ROW_W + rows, mask=row_ok, other=0.0)[:, None] * \
        tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    part = coef * (scaled - tl.load(ROW_CENTER + rows, mask=row_ok, other=0.0)[:, None])
    if SYMMETRIC:
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        col_w = tl.load(COL_W + cols, mask=col_ok, other=0.0)
        p_col = col_w[None, :] * tl.exp2((s - col_lse[None, :]) * 1.4426950408889634)
        part += p_col * (scaled - tl.load(COL_CENTER + cols, mask=col_ok, other=0.0)[None, :])
        coef += p_col
    valid = row_ok[:, None] & col_ok[None, :]
    tl.store(PART + rb * tl.num_programs(1) + cb, tl.sum(tl.sum(tl.where(valid, part, 0.0), 1), 0))
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    coef -= tl.where((cols + col_offset)[None, :] == label[:, None], g[:, None], 0.0)
    e = coef * (rq * tl.load(E_SCALE))[:, None] * rk[None, :]
    tl.store(E + rows.to(tl.int64)[:, None] * stride_e + cols[None, :], e.to(E.dtype.element_ty), mask=valid)


def _autotune(kernel):
    if triton_interpret():
        configs = [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    else:
        configs = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in CANDIDATES]

    def prune(configs, named_args, **kwargs):
        return configs[:1] if autotune_off() else configs

    return triton.autotune(configs, key=["dim", "size_class", "SYMMETRIC", "HAS_BIAS", "EVEN_K", "PRECISION"],
                           prune_configs_by={"early_config_prune": prune}, do_bench=bench_unless_disabled)(kernel)


_fwd = _autotune(_fwd_kernel)
_coef = _autotune(_coef_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 inputs are for exactness, not speed


def _even_k(dim: int) -> bool:
    return dim % (32 if triton_interpret() else 128) == 0  # every candidate's BLOCK_K divides 128


def _sm_count(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 4


def scratch_budget(fraction: float, *tensors: torch.Tensor) -> int:
    """Bytes the temporaries may take: ``fraction`` of the tensors plus their gradients."""
    return int(fraction * 2 * sum(x.numel() * x.element_size() for x in tensors))


def _rows_fitting(budget: int, bytes_per_row: int, total: int, multiple: int) -> int:
    """The most rows (a multiple of ``multiple``, at least one multiple, at most ``total``
    rounded up) whose temporaries of ``bytes_per_row`` each fit in ``budget``."""
    rows = max(multiple, budget // max(1, bytes_per_row) // multiple * multiple)
    return min(rows, triton.cdiv(total, multiple) * multiple)


def scratch_plan(batch: int, m: int, dim: int, elt: int, budget: int, fp32_out: bool) -> tuple[int, int, bool]:
    """(rows of q, rows of k, dq in float32) per backward chunk, so that the temporaries fit in
    ``budget``.

    dq accumulates in a float32 (B x d) buffer when that takes at most half the budget, else in
    the input dtype, one rounding per chunk of k. With all of q in one chunk (small batches), a k
    chunk's gradient is a single product and needs only E (B x cols); otherwise it accumulates
    over q chunks (QUERY_CHUNK_ROWS) in a float32 (cols x d) buffer beside E (rows x cols).
    ``fp32_out`` (float16 inputs) needs float32 outputs: the accumulator, and a float32
    (rows x d) product for dq when dq is not float32 already.
    """
    block_m, block_n = blocks()
    dq32 = 4 * batch * dim <= budget // 2
    if dq32:
        budget -= 4 * batch * dim
    if not fp32_out:
        cols = _rows_fitting(budget, elt * batch, m, block_n)
        if dq32 or triton.cdiv(m, cols) <= MAX_SINGLE_PASS_DOC_CHUNKS:
            return batch, cols, dq32
    rows = min(triton.cdiv(batch, block_m) * block_m, QUERY_CHUNK_ROWS)
    product = 4 * rows * dim if fp32_out and not dq32 else 0
    return rows, _rows_fitting(budget - product, 4 * dim + elt * rows, m, block_n), dq32


def _row_chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, max(1, size))]



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




def forward_lse(s: Scores, *, labels: torch.Tensor, symmetric: bool,
                budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``_lse_engine.forward_lse``: (row_lse (B,), pos (B,), col_lse (M,) or (0,)), float32.
    Rows are taken in chunks whose column LSE partials fit ``budget`` bytes."""
    q, k = s.q, s.k
    batch, dim = q.shape
    m = k.shape[0]
    block_m, block_n = blocks()
    rows = triton.cdiv(batch, block_m) * block_m
    if symmetric:  # a column LSE per row block: 4*M bytes each
        rows = _rows_fitting(budget, 4 * m // block_m, batch, block_m)
    row_lse = torch.empty(batch, dtype=torch.float32, device=q.device)
    pos = torch.zeros(batch, dtype=torch.float32, device=q.device)
    col_lse = torch.full((m,) if symmetric else (0,), float("-inf"), dtype=torch.float32, device=q.device)
    for r0, r1 in _row_chunks(batch, rows):
        n_rb = triton.cdiv(r1 - r0, block_m)
        splits = max(1, min(triton.cdiv(m, block_n), triton.cdiv(2 * _sm_count(q.device), n_rb)))
        cols_per_split = triton.cdiv(triton.cdiv(m, splits), block_n) * block_n
        splits = triton.cdiv(m, cols_per_split)
        parts = torch.empty(splits, r1 - r0, dtype=torch.float32, device=q.device)
        col_parts = torch.empty((n_rb, m) if symmetric else (1,), dtype=torch.float32, device=q.device)
        _fwd[(n_rb, splits)](q[r0:r1], k, s.rq[r0:r1], s.rk, s.bias if s.bias is not None else s.rk, labels[r0:r1],
                             s.inv_t, parts, pos[r0:r1], col_parts, r1 - r0, m, dim, q.stride(0), k.stride(0),
                             cols_per_split, size_class(r1 - r0, m), SYMMETRIC=symmetric,
                             HAS_BIAS=s.bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_K=_even_k(dim),
                             PRECISION=_precision(q.dtype))
        row_lse[r0:r1] = torch.logsumexp(parts, 0)
        if symmetric:
            torch.logaddexp(col_lse, torch.logsumexp(col_parts, 0), out=col_lse)
        del parts, col_parts  # before the next chunk allocates its own
    return row_lse, pos, col_lse


def _e_scale(s: Scores, g: torch.Tensor, row_w: torch.Tensor,
             col_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(E_SCALE (1,), post): E = coef * rq * rk * E_SCALE. Without float16, E_SCALE is inv_t and E
    is dLoss/d(q . k) itself (post None); in float16 E is scaled to about E_RANGE, and ``post``
    (0-dim) takes the products of E back to gradients."""
    if s.q.dtype != torch.float16:
        return s.inv_t.reshape(1), None
    weights = [w.abs().max() for w in (g, row_w, col_w) if w.numel()]
    big = torch.stack(weights).max() * s.rq.max() * s.rk.max()
    e_scale = (E_RANGE / big.clamp_min(1e-30)).reshape(1)
    return e_scale, s.inv_t / e_scale


def backward_products(s: Scores, *, labels: torch.Tensor, row_lse: torch.Tensor, row_w: torch.Tensor,
                      g: torch.Tensor, row_center: torch.Tensor, col_lse: torch.Tensor, col_w: torch.Tensor,
                      col_center: torch.Tensor, options: ProductsOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """As ``_lse_engine.backward_products``: (dq (B, d), float32 when the plan keeps it so, else
    q's dtype; dk like k; dbias (M,) float32 or None; part (0-dim)). E is written a chunk
    (``scratch_plan``) at a time by ``_coef_kernel``, and cuBLAS turns it into dk = E^T q and
    dq = E k."""
    q, k = s.q, s.k
    batch, dim = q.shape
    m = k.shape[0]
    symmetric = options.symmetric
    fp32_out = q.dtype == torch.float16
    e_scale, post = _e_scale(s, g, row_w, col_w)
    rows, cols, dq32 = scratch_plan(batch, m, dim, q.element_size(), options.budget, fp32_out)
    block_m, block_n = blocks()
    dq = torch.empty(batch, dim, dtype=torch.float32 if dq32 else q.dtype, device=q.device)
    dk = torch.empty_like(k)
    dbias = torch.zeros(m, dtype=torch.float32, device=q.device) if options.bias_grad else None
    parts = []
    product = torch.empty(min(rows, batch), dim, dtype=torch.float32, device=q.device) \
        if fp32_out and not dq32 else None
    for c0, c1 in _row_chunks(m, cols):
        one_product = rows >= batch and not fp32_out
        acc = None if one_product else torch.zeros(c1 - c0, dim, dtype=torch.float32, device=q.device)
        for r0, r1 in _row_chunks(batch, rows):
            e = torch.empty(r1 - r0, c1 - c0, dtype=q.dtype, device=q.device)
            grid = (triton.cdiv(r1 - r0, block_m), triton.cdiv(c1 - c0, block_n))
            part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device)
            _coef[grid](q[r0:r1], k[c0:c1], s.rq[r0:r1], s.rk[c0:c1], s.bias[c0:c1] if s.bias is not None else s.rk,
                        labels[r0:r1], s.inv_t, row_lse[r0:r1], row_w[r0:r1], g[r0:r1], col_lse[c0:c1], col_w[c0:c1],
                        row_center[r0:r1], col_center[c0:c1], e_scale, e, part,
                        r1 - r0, c1 - c0, dim, q.stride(0), k.stride(0), e.stride(0), c0, size_class(rows, cols),
                        SYMMETRIC=symmetric, HAS_BIAS=s.bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                        EVEN_K=_even_k(dim), PRECISION=_precision(q.dtype))
            parts.append(part.sum())
            if dbias is not None:
                dbias[c0:c1] += e.sum(0, dtype=torch.float32)
            if one_product:
                torch.mm(e.T, q, out=dk[c0:c1])
            else:
                matmul_fp32(e.T, q[r0:r1], acc, accumulate=True)
            if dq32:
                matmul_fp32(e, k[c0:c1], dq[r0:r1], accumulate=c0 > 0)
            elif fp32_out:
                matmul_fp32(e, k[c0:c1], product[:r1 - r0])
                product[:r1 - r0] *= post
                if c0 == 0:
                    dq[r0:r1] = product[:r1 - r0]
                else:
                    dq[r0:r1] += product[:r1 - r0]
            else:
                torch.addmm(dq[r0:r1], e, k[c0:c1], beta=0 if c0 == 0 else 1, out=dq[r0:r1])
            del e
        # E's share of the budget is free again: the normalization backward works in it.
        sub_rows = q.element_size() * min(rows, batch) * (c1 - c0) // (8 * dim)
        if acc is not None:
            if post is not None:
                acc *= post
            if options.normalize_k:
                _remove_radial(acc, k[c0:c1], s.rk[c0:c1], sub_rows)
            dk[c0:c1] = acc
            del acc
        elif options.normalize_k:
            _remove_radial(dk[c0:c1], k[c0:c1], s.rk[c0:c1], sub_rows)
    if dq32 and post is not None:
        dq *= post
    if dbias is not None:  # E = coef * e_scale where rq = rk = 1, the only case with a bias
        dbias /= e_scale
    return dq, dk, dbias, torch.stack(parts).sum()
