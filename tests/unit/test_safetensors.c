/* safetensors writer/reader round trip, validation errors, atomic failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/core/fsutil.h"
#include "libcommon/io/safetensors.h"
#include "tap.h"

static int fill_pattern(void *ctx, size_t i, void *dst, db_err *err)
{
    const db_st_item *items = ctx;
    size_t n = (size_t)db_shape_nbytes(items[i].dtype, items[i].ndim, items[i].shape);
    for (size_t k = 0; k < n; k++)
        ((unsigned char *)dst)[k] = (unsigned char)(k * 7 + i);
    return 0;
}

static int fill_fail(void *ctx, size_t i, void *dst, db_err *err)
{
    if (i == 1)
        return db_err_set(err, DB_EIO, "simulated failure");
    return fill_pattern(ctx, i, dst, err);
}

int main(void)
{
    const char *dir = tap_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    db_st_item items[] = {
        {"w", DB_F32, 2, {3, 4}}, {"h", DB_F16, 1, {5}}, {"b", DB_BF16, 3, {1, 2, 3}},
        {"ids", DB_I64, 2, {1, 7}}, {"s", DB_F64, 0, {0}}, {"e", DB_U8, 1, {0}},
    };
    size_t n = sizeof items / sizeof items[0];
    const char *meta[] = {"format", "pt", "k", "v", NULL};
    db_err e = {0};
    tap_ok(!db_safetensors_write(path, items, n, meta, fill_pattern, items, &e), "write %zu tensors: %s", n, e.msg);

    db_tindex ix;
    db_tindex_init(&ix);
    db_safetensors *st = NULL;
    tap_ok(!db_safetensors_open(&st, path, "p.", 0, &ix, &e), "read back: %s", e.msg);
    int same = ix.n == n;
    for (size_t i = 0; i < n && same; i++) {
        char name[64];
        snprintf(name, sizeof name, "p.%s", items[i].name);
        long k = db_tindex_find(&ix, name);
        same = k >= 0 && ix.v[k].dtype == items[i].dtype &&
               db_shape_equal(ix.v[k].ndim, ix.v[k].shape, items[i].ndim, items[i].shape);
        if (same) {
            size_t nb = ix.v[k].nbytes;
            unsigned char *want = malloc(nb + 1);
            fill_pattern(items, i, want, &e);
            same = !nb || !memcmp(want, ix.v[k].ptr, nb);
            free(want);
        }
    }
    tap_ok(same, "names, dtypes, shapes and bytes survive the round trip (with prefix)");
    tap_ok(st && st->metadata && !strcmp(json_string_value(json_object_get(st->metadata, "k")), "v"),
           "__metadata__ kept");
    db_safetensors_close(st);
    db_tindex_free(&ix);

    /* a failing writer leaves nothing behind, not even its temporary */
    snprintf(path, sizeof path, "%s/fail.safetensors", dir);
    tap_ok(db_safetensors_write(path, items, n, NULL, fill_fail, items, &e) && strstr(e.msg, "simulated"),
           "fill error is reported: %s", e.msg);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "ls -a %s | grep -q fail", dir);
    tap_ok(system(cmd) != 0, "no output and no temporary left after a failed write");

    db_st_item dup[] = {{"x", DB_F32, 1, {1}}, {"x", DB_F32, 1, {1}}};
    snprintf(path, sizeof path, "%s/dup.safetensors", dir);
    tap_ok(db_safetensors_write(path, dup, 2, NULL, fill_pattern, dup, &e) && strstr(e.msg, "duplicate"),
           "duplicate names refused: %s", e.msg);

    /* header validation through the in-memory parser */
    struct {
        const char *json, *want;
        size_t data;
    } bad[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{}}", "JSON", 8},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", "shape", 8},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", "data_offsets", 8},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", "past the data section", 8},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", "dimensions", 4},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,4]}}", "needs", 4},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "cover", 8},
        {"[1,2]", "not a JSON object", 0},
        {"{\"__metadata__\":{\"k\":1}}", "not a string", 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t hl = strlen(bad[i].json), total = 8 + hl + bad[i].data;
        unsigned char *buf = calloc(1, total);
        for (int b = 0; b < 8; b++)
            buf[b] = (unsigned char)((uint64_t)hl >> (8 * b));
        memcpy(buf + 8, bad[i].json, hl);
        db_tindex_init(&ix);
        db_err_clear(&e);
        int rc = db_safetensors_parse(buf, total, total, buf + 8 + hl, NULL, 0, &ix, NULL, &e);
        tap_ok(rc && strstr(e.msg, bad[i].want) && ix.n == 0, "bad header %zu refused (%s): %s", i, bad[i].want,
               e.msg);
        db_tindex_free(&ix);
        free(buf);
    }
    return tap_done();
}
