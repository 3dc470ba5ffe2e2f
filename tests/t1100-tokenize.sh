#!/usr/bin/env bash
# db-ckpt tokenize: transformers' CLIPTokenizer ids (tests/data/tokenizer/
# tokenizer.json) from a diffusers folder's tokenizer/, from the .ckpt (no
# tokenizer inside: the built-in vocabulary), and from a tokenizer folder;
# bad input refused cleanly.
. "$(dirname "$0")/lib.sh"
TINY=$TOP/tests/data/tiny
D=$TINY/diffusers
C=$TINY/tiny.ckpt
REF=$TOP/tests/data/tokenizer/tokenizer.json

# expected NAME INDEX: the reference input_ids of prompt INDEX into $T/NAME
expected() {
    $PY - "$REF" "$2" > "$T/$1" <<'PYEOF'
import json, sys
p = json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]
print(" ".join(map(str, p["input_ids"])))
PYEOF
}
# prompt INDEX: the reference prompt's text
prompt() {
    $PY -c 'import json, sys; sys.stdout.write(json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]["prompt"])' "$REF" "$1"
}

# a plain prompt, curly quotes (ftfy), mojibake (ftfy), a 76-word prompt (truncated)
for i in 0 34 37 55; do expected "e$i" "$i"; done
cat "$T/e0" "$T/e34" "$T/e37" "$T/e55" > "$T/want"
P0=$(prompt 0) P34=$(prompt 34) P37=$(prompt 37) P55=$(prompt 55)

ok "tokenize on the diffusers folder" sh -c 'db-ckpt tokenize "$0" "$1" "$2" "$3" "$4" > "$5"' \
    "$D" "$P0" "$P34" "$P37" "$P55" "$T/d.out"
check "diffusers: one line of 77 ids per prompt, equal to transformers'" "cmp -s '$T/d.out' '$T/want'"
ok "tokenize on the .ckpt (built-in vocabulary)" sh -c 'db-ckpt tokenize "$0" "$1" "$2" "$3" "$4" > "$5"' \
    "$C" "$P0" "$P34" "$P37" "$P55" "$T/c.out"
check ".ckpt: the same ids" "cmp -s '$T/c.out' '$T/want'"
check "77 ids per line" "awk 'NF != 77 { exit 1 }' '$T/c.out'"
ok "tokenize on a tokenizer folder itself" sh -c 'db-ckpt tokenize "$0" "$1" > "$2"' "$D/tokenizer" "$P0" "$T/t.out"
check "tokenizer folder: the same ids" "cmp -s '$T/t.out' '$T/e0'"
ok "prompts from standard input (-)" sh -c 'printf "%s\n%s\n" "$1" "$2" | db-ckpt tokenize "$0" - > "$3"' \
    "$D" "$P0" "$P34" "$T/s.out"
check "stdin: the same ids" "cat '$T/e0' '$T/e34' | cmp -s - '$T/s.out'"
ok "--length 8" sh -c 'db-ckpt tokenize --length 8 "$0" "a photo of sks dog in the snow" > "$1"' "$D" "$T/l.out"
check "--length 8: BOS, 6 ids, EOS" "[ \"\$(cat '$T/l.out')\" = '49406 320 1125 539 48136 1929 530 49407' ]"
ok "empty prompt" sh -c 'db-ckpt tokenize "$0" "" > "$1"' "$D" "$T/empty.out"
check "empty prompt: BOS EOS then padding" \
    "[ \"\$(cut -d' ' -f1-3 '$T/empty.out')\" = '49406 49407 49407' ] && awk 'NF != 77 { exit 1 }' '$T/empty.out'"

fails_with 2 "usage" "no prompt: usage error" db-ckpt tokenize "$D"
fails_with 2 "--length" "--length 1 refused" db-ckpt tokenize --length 1 "$D" dog
fails_with 1 "no-such-model" "missing model" db-ckpt tokenize "$T/no-such-model" dog
fails_with 1 "invalid UTF-8 at byte 4" "invalid UTF-8 in a prompt" db-ckpt tokenize "$D" "$(printf 'dog \377')"
mkdir -p "$T/badtok"
cp "$D/tokenizer/vocab.json" "$T/badtok/"
printf 'a b\n' > "$T/badtok/merges.txt"
fails_with 1 "badtok/merges.txt: line 1" "a tokenizer folder with a broken merges.txt" db-ckpt tokenize "$T/badtok" dog
mkdir -p "$T/notok"
cp -r "$D"/* "$T/notok/"
rm "$T/notok/tokenizer/vocab.json"
fails_with 1 "notok/tokenizer/vocab.json: missing" "a diffusers tokenizer/ without vocab.json" \
    db-ckpt tokenize "$T/notok" dog
done_testing
