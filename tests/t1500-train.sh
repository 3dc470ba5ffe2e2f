#!/usr/bin/env bash
# db-train on the tiny model (128x128 images: 16x16 latents): the run
# directory, bit-identical resumes (kill -9, SIGINT, a kill during a
# checkpoint write), --config, --record/--replay, refused inputs, divergence,
# --plan against the measured peak, the TensorBoard file, db-ckpt on a run.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
train_fixtures

TR="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 2"

# same CKPT1 CKPT2: the trained weights and the optimizer state are identical
same() { cmp -s "$1/model.safetensors" "$2/model.safetensors" && cmp -s "$1/optimizer.safetensors" "$2/optimizer.safetensors"; }
# killed DIR CKPT ARGS...: run db-train ARGS -o DIR, kill -9 it once DIR/CKPT exists
killed() {
    local dir=$1 ck=$2; shift 2
    $TR "$@" -o "$dir" 2>/dev/null &
    local pid=$!
    for _ in $(seq 1500); do [ -d "$dir/$ck" ] && break; sleep 0.02; done
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    return 0
}
ckpts() { (cd "$1" && ls -d ckpt-* 2>/dev/null | tr '\n' ' '); }

# --- 1. the run directory --------------------------------------------------------
ok "6 steps, a checkpoint every 2" $TR --steps 6 --save-every 2 -o "$T/A"
check "ckpt-000002, 4 and 6, config.json, an event file" \
    "[ \"\$(ckpts '$T/A')\" = 'ckpt-000002 ckpt-000004 ckpt-000006 ' ] && [ -f '$T/A/config.json' ] && ls '$T/A'/events.out.tfevents.* >/dev/null"
check "each checkpoint complete" "for c in '$T'/A/ckpt-*; do for f in model.safetensors optimizer.safetensors state.json config.json; do [ -s \$c/\$f ] || exit 1; done; done"

# --- 2. resume after kill -9 is bit-identical -------------------------------------
killed "$T/B" ckpt-000002 --steps 6 --save-every 2
check "killed after its first checkpoint, before the end" "[ -d '$T/B/ckpt-000002' ] && [ ! -d '$T/B/ckpt-000006' ]"
ok "--resume the killed run" $TR --resume "$T/B"
check "resumed == straight (model and optimizer bytes)" same "$T/A/ckpt-000006" "$T/B/ckpt-000006"
check "the check can fail: step 4 != step 6" "! same '$T/A/ckpt-000004' '$T/A/ckpt-000006'"
ok "--resume B/ckpt-000004 (rewrites ckpt-000006)" $TR --resume "$T/B/ckpt-000004"
check "== straight again" same "$T/A/ckpt-000006" "$T/B/ckpt-000006"

ok "straight, --train-text-encoder" $TR --steps 6 --save-every 2 --train-text-encoder -o "$T/AT"
killed "$T/BT" ckpt-000002 --steps 6 --save-every 2 --train-text-encoder
check "killed before the end (text encoder)" "[ -d '$T/BT/ckpt-000002' ] && [ ! -d '$T/BT/ckpt-000006' ]"
ok "resume (text encoder)" $TR --resume "$T/BT"
check "resumed == straight, text encoder trained" same "$T/AT/ckpt-000006" "$T/BT/ckpt-000006"
check "the text encoder is in the checkpoint" \
    "grep -aq cond_stage_model.transformer.text_model '$T/AT/ckpt-000006/model.safetensors' && ! same '$T/A/ckpt-000006' '$T/AT/ckpt-000006'"

ok "straight, --grad-accum 2" $TR --steps 4 --save-every 2 --grad-accum 2 -o "$T/AG"
killed "$T/BG" ckpt-000002 --steps 4 --save-every 2 --grad-accum 2
check "killed before the end (grad-accum)" "[ -d '$T/BG/ckpt-000002' ] && [ ! -d '$T/BG/ckpt-000004' ]"
ok "resume (grad-accum)" $TR --resume "$T/BG"
check "resumed == straight, --grad-accum 2" same "$T/AG/ckpt-000004" "$T/BG/ckpt-000004"

