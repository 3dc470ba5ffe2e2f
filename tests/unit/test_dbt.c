/* The tensor stream (.dbt): round trips over files, pipes and ZeroMQ, the
 * metadata builder, and refusal of every kind of broken or hostile input.
 *
 * Also a helper for the shell test and the fuzz corpus:
 *   test_dbt cat SRC...         print one line per record (see print_record)
 *   test_dbt sample PATH        write the sample stream (tests/data/dbt/sample.dbt)
 *   test_dbt hostile DIR        write the edge-case seeds of the fuzz corpus
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "libcommon/core/crc32c.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/io/dbt.h"
#include "tap.h"

#define PY "/usr/bin/python3"
#define ZMQ_TIMEOUT 10000 /* ms: a broken test fails instead of hanging */

/* ---- helpers ---------------------------------------------------------------- */

/* Deterministic bytes for record `seed`. */
static void fill(void *p, size_t n, uint32_t seed)
{
    uint8_t *b = p;
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (uint8_t)x;
    }
}

static int has(const db_err *e, const char *s)
{
    return strstr(e->msg, s) != NULL;
}

/* Read everything: the final db_dbt_next result (0 or -1); *nrec records. */
static int read_all_mem(const void *buf, size_t n, const db_dbt_ropts *o, db_err *e, int *nrec)
{
    db_dbt_reader *r;
    db_err_clear(e);
    *nrec = 0;
    if (db_dbt_open_mem(&r, buf, n, "mem.dbt", o, e))
        return -1;
    db_dbt_record rec;
    int rc;
    while ((rc = db_dbt_next(r, &rec, e)) == 1)
        (*nrec)++;
    /* a failed reader stays failed */
    db_err e2;
    int again = db_dbt_next(r, &rec, &e2);
    if (rc < 0 && (again != -1 || strcmp(e2.msg, e->msg)))
        rc = -2;
    db_dbt_reader_close(r);
    return rc;
}

static int read_all_path(const char *src, const db_dbt_ropts *o, db_err *e, int *nrec)
{
    db_dbt_reader *r;
    db_err_clear(e);
    *nrec = 0;
    if (db_dbt_open_read(&r, src, o, e))
        return -1;
    db_dbt_record rec;
    int rc;
    while ((rc = db_dbt_next(r, &rec, e)) == 1)
        (*nrec)++;
    db_dbt_reader_close(r);
    return rc;
}

/* A hand-built stream, for inputs our writer refuses to make. */
typedef struct raw {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    size_t start;
    uint32_t crc;
    uint64_t count;
} raw;

static void raw_init(raw *r)
{
    msgpack_sbuffer_init(&r->sb);
    msgpack_packer_init(&r->pk, &r->sb, msgpack_sbuffer_write);
    r->crc = 0;
    r->count = 0;
}
static void raw_free(raw *r) { msgpack_sbuffer_destroy(&r->sb); }
static void raw_begin(raw *r) { r->start = r->sb.size; }
/* The object since raw_begin joins the crc. */
static void raw_crc(raw *r) { r->crc = db_crc32c(r->crc, r->sb.data + r->start, r->sb.size - r->start); }
static void pstr(raw *r, const char *s) { msgpack_pack_str_with_body(&r->pk, s, strlen(s)); }

static void raw_header(raw *r, const char *kind)
{
    raw_begin(r);
    msgpack_pack_map(&r->pk, 4);
    pstr(r, "format");
    pstr(r, "dbt");
    pstr(r, "version");
    msgpack_pack_int(&r->pk, 1);
    pstr(r, "kind");
    pstr(r, kind);
    pstr(r, "meta");
    msgpack_pack_map(&r->pk, 0);
    r->crc = 0;
    raw_crc(r);
    r->count = 0;
}

/* A record of f32 zeros-and-pattern of the given shape. */
static void raw_record(raw *r, const char *name, const char *dtype, int ndim, const int64_t *shape, size_t datalen)
{
    raw_begin(r);
    msgpack_pack_map(&r->pk, 5);
    pstr(r, "name");
    pstr(r, name);
    pstr(r, "dtype");
    pstr(r, dtype);
    pstr(r, "shape");
    msgpack_pack_array(&r->pk, (size_t)ndim);
    for (int i = 0; i < ndim; i++)
        msgpack_pack_int64(&r->pk, shape[i]);
    pstr(r, "data");
    char *d = calloc(1, datalen + 1);
    fill(d, datalen, 7);
    msgpack_pack_bin_with_body(&r->pk, d, datalen);
    free(d);
    pstr(r, "meta");
    msgpack_pack_map(&r->pk, 0);
    raw_crc(r);
    r->count++;
}

static void raw_trailer(raw *r, uint64_t count, uint32_t crc)
{
    msgpack_pack_map(&r->pk, 3);
    pstr(r, "end");
    msgpack_pack_true(&r->pk);
    pstr(r, "count");
    msgpack_pack_uint64(&r->pk, count);
    pstr(r, "crc32c");
    msgpack_pack_uint32(&r->pk, crc);
}

/* The sample stream: every dtype, scalar to 8-d, metadata of every kind. */
static const int64_t shapes[][DB_MAXDIM] = {{0}, {5}, {2, 3}, {1, 2, 1, 2, 1, 2, 1, 2}, {0, 4}};
static const int ndims[] = {0, 1, 2, 8, 2};
#define NSHAPES 5

static int write_sample(const char *path, db_err *e)
{
    db_dbt_writer *w;
    if (db_dbt_open_write(&w, path, NULL, e))
        return -1;
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "tool", "test_dbt");
    db_meta_put_float(&m, "scaling_factor", 0.18215);
    db_meta_put_int(&m, "resolution", 512);
    db_meta_put_array(&m, "prompts");
    db_meta_put_str(&m, NULL, "a photo of sks dog");
    db_meta_put_str(&m, NULL, "a photo of a dog");
    db_meta_end(&m);
    if (db_meta_finish(&m, e) || db_dbt_write_header(w, "latents", m.buf, m.len, e))
        goto fail;
    db_meta_free(&m);
    int k = 0;
    for (int t = 0; t < DB_NDTYPE; t++)
        for (int s = 0; s < NSHAPES; s++, k++) {
            int64_t nb = db_shape_nbytes((db_dtype)t, ndims[s], shapes[s]);
            char name[64];
            snprintf(name, sizeof name, "%s.%d", db_dtype_name((db_dtype)t), s);
            void *d = malloc((size_t)nb + 1);
            fill(d, (size_t)nb, (uint32_t)k);
            db_meta_init(&m);
            db_meta_put_int(&m, "index", k);
            db_meta_put_int(&m, "neg", -(int64_t)k - 1000000000000LL);
            db_meta_put_bool(&m, "odd", k & 1);
            db_meta_put_str(&m, "caption", k % 3 ? "a photo of sks dog" : "");
            db_meta_put_map(&m, "crop");
            db_meta_put_int(&m, "x", k * 3);
            db_meta_put_float(&m, "scale", 1.0 / (k + 1));
            db_meta_end(&m);
            int rc = db_meta_finish(&m, e) ||
                     db_dbt_write_record(w, name, (db_dtype)t, ndims[s], shapes[s], d, m.buf, m.len, e);
            free(d);
            db_meta_free(&m);
            if (rc)
                goto fail;
        }
    return db_dbt_close(w, e);
fail:
    db_meta_free(&m);
    db_dbt_abort(w, NULL);
    return -1;
}

/* Check a record of the sample stream; returns a description of the first
 * mismatch or NULL. */
