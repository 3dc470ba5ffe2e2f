#!/usr/bin/env bash
# A full-size SD1.5 with random weights: the real topology (every name and
# shape of the real checkpoint, in both layouts), ~2.1 GB in fp16; every
# db-ckpt command on it, and db-sample at 512x512, stay within 6 GB peak RSS.
. "$(dirname "$0")/lib.sh"
KEYS=$TOP/tests/data/sd15-keys/diffusers_to_compvis.json
LIMIT_KB=$((6 * 1024 * 1024))

# rss NAME COMMAND...: run, record peak RSS (KiB) in $T/NAME.rss
rss() {
    local name=$1; shift
    /usr/bin/time -f %M -o "$T/$name.rss" "$@"
}
under_limit() { [ "$(cat "$T/$1.rss")" -lt "$LIMIT_KB" ]; }

ok "init --arch sd15 --dtype fp16 (single file)" rss init db-ckpt init --arch sd15 --dtype fp16 --seed 1 "$T/sd15.safetensors"
check "init peak RSS under 6 GB ($(cat "$T/init.rss" 2>/dev/null) KiB)" "under_limit init"
check "file is about 2.1 GB" \
    "s=\$(stat -c %s '$T/sd15.safetensors'); [ \$s -gt 2000000000 ] && [ \$s -lt 2200000000 ]"
check "names and shapes equal real SD1.5 (CompVis layout, all 1131 tensors)" \
    "$PY - '$T/sd15.safetensors' '$KEYS' <<'PYEOF'
import json, struct, sys
f = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); h.pop('__metadata__', None)
rows = json.load(open(sys.argv[2]))
want = {r['compvis']: r['compvis_shape'] for r in rows}
got = {k: v['shape'] for k, v in h.items()}
assert got == want, (sorted(set(got) ^ set(want))[:5], [k for k in got if k in want and got[k] != want[k]][:5])
assert all(v['dtype'] == ('I64' if 'position_ids' in k else 'F16') for k, v in h.items())
PYEOF"
ok "info" rss info db-ckpt info "$T/sd15.safetensors"
check "info peak RSS under 6 GB ($(cat "$T/info.rss" 2>/dev/null) KiB)" "under_limit info"
ok "verify" rss verify db-ckpt verify -q "$T/sd15.safetensors"
check "verify peak RSS under 6 GB ($(cat "$T/verify.rss" 2>/dev/null) KiB)" "under_limit verify"
ok "convert to diffusers" rss conv db-ckpt convert "$T/sd15.safetensors" "$T/sd15"
check "convert peak RSS under 6 GB ($(cat "$T/conv.rss" 2>/dev/null) KiB)" "under_limit conv"
check "diffusers names and shapes equal real SD1.5 (diffusers layout)" \
    "$PY - '$T/sd15' '$KEYS' <<'PYEOF'
import json, struct, sys
rows = json.load(open(sys.argv[2]))
for comp, w in (('unet', 'diffusion_pytorch_model'), ('vae', 'diffusion_pytorch_model'), ('text_encoder', 'model')):
    f = open(f'{sys.argv[1]}/{comp}/{w}.safetensors', 'rb'); n = struct.unpack('<Q', f.read(8))[0]
    h = json.loads(f.read(n)); h.pop('__metadata__', None)
    want = {r['diffusers']: r['diffusers_shape'] for r in rows if r['component'] == comp}
    got = {k: v['shape'] for k, v in h.items()}
    assert got == want, (comp, sorted(set(got) ^ set(want))[:5])
PYEOF"
ok "diff across layouts is exact" rss diff db-ckpt diff "$T/sd15.safetensors" "$T/sd15"
check "diff peak RSS under 6 GB ($(cat "$T/diff.rss" 2>/dev/null) KiB)" "under_limit diff"
ok "db-sample 512x512, one DDIM step with guidance" rss sample \
    db-sample -q -m "$T/sd15.safetensors" -p "a photo of sks dog" --steps 1 -o "$T/sd15.png"
check "sampling peak RSS under 6 GB ($(cat "$T/sample.rss" 2>/dev/null) KiB)" "under_limit sample"
check "a 512x512 PNG" "file '$T/sd15.png' | grep -q 'PNG image data, 512 x 512'"
done_testing