# --- 6. what a resume may change ------------------------------------------------
fails_with 1 "--lr" "--resume with another --lr: exit 1, names --lr" $TR --resume "$T/B" --lr 1e-3
check "no checkpoint added" "[ \"\$(ckpts '$T/B')\" = 'ckpt-000002 ckpt-000004 ckpt-000006 ' ]"
ok "--resume A --steps 16 extends the run" $TR --resume "$T/A" --steps 16 --save-every 8
check "to ckpt-000016" "[ -d '$T/A/ckpt-000016' ] && ! same '$T/A/ckpt-000006' '$T/A/ckpt-000016'"

# --- 3. kill -9 at random moments, checkpoints every step ------------------------
K=$T/K
kills=0 mid=0 loadable=0 cleaned=0 stale=""
for i in $(seq 9); do
    if [ -d "$K" ] && db-ckpt info "$K" >/dev/null 2>&1; then
        set -- --resume "$K"
    else
        rm -rf "$K"
        set -- --steps 16 --save-every 1 --keep-last 2 -o "$K"
    fi
    $TR "$@" 2>/dev/null &
    pid=$!
    # the random moment counts from when the run has its directory: on a
    # loaded machine start-up alone can take longer than the whole range
    for _ in $(seq 1500); do [ -d "$K" ] || ! kill -0 $pid 2>/dev/null && break; sleep 0.02; done
    sleep "0.$((RANDOM % 6 + 2))$((RANDOM % 10))"
    kill -9 $pid 2>/dev/null && kills=$((kills + 1))
    wait $pid 2>/dev/null
    # temporaries of the previous kill are gone once a run started (and got past loading)
    for s in $stale; do [ -e "$s" ] || cleaned=$((cleaned + 1)); done
    stale=$(ls -d "$K"/.ckpt-*.tmp-* 2>/dev/null)
    [ -n "$stale" ] && mid=$((mid + 1))
    if ls -d "$K"/ckpt-* >/dev/null 2>&1; then
        db-ckpt info "$K" >/dev/null 2>&1 && loadable=$((loadable + 1))
    else
        loadable=$((loadable + 1)) # no checkpoint yet: nothing to load
    fi
done
echo "# $kills of 9 kills landed (the other runs had ended); $mid left a checkpoint temporary behind (killed mid-write); $cleaned temporaries removed by the next start"
check "after every kill the newest complete checkpoint loads" "[ $loadable = 9 ]"
stale=$(ls -d "$K"/.ckpt-*.tmp-* 2>/dev/null)
# (nine kills before any checkpoint, possible on a very slow machine, leave
# nothing to resume: then the run starts over, which is what a user gets)
if db-ckpt info "$K" >/dev/null 2>&1; then set -- --resume "$K"; else rm -rf "$K"; set -- --steps 16 --save-every 1 --keep-last 2 -o "$K"; fi
ok "--resume to the end after the kills" $TR "$@"
check "the next start removed the temporaries" "[ -z \"\$(ls -d '$K'/.ckpt-*.tmp-* 2>/dev/null)\" ]"
check "--keep-last 2 left ckpt-000015 and 16" "[ \"\$(ckpts '$K')\" = 'ckpt-000015 ckpt-000016 ' ]"
check "killed 9 times == straight + extended (bytes)" same "$T/A/ckpt-000016" "$K/ckpt-000016"
# a temporary made by hand is removed too (the loop may not have left one)
mkdir -p "$T/A/.ckpt-000099.tmp-abc123" && touch "$T/A/.ckpt-000099.tmp-abc123/model.safetensors"
$TR --resume "$T/A" --steps 17 --save-every 8 &
pid=$!
early=no
for _ in $(seq 1000); do
    [ -e "$T/A/.ckpt-000099.tmp-abc123" ] || { [ -d "$T/A/ckpt-000017" ] || early=yes; break; }
    sleep 0.01
done
wait $pid
st=$?
check "a start removes a temporary before its first checkpoint" "[ $early = yes ] && [ $st = 0 ] && [ -d '$T/A/ckpt-000017' ]"

