/* libFuzzer target: the CLIP tokenizer (text clean-up, pre-tokenizer, BPE)
 * on arbitrary bytes.
 *
 * Invalid UTF-8 must be refused (transformers takes a Python str, so such
 * input has no reference behaviour); anything valid must give BOS, ids in
 * the vocabulary, EOS, padding -- the same ids twice (the second time from
 * the BPE cache) and the same prefix as the untruncated db_tokenize_words.
 *
 * The vocabulary is loaded once: $TOP/data/clip/sd-tokenizer, else
 * data/clip/sd-tokenizer under the working directory (make fuzz runs from
 * the repository root), else beside the binary (build/fuzz/../../data).
 * Inputs are cut to 4 KiB: ftfy's fix-until-stable loop is quadratic on
 * inputs such as "&amp;amp;amp;..." (one level per round), in Python too. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "libcommon/sd/textfix.h"
#include "libcommon/sd/tokenizer.h"

#define FUZZ_MAX_INPUT 4096

static db_tokenizer *tok;
static db_tokenizer_info info;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char dirs[3][PATH_MAX + 64];
    const char *top = getenv("TOP");
    snprintf(dirs[0], sizeof dirs[0], "%s/data/clip/sd-tokenizer", top ? top : ".");
    snprintf(dirs[1], sizeof dirs[1], "data/clip/sd-tokenizer");
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = 0;
    snprintf(dirs[2], sizeof dirs[2], "%s/../../data/clip/sd-tokenizer", exe);
    db_err e = {0};
    for (int i = 0; i < 3 && !tok; i++)
        db_tokenizer_load(&tok, dirs[i], &e);
    if (!tok) {
        fprintf(stderr, "fuzz_tokenizer: cannot load the CLIP vocabulary (set TOP): %s\n", e.msg);
        exit(1);
    }
    db_tokenizer_get_info(tok, &info);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char text[FUZZ_MAX_INPUT + 1];
    size_t len = size < FUZZ_MAX_INPUT ? size : FUZZ_MAX_INPUT;
    memcpy(text, data, len);
    text[len] = 0;
    len = strlen(text); /* a C string ends at the first NUL */

    db_text t = {0};
    size_t bad;
    int valid = db_utf8_decode(&t, text, len, &bad) == 0;
    db_text_free(&t);

    int32_t ids[DB_CLIP_MAX_LENGTH], again[DB_CLIP_MAX_LENGTH];
    int n_real = 0, n2 = 0;
    db_err e = {0};
    int rc = db_tokenize(tok, text, DB_CLIP_MAX_LENGTH, ids, &n_real, &e);
    if (!valid) {
        if (rc == 0 || !strstr(e.msg, "invalid UTF-8"))
            __builtin_trap(); /* invalid UTF-8 must be refused, and said so */
        return 0;
    }
    if (rc)
        __builtin_trap(); /* valid text never fails (short of memory) */
    if (n_real < 2 || n_real > DB_CLIP_MAX_LENGTH || ids[0] != info.bos || ids[n_real - 1] != info.eos)
        __builtin_trap();
    for (int i = 1; i < n_real - 1; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= info.vocab_size)
            __builtin_trap();
    for (int i = n_real; i < DB_CLIP_MAX_LENGTH; i++)
        if (ids[i] != info.pad)
            __builtin_trap();

    if (db_tokenize(tok, text, DB_CLIP_MAX_LENGTH, again, &n2, &e) || n2 != n_real ||
        memcmp(ids, again, sizeof ids))
        __builtin_trap(); /* the BPE cache changes nothing */

    int32_t *raw = NULL;
    size_t n = 0;
    if (db_tokenize_words(tok, text, &raw, &n, &e))
        __builtin_trap();
    size_t keep = n < DB_CLIP_MAX_LENGTH - 2 ? n : DB_CLIP_MAX_LENGTH - 2;
    if ((size_t)n_real != keep + 2 || (keep && memcmp(raw, ids + 1, keep * sizeof *raw)))
        __builtin_trap();
    free(raw);
    return 0;
}
