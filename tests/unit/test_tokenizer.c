/* CLIP tokenizer against transformers' ids.
 *
 *   tests/data/tokenizer/tokenizer.json  the tiny-dev reference: 60 prompts,
 *       input_ids of transformers' CLIPTokenizer with ftfy 6.1.1, and the raw
 *       ids without ftfy where they differ
 *   tests/data/tokenizer/extra.json      200 more prompts (edge cases of the
 *       special-token split, the regex, ftfy's fixers; random mixtures)
 *
 * plus loading from both vocabulary locations, lookups, truncation, empty
 * prompts, invalid UTF-8, malformed vocabulary files, custom special and
 * added tokens, and a few threads sharing one tokenizer. */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "libcommon/sd/tokenizer.h"
#include "tap.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int ids_equal(const int32_t *a, const json_t *b, size_t n)
{
    if (json_array_size(b) != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (a[i] != json_integer_value(json_array_get(b, i)))
            return 0;
    return 1;
}

static void diag_ids(const char *label, const int32_t *a, size_t n)
{
    char buf[2048];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 16 < sizeof buf; i++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, " %d", (int)a[i]);
    tap_diag("%s:%s", label, buf);
}

/* The prompt on one line, for diagnostics: control characters escaped. */
static const char *esc(const char *s)
{
    static char buf[512];
    size_t o = 0;
    for (; *s && o + 8 < sizeof buf; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7F)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "\\x%02x", c);
        else
            buf[o++] = (char)c;
    }
    buf[o] = 0;
    return buf;
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* A tokenizer folder of its own under the test's temporary directory. */
static const char *make_dir(const char *name, const char *vocab, const char *merges)
{
    static char dirs[16][4096];
    static int k;
    char *d = dirs[k++ % 16];
    snprintf(d, 4096, "%s/%s", tap_tmpdir(), name);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", d);
    if (system(cmd))
        return d;
    if (vocab)
        write_file(d, "vocab.json", vocab);
    if (merges)
        write_file(d, "merges.txt", merges);
    return d;
}

static const char *small_vocab = "{\"a\": 0, \"b\": 1, \"a</w>\": 2, \"b</w>\": 3, \"ab\": 4, \"ab</w>\": 5, "
                                 "\"!</w>\": 6, \"!\": 7, \"<|startoftext|>\": 8, \"<|endoftext|>\": 9}";
static const char *small_merges = "#version: 0.2\na b\na b</w>\n";

/* Load must fail and the message must contain want. */
static void refused(const char *dir, const char *want, const char *what)
{
    db_tokenizer *t = NULL;
    db_err e = {0};
    int rc = db_tokenizer_load(&t, dir, &e);
    tap_ok(rc == -1 && !t && strstr(e.msg, want), "refuses %s (%s)", what, e.msg);
    db_tokenizer_free(t);
}

typedef struct thread_job {
    const db_tokenizer *tok;
    json_t *prompts;
    int bad;
} thread_job;

static void *thread_run(void *arg)
{
    thread_job *j = arg;
    for (int rep = 0; rep < 5; rep++)
        for (size_t i = 0; i < json_array_size(j->prompts); i++) {
            json_t *p = json_array_get(j->prompts, i);
            int32_t ids[DB_CLIP_MAX_LENGTH];
            db_err e = {0};
            if (db_tokenize(j->tok, json_string_value(json_object_get(p, "prompt")), DB_CLIP_MAX_LENGTH, ids,
                            NULL, &e) ||
                !ids_equal(ids, json_object_get(p, "input_ids"), DB_CLIP_MAX_LENGTH))
                j->bad++;
        }
    return NULL;
}

