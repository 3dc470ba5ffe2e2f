#!/usr/bin/env bash
# db-ckpt export and info on db-train checkpoints: a fine-tuned subset over
# its base model gives a complete model (single file or diffusers folder) with
# exactly the checkpoint's tensors and the base's others; bad checkpoints are
# refused cleanly, naming the file, and leave no output.
. "$(dirname "$0")/lib.sh"
D=$TOP/tests/data/tiny/diffusers
BASE=$T/base.safetensors
RUN=$T/run

ok "base model as a single file" db-ckpt convert "$D" "$BASE"
HASH=$(db-ckpt info --json "$BASE" | $PY -c 'import json,sys; print(json.load(sys.stdin)["hash"])')
check "base hash read" "[ \${#HASH} = 16 ]"

# safetensors with numpy (no safetensors module needed)
cat > "$T/st.py" <<'PYEOF'
import json, struct
import numpy as np
DT = {'F32': np.float32, 'F16': np.float16, 'BF16': None, 'I64': np.int64}
def load(path):
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); data = f.read()
    meta = h.pop('__metadata__', {})
    out = {}
    for k, v in h.items():
        b, e = v['data_offsets']
        out[k] = (v['dtype'], np.frombuffer(data[b:e], dtype=DT[v['dtype']]).reshape(v['shape']))
    return out, meta
def save(path, tensors, meta=None):
    h, off, blobs = {}, 0, []
    for k, a in tensors.items():
        a = np.ascontiguousarray(a); b = a.tobytes()
        h[k] = {'dtype': {np.dtype('float32'): 'F32', np.dtype('float16'): 'F16', np.dtype('int64'): 'I64'}[a.dtype],
                'shape': list(a.shape), 'data_offsets': [off, off + len(b)]}
        off += len(b); blobs.append(b)
    if meta: h['__metadata__'] = meta
    hb = json.dumps(h).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(hb))); f.write(hb); f.write(b''.join(blobs))
# the checkpoint's trained values, from the base's
def trained(name, a):
    return (a.astype(np.float32) * 2 + 0.3) if name.startswith('model.diffusion_model.') \
        else (a.astype(np.float32) * -1.5 + 0.1)
PYEOF

# RUN/ckpt-000200: UNet only; ckpt-000400: UNet and text encoder;
# ckpt-000600: state.json cut short (incomplete); a hidden temporary to ignore.
$PY - "$T" "$BASE" "$HASH" <<'PYEOF'
import json, os, sys
sys.path.insert(0, sys.argv[1]); import st
t, base, h = sys.argv[1:]
w, _ = st.load(base)
U, TE = 'model.diffusion_model.', 'cond_stage_model.transformer.text_model.'
def ckpt(d, step, te, names=None, state_extra={}, tensors=None):
    os.makedirs(d)
    sel = {k: st.trained(k, a) for k, (dt, a) in w.items()
           if k.startswith(U) or (te and k.startswith(TE) and 'position_ids' not in k)}
    if tensors: sel.update(tensors)
    st.save(f'{d}/model.safetensors', sel, {'format': 'dreambooth-c/ckpt', 'step': str(step), 'base_model_hash': h})
    st.save(f'{d}/optimizer.safetensors', {f'{m}/{k}': v * 0 for k, v in sel.items() for m in ('exp_avg', 'exp_avg_sq')})
    state = {'format': 'dreambooth-c/ckpt', 'version': 1, 'step': step, 'base_model': base, 'base_model_hash': h,
             'train_text_encoder': te, 'loss': {'loss': 0.125, 'loss_instance': 0.1, 'loss_prior': 0.025},
             'lr': 1e-6, 'rng': {'seed': 7}, 'data': {'epoch': 3}, 'future_key': [1, 2]}
    state.update(state_extra)
    json.dump(state, open(f'{d}/state.json', 'w'))
    json.dump({'steps': 800, 'lr': 1e-6, 'instance_prompt': 'a photo of sks dog', 'train_text_encoder': te,
               'with_prior_preservation': True}, open(f'{d}/config.json', 'w'))