# --- 4. SIGINT -------------------------------------------------------------------
interrupt "step 2/6" "$T/sigint.err" db-train --model "$M" --instance "$I" --class "$C" --lr 1e-4 --seed 3 \
    --threads 2 --steps 6 --save-every 0 -o "$T/S"
check "SIGINT: exit 130" "[ $st = 130 ]"
check "a checkpoint at the step it stopped at (${at:-?}), before the end" \
    "[ -n '$at' ] && [ '$at' -lt 6 ] && [ \"\$(ckpts '$T/S')\" = \"ckpt-\$(printf %06d '$at') \" ]"
ok "resume after SIGINT" $TR --resume "$T/S"
check "== straight" same "$T/A/ckpt-000006" "$T/S/ckpt-000006"

# --- 5. --config FILE -------------------------------------------------------------
cat >"$T/cfg.json" <<EOF
{"steps": 6, "lr": 1e-4, "seed": 99, "train_text_encoder": true, "save-every": 6,
 "model": "$M", "instance": "$I", "class": "$C"}
EOF
ok "--config FILE, --seed on the command line over the file's" db-train -q --threads 2 --config "$T/cfg.json" \
    --seed 3 -o "$T/CF"
check "== the same flags (text encoder trained, seed 3)" same "$T/AT/ckpt-000006" "$T/CF/ckpt-000006"
check "the resolved config in RUN_DIR/config.json and the checkpoint's" "$PY - '$T/CF' <<'PYEOF'
import json, sys
for p in (sys.argv[1] + '/config.json', sys.argv[1] + '/ckpt-000006/config.json'):
    c = json.load(open(p))
    assert c['seed'] == 3 and c['lr'] == 1e-4 and c['steps'] == 6 and c['train-text-encoder'] is True, (p, c)
    assert c['save-every'] == 6 and c['batch'] == 1 and 'output' not in c and 'threads' not in c, (p, c)
PYEOF"
echo '{"steps": 6, "learning_rate": 1e-4}' >"$T/bad.json"
fails_with 2 "learning_rate" "an unknown key: exit 2, names it" $TR --config "$T/bad.json" -o "$T/CB"
check "no run directory" "[ ! -e '$T/CB' ]"

# --- 7. --record / --replay -------------------------------------------------------
ok "--record" $TR --steps 3 --record "$T/draws.dbt" -o "$T/R1"
ok "--replay with another seed" $TR --steps 3 --seed 77 --replay "$T/draws.dbt" -o "$T/R2"
check "== the recorded run (bytes)" same "$T/R1/ckpt-000003" "$T/R2/ckpt-000003"
ok "another seed without --replay" $TR --steps 3 --seed 77 -o "$T/R3"
check "the check can fail: another seed differs" "! same '$T/R1/ckpt-000003' '$T/R3/ckpt-000003'"
head -c $(($(stat -c %s "$T/draws.dbt") * 2 / 3)) "$T/draws.dbt" >"$T/cut.dbt"
fails_with 1 "cut.dbt" "a truncated replay file: exit 1, named" $TR --steps 3 --replay "$T/cut.dbt" -o "$T/R4"
check "no checkpoint written" "! ls -d '$T/R4'/ckpt-* 2>/dev/null"
ok "--record without class latents (1 row per micro-batch)" \
    db-train -q --model "$M" --instance "$I" --lr 1e-4 --threads 2 --steps 1 --record "$T/draws1.dbt" -o "$T/R5"
fails_with 1 "draws1.dbt" "a replay file of other shapes: exit 1, named" $TR --steps 3 --replay "$T/draws1.dbt" \
    -o "$T/R6"
check "no checkpoint written" "! ls -d '$T/R6'/ckpt-* 2>/dev/null"

# --- 8. bad input -----------------------------------------------------------------
: >"$T/empty.dbt"
fails_with 1 "empty.dbt" "an empty instance file: exit 1, named" db-train -q --model "$M" --instance "$T/empty.dbt" \
    --class "$C" --steps 2 -o "$T/X1"
