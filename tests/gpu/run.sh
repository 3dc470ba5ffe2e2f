#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA backend, run every
# CUDA-vs-CPU parity test (make check-cuda: tests/gpu/t*.sh and
# build/tests/gpu/test_cuda_ops) and the GPU benchmark
# (build/tests/gpu/bench_cuda_ops, bench.md), and write a
# log and a short table under $OUT.  Keep it under 8 minutes.
#   usage: OUT=/some/dir bash tests/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuDNN/cuBLAS may come from Python wheels on the GPU machine
EXTRA=""
for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, x, "lib") for p in nvidia.__path__ for x in os.listdir(p)))' 2>/dev/null); do
    [ -d "$d" ] && EXTRA="$EXTRA $d"
done
CUDA_LIBDIRS="${CUDA_LIBDIRS:-/usr/local/cuda/lib64}$EXTRA"
echo "== CUDA_LIBDIRS=$CUDA_LIBDIRS"
make -j"$(nproc)" all CUDA=1 CUDA_LIBDIRS="$CUDA_LIBDIRS" || { echo "BUILD FAILED"; exit 1; }
echo "== check-cuda"
timeout 360 make check-cuda CUDA_LIBDIRS="$CUDA_LIBDIRS" PROVE_FLAGS=-fv 2>&1 | tee "$OUT/check-cuda.txt"
status=${PIPESTATUS[0]}
echo "== tools on the tiny model, cpu vs cuda (DB_CUDA_UNVERIFIED=1): db-sample, db-prep, db-train"
tools_status=0
(
    set -e
    T=$(mktemp -d)
    build/bin/db-ckpt init --arch tiny --seed 42 "$T/tiny" >/dev/null
    for d in cpu cuda; do
        DB_CUDA_UNVERIFIED=1 timeout 120 build/bin/db-sample -q -m "$T/tiny" -p "a photo of a dog" --steps 10 \
            --width 128 --height 128 --seed 1 --device $d --latents-out "$T/$d.dbt" -o "$T/$d.png"
    done
    r=$(build/tests/dbtest dbt-rel "$T/cpu.dbt" "$T/cuda.dbt")
    echo "db-sample cpu vs cuda final latents: $r"
    awk -v r="${r##* }" 'BEGIN { exit !(r + 0 <= 1e-4) }'
    for d in cpu cuda; do
        DB_CUDA_UNVERIFIED=1 timeout 120 build/bin/db-prep -q -m "$T/tiny" --size 128 --caption "a photo of sks dog" \
            --device $d tests/data/photos/dog -o "$T/inst-$d.dbt"
    done
    r=$(build/tests/dbtest dbt-rel "$T/inst-cpu.dbt" "$T/inst-cuda.dbt")
    echo "db-prep cpu vs cuda posteriors: $r"
    awk -v r="${r##* }" 'BEGIN { exit !(r + 0 <= 1e-4) }'
    for d in cpu cuda; do
        DB_CUDA_UNVERIFIED=1 timeout 180 build/bin/db-train -q -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 --lr 1e-4 \
            --train-text-encoder --device $d -o "$T/run-$d"
    done
    python3 - "$T/run-cpu/ckpt-000003/state.json" "$T/run-cuda/ckpt-000003/state.json" <<'PY'
import json, sys
a, b = (json.load(open(f))["loss"] for f in sys.argv[1:3])
rel = max(abs(a[k] - b[k]) / abs(a[k]) for k in ("loss", "grad_norm"))
print("db-train cpu vs cuda, 3 steps: loss %.8g vs %.8g, grad norm %.8g vs %.8g (rel %.3g)"
      % (a["loss"], b["loss"], a["grad_norm"], b["grad_norm"], rel))
sys.exit(0 if rel <= 1e-4 else 1)
PY
) 2>&1 | tee "$OUT/tools.txt" || tools_status=1
echo "== bench (fp32, cudaEvent medians)"
B="$PWD/build" timeout 240 build/tests/gpu/bench_cuda_ops 2>&1 | tee "$OUT/bench.md"
{
    echo "| date | card | check-cuda | tools cpu vs cuda |"
    echo "|---|---|---|---|"
    echo "| $(date -u +%F) | $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) | $([ "$status" = 0 ] && echo pass || echo FAIL) | $([ "$tools_status" = 0 ] && echo pass || echo FAIL) |"
    echo
    grep '^|' "$OUT/bench.md" 2>/dev/null
} > "$OUT/table.md"
cat "$OUT/table.md"
[ "$status" = 0 ] && [ "$tools_status" = 0 ]
