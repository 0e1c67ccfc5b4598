"""Compile every Triton kernel variant for Hopper (sm_90a) without a GPU, and report its resources.

    python -m moca_kernels.compile_check            # everything below, plus causal, hdim 96/192, fp32
    python -m moca_kernels.compile_check --quick    # bf16 autotuning candidates of every design, hdim
                                                    # 64/80/128/256, non-causal (CI)

Triton compiles down to a cubin with its bundled LLVM and ptxas given only a target, so this
catches what the CPU interpreter cannot: code that does not compile for the GPU, and shared memory
beyond the 227 KiB an sm_90 block may use. From the SASS (nvdisasm) it counts the matrix
instructions and the work they execute: an ``HGMMA.MxNxK`` runs once per warpgroup, an
``HMMA.16816`` (``mma.sync``) once per warp. Against that stands the useful work, the products of
the tile as the kernel writes them (the ``tt.dot`` shapes of the TTIR, M x N x K each), so the
ratio shows what the compiler adds: warpgroups that compute the same rows twice, instruction
shapes wider than the tile. Head-dim padding is part of the useful work here (it is the kernel's
choice, not the compiler's); for head dims that are a power of two or a power of two plus one of at
least 16 (64, 80 = 64 + 16, 96, 128) there is none. Both counts are static, over the code as
written: a loop body counts once on each side.

A bf16/fp16 variant at a hot head dim (64, 80, 128) fails when its products miss wgmma (no
``HGMMA``, or any ``HMMA``) or when it executes more than MAX_MMA_RATIO times the useful work;
at other head dims these are warnings. Register spills (ptxas -v) are warnings, failures with
``--fail-on-spills``. Every failure exits with status 1. Run it without ``TRITON_INTERPRET`` set.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

SM90_MAX_SHARED = 232448
HEAD_DIMS = (64, 80, 128, 256)
HOT_HEAD_DIMS = (64, 80, 128)
MAX_MMA_RATIO = 1.05


ATTENTION_INTS = ("total", "kv_programs", "first_pid")
INFO_NCE_INTS = ("n_rows", "n_cols", "dim", "cols_per_split", "col_offset", "size_class")
POINTWISE_INTS = ("rows_per_program", "n")


def _signature(kernel, pointers: dict[str, str]) -> dict[str, str]:
    sig = {}
    tiles = {f"{x}TILE_{y}": "*i32" for x in ("", "KV_", "Q_") for y in ("DOC", "BLOCK")}
    pointers = dict(CU_Q="*i32", CU_K="*i32", **tiles, **pointers)
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name.startswith("stride") or name in ATTENTION_INTS + INFO_NCE_INTS + POINTWISE_INTS:
            sig[name] = "i32"
        elif name.endswith("scale") or name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def variants(quick: bool) -> list[dict]:
    """The (kernel, constexprs, warps, stages) the launchers can produce: every autotuning
    candidate of every design in bf16, and in full mode also causal, more head dims, and float32
    (first candidate of each design; exact IEEE products, which do not use wgmma and are not a
    speed path). ``default`` marks the first candidate of a design, used without autotuning."""
    import triton

    from .varlen_attention import triton_kernels as tk
    out = []
    head_dims = HEAD_DIMS if quick else HEAD_DIMS + (96, 192)
    for dtype in ("bf16",) if quick else ("bf16", "fp32"):
        dt = "*" + dtype
        precision = "ieee" if dtype == "fp32" else "tf32"
        for head_dim in head_dims:
            d0, d1 = tk.head_dim_split(head_dim)
            dims = dict(HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, PRECISION=precision)
            common = dict(dtype=dtype, dots=dtype != "fp32", head_dim=head_dim)

            def configs(kernel, design, head_dim=head_dim, dtype=dtype):
                every = tk.candidates(kernel, design, head_dim)
                every = every if dtype == "bf16" else every[:1]
                return [(c, i == 0) for i, c in enumerate(every)]

            for causal in (False,) if quick else (False, True):
                tmas = (False, True) if dtype != "fp32" else (False,)  # launches never use TMA on float32
                for design in tk.offered("fwd", head_dim):
                    block_m = tk.grid_block("fwd", design, head_dim)
                    for ((block, warps, stages), default), tma in itertools.product(configs("fwd", design), tmas):
                        kv = dict.fromkeys(("K_TMA0", "K_TMA1", "V_TMA0", "V_TMA1"), dt)
                        if tma:
                            kv = {f"{x}_TMA{i}": f"tensordesc<{dtype}[{block},{piece or d0}]>"
                                  for x in "KV" for i, piece in enumerate((d0, d1))}
                        out.append(dict(kernel="_varlen_attention_fwd_kernel", design=design, default=default,
                                        pointers=dict(Q=dt, K=dt, V=dt, O=dt, LSE="*fp32", **kv),
                                        constexprs=dict(HQ=16, GROUP=8, BLOCK_M=block_m, BLOCK_N=block,
                                                        CAUSAL=causal, USE_TMA=tma, ONE_LOOP=design == "short",
                                                        **dims),
                                        warps=warps, stages=stages, **common))
                for design in tk.offered("bwd", head_dim):
                    atomic = design == "atomic"
                    dq = "*fp32" if atomic else dt
                    bwd_block = tk.grid_block("bwd", design, head_dim)
                    for ((block, warps, stages), default), tma in itertools.product(
                            configs("bwd", design), tmas if atomic else (False,)):
                        if design == "fused":
                            out.append(dict(kernel="_varlen_attention_bwd_fused_kernel", design=design,
                                            default=default, pointers=dict(Q=dt, K=dt, V=dt, DO=dt, DQ=dt, DK=dt,
                                                                           DV=dt, LSE="*fp32", DELTA="*fp32"),
                                            constexprs=dict(HQ=16, HKV=2, GROUP=8, GRID_BLOCK=bwd_block, BLOCK_M=block,
                                                            BLOCK_N=tk.fused_dq_step(head_dim), CAUSAL=causal, **dims),
                                            warps=warps, stages=stages, **common))
                            continue
                        dq_tma = dict.fromkeys(("DQ_TMA0", "DQ_TMA1"), dq)
                        if tma:
                            dq_tma = {f"DQ_TMA{i}": f"tensordesc<fp32[{block},{piece or d0}]>"
                                      for i, piece in enumerate((d0, d1))}
                        out.append(dict(kernel="_varlen_attention_bwd_kernel", design=design, default=default,
                                        pointers=dict(Q=dt, K=dt, V=dt, DO=dt, DK=dt, DV=dt, LSE="*fp32",
                                                      DELTA="*fp32", DQ=dq, **dq_tma),
                                        constexprs=dict(HKV=2, GROUP=8, BLOCK_M=block, BLOCK_N=bwd_block,
                                                        CAUSAL=causal, ATOMIC_DQ=atomic, DQ_TMA=tma, **dims),
                                        warps=warps, stages=stages, bulk_reduce=tma, **common))
                    if design != "split":
                        continue
                    for (block, warps, stages), default in configs("bwd_dq", design):
                        out.append(dict(kernel="_varlen_attention_bwd_dq_kernel", design=design, default=default,
                                        pointers=dict(Q=dt, K=dt, V=dt, DO=dt, DQ=dt, LSE="*fp32", DELTA="*fp32"),
                                        constexprs=dict(HQ=16, GROUP=8, BLOCK_N=block, CAUSAL=causal,
                                                        BLOCK_M=tk.grid_block("bwd_dq", design, head_dim), **dims),
                                        warps=warps, stages=stages, **common))
            out.append(dict(kernel="_varlen_attention_bwd_preprocess_kernel",
                            pointers=dict(O=dt, DO=dt, LSE="*fp32", DLSE="*fp32", DELTA="*fp32"),
                            constexprs=dict(HEAD_DIM=head_dim, BLOCK_T=tk.preprocess_block_t(head_dim),
                                            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_DLSE=True),
                            warps=4, stages=1, dtype=dtype, dots=False))
    out += info_nce_variants(quick)
    out += pointwise_variants(quick)
    return out


def pointwise_variants(quick: bool) -> list[dict]:
    """The fused pointwise kernels (``moca_kernels.pointwise``) at the Qwen2.5-VL-3B shapes as the
    launchers configure them: RMSNorm over 2,048 (language) and 1,280 (vision) columns, with and
    without the residual, rotary embedding of 16 query and 2 key heads of dim 128 with M-RoPE
    sections [16, 24, 24] (forward and transposed), SwiGLU; bf16, and in full mode float32."""
    import triton

    from .pointwise import triton_kernels as pk
    out = []
    for dtype in ("bf16",) if quick else ("bf16", "fp32"):
        dt = "*" + dtype
        common = dict(module="moca_kernels.pointwise.triton_kernels", dtype=dtype, dots=False, stages=1)
        blocks = sorted({triton.next_power_of_2(hidden) for hidden in (2048, 1280)})  # one kernel serves both
        for block, flag in itertools.product(blocks, (False, True)):
            out.append(dict(kernel="_rms_norm_fwd_kernel", warps=pk._warps(block), **common,
                            pointers=dict(X=dt, R=dt, W=dt, Y=dt, S=dt, RSTD="*fp32"),
                            constexprs=dict(HAS_RESIDUAL=flag, BLOCK_N=block)))
            out.append(dict(kernel="_rms_norm_bwd_kernel", warps=pk._warps(block), **common,
                            pointers=dict(DY=dt, DS=dt, S=dt, W=dt, RSTD="*fp32", DX=dt, DW_PART="*fp32"),
                            constexprs=dict(HAS_DS=flag, BLOCK_N=block)))
        for transpose in (False, True):
            out.append(dict(kernel="_rotary_kernel", warps=4, **common,
                            pointers=dict(Q=dt, K=dt, COS=dt, SIN=dt, QO=dt, KO=dt),
                            constexprs=dict(HQ=16, HK=2, HALF=64, S0=16, S1=24, BLOCK_HQ=16, BLOCK_HK=2, BLOCK_D=64,
                                            TRANSPOSE=transpose)))
        for kernel, pointers in (("_swiglu_fwd_kernel", dict(GATE=dt, UP=dt, OUT=dt)),
                                 ("_swiglu_bwd_kernel", dict(DOUT=dt, GATE=dt, UP=dt, DGATE=dt, DUP=dt))):
            out.append(dict(kernel=kernel, warps=8, pointers=pointers, constexprs=dict(BLOCK=2048), **common))
    return out


def info_nce_variants(quick: bool) -> list[dict]:
    """The tiled log-sum-exp kernels under ``info_nce`` and ``linear_cross_entropy``: every
    autotuning candidate in bf16, symmetric (info_nce) and with a bias (the cross-entropy); full
    mode adds fp16 and d not a multiple of 128."""
    from . import _tiled_lse as tk
    out = []
    for dtype in ("bf16",) if quick else ("bf16", "fp16"):
        dt = "*" + dtype
        for (block_k, warps, stages), (symmetric, bias), even_k in itertools.product(
                tk.CANDIDATES,
                ((True, False), (False, True)) if quick else ((True, False), (False, False), (False, True)),
                (True,) if quick else (True, False)):
            common = dict(module="moca_kernels._tiled_lse", dtype=dtype, dots=True, warps=warps, stages=stages)
            constexprs = dict(SYMMETRIC=symmetric, HAS_BIAS=bias, BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k,
                              EVEN_K=even_k, PRECISION="tf32")
            vectors = dict(RQ="*fp32", RK="*fp32", BIAS=dt, LABELS="*i64", INV_T="*fp32")
            out.append(dict(kernel="_fwd_kernel", constexprs=constexprs, **common,
                            pointers=dict(Q=dt, K=dt, ROW_LSE="*fp32", POS="*fp32", COL_LSE="*fp32", **vectors)))
            out.append(dict(kernel="_coef_kernel", constexprs=constexprs, **common,
                            pointers=dict(Q=dt, K=dt, E=dt, ROW_LSE="*fp32", ROW_W="*fp32", G="*fp32",
                                          COL_LSE="*fp32", COL_W="*fp32", ROW_CENTER="*fp32", COL_CENTER="*fp32",
                                          E_SCALE="*fp32", PART="*fp32", **vectors)))
    return out


# m x n x k of the mma.sync shapes, which SASS names by digits (HMMA.16816 is m16 n8 k16).
HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def mma_instructions(sass: str) -> Counter:
    """Static count of each tensor-core instruction in a SASS listing (e.g. HGMMA.64x64x16.F32.BF16)."""
    return Counter(re.findall(r"\b((?:HGMMA|HMMA)\.[0-9A-Za-z.]+)", sass))


def executed_mma_work(instructions: Counter, num_warps: int) -> int:
    """Multiply-adds the instructions execute per program: an HGMMA once per warpgroup of 4 warps,
    an HMMA once per warp (every warp runs every instruction: no warp specialization here)."""
    work = 0
    for name, count in instructions.items():
        shape = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", name)
        if shape:
            m, n, k = map(int, shape.groups())
            work += count * m * n * k * max(1, num_warps // 4)
        else:
            m, n, k = HMMA_SHAPES[name.split(".")[1]]
            work += count * m * n * k * num_warps
    return work


def useful_mma_work(ttir: str) -> int:
    """Multiply-adds of the tile's products as the kernel writes them: M x N x K of each tt.dot."""
    work = 0
    for m, k, _, n in re.findall(r"tt\.dot .*?: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x\w+>", ttir):
        work += int(m) * int(n) * int(k)
    return work


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(variant: dict) -> dict:
    """Compile one variant for sm_90a; return its resources and what is wrong with it."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tk = importlib.import_module(variant.get("module", "moca_kernels.varlen_attention.triton_kernels"))
    kernel = getattr(tk, variant["kernel"])
    design = f"[{variant['design']}{', default' if variant.get('default') else ''}] " if "design" in variant else ""
    label = f"{variant['kernel']} {design}{variant['dtype']} " + " ".join(
        f"{k}={v}" for k, v in variant["constexprs"].items() if k != "PRECISION") \
        + f" warps={variant['warps']} stages={variant['stages']}"
    start = time.time()
    try:
        signature = _signature(kernel, variant["pointers"])
        # As a launch specializes them: 16-byte aligned pointers, and strides and sizes divisible
        # by 16 (the usual case, and what lets loads vectorize and pipeline).
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*") or name.startswith("stride") or name == "dim"}
        src = ASTSource(kernel, signature, variant["constexprs"], attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=variant["warps"], num_stages=variant["stages"]))
    except Exception as exc:
        while exc.__cause__ is not None:  # the innermost error says what is wrong
            exc = exc.__cause__
        return dict(label=label, problems=[f"does not compile: {type(exc).__name__}: {str(exc)[-800:]}"])
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                                capture_output=True, text=True)
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    text = report.stdout + report.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    instructions = mma_instructions(sass)
    result = dict(label=label, registers=int(regs.group(1)) if regs else None, spill_bytes=sum(spills),
                  shared=compiled.metadata.shared, mma=dict(sorted(instructions.items())),
                  seconds=round(time.time() - start, 1), problems=[], warnings=[])
    if report.returncode:
        result["problems"].append(f"ptxas failed: {text[-500:]}")
    if not sass:
        result["problems"].append("nvdisasm gave no SASS")
    if result["spill_bytes"]:
        result["warnings"].append(f"spills {result['spill_bytes']} bytes")
    if variant.get("bulk_reduce") and "cp.reduce.async.bulk.tensor" not in ptx:
        result["problems"].append("its TMA reduce-add did not compile to cp.reduce.async.bulk.tensor")
    if result["shared"] > SM90_MAX_SHARED:
        result["problems"].append(f"needs {result['shared']} bytes of shared memory (sm_90 max {SM90_MAX_SHARED})")
    if variant["dots"]:
        useful = useful_mma_work(compiled.asm["ttir"])
        result["mma_ratio"] = executed_mma_work(instructions, variant["warps"]) / useful if useful else None
        mma_problems = []
        if not any(name.startswith("HGMMA") for name in instructions):
            mma_problems.append("no wgmma (HGMMA): the products miss the Hopper tensor cores")
        hmma = sum(n for name, n in instructions.items() if name.startswith("HMMA"))
        if hmma:
            mma_problems.append(f"{hmma} mma.sync (HMMA) instructions")
        if result["mma_ratio"] is not None and result["mma_ratio"] > MAX_MMA_RATIO:
            mma_problems.append(f"executes {result['mma_ratio']:.2f}x the useful MMA work")
        # Head dims off the hot list (e.g. 256) are reported, not failed.
        result["problems" if variant.get("head_dim", HOT_HEAD_DIMS[0]) in HOT_HEAD_DIMS else "warnings"] += \
            mma_problems
    return result


def _mma_summary(mma: dict) -> str:
    """``{"HGMMA.64x64x16.F32.BF16": 16}`` -> ``HGMMA.64x64x16 x16``."""
    return ", ".join(f"{'.'.join(name.split('.')[:2])} x{count}" for name, count in mma.items()) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="bf16, non-causal, head dims 64/80/128/256 only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    parser.add_argument("--fail-on-spills", action="store_true", help="count register spills as failures")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    todo = variants(args.quick)
    print(f"compiling {len(todo)} kernel variants for sm_90a with {args.jobs} jobs", flush=True)
    failures = spilling = warned = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(compile_one, todo):
            if "registers" in result:
                ratio = result.get("mma_ratio")
                line = (f"{result['label']}: {result['registers']} regs, {result['spill_bytes']} B spilled, "
                        f"{result['shared']} B shared, MMA {_mma_summary(result['mma'])}"
                        + (f", executed/useful MMA {ratio:.2f}" if ratio is not None else "")
                        + f", {result['seconds']} s")
            else:
                line = result["label"]
            spills = [w for w in result.get("warnings", []) if w.startswith("spills")]
            problems = result["problems"] + (spills if args.fail_on_spills else [])
            spilling += bool(spills)
            if problems:
                failures += 1
                line += "  FAIL: " + "; ".join(problems)
            elif result.get("warnings"):
                warned += 1
                line += "  WARNING: " + "; ".join(result["warnings"])
            print(line, flush=True)
    print(f"{len(todo) - failures} of {len(todo)} variants compile for sm_90a "
          f"({spilling} of them spill registers; {warned} passed with warnings)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