check "no run directory" "[ ! -e '$T/X1' ]"
head -c $(($(stat -c %s "$I") / 2)) "$I" >"$T/half.dbt"
fails_with 1 "half.dbt" "a truncated instance file: exit 1, named" db-train -q --model "$M" --instance "$T/half.dbt" \
    --class "$C" --steps 2 -o "$T/X2"
check "no run directory" "[ ! -e '$T/X2' ]"
db-ckpt init --arch tiny --seed 43 "$T/tiny43" >/dev/null
db-prep -q --model "$T/tiny43" --size 128 --caption "a photo of sks dog" "$TOP/tests/data/photos/dog" -o "$T/other.dbt"
fails_with 1 "other.dbt.*another model" "instance latents of another model: exit 1, named" db-train -q --model "$M" \
    --instance "$T/other.dbt" --class "$C" --steps 2 -o "$T/X3"
check "no run directory" "[ ! -e '$T/X3' ]"
cat "$I" "$T/other.dbt" >"$T/mixed.dbt"
fails_with 1 "mixed.dbt.*different models" "one input of streams of two models: exit 1, named" db-train -q \
    --model "$M" --instance "$T/mixed.dbt" --class "$C" --steps 2 -o "$T/X5"
check "no run directory" "[ ! -e '$T/X5' ]"
db-prior -q --model "$M" --prompt "a photo of a dog" -n 2 --steps 2 --width 64 --height 64 -o "$T/class64.dbt"
fails_with 1 "class64.dbt" "class latents of another size: exit 1, named" db-train -q --model "$M" --instance "$I" \
    --class "$T/class64.dbt" --steps 2 -o "$T/X4"
check "no run directory" "[ ! -e '$T/X4' ]"
before=$(ckpts "$T/B")
fails_with 1 "already holds checkpoints" "-o a run with checkpoints, without --resume: exit 1" $TR --steps 6 -o "$T/B"
check "its checkpoints untouched" "[ \"\$(ckpts '$T/B')\" = '$before' ] && same '$T/A/ckpt-000006' '$T/B/ckpt-000006'"

# --- 9. divergence ----------------------------------------------------------------
cat >"$T/finite.py" <<'PYEOF'
import json, struct, sys
import numpy as np
for p in sys.argv[1:]:
    with open(p, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); data = f.read()
    h.pop('__metadata__', None)
    assert h, p
    for k, v in h.items():
        b, e = v['data_offsets']
        assert np.isfinite(np.frombuffer(data[b:e], np.float32)).all(), (p, k)
PYEOF
fails_with 1 "diverged.*last checkpoint is .*N/ckpt-0000" "--lr 1e30: exit 1, diverged, names the last checkpoint" \
    $TR --lr 1e30 --save-every 1 --steps 20 -o "$T/N"
last=$(sed -n 's/.*the last checkpoint is \([^ ]*\).*/\1/p' "$T/.err")
check "the named checkpoint is the newest (${last##*/})" "[ -n '$last' ] && [ \"\$(ls -d '$T/N'/ckpt-* | tail -1)\" = '$last' ]"
ok "it loads (db-ckpt info)" db-ckpt info "$T/N"
ok "its weights and moments are finite" $PY "$T/finite.py" "$last/model.safetensors" "$last/optimizer.safetensors"
# an lr that overflows the weights in one step while the loss was finite
fails_with 1 "diverged" "--lr 1e38: exit 1, diverged" $TR --lr 1e38 --save-every 1 --steps 20 -o "$T/N2"
check "no checkpoint of non-finite weights" "for c in \$(ls -d '$T/N2'/ckpt-* 2>/dev/null); do $PY '$T/finite.py' \$c/model.safetensors || exit 1; done"