r = f'{t}/run'
ckpt(f'{r}/ckpt-000200', 200, False)
ckpt(f'{r}/ckpt-000400', 400, True)
ckpt(f'{r}/ckpt-000600', 600, True)
open(f'{r}/ckpt-000600/state.json', 'w').write('{"format": "dreambooth-c/ckpt", "st')
ckpt(f'{r}/.ckpt-000800.tmp-x1y2z3', 800, True)
# broken checkpoints
ckpt(f'{t}/badhash', 400, False, state_extra={'base_model_hash': '0123456789abcdef'})
ckpt(f'{t}/nostate', 400, False); os.remove(f'{t}/nostate/state.json')
ckpt(f'{t}/corrupt', 400, False); open(f'{t}/corrupt/state.json', 'w').write('{"format": ')
ckpt(f'{t}/notours', 400, False, state_extra={'format': 'something/else'})
k = 'model.diffusion_model.out.2.weight'
ckpt(f'{t}/badshape', 400, False, tensors={k: st.np.zeros((1,) + w[k][1].shape, st.np.float32)})
ckpt(f'{t}/unknown', 400, False, tensors={'model.diffusion_model.not_a_layer.weight': st.np.zeros(3, st.np.float32)})
ckpt(f'{t}/moved', 400, False, state_extra={'base_model': f'{t}/no-such-base.safetensors'})
PYEOF
check "fixture written" "[ -f '$RUN/ckpt-000400/model.safetensors' ] && [ -f '$T/unknown/state.json' ]"

# --- export -------------------------------------------------------------------
ok "export ckpt-000400 -> single .safetensors (fp16 by default)" \
    db-ckpt export "$RUN/ckpt-000400" "$T/out.safetensors"
check "trained UNet and text encoder = fp16 of the checkpoint's values; VAE = fp16 of the base's" \
    "$PY - '$T' '$BASE' '$T/out.safetensors' <<'PYEOF'
import sys; sys.path.insert(0, sys.argv[1]); import st; np = st.np
base, _ = st.load(sys.argv[2]); out, _ = st.load(sys.argv[3])
assert out.keys() == base.keys(), set(out) ^ set(base)
n = {'unet': 0, 'te': 0, 'vae': 0}
for k, (dt, a) in out.items():
    bd, b = base[k]
    if k.endswith('position_ids'):
        assert dt == bd and np.array_equal(a, b), k; continue
    assert dt == 'F16' and a.shape == b.shape, (k, dt)
    if k.startswith('first_stage_model.'):
        want = b.astype(np.float16); n['vae'] += 1
    else:
        want = st.trained(k, b).astype(np.float16); n['unet' if k.startswith('model.') else 'te'] += 1
    assert np.array_equal(a.view(np.uint16), want.view(np.uint16)), k
assert all(n.values()), n
PYEOF"
ok "export ckpt-000200 --dtype fp32" db-ckpt export --dtype fp32 "$RUN/ckpt-000200" "$T/out200.safetensors"
check "fp32: UNet exactly the checkpoint's; text encoder and VAE exactly the base's" \
    "$PY - '$T' '$BASE' '$T/out200.safetensors' <<'PYEOF'
import sys; sys.path.insert(0, sys.argv[1]); import st; np = st.np
base, _ = st.load(sys.argv[2]); out, _ = st.load(sys.argv[3])
assert out.keys() == base.keys()
for k, (dt, a) in out.items():
    b = base[k][1]
    want = st.trained(k, b) if k.startswith('model.diffusion_model.') else b
    assert dt == base[k][0] and np.array_equal(a, want), k
PYEOF"
ok "export --to diffusers" db-ckpt export --to diffusers "$RUN/ckpt-000400" "$T/outd"
ok "diff: diffusers export == single-file export" db-ckpt diff "$T/outd" "$T/out.safetensors"
check "diffusers export has configs, scheduler and tokenizer" \
    "[ -f '$T/outd/model_index.json' ] && [ -f '$T/outd/unet/config.json' ] && [ -f '$T/outd/scheduler/scheduler_config.json' ] && [ -f '$T/outd/tokenizer/vocab.json' ]"
fails_with 1 "" "the export differs from the base" db-ckpt diff "$T/out.safetensors" "$BASE"
ok "export --dtype fp32 keeps values within fp16 rounding of the fp16 export" \
    sh -c "db-ckpt export --dtype fp32 '$RUN/ckpt-000400' '$T/out32.safetensors' && db-ckpt diff --tol 1e-3 '$T/out32.safetensors' '$T/out.safetensors'"

ok "export RUN_DIR takes the latest complete checkpoint" \
    sh -c "db-ckpt export '$RUN' '$T/outrun.safetensors' 2>'$T/run.err'"
check "... and says which on stderr (and which it skipped)" \
    "grep -q 'ckpt-000400 (step 400' '$T/run.err' && grep -q 'ckpt-000600' '$T/run.err'"
ok "... which is ckpt-000400" db-ckpt diff "$T/outrun.safetensors" "$T/out.safetensors"
ok "--model overrides state.json's base_model" db-ckpt export --model "$D" "$T/moved" "$T/outmoved.safetensors"
ok "... (the same base in another layout has the same hash)" db-ckpt diff --tol 1e-3 "$T/outmoved.safetensors" "$T/out200.safetensors"

