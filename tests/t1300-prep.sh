#!/usr/bin/env bash
# db-prep end to end on the tiny model: records per crop with their shapes and
# provenance, EXIF orientation, flips, captions, reproducibility, and every
# kind of bad photo with and without --skip-bad (never a partial output).
. "$(dirname "$0")/lib.sh"
D=$TOP/tests/data/tiny/diffusers
I=$TOP/tests/data/images
P=$TOP/tests/data/photos/dog
S="db-prep -q --model $D --size 64 --threads 2"

# show STREAM: one line per record "name shape flip crop_index caption|source"
show() {
    $PY - "$1" <<'PYEOF'
import msgpack, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # grep -q may stop reading early
objs = list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))
h, recs, t = objs[0], objs[1:-1], objs[-1]
assert h['format'] == 'dbt' and h['kind'] == 'instance', h
assert t['end'] is True and t['count'] == len(recs), t
for r in recs:
    m = r['meta']
    assert r['dtype'] == 'f32' and len(r['data']) == 4 * eval('*'.join(map(str, r['shape'])))
    print(r['name'], 'x'.join(map(str, r['shape'])), int(m['flip']), m['crop_index'], m['crop_box'],
          m['caption'] + '|' + m['source'].rsplit('/', 1)[-1])
PYEOF
}

ok "three photos of the subject" $S --caption "a photo of sks dog" "$P" -o "$T/a.dbt" --preview "$T/prev"
show "$T/a.dbt" > "$T/a.txt"
check "one record per photo, [2, 4, 8, 8] (mean, logvar)" \
    "[ \"\$(cut -d' ' -f1,2 '$T/a.txt' | tr '\n' ' ')\" = 'crop/0 2x4x8x8 crop/1 2x4x8x8 crop/2 2x4x8x8 ' ]"
check "caption and source on each record, sorted by name" \
    "[ \"\$(awk '{print \$NF}' '$T/a.txt' | tr '\n' ' ')\" = 'dog|00.jpg dog|01.jpg dog|02.jpg ' ]" \
    "&& grep -q ' a photo of sks dog|02.jpg' '$T/a.txt'"
