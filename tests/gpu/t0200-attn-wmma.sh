#!/usr/bin/env bash
# The attention's WMMA kernels (kernels/cuda/attention_tc.cu forward,
# attention_tc_backward.cu backward, chosen with DB_ATTN_MMA=0; the defaults
# are the mma.sync kernels of attention_mma.cu and, up to head size 80,
# attention_mma_backward.cu, which test_attention_tc checks without the
# variable) on the GPU: test_attention_tc's whole list (the rounded-input
# CPU reference, lse, determinism, refusals, SD1.5 shapes, the backward's
# dq, dk, dv) with the variable set.
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_ATTN_MMA=0 B="$B" "$B/tests/gpu/test_attention_tc"
