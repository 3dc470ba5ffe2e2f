/* .ckpt reader: the tiny CompVis checkpoint against its safetensors twin,
 * strided views from a hand-made torch-format zip, and hostile or broken
 * pickles (tests/data/pickle/, made by make_fixtures.py), each refused with
 * the right code and reason, without running anything. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "libcommon/core/crc32c.h"
#include "libcommon/io/ckpt.h"
#include "libcommon/io/pickle.h"
#include "tap.h"

#define MARKER "/tmp/dbc-pickle-pwned" /* what the hostile pickles would create */

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(sz > 0 ? (size_t)sz : 1);
    if (b && fread(b, 1, (size_t)sz, f) != (size_t)sz) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *n = (size_t)sz;
    return b;
}

static uint64_t rd_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ---- the tiny CompVis checkpoint vs its safetensors twin -------------- */

/* Bytes of tensor `name` of an in-tree safetensors file (malloc'd). */
static void *st_tensor(const char *path, const char *name, size_t *nbytes)
{
    size_t n = 0;
    unsigned char *st = slurp(path, &n);
    void *out = NULL;
    uint64_t hl = st && n >= 8 ? rd_le64(st) : UINT64_MAX;
    json_error_t je;
    json_t *h = hl <= n - 8 ? json_loadb((const char *)st + 8, hl, 0, &je) : NULL;
    json_t *off = json_object_get(json_object_get(h, name), "data_offsets");
    uint64_t b0 = (uint64_t)json_integer_value(json_array_get(off, 0));
    uint64_t b1 = (uint64_t)json_integer_value(json_array_get(off, 1));
    if (off && b0 <= b1 && b1 <= n - 8 - hl && (out = malloc(b1 - b0 + 1))) {
        memcpy(out, st + 8 + hl + b0, b1 - b0);
        *nbytes = b1 - b0;
    }
    json_decref(h);
    free(st);
    return out;
}

