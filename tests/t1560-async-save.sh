#!/usr/bin/env bash
# db-train --async-save (train_ckpt.h: db_ckpt_writer): checkpoints written
# by a background thread from a host copy while training goes on.  The
# checkpoints are byte-identical to synchronous ones (AdamW and adamw8bit;
# and on --device cpu-strict, where auto means on and the copy comes off
# the "device"); --keep-last is applied as each write completes; SIGINT
# ends with the signal's checkpoint complete (exit 130); kill -9 during a
# run leaves a resumable directory; a bad value is a usage error.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
train_fixtures

TR="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 2 --train-text-encoder"
same() { for f in model.safetensors optimizer.safetensors state.json config.json; do cmp -s "$1/$f" "$2/$f" || return 1; done; }
same_w() { cmp -s "$1/model.safetensors" "$2/model.safetensors" && cmp -s "$1/optimizer.safetensors" "$2/optimizer.safetensors"; }
ckpts() { (cd "$1" && ls -d ckpt-* 2>/dev/null | tr '\n' ' '); }

# --- 1. the same bytes as a synchronous write ---------------------------------------
ok "sync: 4 steps, a checkpoint every 2" $TR --steps 4 --save-every 2 --async-save off -o "$T/S"
ok "async: the same run" $TR --steps 4 --save-every 2 --async-save on -o "$T/A"
check "every file of both checkpoints byte-identical" \
    "same '$T/S/ckpt-000002' '$T/A/ckpt-000002' && same '$T/S/ckpt-000004' '$T/A/ckpt-000004'"
check "the check can fail: step 2 != step 4" "! same '$T/A/ckpt-000002' '$T/A/ckpt-000004'"
check "--async-save is not part of the run's configuration" "! grep -q async '$T/A/config.json'"
ok "sync, adamw8bit" $TR --steps 2 --optimizer adamw8bit --async-save off -o "$T/S8"
ok "async, adamw8bit" $TR --steps 2 --optimizer adamw8bit --async-save on -o "$T/A8"
check "adamw8bit: byte-identical (8-bit codes, scales, small moments)" same "$T/S8/ckpt-000002" "$T/A8/ckpt-000002"
ok "--device cpu-strict (auto: async, the copy off the device)" $TR --steps 2 --device cpu-strict -o "$T/D"
check "cpu-strict async == cpu sync (model and optimizer bytes)" "same_w '$T/S/ckpt-000002' '$T/D/ckpt-000002'"
ok "async with --keep-last 1: 6 steps, a checkpoint every 2" \
    $TR --steps 6 --save-every 2 --keep-last 1 --async-save on -o "$T/K"
check "only the newest is kept" "[ \"\$(ckpts '$T/K')\" = 'ckpt-000006 ' ]"
check "no temporary left" "! ls -a '$T/K' | grep -q tmp"

# --- 2. signals ------------------------------------------------------------------------
interrupt "step 2/40" "$T/sigint.err" db-train --model "$M" --instance "$I" --class "$C" --lr 1e-4 --seed 3 \
    --threads 2 --train-text-encoder --steps 40 --save-every 0 --async-save on -o "$T/I"
check "SIGINT: exit 130" "[ $st = 130 ]"
[ "$st" = 130 ] || sed 's/^/# /' "$T/sigint.err" | grep -v "step [0-9]*/40" | tail -5
check "the signal's checkpoint (step ${at:-?}) is complete" \
    "[ -n '$at' ] && [ -f \"$T/I/ckpt-\$(printf %06d '$at')/state.json\" ] && ! ls -a '$T/I' | grep -q tmp"
$TR --steps 6 --save-every 1 --async-save on -o "$T/X" 2>/dev/null &
pid=$!
for _ in $(seq 1500); do [ -d "$T/X/ckpt-000003" ] && break; sleep 0.01; done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
ok "kill -9 during an async run, then --resume" $TR --resume "$T/X"
ok "the straight run" $TR --steps 6 --save-every 6 --async-save off -o "$T/Y"
check "resumed == straight (model and optimizer bytes)" same_w "$T/X/ckpt-000006" "$T/Y/ckpt-000006"

# --- 3. --plan counts the host copy -------------------------------------------------------
async_plan() {
    local pred meas plain
    pred=$($TR --steps 2 --plan --async-save on -o "$T/P" | sed -n 's/.*predicted peak *\([0-9.]*\) MiB.*/\1/p')
    plain=$($TR --steps 2 --plan -o "$T/P" | sed -n 's/.*predicted peak *\([0-9.]*\) MiB.*/\1/p')
    meas=$(db-train --model "$M" --instance "$I" --class "$C" --lr 1e-4 --seed 3 --threads 2 --train-text-encoder \
        --steps 2 --async-save on -o "$T/P" 2>&1 | sed -n 's/.*peak memory \([0-9.]*\) MiB.*/\1/p')
    rm -rf "$T/P"
    echo "# --plan --async-save on: predicted ${pred:-?} MiB (sync ${plain:-?}), measured ${meas:-?} MiB"
    [ -n "$pred" ] && [ -n "$meas" ] && [ -n "$plain" ] &&
        $PY -c "import sys; p, m, q = $pred, $meas, $plain; sys.exit(abs(p - m) > 0.15 * m or not p > q)"
}
check "--plan --async-save on: the checkpoint copy counted, within 15 % of the measured peak" async_plan

# --- 4. usage ----------------------------------------------------------------------------
fails_with 2 "async-save" "--async-save maybe: exit 2" $TR --steps 1 --async-save maybe -o "$T/U"
check "nothing left behind" "[ ! -e '$T/U' ]"
done_testing
