#!/usr/bin/env bash
# The launches of one SD1.5 UNet forward (or training step), counted without
# a GPU: bench_sd against the emulator's libdb_cuda.so with EMU_DRY=1 (the
# work only listed, never done: seconds, not hours) and EMU_LAUNCH_LOG, then
# census.py's tables: each kernel's count, and each model-level call site's
# launches (which op of libcommon/sd made them).  Call 9's forward profile
# counted 1291 launches on the H200; the census is what a change to the
# model's glue is checked against before a GPU is lent.
#   usage: bash tests/gpu/emu/census.sh [fwd|train] [bench_sd flags...]
#   (after make and tests/gpu/emu/run.sh --build; --tiny for the tiny model)
#   CENSUS_NTH=N: the N-th UNet forward's stretch (default 2: a warm one)
set -euo pipefail
cd "$(dirname "$0")/../../.."
what=${1:-fwd}
[ $# -gt 0 ] && shift
E=build/emu
[ -f "$E/lib/libdb_cuda.so" ] || { echo "census: no $E/lib/libdb_cuda.so: run tests/gpu/emu/run.sh --build" >&2; exit 1; }
make -s build/bench/bench_sd
mkdir -p "$E/bench"
cp build/bench/bench_sd "$E/bench/bench_sd"
log=$(mktemp /tmp/census.XXXXXX)
trap 'rm -f "$log"' EXIT
EMU_DRY=1 EMU_LAUNCH_LOG=$log "$E/bench/bench_sd" --device cuda --precision bf16 --only "$what" --reps 1 \
    --budget 0 "$@" > /dev/null || true # (a figure may fail on the never-computed numbers: the launches are logged)
python3 tests/gpu/emu/census.py "$log" --nth "${CENSUS_NTH:-2}" --dir "$E"
