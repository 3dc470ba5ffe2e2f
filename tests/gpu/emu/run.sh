#!/usr/bin/env bash
# Check the CUDA kernels' logic without a GPU: build libdb_cuda.so from
# kernels/cuda/*.cu for the CPU emulator (cuda_emu.h: a std::thread per CUDA
# thread, naive cuBLAS/cuDNN stand-ins) into build/emu/lib, and run the
# parity test on the small shapes against it.  Not a substitute for
# make check-cuda on a GPU (see cuda_emu.h for what it cannot tell).
#   usage: bash tests/gpu/emu/run.sh        (after make; about a minute)
#   EMU_CONV16_UNSUPPORTED=1 bash tests/gpu/emu/run.sh: the same with the cuDNN
#   stand-in refusing bf16/fp16 convolutions, which runs conv.cu's fallback
#   (the fp32 plan on rounded inputs) in the precision checks
#   bash tests/gpu/emu/run.sh --tsan: the emulator built with ThreadSanitizer
#   (build/emu-tsan) under the same two tests: a data race between the
#   threads of a block (a missing __syncthreads or __syncwarp before shared
#   memory is read, two warps writing one place) fails it.  About 20 minutes
#   on 2 cores, so not part of make check; run it after changing a kernel.
#   bash tests/gpu/emu/run.sh --align: the emulator built with UBSan's
#   alignment check (build/emu-align) under the same two tests: a vector
#   access off its alignment (float2, float4, uint4...), which x86 does and
#   a GPU faults on, ends the run there.  ~30 minutes on 2 cores.
#   One section of test_cuda_ops alone (its full run takes ~20 minutes here):
#   DB_CUDA_TEST_ONLY=S DB_CUDA_TEST_QUICK=1 B=$PWD/build/emu build/tests/gpu/test_cuda_ops
#   runs the checks whose name holds S (groupnorm, conv2d, staged: the
#   fused AdamW's staged filter copies; graph, declared); S = prec runs the bf16 / fp16
#   section (gemm, linear, conv, attention) instead, S = prec:NAME only its
#   ops whose name holds NAME (prec:attention, prec:linear_backward).
set -euo pipefail
cd "$(dirname "$0")/../../.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
E=build/emu
# --no-undefined: a kernel file that lost a function the api table names
# fails the build here (not with the sanitizer: its runtime is preloaded)
SAN=(-Wl,--no-undefined)
if [ "${1:-}" = --tsan ]; then
    E=build/emu-tsan
    SAN=(-fsanitize=thread)
elif [ "${1:-}" = --align ]; then
    # vector loads and stores (float2, float4, uint4, bf16 pairs) off their
    # alignment: x86 does them, a GPU faults; UBSan's alignment check ends
    # the program at the first
    E=build/emu-align
    SAN=(-fsanitize=alignment -fno-sanitize-recover=alignment)
fi
mkdir -p "$E/src" "$E/lib"
srcs=()
for f in kernels/cuda/*.cu; do
    [ "$(basename "$f")" = backend.cu ] && continue   # info/selftest: real runtime only
    out="$E/src/$(basename "${f%.cu}").cpp"
    python3 tests/gpu/emu/transform.py "$f" "$out"
    srcs+=("$out")
done
g++ -std=c++20 -O1 -g -fPIC -shared -w ${SAN[@]+"${SAN[@]}"} -I. -I"$CUDA_HOME/include" -o "$E/lib/libdb_cuda.so" \
    tests/gpu/emu/emu_globals.cpp "${srcs[@]}" -L"$CUDA_HOME/lib64" -Wl,-rpath,"$CUDA_HOME/lib64" \
    -lcudart -lcublas -lcublasLt -lcudnn -lpthread
# the emulator's own refusals (refuse.cpp: a launch a card refuses, a
# misaligned ldmatrix or cp.async end the program), a program of its own
g++ -std=c++20 -O0 -w ${SAN[@]+"${SAN[@]}"} -I. -I"$CUDA_HOME/include" -o "$E/refuse" tests/gpu/emu/refuse.cpp \
    tests/gpu/emu/emu_globals.cpp -L"$CUDA_HOME/lib64" -Wl,-rpath,"$CUDA_HOME/lib64" -lcudart -lcublas -lcublasLt \
    -lcudnn -lpthread
# the emulator's NCCL (nccl_mpi.c: nccl.h's functions over MPI) for the
# multi-GPU sums' test, where MPI and nccl.h are here
if [ -f "$CUDA_HOME/include/nccl.h" ] && pkg-config --exists mpi-c 2>/dev/null; then
    gcc -std=c11 -O1 -g -fPIC -shared -Wall -Wextra -Werror -I"$CUDA_HOME/include" $(pkg-config --cflags mpi-c) \
        -o "$E/lib/libnccl_emu.so" tests/gpu/emu/nccl_mpi.c $(pkg-config --libs mpi-c)
fi
[ "${1:-}" = --build ] && exit 0   # t1700-cuda-emu.sh runs the programs itself (one TAP stream)
if [ "${1:-}" = --tsan ]; then
    # the test programs are not instrumented: the runtime comes preloaded
    tsan=$(gcc -print-file-name=libtsan.so)
    log=$E/tsan.log
    : > "$log"
    bad=0
    # test_attention_tc twice: cp.async copies done at their wait, then at
    # once (EMU_CPASYNC_EAGER=1, kernels/cuda/cp_async.h: a buffer refilled
    # while another thread may still read it is then a reported race)
    for t in test_cuda_ops test_attention_tc test_attention_tc:eager; do
        echo "== $t under ThreadSanitizer (output: $log)"
        EMU_CPASYNC_EAGER=$([ "$t" = "${t%:eager}" ] && echo 0 || echo 1) DB_CUDA_TEST_QUICK=1 B="$PWD/$E" \
            LD_PRELOAD="$tsan" \
            TSAN_OPTIONS="suppressions=$PWD/tests/gpu/emu/tsan.supp history_size=2 report_signal_unsafe=0" \
            "build/tests/gpu/${t%:eager}" >> "$log" 2>&1 || bad=1
    done
    n=$(grep -c 'WARNING: ThreadSanitizer' "$log" || true)
    f=$(grep -c '^not ok' "$log" || true)
    grep '^SUMMARY: ThreadSanitizer' "$log" | sort | uniq -c || true
    echo "== ThreadSanitizer: $n report(s), $f failed check(s)"
    [ "$n" = 0 ] && [ "$f" = 0 ] && [ "$bad" = 0 ]
    exit
fi
DB_CUDA_TEST_QUICK=1 B="$PWD/$E" build/tests/gpu/test_cuda_ops
DB_CUDA_TEST_QUICK=1 B="$PWD/$E" build/tests/gpu/test_attention_tc