# --- 10. --plan against the measured peak ----------------------------------------
plan_vs_peak() { # ARGS...: predicted and measured peak (MiB) within 15 %
    local pred meas
    pred=$($TR --steps 2 --plan "$@" -o "$T/P" | sed -n 's/.*predicted peak *\([0-9.]*\) MiB.*/\1/p')
    rm -rf "$T/P"
    meas=$(db-train --model "$M" --instance "$I" --class "$C" --lr 1e-4 --seed 3 --threads 2 --steps 2 "$@" \
        -o "$T/P" 2>&1 | sed -n 's/.*peak memory \([0-9.]*\) MiB.*/\1/p')
    rm -rf "$T/P"
    echo "# --plan $*: predicted ${pred:-?} MiB, measured ${meas:-?} MiB"
    [ -n "$pred" ] && [ -n "$meas" ] && $PY -c "import sys; p, m = $pred, $meas; sys.exit(abs(p - m) > 0.15 * m)"
}
check "--plan within 15 % of the measured peak" plan_vs_peak
check "--plan --train-text-encoder within 15 %" plan_vs_peak --train-text-encoder
check "--plan --gradient-checkpointing within 15 %" plan_vs_peak --gradient-checkpointing
check "--plan writes nothing" "[ ! -e '$T/P' ]"

# --- 11. the TensorBoard file ------------------------------------------------------
EV=$(ls "$T"/S/events.out.tfevents.* | head -1)
ok "dbtest tfevents reads the SIGINT run's first event file" sh -c "dbtest tfevents '$EV' >'$T/ev.txt'"
EV=$(ls "$T"/AG/events.out.tfevents.*)
ok "dbtest tfevents reads a run's file (CRCs valid)" sh -c "dbtest tfevents '$EV' >'$T/ev.txt'"
check "loss, lr, grad_norm, loss_instance, loss_prior, step_time at every step" "$PY - '$T/ev.txt' 4 <<'PYEOF'
import math, sys
seen = {}
for line in open(sys.argv[1]):
    step, tag, v = line.split()
    assert math.isfinite(float(v)), line
    seen.setdefault(tag, []).append(int(step))
want = list(range(1, int(sys.argv[2]) + 1))
for tag in ('loss', 'lr', 'grad_norm', 'loss_instance', 'loss_prior', 'step_time'):
    assert seen.get(tag) == want, (tag, seen.get(tag))
PYEOF"
cp "$EV" "$T/flip.tfevents"
off=$(($(stat -c %s "$EV") / 2))
b=$(od -An -tu1 -j $off -N1 "$EV" | tr -d ' ')
printf "\\$(printf %03o $((b ^ 1)))" | dd of="$T/flip.tfevents" bs=1 seek=$off conv=notrunc 2>/dev/null
fails_with 1 "flip.tfevents.*CRC" "a flipped byte: exit 1, a CRC error naming the file" dbtest tfevents "$T/flip.tfevents"

# --- 12. db-ckpt on the run ------------------------------------------------------------
ok "db-ckpt info RUN_DIR" sh -c "db-ckpt info '$T/S' >'$T/info.txt'"
check "shows step 6" "grep -q 'step 6' '$T/info.txt'"
ok "db-ckpt export RUN_DIR" db-ckpt export "$T/S" "$T/out.safetensors"
ok "db-ckpt verify of the export" db-ckpt verify -q "$T/out.safetensors"

# --- 13. validation samples ---------------------------------------------------------
ok "--validation-prompt every 2 of 4 steps" $TR --steps 4 --save-every 0 --validation-prompt "a photo of sks dog" \
    --validation-every 2 --validation-steps 4 --validation-images 2 -o "$T/V"
check "samples/step-000002-{0,1}.png and step-000004-{0,1}.png" \
    "[ \"\$(cd '$T/V/samples' && ls | tr '\n' ' ')\" = 'step-000002-0.png step-000002-1.png step-000004-0.png step-000004-1.png ' ]"
check "the images are in TensorBoard too, as 128x128 PNGs" \
    "[ \$(dbtest tfevents '$T'/V/events.out.tfevents.* | grep -c 'validation/[01] image 128x128 png') = 4 ]"
check "validation leaves training untouched: same weights as without it" \
    "$TR --steps 4 --save-every 0 -o '$T/V0' && same '$T/V/ckpt-000004' '$T/V0/ckpt-000004'"
check "trained and untrained samples differ" "! cmp -s '$T/V/samples/step-000002-0.png' '$T/V/samples/step-000004-0.png'"
done_testing
