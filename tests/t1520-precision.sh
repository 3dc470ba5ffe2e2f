#!/usr/bin/env bash
# --precision fp32|bf16|fp16 on the tiny model: db-sample's latents in the
# emulated compute types are close to fp32's but not fp32's; fp32 is the
# default and changes nothing; db-train in fp16 scales the loss, logs and
# checkpoints the scale, and a resume keeps it (bit-identically); unknown
# values are usage errors in all four tools.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
D=$TOP/tests/data/tiny/diffusers

sample() { db-sample -q --model "$D" --steps 4 --width 64 --height 64 --prompt "a photo of sks dog" --seed 3 \
    --threads 2 "$@"; }
# rel A B: the largest relative L2 between the two latents streams
rel() { dbtest dbt-rel "$1" "$2" | sed 's/.*L2 //'; }
# within R LO HI: LO < R < HI
within() { awk -v r="$1" -v lo="$2" -v hi="$3" 'BEGIN { exit !(r + 0 > lo && r + 0 < hi) }'; }

# --- 1. db-sample ------------------------------------------------------------------
ok "sample in fp32 (the default)" sample -o "$T/d.png" --latents-out "$T/d.dbt"
ok "sample with --precision fp32" sample --precision fp32 -o "$T/f32.png" --latents-out "$T/f32.dbt"
check "--precision fp32 is the default, bit for bit" "cmp -s '$T/d.dbt' '$T/f32.dbt'"
for p in bf16 fp16; do
    ok "sample with --precision $p" sample --precision $p -o "$T/$p.png" --latents-out "$T/$p.dbt"
done
RB=$(rel "$T/f32.dbt" "$T/bf16.dbt")
RH=$(rel "$T/f32.dbt" "$T/fp16.dbt")
echo "# final latents, relative L2 to fp32: bf16 $RB, fp16 $RH"
# bf16 rounds to 8 significant bits, fp16 to 11: after 4 DDIM steps with
# guidance 7.5 (which amplifies the cond/uncond difference) the latents
# moved by 2.7e-2 and 4.3e-3 (measured); the upper bounds leave 2x room, the
# lower bounds make sure the emulation ran
check "bf16 latents close to fp32's (rel L2 $RB < 6e-2) but not identical" "within '$RB' 0 6e-2"
check "fp16 latents close to fp32's (rel L2 $RH < 1e-2) but not identical" "within '$RH' 0 1e-2"
check "fp16 is nearer fp32 than bf16 (more mantissa bits)" "awk -v a='$RH' -v b='$RB' 'BEGIN { exit !(a + 0 < b + 0) }'"
ok "the diffusers alias: --precision bfloat16" sample --precision bfloat16 -o "$T/bf16b.png" --latents-out "$T/bf16b.dbt"
check "bfloat16 == bf16, and deterministic" "cmp -s '$T/bf16.dbt' '$T/bf16b.dbt'"

# --- 2. usage errors ------------------------------------------------------------------
fails_with 2 "--precision fp8: unknown precision \(fp32, bf16 or fp16\)" "db-sample --precision fp8: exit 2" \
    sample --precision fp8 -o "$T/bad.png"
check "no PNG left by the refused run" "[ ! -e '$T/bad.png' ]"
fails_with 2 "--precision half16: unknown precision" "db-prior --precision half16: exit 2" \
    db-prior -q --model "$D" --prompt "a dog" -n 1 --steps 2 --width 64 --height 64 --precision half16 -o "$T/bad.dbt"
fails_with 2 "--precision FP16: unknown precision" "db-prep --precision FP16 (names are lower case): exit 2" \
    db-prep -q --model "$D" --size 64 --caption "a dog" --precision FP16 "$TOP/tests/data/photos/dog" -o "$T/bad.dbt"
fails_with 2 "--precision int8: unknown precision" "db-train --precision int8: exit 2" \
    db-train -q --model "$D" --instance /dev/null --precision int8 -o "$T/badrun"
check "db-train --help documents --precision" "db-train --help | grep -q -- '--precision fp32|bf16|fp16'"

# --- 3. db-prep and db-prior ------------------------------------------------------------
train_fixtures
ok "db-prep --precision bf16" db-prep -q --model "$M" --size 128 --caption "a photo of sks dog" --precision bf16 \
    "$TOP/tests/data/photos/dog" -o "$T/inst-bf16.dbt"
RP=$(rel "$I" "$T/inst-bf16.dbt")
check "bf16 VAE encodings close to fp32's (rel L2 $RP < 6e-2; measured 2.3e-2), not identical" "within '$RP' 0 6e-2"
ok "db-prior --precision fp16, 2 samples" db-prior -q --model "$M" --prompt "a photo of a dog" -n 2 --steps 5 \
    --width 128 --height 128 --precision fp16 -o "$T/prior16.dbt"
fails_with 1 "settings" "an fp16 prior file does not resume as fp32 (other settings)" \
    db-prior -q --model "$M" --prompt "a photo of a dog" -n 3 --steps 5 --width 128 --height 128 -o "$T/prior16.dbt"

