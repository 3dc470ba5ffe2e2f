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
# (test_cuda_ops:notickets-S: the checks whose name holds S with
# DB_COLSUM_TICKETS=0, the column sums' second stage a launch of its own,
# as where the ctx has no tickets: bias and layer-norm parameter gradients)
nt=(test_cuda_ops:notickets-layernorm test_cuda_ops:notickets-conv2d_backward
    test_cuda_ops:notickets-prec:linear_backward)
for run in test_cuda_ops test_cuda_ops:mma test_cuda_ops:nolt test_cuda_ops:ltrun "${nt[@]}" test_attention_tc \
    test_attention_tc:mma test_attention_tc:nopipe refuse; do
    prog=${run%%:*}
    bin=$B/tests/gpu/$prog
    [ "$run" = refuse ] && bin=$PWD/build/emu/refuse
    only=()
    [ "$run" = test_cuda_ops:mma ] && only=(DB_CUDA_TEST_ONLY=prec:attention)
    # the 16-bit linears with a bias when cublasLt offers no algorithm
    [ "$run" = test_cuda_ops:nolt ] && only=(DB_CUDA_TEST_ONLY=prec:linear EMU_LT_UNSUPPORTED=1)
    # ... and when cublasLt refuses the plan it gave only when it is run
    [ "$run" = test_cuda_ops:ltrun ] && only=(DB_CUDA_TEST_ONLY=prec:linear EMU_LT_MATMUL_UNSUPPORTED=1)
    case $run in test_cuda_ops:notickets-*) only=(DB_CUDA_TEST_ONLY="${run#test_cuda_ops:notickets-}" DB_COLSUM_TICKETS=0) ;; esac
    env "${only[@]}" DB_ATTN_MMA=$([ "$run" = "$prog" ] && echo 0 || echo 1) DB_ATTN_CPASYNC=$([ "$run" = "${run%:nopipe}" ] && echo 1 || echo 0) \
        DB_ATTN_LDSM=$([ "$run" = "${run%:nopipe}" ] && echo 1 || echo 0) \
        DB_ATTN_MR=$([ "$run" = test_attention_tc:mma ] && echo 2 || echo 0) DB_CUDA_TEST_QUICK=1 B="$PWD/build/emu" "$bin" >"$B/emu/$run.tap" 2>&1
    rc=$?
    echo "# $run: exit $rc"
    grep -q '^ok ' "$B/emu/$run.tap" && [ "$rc" = 0 ] || echo "not ok - $run exited $rc or ran no check" >>"$B/emu/$run.tap"
