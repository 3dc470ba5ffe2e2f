#!/usr/bin/env bash
# db-prior over ZeroMQ: 3 producers (shards) -> 1 collector on loopback ipc.
# One producer is killed in its second sample; once no producer is left the
# collector names what is missing and fails (in seconds, not at its timeout);
# rerunning that shard completes the set.
. "$(dirname "$0")/lib.sh"
D=$TOP/tests/data/tiny/diffusers
# --threads 1: three producers share 2 cores; spinning OpenMP teams would
# slow them past the collector's timeout
P="db-prior -q --model $D --prompt a_photo_of_a_dog --width 64 --height 64 --steps 2 --seed 7 -n 6 --threads 1"
EP="ipc://$T/prior.ipc"

same_set() {
    $PY - "$@" <<'PYEOF'
import msgpack, sys
def recs(p):
    d = {}
    for o in msgpack.Unpacker(open(p, 'rb'), raw=False, max_buffer_size=0):
        if 'name' in o:
            i = o['meta']['index']
            assert i not in d, f'index {i} twice'
            d[i] = msgpack.packb(o)
    return d
a, b = recs(sys.argv[1]), recs(sys.argv[2])
assert sorted(a) == list(range(6)) and sorted(b) == sorted(a), (sorted(a), sorted(b))
assert all(a[i] == b[i] for i in a), 'records differ'
PYEOF
}

ok "unsharded reference run" $P -o "$T/all.dbt"

# all three shards live, nobody dies
db-prior collect --from "$EP" -n 6 --shards 3 --timeout 20 -o "$T/live.dbt" 2>"$T/live.err" &
cpid=$!
for s in 0 1 2; do $P --shard $s/3 -o "$EP" 2>"$T/p$s.err" & done
wait $cpid
check "collector gets all 6 and exits 0" "[ $? = 0 ]"
wait
check "collected == unsharded, byte for byte per record" same_set "$T/all.dbt" "$T/live.dbt"
check "the collector's file is a valid stream (C reader)" "test_dbt cat '$T/live.dbt' >/dev/null"

# shard 1/3 (indices 1 and 4) hangs in its second sample (its stream for
# index 4 open: header sent, no trailer) and is killed -9 while the others
# finish.  The collector's --timeout is long: it must notice from the
# disconnects that nobody is left to finish the cut stream, and stop in
# seconds (the grace is the 10 s heartbeat timeout).
EP2="ipc://$T/prior2.ipc"
db-prior collect -v --from "$EP2" -n 6 --shards 3 --timeout 300 -o "$T/part.dbt" 2>"$T/c1.err" &
cpid=$!
(DB_PRIOR_TEST_HANG_AFTER=1 exec $P --shard 1/3 -o "$EP2" 2>"$T/hang.err") &
hpid=$!
for s in 0 2; do $P --shard $s/3 -o "$EP2" 2>"$T/q$s.err" & done
# kill it once the collector holds everything the others and its first sample
# bring, and it has sent the header of its second
for _ in $(seq 300); do
    grep -q '5 of 6 samples' "$T/c1.err" 2>/dev/null && grep -q hanging "$T/hang.err" 2>/dev/null && break
    sleep 0.1
done
check "the hanging producer is mid-sample" "grep -q 'hanging after 1 samples' '$T/hang.err'"
t0=$(date +%s)
{ kill -9 $hpid; wait $hpid; } 2>/dev/null
wait $cpid
crc=$?
elapsed=$(($(date +%s) - t0))
check "collector exits 1 when a producer died" "[ $crc = 1 ]"
check "within seconds of the kill, not at --timeout 300 (took ${elapsed} s)" "[ $elapsed -lt 60 ]"
wait
check "it says every producer left with a stream cut" "grep -q 'every producer disconnected with 1 stream unfinished' '$T/c1.err'"
check "and names the cut stream" "grep -Eq 'cut stream [0-9a-f]{16}: 1 object, no trailer' '$T/c1.err'"
check "it names the missing index" "grep -q 'missing 1 of 6 samples: indices 4\$' '$T/c1.err'"
check "and the shard to rerun" "grep -q 'incomplete shards (rerun them): 1/3\$' '$T/c1.err'"
check "the samples that did arrive are kept" "[ \$(grep -c . <<<\"\$($PY -c \"import msgpack; [print(o['name']) for o in msgpack.Unpacker(open('$T/part.dbt','rb'),raw=False) if 'name' in o]\")\") = 5 ]"

# rerun the shard into the same collector file: the duplicate of index 1 is dropped
db-prior collect --from "$EP2" -n 6 --shards 3 --timeout 20 -o "$T/part.dbt" 2>"$T/c2.err" &
cpid=$!
$P --shard 1/3 -o "$EP2" 2>"$T/rerun.err"
wait $cpid
check "rerunning shard 1/3 completes the set (exit 0)" "[ $? = 0 ]"
check "completed == unsharded (no duplicate, no missing index)" same_set "$T/all.dbt" "$T/part.dbt"

fails_with 2 "ZeroMQ endpoint" "collect from a file: exit 2" db-prior collect --from "$T/all.dbt" -n 6 -o "$T/x.dbt"
fails_with 2 "required" "collect without -n: exit 2" db-prior collect --from "$EP" -o "$T/x.dbt"
check "no output after usage errors" "no_leftovers '$T/x.dbt'"
done_testing
