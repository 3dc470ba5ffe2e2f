#!/usr/bin/env bash
# db-prior on the tiny model: shards equal the unsharded run record for
# record, a killed run resumes to the same set, previews, clean failures.
. "$(dirname "$0")/lib.sh"
D=$TOP/tests/data/tiny/diffusers
P="db-prior -q --model $D --prompt a_photo_of_a_dog --width 64 --height 64 --steps 2 --seed 7 -n 6 --threads 1"

# same_set A B...: the records of file A and of the files B... (together)
# are the same set: same indices, none twice, identical bytes per record.
same_set() {
    $PY - "$@" <<'PYEOF'
import msgpack, sys
def recs(paths):
    d = {}
    for p in paths:
        for o in msgpack.Unpacker(open(p, 'rb'), raw=False, max_buffer_size=0):
            if 'name' not in o:
                continue
            i = o['meta']['index']
            assert i not in d, f'index {i} twice'
            assert o['name'] == f'prior/{i}', o['name']
            d[i] = msgpack.packb(o)  # data, shape, dtype and meta
    return d
a, b = recs(sys.argv[1:2]), recs(sys.argv[2:])
assert sorted(a) == list(range(6)), sorted(a)
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
bad = [i for i in a if a[i] != b[i]]
assert not bad, f'records differ: {bad}'
PYEOF
}

ok "unsharded run of 6" $P -o "$T/all.dbt"
check "6 prior records of f32 [4, 8, 8], header says what made them" "$PY - '$T/all.dbt' <<'PYEOF'
import msgpack, sys
objs = list(msgpack.Unpacker(open(sys.argv[1], 'rb'), raw=False))
heads = [o for o in objs if 'format' in o]
recs = [o for o in objs if 'name' in o]
ends = [o for o in objs if 'end' in o]
assert len(heads) == len(recs) == len(ends) == 6            # one stream per sample
assert all(h['kind'] == 'prior' and h['meta']['scaling_factor'] > 0 and len(h['meta']['model_hash']) == 16 for h in heads)
assert [r['meta']['index'] for r in recs] == list(range(6))
assert all(r['dtype'] == 'f32' and r['shape'] == [4, 8, 8] and len(r['data']) == 4 * 256 for r in recs)
m = recs[3]['meta']
assert m['prompt'] == 'a_photo_of_a_dog' and m['seed'] == 7 and m['steps'] == 2 and m['scheduler'] == 'ddim', m
assert recs[0]['data'] != recs[1]['data']
PYEOF"
for s in 0 1; do ok "shard $s/2" $P --shard $s/2 -o "$T/h$s.dbt"; done
check "2 shards == unsharded, byte for byte per record" same_set "$T/all.dbt" "$T/h0.dbt" "$T/h1.dbt"
for s in 0 1 2; do ok "shard $s/3" $P --shard $s/3 -o "$T/t$s.dbt"; done
check "3 shards == unsharded, byte for byte per record" same_set "$T/all.dbt" "$T/t0.dbt" "$T/t1.dbt" "$T/t2.dbt"
cat "$T/t2.dbt" "$T/t0.dbt" "$T/t1.dbt" >"$T/cat.dbt"
ok "cat of the shards is a valid stream (C reader)" sh -c "test_dbt cat '$T/cat.dbt' >/dev/null"
ok "another seed" $P --seed 8 -o "$T/seed8.dbt"
check "the check can fail: another seed is another set" "! same_set '$T/all.dbt' '$T/seed8.dbt' 2>/dev/null"

# kill -9 mid-run (a test hook stops the run after 2 samples), then a torn
# write at the tail, then rerun: nothing twice, nothing missing
(DB_PRIOR_TEST_HANG_AFTER=2 exec $P -o "$T/r.dbt" 2>"$T/hang.err") &
pid=$!
for _ in $(seq 300); do grep -q hanging "$T/hang.err" 2>/dev/null && break; sleep 0.1; done
{ kill -9 $pid; wait $pid; } 2>/dev/null
check "killed run left 2 samples" "[ \$(grep -c . <<<\"\$($PY -c \"import msgpack,sys; [print(o['name']) for o in msgpack.Unpacker(open('$T/r.dbt','rb'),raw=False) if 'name' in o]\")\") = 2 ]"
head -c 700 "$T/all.dbt" >>"$T/r.dbt"   # a sample torn mid-write
ok "rerun resumes" $P -o "$T/r.dbt"
check "resumed == uninterrupted (no duplicate, no missing index)" same_set "$T/all.dbt" "$T/r.dbt"
ok "resumed file is a valid stream (C reader)" sh -c "test_dbt cat '$T/r.dbt' >/dev/null"
cp "$T/r.dbt" "$T/r2.dbt"
ok "rerun of a complete file" $P -o "$T/r.dbt"
check "adds nothing" "cmp -s '$T/r.dbt' '$T/r2.dbt'"
for _ in $(seq 12); do cat "$T/all.dbt"; done >"$T/big.dbt"
ok "resume a file of 72 samples (each index 12 times)" $P -o "$T/big.dbt"
check "adds nothing to it" "[ \$(stat -c %s '$T/big.dbt') = \$((12 * \$(stat -c %s '$T/all.dbt'))) ]"
fails_with 1 "other settings" "resuming with other settings: exit 1" $P --steps 3 -o "$T/r.dbt"
check "and the file is untouched" "cmp -s '$T/r.dbt' '$T/r2.dbt'"