done
# db-train's check before the weights go to the device: the plan's device
# peak against the free memory the driver reports (the emulator's
# EMU_MEM_FREE bytes of 80 GiB).  An emulated step takes minutes, so each
# run is killed once it has begun training.
pf=$(mktemp -d)
trap 'rm -rf "$pf"' EXIT
mkdir -p "$PWD/build/emu/bin"
cp "$B/bin/db-train" "$PWD/build/emu/bin/db-train" # (it loads ../lib/libdb_cuda.so: the emulator's)
preflight() { # free bytes, extra options: stderr in $pf/err
    rm -rf "$pf/run" "$pf/err"
    EMU_MEM_FREE=$1 "$PWD/build/emu/bin/db-train" -m "$pf/tiny" -i "$pf/inst.dbt" --steps 1 --lr 1e-4 \
        --device cuda --precision bf16 "${@:2}" -o "$pf/run" >/dev/null 2>"$pf/err" &
    local pid=$! i
    for i in $(seq 300); do
        grep -q "training 1 steps" "$pf/err" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
}
{
    if "$B/bin/db-ckpt" init --arch tiny --seed 42 "$pf/tiny" >/dev/null &&
        "$B/bin/db-prep" -q --model "$pf/tiny" --size 128 --caption "a photo of sks dog" tests/data/photos/dog \
            -o "$pf/inst.dbt"; then
        preflight $((80 << 30))
        grep -q "db-train: cuda: predicted device peak [0-9]* MiB, 81920 MiB free (of 81920)" "$pf/err" &&
            ! grep -q "warning" "$pf/err" && echo "ok - db-train: the device plan fits the free memory: no warning" ||
            { echo "not ok - db-train: the device plan fits the free memory: no warning"; sed 's/^/# /' "$pf/err"; }
        preflight $((1 << 20))
        grep -q "warning: cuda: the predicted device peak, [0-9]* MiB, is more than the 1 MiB free (of 81920).*lower it with --gradient-checkpointing, --fused-backward, --optimizer adamw8bit)" "$pf/err" &&
            echo "ok - db-train: the device plan over the free memory: a warning naming what lowers it" ||
            { echo "not ok - db-train: the device plan over the free memory: a warning naming what lowers it"; sed 's/^/# /' "$pf/err"; }
        preflight $((1 << 20)) --gradient-checkpointing --fused-backward --optimizer adamw8bit
        grep -q "the run may run out of memory (--plan itemises it)$" "$pf/err" &&
            echo "ok - db-train: the same with every option that lowers it already given: none named" ||
            { echo "not ok - db-train: the same with every option that lowers it already given: none named"; sed 's/^/# /' "$pf/err"; }
    else
        echo "not ok - db-train preflight: fixtures"
    fi
} >"$B/emu/preflight.tap"
# The multi-GPU gradient sums (tests/gpu/test_dist.c: libcommon/dist's
# NCCL path) under mpirun -np 2, each process an emulated CUDA ctx: through
# the emulator's NCCL (nccl_mpi.c, compiled against nccl.h: it checks the
# id's broadcast, the communicator and every sum's arguments), through host
# staging (DB_NCCL=0, and no loadable NCCL), an NCCL error reported with
# its name, and the check failing when the stand-in drops a sum.
{
    nccl=$PWD/build/emu/lib/libnccl_emu.so
    cp "$B/tests/gpu/test_dist" "$PWD/build/emu/bin/test_dist"
    td() { mpirun -np 2 "$PWD/build/emu/bin/test_dist" "$@" 2>"$pf/dist.err"; }
    tag() { sed -n "s/^\(\(not \)\?ok\)\( [0-9]\+\)\? - /\1 - [$1] /p"; }
    if ! command -v mpirun >/dev/null || [ ! -f "$nccl" ]; then
        echo "ok - # SKIP multi-GPU sums: no mpirun or no emulator NCCL (nccl.h, MPI)"
    else
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
        rm -f "$pf"/nccl.log.*
        EMU_NCCL_LOG=$pf/nccl.log DB_NCCL_LIB=$nccl td nccl | tag "2 ranks, nccl" || echo "not ok - [2 ranks, nccl] exit status"
        DB_NCCL=0 DB_NCCL_LIB=$nccl td mpi-staged | tag "2 ranks, DB_NCCL=0" || echo "not ok - [2 ranks, DB_NCCL=0] exit status"
        DB_NCCL_LIB=$pf/no-such-nccl.so td mpi-staged | tag "2 ranks, no NCCL library" ||
            echo "not ok - [2 ranks, no NCCL library] exit status"
        EMU_NCCL_FAIL=1 DB_NCCL_LIB=$nccl td fail | tag "2 ranks, nccl failing" || echo "not ok - [2 ranks, nccl failing] exit status"
        for k in 1 3; do
            out=$(EMU_NCCL_DROP=$k DB_NCCL_LIB=$nccl td nccl)
            rc=$?
            [ "$rc" != 0 ] && grep -q "^not ok .*sum" <<<"$out" &&
                echo "ok - [2 ranks, nccl] the check can fail: a stand-in dropping sum $k fails it" ||
                { echo "not ok - [2 ranks, nccl] the check can fail: a stand-in dropping sum $k fails it (exit $rc)"; sed 's/^/# /' <<<"$out"; }
        done
    fi
} >"$B/emu/dist.tap"
# each check of the files marked: "ok N - [TAG] ..."
label() { local t=$1; shift; sed -i "s/^\(\(not \)\?ok\( [0-9]\+\)\? - \)/\1[$t] /" "$@"; }
label "emulator" "$B/emu/refuse.tap"
ntap=()
for r in "${nt[@]}"; do
    label "no tickets" "$B/emu/$r.tap"
    ntap+=("$B/emu/$r.tap")
done
label "mma" "$B/emu/test_attention_tc:mma.tap" "$B/emu/test_cuda_ops:mma.tap"
label "no cublasLt" "$B/emu/test_cuda_ops:nolt.tap"
label "cublasLt refusing at run time" "$B/emu/test_cuda_ops:ltrun.tap"
label "mma, no cp.async, no ldmatrix" "$B/emu/test_attention_tc:nopipe.tap"
awk '/^1\.\.[0-9]+/ { next }
     /^(not )?ok( [0-9]+)?/ { n++; sub(/^ok( [0-9]+)?/, "ok " n); sub(/^not ok( [0-9]+)?/, "not ok " n); if ($1 == "not") bad = 1 }
     { print }
     END { print "1.." n; exit bad }' "$B/emu/test_cuda_ops.tap" "$B/emu/test_cuda_ops:mma.tap" \
    "$B/emu/test_cuda_ops:nolt.tap" "$B/emu/test_cuda_ops:ltrun.tap" "${ntap[@]}" "$B/emu/test_attention_tc.tap" \
    "$B/emu/test_attention_tc:mma.tap" "$B/emu/test_attention_tc:nopipe.tap" "$B/emu/refuse.tap" \
    "$B/emu/preflight.tap" "$B/emu/dist.tap" || status=1
exit $status
