#!/usr/bin/env bash
# The 16-bit linears with a bias without cublasLt (DB_GEMM_LT=0: the float32
# product and the bias-and-rounding epilogue kernel, as before cublasLt's
# bias epilogue was the default, and the path taken where cublasLt offers
# no algorithm) on the GPU: test_cuda_ops' bf16 / fp16 linear checks.
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_GEMM_LT=0 DB_CUDA_TEST_ONLY=prec:linear B="$B" "$B/tests/gpu/test_cuda_ops"
