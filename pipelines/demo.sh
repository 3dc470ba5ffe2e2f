#!/usr/bin/env bash
# make demo: the whole DreamBooth pipeline on a built-in default, through
# pipelines/dreambooth.mk: a tiny SD1.x model with random weights, the subject
# photos shipped in tests/data/photos, a rare identifier, then
# prep -> prior (2 shards, in parallel) -> train -> export -> sample, at 128x128.
set -euo pipefail
OUT=${1:-build/demo}
TOP=$(cd "$(dirname "$0")/.." && pwd)
BIN=$TOP/build/bin
rm -rf "$OUT"
mkdir -p "$OUT"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
# the pipeline's make is not a sub-make of `make demo`: none of its flags or variables
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES
run() { printf '\n$ %s\n' "$*"; "$@"; }
run "$BIN/db-ckpt" init --arch tiny --seed 42 "$OUT/tiny"
run "$BIN/db-ckpt" info "$OUT/tiny"
TOKEN=$("$BIN/db-ckpt" tokens --rare --count 1 --model "$OUT/tiny" | cut -f1 | sed 's,</w>$,,')
echo "rare identifier: $TOKEN"
# -j2: prep and the two prior shards run side by side.
run make --no-print-directory -j2 -f "$TOP/pipelines/dreambooth.mk" BIN="$BIN" OUT="$OUT/run" \
    MODEL="$OUT/tiny" PHOTOS="$TOP/tests/data/photos/dog" TOKEN="$TOKEN" CLASS=dog \
    SIZE=128 PREP_FLAGS=--flip NPRIOR=4 PRIOR_STEPS=10 PRIOR_SHARDS=2 \
    STEPS=40 LR=1e-3 SAVE_EVERY=20 NSAMPLES=4 SAMPLE_STEPS=10 \
    SAMPLE_PROMPT="a photo of $TOKEN dog on the moon"
run "$BIN/db-ckpt" verify -q "$OUT/run/model.safetensors"
printf '\ndemo: done; the model is %s, the samples are %s (contact sheet %s)\n' \
    "$OUT/run/model.safetensors" "$OUT/run/samples/sample-*.png" "$OUT/run/samples/grid.png"
