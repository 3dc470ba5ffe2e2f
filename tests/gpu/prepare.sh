#!/usr/bin/env bash
# Get this checkout ready for ONE device call (the `run` tool of a session
# lent a GPU), and put it back afterwards.
#
# Why: a device call sends the checkout's tracked and untracked-not-ignored
# files, at most 64 MiB, and the GPU machine cannot build (no Debian -dev
# packages, no network).  Our tracked tree is ~92 MB, almost all of it the
# diffusers oracle data under tests/data that only the CPU tests read.  So:
#   prepare.sh          builds build/gpu-bundle.tar.xz (tests/gpu/bundle.sh),
#                       takes the oracle data out of the INDEX only (the files
#                       stay on disk; .git/info/exclude ignores them while
#                       out), and prints the size that will travel;
#   prepare.sh restore  puts the index back (git reset of those paths) and
#                       drops the exclude lines.  Always run it after the call:
#                       nothing is committed in between.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIG=(tests/data/tiny tests/data/refs tests/data/sched tests/data/sd15-keys)
EXCL=.git/info/exclude
[ -f .git ] && EXCL="$(git rev-parse --git-path info/exclude)"
mark='# tests/gpu/prepare.sh (remove with: bash tests/gpu/prepare.sh restore)'
if [ "${1:-}" = restore ]; then
    git reset -q -- "${BIG[@]}"
    [ -f "$EXCL" ] && sed -i "\\|^$mark\$|,\$d" "$EXCL"
    git status --short | head
    echo "index restored"
    exit 0
fi
[ -n "$(git status --porcelain --untracked-files=no)" ] && { echo "prepare: commit first (the index must be clean)" >&2; exit 1; }
bash tests/gpu/bundle.sh
git rm -r -q --cached -- "${BIG[@]}"
mkdir -p "$(dirname "$EXCL")"
{ echo "$mark"; for p in "${BIG[@]}"; do echo "/$p/"; done; } >>"$EXCL"
travel=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
bundle=$(stat -c %s build/gpu-bundle.tar.xz)
echo "travels: $((travel >> 20)) MiB tree + $((bundle >> 20)) MiB bundle = $(((travel + bundle) >> 20)) MiB (limit 64)"
echo "now: run with carry [\"build/gpu-bundle.tar.xz\"], command: OUT=\$OUT bash tests/gpu/run.sh"
echo "then: bash tests/gpu/prepare.sh restore"
