#!/usr/bin/env bash
# The CUDA kernels' logic on the CPU (no GPU needed): tests/gpu/emu builds
# kernels/cuda/*.cu for an emulator (one thread per CUDA thread, naive
# cuBLAS/cuDNN stand-ins) and runs the CUDA-vs-CPU parity test on its small
# shapes.  The real check is make check-cuda on a GPU (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/.." && pwd)}
B=${B:-$TOP/build}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ] || [ ! -x "$B/tests/gpu/test_cuda_ops" ]; then
    echo "1..0 # SKIP no CUDA toolkit headers or no test_cuda_ops build"
    exit 0
fi
set -o pipefail
cd "$TOP" || exit 1
bash tests/gpu/emu/run.sh --build 2>&1 | sed 's/^/# /' || { echo "not ok 1 - emulator build"; echo "1..1"; exit 1; }
# the emulated backend's test programs as one TAP stream: their checks
# renumbered in sequence and one plan at the end; a program that exits
# non-zero or runs no check adds a failing line
# (test_attention_tc three times: the WMMA forward of attention_tc.cu with
# DB_ATTN_MMA=0, then the default, the mma.sync forward of attention_mma.cu
# and backward with their cp.async pipelines and ldmatrix loads, the
# forward with two row tiles a warp (DB_ATTN_MR=2: the small shapes here
# would get one), then the same without either and with the forward's
# own choice, one tile, DB_ATTN_CPASYNC=0 DB_ATTN_LDSM=0; test_cuda_ops
# runs with DB_ATTN_MMA=0 too, so its bf16 / fp16 attention checks run
# again on the mma.sync kernels, which round their outputs as they store
# them: test_cuda_ops:mma, DB_CUDA_TEST_ONLY=prec:attention)
status=0
# (and refuse: the emulator refuses what a card refuses, tests/gpu/emu/refuse.cpp)
for run in test_cuda_ops test_cuda_ops:mma test_cuda_ops:nolt test_attention_tc test_attention_tc:mma test_attention_tc:nopipe \
    refuse; do
    prog=${run%%:*}
    bin=$B/tests/gpu/$prog
    [ "$run" = refuse ] && bin=$PWD/build/emu/refuse
    only=()
    [ "$run" = test_cuda_ops:mma ] && only=(DB_CUDA_TEST_ONLY=prec:attention)
    # the 16-bit linears with a bias when cublasLt offers no algorithm
    [ "$run" = test_cuda_ops:nolt ] && only=(DB_CUDA_TEST_ONLY=prec:linear EMU_LT_UNSUPPORTED=1)
    env "${only[@]}" DB_ATTN_MMA=$([ "$run" = "$prog" ] && echo 0 || echo 1) DB_ATTN_CPASYNC=$([ "$run" = "${run%:nopipe}" ] && echo 1 || echo 0) \
        DB_ATTN_LDSM=$([ "$run" = "${run%:nopipe}" ] && echo 1 || echo 0) \
        DB_ATTN_MR=$([ "$run" = test_attention_tc:mma ] && echo 2 || echo 0) DB_CUDA_TEST_QUICK=1 B="$PWD/build/emu" "$bin" >"$B/emu/$run.tap" 2>&1
    rc=$?
    echo "# $run: exit $rc"
    grep -q '^ok ' "$B/emu/$run.tap" && [ "$rc" = 0 ] || echo "not ok - $run exited $rc or ran no check" >>"$B/emu/$run.tap"
done
sed -i 's/^\(\(not \)\?ok\( [0-9]\+\)\? - \)/\1[emulator] /' "$B/emu/refuse.tap"
sed -i 's/^\(\(not \)\?ok\( [0-9]\+\)\? - \)/\1[mma] /' "$B/emu/test_attention_tc:mma.tap" "$B/emu/test_cuda_ops:mma.tap"
sed -i 's/^\(\(not \)\?ok\( [0-9]\+\)\? - \)/\1[no cublasLt] /' "$B/emu/test_cuda_ops:nolt.tap"
sed -i 's/^\(\(not \)\?ok\( [0-9]\+\)\? - \)/\1[mma, no cp.async, no ldmatrix] /' "$B/emu/test_attention_tc:nopipe.tap"
awk '/^1\.\.[0-9]+/ { next }
     /^(not )?ok( [0-9]+)?/ { n++; sub(/^ok( [0-9]+)?/, "ok " n); sub(/^not ok( [0-9]+)?/, "not ok " n); if ($1 == "not") bad = 1 }
     { print }
     END { print "1.." n; exit bad }' "$B/emu/test_cuda_ops.tap" "$B/emu/test_cuda_ops:mma.tap" \
    "$B/emu/test_cuda_ops:nolt.tap" "$B/emu/test_attention_tc.tap" \
    "$B/emu/test_attention_tc:mma.tap" "$B/emu/test_attention_tc:nopipe.tap" "$B/emu/refuse.tap" || status=1
exit $status
