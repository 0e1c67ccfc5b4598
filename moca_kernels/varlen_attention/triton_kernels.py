"""Triton kernels of ``varlen_attention``: forward, backward (delta preprocess, dK/dV main loop with
fp32 dQ accumulated by atomics or TMA bulk reduce-adds, or a separate dQ kernel), in the designs
described above ``DESIGNS``.

Scheduling. The grid is a flat list of (document, block) tiles, longest document first, times the
heads (tile-major, so query heads that share a KV head run side by side and share it in L2). Each
query tile's keys are one contiguous interval, its own document; only the last, partial KV block
is masked element-wise (causal tiles also mask their diagonal band). The tile list is built on the
device with a fixed upper bound on its size, so building it needs no host synchronization; spare
tiles exit at once. Tile lists are kept with the ``cu_seqlens`` they came from (``tiles``).

Head dims that are not powers of two are split into a power of two and a power-of-two rest
(80 = 64 + 16, 96 = 64 + 32, 192 = 128 + 64) and each matrix product runs as two ``tl.dot``;
other dims pad the rest up to a power of two >= 16 (40 = 32 + 16 for 8 columns, 200 = 128 + 128
for 72). So hdim 80 and 96 do no wasted tensor-core work.

Softmax runs in base 2 with ``softmax_scale * log2(e)`` folded into the scores. ``lse`` is stored in
natural log, ``-inf`` for rows that see no key.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from .._interpreter import add_descriptor_reduce
from .._registry import autotune_off, bench_unless_disabled, triton_interpret
from .._verify import can_verify
from . import verify as verify_designs
from .reference import varlen_attention_reference, varlen_attention_reference_backward

LOG2E = 1.4426950408889634  # the kernels spell it, and ln 2, as literals

if triton_interpret():
    add_descriptor_reduce()  # the TMA dQ path (MOCA_KERNELS_TMA=1) runs in the CPU tests too


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a power of two covering most of ``head_dim`` and a power-of-two rest
    (0 when ``head_dim`` is a power of two). Both are >= 16, the smallest ``tl.dot`` operand."""
    if head_dim <= 16:
        return 16, 0
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


# ------------------------------------------------------------------------------------------------
# Tile lists
# ------------------------------------------------------------------------------------------------

