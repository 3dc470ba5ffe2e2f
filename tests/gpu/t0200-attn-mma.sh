#!/usr/bin/env bash
# The attention forward through mma.sync (kernels/cuda/attention_mma.cu,
# opt-in with DB_ATTN_MMA=1 until timed) on the GPU: test_attention_tc's
# whole forward list (the rounded-input CPU reference, lse, determinism,
# refusals, SD1.5 shapes) with the variable set; its backward checks run
# too (the backward has one kernel and recomputes P from the forward's lse).
# TAP straight from the program; run by make check-cuda (tests/gpu/run.sh).
TOP=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
B=${B:-$TOP/build}
exec env DB_ATTN_MMA=1 B="$B" "$B/tests/gpu/test_attention_tc"
