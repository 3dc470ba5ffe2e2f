#!/usr/bin/env bash
# Class-prior samples in N shards run side by side, merged into one file.
#
#   pipelines/prior-parallel.sh -j N OUT.dbt -- DB-PRIOR-OPTIONS...
#   pipelines/prior-parallel.sh -j 3 class.dbt -- --model sd15 --prompt "a photo of a dog" -n 200
#
# Shard I writes OUT.shard-I-of-N.dbt (db-prior --shard I/N); when every shard
# is done they are concatenated into OUT (written to a temporary, then renamed).
# With GNU parallel installed the shards run through it, on the hosts named in
# $SSHLOGIN (parallel's --sshlogin syntax; default ":" = this machine; remote
# hosts need db-prior on their PATH and this directory on a shared file
# system); without it they run here as background jobs.  Rerunning after a
# failure or a kill resumes every shard where it stopped (db-prior's resume).
set -euo pipefail
usage() { echo "usage: $0 -j SHARDS OUT.dbt -- DB-PRIOR-OPTIONS..." >&2; exit 2; }
if [ $# -lt 4 ] || [ "$1" != -j ] || [ "$4" != -- ]; then usage; fi
N=$2 OUT=$3
shift 4
case $N in '' | *[!0-9]* | 0*) usage ;; esac
PRIOR=${DB_PRIOR:-db-prior}
# One shell-quoted command per shard, so options with spaces survive the
# trip through parallel (and ssh) or eval.
args=$(printf ' %q' "$PRIOR" "$@")
shard_cmds() { for ((i = 0; i < N; i++)); do printf '%s --shard %d/%d -o %q\n' "$args" $i "$N" "$OUT.shard-$i-of-$N.dbt"; done; }
if command -v parallel >/dev/null 2>&1; then
    shard_cmds | parallel --halt now,fail=1 --sshlogin "${SSHLOGIN:-:}" -j "$N" --line-buffer
else
    pids=()
    while IFS= read -r cmd; do eval "$cmd" & pids+=($!); done < <(shard_cmds)
    failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    [ $failed = 0 ] || { echo "$0: a shard failed; rerun to resume" >&2; exit 1; }
fi
tmp=$(dirname "$OUT")/.$(basename "$OUT").tmp-$$
trap 'rm -f "$tmp"' EXIT
for ((i = 0; i < N; i++)); do cat "$OUT.shard-$i-of-$N.dbt"; done >"$tmp"
sync "$tmp" 2>/dev/null || true
mv "$tmp" "$OUT"
