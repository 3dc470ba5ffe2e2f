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
ok "convert to a single fp32 .safetensors" db-ckpt convert "$D" "$T/one.safetensors"
ok "same settings from the single file" db-sample -q --model "$T/one.safetensors" --steps 4 --width 64 --height 64 \
    --prompt "a photo of sks dog" --seed 3 -o "$T/a-one.png"
check "identical pixels from the single file" "[ \"\$(dbtest png-crc '$T/a.png')\" = \"\$(dbtest png-crc '$T/a-one.png')\" ]"

# another size: sizes come from the configs, never from the code
mkdir -p "$T/cfg/unet"
cp -r "$D/vae" "$D/text_encoder" "$T/cfg/"
$PY - "$D/unet/config.json" "$T/cfg/unet/config.json" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(block_out_channels=[32, 96], layers_per_block=1, attention_head_dim=[4, 8],
         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
json.dump(c, open(sys.argv[2], "w"))
PYEOF
ok "init a differently sized model" db-ckpt init --config "$T/cfg" --seed 5 "$T/other"
ok "sample it" db-sample -q --model "$T/other" --steps 3 --width 64 --height 64 --prompt "a dog" -o "$T/other.png"
check "a 64x64 PNG from the other size" "file '$T/other.png' | grep -q 'PNG image data, 64 x 64'"
ok "three images, latents stream" $S --prompt "a photo of sks dog" --seed 3 -n 3 --batch 2 \
    --negative-prompt "blurry" --scheduler euler_a -o "$T/b.png" --latents-out "$T/b.dbt" --grid "$T/bgrid.png"
check "numbered outputs" "[ -f '$T/b-0000.png' ] && [ -f '$T/b-0001.png' ] && [ -f '$T/b-0002.png' ]"
# crc of a region, "WxH crc" as png-crc prints it
cell() { dbtest png-crop-crc "$T/bgrid.png" "$@"; }
check "3 images: a 2x2 grid, row-major, the empty cell black" \
    "[ \"\$(cell 0 0 64 64)\" = \"\$(dbtest png-crc '$T/b-0000.png')\" ] &&
     [ \"\$(cell 64 0 64 64)\" = \"\$(dbtest png-crc '$T/b-0001.png')\" ] &&
     [ \"\$(cell 0 64 64 64)\" = \"\$(dbtest png-crc '$T/b-0002.png')\" ] &&
     head -c 12288 /dev/zero >'$T/black' && [ \"\$(cell 64 64 64 64)\" = \"64x64 \$(dbtest crc32c '$T/black')\" ]"
check "latents stream holds 3 records of [4, 8, 8]" \
    "$PY - '$T/b.dbt' <<'PYEOF'
import msgpack, sys
objs = list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))
assert objs[0]['format'] == 'dbt' and objs[0]['kind'] == 'latents', objs[0]
recs = objs[1:-1]
assert len(recs) == 3 and all(r['shape'] == [4, 8, 8] and r['dtype'] == 'f32' for r in recs)
assert objs[-1]['end'] is True and objs[-1]['count'] == 3
PYEOF"
ok "the same without a graph (--no-graph)" $S --prompt "a photo of sks dog" --seed 3 -n 3 --batch 2 \
    --negative-prompt "blurry" --scheduler euler_a -o "$T/ng.png" --latents-out "$T/ng.dbt" --no-graph
check "--no-graph: byte-identical latents" "cmp -s '$T/b.dbt' '$T/ng.dbt'"
ok "image 2 alone" $S --prompt "a photo of sks dog" --seed 3 -n 3 --scheduler euler_a --negative-prompt blurry \
    -o "$T/c.png"
check "batching does not change images (b-0002 == c-0002)" \
    "[ \"\$(dbtest png-crc '$T/b-0002.png')\" = \"\$(dbtest png-crc '$T/c-0002.png')\" ]"
ok "long prompt with emphasis and BREAK" $S --seed 1 -o "$T/long.png" \
    --prompt "$(printf 'a (red:1.3) [blue] house, %.0s' $(seq 1 20)) BREAK on a hill"

# --noise: initial latents from a stream instead of the seed
$PY - "$T" <<'PYEOF'
import struct, sys
sys.path.insert(0, sys.argv[0] and __import__('os').environ['TOP'] + '/tests/py')
sys.dont_write_bytecode = True
import dbt_example as d
t = sys.argv[1]
vals = [((i * 7919) % 1000) / 500.0 - 1.0 for i in range(2 * 4 * 8 * 8)]
with open(f'{t}/noise.dbt', 'wb') as f:
    w = d.DbtWriter(f, 'noise'); w.record('noise', 'f32', [2, 4, 8, 8], struct.pack(f'<{len(vals)}f', *vals)); w.close()
with open(f'{t}/badnoise.dbt', 'wb') as f:
    w = d.DbtWriter(f, 'noise'); w.record('noise', 'f32', [1, 4, 4, 4], bytes(4 * 64)); w.close()
PYEOF
ok "--noise from a stream, printf output pattern" $S --prompt "a photo of sks dog" -n 2 --noise "$T/noise.dbt" \
    -o "$T/nz-%03d.png" --grid "$T/nzgrid.png"
check "pattern numbered the images" "[ -f '$T/nz-000.png' ] && [ -f '$T/nz-001.png' ]"
check "--grid of 2 images: 2W x H" "dbtest png-crc '$T/nzgrid.png' | grep -q '^128x64 '"
check "its left half is image 0, its right half image 1" \
    "[ \"\$(dbtest png-crop-crc '$T/nzgrid.png' 0 0 64 64)\" = \"\$(dbtest png-crc '$T/nz-000.png')\" ] &&
     [ \"\$(dbtest png-crop-crc '$T/nzgrid.png' 64 0 64 64)\" = \"\$(dbtest png-crc '$T/nz-001.png')\" ]"
check "the grid carries image 0's parameters chunk" \
    "grep -a -q 'Size: 64x64, .*Noise: philox stream 0,' '$T/nzgrid.png' && ! grep -a -q 'philox stream 1' '$T/nzgrid.png'"
ok "same noise again, other seed" $S --prompt "a photo of sks dog" -n 2 --noise "$T/noise.dbt" --seed 99 \
    -o "$T/nz2-%03d.png"
check "the stream, not the seed, decided the image" \
    "[ \"\$(dbtest png-crc '$T/nz-001.png')\" = \"\$(dbtest png-crc '$T/nz2-001.png')\" ]"
fails_with 1 "badnoise.dbt: record 'noise' is f32 \\[1, 4, 4, 4\\]" "wrong noise shape: exit 1, shapes named" \
    $S --prompt x --noise "$T/badnoise.dbt" -o "$T/bn.png"
check "no PNG after a bad noise stream" "no_leftovers '$T/bn.png'"
cp -r "$D" "$T/notok" && rm "$T/notok/tokenizer/vocab.json"
fails_with 1 "vocab.json" "missing tokenizer files: exit 1, file named" \
    db-sample -q --model "$T/notok" --steps 1 --width 64 --height 64 --prompt x -o "$T/nt.png"
check "no PNG after a missing tokenizer" "no_leftovers '$T/nt.png'"

fails_with 1 "heun" "unknown scheduler: exit 1, named" $S --prompt x --scheduler heun -o "$T/x.png"
check "no PNG left behind" "no_leftovers '$T/x.png'"
fails_with 2 "multiples of 8" "bad size is a usage error" $S --prompt x --width 60 -o "$T/y.png"
fails_with 2 "required" "missing --prompt is a usage error" db-sample --model "$D"
fails_with 1 "nonexistent" "missing model: exit 1" db-sample --model "$T/nonexistent" --prompt x -o "$T/z.png"
check "no PNG after a failed load" "no_leftovers '$T/z.png'"
fails_with 2 "\\.png" "output must be .png" $S --prompt x -o "$T/out.jpg"
fails_with 2 "--grid .*\\.png" "--grid must be .png" $S --prompt x -o "$T/g.png" --grid "$T/g.jpg"
fails_with 2 "too large" "a grid beyond PNG's size is a usage error" $S --prompt x -n 20000 --width 8192 -o "$T/g.png" \
    --grid "$T/big.png"
fails_with 2 "--device gpu: unknown device" "a misspelt --device is a usage error" \
    $S --prompt x --device gpu -o "$T/c.png"
fails_with 2 "--device cuda:x: unknown device" "--device cuda:x is a usage error" \
    $S --prompt x --device cuda:x -o "$T/c.png"
if ! db-sample --model "$D" --prompt x --steps 1 --width 64 --height 64 --device cuda \
    -o "$T/c.png" 2>"$T/c.err"; then
    check "without a GPU, --device cuda fails naming cuda:0, no PNG" \
        "grep -q 'cuda:0' '$T/c.err' && no_leftovers '$T/c.png'"
fi
ok "--help" sh -c "db-sample --help | grep -q -- --negative-prompt && db-sample --help | grep -q -- '--grid FILE.png'"
done_testing
