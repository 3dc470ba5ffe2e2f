#!/usr/bin/env bash
# db-ckpt on the tiny SD1.x model: info/convert/diff/verify agree across the
# three layouts, conversions round-trip exactly, bad files are refused cleanly.
. "$(dirname "$0")/lib.sh"
TINY=$TOP/tests/data/tiny
D=$TINY/diffusers
C=$TINY/tiny.ckpt

ok "info on the diffusers folder" db-ckpt info "$D"
ok "info --json on diffusers" sh -c "db-ckpt info --json '$D' > '$T/d.json'"
ok "info --json on the .ckpt" sh -c "db-ckpt info --json '$C' > '$T/c.json'"
check "formats detected by content" \
    "grep -q '\"format\": \"diffusers\"' '$T/d.json' && grep -q '\"format\": \"ckpt\"' '$T/c.json'"
# the reference parameter counts come from diffusers' model_info.json
check "parameter counts equal diffusers' (unet 3222692, vae 1399879, text 1600749)" \
    "$PY - '$T/d.json' '$T/c.json' <<'PYEOF'
import json, sys
for f in sys.argv[1:]:
    c = json.load(open(f))['components']
    assert (c['unet']['params'], c['vae']['params'], c['text_encoder']['params']) == (3222692, 1399879, 1600749), (f, c)
PYEOF"
check "architecture (but sample_size) and hash agree between diffusers and .ckpt" \
    "$PY - '$T/d.json' '$T/c.json' <<'PYEOF'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a['hash'] == b['hash'], (a['hash'], b['hash'])
for x in (a, b):
    for c in x['architecture'].values(): c.pop('sample_size', None)
for k in ('unet', 'vae', 'text_encoder'):
    assert a['architecture'][k] == b['architecture'][k], (k, a['architecture'][k], b['architecture'][k])
PYEOF"

ok "convert diffusers -> single .safetensors" db-ckpt convert "$D" "$T/one.safetensors"
ok "convert .ckpt -> single .safetensors" db-ckpt convert "$C" "$T/fromckpt.safetensors"
ok "convert single file -> diffusers" db-ckpt convert "$T/one.safetensors" "$T/back"
ok "diff: original diffusers == round trip (exact)" db-ckpt diff "$D" "$T/back"
ok "diff: single file == .ckpt (exact)" db-ckpt diff "$T/one.safetensors" "$C"
ok "diff: ckpt-converted == diffusers-converted single files" db-ckpt diff "$T/fromckpt.safetensors" "$T/one.safetensors"
ok "info --json on the single file" sh -c "db-ckpt info --json '$T/one.safetensors' > '$T/s.json'"
# sample_size is not stored in single files (the SD1.x default is assumed)
check "single-file architecture detected from shapes equals the configs (but sample_size)" \
    "$PY - '$T/d.json' '$T/s.json' <<'PYEOF'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a['hash'] == b['hash']
for x in (a, b):
    for c in x['architecture'].values(): c.pop('sample_size', None)
assert a['architecture'] == b['architecture'], (a['architecture'], b['architecture'])
PYEOF"
check "round trip keeps every tensor's bytes and dtype (per-file tensor tables equal)" \
    "$PY - '$D' '$T/back' <<'PYEOF'
import json, struct, sys
def table(p):
    f = open(p, 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); h.pop('__metadata__', None)
    data = f.read()
    return {k: (v['dtype'], v['shape'], data[v['data_offsets'][0]:v['data_offsets'][1]]) for k, v in h.items()}
for c, w in (('unet', 'diffusion_pytorch_model'), ('vae', 'diffusion_pytorch_model'), ('text_encoder', 'model')):
    a = table(f'{sys.argv[1]}/{c}/{w}.safetensors'); b = table(f'{sys.argv[2]}/{c}/{w}.safetensors')
    assert a.keys() == b.keys(), (c, set(a) ^ set(b))
    for k in a: assert a[k] == b[k], (c, k)
PYEOF"
check "converted folder has configs, scheduler and tokenizer" \
    "[ -f '$T/back/model_index.json' ] && [ -f '$T/back/unet/config.json' ] && [ -f '$T/back/scheduler/scheduler_config.json' ] && [ -f '$T/back/tokenizer/vocab.json' ]"

ok "convert --dtype fp16" db-ckpt convert --dtype fp16 "$D" "$T/half.safetensors"
fails_with 1 "" "diff fp32 vs fp16 exits 1 at zero tolerance" db-ckpt diff "$D" "$T/half.safetensors"
ok "diff fp32 vs fp16 passes at --tol 1e-3" db-ckpt diff --tol 1e-3 "$D" "$T/half.safetensors"
check "fp16 file is about half the size" \
    "[ \$(stat -c %s '$T/half.safetensors') -lt \$(( \$(stat -c %s '$T/one.safetensors') * 6 / 10 )) ]"

