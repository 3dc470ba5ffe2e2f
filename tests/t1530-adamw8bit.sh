#!/usr/bin/env bash
# db-train --optimizer adamw8bit on the tiny model: the checkpoint's 8-bit
# optimizer state (uint8 codes, float scales, float32 moments for tensors
# under 4096 elements), a bit-identical resume after kill -9, a resume that
# would switch optimizer refused, and --plan's smaller optimizer bytes.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
train_fixtures

TR="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 2"
Q8="--optimizer adamw8bit --train-text-encoder"

same() { cmp -s "$1/model.safetensors" "$2/model.safetensors" && cmp -s "$1/optimizer.safetensors" "$2/optimizer.safetensors"; }
killed() {
    local dir=$1 ck=$2; shift 2
    $TR "$@" -o "$dir" 2>/dev/null &
    local pid=$!
    for _ in $(seq 1500); do [ -d "$dir/$ck" ] && break; sleep 0.02; done
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    return 0
}

# --- 1. a run and its checkpoint ---------------------------------------------------
ok "adamw8bit, text encoder trained: 4 steps, a checkpoint every 2" $TR $Q8 --steps 4 --save-every 2 -o "$T/A"
check "optimizer.safetensors: uint8 codes and float32 scales per large tensor, float32 moments per small one" \
    "$PY - '$T/A/ckpt-000004/optimizer.safetensors' <<'PYEOF'
import json, struct, sys
f = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n))
meta = h.pop('__metadata__')
assert meta.get('optimizer') == 'adamw8bit', meta
numel = lambda s: eval('*'.join(map(str, s)) or '1')
q8 = {k.split('/', 1)[1]: v for k, v in h.items() if k.startswith('exp_avg.q8/')}
assert q8 and all(v['dtype'] == 'U8' for v in q8.values())
for name, v in q8.items():
    nb = (numel(v['shape']) + 255) // 256
    assert numel(v['shape']) >= 4096, name
    for k in ('exp_avg_sq.q8/',):
        assert h[k + name]['dtype'] == 'U8' and h[k + name]['shape'] == v['shape'], name
    for k in ('exp_avg.absmax/', 'exp_avg_sq.absmax/'):
        assert h[k + name]['dtype'] == 'F32' and h[k + name]['shape'] == [nb], name
small = {k.split('/', 1)[1]: v for k, v in h.items() if k.startswith('exp_avg/')}
assert small and all(numel(v['shape']) < 4096 and v['dtype'] == 'F32' for v in small.values())
assert not set(small) & set(q8)
assert any(k.startswith('cond_stage_model.') for k in q8), 'text encoder moments'
f.seek(0, 2)
print('# %d tensors in 8 bits, %d in float32, %d bytes' % (len(q8), len(small), f.tell()), file=sys.stderr)
PYEOF"
check "state.json names the optimizer" "grep -q '\"optimizer\": \"adamw8bit\"' '$T/A/ckpt-000004/state.json'"

# --- 2. kill -9 and resume: bit-identical ---------------------------------------------
killed "$T/B" ckpt-000002 $Q8 --steps 4 --save-every 2
check "killed after its first checkpoint, before the end" "[ -d '$T/B/ckpt-000002' ] && [ ! -d '$T/B/ckpt-000004' ]"
ok "--resume the killed run" $TR --resume "$T/B"
check "resumed == straight (model and optimizer bytes)" same "$T/A/ckpt-000004" "$T/B/ckpt-000004"
check "the check can fail: step 2 != step 4" "! same '$T/A/ckpt-000002' '$T/A/ckpt-000004'"

# --- 3. no switching optimizer on resume -------------------------------------------
fails_with 1 "optimizer" "--resume with --optimizer adamw: exit 1, names --optimizer" \
    $TR --resume "$T/B" --optimizer adamw --steps 6
check "nothing written" "[ ! -d '$T/B/ckpt-000006' ]"
# a configuration without the key (edited, or from before the option) still
# cannot load another optimizer's state: the checkpoint says which it holds
cp -r "$T/B" "$T/E"
for c in "$T"/E/ckpt-*; do
    $PY -c "import json,sys; p=sys.argv[1]; d=json.load(open(p)); d.pop('optimizer'); json.dump(d, open(p,'w'))" "$c/config.json"
done
fails_with 1 "made with --optimizer adamw8bit" "a checkpoint of adamw8bit under an adamw configuration: refused" \
    $TR --resume "$T/E" --steps 6
ok "adamw run, 2 steps" $TR --steps 2 -o "$T/F"
fails_with 1 "optimizer" "--resume an adamw run with --optimizer adamw8bit: refused" \
    $TR --resume "$T/F" --optimizer adamw8bit --steps 4
fails_with 2 "optimizer" "--optimizer sgd: exit 2" $TR --optimizer sgd --steps 2 -o "$T/G"

# --- 4. --plan ---------------------------------------------------------------------
moments() { $TR --steps 2 --plan --train-text-encoder "$@" | awk '/AdamW moments/ { for (i = 2; i <= NF; i++) if ($i == "MiB") print $(i - 1) }'; }
m32=$(moments)
m8=$(moments --optimizer adamw8bit)
echo "# --plan AdamW moments: adamw $m32 MiB, adamw8bit $m8 MiB"
check "--plan: 8-bit moments under half of float32's (the tiny model's many small tensors stay float32)" \
    "awk -v a='$m8' -v b='$m32' 'BEGIN { exit !(a > 0 && b > 0 && a < 0.5 * b) }'"
check "--plan labels the 8-bit state" "$TR --steps 2 --plan --optimizer adamw8bit | grep -q 'AdamW moments (8-bit)'"

done_testing