static const char *check_sample_record(const db_dbt_record *rec, int k)
{
    static char why[128];
    int t = k / NSHAPES, s = k % NSHAPES;
    char name[64];
    snprintf(name, sizeof name, "%s.%d", db_dtype_name((db_dtype)t), s);
    if (strcmp(rec->name, name))
        return "name";
    if (rec->dtype != (db_dtype)t || rec->ndim != ndims[s] || !db_shape_equal(rec->ndim, rec->shape, ndims[s], shapes[s]))
        return "dtype/shape";
    int64_t nb = db_shape_nbytes((db_dtype)t, ndims[s], shapes[s]);
    if ((int64_t)rec->nbytes != nb)
        return "nbytes";
    if ((uintptr_t)rec->data % 64)
        return "data alignment";
    uint8_t *d = malloc((size_t)nb + 1);
    fill(d, (size_t)nb, (uint32_t)k);
    int same = !memcmp(d, rec->data, (size_t)nb);
    free(d);
    if (!same)
        return "data bytes";
    int64_t iv;
    double fv;
    int bv;
    const char *sv;
    size_t sl;
    if (!db_meta_int(&rec->meta, "index", &iv) || iv != k)
        return "meta index";
    if (!db_meta_int(&rec->meta, "neg", &iv) || iv != -(int64_t)k - 1000000000000LL)
        return "meta neg";
    if (!db_meta_bool(&rec->meta, "odd", &bv) || bv != (k & 1))
        return "meta odd";
    if (!db_meta_str(&rec->meta, "caption", &sv, &sl) || sl != (k % 3 ? 18u : 0u))
        return "meta caption";
    const msgpack_object *crop = db_meta_get(&rec->meta, "crop");
    if (!db_meta_int(crop, "x", &iv) || iv != k * 3 || !db_meta_float(crop, "scale", &fv) || fv != 1.0 / (k + 1))
        return "meta crop";
    if (db_meta_int(&rec->meta, "caption", &iv) || db_meta_str(&rec->meta, "missing", &sv, &sl))
        return "meta wrong-type/absent lookups";
    if (strcmp(rec->stream->kind, "latents") || !db_meta_float(&rec->stream->meta, "scaling_factor", &fv) ||
        fv != 0.18215)
        return "stream header";
    snprintf(why, sizeof why, "ok");
    return NULL;
}

/* Read SRC and check it is `copies` sample streams back to back. */
static int check_sample_source(const char *src, const db_dbt_ropts *o, int copies, db_err *e, char *why, size_t wn)
{
    db_dbt_reader *r;
    db_err_clear(e);
    snprintf(why, wn, "?");
    if (db_dbt_open_read(&r, src, o, e)) {
        snprintf(why, wn, "open: %.200s", e->msg);
        return 0;
    }
    db_dbt_record rec;
    int rc, n = 0, per = DB_NDTYPE * NSHAPES, ok = 1;
    while ((rc = db_dbt_next(r, &rec, e)) == 1) {
        const char *bad = check_sample_record(&rec, n % per);
        if (bad || rec.stream->index != (uint64_t)(n / per) || rec.index != (uint64_t)(n % per)) {
            snprintf(why, wn, "record %d: %s", n, bad ? bad : "stream/record index");
            ok = 0;
            break;
        }
        n++;
    }
    if (ok && rc == 0)
        snprintf(why, wn, "ok");
    if (ok && rc != 0)
        snprintf(why, wn, "%.200s", e->msg);
    else if (ok && n != copies * per)
        snprintf(why, wn, "%d records, expected %d", n, copies * per);
    ok = ok && rc == 0 && n == copies * per && db_dbt_streams_done(r) == (uint64_t)copies;
    db_dbt_reader_close(r);
    return ok;
}

/* One line per record: the text Python's example prints for the same stream. */
static void print_record(FILE *f, const db_dbt_record *rec)
{
    fprintf(f, "%s %s %s [", rec->stream->kind, rec->name, db_dtype_name(rec->dtype));
    for (int i = 0; i < rec->ndim; i++)
        fprintf(f, "%s%" PRId64, i ? ", " : "", rec->shape[i]);
    fprintf(f, "] %" PRIu64 " %08x\n", rec->nbytes, db_crc32c(0, rec->data, rec->nbytes));
}

static int cat_main(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        db_dbt_reader *r;
        db_dbt_record rec;
        db_err e = {0};
        db_dbt_ropts o = {.timeout_ms = ZMQ_TIMEOUT};
        int rc;
        if (db_dbt_open_read(&r, argv[i], &o, &e)) {
            fprintf(stderr, "test_dbt: error: %s\n", e.msg);
            return 1;
        }
        while ((rc = db_dbt_next(r, &rec, &e)) == 1)
            print_record(stdout, &rec);
        db_dbt_reader_close(r);
        if (rc) {
            fprintf(stderr, "test_dbt: error: %s\n", e.msg);
            return 1;
        }
    }
    return 0;
}

static int write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(p, 1, n, f) == n;
    return fclose(f) || !ok ? -1 : 0;
}

/* Seeds for the fuzzer: small broken streams of each kind. */
static int hostile_main(const char *dir)
{
    raw r;
    char path[1024];
    int64_t sh[9] = {2, 2, 1, 1, 1, 1, 1, 1, 1};
#define SEED(name)                                                                                                     \
    do {                                                                                                               \
        snprintf(path, sizeof path, "%s/%s", dir, name);                                                               \
        if (write_file(path, r.sb.data, r.sb.size))                                                                    \
            return 1;                                                                                                  \
        raw_free(&r);                                                                                                  \
    } while (0)
    raw_init(&r);
    raw_header(&r, "prior");
    raw_record(&r, "x", "f32", 9, sh, 64);
    raw_trailer(&r, r.count, r.crc);
    SEED("ndim9.dbt");
    raw_init(&r);
    raw_header(&r, "prior");
    raw_record(&r, "x", "f32", 2, sh, 15);
    raw_trailer(&r, r.count, r.crc);
    SEED("datalen.dbt");
    raw_init(&r);
    raw_header(&r, "prior");
    raw_record(&r, "x", "f16", 2, sh, 8);
    raw_trailer(&r, r.count + 1, r.crc);
    SEED("count.dbt");
    raw_init(&r);
    raw_header(&r, "prior");
    raw_record(&r, "x", "u8", 1, sh, 2);
    raw_trailer(&r, r.count, r.crc ^ 1);
    SEED("crc.dbt");
    raw_init(&r);
    raw_header(&r, "a");
    raw_trailer(&r, 0, r.crc);
    raw_header(&r, "b");
    raw_record(&r, "y", "bool", 0, sh, 1);
    raw_trailer(&r, r.count, r.crc);
    SEED("concat-empty-first.dbt");
    raw_init(&r);
    raw_header(&r, "prior");
    msgpack_sbuffer_write(&r.sb, "\xdd\x05\xf5\xe1\x00\xc0", 6); /* array claiming 10^8 */
    SEED("huge-array.dbt");
    raw_init(&r);
    for (int i = 0; i < 40; i++)
        msgpack_pack_array(&r.pk, 1);
    msgpack_pack_nil(&r.pk);
    SEED("deep.dbt");
    return 0;
#undef SEED
}

/* ---- child processes and threads ------------------------------------------- */

/* Run fn in a child with a deadline; returns its pid. */
static pid_t spawn(int (*fn)(void *), void *arg)
{
    fflush(NULL); /* no TAP output twice */
    pid_t pid = fork();
    if (pid == 0) {
        alarm(30);
        _exit(fn(arg) ? 1 : 0);
    }
    return pid;
}

static int reap(pid_t pid)
{
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* A producer: `n` f32 records [i, 2] named PREFIX.i in one stream. */
typedef struct producer {
    const char *target;
    const char *kind;
    int n;
    int pause_us;
    int abort_after; /* >0: abort after that many records */
    int die_after;   /* >0: exit after that many records, no trailer (child processes only) */
    int delay_ms;    /* wait this long before connecting */
    char err[1536];
} producer;

static int produce(void *arg)
{
    producer *p = arg;
    db_err e = {0};
    db_dbt_writer *w;
    db_dbt_wopts o = {.linger_ms = ZMQ_TIMEOUT, .timeout_ms = ZMQ_TIMEOUT};
    if (p->delay_ms)
        usleep((useconds_t)p->delay_ms * 1000);
    if (db_dbt_open_write(&w, p->target, &o, &e))
        goto fail;
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "producer", p->kind);
    if (db_meta_finish(&m, &e) || db_dbt_write_header(w, p->kind, m.buf, m.len, &e)) {
        db_meta_free(&m);
        db_dbt_abort(w, NULL);
        goto fail;
    }
    db_meta_free(&m);
    for (int i = 0; i < p->n; i++) {
        if (p->abort_after && i == p->abort_after) {
            db_dbt_abort(w, "producer gave up");
            return 0;
        }
        if (p->die_after && i == p->die_after) {
            /* like kill -9: no trailer, no close; the kernel closes the
             * socket once the I/O thread had time to send what we wrote */
            usleep(300000);
            _exit(0);
        }
        float v[2 * 64];
        int64_t shape[2] = {i % 64 + 1, 2};
        for (int j = 0; j < 2 * (i % 64 + 1); j++)
            v[j] = (float)(i * 1000 + j);
        char name[64];
        snprintf(name, sizeof name, "%s.%d", p->kind, i);
        if (db_dbt_write_record(w, name, DB_F32, 2, shape, v, NULL, 0, &e)) {
            db_dbt_abort(w, NULL);
            goto fail;
        }
        if (p->pause_us)
            usleep((useconds_t)p->pause_us);
    }
    if (db_dbt_close(w, &e))
        goto fail;
    return 0;
fail:
    snprintf(p->err, sizeof p->err, "%s", e.msg);
    fprintf(stderr, "# producer %s: %s\n", p->kind, e.msg);
    return -1;
}

