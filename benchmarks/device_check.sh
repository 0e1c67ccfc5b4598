#!/usr/bin/env bash
# One prepared run on a lent GPU machine (about 8 minutes): build, GPU tests, attention benchmark.
# Writes under $OUT (default ./device_check_out): one NAME.txt per step (install, info, env, tests,
# bench), bench/results.{json,md}, and summary.json (each step's exit status and seconds). A
# failing step does not stop the later ones. Usage: OUT=/some/dir bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME TIMEOUT_S COMMAND... ; output to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    STATUS[$name]=${PIPESTATUS[0]}
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    echo "== $name: exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]}s"
}

step install 120 pip install -e . --no-build-isolation --no-deps -q
step info 60 python -m moca_kernels.info
step env 60 python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
# GPU-marked tests (bf16, the numerics rule), then the CPU suite's kernel tests on CUDA tensors.
step tests 180 python -m pytest -q tests/test_varlen_attention.py \
    -k "gpu or key_documents or unequal or strongly or tma or deterministic or opcheck"
step bench 360 python benchmarks/bench_attention.py --out "$OUT/bench" \
    --cases moca-16k moca-64k long-8k vision-windows

{
    echo "{"
    echo "  \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"steps\": {"
    first=1
    for name in install info env tests bench; do
        [ $first -eq 1 ] || echo ","
        first=0
        printf '    "%s": {"exit": %s, "seconds": %s}' "$name" "${STATUS[$name]:-null}" "${SECONDS_TAKEN[$name]:-null}"
    done
    echo ""
    echo "  }"
    echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
[ -f "$OUT/bench/results.md" ] && cat "$OUT/bench/results.md"
exit 0
