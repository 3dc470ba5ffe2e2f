#!/usr/bin/env bash
# db-sample end to end on the tiny model: PNGs with A1111 parameters, seeds
# and streams, the latents stream, and clean failures with no PNG left.
. "$(dirname "$0")/lib.sh"
D=$TOP/tests/data/tiny/diffusers
C=$TOP/tests/data/tiny/tiny.ckpt
S="db-sample -q --model $D --steps 4 --width 64 --height 64"

ok "sample one image" $S --prompt "a photo of sks dog" --seed 3 -o "$T/a.png"
check "it is a 64x64 PNG" "file '$T/a.png' | grep -q 'PNG image data, 64 x 64'"
check "the parameters chunk says what made it" \
    "grep -a -q 'Steps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 64x64' '$T/a.png'"
ok "same settings from the .ckpt layout" db-sample -q --model "$C" --steps 4 --width 64 --height 64 \
    --prompt "a photo of sks dog" --seed 3 -o "$T/a-ckpt.png"
check "identical pixels from either layout" "[ \"\$(dbtest png-crc '$T/a.png')\" = \"\$(dbtest png-crc '$T/a-ckpt.png')\" ]"
ok "three images, latents stream" $S --prompt "a photo of sks dog" --seed 3 -n 3 --batch 2 \
    --negative-prompt "blurry" --scheduler euler_a -o "$T/b.png" --latents-out "$T/b.dbt"
check "numbered outputs" "[ -f '$T/b-0000.png' ] && [ -f '$T/b-0001.png' ] && [ -f '$T/b-0002.png' ]"
check "latents stream holds 3 records of [4, 8, 8]" \
    "$PY - '$T/b.dbt' <<'PYEOF'
import msgpack, sys
objs = list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))
assert objs[0]['format'] == 'dbt' and objs[0]['kind'] == 'latents', objs[0]
recs = objs[1:-1]
assert len(recs) == 3 and all(r['shape'] == [4, 8, 8] and r['dtype'] == 'f32' for r in recs)
assert objs[-1]['end'] is True and objs[-1]['count'] == 3
PYEOF"
ok "image 2 alone" $S --prompt "a photo of sks dog" --seed 3 -n 3 --scheduler euler_a --negative-prompt blurry \
    -o "$T/c.png"
check "batching does not change images (b-0002 == c-0002)" \
    "[ \"\$(dbtest png-crc '$T/b-0002.png')\" = \"\$(dbtest png-crc '$T/c-0002.png')\" ]"
ok "long prompt with emphasis and BREAK" $S --seed 1 -o "$T/long.png" \
    --prompt "$(printf 'a (red:1.3) [blue] house, %.0s' $(seq 1 20)) BREAK on a hill"

fails_with 1 "heun" "unknown scheduler: exit 1, named" $S --prompt x --scheduler heun -o "$T/x.png"
check "no PNG left behind" "no_leftovers '$T/x.png'"
fails_with 2 "multiples of 8" "bad size is a usage error" $S --prompt x --width 60 -o "$T/y.png"
fails_with 2 "required" "missing --prompt is a usage error" db-sample --model "$D"
fails_with 1 "nonexistent" "missing model: exit 1" db-sample --model "$T/nonexistent" --prompt x -o "$T/z.png"
check "no PNG after a failed load" "no_leftovers '$T/z.png'"
fails_with 2 "\\.png" "output must be .png" $S --prompt x -o "$T/out.jpg"
ok "--help" sh -c "db-sample --help | grep -q -- --negative-prompt"
done_testing