static void test_tiny(void)
{
    db_tindex ix;
    db_tindex_init(&ix);
    db_err err = {0};
    db_ckpt *c = NULL;
    int rc = db_ckpt_open(&c, tap_path("tests/data/tiny/tiny.ckpt"), &ix, &err);
    if (!tap_ok(rc == 0, "tiny.ckpt opens")) {
        tap_diag("%s", err.msg);
        db_tindex_free(&ix);
        return;
    }
    tap_ok(ix.n == 965, "tiny.ckpt has 965 tensors (%zu)", ix.n);

    /* name, dtype, shape and CRC-32C of every tensor of the CompVis
     * tiny.safetensors, listed by make_fixtures.py */
    FILE *f = fopen(tap_path("tests/data/pickle/tiny_index.tsv"), "r");
    size_t listed = 0, missing = 0, badshape = 0, baddtype = 0, badbytes = 0;
    char line[1024], name[512], dt[16], shape[128];
    unsigned crc;
    while (f && fgets(line, sizeof line, f)) {
        if (line[0] == '#' || sscanf(line, "%511s %15s %127s %x", name, dt, shape, &crc) != 4)
            continue;
        listed++;
        long i = db_tindex_find(&ix, name);
        if (i < 0) {
            if (missing++ < 3)
                tap_diag("missing in ckpt: %s", name);
            continue;
        }
        const db_tentry *e = &ix.v[i];
        int64_t sh[DB_MAXDIM];
        int nd = 0;
        for (char *p = shape, *q; *p && nd < DB_MAXDIM; p = *q ? q + 1 : q)
            sh[nd++] = strtoll(p, &q, 10);
        if (!db_shape_equal(e->ndim, e->shape, nd, sh))
            badshape++;
        if (db_dtype_parse(dt) != (int)e->dtype)
            baddtype++;
        void *buf = malloc(e->nbytes ? e->nbytes : 1);
        if (!buf || db_tindex_read(&ix, (size_t)i, buf, e->dtype, &err) || db_crc32c(0, buf, e->nbytes) != crc)
            if (badbytes++ < 3)
                tap_diag("bytes differ: %s %s", name, err.msg);
        free(buf);
    }
    if (f)
        fclose(f);
    tap_ok(listed == 965 && missing == 0, "every CompVis safetensors name is in the ckpt (%zu of %zu missing)",
           missing, listed);
    tap_ok(badshape == 0 && baddtype == 0, "shapes and dtypes equal (%zu shapes, %zu dtypes differ)", badshape,
           baddtype);
    tap_ok(listed == 965 && badbytes == 0, "CRC-32C of all tensors' bytes equal (%zu differ)", badbytes);

    /* and a few tensors byte for byte against the in-tree diffusers files */
    static const struct { const char *ckpt, *file, *name; } same[] = {
        {"model.diffusion_model.input_blocks.0.0.weight", "unet/diffusion_pytorch_model.safetensors", "conv_in.weight"},
        {"model.diffusion_model.input_blocks.0.0.bias", "unet/diffusion_pytorch_model.safetensors", "conv_in.bias"},
        {"first_stage_model.encoder.conv_in.weight", "vae/diffusion_pytorch_model.safetensors",
         "encoder.conv_in.weight"},
        {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "text_encoder/model.safetensors",
         "text_model.embeddings.token_embedding.weight"},
        {"cond_stage_model.transformer.text_model.embeddings.position_ids", "text_encoder/model.safetensors",
         "text_model.embeddings.position_ids"},
    };
    for (size_t k = 0; k < sizeof same / sizeof same[0]; k++) {
        char rel[256];
        snprintf(rel, sizeof rel, "tests/data/tiny/diffusers/%s", same[k].file);
        size_t nb = 0;
        void *want = st_tensor(tap_path(rel), same[k].name, &nb);
        long i = db_tindex_find(&ix, same[k].ckpt);
        void *got = i >= 0 ? malloc(ix.v[i].nbytes + 1) : NULL;
        tap_ok(want && got && nb == ix.v[i].nbytes && db_tindex_read(&ix, (size_t)i, got, ix.v[i].dtype, &err) == 0 &&
                   !memcmp(got, want, nb),
               "%s equals diffusers %s (%zu bytes)", same[k].ckpt, same[k].name, nb);
        free(want);
        free(got);
    }

    /* reading with conversion goes through the same source */
    long w = db_tindex_find(&ix, "model.diffusion_model.input_blocks.0.0.weight");
    db_tensor t;
    tap_ok(w >= 0 && db_tindex_load(&ix, (size_t)w, DB_F16, &t, &err) == 0 && t.dtype == DB_F16 &&
               t.shape[0] == 32 && t.shape[1] == 4,
           "load input_blocks.0.0.weight as f16");
    db_tensor_free(&t);
    db_ckpt_close(c);
    db_tindex_free(&ix);
}

/* ---- strided views from small.ckpt ------------------------------------ */

static int read_f32(db_tindex *ix, const char *name, float *out, size_t n, db_err *err)
{
    long i = db_tindex_find(ix, name);
    if (i < 0 || db_shape_numel(ix->v[i].ndim, ix->v[i].shape) != (int64_t)n)
        return -1;
    return db_tindex_read(ix, (size_t)i, out, DB_F32, err);
}

