#!/usr/bin/env bash
# One prepared run on a lent GPU machine (about 8 minutes): build, GPU tests, attention benchmark.
# Writes under $OUT (default ./device_check_out): one NAME.txt per step, bench*/results.{json,md}
# (rewritten after every measured row) and summary.json (rewritten after every step: exit status
# and seconds). A failing step does not stop the later ones; the limits sum to under 8 minutes.
# Usage: OUT=/some/dir bash benchmarks/device_check.sh
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
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    STATUS[$name]=${PIPESTATUS[0]}
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    STEPS+=("$name")
    summary
    echo "== $name: exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]}s"
}

step install 60 pip install -e . --no-build-isolation --no-deps -q
step info 20 python -m moca_kernels.info
step env 20 python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
# GPU-marked tests (bf16, the numerics rule), then kernel tests of the CPU suite on CUDA tensors.
step tests 120 python -m pytest -q tests/test_varlen_attention.py \
    -k "gpu or key_documents or unequal or strongly or tma or deterministic or opcheck"
step bench 150 python benchmarks/bench_attention.py --out "$OUT/bench" \
    --cases moca-16k moca-64k long-8k vision-windows \
    --providers moca moca-tma sdpa-padded sdpa-njt varlen-attn flash-attn fa3
# FlexAttention compiles anew for every shape: two cases only.
step bench_flex 90 python benchmarks/bench_attention.py --out "$OUT/bench_flex" --cases moca-16k long-8k \
    --providers flex

cat "$OUT/summary.json"
for table in "$OUT"/bench*/results.md; do
    [ -f "$table" ] && cat "$table"
done
exit 0