check "header: model hash, scaling factor, size, crop, tool" "$PY - '$T/a.dbt' <<'PYEOF'
import msgpack, sys
h = next(iter(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False)))['meta']
assert len(h['model_hash']) == 16 and abs(h['scaling_factor'] - 0.18215) < 1e-9, h
assert h['size'] == 64 and h['crop'] == 'center' and h['tool'].startswith('db-prep '), h
PYEOF"
check "a 64x64 preview per crop" "[ \$(ls '$T/prev' | wc -l) = 3 ] && file '$T/prev/crop-0002.png' | grep -q '64 x 64'"
check "logvar is a log-variance (finite, <= 20)" "$PY - '$T/a.dbt' <<'PYEOF'
import msgpack, struct, sys, math
for r in list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))[1:-1]:
    v = struct.unpack('<%df' % (len(r['data']) // 4), r['data'])
    assert all(math.isfinite(x) for x in v) and max(v[len(v) // 2:]) <= 20
PYEOF"
ok "rerun" $S --caption "a photo of sks dog" "$P" -o "$T/b.dbt"
check "identical inputs and options give identical bytes" "cmp -s '$T/a.dbt' '$T/b.dbt'"

ok "--flip" $S --caption "a photo of sks dog" --flip "$P/00.jpg" "$P/01.jpg" -o "$T/f.dbt"
show "$T/f.dbt" > "$T/f.txt"
check "--flip doubles the records, each mirror after its crop" \
    "[ \"\$(cut -d' ' -f3 '$T/f.txt' | tr '\n' ' ')\" = '0 1 0 1 ' ]"
check "the mirror's latents differ from the crop's" "$PY - '$T/f.dbt' <<'PYEOF'
import msgpack, sys
r = list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))[1:-1]
assert r[0]['data'] != r[1]['data']
PYEOF"

ok "random crops" $S --caption x --crop random --crops-per-image 3 --seed 7 "$I/plain.jpg" -o "$T/r.dbt"
show "$T/r.dbt" > "$T/r.txt"
check "K records per photo, seeded boxes inside the 102x64 image" \
    "[ \$(wc -l < '$T/r.txt') = 3 ] && ! grep -qv 'crop/[0-9] 2x4x8x8 0 [0-2] \[[0-9]*, 0, 64, 64\]' '$T/r.txt'"
ok "random crops again" $S --caption x --crop random --crops-per-image 3 --seed 7 "$I/plain.jpg" -o "$T/r2.dbt"
check "same seed, same crops" "cmp -s '$T/r.dbt' '$T/r2.dbt'"
ok "smart crop" $S --caption x --crop smart "$I/plain.jpg" -o "$T/s.dbt"
check "a smart crop lies inside the image" "show '$T/s.dbt' | grep -q 'crop/0 2x4x8x8 0 0 \[[0-9]*, 0, 64, 64\]'"

# EXIF: rot6.jpg stores the picture turned, with orientation 6; upright.png
# holds the same pixels turned by the fixture generator.
ok "EXIF-rotated JPEG" $S --caption x "$I/rot6.jpg" -o "$T/rot.dbt" --preview "$T/rot"
ok "the same picture stored upright" $S --caption x "$I/upright.png" -o "$T/up.dbt" --preview "$T/up"
check "the rotated JPEG gives the upright crop" \
    "[ \"\$(dbtest png-crc '$T/rot/crop-0000.png')\" = \"\$(dbtest png-crc '$T/up/crop-0000.png')\" ]"
check "and the same latents" "$PY - '$T/rot.dbt' '$T/up.dbt' <<'PYEOF'
import msgpack, sys
a, b = (list(msgpack.Unpacker(open(p, 'rb'), raw=False))[1] for p in sys.argv[1:3])
assert a['data'] == b['data'] and a['meta']['crop_box'] == b['meta']['crop_box'] == [19, 0, 64, 64]
PYEOF"
ok "alpha, 16-bit and grey PNGs, and WebP" db-prep --model $D --size 64 --caption x "$I/alpha.png" "$I/rgb16.png" "$I/grey.png" \
    "$I/plain.webp" -o "$T/kinds.dbt" --preview "$T/kinds"
check "three records: the lossless WebP has rgb16.png's pixels, a duplicate" \
    "[ \$(show '$T/kinds.dbt' | wc -l) = 3 ] && grep -q 'plain.webp: same pixels as an earlier photo' '$T/.err'"
check "alpha flattened onto white: the transparent half of alpha.png is white" "$PY - '$T/kinds/crop-0000.png' <<'PYEOF'
import sys, zlib, struct
d = open(sys.argv[1], 'rb').read()
i, idat = 8, b''
while i < len(d):
    n, = struct.unpack('>I', d[i:i + 4]); t = d[i + 4:i + 8]
    if t == b'IDAT': idat += d[i + 8:i + 8 + n]
    i += 12 + n
raw = zlib.decompress(idat)
row = raw[1:1 + 64 * 3]          # first row; filter byte 0 or 1 (Sub) keeps the right end
assert raw[0] in (0, 1, 2, 3, 4)
rows, prev, W = [], bytearray(64 * 3), 64 * 3
for y in range(64):
    f, line = raw[y * (W + 1)], bytearray(raw[y * (W + 1) + 1:(y + 1) * (W + 1)])
    for x in range(W):
        a = line[x - 3] if x >= 3 else 0; b = prev[x]; c = prev[x - 3] if x >= 3 else 0
        p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pr = a if pa <= pb and pa <= pc else b if pb <= pc else c
        line[x] = (line[x] + [0, a, b, (a + b) // 2, pr][f]) & 255
    rows.append(line); prev = line
assert all(v == 255 for r in rows for v in r[-10 * 3:]), 'right edge not white'
assert any(v < 200 for r in rows for v in r[:10 * 3]), 'left edge should be the picture'
PYEOF"
mkdir -p "$T/mixed"
cp "$I/plain.webp" "$T/mixed/b.WEBP"
cp "$I/grey.png" "$T/mixed/a.png"
cp "$I/grey.png" "$T/mixed/.hidden.png"
printf 'notes\n' > "$T/mixed/README.md"
ok "a directory contributes only its image files" $S --caption x "$T/mixed" -o "$T/dir.dbt"
check "sorted by name, hidden and non-image files left out" \
    "[ \"\$(show '$T/dir.dbt' | awk -F'|' '{print \$NF}' | tr '\n' ' ')\" = 'a.png b.WEBP ' ]"

# captions
mkdir -p "$T/cap"
cp "$P/00.jpg" "$T/cap/sks_dog_sitting.jpg"
cp "$P/01.jpg" "$T/cap/b.jpg"
printf 'a photo of sks dog on grass\n' > "$T/cap/sks_dog_sitting.txt"
printf 'sks dog, close-up\n' > "$T/cap/b.caption"
ok "captions from sidecars" $S --caption-from sidecar "$T/cap" -o "$T/sc.dbt"
check "NAME.txt and NAME.caption, trimmed" "show '$T/sc.dbt' | grep -q '0, 0, 64, 64\] sks dog, close-up|b.jpg' &&" \
    "show '$T/sc.dbt' | grep -q 'a photo of sks dog on grass|sks_dog_sitting.jpg'"
ok "captions from file names" $S --caption-from filename "$T/cap/sks_dog_sitting.jpg" -o "$T/fn.dbt"
check "underscores become spaces, the extension goes" "show '$T/fn.dbt' | grep -q ' sks dog sitting|sks_dog_sitting.jpg'"
rm "$T/cap/b.caption"
fails_with 1 "b.jpg: no caption" "a missing sidecar is an error naming the photo" \
    $S --caption-from sidecar "$T/cap" -o "$T/nocap.dbt"
check "no output after it" "no_leftovers '$T/nocap.dbt'"
fails_with 2 "caption" "no caption at all is a usage error (no hidden default)" $S "$P" -o "$T/x.dbt"
fails_with 2 "one way" "--caption and --caption-from together" $S --caption x --caption-from filename "$P" -o "$T/x.dbt"
fails_with 2 "multiple of 8" "--size must suit the VAE" db-prep -q --model "$D" --size 60 --caption x "$P" -o "$T/x.dbt"

# duplicates and upscaling
cp "$P/00.jpg" "$T/dup.jpg"
ok "an exact duplicate" db-prep --model "$D" --size 64 --caption x "$P/00.jpg" "$T/dup.jpg" -o "$T/dup.dbt"
check "is skipped with a warning" "grep -q 'dup.jpg: same pixels as an earlier photo; skipped' '$T/.err' &&" \
    "[ \$(show '$T/dup.dbt' | wc -l) = 1 ]"
ok "a photo smaller than --size" db-prep --model "$D" --size 128 --caption x "$I/plain.jpg" -o "$T/upc.dbt"
check "is upscaled with a warning" "grep -q 'plain.jpg: 128x80 is smaller than --size 128: upscaled' '$T/.err'"
check "progress names each photo" "grep -q '\[1/1\] .*plain.jpg: 128x80 -> 205x128, 1 record' '$T/.err'"

# bad files: a clear error naming the file, exit 1, nothing left behind;
# with --skip-bad a warning and the good photos written
bad() { # FILE PATTERN
    fails_with 1 "$(basename "$1"): $2" "$(basename "$1") fails: $2" \
        $S --caption x "$P/00.jpg" "$1" -o "$T/bad.dbt"
    check "no output after $(basename "$1")" "no_leftovers '$T/bad.dbt'"
    ok "$(basename "$1") with --skip-bad" db-prep --model "$D" --size 64 --caption x --skip-bad "$P/00.jpg" "$1" \
        -o "$T/skip.dbt"
    check "warned and wrote the good photo" "grep -q '$(basename "$1").*skipped (--skip-bad)' '$T/.err' &&" \
        "[ \$(show '$T/skip.dbt' | wc -l) = 1 ]"
    rm -f "$T/skip.dbt"
}
bad "$I/corrupt.jpg" "cannot decode"
bad "$I/truncated.jpg" "cannot decode"
bad "$I/empty.jpg" "empty file"
bad "$I/notimage.jpg" "not an image"
bad "$I/bomb.png" "100000x100000 is more than 100000000 pixels"
bad "$I/unsupported.svg" "unsupported image format"
fails_with 1 "does-not-exist.jpg" "a missing file" $S --caption x "$T/does-not-exist.jpg" -o "$T/bad.dbt"
fails_with 1 "no usable photos" "--skip-bad with nothing usable fails" \
    $S --caption x --skip-bad "$I/empty.jpg" -o "$T/bad.dbt"
check "and leaves nothing" "no_leftovers '$T/bad.dbt'"

# rare identifiers for the captions (db-ckpt tokens)
ok "db-ckpt tokens --rare" db-ckpt tokens --rare --count 12
cp "$T/.out" "$T/rare.txt"
check "12 lines of TOKEN<TAB>ID, 3-5 lowercase letters, rarest first" \
    "[ \$(grep -cE '^[a-z]{3,5}	[0-9]+$' '$T/rare.txt') = 12 ] && sort -k2,2nr -c '$T/rare.txt'"
check "none is an English word" \
    "! grep -qxFf <(grep -v '^#' '$TOP/data/words/english-3to5.txt') <(cut -f1 '$T/rare.txt')"
check "each is one token that BPE reaches" "while IFS='	' read -r w id; do
    [ \"\$(db-ckpt tokenize --length 3 '$TOP/data/clip/sd-tokenizer' \"\$w\")\" = \"49406 \$id 49407\" ] || exit 1
done < '$T/rare.txt'"
ok "the tiny model's vocabulary" db-ckpt tokens --rare --count 12 --model "$D"
check "gives the same list" "cmp -s '$T/.out' '$T/rare.txt'"
fails_with 2 "--rare" "tokens without --rare is a usage error" db-ckpt tokens

done_testing