# diffusers folders may hold PyTorch .bin weights, read by the same safe unpickler
cp -r "$D" "$T/bin"
for c in unet/diffusion_pytorch_model text_encoder/model; do
    b=${c%/*}/$( [ "${c%/*}" = unet ] && echo diffusion_pytorch_model || echo pytorch_model ).bin
    $PY "$TOP/tests/py/st_to_bin.py" "$T/bin/$c.safetensors" "$T/bin/$b" && rm "$T/bin/$c.safetensors"
done
ok "diffusers folder with .bin weights equals the safetensors one" db-ckpt diff "$T/bin" "$D"

ok "verify .ckpt" db-ckpt verify "$C"
ok "verify diffusers folder" db-ckpt verify "$D"
ok "verify single file" db-ckpt verify "$T/one.safetensors"

# --- hostile and broken inputs -------------------------------------------------
head -c 100000 "$T/one.safetensors" > "$T/trunc.safetensors"
fails_with 1 "trunc.safetensors.*(past the end|truncated)" "truncated safetensors refused, file named" \
    db-ckpt info "$T/trunc.safetensors"
fails_with 1 "trunc.safetensors" "convert of a truncated file fails" \
    db-ckpt convert "$T/trunc.safetensors" "$T/out1.safetensors"
check "no partial output left behind" "no_leftovers '$T/out1.safetensors'"
$PY - "$T" <<'PYEOF'
import json, struct, sys
t = sys.argv[1]
def write(name, header, data, hlen=None):
    h = json.dumps(header).encode()
    with open(f'{t}/{name}', 'wb') as f:
        f.write(struct.pack('<Q', len(h) if hlen is None else hlen)); f.write(h); f.write(data)
write('lying-len.safetensors', {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}}, b'\0' * 8, hlen=1 << 40)
write('overlap.safetensors', {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
                              'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}, b'\0' * 12)
write('badshape.safetensors', {'a': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, b'\0' * 8)
write('baddtype.safetensors', {'a': {'dtype': 'Q7', 'shape': [2], 'data_offsets': [0, 8]}}, b'\0' * 8)
write('gap.safetensors', {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}, b'\0' * 8)
write('notsd.safetensors', {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}}, b'\0' * 8)
PYEOF
fails_with 1 "lying-len.safetensors: .*header length" "lying header length refused" db-ckpt verify "$T/lying-len.safetensors"
fails_with 1 "overlap.safetensors: .*overlap" "overlapping tensors refused" db-ckpt verify "$T/overlap.safetensors"
fails_with 1 "badshape.safetensors: .*needs 12 bytes" "shape x dtype != byte length refused" db-ckpt verify "$T/badshape.safetensors"
fails_with 1 "baddtype.safetensors: .*dtype 'Q7'" "unknown dtype refused" db-ckpt verify "$T/baddtype.safetensors"
fails_with 1 "gap.safetensors: .*gap" "gap in the data section refused" db-ckpt verify "$T/gap.safetensors"
ok "verify accepts a valid non-model safetensors" db-ckpt verify "$T/notsd.safetensors"
fails_with 1 "notsd.safetensors: .*(missing|no UNet tensors)" "info on a non-model file explains what is missing" \
    db-ckpt info "$T/notsd.safetensors"
head -c 300000 "$C" > "$T/trunc.ckpt"
fails_with 1 "trunc.ckpt" "truncated .ckpt zip refused, file named" db-ckpt info "$T/trunc.ckpt"
fails_with 1 "trunc.ckpt" "convert of a truncated zip leaves nothing" db-ckpt convert "$T/trunc.ckpt" "$T/out2"
check "no partial output folder left behind" "no_leftovers '$T/out2'"
if [ -f "$TOP/tests/data/pickle/evil_os_system.ckpt" ]; then
    rm -f /tmp/dreambooth-c-pwned
    fails_with 1 "os\.system" ".ckpt referencing os.system refused, global named" \
        db-ckpt info "$TOP/tests/data/pickle/evil_os_system.ckpt"
    check "nothing was executed" "[ ! -e /tmp/dreambooth-c-pwned ]"
fi
fails_with 1 "already exists" "convert refuses to overwrite" db-ckpt convert "$D" "$T/one.safetensors"
fails_with 2 "nonexistent" "diff exits 2 when a model cannot be read" db-ckpt diff "$D" "$T/nonexistent"
fails_with 2 "unknown option" "unknown option is a usage error" db-ckpt info --bogus "$D"
fails_with 2 "unknown command" "unknown command is a usage error" db-ckpt frobnicate
fails_with 2 "fp32, fp16 or bf16" "bad --dtype is a usage error" db-ckpt convert --dtype int8 "$D" "$T/x.safetensors"
ok "--help works" sh -c "db-ckpt info --help | grep -q -- --json"
ok "--version works" sh -c "db-ckpt --version | grep -q dreambooth-c"

# --- init ------------------------------------------------------------------------
ok "init --arch tiny (diffusers folder)" db-ckpt init --arch tiny --seed 7 "$T/rand"
ok "init --arch tiny (single file), same seed" db-ckpt init --arch tiny --seed 7 "$T/rand.safetensors"
ok "both layouts hold identical weights" db-ckpt diff "$T/rand" "$T/rand.safetensors"
ok "init with another seed" db-ckpt init --arch tiny --seed 8 "$T/rand8.safetensors"
fails_with 1 "" "another seed gives other weights" db-ckpt diff "$T/rand.safetensors" "$T/rand8.safetensors"
ok "init --config takes diffusers configs" db-ckpt init --config "$D" "$T/fromcfg.safetensors"
ok "info on the random tiny model" sh -c "db-ckpt info --json '$T/rand' > '$T/r.json'"
check "random tiny model has tiny-dev's architecture and parameter counts" \
    "$PY - '$T/d.json' '$T/r.json' <<'PYEOF'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a['architecture'] == b['architecture']
assert all(a['components'][k]['params'] == b['components'][k]['params'] for k in a['components'])
PYEOF"
done_testing