static void *produce_thread(void *arg)
{
    produce(arg);
    return NULL;
}

/* Collect from src: per producer kind, records must arrive in order and
 * carry the right values.  Returns the number of records, -1 on a mismatch,
 * and the final rc in *rc. */
static int collect(const char *src, int streams, int *rc, db_err *e)
{
    db_dbt_reader *r;
    db_dbt_ropts o = {.timeout_ms = ZMQ_TIMEOUT, .streams = streams};
    *rc = -1;
    if (db_dbt_open_read(&r, src, &o, e))
        return -1;
    db_dbt_record rec;
    int n = 0, next[8] = {0}, bad = 0;
    uint8_t ids[8][8];
    while ((*rc = db_dbt_next(r, &rec, e)) == 1) {
        int pk = rec.stream->kind[1] - '0'; /* kinds p0, p1, ... */
        if (rec.stream->kind[0] != 'p' || pk < 0 || pk > 7) {
            bad = 1;
            continue;
        }
        int i = next[pk]++;
        if (i == 0)
            memcpy(ids[pk], rec.stream->id, 8);
        char name[64];
        snprintf(name, sizeof name, "p%d.%d", pk, i);
        const float *v = rec.data;
        if (strcmp(rec.name, name) || rec.ndim != 2 || rec.shape[0] != i % 64 + 1 || v[1] != (float)(i * 1000 + 1) ||
            rec.index != (uint64_t)i || memcmp(ids[pk], rec.stream->id, 8))
            bad = 1;
        n++;
    }
    if (streams == 2 && next[0] && next[1] && !memcmp(ids[0], ids[1], 8))
        bad = 1;
    db_dbt_reader_close(r);
    return bad ? -1 : n;
}

/* ---- tests -------------------------------------------------------------------- */

static void test_walker(void)
{
    /* resumable: fed one byte at a time, it asks for more until the last */
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "s", "hello");
    db_meta_put_map(&m, "inner");
    db_meta_put_array(&m, "a");
    for (int i = 0; i < 20; i++)
        db_meta_put_int(&m, NULL, i * 1000003);
    db_meta_end(&m);
    db_meta_put_bin(&m, "b", "\1\2\3", 3);
    db_meta_put_float(&m, "f", 1.5);
    db_meta_put_nil(&m, "n");
    db_meta_end(&m);
    db_err e = {0};
    int ok = !db_meta_finish(&m, &e);
    db_mpwalk w;
    db_mpwalk_init(&w, 0);
    int more = 0;
    for (size_t avail = 0; ok && avail < m.len; avail++)
        more += db_mpwalk_run(&w, (const uint8_t *)m.buf, avail) == DB_MPW_MORE;
    ok = ok && more == (int)m.len && db_mpwalk_run(&w, (const uint8_t *)m.buf, m.len) == DB_MPW_DONE &&
         w.off == m.len;
    tap_ok(ok, "walker resumes byte by byte and finds the exact object size (%zu bytes)", m.len);
    db_meta_free(&m);

    /* a 6-byte array claiming 10^8 entries: more than fits a 1 MiB limit */
    static const uint8_t huge[] = {0xdd, 0x05, 0xf5, 0xe1, 0x00, 0xc0};
    db_mpwalk_init(&w, 1 << 20);
    tap_ok(db_mpwalk_run(&w, huge, sizeof huge) == DB_MPW_BAD && strstr(w.why, "claims 100000000 entries"),
           "walker refuses a count that cannot fit the object limit: %s", w.why);
    static const uint8_t many[] = {0xdd, 0x00, 0x10, 0x00, 0x00, 0xc0}; /* 2^20 entries */
    db_mpwalk_init(&w, 0);
    tap_ok(db_mpwalk_run(&w, many, sizeof many) == DB_MPW_MORE, "a plausible count just asks for more bytes");
    db_mpwalk_init(&w, 0);
    tap_ok(db_mpwalk_run(&w, huge, sizeof huge) == DB_MPW_BAD && strstr(w.why, "claims 100000000"),
           "10^8 entries exceed the %u-value limit even under 4 GiB", DB_DBT_MAX_VALUES);
    static const uint8_t c1[] = {0xc1};
    db_mpwalk_init(&w, 0);
    tap_ok(db_mpwalk_run(&w, c1, 1) == DB_MPW_BAD, "walker refuses 0xc1: %s", w.why);

    /* nesting: 32 levels pass (and msgpack-c agrees), 33 do not */
    uint8_t deep[40];
    for (int depth = 32; depth <= 33; depth++) {
        memset(deep, 0x91, (size_t)depth);
        deep[depth] = 0xc0;
        db_mpwalk_init(&w, 0);
        int st = db_mpwalk_run(&w, deep, (uint64_t)depth + 1);
        if (depth == 32) {
            msgpack_unpacked u;
            msgpack_unpacked_init(&u);
            size_t off = 0;
            int ur = msgpack_unpack_next(&u, (const char *)deep, (size_t)depth + 1, &off);
            msgpack_unpacked_destroy(&u);
            tap_ok(st == DB_MPW_DONE && ur == MSGPACK_UNPACK_SUCCESS, "32 nested arrays accepted (msgpack-c too)");
        } else {
            tap_ok(st == DB_MPW_BAD && strstr(w.why, "deeper than 32"), "33 nested arrays refused: %s", w.why);
        }
    }
    /* a long string */
    uint8_t s32[5] = {0xdb, 0x00, 0x10, 0x00, 0x01}; /* 1 MiB + 1 */
    db_mpwalk_init(&w, 0);
    tap_ok(db_mpwalk_run(&w, s32, 5) == DB_MPW_BAD && strstr(w.why, "string of 1048577 bytes"),
           "a string over 1 MiB is refused from its header alone");
}

static void test_meta(void)
{
    db_meta m;
    db_err e = {0};
    db_meta_init(&m);
    char key[32];
    for (int i = 0; i < 70000; i++) { /* map32 after shrinking nested headers */
        snprintf(key, sizeof key, "k%d", i);
        db_meta_put_int(&m, key, i);
    }
    db_meta_put_map(&m, "small");
    db_meta_put_str(&m, "a", "b");
    db_meta_end(&m);
    db_meta_put_array(&m, "mid");
    for (int i = 0; i < 300; i++)
        db_meta_put_int(&m, NULL, -i);
    db_meta_end(&m);
    int ok = !db_meta_finish(&m, &e);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    ok = ok && msgpack_unpack_next(&u, m.buf, m.len, &off) == MSGPACK_UNPACK_SUCCESS && off == m.len;
    int64_t v = 0;
    const char *s;
    size_t sl;
    ok = ok && u.data.type == MSGPACK_OBJECT_MAP && u.data.via.map.size == 70002 &&
         db_meta_int(&u.data, "k69999", &v) && v == 69999 &&
         db_meta_str(db_meta_get(&u.data, "small"), "a", &s, &sl) && sl == 1 && *s == 'b';
    const msgpack_object *mid = db_meta_get(&u.data, "mid");
    ok = ok && mid && mid->type == MSGPACK_OBJECT_ARRAY && mid->via.array.size == 300 &&
         mid->via.array.ptr[299].via.i64 == -299;
    /* headers are minimal: map32 top, fixmap, array16 */
    ok = ok && (uint8_t)m.buf[0] == 0xdf;
    tap_ok(ok, "meta builder: 70002-entry map, nested map and 300-element array read back");

    /* merge and put_obj copy a map read from a stream */
    db_meta m2;
    db_meta_init(&m2);
    db_meta_merge(&m2, db_meta_get(&u.data, "small"));
    db_meta_put_obj(&m2, "mid", mid);
    ok = !db_meta_finish(&m2, &e);
    msgpack_unpacked u2;
    msgpack_unpacked_init(&u2);
    off = 0;
    ok = ok && msgpack_unpack_next(&u2, m2.buf, m2.len, &off) == MSGPACK_UNPACK_SUCCESS;
    char *dup = db_meta_strdup(&u2.data, "a");
    ok = ok && dup && !strcmp(dup, "b") && db_meta_get(&u2.data, "mid")->via.array.size == 300;
    free(dup);
    tap_ok(ok, "meta merge and put_obj copy read values");
    msgpack_unpacked_destroy(&u2);
    msgpack_unpacked_destroy(&u);
    db_meta_free(&m2);
    db_meta_free(&m);

    db_meta_init(&m);
    db_meta_put_array(&m, "a");
    db_meta_put_int(&m, "key-in-array", 1);
    db_meta_end(&m);
    tap_ok(db_meta_finish(&m, &e) && e.code == DB_EUSAGE, "meta misuse (key in array) reported: %s", e.msg);
    db_meta_free(&m);
    db_meta_init(&m);
    db_meta_put_map(&m, "open");
    tap_ok(db_meta_finish(&m, &e) && has(&e, "left open"), "unclosed container reported: %s", e.msg);
    db_meta_free(&m);
}

