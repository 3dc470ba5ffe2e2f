#!/usr/bin/env bash
# make demo: the main job end to end on a built-in default, as far as the
# tools exist today.  Now: create a tiny SD1.x model with random weights,
# inspect it, convert it between layouts, verify it and check the round trip.
# (prep -> prior -> train -> sample join this as those tools land.)
set -euo pipefail
OUT=${1:-build/demo}
BIN=$(cd "$(dirname "$0")/.." && pwd)/build/bin
rm -rf "$OUT"
mkdir -p "$OUT"
run() { printf '\n$ %s\n' "$*"; "$@"; }
run "$BIN/db-ckpt" init --arch tiny --seed 42 "$OUT/tiny"
run "$BIN/db-ckpt" info "$OUT/tiny"
run "$BIN/db-ckpt" convert "$OUT/tiny" "$OUT/tiny.safetensors" --dtype fp16
run "$BIN/db-ckpt" verify "$OUT/tiny.safetensors"
run "$BIN/db-ckpt" convert "$OUT/tiny.safetensors" "$OUT/tiny-back"
run "$BIN/db-ckpt" diff --tol 1e-3 "$OUT/tiny" "$OUT/tiny-back"
printf '\ndemo: done; outputs in %s\n' "$OUT"