def build_tiles(cu_seqlens: torch.Tensor, cost_cu_seqlens: torch.Tensor, total: int,
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (document, block index) tiles over the ``total`` rows of the documents of
    ``cu_seqlens`` in blocks of ``block`` rows, documents ordered by decreasing length in
    ``cost_cu_seqlens`` (the length each tile loops over). Returns int32 ``(doc, block_index)``,
    both of the fixed length ``ceil(total / block) + B`` (an upper bound, so building them needs no
    host synchronization); spare tiles have ``doc = -1``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    cost = (cost_cu_seqlens[1:] - cost_cu_seqlens[:-1]).long()
    n_docs = lengths.numel()
    order = torch.argsort(cost, descending=True, stable=True)
    blocks = (lengths[order] + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    t = torch.arange(triton.cdiv(total, block) + n_docs, device=cu_seqlens.device)
    which = torch.searchsorted(ends, t, right=True)
    valid = which < n_docs
    which = which.clamp(max=n_docs - 1)
    block_index = t - (ends[which] - blocks[which])
    doc = torch.where(valid, order[which], -1)
    return doc.to(torch.int32), block_index.to(torch.int32)


def tiles(memo: dict, by_keys: bool, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total: int,
          block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``build_tiles`` over the query documents (``by_keys=False``: forward, dQ) or the key documents
    (dK/dV), kept in ``memo``: the dict that the op keeps with this pair of ``cu_seqlens``, so that
    every later call over them launches no tile-building work."""
    key = (by_keys, block)
    if key not in memo:
        memo[key] = (build_tiles(cu_seqlens_k, cu_seqlens_q, total, block) if by_keys
                     else build_tiles(cu_seqlens_q, cu_seqlens_k, total, block))
    return memo[key]


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
# A head's D columns are two power-of-two pieces of BLOCK_D0 and BLOCK_D1 columns (BLOCK_D1 = 0:
# one piece). Helpers take and return both; without a second piece the second value is a
# placeholder that repeats the first and is never read, so the compiler drops it.

@triton.jit
def _load_tile(base, rows, stride, cols, row_ok, HEAD_DIM: tl.constexpr,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load ``base[rows, cols]`` (row stride ``stride``), zeros outside the document / head dim."""
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_head(base, rows, stride, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
               BLOCK_D1: tl.constexpr, CHECK_ROWS: tl.constexpr):
    x0 = _load_tile(base, rows, stride, tl.arange(0, BLOCK_D0), row_ok, HEAD_DIM, CHECK_ROWS, BLOCK_D0 > HEAD_DIM)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = _load_tile(base, rows, stride, BLOCK_D0 + tl.arange(0, BLOCK_D1), row_ok, HEAD_DIM, CHECK_ROWS,
                        BLOCK_D0 + BLOCK_D1 != HEAD_DIM)
    return x0, x1


@triton.jit
def _store_tile(base, rows, stride, cols, row_ok, x, HEAD_DIM: tl.constexpr, CHECK_COLS: tl.constexpr,
                ATOMIC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Store (or, with ``ATOMIC``, add) ``x`` at ``base[rows, cols]``, or ``x^T`` there when
    ``TRANSPOSED`` (``x`` is then (cols, rows)); rows outside ``row_ok`` and columns past HEAD_DIM
    are dropped."""
    if TRANSPOSED:
        ptrs = base + rows[None, :] * stride + cols[:, None]
        mask = row_ok[None, :]
        if CHECK_COLS:
            mask = mask & (cols[:, None] < HEAD_DIM)
    else:
        ptrs = base + rows[:, None] * stride + cols[None, :]
        mask = row_ok[:, None]
        if CHECK_COLS:
            mask = mask & (cols[None, :] < HEAD_DIM)
    if ATOMIC:  # relaxed: only the sum after the kernel matters, not the order
        tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _store_head(base, rows, stride, row_ok, x0, x1, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
                BLOCK_D1: tl.constexpr):
    """Store the rows of ``row_ok``; columns past HEAD_DIM are dropped."""
    _store_tile(base, rows, stride, tl.arange(0, BLOCK_D0), row_ok, x0, HEAD_DIM, BLOCK_D0 > HEAD_DIM, False, False)
    if BLOCK_D1 > 0:
        _store_tile(base, rows, stride, BLOCK_D0 + tl.arange(0, BLOCK_D1), row_ok, x1, HEAD_DIM,
                    BLOCK_D0 + BLOCK_D1 != HEAD_DIM, False, False)


@triton.jit
def _zeros_head(ROWS: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    x0 = tl.zeros([ROWS, BLOCK_D0], dtype=tl.float32)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = tl.zeros([ROWS, BLOCK_D1], dtype=tl.float32)
    return x0, x1


@triton.jit
def _dot_nt(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b^T`` over the head dim, piece by piece (float32)."""
    out = tl.dot(a0, tl.trans(b0), input_precision=PRECISION)
    if BLOCK_D1 > 0:
        out += tl.dot(a1, tl.trans(b1), input_precision=PRECISION)
    return out


@triton.jit
def _tile_doc(TILE_DOC, TILE_BLOCK, CU_Q, CU_K, tile):
    """Document bounds of a tile; spare tiles (doc = -1) get empty documents."""
    doc = tl.load(TILE_DOC + tile)
    block = tl.load(TILE_BLOCK + tile)
    valid = doc >= 0
    doc = tl.maximum(doc, 0)
    q_start = tl.load(CU_Q + doc)
    q_len = tl.where(valid, tl.load(CU_Q + doc + 1) - q_start, 0)
    k_start = tl.load(CU_K + doc)
    k_len = tl.where(valid, tl.load(CU_K + doc + 1) - k_start, 0)
    return block, q_start, q_len, k_start, k_len


@triton.jit
def _load_lse2(LSE, offs, ok):
    """Row log-sum-exp in base 2; rows that saw no key (or lie past the document) get +inf, so
    their probabilities come out 0 instead of NaN."""
    lse = tl.load(LSE + offs, mask=ok, other=float("inf")) * 1.4426950408889634  # log2(e)
    return tl.where(lse == float("-inf"), float("inf"), lse)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _load_kv_block(base, tma0, tma1, stride, doc_row, col, start_n, cols, col_ok, HEAD_DIM: tl.constexpr,
                   BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BOUNDARY: tl.constexpr, USE_TMA: tl.constexpr):
    """Key or value rows ``cols`` of a document: by TMA (``USE_TMA``: descriptors over the packed
    (total, H * D) tensor, zeros past its end) or by masked pointer loads."""
    if USE_TMA:
        # Rows past the document and padding columns (the next head's) are zeroed, as the
        # pointer path's masks do, so that non-finite values elsewhere cannot leak in.
        x0 = tma0.load([doc_row + start_n, col])
        if BOUNDARY:
            x0 = tl.where(col_ok[:, None], x0, 0.0)
        if BLOCK_D0 > HEAD_DIM:
            x0 = tl.where(tl.arange(0, BLOCK_D0)[None, :] < HEAD_DIM, x0, 0.0)
        x1 = x0
        if BLOCK_D1 > 0:
            x1 = tma1.load([doc_row + start_n, col + BLOCK_D0])
            if BOUNDARY:
                x1 = tl.where(col_ok[:, None], x1, 0.0)
            if BLOCK_D0 + BLOCK_D1 != HEAD_DIM:
                x1 = tl.where(BLOCK_D0 + tl.arange(0, BLOCK_D1)[None, :] < HEAD_DIM, x1, 0.0)
    else:
        x0, x1 = _load_head(base, cols, stride, col_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, BOUNDARY)
    return x0, x1


@triton.jit
def _fwd_inner(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
               K_TMA0, K_TMA1, V_TMA0, V_TMA1, k_start, kv_col,
               offs_m, k_len, causal_shift, lo, hi, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
               CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi). ``BOUNDARY`` blocks mask keys past the document."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k0, k1 = _load_kv_block(k_base, K_TMA0, K_TMA1, stride_kt, k_start, kv_col, start_n, cols, col_ok,
                                HEAD_DIM, BLOCK_D0, BLOCK_D1, BOUNDARY, USE_TMA)
        qk = _dot_nt(q0, q1, k0, k1, BLOCK_D1, PRECISION) * qk_scale
        if CAUSAL:
            keep = (cols[None, :] <= offs_m[:, None] + causal_shift) & col_ok[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        elif BOUNDARY:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A causal row may have seen no key yet: keep its exponents finite (its p is 0 anyway).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load_kv_block(v_base, V_TMA0, V_TMA1, stride_vt, k_start, kv_col, start_n, cols, col_ok,
                                HEAD_DIM, BLOCK_D0, BLOCK_D1, BOUNDARY, USE_TMA)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _varlen_attention_fwd_kernel(
        Q, K, V, O, LSE, CU_Q, CU_K, TILE_DOC, TILE_BLOCK, K_TMA0, K_TMA1, V_TMA0, V_TMA1,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
        qk_scale,
        HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ONE_LOOP: tl.constexpr):
    """One program per (query block of a document, query head). With ``USE_TMA`` the K/V blocks
    come through the TMA descriptors K_TMA*/V_TMA* (pieces 0 and 1 of the head dim); otherwise
    those arguments are unused. ``ONE_LOOP`` masks every key block in a single loop (short
    documents: one pipeline instead of two, each only a block or two long)."""
    pid = tl.program_id(0)
    tile = pid // HQ
    head = (pid % HQ).to(tl.int64)  # 64-bit: head-major layouts have large head strides
    m_block, q_start, q_len, k_start, k_len = _tile_doc(TILE_DOC, TILE_BLOCK, CU_Q, CU_K, tile)
    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + (head // GROUP) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + (head // GROUP) * stride_vh
    o_base = O + q_start.to(tl.int64) * stride_ot + head * stride_oh
    kv_col = (head // GROUP).to(tl.int32) * HEAD_DIM  # the head's first column in (total, H * D)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q0, q1 = _load_head(q_base, offs_m, stride_qt, row_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
    acc0, acc1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [0, full) are seen whole by every row of the tile: no masks. Blocks [full, hi)
    # are masked element-wise: the document's last, partial block and, causal, the diagonal band.
    # Bottom-right causal alignment: row i sees keys j <= i + (k_len - q_len).
    causal_shift = k_len - q_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, (m_block + 1) * BLOCK_M + causal_shift), 0)
        full = (tl.maximum(tl.minimum(k_len, m_block * BLOCK_M + causal_shift + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = k_len
        full = (k_len // BLOCK_N) * BLOCK_N
    if ONE_LOOP:
        full = 0
    else:
        acc0, acc1, m_i, l_i = _fwd_inner(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                          K_TMA0, K_TMA1, V_TMA0, V_TMA1, k_start, kv_col, offs_m, k_len,
                                          causal_shift, 0, full, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1,
                                          False, False, PRECISION, USE_TMA)
    acc0, acc1, m_i, l_i = _fwd_inner(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                      K_TMA0, K_TMA1, V_TMA0, V_TMA1, k_start, kv_col, offs_m, k_len,
                                      causal_shift, full, hi, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1,
                                      CAUSAL, True, PRECISION, USE_TMA)

    # Rows that saw no key: output 0, lse -inf.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    _store_head(o_base, offs_m, stride_ot, row_ok, (acc0 / l_safe[:, None]).to(O.dtype.element_ty),
                (acc1 / l_safe[:, None]).to(O.dtype.element_ty), HEAD_DIM, BLOCK_D0, BLOCK_D1)
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    tl.store(LSE + head * stride_lh + q_start + offs_m, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _varlen_attention_bwd_preprocess_kernel(O, DO, LSE, DLSE, DELTA, total, stride_ot, stride_oh, stride_dot,
                                            stride_doh, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                                            BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] - dLSE[h, t]  (float32); 0 on rows that saw no
    key, whose probabilities are all 0 (so a NaN dLSE there cannot leak into the gradients)."""
    head = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_T  # 64-bit: rows * row stride may pass 2**31
    rows = tl.arange(0, BLOCK_T)
    row_ok = row0 + rows < total
    cols = tl.arange(0, BLOCK_D)
    o = _load_tile(O + row0 * stride_ot + head * stride_oh, rows, stride_ot, cols, row_ok, HEAD_DIM, True,
                   BLOCK_D != HEAD_DIM)
    do = _load_tile(DO + row0 * stride_dot + head * stride_doh, rows, stride_dot, cols, row_ok, HEAD_DIM, True,
                    BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs = head * stride_lh + row0 + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs, mask=row_ok, other=0.0)
    lse = tl.load(LSE + offs, mask=row_ok, other=0.0)
    tl.store(DELTA + offs, tl.where(lse == float("-inf"), 0.0, delta), mask=row_ok)


@triton.jit
def _add_dq_piece(dq_base, dq_desc, dq_row, dq_col, offs_m, stride_dqt, row_ok, dsT, k, cols, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHECK_COLS: tl.constexpr, PRECISION: tl.constexpr,
                  DQ_TMA: tl.constexpr):
    if BLOCK_M >= 64:  # dQ = dS K: BLOCK_M rows fill a wgmma
        dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION) * sm_scale
    else:  # too few query rows for a wgmma: dQ^T = K^T dS^T, whose M side is this head-dim piece
        dq = tl.dot(tl.trans(k), dsT, input_precision=PRECISION) * sm_scale
    if DQ_TMA:
        # One bulk reduce-add of the whole (BLOCK_M, piece) box at (dq_row, dq_col) of the
        # (total, H * D) buffer. The box's rows past the document are the next document's and its
        # padding columns the next head's: they get exact zeros (NaN or inf in this document's K
        # must not reach them); TMA itself drops what lies past the buffer's end.
        if BLOCK_M < 64:
            dq = tl.trans(dq)
        keep = row_ok[:, None]
        if CHECK_COLS:
            keep = keep & (cols[None, :] < HEAD_DIM)
        dq_desc.atomic_add([dq_row, dq_col], tl.where(keep, dq, 0.0))
    else:
        _store_tile(dq_base, offs_m, stride_dqt, cols, row_ok, dq, HEAD_DIM, CHECK_COLS, True, BLOCK_M < 64)


@triton.jit
def _add_dq(dq_base, dq_desc0, dq_desc1, dq_row, dq_col, offs_m, stride_dqt, row_ok, dsT, k0, k1, sm_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
            PRECISION: tl.constexpr, DQ_TMA: tl.constexpr):
    """Add this key block's share of dQ to the float32 buffer: relaxed atomics (only the sum
    matters), or with ``DQ_TMA`` a TMA bulk reduce-add per head-dim piece through the descriptors
    dq_desc0/1 (``cp.reduce.async.bulk.tensor``: one instruction per box instead of one atomic per
    element, issued asynchronously from shared memory)."""
    _add_dq_piece(dq_base, dq_desc0, dq_row, dq_col, offs_m, stride_dqt, row_ok, dsT, k0, tl.arange(0, BLOCK_D0),
                  sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D0 > HEAD_DIM, PRECISION, DQ_TMA)
    if BLOCK_D1 > 0:
        _add_dq_piece(dq_base, dq_desc1, dq_row, dq_col + BLOCK_D0, offs_m, stride_dqt, row_ok, dsT, k1,
                      BLOCK_D0 + tl.arange(0, BLOCK_D1), sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D0 + BLOCK_D1 != HEAD_DIM,
                      PRECISION, DQ_TMA)


@triton.jit
def _varlen_attention_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, TILE_DOC, TILE_BLOCK, DQ_TMA0, DQ_TMA1, first_pid,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        qk_scale, sm_scale,
        HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr, DQ_TMA: tl.constexpr):
    """One program per (key block of a document, KV head), numbered from ``first_pid`` (0, or where
    the fused kernel's dK/dV programs begin): dK and dV of that block, summed over the GROUP query
    heads that share the KV head (so no atomics on dK/dV); with ``ATOMIC_DQ`` it also adds its share
    of dQ to the float32 buffer DQ, through the TMA descriptors DQ_TMA0/1 over it with ``DQ_TMA``
    (otherwise those arguments are unused)."""
    pid = tl.program_id(0) - first_pid
    tile = pid // HKV
    kv_head = (pid % HKV).to(tl.int64)
    n_block, q_start, q_len, k_start, k_len = _tile_doc(TILE_DOC, TILE_BLOCK, CU_Q, CU_K, tile)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < k_len
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    k0, k1 = _load_head(k_base, offs_n, stride_kt, col_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
    v0, v1 = _load_head(v_base, offs_n, stride_vt, col_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
    dk0, dk1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
    dv0, dv1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)

    causal_shift = k_len - q_len
    lo = 0
    if CAUSAL:  # the first query row that sees key n_block * BLOCK_N, rounded down to a block
        lo = (tl.maximum(n_block * BLOCK_N - causal_shift, 0) // BLOCK_M) * BLOCK_M
    # Spare tiles and empty key blocks skip the loop. One loop runs over (query head of the group,
    # query block), so that the load pipeline does not restart at each head.
    q_hi = tl.where(k_len > 0, q_len, 0)
    m_blocks = tl.cdiv(tl.maximum(q_hi - lo, 0), BLOCK_M)
    offs_mb = tl.arange(0, BLOCK_M)
    for step in range(0, GROUP * m_blocks):
        g = step // m_blocks
        start_m = lo + (step - g * m_blocks) * BLOCK_M
        head = kv_head * GROUP + g
        q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_base = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
        offs_m = start_m + offs_mb
        row_ok = offs_m < q_len
        q0, q1 = _load_head(q_base, offs_m, stride_qt, row_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
        do0, do1 = _load_head(do_base, offs_m, stride_dot, row_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
        lse2 = _load_lse2(LSE + head * stride_lh + q_start, offs_m, row_ok)
        delta = tl.load(DELTA + head * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
        # Scores transposed, (keys, queries): the key block is the M side of the products that
        # build dK and dV, so with BLOCK_N = 128 both warpgroups of 8 warps split it.
        pT = tl.math.exp2(_dot_nt(k0, k1, q0, q1, BLOCK_D1, PRECISION) * qk_scale - lse2[None, :])
        # Keys past the document (zero rows) must get probability 0: exp2(0 - lse) can
        # overflow, and inf * 0 in dS @ K would put NaN into dQ.
        if CAUSAL:
            pT = tl.where((offs_n[:, None] <= offs_m[None, :] + causal_shift) & col_ok[:, None], pT, 0.0)
        else:
            pT = tl.where(col_ok[:, None], pT, 0.0)
        dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PRECISION)
        dsT = pT * (_dot_nt(v0, v1, do0, do1, BLOCK_D1, PRECISION) - delta[None, :])
        dk0 += tl.dot(dsT.to(q0.dtype), q0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq_base = DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh
            _add_dq(dq_base, DQ_TMA0, DQ_TMA1, q_start + start_m, head.to(tl.int32) * HEAD_DIM, offs_m, stride_dqt,
                    row_ok, dsT.to(k0.dtype), k0, k1, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1, PRECISION,
                    DQ_TMA)

    dk_base = DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh
    dv_base = DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh
    _store_head(dk_base, offs_n, stride_dkt, col_ok, (dk0 * sm_scale).to(DK.dtype.element_ty),
                (dk1 * sm_scale).to(DK.dtype.element_ty), HEAD_DIM, BLOCK_D0, BLOCK_D1)
    _store_head(dv_base, offs_n, stride_dvt, col_ok, dv0.to(DV.dtype.element_ty), dv1.to(DV.dtype.element_ty),
                HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _varlen_attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, TILE_DOC, TILE_BLOCK, first_pid,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lh,
        qk_scale, sm_scale,
        HQ: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Deterministic dQ: one program per (query block of a document, query head), numbered from
    ``first_pid`` (0, or where the fused kernel's dQ programs begin), looping over the document's
    keys (recomputes QK^T and dO V^T instead of accumulating with atomics)."""
    pid = tl.program_id(0) - first_pid
    tile = pid // HQ
    head = (pid % HQ).to(tl.int64)  # 64-bit: head-major layouts have large head strides
    m_block, q_start, q_len, k_start, k_len = _tile_doc(TILE_DOC, TILE_BLOCK, CU_Q, CU_K, tile)
    k_base = K + k_start.to(tl.int64) * stride_kt + (head // GROUP) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + (head // GROUP) * stride_vh
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q0, q1 = _load_head(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, offs_m, stride_qt, row_ok,
                        HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
    do0, do1 = _load_head(DO + q_start.to(tl.int64) * stride_dot + head * stride_doh, offs_m, stride_dot, row_ok,
                          HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
    dq0, dq1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
    lse2 = _load_lse2(LSE + head * stride_lh + q_start, offs_m, row_ok)
    delta = tl.load(DELTA + head * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)

    causal_shift = k_len - q_len
    hi = k_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_len, (m_block + 1) * BLOCK_M + causal_shift), 0)
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_nb
        col_ok = cols < k_len
        k0, k1 = _load_head(k_base, cols, stride_kt, col_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
        v0, v1 = _load_head(v_base, cols, stride_vt, col_ok, HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
        p = tl.math.exp2(_dot_nt(q0, q1, k0, k1, BLOCK_D1, PRECISION) * qk_scale - lse2[:, None])
        # Keys past the document get probability 0 (see the dK/dV kernel).
        if CAUSAL:
            p = tl.where((cols[None, :] <= offs_m[:, None] + causal_shift) & col_ok[None, :], p, 0.0)
        else:
            p = tl.where(col_ok[None, :], p, 0.0)
        ds = (p * (_dot_nt(do0, do1, v0, v1, BLOCK_D1, PRECISION) - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=PRECISION)
    _store_head(DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh, offs_m, stride_dqt, row_ok,
                (dq0 * sm_scale).to(DQ.dtype.element_ty), (dq1 * sm_scale).to(DQ.dtype.element_ty),
                HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _varlen_attention_bwd_fused_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, KV_TILE_DOC, KV_TILE_BLOCK, Q_TILE_DOC, Q_TILE_BLOCK,
        kv_programs,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        qk_scale, sm_scale,
        HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, GRID_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """The split design's two kernels in one launch, as FlexAttention's backward runs them: the
    first ``kv_programs`` programs do the dK/dV work (GRID_BLOCK keys each, query steps of BLOCK_M
    rows), the rest the dQ work (GRID_BLOCK queries each, key steps of BLOCK_N). The dQ programs
    start as the dK/dV programs drain, so they fill the tail that documents of unequal length
    leave, and there is one launch instead of two. No atomics: deterministic."""
    if tl.program_id(0) < kv_programs:
        _varlen_attention_bwd_kernel(
            Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, KV_TILE_DOC, KV_TILE_BLOCK, DQ, DQ, 0,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, qk_scale, sm_scale,
            HKV, GROUP, HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, GRID_BLOCK, CAUSAL, False, PRECISION, False)
    else:
        _varlen_attention_bwd_dq_kernel(
            Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, Q_TILE_DOC, Q_TILE_BLOCK, kv_programs,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale, HQ, GROUP, HEAD_DIM, BLOCK_D0, BLOCK_D1,
            GRID_BLOCK, BLOCK_N, CAUSAL, PRECISION)


# ------------------------------------------------------------------------------------------------
# Designs, launch configurations and launchers
# ------------------------------------------------------------------------------------------------
# A design fixes the kernels' structure and the block that tiles the grid (query block of the
# forward and dQ kernels, key block of the dK/dV kernel: the tile list depends on it). Inside a
# design the Triton autotuner picks the inner-loop block, warps and stages among candidates
# checked with ``python -m moca_kernels.compile_check`` (sm_90a: every product on wgmma, executed
# MMA work equal to the useful work, registers, spills, shared memory). Between designs the
# launcher times each once per shape class on the card in use and keeps the fastest.
#
# Forward. "wide": 128-row query blocks, 8 warps, the key blocks every row sees whole in a loop
#   of their own, unmasked. "short": 64-row query blocks, 4 warps, 3 stages, one masked loop; two
#   programs fit an SM, and a short document wastes less of its last block.
# Backward. "atomic": 128-key blocks, 8 warps, query steps of 32 or 64 rows, dQ added to a float32
#   buffer by atomics (FlashAttention-2's scheme; with MOCA_KERNELS_TMA=1 by TMA bulk reduce-adds).
#   "split": the same dK/dV loop without dQ, then a dQ kernel over 128-query blocks; no atomics,
#   hence deterministic. "fused": split's two kernels as one launch (the dQ programs after the
#   dK/dV programs), deterministic too.

DESIGNS = {"fwd": ("wide", "short"), "bwd": ("atomic", "split", "fused")}
DESIGN_ENV = {"fwd": "MOCA_KERNELS_ATTENTION_FWD", "bwd": "MOCA_KERNELS_ATTENTION_BWD"}


def head_dim_class(head_dim: int) -> str:
    return "small" if head_dim <= 64 else "medium" if head_dim <= 128 else "large"


# (kernel, design) -> the grid block per head-dim class and (inner block, warps, stages)
# candidates, the first valid one being used without autotuning. A design offers no class it lacks.
TUNING = {
    ("fwd", "wide"): dict(grid_block=dict(small=128, medium=128, large=64), candidates=dict(
        small=[(128, 8, 3), (64, 8, 3), (64, 4, 3), (128, 8, 2)],
        medium=[(64, 8, 3), (64, 8, 2), (128, 8, 2)],
        large=[(32, 8, 2), (64, 8, 2), (16, 4, 2)])),
    ("fwd", "short"): dict(grid_block=dict(small=64, medium=64), candidates=dict(
        small=[(64, 4, 3), (64, 4, 2)],
        medium=[(64, 4, 3), (64, 4, 2)])),
    ("bwd", "atomic"): dict(grid_block=dict(small=128, medium=128, large=64), candidates=dict(
        small=[(64, 8, 2), (64, 8, 3), (32, 8, 2)],
        medium=[(32, 8, 2), (32, 8, 3), (64, 8, 2)],
        large=[(16, 8, 2), (32, 8, 2)])),
    ("bwd", "split"): dict(grid_block=dict(small=128, medium=128, large=64), candidates=dict(
        small=[(64, 8, 2), (64, 8, 3)],
        medium=[(32, 8, 2), (32, 8, 3), (64, 8, 2)],
        large=[(16, 8, 2), (32, 8, 2)])),
    ("bwd_dq", "split"): dict(grid_block=dict(small=128, medium=128, large=64), candidates=dict(
        small=[(64, 8, 2), (64, 8, 3)],
        medium=[(64, 8, 2), (64, 8, 3), (32, 8, 2)],
        large=[(32, 8, 2), (16, 8, 2)])),
}
# The fused backward does split's dK/dV work with its candidates; its dQ work takes the first key
# step of split's dQ kernel (one kernel, so one set of warps and stages for both).
TUNING[("bwd", "fused")] = TUNING[("bwd", "split")]




def wgmma_shapes_ok(kernel: str, design: str, inner_block: int, head_dim: int) -> bool:
    """Whether every product of a candidate can run as Hopper wgmma (at least 64 rows on its M
    side). The atomic dK/dV kernel with query steps under 64 rows computes dQ^T = K^T dS^T, whose
    M side is each head-dim piece: then every piece must have 64 columns or more."""
    if (kernel, design) != ("bwd", "atomic") or inner_block >= 64:
        return True
    d0, d1 = head_dim_split(head_dim)
    return d0 >= 64 and (d1 == 0 or d1 >= 64)


# The dK/dV kernel keeps dK and dV (BLOCK_N x D each) and the step's two score tiles (BLOCK_N x
# BLOCK_M) in float32 registers. With 64-row query steps over 128 keys this fits 255 registers a
# thread up to a head dim of 80 (245 registers); at 96 and 128 it spills (64 to 108 bytes, by
# compile_check), so those head dims take 32-row steps.
MAX_HEAD_DIM_WIDE_BWD_STEP = 80


def registers_ok(kernel: str, inner_block: int, head_dim: int) -> bool:
    """Whether a dK/dV candidate fits in registers (see MAX_HEAD_DIM_WIDE_BWD_STEP)."""
    return kernel != "bwd" or inner_block < 64 or sum(head_dim_split(head_dim)) <= MAX_HEAD_DIM_WIDE_BWD_STEP


def candidates(kernel: str, design: str, head_dim: int) -> list[tuple[int, int, int]]:
    """(inner block, warps, stages) candidates of a kernel in a design for this head dim: products
    that all fit wgmma, and (dK/dV) tiles that fit in registers."""
    every = TUNING[(kernel, design)]["candidates"].get(head_dim_class(head_dim), [])
    return [c for c in every
            if wgmma_shapes_ok(kernel, design, c[0], head_dim) and registers_ok(kernel, c[0], head_dim)]


@functools.cache
def offered(kind: str, head_dim: int) -> tuple[str, ...]:
    """The designs of ``kind`` ("fwd", "bwd") that serve this head dim: those with candidates for
    each of their kernels (fixed tables: worked out once per head dim, not on every call)."""
    cls = head_dim_class(head_dim)
    return tuple(d for d in DESIGNS[kind]
                 if all(cls in spec["grid_block"] and candidates(kernel, d, head_dim)
                        for (kernel, design), spec in TUNING.items() if design == d and kernel.startswith(kind)))


# The interpreter runs one configuration per kernel: 64-row grid blocks (test documents of a few
# hundred rows then span several) and the inner block of the first GPU candidate up to 64, so both
# ways of adding dQ run in the tests.
INTERPRET_GRID_BLOCK = 64


def grid_block(kernel: str, design: str, head_dim: int) -> int:
    if triton_interpret():
        return INTERPRET_GRID_BLOCK
    return TUNING[(kernel, design)]["grid_block"][head_dim_class(head_dim)]


def _interpret_block(kernel: str, design: str, head_dim: int) -> int:
    return min(candidates(kernel, design, head_dim)[0][0], INTERPRET_GRID_BLOCK)


_TUNE_KEY = ["HEAD_DIM", "GROUP", "CAUSAL"]


def _autotune(kernel, name: str, block: str, design_of, key=(), pre_hook=None, **kwargs):
    """Autotune ``block`` (the inner-loop block), warps and stages over the candidates of the
    call's design (``design_of(call_kwargs)``) and head dim."""
    designs = [d for k, d in TUNING if k == name]
    if triton_interpret():
        configs = [triton.Config({block: b}, num_warps=4, num_stages=1, pre_hook=pre_hook) for b in (16, 32, 64)]
    else:
        every = dict.fromkeys(c for d in designs for cls in TUNING[(name, d)]["candidates"].values() for c in cls)
        configs = [triton.Config({block: b}, num_warps=w, num_stages=s, pre_hook=pre_hook) for b, w, s in every]

    def prune(configs, named_args, **call_kwargs):
        design, head_dim = design_of(call_kwargs), call_kwargs["HEAD_DIM"]
        if triton_interpret():
            inner = _interpret_block(name, design, head_dim)
            return [c for c in configs if c.kwargs[block] == inner]
        allowed = candidates(name, design, head_dim)
        if autotune_off():  # first candidate only: compile once, no tuning
            allowed = allowed[:1]
        return [c for c in configs if (c.kwargs[block], c.num_warps, c.num_stages) in allowed]

    return triton.autotune(configs, key=_TUNE_KEY + list(key), prune_configs_by={"early_config_prune": prune},
                           do_bench=bench_unless_disabled, **kwargs)(kernel)


def _tma_block_rows(nargs):
    """The forward's TMA descriptors' block is BLOCK_N rows, which each configuration sets."""
    if nargs["USE_TMA"]:
        for name in ("K_TMA0", "K_TMA1", "V_TMA0", "V_TMA1"):
            nargs[name].block_shape = [nargs["BLOCK_N"], nargs[name].block_shape[1]]


def _dq_tma_block_rows(nargs):
    """The dQ descriptors' box is one query step, BLOCK_M rows, which each configuration sets."""
    if nargs["DQ_TMA"]:
        for name in ("DQ_TMA0", "DQ_TMA1"):
            nargs[name].block_shape = [nargs["BLOCK_M"], nargs[name].block_shape[1]]


_fwd = _autotune(_varlen_attention_fwd_kernel, "fwd", "BLOCK_N", lambda kw: "short" if kw["ONE_LOOP"] else "wide",
                 key=["USE_TMA", "ONE_LOOP", "BLOCK_M"], pre_hook=_tma_block_rows)
_bwd = _autotune(_varlen_attention_bwd_kernel, "bwd", "BLOCK_M", lambda kw: "atomic" if kw["ATOMIC_DQ"] else "split",
                 key=["ATOMIC_DQ", "BLOCK_N", "DQ_TMA"], reset_to_zero=["DQ"], pre_hook=_dq_tma_block_rows)
_bwd_dq = _autotune(_varlen_attention_bwd_dq_kernel, "bwd_dq", "BLOCK_N", lambda kw: "split", key=["BLOCK_M"])
_bwd_fused = _autotune(_varlen_attention_bwd_fused_kernel, "bwd", "BLOCK_M", lambda kw: "fused",
                       key=["GRID_BLOCK", "BLOCK_N"])


@functools.cache  # fixed tables, asked on every backward call
def fused_dq_step(head_dim: int) -> int:
    """Key step of the fused backward's dQ programs: the first candidate of split's dQ kernel."""
    if triton_interpret():
        return _interpret_block("bwd_dq", "split", head_dim)
    return candidates("bwd_dq", "split", head_dim)[0][0]


# Design chosen per (kind, head dim, group, causal, dtype, mean document length class); None
# where no design passed the numerics check (the call then runs the PyTorch reference).
_DESIGN_CHOICE: dict[tuple, str | None] = {}
# Per shape class, the designs that passed the check (the ones that competed) and those rejected.
_VERIFIED: dict[tuple, dict[str, list[str]]] = {}


def _length_class(cu_seqlens: torch.Tensor, total: int) -> int:
    """log2 class of the mean document length (no device read: the count is the tensor's size)."""
    return min((total // max(1, cu_seqlens.numel() - 1)).bit_length(), 14)


def _time_designs(names: list[str], run: Callable[[str], object]) -> dict[str, float]:
    """Median time of each design's run on a GPU; nothing in the interpreter (all tie)."""
    if triton_interpret():
        return {}
    return {name: triton.testing.do_bench(lambda name=name: run(name), return_mode="median") for name in names}


def choose_design(kind: str, names: tuple[str, ...], key: tuple, run: Callable[[str], object],
                  verify: Callable[[dict], list[str]] | None = None,
                  forced: str | None = None) -> tuple[str | None, object]:
    """The design of ``kind`` among ``names`` for a call, and its result on the call when it was
    computed while choosing (else None).

    The candidates are ``forced`` (the deterministic backward's), else the design named by the
    environment variable DESIGN_ENV[kind], else all of ``names`` (the first alone under
    MOCA_KERNELS_AUTOTUNE=0). On the first call of ``key`` (and candidates) each runs once and
    ``verify(results)`` keeps those whose numbers pass (``moca_kernels._verify``); the fastest of
    them is kept for ``key`` (the first where nothing can be timed: the interpreter, a single one).
    None when every candidate failed. During CUDA-graph capture of a new key, the first candidate,
    unchecked."""
    only = forced
    env = os.environ.get(DESIGN_ENV[kind])
    if only is None and env:
        if env not in names:
            raise ValueError(f"{DESIGN_ENV[kind]}={env!r}: the {kind} designs for this call are {names}")
        only = env
    key = (kind, *key) if only is None else (kind, *key, only)
    if key in _DESIGN_CHOICE:  # also during CUDA-graph capture, after an eager warm-up
        return _DESIGN_CHOICE[key], None
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return only or names[0], None
    candidates = [only] if only else list(names[:1] if autotune_off() else names)
    results = {}
    if verify is not None and can_verify():
        results = {name: run(name) for name in candidates}
        passed = verify(results)
        _VERIFIED[key] = {"passed": passed, "rejected": [d for d in candidates if d not in passed]}
        candidates = passed
    if not candidates:
        _DESIGN_CHOICE[key] = None
        return None, None
    times = _time_designs(candidates, run) if len(candidates) > 1 and not autotune_off() else {}
    _DESIGN_CHOICE[key] = min(times, key=times.get) if times else candidates[0]
    return _DESIGN_CHOICE[key], results.get(_DESIGN_CHOICE[key])


def tuning_report() -> dict:
    """What the autotuners chose so far: per kernel, its key and configuration; per shape class,
    the design."""
    out = {}
    for name, tuner in (("fwd", _fwd), ("bwd", _bwd), ("bwd_dq", _bwd_dq), ("bwd_fused", _bwd_fused)):
        out[name] = {str(key): str(config) for key, config in tuner.cache.items()}
    out["designs"] = {str(key): design for key, design in _DESIGN_CHOICE.items()}
    out["verified"] = {str(key): verdict for key, verdict in _VERIFIED.items()}
    return out


def preprocess_block_t(head_dim: int) -> int:
    """Rows per program of the delta preprocess: about 4k elements a tile keeps it spill-free."""
    return max(16, 4096 // max(16, triton.next_power_of_2(head_dim)))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs are for checking, not speed: keep them exact instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


TMA_ENV = "MOCA_KERNELS_TMA"


def _tma_descriptors(x: torch.Tensor, d0: int, d1: int, reduce: bool = False):
    """TMA descriptors of the two head-dim pieces over ``x`` (total, H, D) seen as (total, H * D),
    or None where TMA cannot address it (heads not packed, addresses, row stride or (``reduce``)
    head width not 16-byte aligned, no rows, too many rows for 32-bit coordinates) or should not
    read it: float32 K/V tiles overflow shared memory (compile_check) and are no speed path. The
    float32 dQ buffer is written through them (``reduce``), one box at a time. Block rows are set
    per config."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    total, heads, dim = x.shape
    size = x.element_size()
    if ((x.dtype == torch.float32 and not reduce) or total == 0 or total >= 2**31 or x.stride(1) != dim
            or x.data_ptr() % 16 or (x.stride(0) * size) % 16 or d0 * size < 16 or (reduce and (dim * size) % 16)):
        return None
    shape, strides = [total, heads * dim], [x.stride(0), 1]
    first = TensorDescriptor(x, shape, strides, [1, d0])
    return first, (TensorDescriptor(x, shape, strides, [1, d1]) if d1 else first)


def dq_tma_descriptors(q: torch.Tensor, dq: torch.Tensor):
    """The atomic backward's descriptors over its float32 dQ buffer ``dq`` (like ``q``), or None
    where dQ keeps the pointer atomics: float32 inputs (a checking path, not a speed path) and
    buffers TMA cannot address (``_tma_descriptors``)."""
    if q.dtype == torch.float32:
        return None
    return _tma_descriptors(dq, *head_dim_split(q.shape[2]), reduce=True)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool, memo: dict):
    """Returns (out like q, lse float32 (Hq, total_q)). ``memo`` keeps the tile lists of this pair
    of ``cu_seqlens`` (see ``tiles``).

    With the environment variable MOCA_KERNELS_TMA=1 (experimental, not yet measured on a GPU)
    the K/V blocks are read through Hopper TMA descriptors where the layout allows it."""
    total_q, hq, head_dim = q.shape
    def run(design: str):
        return _forward(design, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, memo)

    key = (head_dim, hq // k.shape[1], causal, q.dtype, _length_class(cu_seqlens_q, total_q))

    def verify(results):
        return verify_designs.forward_designs(results, key, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    design, result = choose_design("fwd", offered("fwd", head_dim), key, run, verify)
    if design is None:
        return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return result if result is not None else run(design)


def _forward(design: str, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool, memo: dict):
    total_q, hq, head_dim = q.shape
    group = hq // k.shape[1]
    d0, d1 = head_dim_split(head_dim)
    out = q.new_empty(q.shape)
    lse = torch.empty((hq, total_q), device=q.device, dtype=torch.float32)
    block_m = grid_block("fwd", design, head_dim)
    tile_doc, tile_block = tiles(memo, False, cu_seqlens_q, cu_seqlens_k, total_q, block_m)
    descriptors = None
    if os.environ.get(TMA_ENV) == "1":
        k_desc, v_desc = _tma_descriptors(k, d0, d1), _tma_descriptors(v, d0, d1)
        descriptors = (*k_desc, *v_desc) if k_desc and v_desc else None
    _fwd[(tile_doc.numel() * hq,)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, tile_doc, tile_block, *(descriptors or (k, k, v, v)),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        softmax_scale * LOG2E,
        HQ=hq, GROUP=group, HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=block_m,
        CAUSAL=causal, PRECISION=_precision(q.dtype), USE_TMA=descriptors is not None, ONE_LOOP=design == "short")
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool,
             deterministic: bool, memo: dict):
    """Returns (dq, dk, dv) like (q, k, v). ``dlse`` (or None) is the gradient of ``lse``.
    ``deterministic`` takes the split design (no atomics).

    With MOCA_KERNELS_TMA=1 (experimental, not yet measured on a GPU) the atomic design adds dQ
    through TMA bulk reduce-adds where the layout allows it."""
    total_q, hq, head_dim = q.shape
    delta = torch.empty_like(lse)
    block_t = preprocess_block_t(head_dim)
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
        out, dout, lse, dlse if dlse is not None else delta, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_DLSE=dlse is not None)
    def run(design: str):
        return _backward(design, dout, q, k, v, lse, delta, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, memo)

    key = (head_dim, hq // k.shape[1], causal, q.dtype, _length_class(cu_seqlens_k, k.shape[0]))

    def verify(results):
        return verify_designs.backward_designs(results, key, dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                               softmax_scale, causal)

    design, result = choose_design("bwd", offered("bwd", head_dim), key, run, verify,
                                   "split" if deterministic else None)
    if design is None:
        return varlen_attention_reference_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                                   causal)
    return result if result is not None else run(design)


def _backward(design: str, dout, q, k, v, lse, delta, cu_seqlens_q, cu_seqlens_k, softmax_scale: float,
              causal: bool, memo: dict):
    total_q, hq, head_dim = q.shape
    hkv = k.shape[1]
    d0, d1 = head_dim_split(head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, CAUSAL=causal, PRECISION=_precision(q.dtype))
    scales = (softmax_scale * LOG2E, softmax_scale)
    atomic = design == "atomic"
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    if design == "fused":
        dq = q.new_empty(q.shape)
        block = grid_block("bwd", design, head_dim)
        kv_doc, kv_block = tiles(memo, True, cu_seqlens_q, cu_seqlens_k, k.shape[0], block)
        q_doc, q_block = tiles(memo, False, cu_seqlens_q, cu_seqlens_k, total_q, block)
        _bwd_fused[(kv_doc.numel() * hkv + q_doc.numel() * hq,)](
            q, k, v, dout, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, kv_doc, kv_block, q_doc, q_block,
            kv_doc.numel() * hkv, *strides, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1), lse.stride(0), *scales,
            HQ=hq, HKV=hkv, GROUP=hq // hkv, GRID_BLOCK=block, BLOCK_N=fused_dq_step(head_dim), **common)
        return dq, dk, dv
    # The atomic design accumulates dQ in float32 across key blocks.
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else q.new_empty(q.shape)
    block_n = grid_block("bwd", design, head_dim)
    tile_doc, tile_block = tiles(memo, True, cu_seqlens_q, cu_seqlens_k, k.shape[0], block_n)
    dq_descriptors = None
    if atomic and os.environ.get(TMA_ENV) == "1":
        dq_descriptors = dq_tma_descriptors(q, dq)
    _bwd[(tile_doc.numel() * hkv,)](
        q, k, v, dout, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, tile_doc, tile_block,
        *(dq_descriptors or (dq, dq)), 0, *strides, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), lse.stride(0), *scales,
        HKV=hkv, GROUP=hq // hkv, BLOCK_N=block_n, ATOMIC_DQ=atomic, DQ_TMA=dq_descriptors is not None, **common)
    if atomic:
        return dq.to(q.dtype), dk, dv
    block_m = grid_block("bwd_dq", design, head_dim)
    tile_doc, tile_block = tiles(memo, False, cu_seqlens_q, cu_seqlens_k, total_q, block_m)
    _bwd_dq[(tile_doc.numel() * hq,)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, tile_doc, tile_block, 0,
        *strides, dq.stride(0), dq.stride(1), lse.stride(0), *scales,
        HQ=hq, GROUP=hq // hkv, BLOCK_M=block_m, **common)
    return dq, dk, dv