# --- refused --------------------------------------------------------------------
fails_with 1 "badhash/state.json: base model hash mismatch.*0123456789abcdef.*$HASH" \
    "base model hash mismatch refused, both hashes named" db-ckpt export "$T/badhash" "$T/x1.safetensors"
check "no output left behind" "no_leftovers '$T/x1.safetensors'"
ok "--force exports anyway" db-ckpt export -q --force "$T/badhash" "$T/forced.safetensors"
fails_with 1 "nostate/state.json" "missing state.json refused, file named" db-ckpt export "$T/nostate" "$T/x2.safetensors"
check "no output left behind" "no_leftovers '$T/x2.safetensors'"
fails_with 1 "corrupt/state.json" "corrupt state.json refused, file named" db-ckpt export "$T/corrupt" "$T/x3"
check "no output folder left behind" "no_leftovers '$T/x3'"
fails_with 1 "notours/state.json: .*format" "state.json of another format refused" db-ckpt export "$T/notours" "$T/x4.safetensors"
fails_with 1 "badshape/model.safetensors: tensor 'model.diffusion_model.out.2.weight': shape" \
    "a tensor of the wrong shape refused, file and tensor named" db-ckpt export "$T/badshape" "$T/x5.safetensors"
check "no output left behind" "no_leftovers '$T/x5.safetensors'"
fails_with 1 "unknown/model.safetensors: tensor 'model.diffusion_model.not_a_layer.weight'" \
    "an unknown tensor name refused, file and tensor named" db-ckpt export --to diffusers "$T/unknown" "$T/x6"
check "no output folder left behind" "no_leftovers '$T/x6'"
fails_with 1 "no-such-base" "a missing base model is named" db-ckpt export "$T/moved" "$T/x7.safetensors"
check "no output left behind" "no_leftovers '$T/x7.safetensors'"
fails_with 1 "already exists" "export refuses to overwrite" db-ckpt export "$RUN/ckpt-000400" "$T/out.safetensors"
fails_with 1 "neither a training checkpoint" "a folder without checkpoints refused" db-ckpt export "$T/outd/unet" "$T/x8.safetensors"
fails_with 2 "fp32, fp16 or bf16" "bad --dtype is a usage error" db-ckpt export --dtype int8 "$RUN" "$T/x9.safetensors"

# --- info -----------------------------------------------------------------------
ok "info on a checkpoint" sh -c "db-ckpt info '$RUN/ckpt-000400' > '$T/info.txt'"
check "info: step, base hash, text encoder, losses, lr" \
    "grep -q 'training checkpoint, step 400' '$T/info.txt' && grep -q 'hash $HASH' '$T/info.txt' && grep -q 'text encoder  trained' '$T/info.txt' && grep -q 'loss          0.125 (instance 0.1, prior 0.025)' '$T/info.txt' && grep -q 'lr            1e-06' '$T/info.txt'"
check "info: config as sorted key = value lines" \
    "grep '^    [a-z_]* = ' '$T/info.txt' | sed 's/ = .*//' | LC_ALL=C sort -c && grep -q '^    instance_prompt = a photo of sks dog$' '$T/info.txt' && grep -q '^    steps = 800$' '$T/info.txt' && grep -q '^    lr = 1e-06$' '$T/info.txt'"
NT=$($PY -c "import sys; sys.path.insert(0, '$T'); import st; print(len(st.load('$RUN/ckpt-000400/model.safetensors')[0]))")
check "info: trained tensor count" "grep -q 'params in $NT tensors' '$T/info.txt'"
check "info: not trained text encoder said so" \
    "db-ckpt info '$RUN/ckpt-000200' | grep -q 'text encoder  not trained'"
ok "info on a run folder" sh -c "db-ckpt info '$RUN' > '$T/info-run.txt' 2>/dev/null"
check "info on a run lists its checkpoints and describes the latest complete one" \
    "grep -q 'training run, 3 checkpoints (steps 200, 400, 600)' '$T/info-run.txt' && grep -q 'ckpt-000400: dreambooth-c training checkpoint, step 400' '$T/info-run.txt'"
ok "info --json on a checkpoint" sh -c "db-ckpt info --json '$RUN/ckpt-000400' > '$T/info.json'"
check "info --json: step, state, config, trained counts" \
    "$PY - '$T/info.json' $NT <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))
assert j['step'] == 400 and j['state']['train_text_encoder'] is True and j['config']['steps'] == 800, j
assert j['trained']['tensors'] == int(sys.argv[2]) and set(j['trained']['components']) == {'unet', 'text_encoder'}, j['trained']
PYEOF"
fails_with 1 "corrupt/state.json" "info on a corrupt checkpoint names state.json" db-ckpt info "$T/corrupt"
ok "info on models is unchanged" sh -c "db-ckpt info '$D' | grep -q 'diffusers, SD1.x family'"
done_testing
