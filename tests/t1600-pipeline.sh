#!/usr/bin/env bash
# pipelines/dreambooth.mk on the tiny model: every stage's output, nothing
# redone when nothing changed, only the stages after a changed setting redone,
# shards equal to one run, a killed prior shard and an interrupted training
# resumed.
. "$(dirname "$0")/lib.sh"
O=$T/o
MK=(make --no-print-directory -f "$TOP/pipelines/dreambooth.mk" MODEL="$TOP/tests/data/tiny/diffusers"
    PHOTOS="$TOP/tests/data/photos/dog" TOKEN=sks CLASS=dog BIN="$B/bin" SIZE=64 NPRIOR=2 PRIOR_STEPS=2
    PRIOR_SHARDS=1 PRIOR_FLAGS=-v STEPS=4 LR=1e-4 SAVE_EVERY=2 NSAMPLES=2 SAMPLE_STEPS=2 THREADS=2)
stamps() { stat -c '%n %y' "$O/instance.dbt" "$O/class.dbt" "$O/run/.done" "$O/model.safetensors" "$O/samples/grid.png"; }
mtime() { stat -c %y "$O/$1"; }

# a prior shard that hangs after its first sample, killed with make
DB_PRIOR_TEST_HANG_AFTER=1 setsid "${MK[@]}" OUT="$O" >"$T/kill.log" 2>&1 </dev/null &
pid=$!
for _ in $(seq 300); do grep -q 'test hook: hanging' "$T/kill.log" && break; sleep 0.1; done
check "the shard hangs after one sample" "grep -q 'test hook: hanging after 1 samples' '$T/kill.log'"
kill -TERM -- -$pid 2>/dev/null
wait $pid
check "killed: no class.dbt, the shard's partial file kept" "[ ! -e '$O/class.dbt' ] && [ -s '$O/class-0.dbt.work' ]"
ok "the whole pipeline" "${MK[@]}" OUT="$O"
cp "$T/.out" "$T/run1.log"; cat "$T/.err" >>"$T/run1.log"
check "the shard resumed its file" "grep -q 'resuming: 1 of 2 samples already there' '$T/run1.log'"
check "every stage's output" "[ -s '$O/instance.dbt' ] && [ -s '$O/class.dbt' ] && [ -d '$O/run/ckpt-000004' ] &&
    [ -e '$O/run/.done' ] && [ -s '$O/model.safetensors' ] && [ -s '$O/samples/sample-00.png' ] &&
    [ -s '$O/samples/sample-01.png' ] && [ -s '$O/samples/grid.png' ] && [ ! -e '$O/class-0.dbt.work' ]"
check "the grid holds the two samples side by side" "dbtest png-crc '$O/samples/grid.png' | grep -q '^128x64 '"
check "the settings stamps" "grep -q \"^sample: --prompt 'a photo of sks dog' -n 2\" '$O/.sample.args' &&
    grep -q -- '--steps 4 --lr 1e-4' '$O/.train.args'"

stamps >"$T/s0"
ok "make -q: up to date" "${MK[@]}" -q OUT="$O"
ok "a rerun" "${MK[@]}" OUT="$O"
check "does nothing" "grep -q 'Nothing to be done' '$T/.out' && stamps | cmp -s - '$T/s0'"

ok "another sample prompt" "${MK[@]}" OUT="$O" SAMPLE_PROMPT="a photo of sks dog on the moon"
stamps >"$T/s1"
check "reruns only the samples" "diff '$T/s0' '$T/s1' | grep '^>' | grep -q 'samples/grid.png' &&
    [ \$(diff '$T/s0' '$T/s1' | grep -c '^>') = 1 ]"
check "with the new prompt" "grep -a -q 'on the moon' '$O/samples/grid.png'"

ok "more steps" "${MK[@]}" OUT="$O" SAMPLE_PROMPT="a photo of sks dog on the moon" STEPS=6
check "retrains a new run, exports, samples; prep and prior untouched" \
    "[ \"\$(mtime instance.dbt)\" = \"\$(grep instance.dbt '$T/s1' | cut -d' ' -f2-)\" ] &&
     [ \"\$(mtime class.dbt)\" = \"\$(grep class.dbt '$T/s1' | cut -d' ' -f2-)\" ] &&
     [ '$O/run/.done' -nt '$O/class.dbt' ] && [ '$O/model.safetensors' -nt '$O/run/.done' ] &&
     [ '$O/samples/grid.png' -nt '$O/model.safetensors' ] && [ -d '$O/run/ckpt-000006' ] &&
     grep -q 'training 6 steps from step 0' '$T/.err'"

# an interrupted training: the last checkpoint and the stamp are gone
dbtest crc32c "$O/run/ckpt-000006/model.safetensors" >"$T/w6"
rm -rf "$O/run/ckpt-000006" "$O/run/.done"
ok "rerun after an interrupted training" "${MK[@]}" OUT="$O" SAMPLE_PROMPT="a photo of sks dog on the moon" STEPS=6
check "resumes the run from its checkpoint" "grep -q 'db-train --resume' '$T/.out' && grep -q 'resuming .*ckpt-000004 at step 4' '$T/.err'"
check "to the same weights" "[ \"\$(dbtest crc32c '$O/run/ckpt-000006/model.safetensors')\" = \"\$(cat '$T/w6')\" ]"

# two shards hold the records of one run
ok "the prior in two shards" "${MK[@]}" OUT="$T/o2" PRIOR_SHARDS=2 prior
check "same records as one shard" "$PY - '$O/class.dbt' '$T/o2/class.dbt' <<'PYEOF'
import msgpack, sys
def recs(p):
    objs = list(msgpack.Unpacker(open(p, 'rb'), raw=False))
    return sorted((o['name'], bytes(o['data'])) for o in objs if 'name' in o and 'data' in o)
a, b = recs(sys.argv[1]), recs(sys.argv[2])
assert len(a) == 2 and a == b, ([n for n, _ in a], [n for n, _ in b])
PYEOF"
fails_with 2 "TOKEN is not set" "a missing variable is named" make -f "$TOP/pipelines/dreambooth.mk" MODEL=m PHOTOS=p \
    CLASS=dog OUT="$T/o3"
done_testing