static int feq(const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static void test_small(void)
{
    const char *want_names[] = {"model.a",     "model.t",    "model.slice", "model.bcast",
                                "model.half",  "model.param", "model.long", "model.empty"};
    db_tindex ix;
    db_tindex_init(&ix);
    db_err err = {0};
    db_ckpt *c = NULL;
    if (!tap_ok(db_ckpt_open(&c, tap_path("tests/data/pickle/small.ckpt"), &ix, &err) == 0,
                "small.ckpt opens (OrderedDict + BUILD _metadata, Parameter, non-tensors skipped)")) {
        tap_diag("%s", err.msg);
        db_tindex_free(&ix);
        return;
    }
    int names_ok = ix.n == 8;
    for (size_t i = 0; names_ok && i < 8; i++)
        names_ok = !strcmp(ix.v[i].name, want_names[i]) && ix.v[i].comp == -1;
    tap_ok(names_ok, "8 tensors, in state-dict order (%zu)", ix.n);

    float a[12], t[12], s[2], b[6], h[4], p[2], tw[12];
    for (int i = 0; i < 12; i++)
        a[i] = (float)i;
    for (int i = 0; i < 4; i++) /* model.t[i][j] = a[j][i] */
        for (int j = 0; j < 3; j++)
            tw[i * 3 + j] = (float)(j * 4 + i);
    tap_ok(read_f32(&ix, "model.a", t, 12, &err) == 0 && feq(t, a, 12), "contiguous tensor");
    tap_ok(read_f32(&ix, "model.t", t, 12, &err) == 0 && feq(t, tw, 12), "transposed view gathered (strides 1,4)");
    tap_ok(read_f32(&ix, "model.slice", s, 2, &err) == 0 && s[0] == 5 && s[1] == 8, "offset 5 stride 3 view");
    float bw[6] = {1, 2, 3, 1, 2, 3};
    tap_ok(read_f32(&ix, "model.bcast", b, 6, &err) == 0 && feq(b, bw, 6), "broadcast view (stride 0)");
    long hi = db_tindex_find(&ix, "model.half");
    tap_ok(hi >= 0 && ix.v[hi].dtype == DB_F16 && read_f32(&ix, "model.half", h, 4, &err) == 0 && h[0] == 0.5f &&
               h[1] == -1 && h[2] == 2 && h[3] == 65504,
           "HalfStorage -> f16, converted on read");
    tap_ok(read_f32(&ix, "model.param", p, 2, &err) == 0 && p[0] == 10 && p[1] == 20, "_rebuild_parameter");
    long li = db_tindex_find(&ix, "model.long");
    int64_t lv = 0;
    tap_ok(li >= 0 && ix.v[li].dtype == DB_I64 && ix.v[li].ndim == 0 &&
               db_tindex_read(&ix, (size_t)li, &lv, DB_I64, &err) == 0 && lv == 1234567890123LL,
           "0-dim LongStorage scalar");
    long ei = db_tindex_find(&ix, "model.empty");
    tap_ok(ei >= 0 && ix.v[ei].nbytes == 0 && db_tindex_read(&ix, (size_t)ei, t, DB_F32, &err) == 0,
           "empty tensor (0 x 5) reads nothing");

    /* a failing open into a used index leaves it as it was */
    size_t before = ix.n;
    db_ckpt *c2 = NULL;
    int rc = db_ckpt_open(&c2, tap_path("tests/data/pickle/bad_storage_size.ckpt"), &ix, &err);
    tap_ok(rc < 0 && ix.n == before && !c2 && db_tindex_find(&ix, "model.a") == 0,
           "failed open adds nothing to the index");
    /* entries' src->close closes the checkpoint too */
    ix.v[0].src->close(ix.v[0].src);
    db_tindex_free(&ix);
}

/* ---- the unpickler on its own ----------------------------------------- */

typedef struct seen {
    int n;
    char first[128];
} seen;

static int count_fn(void *ctx, const db_pickle_tensor *t, db_err *err)
{
    seen *s = ctx;
    if (!s->n++)
        snprintf(s->first, sizeof s->first, "%s", t->name);
    return 0;
}

static int stop_fn(void *ctx, const db_pickle_tensor *t, db_err *err)
{
    if (!strcmp(t->name, "model.t"))
        return db_err_set(err, DB_EUSAGE, "stop at %s", t->name);
    return 0;
}

/* Run a fixture through the unpickler: rc, and the error in *err. */
static int unpickle(const char *name, seen *s, db_err *err)
{
    char rel[256];
    snprintf(rel, sizeof rel, "tests/data/pickle/%s", name);
    size_t n = 0;
    unsigned char *b = slurp(tap_path(rel), &n);
    memset(s, 0, sizeof *s);
    db_err_clear(err);
    if (!b)
        return db_err_set(err, DB_EIO, "%s: cannot read fixture", rel);
    int rc = db_pickle_tensors(b, n, count_fn, s, err);
    free(b);
    return rc;
}

static void test_pickles(void)
{
    seen s;
    db_err err;
    static const struct { const char *file; int n; const char *what; } good[] = {
        {"small_p2.pkl", 8, "protocol 2 {'state_dict': OrderedDict} with BUILD, Parameter, non-tensors"},
        {"small_p4.pkl", 8, "protocol 4 bare state dict (FRAME, MEMOIZE, STACK_GLOBAL)"},
        {"small_p5.pkl", 8, "protocol 5"},
        {"many.pkl", 120, "LONG_BINPUT / LONG_BINGET memo"},
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        int rc = unpickle(good[i].file, &s, &err);
        tap_ok(rc == 0 && s.n == good[i].n && !strcmp(s.first, "model.a") == (i < 3), "%s: %d tensors: %s %s",
               good[i].file, s.n, good[i].what, err.msg);
    }

    /* hostile: refused as a security error naming the global */
    static const struct { const char *file, *global; } evil[] = {
        {"evil_os_system.pkl", "'os.system'"},
        {"evil_posix_system.pkl", "'posix.system'"},
        {"evil_builtins_eval.pkl", "'builtins.eval'"},
        {"evil_subprocess_popen.pkl", "'subprocess.Popen'"},
        {"evil_in_state_dict.pkl", "'os.system'"},
        {"evil_inst.pkl", "'os.system'"},
    };
    for (size_t i = 0; i < sizeof evil / sizeof evil[0]; i++) {
        int rc = unpickle(evil[i].file, &s, &err);
        tap_ok(rc < 0 && err.code == DB_ESECURITY && strstr(err.msg, evil[i].global) &&
                   strstr(err.msg, "not allowed") && s.n == 0,
               "%s refused: %s", evil[i].file, err.msg);
    }

    /* malformed: refused with the reason */
    static const struct { const char *file; int code; const char *why; } bad[] = {
        {"truncated.pkl", DB_EFORMAT, "truncated"},
        {"huge_string.pkl", DB_EFORMAT, "claims 2147483647 bytes"},
        {"huge_string8.pkl", DB_EFORMAT, "claims 4611686018427387904 bytes"},
        {"deep_marks.pkl", DB_EFORMAT, "nested deeper"},
        {"deep_marks_small.pkl", DB_EFORMAT, "nested deeper"},
        {"memo_huge_index.pkl", DB_EFORMAT, "memo index"},
        {"not_a_dict.pkl", DB_EFORMAT, "no dict"},
        {"proto1.pkl", DB_EUNSUPP, "protocol 1"},
        {"view_outside.pkl", DB_EFORMAT, "storage of 4 elements"},
        {"negative_stride.pkl", DB_EFORMAT, "stride"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = unpickle(bad[i].file, &s, &err);
        tap_ok(rc < 0 && err.code == bad[i].code && strstr(err.msg, bad[i].why), "%s refused: %s", bad[i].file,
               err.msg);
    }

    /* constructs refused without a fixture file */
#define BYTES(lit) lit, sizeof(lit) - 1
    static const struct { const char *what; const char *bytes; size_t n; int code; const char *why; } inl[] = {
        {"REDUCE on a storage class", BYTES("\x80\x02" "ctorch\nFloatStorage\n)R."), DB_ESECURITY, "calls torch.FloatStorage"},
        {"REDUCE on a non-callable", BYTES("\x80\x02K\x01)R."), DB_ESECURITY, "not an allowed global"},
        {"BUILD on a plain dict", BYTES("\x80\x02}}b."), DB_ESECURITY, "BUILD"},
        {"EXT1 extension registry", BYTES("\x80\x02\x82\x01."), DB_ESECURITY, "extension registry"},
        {"NEWOBJ", BYTES("\x80\x02" "ccollections\nOrderedDict\n)\x81."), DB_EUNSUPP, "NEWOBJ"},
        {"OrderedDict with arguments", BYTES("\x80\x02" "ccollections\nOrderedDict\n]\x85R."), DB_EUNSUPP, "arguments"},
        {"GLOBAL name without newline", BYTES("\x80\x02" "cos\nsystem"), DB_EFORMAT, "truncated"},
        {"SETITEMS on a list", BYTES("\x80\x02](K\x01K\x02u."), DB_EFORMAT, "SETITEMS on a list"},
        {"empty input", BYTES(""), DB_EFORMAT, "truncated"},
    };
    for (size_t i = 0; i < sizeof inl / sizeof inl[0]; i++) {
        db_err_clear(&err);
        int rc = db_pickle_tensors(inl[i].bytes, inl[i].n, count_fn, &s, &err);
        tap_ok(rc < 0 && err.code == inl[i].code && strstr(err.msg, inl[i].why), "%s refused: %s", inl[i].what,
               err.msg);
    }
    /* text PUT / GET, and a dict with no tensors is fine */
    memset(&s, 0, sizeof s);
    tap_ok(db_pickle_tensors(BYTES("}p0\n0g0\n."), count_fn, &s, &err) == 0 && s.n == 0,
           "protocol 0 PUT/GET, empty dict: 0 tensors");
    /* a callback's error stops the walk and comes back as is */
    size_t n = 0;
    unsigned char *b = slurp(tap_path("tests/data/pickle/small_p2.pkl"), &n);
    tap_ok(b && db_pickle_tensors(b, n, stop_fn, &s, &err) < 0 && err.code == DB_EUSAGE &&
               !strcmp(err.msg, "stop at model.t"),
           "callback error propagates: %s", err.msg);

    /* every prefix and every single-byte change of a valid pickle: an
     * error or a result, never a crash (a cheap fuzz run on every check) */
    int ok = b != NULL, runs = 0, refused = 0;
    for (size_t k = 0; ok && k < n; k++)
        if (db_pickle_tensors(b, k, count_fn, &s, &err) == 0)
            ok = 0; /* a proper prefix has no STOP yet */
    tap_ok(ok, "every proper prefix of small_p2.pkl is refused");
    for (size_t k = 0; b && k < n; k++) {
        unsigned char save = b[k];
        for (int x = 0; x < 256; x += 17) {
            b[k] = (unsigned char)(save ^ x);
            runs++;
            refused += db_pickle_tensors(b, n, count_fn, &s, &err) < 0;
        }
        b[k] = save;
    }
    tap_ok(b && runs > 0, "%d single-byte mutations of small_p2.pkl run (%d refused)", runs, refused);
    free(b);
}

/* ---- ckpt-level errors -------------------------------------------------- */

static void test_ckpt_errors(void)
{
    static const struct { const char *file; int code; const char *why; } bad[] = {
        {"evil_os_system.ckpt", DB_ESECURITY, "'os.system' which is not allowed"},
        {"truncated.ckpt", DB_EFORMAT, "zip"},
        {"missing_pkl.ckpt", DB_EFORMAT, "missing data.pkl"},
        {"big_endian.ckpt", DB_EUNSUPP, "big-endian"},
        {"missing_storage.ckpt", DB_EFORMAT, "archive/data/1 is missing"},
        {"bad_storage_size.ckpt", DB_EFORMAT, "bad storage size"},
        {"legacy.pt", DB_EUNSUPP, "legacy torch.save format not supported"},
        {"small_p2.pkl", DB_EUNSUPP, "legacy"},
        {"make_fixtures.py", DB_EFORMAT, "no zip signature"},
        {"does-not-exist.ckpt", DB_EIO, "No such file"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "tests/data/pickle/%s", bad[i].file);
        db_tindex ix;
        db_tindex_init(&ix);
        db_err err = {0};
        db_ckpt *c = NULL;
        int rc = db_ckpt_open(&c, tap_path(rel), &ix, &err);
        tap_ok(rc < 0 && !c && ix.n == 0 && err.code == bad[i].code && strstr(err.msg, bad[i].why) &&
                   strstr(err.msg, bad[i].file),
               "%s refused: %s", bad[i].file, err.msg);
        db_ckpt_close(c);
        db_tindex_free(&ix);
    }
}

static void test_probe(void)
{
    size_t n = 0;
    unsigned char *b = slurp(tap_path("tests/data/pickle/small.ckpt"), &n);
    tap_ok(b && db_ckpt_probe(b, n) == 1 && db_ckpt_probe(b, 3) == 0, "probe: zip signature");
    free(b);
    b = slurp(tap_path("tests/data/pickle/small_p2.pkl"), &n);
    tap_ok(b && db_ckpt_probe(b, n) == 0 && db_pickle_probe(b, n) == 1, "probe: a bare pickle is not a zip");
    free(b);
    tap_ok(db_ckpt_probe("{\"a\"", 4) == 0 && db_pickle_probe("\x80\x01", 2) == 0, "probe: others");
}

int main(void)
{
    unlink(MARKER);
    test_tiny();
    test_small();
    test_pickles();
    test_ckpt_errors();
    test_probe();
    tap_ok(access(MARKER, F_OK) != 0, "nothing executed: %s was not created", MARKER);
    return tap_done();
}
