#!/usr/bin/env bash
# One prepared run on a lent GPU machine (all of it takes longer than one 15-minute lease: pick steps with ONLY): build, the stage-1
# training step benchmark and a short training run, the InfoNCE, LM-head, MAE and attention benchmarks, and the
# GPU tests of each.
# Writes under $OUT (default ./device_check_out): one NAME.txt per step, bench*/results.{json,md}
# (rewritten after every measured row) and summary.json (rewritten after every step: exit status
# and seconds). A failing step does not stop the later ones; the limits sum to 3720 seconds; ONLY="STEP ..." runs some.
# Usage: OUT=/some/dir bash benchmarks/device_check.sh
#        OUT=/some/dir ONLY="bench_linear_ce tests_linear_ce" bash benchmarks/device_check.sh   # some steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"
STEPS=()
declare -A STATUS SECONDS_TAKEN

summary() {
    {
        echo "{"
        echo "  \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
        echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
        echo "  \"steps\": {"
        local sep=""
        for name in "${STEPS[@]}"; do
            printf '%s    "%s": {"exit": %s, "seconds": %s}' "$sep" "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]}"
            sep=$',\n'
        done
        echo ""
        echo "  }"
        echo "}"
    } > "$OUT/summary.json"
}

step() {  # step NAME TIMEOUT_S COMMAND... ; output to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " wheels install env $ONLY " != *" $name "* ]]; then
        echo "== $name: not in ONLY, skipped"
        return
    fi
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    STATUS[$name]=${PIPESTATUS[0]}
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    STEPS+=("$name")
    summary
    echo "== $name: exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]}s"
}