int main(void)
{
    db_err e = {0};
    db_tokenizer *tok = NULL, *tok2 = NULL;
    double t0 = now();
    int rc = db_tokenizer_load(&tok, tap_path("tests/data/tiny/diffusers/tokenizer"), &e);
    double t_load = now() - t0;
    if (!tap_ok(rc == 0, "load tests/data/tiny/diffusers/tokenizer (%.0f ms)", t_load * 1e3)) {
        tap_diag("%s", e.msg);
        return tap_done();
    }
    tap_ok(t_load < 2.0, "loading the 49408-entry vocabulary is fast (%.0f ms)", t_load * 1e3);
    db_tokenizer_info info;
    db_tokenizer_get_info(tok, &info);
    tap_ok(info.bos == 49406 && info.eos == 49407 && info.pad == 49407 && info.unk == 49407,
           "special ids BOS 49406, EOS/pad/unk 49407 (got %d %d %d %d)", info.bos, info.eos, info.pad, info.unk);
    tap_ok(info.vocab_size == 49408 && info.n_merges == 48894, "49408 tokens, 48894 merges (got %zu, %zu)",
           info.vocab_size, info.n_merges);

    /* the built-in vocabulary: data/clip/sd-tokenizer, found through db_data_dir */
    rc = db_tokenizer_load_default(&tok2, NULL, tap_path("data"), &e);
    tap_ok(rc == 0, "load the built-in vocabulary (data/clip/sd-tokenizer) %s", rc ? e.msg : "");
    db_tokenizer *t3 = NULL;
    rc = db_tokenizer_load_default(&t3, NULL, "/nonexistent", &e);
    tap_ok(rc == -1 && strstr(e.msg, "built-in CLIP vocabulary") && strstr(e.msg, "vocab.json"),
           "a missing built-in vocabulary is a clear error (%s)", e.msg);

    /* --- the tiny-dev reference: every prompt's ids exact ----------------- */
    json_error_t je;
    json_t *ref = json_load_file(tap_path("tests/data/tokenizer/tokenizer.json"), 0, &je);
    if (!tap_ok(ref != NULL, "read tests/data/tokenizer/tokenizer.json"))
        return tap_done();
    json_t *prompts = json_object_get(ref, "prompts");
    int bad_ids = 0, bad_raw = 0, bad_builtin = 0, n_noftfy = 0, noftfy_same = 0;
    for (size_t i = 0; i < json_array_size(prompts); i++) {
        json_t *p = json_array_get(prompts, i);
        const char *text = json_string_value(json_object_get(p, "prompt"));
        int32_t ids[DB_CLIP_MAX_LENGTH], ids2[DB_CLIP_MAX_LENGTH];
        int n_real = 0;
        if (db_tokenize(tok, text, DB_CLIP_MAX_LENGTH, ids, &n_real, &e) ||
            !ids_equal(ids, json_object_get(p, "input_ids"), DB_CLIP_MAX_LENGTH)) {
            bad_ids++;
            tap_diag("prompt %zu differs: %s", i, esc(text));
            diag_ids("  got", ids, DB_CLIP_MAX_LENGTH);
        }
        int32_t *raw;
        size_t n;
        if (db_tokenize_words(tok, text, &raw, &n, &e) || !ids_equal(raw, json_object_get(p, "raw_ids"), n) ||
            n_real != (int)(n < 75 ? n : 75) + 2) {
            bad_raw++;
            tap_diag("prompt %zu raw ids differ: %s", i, esc(text));
        }
        if (json_is_true(json_object_get(p, "without_ftfy_differs"))) {
            /* the ids only ftfy's fixes give: ours must be those, not the raw ones */
            n_noftfy++;
            noftfy_same += ids_equal(raw, json_object_get(p, "raw_ids_without_ftfy"), n);
            tap_diag("needs ftfy: %s", esc(text));
        }
        free(raw);
        if (db_tokenize(tok2, text, DB_CLIP_MAX_LENGTH, ids2, NULL, &e) ||
            memcmp(ids, ids2, sizeof ids))
            bad_builtin++;
    }
    tap_ok(json_array_size(prompts) == 60 && bad_ids == 0, "all %zu reference prompts: input_ids exact (%d differ)",
           json_array_size(prompts), bad_ids);
    tap_ok(bad_raw == 0, "raw ids (no BOS/EOS/padding) and n_real exact (%d differ)", bad_raw);
    tap_ok(bad_builtin == 0, "the built-in vocabulary gives the same ids (%d differ)", bad_builtin);
    tap_ok(n_noftfy == 6 && noftfy_same == 0,
           "the %d prompts whose ids need ftfy (curly quotes, ligature + full width, mojibake, control "
           "characters and CRLF, full-width + ideographic space, NFC) get the ftfy ids",
           n_noftfy);

    /* --- edge cases and random mixtures ------------------------------------ */
    json_t *extra = json_load_file(tap_path("tests/data/tokenizer/extra.json"), 0, &je);
    json_t *xp = json_object_get(extra, "prompts");
    int bad_extra = 0;
    for (size_t i = 0; i < json_array_size(xp); i++) {
        json_t *p = json_array_get(xp, i);
        const char *text = json_string_value(json_object_get(p, "prompt"));
        int32_t *raw = NULL;
        size_t n = 0;
        if (db_tokenize_words(tok, text, &raw, &n, &e) || !ids_equal(raw, json_object_get(p, "raw_ids"), n)) {
            if (bad_extra++ < 5) {
                tap_diag("extra prompt %zu differs: %s", i, esc(text));
                diag_ids("  got", raw, n);
            }
        }
        free(raw);
    }
    tap_ok(extra && json_array_size(xp) == 200 && bad_extra == 0, "%zu edge-case prompts exact (%d differ)",
           json_array_size(xp), bad_extra);
    json_decref(extra);

    /* --- lookups ----------------------------------------------------------- */
    tap_ok(db_tokenizer_id(tok, "sks</w>") == 48136 && db_tokenizer_id(tok, "<|startoftext|>") == 49406 &&
               db_tokenizer_id(tok, "no such token") == -1,
           "db_tokenizer_id: sks</w> 48136, <|startoftext|> 49406, unknown -1");
    const char *s48136 = db_tokenizer_token(tok, 48136), *s49407 = db_tokenizer_token(tok, 49407);
    tap_ok(s48136 && !strcmp(s48136, "sks</w>") && s49407 && !strcmp(s49407, "<|endoftext|>") &&
               !db_tokenizer_token(tok, -1) && !db_tokenizer_token(tok, 49408),
           "db_tokenizer_token: 48136 sks</w>, 49407 <|endoftext|>, out of range NULL");

    /* --- lengths ----------------------------------------------------------- */
    int32_t ids[DB_CLIP_MAX_LENGTH];
    int n_real = -1;
    rc = db_tokenize(tok, "", DB_CLIP_MAX_LENGTH, ids, &n_real, &e);
    int pad_ok = 1;
    for (int i = 2; i < DB_CLIP_MAX_LENGTH; i++)
        pad_ok &= ids[i] == 49407;
    tap_ok(rc == 0 && ids[0] == 49406 && ids[1] == 49407 && pad_ok && n_real == 2, "empty prompt: BOS EOS pad...");
    rc = db_tokenize(tok, " \t\n ", DB_CLIP_MAX_LENGTH, ids, &n_real, &e);
    tap_ok(rc == 0 && ids[1] == 49407 && n_real == 2, "whitespace-only prompt: BOS EOS pad...");
    char longp[2000] = "";
    for (int i = 0; i < 100; i++)
        strcat(longp, "dog ");
    rc = db_tokenize(tok, longp, DB_CLIP_MAX_LENGTH, ids, &n_real, &e);
    int body_ok = 1;
    for (int i = 1; i < 76; i++)
        body_ok &= ids[i] == 1929;
    tap_ok(rc == 0 && ids[0] == 49406 && body_ok && ids[76] == 49407 && n_real == 77,
           "100-word prompt: truncated to 75 words, EOS last");
    int32_t ten[10];
    rc = db_tokenize(tok, "a photo of sks dog in the snow", 10, ten, &n_real, &e);
    int32_t want10[10] = {49406, 320, 1125, 539, 48136, 1929, 530, 518, 2583, 49407};
    tap_ok(rc == 0 && !memcmp(ten, want10, sizeof want10) && n_real == 10,
           "max_len 10: BOS, the 8 ids, EOS (nothing to pad)");
    rc = db_tokenize(tok, "dog", 1, ten, &n_real, &e);
    tap_ok(rc == -1 && e.code == DB_EUSAGE, "max_len 1 refused (%s)", e.msg);
    int32_t *raw;
    size_t n;
    rc = db_tokenize_words(tok, longp, &raw, &n, &e);
    tap_ok(rc == 0 && n == 100, "db_tokenize_words does not truncate (%zu ids)", n);
    free(raw);

    /* --- invalid UTF-8 ------------------------------------------------------ */
    static const char *const invalid[] = {"dog \xff", "caf\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                          "a\x80"};
    int refused_all = 1;
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++) {
        rc = db_tokenize(tok, invalid[i], DB_CLIP_MAX_LENGTH, ids, NULL, &e);
        refused_all &= rc == -1 && strstr(e.msg, "invalid UTF-8") != NULL;
    }
    tap_ok(refused_all, "invalid UTF-8 (stray, truncated, overlong, surrogate, > U+10FFFF) refused (%s)", e.msg);

    /* --- malformed files ---------------------------------------------------- */
    refused(make_dir("none", NULL, NULL), "vocab.json: missing", "a folder without vocab.json");
    refused(make_dir("nomerges", small_vocab, NULL), "merges.txt: missing", "a folder without merges.txt");
    refused(make_dir("badjson", "{\"a\": 0,", small_merges), "vocab.json: line", "vocab.json that is not JSON");
    refused(make_dir("array", "[1, 2]", small_merges), "not a JSON object", "vocab.json that is an array");
    refused(make_dir("strid", "{\"a\": \"0\"}", small_merges), "'a': id is not an integer",
            "a non-integer id");
    refused(make_dir("negid", "{\"a\": -1}", small_merges), "'a': id is not an integer", "a negative id");
    refused(make_dir("dupid", "{\"a\": 0, \"b\": 0, \"<|startoftext|>\": 1, \"<|endoftext|>\": 2}", small_merges),
            "both have id 0", "two tokens with one id");
    refused(make_dir("dupkey", "{\"a\": 0, \"a\": 1}", small_merges), "vocab.json: line", "a duplicate key");
    refused(make_dir("nohdr", small_vocab, "a b\n"), "merges.txt: line 1: expected the '#version",
            "merges.txt without its header");
    refused(make_dir("three", small_vocab, "#version: 0.2\na b\na b c\n"), "merges.txt: line 3: expected two tokens",
            "a merge line of three tokens");
    refused(make_dir("blank", small_vocab, "#version: 0.2\na b\n\na b</w>\n"), "merges.txt: line 3",
            "an empty merge line");
    refused(make_dir("utf8", small_vocab, "#version: 0.2\na b\n\xff b\n"), "merges.txt: line 3: invalid UTF-8",
            "invalid UTF-8 in merges.txt");
    refused(make_dir("nosot", "{\"a\": 0, \"<|endoftext|>\": 1}", small_merges),
            "bos_token '<|startoftext|>' is not in the vocabulary", "a vocabulary without BOS");
    const char *d = make_dir("badmap", small_vocab, small_merges);
    write_file(d, "special_tokens_map.json", "{\"pad_token\": 5");
    refused(d, "special_tokens_map.json: line", "special_tokens_map.json that is not JSON");
    d = make_dir("badpad", small_vocab, small_merges);
    write_file(d, "special_tokens_map.json", "{\"pad_token\": [1]}");
    refused(d, "'pad_token' is neither a string", "a pad token of the wrong type");
    d = make_dir("unkpad", small_vocab, small_merges);
    write_file(d, "special_tokens_map.json", "{\"pad_token\": \"<pad>\"}");
    refused(d, "pad_token '<pad>' is not in the vocabulary", "a pad token outside the vocabulary");

    /* --- a small vocabulary: BPE, unknown pieces, custom specials ---------- */
    d = make_dir("small", small_vocab, small_merges);
    write_file(d, "special_tokens_map.json",
               "{\"bos_token\": {\"content\": \"<|startoftext|>\"}, \"pad_token\": \"!\"}");
    db_tokenizer *ts = NULL;
    rc = db_tokenizer_load(&ts, d, &e);
    if (tap_ok(rc == 0, "load a small vocabulary with pad_token '!' %s", rc ? e.msg : "")) {
        int32_t v[8];
        rc = db_tokenize(ts, "ab ba c!", 8, v, &n_real, &e);
        /* "ab" -> ab</w>; "ba" -> b a</w>; "c" unknown -> unk; "!" is the pad
         * token, a special one, so it is cut out before BPE: 7, not !</w> 6 */
        int32_t want[8] = {8, 5, 1, 2, 9, 7, 9, 7};
        tap_ok(rc == 0 && !memcmp(v, want, sizeof want) && n_real == 7,
               "BPE merges, unknown piece -> unk, special pad token split and padding");
        if (memcmp(v, want, sizeof want))
            diag_ids("  got", v, 8);
        db_tokenizer_info si;
        db_tokenizer_get_info(ts, &si);
        tap_ok(si.pad == 7 && si.unk == 9 && si.n_merges == 2, "pad 7, unk 9, 2 merges");
    }
    db_tokenizer_free(ts);

    /* --- added_tokens.json (textual-inversion tokens) ----------------------- */
    d = make_dir("added", NULL, NULL);
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "cp '%s/vocab.json' '%s/merges.txt' '%s/'",
             tap_path("tests/data/tiny/diffusers/tokenizer"), tap_path("tests/data/tiny/diffusers/tokenizer"), d);
    if (system(cmd) == 0) {
        write_file(d, "added_tokens.json", "{\"<cat-toy>\": 49408}");
        rc = db_tokenizer_load(&ts, d, &e);
        int32_t v[8];
        if (rc == 0)
            rc = db_tokenize(ts, "a <cat-toy>photo", 8, v, &n_real, &e);
        const char *ct = rc == 0 ? db_tokenizer_token(ts, 49408) : NULL;
        tap_ok(rc == 0 && v[1] == 320 && v[2] == 49408 && v[3] == 1125 && v[4] == 49407 && ct &&
                   !strcmp(ct, "<cat-toy>") && db_tokenizer_id(ts, "<cat-toy>") == 49408,
               "added_tokens.json: '<cat-toy>' is cut out and maps to 49408 %s", rc ? e.msg : "");
        db_tokenizer_free(ts);
    }

    /* --- one tokenizer, several threads (the BPE cache is shared) ----------- */
    thread_job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){tok2, prompts, 0};
        pthread_create(&th[i], NULL, thread_run, &jobs[i]);
    }
    int tbad = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        tbad += jobs[i].bad;
    }
    tap_ok(tbad == 0, "4 threads x 5 rounds over the reference prompts agree (%d differ)", tbad);

    /* speed, for the record */
    t0 = now();
    int reps = 20;
    for (int r = 0; r < reps; r++)
        for (size_t i = 0; i < json_array_size(prompts); i++)
            db_tokenize(tok, json_string_value(json_object_get(json_array_get(prompts, i), "prompt")),
                        DB_CLIP_MAX_LENGTH, ids, NULL, &e);
    tap_diag("%.1f us per reference prompt (BPE cache warm)",
             (now() - t0) * 1e6 / (double)(reps * json_array_size(prompts)));

    json_decref(ref);
    db_tokenizer_free(tok);
    db_tokenizer_free(tok2);
    return tap_done();
}