static void test_targets(void)
{
    db_dbt_target t;
    db_err e = {0};
    tap_ok(!db_dbt_parse_target(&t, "tcp://*:5555", &e) && t.kind == DB_DBT_ZMQ && t.bind == 1 &&
               !strcmp(t.endpoint, "tcp://*:5555"),
           "tcp://*:5555 binds");
    tap_ok(!db_dbt_parse_target(&t, "tcp://127.0.0.1:5555?streams=3&timeout=250", &e) && t.bind == 0 &&
               t.streams == 3 && t.timeout_ms == 250 && !strcmp(t.endpoint, "tcp://127.0.0.1:5555"),
           "tcp://host:port connects; options parsed and stripped");
    tap_ok(!db_dbt_parse_target(&t, "ipc:///tmp/x.ipc?bind&linger=5", &e) && t.bind == 1 && t.linger_ms == 5,
           "ipc with ?bind and linger");
    tap_ok(!db_dbt_parse_target(&t, "ipc:///tmp/x.ipc", &e) && t.bind == -1, "ipc role left to reader/writer");
    tap_ok(!db_dbt_parse_target(&t, "-", &e) && t.kind == DB_DBT_STDIO && !db_dbt_parse_target(&t, "a/b.dbt", &e) &&
               t.kind == DB_DBT_FILE,
           "- is stdio, a path is a file");
    tap_ok(db_dbt_parse_target(&t, "tcp://h:1?stream=2", &e) && e.code == DB_EUSAGE && has(&e, "unknown endpoint option"),
           "unknown endpoint option refused: %s", e.msg);
    tap_ok(db_dbt_parse_target(&t, "tcp://h:1?streams=0", &e) && db_dbt_parse_target(&t, "tcp://h", &e),
           "streams=0 and a tcp endpoint without port refused");
    tap_ok(!db_dbt_parse_target(&t, "tcp://h:1?heartbeat=0", &e) && t.heartbeat_ms == 0 &&
               !db_dbt_parse_target(&t, "tcp://h:1?heartbeat=500", &e) && t.heartbeat_ms == 500 &&
               !db_dbt_parse_target(&t, "tcp://h:1", &e) && t.heartbeat_ms == -1 &&
               db_dbt_parse_target(&t, "tcp://h:1?heartbeat=2000000", &e),
           "heartbeat=MS parsed (0 = off, default -1, at most 1000000)");
}

static void test_roundtrip(const char *dir)
{
    char path[1024], why[256];
    db_err e = {0};
    snprintf(path, sizeof path, "%s/sample.dbt", dir);
    int ok = !write_sample(path, &e);
    tap_ok(ok, "write sample stream (%d dtypes x %d shapes) %s", DB_NDTYPE, NSHAPES, e.msg);
    tap_ok(check_sample_source(path, NULL, 1, &e, why, sizeof why),
           "read back every dtype, ndim 0..8, empty tensors, meta: %s", why);

    /* the committed fixture: our writer is byte-stable, our reader reads it */
    char *a = NULL, *b = NULL;
    size_t an = 0, bn = 0;
    const char *fixture = tap_path("tests/data/dbt/sample.dbt");
    int same = !db_read_file(path, 1 << 24, &a, &an, &e) && !db_read_file(fixture, 1 << 24, &b, &bn, &e) &&
               an == bn && !memcmp(a, b, an);
    tap_ok(same, "writer output is byte-identical to tests/data/dbt/sample.dbt (%zu bytes, crc %08x)", an,
           a ? db_crc32c(0, a, an) : 0);
    tap_ok(check_sample_source(fixture, NULL, 1, &e, why, sizeof why), "fixture reads back: %s", why);

    /* concatenation: cat a a a */
    char cat3[1024];
    snprintf(cat3, sizeof cat3, "%s/cat3.dbt", dir);
    FILE *f = fopen(cat3, "wb");
    for (int i = 0; f && a && i < 3; i++)
        fwrite(a, 1, an, f);
    if (f)
        fclose(f);
    tap_ok(check_sample_source(cat3, NULL, 3, &e, why, sizeof why),
           "three concatenated streams read as one input, records know their stream: %s", why);

    /* the same bytes from memory */
    int n = 0;
    tap_ok(a && read_all_mem(a, an, NULL, &e, &n) == 0 && n == DB_NDTYPE * NSHAPES, "memory reader: %d records", n);

    /* every proper prefix is refused, never read as a shorter good stream */
    int refused = 0, worded = 0, empty_ok = 0;
    for (size_t len = 0; a && len < an; len++) {
        int rc = read_all_mem(a, len, NULL, &e, &n);
        refused += rc == -1;
        worded += rc == -1 && (has(&e, "truncated stream (") || (len == 0 && has(&e, "empty input")));
        if (len == 0)
            empty_ok = has(&e, "empty input");
    }
    tap_ok(refused == (int)an && worded == (int)an && empty_ok,
           "truncation at each of %zu byte offsets refused as 'truncated stream' (%d refused, %d worded)", an, refused,
           worded);

    /* truncation through the file reader, at a few offsets */
    int fbad = 0;
    for (size_t len = 1; a && len < an; len += an / 7) {
        char tp[1024];
        snprintf(tp, sizeof tp, "%s/trunc.dbt", dir);
        write_file(tp, a, len);
        fbad += read_all_path(tp, NULL, &e, &n) != -1 || !has(&e, "truncated stream (") || !has(&e, "trunc.dbt: ");
    }
    tap_ok(fbad == 0, "file reader: truncated files refused, message names the file (%s)", e.msg);

    /* a flipped data byte: the crc catches it */
    if (a) {
        char *c = malloc(an);
        memcpy(c, a, an);
        c[an / 2] ^= 0x40;
        int rc = read_all_mem(c, an, NULL, &e, &n);
        tap_ok(rc == -1 && (has(&e, "crc32c mismatch") || has(&e, "record")), "flipped byte refused: %s", e.msg);
        free(c);
    }
    free(a);
    free(b);

    /* db_dbt_record_tensor converts */
    db_dbt_writer *w;
    uint16_t h[3] = {0x3c00, 0xc000, 0x3800}; /* 1, -2, 0.5 in f16 */
    int64_t sh[1] = {3};
    snprintf(path, sizeof path, "%s/half.dbt", dir);
    ok = !db_dbt_open_write(&w, path, NULL, &e) && !db_dbt_write_header(w, "t", NULL, 0, &e) &&
         !db_dbt_write_record(w, "h", DB_F16, 1, sh, h, NULL, 0, &e) && !db_dbt_close(w, &e);
    db_dbt_reader *r;
    db_dbt_record rec;
    db_tensor t = {0};
    r = NULL;
    ok = ok && !db_dbt_open_read(&r, path, NULL, &e) && db_dbt_next(r, &rec, &e) == 1 &&
         !db_dbt_record_tensor(&rec, DB_F32, &t, &e) && ((float *)t.data)[1] == -2.0f &&
         ((float *)t.data)[2] == 0.5f && rec.meta.type == MSGPACK_OBJECT_MAP && rec.meta.via.map.size == 0 &&
         db_dbt_next(r, &rec, &e) == 0;
    db_tensor_free(&t);
    db_dbt_reader_close(r);
    tap_ok(ok, "record_tensor converts f16 -> f32; empty meta reads as {}");
}