# Peers that the GPU image lacks travel as wheels in .whl/ (git-ignored), fetched where pip works:
#   pip download --no-deps --only-binary=:all: inf-cl==1.2.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 -d .whl
if compgen -G ".whl/*.whl" > /dev/null; then
    step wheels 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/moca_site .whl/*.whl
    export PYTHONPATH=/tmp/moca_site${PYTHONPATH:+:$PYTHONPATH}
fi
# `python -m pip`: the GPU image's bare `pip` belongs to the system python, not the one with torch (then no CUDA build).
step install 90 python -m pip install -e . --no-build-isolation --no-deps -q
# The benchmarks run as scripts from benchmarks/: make the checkout importable whatever pip did.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step env 15 bash -c 'python -m moca_kernels.info; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv'
# Issue 31: every op x backend x design checked against float64 at the 3B and 7B shapes, then timed beside
# the peers installed (python -m moca_kernels.check; docs/kernels.md). check.json is the report.
step check 540 python -m moca_kernels.check --json "$OUT/check.json"
# The stage-1 training step (issue 5): moca's packed path against the authors' padded one, 3B shape.
step bench_train_step 240 python benchmarks/bench_train_step.py --shape 3b --docs 96 --out "$OUT/bench_train_step"
# The stage-2 step (issue 6): packed contrastive step against the authors' three padded forwards, 3B shape,
# their per-GPU batch of 24 pairs (on an H100: moca about 12 s a step, the authors' 84 s).
step bench_train_step_cl 330 python benchmarks/bench_train_step.py --stage cl --shape 3b --pairs 24 \
    --out "$OUT/bench_train_step_cl"
# Issue 16, one call of about 8 minutes: ONLY="train_breakdown train_breakdown_cl". The 3B stage-1 step
# (48 documents, 12,800-token rows) eager (full recomputation, as today), with compiled regions, and
# compiled with selective recomputation: tokens/s, MFU, peak memory, and each one's breakdown
# (phases, module classes, top kernels) in results.json and results.md; rows are written as they
# come, so a cut run keeps the first (each compiled provider spends a minute or two compiling in its
# warm-up). Then the stage-2 step at the authors' 24 pairs, eager, with its breakdown; its compiled
# variant is a step of its own (another ~3 minutes).
step train_breakdown 390 python benchmarks/bench_train_step.py --shape 3b --docs 48 --breakdown \
    --providers moca moca-compiled moca-compiled-selective --out "$OUT/train_breakdown"
step train_breakdown_cl 90 python benchmarks/bench_train_step.py --stage cl --shape 3b --pairs 24 --breakdown \
    --providers moca --repeats 1 --out "$OUT/train_breakdown_cl"
step train_breakdown_cl_compiled 210 python benchmarks/bench_train_step.py --stage cl --shape 3b --pairs 24 \
    --breakdown --providers moca-compiled moca-compiled-selective --repeats 1 --out "$OUT/train_breakdown_cl_compiled"
# Stage 2 under torchrun on the NCCL backend with FSDP2 (one rank: the card is alone), then resumed
# (on a cold machine the first step compiles the Triton kernels: about 40 s or more).
step train_cl_fsdp 180 bash -c "torchrun --standalone --nproc_per_node 1 -m moca.cli train --stage cl \
    --out '$OUT/train_cl_fsdp' --max-steps 20 fsdp=true save_every=10 log_every=5 \
    && torchrun --standalone --nproc_per_node 1 -m moca.cli train --resume '$OUT/train_cl_fsdp' --max-steps 40"
# The trainer's embedded default on the GPU (bf16 autocast, fused AdamW, NVTX): a short run.
step train_tiny 150 python -m moca.cli train --out "$OUT/train_tiny" --max-steps 60 save_every=30 log_every=10
# InfoNCE (issue 4's measurement): moca against the card's matmul rate at every size, the
# 256k case last as the longest; then the peers (Inf-CL is slow: 2.4 s a call at 64k) beside moca.
step bench_infonce 80 python benchmarks/bench_infonce.py --out "$OUT/bench_infonce" \
    --cases b1k-d2048 b4k-d2048 b16k-d2048 b64k-d2048 b64k-d2048-h2 b64k-d2048-sym b64k-d2048-h2-sym \
    b64k-d3584 b256k-d2048 --providers matmul moca
step bench_infonce_peers 70 python benchmarks/bench_infonce.py --out "$OUT/bench_infonce_peers" \
    --cases b4k-d2048 b16k-d2048 b64k-d2048 b64k-d2048-sym --providers moca inf-cl dense
# torch.compile builds anew for every shape: two cases only.
step bench_infonce_compiled 30 python benchmarks/bench_infonce.py --out "$OUT/bench_infonce_compiled" \
    --cases b16k-d2048 b64k-d2048 --providers dense-compiled
# bf16, peak memory, float16 range, reductions, opcheck (all of the file compiles too many shapes for 75 s)
step tests_infonce 60 python -m pytest -q tests/test_info_nce_triton.py -k "gpu or float16 or reductions or opcheck"
step bench_linear_ce 90 python benchmarks/bench_linear_ce.py --out "$OUT/bench_linear_ce" \
    --cases n4k-3b n16k-3b n32k-3b n16k-7b --providers matmul moca compiled liger liger-fp32 cce cce-exact eager
step tests_linear_ce 30 python -m pytest -q tests/test_linear_cross_entropy.py -k "gpu or float16 or opcheck"
step bench_mae 40 python benchmarks/bench_mae.py --out "$OUT/bench_mae" --providers copy cuda triton eager compiled
step tests_mae 30 python -m pytest -q tests/test_mae_loss.py -m gpu
step bench_attention 50 python benchmarks/bench_attention.py --out "$OUT/bench_attention" \
    --cases moca-16k long-8k --providers moca sdpa-njt varlen-attn flash-attn fa3
# Issue 12, one call of about 8 minutes: ONLY="attention_designs tests_attention". Every design of
# moca's forward and backward (and TMA, and the flash backend) against FlashAttention-2 varlen and
# compiled FlexAttention on MoCa-like packing, 400-token documents, 8k documents and the vision
# tower's hdim 80; each row has its error against FA2 and float32, and the CUDA-graph replay time
# (GPU only) beside the eager call; the autotuners' choices are in results.json. moca's rows
# come first, so a cut run keeps them.
step attention_designs 360 python benchmarks/bench_attention.py --out "$OUT/bench_attention_designs" \
    --cases moca-16k docs400-16k long-8k vision-windows --graph --check \
    --providers moca moca-fwd-wide moca-fwd-short moca-tma moca-bwd-atomic moca-bwd-split \
    moca-bwd-fused moca-bwd-atomic-tma moca-flash varlen-attn flash-attn flex
step tests_attention 90 python -m pytest -q tests/test_varlen_attention.py -m gpu
# The fused pointwise ops (RMSNorm, rotary, SwiGLU) at the 3B shape against eager transformers code,
# torch.compile and Liger-Kernel (wheel in .whl/), GB/s forward and backward; then their bf16 GPU test.
# ONLY="pointwise tests_pointwise" (about 3 minutes; torch.compile builds once per case).
step pointwise 180 python benchmarks/bench_pointwise.py --out "$OUT/bench_pointwise"
step tests_pointwise 45 python -m pytest -q tests/test_pointwise.py -m gpu
# The losses' fixed cost at the sizes a step uses: info_nce at B = 24, 256, 1,024 (with and without hard
# negatives) and linear_cross_entropy at 256 to 4,096 rows of the 3B head; moca (dense engine), moca-tiled, dense
# torch, compiled, Inf-CL, Liger, CCE; CUDA-graph replay beside each eager call. ONLY="loss_overhead tests_loss_overhead".
step loss_overhead 240 python benchmarks/loss_overhead.py --out "$OUT"
step tests_loss_overhead 60 python -m pytest -q tests/test_loss_fixed_cost.py -m gpu

cat "$OUT/summary.json"
for table in "$OUT"/bench*/results.md; do
    [ -f "$table" ] && cat "$table"
done
exit 0