# --- 4. db-train in fp16: loss scaling ------------------------------------------------------
TR="db-train --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 2"
ok "3 steps in fp16, a checkpoint each" sh -c "$TR -v --precision fp16 --steps 3 --save-every 1 --log-every 1 -o '$T/H' 2>'$T/H.log'"
sed 's/^/#   /' "$T/H.log" | grep -E 'step [0-9]/|precision' | head -5
check "the log names the precision and the loss scale" \
    "grep -q 'compute precision fp16' '$T/H.log' && grep -q 'step 3/3 .*loss scale 65536' '$T/H.log'"
check "state.json: precision, loss_scale 65536, growth_tracker 3, optimizer_step 3" \
    "$PY -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(not (s[\"precision\"]==\"fp16\" and s[\"loss_scale\"]==65536 and s[\"growth_tracker\"]==3 and s[\"optimizer_step\"]==3))' '$T/H/ckpt-000003/state.json'"
EV=$(ls "$T"/H/events.out.tfevents.* | head -1)
check "TensorBoard has a loss_scale scalar" "dbtest tfevents '$EV' | grep -q loss_scale"
ok "the same 3 steps in fp32" sh -c "$TR -q --steps 3 -o '$T/F'"
check "fp32 state.json has no loss scale" \
    "$PY -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(\"loss_scale\" in s or s[\"precision\"]!=\"fp32\")' '$T/F/ckpt-000003/state.json'"
check "fp16 trained other weights than fp32" "! cmp -s '$T/H/ckpt-000003/model.safetensors' '$T/F/ckpt-000003/model.safetensors'"

# resume: bit-identical, and the scale and tracker come from the checkpoint
cp -r "$T/H/ckpt-000003" "$T/straight3"
ok "--resume ckpt-000001 in fp16 (rewrites 2 and 3)" sh -c "$TR -q --precision fp16 --resume '$T/H/ckpt-000001'"
check "resumed == straight (model and optimizer bytes)" \
    "cmp -s '$T/straight3/model.safetensors' '$T/H/ckpt-000003/model.safetensors' && cmp -s '$T/straight3/optimizer.safetensors' '$T/H/ckpt-000003/optimizer.safetensors'"
# a scale and tracker no fresh run has: the resume must take them from state.json
$PY - "$T/H/ckpt-000001/state.json" <<'PYEOF'
import json, sys
p = sys.argv[1]; s = json.load(open(p))
s["loss_scale"] = 1024.0; s["growth_tracker"] = 7
json.dump(s, open(p, "w"))
PYEOF
ok "--resume ckpt-000001 with loss_scale 1024, growth_tracker 7" sh -c "$TR -q --precision fp16 --resume '$T/H/ckpt-000001'"
check "ckpt-000003 carries them on: loss_scale 1024, growth_tracker 9" \
    "$PY -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(not (s[\"loss_scale\"]==1024 and s[\"growth_tracker\"]==9))' '$T/H/ckpt-000003/state.json'"
check "and the weights differ from the 65536 run (the scale reached the fp16 backward)" \
    "! cmp -s '$T/straight3/model.safetensors' '$T/H/ckpt-000003/model.safetensors'"
ok "resume the fp16 run in fp32 (a runtime choice)" sh -c "$TR -q --resume '$T/H/ckpt-000001'"
check "fp32 steps: no loss scale in the new checkpoint, precision fp32" \
    "$PY -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(\"loss_scale\" in s or s[\"precision\"]!=\"fp32\")' '$T/H/ckpt-000003/state.json'"

# bf16: the UNet's weight gradients kept in bf16 (README Precision), said
# once in the log; not with two micro-batches a step (they add up in fp32)
ok "2 steps in bf16" sh -c "$TR --precision bf16 --steps 2 -o '$T/B16' 2>'$T/B16.log'"
check "the log says the weight gradients are kept in bf16, once" \
    "[ \$(grep -c \"UNet's [0-9]* linear and convolution weight gradients are kept in bf16\" '$T/B16.log') = 1 ]"
ok "2 steps in bf16, 2 micro-batches a step" sh -c "$TR --precision bf16 --steps 2 --grad-accum 2 -o '$T/B16a' 2>'$T/B16a.log'"
check "... and not there" "! grep -q 'kept in bf16' '$T/B16a.log'"

# precision from --config
echo '{"precision": "bf16", "steps": 1}' >"$T/cfg.json"
ok "--config with \"precision\": \"bf16\"" sh -c "$TR -q --config '$T/cfg.json' -o '$T/C1'"
check "state.json says bf16, config.json does not keep it (runtime)" \
    "$PY -c 'import json,sys; s=json.load(open(sys.argv[1])); c=json.load(open(sys.argv[2])); sys.exit(s[\"precision\"]!=\"bf16\" or \"precision\" in c)' '$T/C1/ckpt-000001/state.json' '$T/C1/config.json'"

done_testing