static void test_atomic(const char *dir)
{
    char path[1024];
    db_err e = {0};
    snprintf(path, sizeof path, "%s/atomic.dbt", dir);
    db_dbt_writer *w;
    int64_t sh[1] = {4};
    float v[4] = {1, 2, 3, 4};
    int ok = !db_dbt_open_write(&w, path, NULL, &e) && !db_dbt_write_header(w, "t", NULL, 0, &e) &&
             !db_dbt_write_record(w, "v", DB_F32, 1, sh, v, NULL, 0, &e);
    ok = ok && !db_exists(path);
    db_dbt_abort(w, NULL);
    int leftovers = 0;
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | grep -c atomic >/dev/null", dir);
    leftovers = system(cmd) == 0;
    tap_ok(ok && !db_exists(path) && !leftovers, "abort leaves neither the output nor a temporary");

    /* writer refusals leave the stream usable */
    ok = !db_dbt_open_write(&w, path, NULL, &e) && !db_dbt_write_header(w, "t", NULL, 0, &e);
    int64_t sh9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, neg[2] = {2, -1};
    int r1 = db_dbt_write_record(w, "v", DB_F32, 9, sh9, v, NULL, 0, &e);
    int r2 = db_dbt_write_record(w, "v", DB_F32, 2, neg, v, NULL, 0, &e);
    int r3 = db_dbt_write_record(w, "v", DB_F32, 1, sh, v, "\x81\xa1k", 3, &e); /* truncated map */
    int r4 = db_dbt_write_record(w, "v", DB_F32, 1, sh, v, "\x91\x01", 2, &e);  /* array */
    char *longname = malloc(DB_DBT_MAX_NAME + 2);
    memset(longname, 'n', DB_DBT_MAX_NAME + 1);
    longname[DB_DBT_MAX_NAME + 1] = 0;
    int r5 = db_dbt_write_record(w, longname, DB_F32, 1, sh, v, NULL, 0, &e);
    longname[DB_DBT_MAX_NAME] = 0;
    int r6 = db_dbt_write_record(w, longname, DB_F32, 1, sh, v, "\x80", 1, &e);
    free(longname);
    ok = ok && r1 && r2 && r3 && r4 && r5 && !r6 && !db_dbt_close(w, &e);
    int n;
    tap_ok(ok && read_all_path(path, NULL, &e, &n) == 0 && n == 1,
           "writer refuses ndim 9, negative dims, bad meta, a 4097-byte name; the stream stays good");

    ok = !db_dbt_open_write(&w, path, NULL, &e);
    tap_ok(ok && db_dbt_close(w, &e) == -1 && has(&e, "no stream header"), "closing without a header fails: %s",
           e.msg);
}

static void test_hostile(void)
{
    raw r;
    db_err e = {0};
    int n;
    int64_t sh[9] = {2, 2, 1, 1, 1, 1, 1, 1, 1};

#define EXPECT_FAIL(what, needle)                                                                                      \
    do {                                                                                                               \
        int rc_ = read_all_mem(r.sb.data, r.sb.size, NULL, &e, &n);                                                    \
        tap_ok(rc_ == -1 && has(&e, needle) && has(&e, "mem.dbt: "), "%s refused: %s", what, e.msg);                   \
        raw_free(&r);                                                                                                  \
    } while (0)

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "f32", 2, sh, 16);
    raw_trailer(&r, r.count, r.crc);
    tap_ok(read_all_mem(r.sb.data, r.sb.size, NULL, &e, &n) == 0 && n == 1, "hand-built stream reads: %s", e.msg);
    raw_free(&r);

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "f32", 9, sh, 64);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("ndim 9", "ndim 9 exceeds 8");

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "f32", 2, sh, 15);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("data length mismatch", "data is 15 bytes, f32 [2, 2] needs 16");

    int64_t negsh[2] = {-1, 4};
    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "f32", 2, negsh, 0);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("negative dim", "dim 0 is negative");

    int64_t big[3] = {INT64_C(1) << 40, INT64_C(1) << 40, 4};
    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "f32", 3, big, 0);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("overflowing shape", "overflows");

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "float32", 1, sh, 8);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("unknown dtype name", "unknown dtype 'float32'");

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "u8", 1, sh, 2);
    raw_trailer(&r, r.count + 1, r.crc);
    EXPECT_FAIL("count mismatch", "trailer says 2 records, the stream has 1");

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "u8", 1, sh, 2);
    raw_trailer(&r, r.count, r.crc ^ 0x10);
    EXPECT_FAIL("bad crc", "crc32c mismatch");

    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, "x", "u8", 1, sh, 2);
    EXPECT_FAIL("no trailer", "truncated stream (1 records, no trailer)");

    raw_init(&r);
    raw_header(&r, "p");
    msgpack_sbuffer_write(&r.sb, "\xdd\x05\xf5\xe1\x00\xc0", 6);
    EXPECT_FAIL("6-byte array claiming 10^8 entries", "claims 100000000 entries");

    raw_init(&r);
    raw_header(&r, "p");
    msgpack_sbuffer_write(&r.sb, "\xdd\x00\x10\x00\x00\xc0", 6); /* 2^20 entries, 1 present */
    EXPECT_FAIL("6-byte array claiming 2^20 entries", "truncated stream (0 records, no trailer)");

    /* the same claim inside a message that is complete: refused, not allocated */
    raw_init(&r);
    raw_header(&r, "p");
    raw_begin(&r);
    msgpack_pack_map(&r.pk, 2);
    pstr(&r, "name");
    pstr(&r, "x");
    pstr(&r, "meta");
    msgpack_sbuffer_write(&r.sb, "\xdf\xff\xff\xff\xff", 5); /* map claiming 2^32-1 pairs */
    for (int i = 0; i < 64; i++)
        msgpack_pack_nil(&r.pk);
    db_dbt_ropts small = {.max_object = 4096};
    tap_ok(read_all_mem(r.sb.data, r.sb.size, &small, &e, &n) == -1 && has(&e, "claims 4294967295 entries"),
           "map claiming 2^32-1 pairs refused under a 4 KiB object limit: %s", e.msg);
    raw_free(&r);

    raw_init(&r);
    raw_header(&r, "p");
    int64_t sh5000[1] = {5000};
    raw_record(&r, "x", "u8", 1, sh5000, 5000);
    raw_trailer(&r, r.count, r.crc);
    tap_ok(read_all_mem(r.sb.data, r.sb.size, &small, &e, &n) == -1 && has(&e, "larger than the limit of 4096"),
           "object over the configured limit refused: %s", e.msg);
    raw_free(&r);

    raw_init(&r);
    raw_header(&r, "p");
    raw_begin(&r);
    msgpack_pack_map(&r.pk, 1);
    pstr(&r, "name");
    for (int i = 0; i < 33; i++)
        msgpack_pack_array(&r.pk, 1);
    msgpack_pack_nil(&r.pk);
    EXPECT_FAIL("34 levels of nesting", "nested deeper than 32");

    raw_init(&r);
    raw_header(&r, "p");
    raw_begin(&r);
    msgpack_pack_map(&r.pk, 1);
    pstr(&r, "name");
    msgpack_pack_str(&r.pk, DB_DBT_MAX_STR + 1);
    char *huge = calloc(1, DB_DBT_MAX_STR + 1);
    msgpack_pack_str_body(&r.pk, huge, DB_DBT_MAX_STR + 1);
    free(huge);
    EXPECT_FAIL("string of 1 MiB + 1", "string of 1048577 bytes");

    char *name = malloc(DB_DBT_MAX_NAME + 2);
    memset(name, 'n', DB_DBT_MAX_NAME + 1);
    name[DB_DBT_MAX_NAME + 1] = 0;
    raw_init(&r);
    raw_header(&r, "p");
    raw_record(&r, name, "u8", 1, sh, 2);
    raw_trailer(&r, r.count, r.crc);
    EXPECT_FAIL("4097-byte name", "is 4097 bytes (limit 4096)");
    free(name);

    raw_init(&r);
    raw_header(&r, "p");
    raw_trailer(&r, 0, r.crc);
    msgpack_pack_array(&r.pk, 0);
    EXPECT_FAIL("garbage after a trailer (a msgpack array)", "garbage after trailer");

    raw_init(&r);
    raw_header(&r, "p");
    raw_trailer(&r, 0, r.crc);
    msgpack_sbuffer_write(&r.sb, "\n", 1);
    EXPECT_FAIL("a newline after a trailer", "garbage after trailer");

    raw_init(&r);
    raw_header(&r, "p");
    raw_trailer(&r, 0, r.crc);
    raw_record(&r, "x", "u8", 1, sh, 2);
    EXPECT_FAIL("a record after a trailer", "garbage after trailer: a record");

    raw_init(&r);
    raw_header(&r, "p");
    raw_header(&r, "q");
    EXPECT_FAIL("a header inside a stream", "a stream header inside stream 0");

    raw_init(&r);
    raw_record(&r, "x", "u8", 1, sh, 2);
    EXPECT_FAIL("a record first", "not a dbt stream");

    raw_init(&r);
    msgpack_pack_map(&r.pk, 3);
    pstr(&r, "format");
    pstr(&r, "dbt");
    pstr(&r, "version");
    msgpack_pack_int(&r.pk, 2);
    pstr(&r, "kind");
    pstr(&r, "p");
    raw_trailer(&r, 0, 0);
    EXPECT_FAIL("version 2", "dbt version 2 (this reader knows version 1)");

    raw_init(&r);
    msgpack_pack_map(&r.pk, 4);
    pstr(&r, "format");
    pstr(&r, "dbt");
    pstr(&r, "version");
    msgpack_pack_int(&r.pk, 1);
    pstr(&r, "kind");
    pstr(&r, "p");
    pstr(&r, "kind");
    pstr(&r, "q");
    EXPECT_FAIL("a duplicate key", "duplicate key 'kind'");

    raw_init(&r);
    raw_header(&r, "p");
    msgpack_pack_map(&r.pk, 4);
    pstr(&r, "end");
    msgpack_pack_true(&r.pk);
    pstr(&r, "count");
    msgpack_pack_uint64(&r.pk, 0);
    pstr(&r, "crc32c");
    msgpack_pack_uint32(&r.pk, r.crc);
    pstr(&r, "error");
    pstr(&r, "GPU fell over");
    EXPECT_FAIL("an aborted stream", "stream aborted by its writer after 0 records: GPU fell over");

    tap_ok(read_all_mem("", 0, NULL, &e, &n) == -1 && has(&e, "empty input"), "empty input refused: %s", e.msg);
    tap_ok(read_all_mem("\xc1", 1, NULL, &e, &n) == -1 && has(&e, "not a msgpack type"), "byte 0xc1 refused: %s",
           e.msg);