ok "--png-dir writes previews" $P --shard 1/3 --png-dir "$T/png" -o "$T/p.dbt"
check "PNGs of indices 1 and 4, 64x64" \
    "file '$T/png/prior-000001.png' '$T/png/prior-000004.png' | grep -c 'PNG image data, 64 x 64' | grep -qx 2"
check "and only those" "[ \$(ls '$T/png' | wc -l) = 2 ]"
check "previews do not change the latents" same_set "$T/all.dbt" "$T/p.dbt" "$T/t0.dbt" "$T/t2.dbt"
ok "to stdout" sh -c "$P -o - >'$T/stdout.dbt'"
check "stdout stream == file" "cmp -s '$T/stdout.dbt' '$T/all.dbt'"

fails_with 2 "shard" "bad --shard: exit 2" $P --shard 3/3 -o "$T/x.dbt"
fails_with 2 "shard" "malformed --shard: exit 2" $P --shard 1 -o "$T/x.dbt"
fails_with 2 "required" "missing -n: exit 2" db-prior --model "$D" --prompt x -o "$T/x.dbt"
fails_with 2 "multiples of 8" "bad size: exit 2" $P --width 60 -o "$T/x.dbt"
fails_with 2 "unknown option|unrecognized" "unknown option: exit 2" $P --frobnicate -o "$T/x.dbt"
check "no output after usage errors" "no_leftovers '$T/x.dbt'"
fails_with 1 "nonexistent" "unreadable model: exit 1, named" db-prior --model "$T/nonexistent" --prompt x -n 2 \
    -o "$T/y.dbt"
check "no output after a failed load" "no_leftovers '$T/y.dbt'"
printf 'not a stream' >"$T/junk.dbt"
fails_with 1 "junk.dbt" "an output file that is not a prior stream: exit 1" $P -o "$T/junk.dbt"
check "is left alone" "[ \"\$(cat '$T/junk.dbt')\" = 'not a stream' ]"
cp "$T/all.dbt" "$T/flip.dbt"
printf '\xc1' | dd of="$T/flip.dbt" bs=1 seek=0 conv=notrunc 2>/dev/null   # 0xc1: never valid msgpack
fails_with 1 "flip.dbt: corrupt at offset" "a corrupt (not torn) output file: exit 1, not cut" $P -o "$T/flip.dbt"
check "is left alone" "[ \$(stat -c %s '$T/flip.dbt') = \$(stat -c %s '$T/all.dbt') ]"
# the pipelines that spread shards: GNU parallel (or local jobs) and Slurm arrays
ok "pipelines/prior-parallel.sh -j 3" env DB_PRIOR=db-prior "$TOP/pipelines/prior-parallel.sh" -j 3 "$T/par.dbt" -- \
    -q --model "$D" --prompt a_photo_of_a_dog --width 64 --height 64 --steps 2 --seed 7 -n 6 --threads 1
check "its merged file == unsharded run" same_set "$T/all.dbt" "$T/par.dbt"
ok "pipelines/prior-slurm.sh as array task 1 of 3" env SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=3 \
    SLURM_CPUS_PER_TASK=1 "$TOP/pipelines/prior-slurm.sh" "$T/slurm" -q --model "$D" --prompt a_photo_of_a_dog \
    --width 64 --height 64 --steps 2 --seed 7 -n 6
check "task 1 of 3 made shard 1/3" "cmp -s '$T/slurm.shard-1-of-3.dbt' '$T/t1.dbt'"
ok "--help" sh -c "db-prior --help | grep -q -- --shard"
done_testing
