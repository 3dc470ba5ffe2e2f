#!/usr/bin/env bash
# The attention forward's WMMA kernel (kernels/cuda/attention_tc.cu, chosen
# with DB_ATTN_MMA=0; the default is attention_mma.cu's mma.sync kernel,
# which test_attention_tc checks without the variable) on the GPU:
# test_attention_tc's whole forward list (the rounded-input CPU reference,
# lse, determinism, refusals, SD1.5 shapes) with the variable set; its
# backward checks run too (one kernel, P recomputed from the forward's lse).
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_ATTN_MMA=0 B="$B" "$B/tests/gpu/test_attention_tc"