#undef EXPECT_FAIL
}

/* ---- pipes -------------------------------------------------------------------- */

typedef struct pipe_job {
    int fd;
    const char *bytes;
    size_t n;
    const char *sample_path;
} pipe_job;

static int write_sample_stdout(void *arg)
{
    pipe_job *j = arg;
    dup2(j->fd, 1);
    close(j->fd);
    db_err e = {0};
    if (write_sample("-", &e)) {
        fprintf(stderr, "# child: %s\n", e.msg);
        return 1;
    }
    return 0;
}

/* Dribble bytes one at a time so objects straddle many reads. */
static int dribble(void *arg)
{
    pipe_job *j = arg;
    for (size_t i = 0; i < j->n; i++)
        if (write(j->fd, j->bytes + i, 1) != 1)
            return 1;
    close(j->fd);
    return 0;
}

/* Write in chunks of pseudo-random size (1 byte to 100 kB), pausing now and
 * then, so reads end anywhere: inside headers, inside tensor data, between
 * objects, while the reader's buffer is growing or compacting. */
static int chunky(void *arg)
{
    pipe_job *j = arg;
    uint32_t x = 12345;
    for (size_t i = 0; i < j->n;) {
        x = x * 1664525u + 1013904223u;
        size_t k = (x >> 8) % 4 == 0 ? (x >> 12) % 16 + 1 : (x >> 12) % 100000 + 1;
        if (k > j->n - i)
            k = j->n - i;
        ssize_t w = write(j->fd, j->bytes + i, k);
        if (w <= 0)
            return 1;
        i += (size_t)w;
        if ((x >> 20) % 8 == 0)
            usleep(200);
    }
    close(j->fd);
    return 0;
}

/* Run the reader on "-" with the pipe's read end as stdin. */
static int with_stdin(int fd, int copies, db_err *e, char *why, size_t wn)
{
    int saved = dup(0);
    dup2(fd, 0);
    close(fd);
    int ok = check_sample_source("-", NULL, copies, e, why, wn);
    dup2(saved, 0);
    close(saved);
    return ok;
}

static void test_pipes(const char *dir)
{
    char why[256];
    db_err e = {0};
    int p[2];
    if (pipe(p))
        return;
    pipe_job j = {.fd = p[1]};
    pid_t pid = spawn(write_sample_stdout, &j);
    close(p[1]);
    int ok = with_stdin(p[0], 1, &e, why, sizeof why);
    tap_ok(ok && reap(pid) == 0, "'-': child writes stdout, parent reads stdin: %s", why);

    char *a;
    size_t an;
    char path[1024];
    snprintf(path, sizeof path, "%s/sample.dbt", dir);
    if (db_read_file(path, 1 << 24, &a, &an, &e))
        return;
    char *two = malloc(2 * an);
    memcpy(two, a, an);
    memcpy(two + an, a, an);
    if (pipe(p))
        return;
    pipe_job d = {.fd = p[1], .bytes = two, .n = 2 * an};
    pid = spawn(dribble, &d);
    close(p[1]);
    ok = with_stdin(p[0], 2, &e, why, sizeof why);
    tap_ok(ok && reap(pid) == 0, "two streams through a pipe one byte per write: %s", why);
    free(two);
    free(a);

    /* records of awkward sizes around the 64 KiB first buffer, in random
     * chunks; then the same stream cut short */
    static const size_t sizes[] = {1, 65536, 3, 70001, 200003, 65472, 0, 131072, 5, 1000000};
    raw rw;
    raw_init(&rw);
    raw_header(&rw, "chunky");
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int64_t sh[1] = {(int64_t)sizes[i]};
        raw_record(&rw, "u", "u8", 1, sh, sizes[i]);
    }
    raw_trailer(&rw, rw.count, rw.crc);
    for (int cut = 0; cut < 2; cut++) {
        if (pipe(p))
            break;
        pipe_job c = {.fd = p[1], .bytes = rw.sb.data, .n = cut ? rw.sb.size * 2 / 3 : rw.sb.size};
        pid = spawn(chunky, &c);
        close(p[1]);
        int saved = dup(0);
        dup2(p[0], 0);
        close(p[0]);
        db_dbt_reader *r;
        db_dbt_record rec;
        int n = 0, good = 1, rc = -1;
        uint8_t *want = malloc(1000001);
        fill(want, 1000000, 7);
        if (!db_dbt_open_read(&r, "-", NULL, &e)) {
            while ((rc = db_dbt_next(r, &rec, &e)) == 1) {
                good &= rec.nbytes == sizes[n] && !memcmp(rec.data, want, rec.nbytes) && (uintptr_t)rec.data % 64 == 0;
                n++;
            }
            db_dbt_reader_close(r);
        }
        free(want);
        dup2(saved, 0);
        close(saved);
        int child = reap(pid);
        if (cut)
            tap_ok(rc == -1 && has(&e, "stdin: truncated stream (") && good && child == 0,
                   "the same stream cut at 2/3: %d good records, then refused: %s", n, e.msg);
        else
            tap_ok(rc == 0 && n == 10 && good && child == 0,
                   "records of 0 B to 1 MB around the buffer size, written in random chunks: %d read %s", n, e.msg);
    }
    raw_free(&rw);

    /* a record far bigger than the first buffer, through a pipe */
    snprintf(path, sizeof path, "%s/big.dbt", dir);
    db_dbt_writer *w;
    size_t nf = 3u << 20; /* 12 MiB */
    float *v = malloc(nf * sizeof *v);
    fill(v, nf * sizeof *v, 99);
    int64_t sh[2] = {3 << 10, 1 << 10};
    ok = !db_dbt_open_write(&w, path, NULL, &e) && !db_dbt_write_header(w, "big", NULL, 0, &e) &&
         !db_dbt_write_record(w, "a", DB_F32, 2, sh, v, NULL, 0, &e) &&
         !db_dbt_write_record(w, "b", DB_F32, 2, sh, v, NULL, 0, &e) && !db_dbt_close(w, &e);
    /* cat big.dbt big.dbt | reader "-" */
    int saved = dup(0);
    int q[2];
    ok = ok && !pipe(q);
    pid_t cp = -1;
    if (ok) {
        fflush(NULL);
        cp = fork();
        if (cp == 0) {
            dup2(q[1], 1);
            close(q[0]);
            close(q[1]);
            execl("/bin/cat", "cat", path, path, (char *)NULL);
            _exit(127);
        }
        close(q[1]);
        dup2(q[0], 0);
        close(q[0]);
    }
    db_dbt_reader *r;
    db_dbt_record rec;
    int n = 0, good = 1, rc = -1;
    if (ok && !db_dbt_open_read(&r, "-", NULL, &e)) {
        while ((rc = db_dbt_next(r, &rec, &e)) == 1) {
            n++;
            good &= rec.nbytes == nf * sizeof *v && !memcmp(rec.data, v, rec.nbytes) && (uintptr_t)rec.data % 64 == 0;
        }
        db_dbt_reader_close(r);
    }
    dup2(saved, 0);
    close(saved);
    tap_ok(ok && rc == 0 && n == 4 && good && reap(cp) == 0, "cat big big | reader: 4 records of 12 MiB %s", e.msg);
    free(v);
}

