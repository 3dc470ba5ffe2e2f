#!/usr/bin/env bash
# The mma.sync attention kernels (kernels/cuda/attention_mma.cu forward,
# attention_mma_backward.cu backward) without their cp.async pipelines
# (DB_ATTN_CPASYNC=0: each streamed tile loaded, then used; the default
# copies the next tile in while it computes on this one, which
# test_attention_tc checks without the variable) on the GPU:
# test_attention_tc's whole list with the variable set.
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_ATTN_CPASYNC=0 B="$B" "$B/tests/gpu/test_attention_tc"
