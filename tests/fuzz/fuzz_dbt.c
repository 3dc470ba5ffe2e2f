/* libFuzzer target for the .dbt reader: the input is a byte stream read
 * through db_dbt_open_mem, exactly as a file or pipe would be.
 *
 * Beyond "no crash, no leak, no huge allocation" it checks what the API
 * promises for every record it hands out, and that the pre-check walker and
 * msgpack-c agree on where an object ends. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/dbt.h"

static void check(int cond)
{
    if (!cond)
        abort();
}

/* Re-pack a map read from the input and walk the result. */
static void repack(const msgpack_object *map)
{
    db_meta m;
    db_err e;
    db_meta_init(&m);
    db_meta_merge(&m, map);
    if (!db_meta_finish(&m, &e)) {
        db_mpwalk w;
        db_mpwalk_init(&w, 0);
        w.max_depth = DB_DBT_MAX_DEPTH + 1; /* the map no longer sits inside a record */
        check(db_mpwalk_run(&w, (const uint8_t *)m.buf, m.len) == DB_MPW_DONE && w.off == m.len);
    }
    db_meta_free(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* walker vs msgpack-c on the first object */
    db_mpwalk w;
    db_mpwalk_init(&w, 0);
    if (db_mpwalk_run(&w, data, size) == DB_MPW_DONE) {
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        size_t off = 0;
        int rc = msgpack_unpack_next(&u, (const char *)data, size, &off);
        check(rc == MSGPACK_UNPACK_SUCCESS || rc == MSGPACK_UNPACK_EXTRA_BYTES);
        check(off == w.off);
        msgpack_unpacked_destroy(&u);
    }

    /* resuming in chunks ends exactly where one pass does (the reader
     * resumes the walker as pipe reads arrive) */
    size_t step = size ? (size_t)data[0] % 7 + 1 : 1;
    db_mpwalk c;
    db_mpwalk_init(&c, 0);
    int st = DB_MPW_MORE;
    for (size_t avail = 0; st == DB_MPW_MORE && avail < size + step; avail += step)
        st = db_mpwalk_run(&c, data, avail < size ? avail : size);
    db_mpwalk_init(&w, 0);
    int one = db_mpwalk_run(&w, data, size);
    check(st == one && (st != DB_MPW_DONE || c.off == w.off));

    db_dbt_reader *r;
    db_err e;
    if (db_dbt_open_mem(&r, data, size, "fuzz", NULL, &e))
        return 0;
    db_dbt_record rec;
    int rc, n = 0;
    while ((rc = db_dbt_next(r, &rec, &e)) == 1) {
        check(rec.ndim >= 0 && rec.ndim <= DB_MAXDIM);
        check((int64_t)rec.nbytes == db_shape_nbytes(rec.dtype, rec.ndim, rec.shape));
        check((uintptr_t)rec.data % 64 == 0);
        check(strlen(rec.name) <= DB_DBT_MAX_NAME && strlen(rec.stream->kind) <= DB_DBT_MAX_NAME);
        check(rec.meta.type == MSGPACK_OBJECT_MAP && rec.stream->meta.type == MSGPACK_OBJECT_MAP);
        /* touch every data byte (ASan checks the range) */
        uint8_t x = 0;
        for (uint64_t i = 0; i < rec.nbytes; i++)
            x ^= ((const uint8_t *)rec.data)[i];
        (void)x;
        int64_t iv;
        double fv;
        const char *s;
        size_t sl;
        db_meta_int(&rec.meta, "index", &iv);
        db_meta_float(&rec.meta, "scale", &fv);
        db_meta_str(&rec.stream->meta, "tool", &s, &sl);
        free(db_meta_strdup(&rec.meta, "caption"));
        if (n++ < 4) {
            repack(&rec.meta);
            repack(&rec.stream->meta);
        }
        if (db_shape_numel(rec.ndim, rec.shape) < 4096) {
            db_tensor t;
            if (!db_dbt_record_tensor(&rec, DB_F32, &t, &e))
                db_tensor_free(&t);
        }
    }
    /* a failed reader stays failed with the same message */
    if (rc < 0) {
        db_err e2;
        check(db_dbt_next(r, &rec, &e2) == -1 && !strcmp(e.msg, e2.msg));
    }
    db_dbt_reader_close(r);
    return 0;
}
