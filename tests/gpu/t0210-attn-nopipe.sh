#!/usr/bin/env bash
# The mma.sync attention kernels (kernels/cuda/attention_mma.cu forward,
# attention_mma_backward.cu backward) without their cp.async pipelines
# (DB_ATTN_CPASYNC=0: each streamed tile loaded, then used; the default
# copies the next tile in while it computes on this one, which
# test_attention_tc checks without the variable) and without ldmatrix
# (DB_ATTN_LDSM=0: operands loaded 32 and 16 bits a lane) on the GPU:
# test_attention_tc's whole list with both variables set.
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_ATTN_CPASYNC=0 DB_ATTN_LDSM=0 B="$B" "$B/tests/gpu/test_attention_tc"
