# Shared helpers for the shell tests (TAP output for prove).
# Environment: TOP (repo root) and B (build dir) come from `make check`.
set -u
TOP=${TOP:-$(cd "$(dirname "$0")/.." && pwd)}
B=${B:-$TOP/build}
PATH=$B/bin:$B/tests:$PATH
export TOP B PATH
T=$(mktemp -d "${TMPDIR:-/tmp}/dbt-test.XXXXXX")
trap 'rm -rf "$T"' EXIT
_n=0
_fail=0

# ok DESCRIPTION COMMAND...   passes when the command exits 0
ok() {
    local d=$1; shift
    _n=$((_n + 1))
    if "$@" >"$T/.out" 2>"$T/.err"; then
        echo "ok $_n - $d"
    else
        echo "not ok $_n - $d"
        _fail=$((_fail + 1))
        sed 's/^/# /' "$T/.out" "$T/.err" | head -20
    fi
}

# fails_with STATUS PATTERN DESCRIPTION COMMAND...
#   passes when the command exits with STATUS and stderr matches PATTERN (grep -E)
fails_with() {
    local want=$1 pat=$2 d=$3; shift 3
    _n=$((_n + 1))
    "$@" >"$T/.out" 2>"$T/.err"
    local got=$?
    if [ "$got" = "$want" ] && { [ -z "$pat" ] || grep -Eq -- "$pat" "$T/.err"; }; then
        echo "ok $_n - $d"
    else
        echo "not ok $_n - $d (exit $got, want $want; stderr must match /$pat/)"
        _fail=$((_fail + 1))
        sed 's/^/# /' "$T/.err" | head -10
    fi
}

# check DESCRIPTION TEST-EXPRESSION...  (a shell condition, evaluated)
check() {
    local d=$1; shift
    _n=$((_n + 1))
    if eval "$@"; then
        echo "ok $_n - $d"
    else
        echo "not ok $_n - $d"
        echo "#   failed: $*"
        _fail=$((_fail + 1))
    fi
}

# no temporary or final output left behind for PATH
no_leftovers() {
    local p=$1 dir base
    dir=$(dirname "$p"); base=$(basename "$p")
    [ ! -e "$p" ] && ! ls -a "$dir" | grep -q "^\.$base\.tmp-"
}

done_testing() {
    echo "1..$_n"
    [ "$_fail" = 0 ]
}

PY=/usr/bin/python3

# interrupt PATTERN ERRFILE COMMAND...: run COMMAND in the background with
# stderr to ERRFILE, send SIGINT once ERRFILE matches PATTERN (grep; 30 s at
# most), wait; sets st to its exit status and at to the step it says it
# stopped after (db-train's "stopped by signal 2 after step N"; empty if none)
interrupt() {
    local pat=$1 errf=$2 pid
    shift 2
    "$@" 2>"$errf" &
    pid=$!
    for _ in $(seq 1500); do grep -q "$pat" "$errf" 2>/dev/null && break; sleep 0.02; done
    kill -INT $pid
    wait $pid
    st=$?
    at=$(sed -n 's/.*stopped by signal 2 after step \([0-9]*\).*/\1/p' "$errf")
}

# train_fixtures: the tiny model (seed 42) in $T/tiny, the dog photos through
# db-prep as $T/instance.dbt (16x16 latents) and 4 db-prior class samples as
# $T/class.dbt; sets M, I and C.  Bails out of the test when one fails.
train_fixtures() {
    M=$T/tiny
    I=$T/instance.dbt
    C=$T/class.dbt
    db-ckpt init --arch tiny --seed 42 "$M" >/dev/null &&
        db-prep -q --model "$M" --size 128 --caption "a photo of sks dog" "$TOP/tests/data/photos/dog" -o "$I" &&
        db-prior -q --model "$M" --prompt "a photo of a dog" -n 4 --steps 5 --width 128 --height 128 -o "$C" ||
        { echo "Bail out! fixtures"; exit 1; }
}
