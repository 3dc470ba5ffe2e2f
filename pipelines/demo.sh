#!/usr/bin/env bash
# make demo: the main job end to end on a built-in default, as far as the
# tools exist today: a tiny SD1.x model with random weights, the subject
# photos shipped in tests/data/photos, then prep -> prior -> sample.
# (db-train joins between prior and sample when it lands.)
set -euo pipefail
OUT=${1:-build/demo}
TOP=$(cd "$(dirname "$0")/.." && pwd)
BIN=$TOP/build/bin
rm -rf "$OUT"
mkdir -p "$OUT"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
run() { printf '\n$ %s\n' "$*"; "$@"; }
run "$BIN/db-ckpt" init --arch tiny --seed 42 "$OUT/tiny"
run "$BIN/db-ckpt" info "$OUT/tiny"
TOKEN=$("$BIN/db-ckpt" tokens --rare --count 1 --model "$OUT/tiny" | cut -f1 | sed 's,</w>$,,')
echo "rare identifier: $TOKEN"
run "$BIN/db-prep" -q --model "$OUT/tiny" --size 128 --flip --caption "a photo of $TOKEN dog" \
    --preview "$OUT/crops" "$TOP/tests/data/photos/dog" -o "$OUT/instance.dbt"
run "$BIN/db-prior" -q --model "$OUT/tiny" --prompt "a photo of a dog" -n 4 --steps 10 \
    --width 128 --height 128 -o "$OUT/class.dbt"
run "$BIN/db-sample" -q --model "$OUT/tiny" --prompt "a photo of $TOKEN dog on the moon" -n 2 \
    --steps 10 --width 128 --height 128 --seed 1 -o "$OUT/sample-%02d.png"
run "$BIN/db-ckpt" convert "$OUT/tiny" "$OUT/tiny.safetensors" --dtype fp16
run "$BIN/db-ckpt" verify -q "$OUT/tiny.safetensors"
printf '\ndemo: done; crops in %s/crops, streams %s/instance.dbt and %s/class.dbt, images %s/sample-*.png\n' \
    "$OUT" "$OUT" "$OUT" "$OUT"