/* ---- ZeroMQ -------------------------------------------------------------------- */

static void test_zmq(const char *dir)
{
    char ep[1200], bound[512] = "";
    db_err e = {0};
    int rc, n;

    /* ipc: the reader (collector) binds, the writer connects */
    snprintf(ep, sizeof ep, "ipc://%s/one.ipc", dir);
    producer p0 = {.target = ep, .kind = "p0", .n = 50};
    pid_t pid = spawn(produce, &p0);
    n = collect(ep, 1, &rc, &e);
    tap_ok(n == 50 && rc == 0 && reap(pid) == 0, "ipc:// one producer, 50 records in order (%d) %s", n, e.msg);

    /* tcp on loopback: reader binds an ephemeral port, a thread writes */
    pthread_t th;
    producer p1 = {.kind = "p0", .n = 200};
    db_dbt_reader *r;
    int ok = !db_dbt_open_read(&r, "tcp://127.0.0.1:*?bind&timeout=10000", NULL, &e);
    const char *bep = ok ? db_dbt_reader_endpoint(r) : NULL;
    ok = ok && bep && !strncmp(bep, "tcp://127.0.0.1:", 16);
    if (ok) {
        snprintf(bound, sizeof bound, "%s", bep);
        p1.target = bound;
        pthread_create(&th, NULL, produce_thread, &p1);
        db_dbt_record rec;
        n = 0;
        while ((rc = db_dbt_next(r, &rec, &e)) == 1)
            n += rec.index == (uint64_t)n && !strcmp(rec.stream->kind, "p0");
        pthread_join(th, NULL);
    }
    if (r)
        db_dbt_reader_close(r);
    tap_ok(ok && rc == 0 && n == 200 && !p1.err[0], "tcp://127.0.0.1 (bound port %s): 200 records from a thread %s",
           bound, e.msg);

    /* fan-in: two producers, one collector, ?streams=2 */
    snprintf(ep, sizeof ep, "ipc://%s/fan.ipc", dir);
    char epn[1300];
    snprintf(epn, sizeof epn, "%s?streams=2", ep);
    producer a = {.target = ep, .kind = "p0", .n = 40, .pause_us = 300};
    producer b = {.target = ep, .kind = "p1", .n = 40, .pause_us = 200};
    pid_t pa = spawn(produce, &a), pb = spawn(produce, &b);
    n = collect(epn, 0, &rc, &e);
    int ra = reap(pa), rb = reap(pb);
    tap_ok(n == 80 && rc == 0 && ra == 0 && rb == 0,
           "fan-in: 2 producers -> 1 collector (?streams=2), 80 records, each stream in order (%d) %s", n, e.msg);

    /* a producer that aborts: the collector fails at once */
    snprintf(ep, sizeof ep, "ipc://%s/abort.ipc", dir);
    producer c = {.target = ep, .kind = "p0", .n = 10, .abort_after = 3};
    pid = spawn(produce, &c);
    n = collect(ep, 1, &rc, &e);
    tap_ok(rc == -1 && has(&e, "aborted by its writer after 3 records: producer gave up") && reap(pid) == 0,
           "producer abort reaches the reader: %s", e.msg);

    /* nobody sends: the reader's timeout ends the wait */
    snprintf(ep, sizeof ep, "ipc://%s/silent.ipc?timeout=200", dir);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = read_all_path(ep, NULL, &e, &n);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    tap_ok(rc == -1 && has(&e, "no message within the receive timeout") && has(&e, "0 of 1 streams finished") &&
               ms < 5000,
           "receive timeout (%.0f ms): %s", ms, e.msg);

    /* nobody receives: close reports undelivered data after the linger time */
    snprintf(ep, sizeof ep, "ipc://%s/nobody.ipc?linger=200", dir);
    db_dbt_writer *w;
    ok = !db_dbt_open_write(&w, ep, NULL, &e) && !db_dbt_write_header(w, "p0", NULL, 0, &e);
    tap_ok(ok && db_dbt_close(w, &e) == -1 && has(&e, "not all messages delivered within 200 ms"),
           "writer close without a reader fails after linger: %s", e.msg);

    /* a message that is not [id, object] */
    snprintf(ep, sizeof ep, "ipc://%s/raw.ipc", dir);
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(s, ep);
    zmq_send(s, "\x80", 1, 0);
    rc = read_all_path(ep, &(db_dbt_ropts){.timeout_ms = ZMQ_TIMEOUT}, &e, &n);
    tap_ok(rc == -1 && has(&e, "not [8-byte stream id, dbt object]"), "single-frame message refused: %s", e.msg);
    /* the 6-byte array claiming 10^8 entries as a complete message */
    zmq_send(s, "12345678", 8, ZMQ_SNDMORE);
    zmq_send(s, "\xdd\x05\xf5\xe1\x00\xc0", 6, 0);
    rc = read_all_path(ep, &(db_dbt_ropts){.timeout_ms = ZMQ_TIMEOUT}, &e, &n);
    tap_ok(rc == -1 && has(&e, "claims 100000000 entries") && has(&e, "stream 3132333435363738"),
           "message claiming 10^8 entries refused without allocating: %s", e.msg);
    zmq_send(s, "12345678", 8, ZMQ_SNDMORE);
    zmq_send(s, "\x81\xa4name\xa1x", 8, 0);
    rc = read_all_path(ep, &(db_dbt_ropts){.timeout_ms = ZMQ_TIMEOUT}, &e, &n);
    tap_ok(rc == -1 && has(&e, "a record from a stream that sent no header"), "record without a header refused: %s",
           e.msg);
    zmq_close(s);
    zmq_ctx_term(ctx);

    /* a producer dies mid-stream and no other is connected: the reader fails
     * after the grace period (1 s with ?heartbeat=100), long before its
     * receive timeout, and names the cut stream */
    snprintf(ep, sizeof ep, "ipc://%s/cut.ipc", dir);
    snprintf(epn, sizeof epn, "%s?heartbeat=100", ep);
    producer d = {.target = ep, .kind = "p0", .n = 10, .die_after = 3};
    pid = spawn(produce, &d);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    n = collect(epn, 1, &rc, &e);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    tap_ok(rc == -1 && n == 3 && has(&e, "every producer disconnected with 1 stream unfinished") &&
               has(&e, "unfinished: stream ") && has(&e, "(p0, 3 records)") && ms < ZMQ_TIMEOUT / 2 && reap(pid) == 0,
           "producer gone mid-stream: reader fails in %.0f ms (timeout %d): %s", ms, ZMQ_TIMEOUT, e.msg);

    /* one producer dies mid-stream while another is alive: the reader keeps
     * taking the live one's records, and fails only once it has left too */
    snprintf(ep, sizeof ep, "ipc://%s/half.ipc", dir);
    snprintf(epn, sizeof epn, "%s?streams=2&heartbeat=100", ep);
    producer h = {.target = ep, .kind = "p0", .n = 10, .die_after = 3},
             l = {.target = ep, .kind = "p1", .n = 40, .pause_us = 40000};
    pa = spawn(produce, &h);
    pb = spawn(produce, &l);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    n = collect(epn, 0, &rc, &e);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    ra = reap(pa);
    rb = reap(pb);
    tap_ok(rc == -1 && n == 43 && has(&e, "1 of 2 streams finished; unfinished: stream ") &&
               has(&e, "(p0, 3 records)") && ms < ZMQ_TIMEOUT / 2 && ra == 0 && rb == 0,
           "one of two producers dies: the other's 40 records still arrive, then the cut is reported (%d records, "
           "%.0f ms): %s", n, ms, e.msg);

    /* a producer that sent its trailer and left is complete: with no stream
     * open the reader waits (past the grace) for the next producer */
    snprintf(ep, sizeof ep, "ipc://%s/gone.ipc", dir);
    snprintf(epn, sizeof epn, "%s?streams=2&heartbeat=100", ep);
    producer f = {.target = ep, .kind = "p0", .n = 5}, g = {.target = ep, .kind = "p1", .n = 5, .delay_ms = 2500};
    db_err_clear(&e);
    pa = spawn(produce, &f);
    pb = spawn(produce, &g);
    n = collect(epn, 0, &rc, &e);
    ra = reap(pa);
    rb = reap(pb);
    tap_ok(n == 10 && rc == 0 && ra == 0 && rb == 0,
           "a producer that finished and left, then another 2.5 s later: clean (%d records) %s", n, e.msg);
}

