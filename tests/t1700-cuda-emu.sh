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
cd "$TOP" && exec bash tests/gpu/emu/run.sh 2>&1
