#!/usr/bin/env bash
# .dbt streams between processes: pipes, cat, ZeroMQ fan-in, the Python
# example printed in man/dbt.5, and the fuzz seeds (good ones read, bad
# ones refused).  test_dbt's helper modes stand in for the tools.
. "$(dirname "$0")/lib.sh"
S=$TOP/tests/data/dbt/sample.dbt
EX=$T/man_example.py

# the example in the man page is the tested one, character for character
sed -n '/^\.SH PYTHON EXAMPLE/,/^\.SH/p' "$TOP/man/dbt.5" |
    sed -n '/^\.EX/,/^\.EE/p' | sed '1d;$d' | sed 's/\\-/-/g; s/^\\&//' >"$EX"
ok "man/dbt.5 PYTHON EXAMPLE == tests/py/dbt_example.py" cmp "$EX" "$TOP/tests/py/dbt_example.py"
ok "man page example writes a stream" $PY "$EX" write "$T/ex.dbt"
ok "C reads it" sh -c "test_dbt cat '$T/ex.dbt' >'$T/ex.c'"
ok "man page example reads it back the same" sh -c "$PY '$EX' read '$T/ex.dbt' | cmp - '$T/ex.c'"

ok "C reads the fixture" sh -c "test_dbt cat '$S' >'$T/one'"
check "50 records" "[ \$(wc -l <'$T/one') = 50 ]"
ok "Python reads the fixture alike" sh -c "$PY '$EX' read '$S' | cmp - '$T/one'"
ok "cat a a | reader -" sh -c "cat '$S' '$S' | test_dbt cat - >'$T/two'"
check "both streams' records" "cat '$T/one' '$T/one' | cmp -s - '$T/two'"
ok "C writer on stdout | Python on stdin" sh -c "test_dbt sample - | $PY '$EX' read /dev/stdin | cmp - '$T/one'"
ok "C writer on stdout | C reader on stdin" sh -c "test_dbt sample - | test_dbt cat - | cmp - '$T/one'"
fails_with 1 'stdin: truncated stream \(4[0-9] records, no trailer\)' "head -c 6000 | reader: truncated" \
    sh -c "head -c 6000 '$S' | test_dbt cat -"
fails_with 1 'garbage after trailer' "a stray newline after the trailer" \
    sh -c "{ cat '$S'; echo; } | test_dbt cat -"
fails_with 1 'x.dbt: .*No such file' "missing file named in the error" test_dbt cat "$T/x.dbt"

# ZeroMQ between processes (ipc in the test's temp dir only)
EP="ipc://$T/one.ipc"
test_dbt cat "$EP" >"$T/z1" 2>"$T/z1.err" &
R=$!
ok "writer process PUSHes over ipc" test_dbt sample "$EP"
check "reader process got the same records" "wait $R && cmp -s '$T/z1' '$T/one'"

EP="ipc://$T/fan.ipc"
test_dbt cat "$EP?streams=3" >"$T/z3" 2>"$T/z3.err" &
R=$!
test_dbt sample "$EP" & P1=$!
test_dbt sample "$EP" & P2=$!
ok "third producer" test_dbt sample "$EP"
check "fan-in: 3 producers, one collector, 150 records" \
    "wait $P1 && wait $P2 && wait $R && [ \$(wc -l <'$T/z3') = 150 ] && sort '$T/z3' | cmp -s - <(cat '$T/one' '$T/one' '$T/one' | sort)"

# fuzz seeds: the good ones read, the broken ones are refused with a reason
C=$TOP/tests/fuzz/corpus/dbt
for f in sample python concat2 concat-empty-first; do
    ok "seed $f.dbt reads" test_dbt cat "$C/$f.dbt"
done
fails_with 1 'ndim 9 exceeds 8' "seed ndim9.dbt refused" test_dbt cat "$C/ndim9.dbt"
fails_with 1 'data is 15 bytes' "seed datalen.dbt refused" test_dbt cat "$C/datalen.dbt"
fails_with 1 'trailer says 2 records' "seed count.dbt refused" test_dbt cat "$C/count.dbt"
fails_with 1 'crc32c mismatch' "seed crc.dbt refused" test_dbt cat "$C/crc.dbt"
fails_with 1 'claims 100000000 entries' "seed huge-array.dbt refused" test_dbt cat "$C/huge-array.dbt"
fails_with 1 'nested deeper than 32' "seed deep.dbt refused" test_dbt cat "$C/deep.dbt"
done_testing