/* ---- Python ------------------------------------------------------------------- */

/* Run a command and capture its stdout. */
static int run_capture(const char *cmd, char *out, size_t n)
{
    fflush(NULL);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    size_t k = fread(out, 1, n - 1, f);
    out[k] = 0;
    return pclose(f);
}

static void test_python(const char *dir)
{
    if (access(PY, X_OK) || system(PY " -c 'import msgpack' 2>/dev/null")) {
        tap_ok(1, "# SKIP python3 with msgpack not available");
        return;
    }
    const char *script = tap_path("tests/py/dbt_example.py");
    char cmd[4096], out[65536], exp[65536], path[1024];
    db_err e = {0};

    /* Python writes, C reads */
    snprintf(path, sizeof path, "%s/py.dbt", dir);
    snprintf(cmd, sizeof cmd, PY " '%s' write '%s'", script, path);
    int rc = system(cmd);
    db_dbt_reader *r;
    db_dbt_record rec;
    int n = 0, good = 1, st = -1;
    if (!rc && !db_dbt_open_read(&r, path, NULL, &e)) {
        while ((st = db_dbt_next(r, &rec, &e)) == 1) {
            /* the example writes float32 arange(numel) * 0.5 records */
            const float *f = rec.data;
            int64_t numel = db_shape_numel(rec.ndim, rec.shape);
            for (int64_t i = 0; rec.dtype == DB_F32 && i < numel; i++)
                good &= f[i] == 0.5f * (float)i;
            int64_t step;
            good &= db_meta_int(&rec.meta, "step", &step) && step == n;
            n++;
        }
        db_dbt_reader_close(r);
    }
    tap_ok(!rc && st == 0 && n == 3 && good, "Python writes (tests/py/dbt_example.py), C reads %d records %s", n,
           e.msg);

    /* C writes, Python reads and checks crc and count */
    snprintf(path, sizeof path, "%s/sample.dbt", dir);
    snprintf(cmd, sizeof cmd, PY " '%s' read '%s'", script, path);
    rc = run_capture(cmd, out, sizeof out);
    exp[0] = 0;
    FILE *mf = fmemopen(exp, sizeof exp, "w");
    if (mf && !db_dbt_open_read(&r, path, NULL, &e)) {
        while (db_dbt_next(r, &rec, &e) == 1)
            print_record(mf, &rec);
        db_dbt_reader_close(r);
    }
    if (mf)
        fclose(mf);
    tap_ok(rc == 0 && !strcmp(out, exp) && strlen(exp) > 100,
           "C writes, Python reads, checks crc32c + count, and sees the same %zu bytes of summary", strlen(exp));
    if (strcmp(out, exp))
        tap_diag("python said:\n%s", out);

    /* Python refuses a corrupt stream */
    char *a;
    size_t an;
    if (!db_read_file(path, 1 << 24, &a, &an, &e)) {
        a[an - 2] ^= 1; /* inside the trailer's crc32c value */
        snprintf(path, sizeof path, "%s/py-bad.dbt", dir);
        write_file(path, a, an);
        free(a);
        snprintf(cmd, sizeof cmd, PY " '%s' read '%s' 2>&1", script, path);
        rc = run_capture(cmd, out, sizeof out);
        const char *msg = strstr(out, "error:");
        if (!msg)
            msg = out;
        tap_ok(rc != 0 && strstr(msg, "crc32c"), "Python example refuses a bad crc: %.*s", (int)strcspn(msg, "\n"),
               msg);
    }

    /* the two writers agree byte for byte on the same content */
    char cpath[1024];
    snprintf(path, sizeof path, "%s/py.dbt", dir);
    snprintf(cpath, sizeof cpath, "%s/c-py.dbt", dir);
    db_dbt_writer *w;
    int ok = !db_dbt_open_write(&w, cpath, NULL, &e);
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "tool", "dbt_example.py");
    ok = ok && !db_meta_finish(&m, &e) && !db_dbt_write_header(w, "example", m.buf, m.len, &e);
    db_meta_free(&m);
    static const int64_t exshape[3][3] = {{2, 3}, {4}, {0}};
    static const int exndim[3] = {2, 1, 0};
    for (int i = 0; ok && i < 3; i++) {
        float f[8];
        int64_t numel = db_shape_numel(exndim[i], exshape[i]);
        for (int k = 0; k < numel; k++)
            f[k] = 0.5f * (float)k;
        char name[32];
        snprintf(name, sizeof name, "t%d", i);
        db_meta_init(&m);
        db_meta_put_int(&m, "step", i);
        ok = !db_meta_finish(&m, &e) && !db_dbt_write_record(w, name, DB_F32, exndim[i], exshape[i], f, m.buf, m.len, &e);
        db_meta_free(&m);
    }
    ok = ok && !db_dbt_close(w, &e);
    char *pa = NULL, *ca = NULL;
    size_t pn = 0, cn = 0;
    ok = ok && !db_read_file(path, 1 << 20, &pa, &pn, &e) && !db_read_file(cpath, 1 << 20, &ca, &cn, &e) &&
         pn == cn && !memcmp(pa, ca, pn);
    tap_ok(ok, "Python and C writers produce identical bytes for the same content (%zu bytes)", pn);
    free(pa);
    free(ca);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "cat"))
        return cat_main(argc - 2, argv + 2);
    if (argc == 3 && !strcmp(argv[1], "sample")) {
        db_err e = {0};
        if (write_sample(argv[2], &e)) {
            fprintf(stderr, "test_dbt: error: %s\n", e.msg);
            return 1;
        }
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "hostile"))
        return hostile_main(argv[2]);
    if (argc > 1) {
        fprintf(stderr, "usage: test_dbt [cat SRC... | sample PATH | hostile DIR]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const char *dir = tap_tmpdir();
    test_walker();
    test_meta();
    test_targets();
    test_roundtrip(dir);
    test_atomic(dir);
    test_hostile();
    test_pipes(dir);
    test_zmq(dir);
    test_python(dir);
    return tap_done();
}
