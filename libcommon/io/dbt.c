/* The tensor stream (.dbt): metadata maps, the msgpack pre-check walker,
 * the stream reader and writer.  Sockets live in dbt_zmq.c (db_zsock); this
 * file owns the format and the per-stream bookkeeping for every transport.
 *
 * Every msgpack object is checked by db_mpwalk before msgpack-c sees it:
 * msgpack-c allocates count * sizeof(msgpack_object) for a claimed array or
 * map size before reading the elements, so six hostile bytes could make it
 * allocate gigabytes.  Only a complete object, whose counts the walker has
 * proven to fit in its bytes, is handed to msgpack_unpack_next. */
#include "dbt.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "../core/crc32c.h"
#include "../core/fsutil.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dbt data is little-endian; this code hands it out without swapping"
#endif

#define DATA_ALIGN 64

/* ======================================================================
 * Metadata builder
 * ====================================================================== */

static void meta_write(db_meta *m, const void *p, size_t n)
{
    if (m->failed || !n)
        return;
    if (n > m->cap - m->len) {
        size_t cap = m->cap ? m->cap : 256;
        while (cap - m->len < n) {
            if (cap > SIZE_MAX / 2) {
                m->failed = 1;
                return;
            }
            cap *= 2;
        }
        char *nb = realloc(m->buf, cap);
        if (!nb) {
            m->failed = 1;
            return;
        }
        m->buf = nb;
        m->cap = cap;
    }
    memcpy(m->buf + m->len, p, n);
    m->len += n;
}

static int meta_pk_write(void *data, const char *buf, size_t len)
{
    meta_write(data, buf, len);
    return 0;
}

static msgpack_packer meta_packer(db_meta *m)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, m, meta_pk_write);
    return pk;
}

/* Count one entry in the innermost container and pack its key (maps only).
 * -1 when the entry must not be written. */
static int meta_entry(db_meta *m, const char *key, size_t keylen)
{
    if (m->failed)
        return -1;
    if (m->depth == 0) { /* finished, or never initialised */
        m->failed = 2;
        return -1;
    }
    __typeof__(m->open[0]) *top = &m->open[m->depth - 1];
    if (top->is_map != (key != NULL) || top->n == UINT32_MAX) {
        m->failed = 2;
        return -1;
    }
    top->n++;
    if (key) {
        msgpack_packer pk = meta_packer(m);
        msgpack_pack_str_with_body(&pk, key, keylen);
    }
    return m->failed ? -1 : 0;
}

static int meta_key(db_meta *m, const char *key)
{
    return meta_entry(m, key, key ? strlen(key) : 0);
}

static void meta_open(db_meta *m, int is_map)
{
    if (m->failed)
        return;
    if (m->depth == DB_DBT_MAX_DEPTH) {
        m->failed = 2;
        return;
    }
    /* reserve the largest header (map32/array32); db_meta_end shrinks it */
    static const char reserve[5] = {0};
    size_t off = m->len;
    meta_write(m, reserve, sizeof reserve);
    if (m->failed)
        return;
    m->open[m->depth].off = off;
    m->open[m->depth].n = 0;
    m->open[m->depth].is_map = is_map;
    m->depth++;
}

static void meta_close(db_meta *m)
{
    __typeof__(m->open[0]) *top = &m->open[--m->depth];
    uint8_t h[5];
    size_t hl;
    uint32_t n = top->n;
    if (n < 16) {
        h[0] = (uint8_t)((top->is_map ? 0x80 : 0x90) | n);
        hl = 1;
    } else if (n <= 0xffff) {
        h[0] = top->is_map ? 0xde : 0xdc;
        h[1] = (uint8_t)(n >> 8);
        h[2] = (uint8_t)n;
        hl = 3;
    } else {
        h[0] = top->is_map ? 0xdf : 0xdd;
        h[1] = (uint8_t)(n >> 24);
        h[2] = (uint8_t)(n >> 16);
        h[3] = (uint8_t)(n >> 8);
        h[4] = (uint8_t)n;
        hl = 5;
    }
    size_t body = top->off + 5;
    memcpy(m->buf + top->off, h, hl);
    memmove(m->buf + top->off + hl, m->buf + body, m->len - body);
    m->len -= 5 - hl;
}

void db_meta_init(db_meta *m)
{
    memset(m, 0, sizeof *m);
    meta_open(m, 1);
}

void db_meta_free(db_meta *m)
{
    free(m->buf);
    memset(m, 0, sizeof *m);
}

void db_meta_put_strn(db_meta *m, const char *key, const char *val, size_t n)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_str_with_body(&pk, val, n);
}

void db_meta_put_str(db_meta *m, const char *key, const char *val)
{
    db_meta_put_strn(m, key, val ? val : "", val ? strlen(val) : 0);
}

void db_meta_put_int(db_meta *m, const char *key, int64_t v)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_int64(&pk, v);
}

void db_meta_put_float(db_meta *m, const char *key, double v)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_double(&pk, v);
}

void db_meta_put_bool(db_meta *m, const char *key, int v)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    if (v)
        msgpack_pack_true(&pk);
    else
        msgpack_pack_false(&pk);
}

void db_meta_put_nil(db_meta *m, const char *key)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_nil(&pk);
}

void db_meta_put_bin(db_meta *m, const char *key, const void *p, size_t n)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_bin_with_body(&pk, p, n);
}

void db_meta_put_obj(db_meta *m, const char *key, const msgpack_object *v)
{
    if (meta_key(m, key))
        return;
    msgpack_packer pk = meta_packer(m);
    msgpack_pack_object(&pk, *v);
}

void db_meta_merge(db_meta *m, const msgpack_object *map)
{
    if (m->failed)
        return;
    if (map->type != MSGPACK_OBJECT_MAP) {
        m->failed = 2;
        return;
    }
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type != MSGPACK_OBJECT_STR) {
            m->failed = 2;
            return;
        }
        if (meta_entry(m, kv->key.via.str.ptr, kv->key.via.str.size))
            return;
        msgpack_packer pk = meta_packer(m);
        msgpack_pack_object(&pk, kv->val);
    }
}

void db_meta_put_map(db_meta *m, const char *key)
{
    if (!meta_key(m, key))
        meta_open(m, 1);
}

void db_meta_put_array(db_meta *m, const char *key)
{
    if (!meta_key(m, key))
        meta_open(m, 0);
}

void db_meta_end(db_meta *m)
{
    if (m->failed)
        return;
    if (m->depth <= 1) { /* the top-level map is closed by db_meta_finish */
        m->failed = 2;
        return;
    }
    meta_close(m);
}

int db_meta_finish(db_meta *m, db_err *err)
{
    if (m->failed == 1)
        return db_err_set(err, DB_ENOMEM, "metadata: out of memory");
    if (m->failed)
        return db_err_set(err, DB_EUSAGE,
                          "metadata: misuse (a key inside an array, none inside a map, "
                          "a container too deep, or a put after finish)");
    if (m->depth != 1)
        return db_err_set(err, DB_EUSAGE, "metadata: %d nested container(s) left open", m->depth - 1);
    meta_close(m);
    return 0;
}

/* ======================================================================
 * Metadata accessors
 * ====================================================================== */

/* msgpack-c gives empty strings a NULL pointer, which memcmp must not see. */
static int str_eq(const msgpack_object *k, const char *s, size_t n)
{
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && (!n || !memcmp(k->via.str.ptr, s, n));
}

const msgpack_object *db_meta_get(const msgpack_object *map, const char *key)
{
    if (!map || map->type != MSGPACK_OBJECT_MAP || !key)
        return NULL;
    size_t kl = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (str_eq(&map->via.map.ptr[i].key, key, kl))
            return &map->via.map.ptr[i].val;
    return NULL;
}

int db_meta_str(const msgpack_object *map, const char *key, const char **s, size_t *len)
{
    const msgpack_object *v = db_meta_get(map, key);
    if (!v || v->type != MSGPACK_OBJECT_STR)
        return 0;
    if (s)
        *s = v->via.str.size ? v->via.str.ptr : "";
    if (len)
        *len = v->via.str.size;
    return 1;
}

char *db_meta_strdup(const msgpack_object *map, const char *key)
{
    const char *s;
    size_t n;
    if (!db_meta_str(map, key, &s, &n) || memchr(s, 0, n))
        return NULL;
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

int db_meta_int(const msgpack_object *map, const char *key, int64_t *v)
{
    const msgpack_object *o = db_meta_get(map, key);
    if (!o)
        return 0;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *v = (int64_t)o->via.u64;
        return 1;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *v = o->via.i64;
        return 1;
    }
    return 0;
}

int db_meta_float(const msgpack_object *map, const char *key, double *v)
{
    const msgpack_object *o = db_meta_get(map, key);
    if (!o)
        return 0;
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *v = o->via.f64; return 1;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *v = (double)o->via.u64; return 1;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *v = (double)o->via.i64; return 1;
    default: return 0;
    }
}

int db_meta_bool(const msgpack_object *map, const char *key, int *v)
{
    const msgpack_object *o = db_meta_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return 0;
    *v = o->via.boolean;
    return 1;
}

/* ======================================================================
 * Pre-check walker
 * ====================================================================== */

void db_mpwalk_init(db_mpwalk *w, uint64_t max_object)
{
    memset(w, 0, sizeof *w);
    w->max_depth = DB_DBT_MAX_DEPTH;
    w->max_object = max_object ? max_object : DB_DBT_MAX_OBJECT;
}

static uint64_t be_uint(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

static int walk_bad(db_mpwalk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int walk_bad(db_mpwalk *w, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->why, sizeof w->why, fmt, ap);
    va_end(ap);
    return DB_MPW_BAD;
}

/* The walker only ever stops at the start of a value whose header or body
 * is not yet all there, so resuming is re-reading that one header. */
int db_mpwalk_run(db_mpwalk *w, const uint8_t *p, uint64_t avail)
{
    if (w->why[0])
        return DB_MPW_BAD;
    for (;;) {
        uint64_t o = w->off;
        if (o >= avail)
            return DB_MPW_MORE;
        uint8_t c = p[o];
        uint64_t hl = 1;  /* header bytes, type byte included */
        uint64_t len = 0; /* body bytes after the header */
        int lenbytes = 0; /* size of a big-endian length or count field */
        int container = 0, is_str = 0, is_map = 0;
        if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) {
            /* fixint, nil, false, true */
        } else if ((c & 0xf0) == 0x80) {
            container = is_map = 1;
            len = c & 0x0f;
        } else if ((c & 0xf0) == 0x90) {
            container = 1;
            len = c & 0x0f;
        } else if ((c & 0xe0) == 0xa0) {
            is_str = 1;
            len = c & 0x1f;
        } else {
            switch (c) {
            case 0xc4: lenbytes = 1; break; /* bin 8/16/32 */
            case 0xc5: lenbytes = 2; break;
            case 0xc6: lenbytes = 4; break;
            case 0xc7: lenbytes = 1; break; /* ext 8/16/32 (+ a type byte) */
            case 0xc8: lenbytes = 2; break;
            case 0xc9: lenbytes = 4; break;
            case 0xca: hl = 5; break; /* float32 */
            case 0xcb: hl = 9; break; /* float64 */
            case 0xcc: case 0xd0: hl = 2; break;
            case 0xcd: case 0xd1: hl = 3; break;
            case 0xce: case 0xd2: hl = 5; break;
            case 0xcf: case 0xd3: hl = 9; break;
            case 0xd4: hl = 2; len = 1; break; /* fixext 1/2/4/8/16: type byte + body */
            case 0xd5: hl = 2; len = 2; break;
            case 0xd6: hl = 2; len = 4; break;
            case 0xd7: hl = 2; len = 8; break;
            case 0xd8: hl = 2; len = 16; break;
            case 0xd9: is_str = 1; lenbytes = 1; break;
            case 0xda: is_str = 1; lenbytes = 2; break;
            case 0xdb: is_str = 1; lenbytes = 4; break;
            case 0xdc: container = 1; lenbytes = 2; break;
            case 0xdd: container = 1; lenbytes = 4; break;
            case 0xde: container = is_map = 1; lenbytes = 2; break;
            case 0xdf: container = is_map = 1; lenbytes = 4; break;
            default: return walk_bad(w, "byte 0x%02x at offset %" PRIu64 " is not a msgpack type", c, o);
            }
        }
        if (lenbytes) {
            hl = 1 + (uint64_t)lenbytes + (c >= 0xc7 && c <= 0xc9); /* ext carries a type byte */
            if (o + hl > avail)
                return DB_MPW_MORE;
            len = be_uint(p + o + 1, lenbytes);
        }
        if (o + hl > w->max_object)
            return walk_bad(w, "object larger than the limit of %" PRIu64 " bytes", w->max_object);
        if (o + hl > avail)
            return DB_MPW_MORE;
        /* counted once: a value whose body is missing is re-read on resume */
        if (w->values == DB_DBT_MAX_VALUES)
            return walk_bad(w, "more than %u msgpack values in one object", DB_DBT_MAX_VALUES);
        if (container) {
            uint64_t vals = is_map ? 2 * len : len; /* len < 2^32: no overflow */
            if (w->depth >= w->max_depth)
                return walk_bad(w, "containers nested deeper than %d", w->max_depth);
            /* every value takes at least one byte: a count that cannot fit
             * in the object limit is a lie, however little we have read */
            if (vals > w->max_object - (o + hl) || vals > DB_DBT_MAX_VALUES - w->values)
                return walk_bad(w, "%s at offset %" PRIu64 " claims %" PRIu64 " entries, more than fit the limits",
                                is_map ? "map" : "array", o, len);
            w->values++;
            w->off = o + hl;
            if (vals) {
                w->rem[++w->depth] = vals;
                continue;
            }
        } else {
            if (is_str && len > DB_DBT_MAX_STR)
                return walk_bad(w, "string of %" PRIu64 " bytes at offset %" PRIu64 " (limit %u)", len, o,
                                DB_DBT_MAX_STR);
            if (len > w->max_object || o + hl > w->max_object - len)
                return walk_bad(w, "object larger than the limit of %" PRIu64 " bytes", w->max_object);
            if (len > avail - (o + hl))
                return DB_MPW_MORE;
            w->values++;
            w->off = o + hl + len;
        }
        /* a value is complete: it may complete its containers in turn */
        for (;;) {
            if (w->depth == 0)
                return DB_MPW_DONE;
            if (--w->rem[w->depth] > 0)
                break;
            w->depth--;
        }
    }
}

/* ======================================================================
 * Stream names
 * ====================================================================== */

static int parse_ms(const char *v, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < 0 || x > INT32_MAX)
        return -1;
    *out = (int)x;
    return 0;
}

int db_dbt_parse_target(db_dbt_target *t, const char *arg, db_err *err)
{
    memset(t, 0, sizeof *t);
    t->bind = -1;
    t->timeout_ms = -1;
    t->linger_ms = -1;
    t->heartbeat_ms = -1;
    if (!arg || !*arg)
        return db_err_set(err, DB_EUSAGE, "empty stream name");
    if (!strcmp(arg, "-")) {
        t->kind = DB_DBT_STDIO;
        return 0;
    }
    int tcp = !strncmp(arg, "tcp://", 6);
    if (!tcp && strncmp(arg, "ipc://", 6)) {
        t->kind = DB_DBT_FILE;
        return 0;
    }
    t->kind = DB_DBT_ZMQ;
    const char *q = strchr(arg, '?');
    size_t elen = q ? (size_t)(q - arg) : strlen(arg);
    if (elen >= sizeof t->endpoint)
        return db_err_set(err, DB_EUSAGE, "%s: endpoint too long", arg);
    memcpy(t->endpoint, arg, elen);
    t->endpoint[elen] = 0;
    if (elen <= 6)
        return db_err_set(err, DB_EUSAGE, "%s: endpoint has no address", arg);
    for (const char *o = q ? q + 1 : NULL; o && *o;) {
        const char *amp = strchr(o, '&');
        size_t n = amp ? (size_t)(amp - o) : strlen(o);
        char opt[64];
        if (n >= sizeof opt)
            return db_err_set(err, DB_EUSAGE, "%s: endpoint option too long", arg);
        memcpy(opt, o, n);
        opt[n] = 0;
        int bad = 0;
        if (!strcmp(opt, "bind"))
            t->bind = 1;
        else if (!strcmp(opt, "connect"))
            t->bind = 0;
        else if (!strncmp(opt, "streams=", 8))
            bad = parse_ms(opt + 8, &t->streams) || t->streams < 1;
        else if (!strncmp(opt, "timeout=", 8))
            bad = parse_ms(opt + 8, &t->timeout_ms);
        else if (!strncmp(opt, "linger=", 7))
            bad = parse_ms(opt + 7, &t->linger_ms);
        else if (!strncmp(opt, "heartbeat=", 10))
            /* libzmq sends the TTL (misses x interval) in units of 100 ms, at most 0xffff of them */
            bad = parse_ms(opt + 10, &t->heartbeat_ms) || t->heartbeat_ms > 1000000;
        else
            return db_err_set(err, DB_EUSAGE,
                              "%s: unknown endpoint option '%s' (known: streams=N, timeout=MS, linger=MS, "
                              "heartbeat=MS, bind, connect)",
                              arg, opt);
        if (bad)
            return db_err_set(err, DB_EUSAGE, "%s: bad value in endpoint option '%s'", arg, opt);
        o = amp ? amp + 1 : NULL;
    }
    if (tcp && t->bind < 0) {
        /* tcp://HOST:PORT -- a wildcard host binds, a named one connects */
        const char *host = t->endpoint + 6, *colon = strrchr(host, ':');
        if (!colon)
            return db_err_set(err, DB_EUSAGE, "%s: tcp endpoint needs a port (tcp://host:port)", arg);
        t->bind = colon - host == 1 && host[0] == '*';
    }
    return 0;
}

/* ======================================================================
 * Reader
 * ====================================================================== */

/* One stream's header and running checks. */
typedef struct sstate {
    db_dbt_stream pub;
    char kind[DB_DBT_MAX_NAME + 1];
    uint8_t *hdr_bytes; /* our copy of the header object: hdr points into it */
    msgpack_unpacked hdr;
    uint32_t crc;   /* over header and records so far */
    uint64_t count; /* records so far */
} sstate;

struct db_dbt_reader {
    char *label; /* the source, for messages */
    uint64_t max_object;
    db_zsock *zs; /* ZeroMQ source, or NULL for bytes */

    /* byte source: a file, stdin or memory.  [pos, end) is unread input,
     * starting at byte in_off of the input. */
    int fd, own_fd;
    const uint8_t *data;
    uint8_t *own; /* == data when we allocated it */
    size_t cap, pos, end;
    int eof;
    uint64_t in_off;
    sstate *cur; /* the open stream, or NULL between streams */
    sstate *spare;

    /* ZeroMQ: open streams by id */
    sstate **open;
    size_t nopen;
    uint64_t want_streams;

    uint64_t nheaders, streams_done;
    msgpack_unpacked obj; /* the current record (or a header/trailer being looked at) */
    uint8_t *aligned;     /* 64-byte aligned copy of misaligned tensor data */
    size_t aligned_cap;
    char name[DB_DBT_MAX_NAME + 1];
    int done;
    int failed;
    db_err saved;
};

/* "LABEL: WHERE: why" with WHERE a byte offset (files, pipes) or the stream
 * id (ZeroMQ), so every error says which input and where. */
static int rd_fail(db_dbt_reader *r, const sstate *s, uint64_t off, int code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int rd_fail(db_dbt_reader *r, const sstate *s, uint64_t off, int code, const char *fmt, ...)
{
    char why[1024], where[64] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (r->zs && s) {
        int n = snprintf(where, sizeof where, "stream ");
        for (int i = 0; i < 8; i++)
            n += snprintf(where + n, sizeof where - (size_t)n, "%02x", s->pub.id[i]);
        snprintf(where + n, sizeof where - (size_t)n, ": ");
    } else if (!r->zs && off != UINT64_MAX) {
        snprintf(where, sizeof where, "byte %" PRIu64 ": ", off);
    }
    return db_err_set(&r->saved, code, "%s: %s%s", r->label, where, why);
}

static void sstate_free(sstate *s)
{
    if (s) {
        msgpack_unpacked_destroy(&s->hdr);
        free(s->hdr_bytes);
        free(s);
    }
}

static int reader_new(db_dbt_reader **rp, const char *label, const db_dbt_ropts *opt, db_err *err)
{
    db_dbt_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->label = strdup(label))) {
        free(r);
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", label);
    }
    r->fd = -1;
    r->max_object = opt && opt->max_object ? opt->max_object : DB_DBT_MAX_OBJECT;
    msgpack_unpacked_init(&r->obj);
    *rp = r;
    return 0;
}

int db_dbt_open_read(db_dbt_reader **rp, const char *source, const db_dbt_ropts *opt, db_err *err)
{
    *rp = NULL;
    db_dbt_target t;
    if (db_dbt_parse_target(&t, source, err))
        return -1;
    db_dbt_reader *r;
    if (reader_new(&r, t.kind == DB_DBT_STDIO ? "stdin" : t.kind == DB_DBT_ZMQ ? t.endpoint : source, opt, err))
        return -1;
    if (t.kind == DB_DBT_ZMQ) {
        int timeout = t.timeout_ms >= 0 ? t.timeout_ms : opt ? opt->timeout_ms : 0;
        r->want_streams = t.streams ? (uint64_t)t.streams : opt && opt->streams > 0 ? (uint64_t)opt->streams : 1;
        if (db_zsock_open(&r->zs, &t, 1, timeout, 0, r->max_object, err)) {
            db_dbt_reader_close(r);
            return -1;
        }
    } else if (t.kind == DB_DBT_STDIO) {
        r->fd = 0;
    } else {
        r->fd = open(source, O_RDONLY | O_CLOEXEC);
        if (r->fd < 0) {
            db_err_errno(err, source);
            db_dbt_reader_close(r);
            return -1;
        }
        r->own_fd = 1;
    }
    *rp = r;
    return 0;
}

int db_dbt_open_mem(db_dbt_reader **rp, const void *buf, size_t len, const char *label, const db_dbt_ropts *opt,
                    db_err *err)
{
    *rp = NULL;
    db_dbt_reader *r;
    if (reader_new(&r, label ? label : "memory", opt, err))
        return -1;
    r->data = buf;
    r->cap = r->end = len;
    r->eof = 1;
    *rp = r;
    return 0;
}

void db_dbt_reader_close(db_dbt_reader *r)
{
    if (!r)
        return;
    if (r->own_fd)
        close(r->fd);
    db_zsock_close(r->zs, 1, NULL);
    sstate_free(r->cur);
    sstate_free(r->spare);
    for (size_t i = 0; i < r->nopen; i++)
        sstate_free(r->open[i]);
    free(r->open);
    msgpack_unpacked_destroy(&r->obj);
    free(r->own);
    free(r->aligned);
    free(r->label);
    free(r);
}

uint64_t db_dbt_streams_done(const db_dbt_reader *r)
{
    return r->streams_done;
}

const char *db_dbt_reader_endpoint(const db_dbt_reader *r)
{
    return r->zs ? db_zsock_endpoint(r->zs) : NULL;
}

/* Read more input: 1 got bytes, 0 end of input, -1 error.  Compacts or
 * grows the buffer only when it is full, so each byte moves O(1) times.
 * body: where, in the unread object, the bytes of a bin (tensor data) start,
 * or 0: when we move the object we put that body on a 64-byte boundary, so a
 * big tensor needs no aligned copy later. */
static int src_fill(db_dbt_reader *r, uint64_t body)
{
    if (r->eof)
        return 0;
    if (r->end == r->cap) {
        size_t have = r->end - r->pos;
        size_t shift = (DATA_ALIGN - body % DATA_ALIGN) % DATA_ALIGN;
        size_t cap = r->cap;
        uint8_t *nb = r->own;
        if (have + shift >= cap) {
            /* geometric growth as bytes actually arrive: a header claiming
             * a huge length costs nothing until the bytes are there */
            cap = cap ? cap * 2 : 65536;
            nb = aligned_alloc(DATA_ALIGN, cap);
            if (!nb)
                return rd_fail(r, NULL, UINT64_MAX, DB_ENOMEM, "out of memory (buffering %zu bytes)", cap);
        }
        if (have)
            memmove(nb + shift, r->own + r->pos, have);
        if (nb != r->own)
            free(r->own);
        r->own = nb;
        r->data = nb;
        r->cap = cap;
        r->pos = shift;
        r->end = shift + have;
    }
    for (;;) {
        ssize_t k = read(r->fd, r->own + r->end, r->cap - r->end);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return rd_fail(r, NULL, UINT64_MAX, DB_EIO, "read: %s", strerror(errno));
        if (k == 0) {
            r->eof = 1;
            return 0;
        }
        r->end += (size_t)k;
        return 1;
    }
}

/* Where the body of the bin the walker stopped at begins, or 0. */
static uint64_t bin_body(const db_mpwalk *w, const uint8_t *p, uint64_t avail)
{
    static const uint8_t hl[3] = {2, 3, 5}; /* bin8, bin16, bin32 headers */
    if (w->off >= avail || p[w->off] < 0xc4 || p[w->off] > 0xc6)
        return 0;
    return w->off + hl[p[w->off] - 0xc4];
}

/* Next whole object from a byte source: 1 (obj, n), 0 clean end of input
 * between objects, -1 error. */
static int src_object(db_dbt_reader *r, const uint8_t **obj, size_t *n)
{
    db_mpwalk w;
    db_mpwalk_init(&w, r->max_object);
    for (;;) {
        /* (no pointer arithmetic on a buffer not yet allocated) */
        int st = r->end > r->pos ? db_mpwalk_run(&w, r->data + r->pos, r->end - r->pos) : DB_MPW_MORE;
        if (st == DB_MPW_DONE) {
            *obj = r->data + r->pos;
            *n = (size_t)w.off;
            return 1;
        }
        if (st == DB_MPW_BAD)
            return rd_fail(r, r->cur, r->in_off, DB_EFORMAT, "%s%s",
                           r->cur || !r->nheaders ? "bad msgpack: " : "garbage after trailer: ", w.why);
        int k = src_fill(r, r->end > r->pos ? bin_body(&w, r->data + r->pos, r->end - r->pos) : 0);
        if (k < 0)
            return -1;
        if (k == 0) {
            if (r->pos == r->end)
                return 0;
            return rd_fail(r, r->cur, UINT64_MAX, DB_EFORMAT,
                           "truncated stream (%" PRIu64 " records, no trailer): input ends inside the object at byte %" PRIu64,
                           r->cur ? r->cur->count : 0, r->in_off);
        }
    }
}

/* The top-level map of an object: what it is, and its fields by name. */
enum { OBJ_HEADER, OBJ_RECORD, OBJ_TRAILER };

static const char *obj_kind_name(int k)
{
    return k == OBJ_HEADER ? "a stream header" : k == OBJ_RECORD ? "a record" : "a trailer";
}

/* Classify a top-level object; duplicate keys are refused because a reader
 * that took the first and one that took the last would disagree. */
static int classify(db_dbt_reader *r, const sstate *s, uint64_t off, const msgpack_object *o, int *kind)
{
    /* between streams, anything but a header is what follows a trailer */
    const char *pre = !s && r->nheaders && !r->zs ? "garbage after trailer: " : "";
    if (o->type != MSGPACK_OBJECT_MAP)
        return rd_fail(r, s, off, DB_EFORMAT, "%snot a dbt object (a msgpack %s, expected a map)", pre,
                       o->type == MSGPACK_OBJECT_ARRAY ? "array" : "scalar");
    const msgpack_object_kv *kv = o->via.map.ptr;
    uint32_t n = o->via.map.size;
    /* quadratic, but the walker caps an object's values and real
     * top-level maps have five keys */
    for (uint32_t i = 0; i < n && i < 64; i++) {
        if (kv[i].key.type != MSGPACK_OBJECT_STR)
            return rd_fail(r, s, off, DB_EFORMAT, "%smap key %u is not a string", pre, i);
        for (uint32_t j = 0; j < i; j++)
            if (str_eq(&kv[j].key, kv[i].key.via.str.ptr, kv[i].key.via.str.size))
                return rd_fail(r, s, off, DB_EFORMAT, "%sduplicate key '%.*s'", pre,
                               (int)(kv[i].key.via.str.size > 64 ? 64 : kv[i].key.via.str.size),
                               kv[i].key.via.str.ptr);
    }
    if (n > 64)
        return rd_fail(r, s, off, DB_EFORMAT, "%stop-level map has %u keys (dbt objects have a handful)", pre, n);
    if (db_meta_get(o, "format"))
        *kind = OBJ_HEADER;
    else if (db_meta_get(o, "end"))
        *kind = OBJ_TRAILER;
    else if (db_meta_get(o, "name"))
        *kind = OBJ_RECORD;
    else
        return rd_fail(r, s, off, DB_EFORMAT, "%smap is not a dbt header, record or trailer (no 'format', 'end' or 'name' key)", pre);
    return 0;
}

/* A str field that becomes a C string: no NUL inside, at most max bytes. */
static int get_cstr(db_dbt_reader *r, const sstate *s, uint64_t off, const msgpack_object *o, const char *what,
                    const char *key, char *dst, size_t max)
{
    const msgpack_object *v = db_meta_get(o, key);
    if (!v)
        return rd_fail(r, s, off, DB_EFORMAT, "%s has no '%s'", what, key);
    if (v->type != MSGPACK_OBJECT_STR)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: '%s' is not a string", what, key);
    if (v->via.str.size > max)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: '%s' is %u bytes (limit %zu)", what, key, v->via.str.size, max);
    if (v->via.str.size && memchr(v->via.str.ptr, 0, v->via.str.size))
        return rd_fail(r, s, off, DB_EFORMAT, "%s: '%s' contains a NUL byte", what, key);
    if (v->via.str.size)
        memcpy(dst, v->via.str.ptr, v->via.str.size);
    dst[v->via.str.size] = 0;
    return 0;
}

/* The optional "meta" map (absent reads as {}). */
static int get_meta(db_dbt_reader *r, const sstate *s, uint64_t off, const msgpack_object *o, const char *what,
                    msgpack_object *meta)
{
    const msgpack_object *v = db_meta_get(o, "meta");
    if (!v) {
        memset(meta, 0, sizeof *meta);
        meta->type = MSGPACK_OBJECT_MAP;
        return 0;
    }
    if (v->type != MSGPACK_OBJECT_MAP)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: 'meta' is not a map", what);
    *meta = *v;
    return 0;
}

/* Unpack a walker-checked object.  msgpack-c refers into `bytes` for
 * str/bin, so they must outlive `u`. */
static int unpack(db_dbt_reader *r, const sstate *s, uint64_t off, msgpack_unpacked *u, const uint8_t *bytes,
                  size_t n)
{
    size_t used = 0;
    msgpack_unpack_return ur = msgpack_unpack_next(u, (const char *)bytes, n, &used);
    if (ur != MSGPACK_UNPACK_SUCCESS || used != n)
        return rd_fail(r, s, off, ur == MSGPACK_UNPACK_NOMEM_ERROR ? DB_ENOMEM : DB_EFORMAT,
                       "msgpack-c could not unpack the object (code %d)", (int)ur);
    return 0;
}

/* A header starts stream s: keep a copy of its bytes (the stream outlives
 * the input buffer), check it, start the crc. */
static int start_stream(db_dbt_reader *r, sstate *s, uint64_t off, const uint8_t *bytes, size_t n)
{
    msgpack_unpacked_destroy(&s->hdr);
    msgpack_unpacked_init(&s->hdr);
    free(s->hdr_bytes);
    s->hdr_bytes = malloc(n ? n : 1);
    if (!s->hdr_bytes)
        return rd_fail(r, s, off, DB_ENOMEM, "out of memory");
    memcpy(s->hdr_bytes, bytes, n);
    if (unpack(r, s, off, &s->hdr, s->hdr_bytes, n))
        return -1;
    const msgpack_object *h = &s->hdr.data, *v;
    const char *fmt;
    size_t flen;
    if (!db_meta_str(h, "format", &fmt, &flen) || flen != 3 || memcmp(fmt, "dbt", 3))
        return rd_fail(r, s, off, DB_EFORMAT, "not a dbt stream (header 'format' is not \"dbt\")");
    v = db_meta_get(h, "version");
    if (!v || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return rd_fail(r, s, off, DB_EFORMAT, "header has no integer 'version'");
    if (v->via.u64 != DB_DBT_VERSION)
        return rd_fail(r, s, off, DB_EUNSUPP, "dbt version %" PRIu64 " (this reader knows version %d)", v->via.u64,
                       DB_DBT_VERSION);
    if (get_cstr(r, s, off, h, "header", "kind", s->kind, DB_DBT_MAX_NAME) ||
        get_meta(r, s, off, h, "header", &s->pub.meta))
        return -1;
    s->pub.kind = s->kind;
    s->pub.index = r->nheaders++;
    s->pub.offset = r->zs ? 0 : off;
    s->crc = db_crc32c(0, bytes, n);
    s->count = 0;
    return 0;
}

/* Check a trailer against the stream it ends. */
static int end_stream(db_dbt_reader *r, sstate *s, uint64_t off, const msgpack_object *t)
{
    const msgpack_object *end = db_meta_get(t, "end"), *cnt = db_meta_get(t, "count"),
                         *crc = db_meta_get(t, "crc32c");
    const char *why;
    size_t wlen;
    if (db_meta_str(t, "error", &why, &wlen))
        return rd_fail(r, s, off, DB_EIO, "stream aborted by its writer after %" PRIu64 " records: %.*s", s->count,
                       (int)(wlen > 512 ? 512 : wlen), why);
    if (end->type != MSGPACK_OBJECT_BOOLEAN || !end->via.boolean)
        return rd_fail(r, s, off, DB_EFORMAT, "trailer: 'end' is not true");
    if (!cnt || cnt->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return rd_fail(r, s, off, DB_EFORMAT, "trailer has no unsigned 'count'");
    if (!crc || crc->type != MSGPACK_OBJECT_POSITIVE_INTEGER || crc->via.u64 > UINT32_MAX)
        return rd_fail(r, s, off, DB_EFORMAT, "trailer has no uint32 'crc32c'");
    if (cnt->via.u64 != s->count)
        return rd_fail(r, s, off, DB_EFORMAT, "trailer says %" PRIu64 " records, the stream has %" PRIu64,
                       cnt->via.u64, s->count);
    if (crc->via.u64 != s->crc)
        return rd_fail(r, s, off, DB_EFORMAT, "crc32c mismatch: trailer 0x%08" PRIx64 ", computed 0x%08" PRIx32
                       " (corrupt stream)", crc->via.u64, s->crc);
    r->streams_done++;
    return 0;
}

/* Fill rec from the record object o (already unpacked into r->obj). */
static int take_record(db_dbt_reader *r, sstate *s, uint64_t off, const uint8_t *bytes, size_t n,
                       db_dbt_record *rec)
{
    const msgpack_object *o = &r->obj.data, *v;
    char what[64];
    snprintf(what, sizeof what, "record %" PRIu64, s->count);
    if (get_cstr(r, s, off, o, what, "name", r->name, DB_DBT_MAX_NAME))
        return -1;
    /* from here on the name identifies the record in messages */
    char rw[DB_DBT_MAX_NAME + 80];
    snprintf(rw, sizeof rw, "record %" PRIu64 " '%s'", s->count, r->name);
    const char *dt;
    size_t dlen;
    if (!db_meta_str(o, "dtype", &dt, &dlen))
        return rd_fail(r, s, off, DB_EFORMAT, "%s: no string 'dtype'", rw);
    int dtype = -1;
    for (int i = 0; i < DB_NDTYPE; i++)
        if (strlen(db_dtype_name((db_dtype)i)) == dlen && !memcmp(db_dtype_name((db_dtype)i), dt, dlen))
            dtype = i;
    if (dtype < 0)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: unknown dtype '%.*s'", rw, (int)(dlen > 32 ? 32 : dlen), dt);
    v = db_meta_get(o, "shape");
    if (!v || v->type != MSGPACK_OBJECT_ARRAY)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: no array 'shape'", rw);
    if (v->via.array.size > DB_MAXDIM)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: ndim %u exceeds %d", rw, v->via.array.size, DB_MAXDIM);
    rec->ndim = (int)v->via.array.size;
    for (int i = 0; i < rec->ndim; i++) {
        const msgpack_object *d = &v->via.array.ptr[i];
        if (d->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
            return rd_fail(r, s, off, DB_EFORMAT, "%s: dim %d is negative (%" PRId64 ")", rw, i, d->via.i64);
        if (d->type != MSGPACK_OBJECT_POSITIVE_INTEGER || d->via.u64 > INT64_MAX)
            return rd_fail(r, s, off, DB_EFORMAT, "%s: dim %d is not a non-negative integer", rw, i);
        rec->shape[i] = (int64_t)d->via.u64;
    }
    int64_t nbytes = db_shape_nbytes((db_dtype)dtype, rec->ndim, rec->shape);
    if (nbytes < 0)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: shape overflows 64-bit byte count", rw);
    v = db_meta_get(o, "data");
    if (!v || v->type != MSGPACK_OBJECT_BIN)
        return rd_fail(r, s, off, DB_EFORMAT, "%s: no bin 'data'", rw);
    if ((uint64_t)v->via.bin.size != (uint64_t)nbytes) {
        char sh[160];
        return rd_fail(r, s, off, DB_EFORMAT, "%s: data is %u bytes, %s %s needs %" PRId64, rw, v->via.bin.size,
                       db_dtype_name((db_dtype)dtype), db_shape_str(sh, sizeof sh, rec->ndim, rec->shape), nbytes);
    }
    if (get_meta(r, s, off, o, rw, &rec->meta))
        return -1;
    /* consumers cast data to float* etc.: hand out aligned memory */
    const void *data = v->via.bin.ptr;
    if ((uintptr_t)data % DATA_ALIGN || !data) {
        size_t need = (size_t)nbytes ? (size_t)nbytes : 1;
        if (need > r->aligned_cap) {
            size_t cap = (need + DATA_ALIGN - 1) / DATA_ALIGN * DATA_ALIGN;
            void *nb = aligned_alloc(DATA_ALIGN, cap);
            if (!nb)
                return rd_fail(r, s, off, DB_ENOMEM, "%s: out of memory", rw);
            free(r->aligned);
            r->aligned = nb;
            r->aligned_cap = cap;
        }
        if (nbytes)
            memcpy(r->aligned, data, (size_t)nbytes);
        data = r->aligned;
    }
    rec->name = r->name;
    rec->dtype = (db_dtype)dtype;
    for (int i = rec->ndim; i < DB_MAXDIM; i++)
        rec->shape[i] = 0;
    rec->data = data;
    rec->nbytes = (uint64_t)nbytes;
    rec->stream = &s->pub;
    rec->index = s->count;
    rec->offset = r->zs ? 0 : off;
    s->crc = db_crc32c(s->crc, bytes, n);
    s->count++;
    return 0;
}

/* One object from a file, pipe or memory: 1 record, 0 consumed, -1 error. */
static int byte_object(db_dbt_reader *r, const uint8_t *bytes, size_t n, db_dbt_record *rec)
{
    uint64_t off = r->in_off;
    int kind;
    if (unpack(r, r->cur, off, &r->obj, bytes, n) || classify(r, r->cur, off, &r->obj.data, &kind))
        return -1;
    if (!r->cur) {
        if (kind != OBJ_HEADER)
            return rd_fail(r, NULL, off, DB_EFORMAT, r->nheaders ? "garbage after trailer: %s where a stream header belongs"
                                                                 : "not a dbt stream (starts with %s, not a header)",
                           obj_kind_name(kind));
        sstate *s = r->spare ? r->spare : calloc(1, sizeof *s);
        if (!s)
            return rd_fail(r, NULL, off, DB_ENOMEM, "out of memory");
        r->spare = NULL;
        r->cur = s;
        return start_stream(r, s, off, bytes, n);
    }
    sstate *s = r->cur;
    if (kind == OBJ_HEADER)
        return rd_fail(r, s, off, DB_EFORMAT,
                       "a stream header inside stream %" PRIu64 " (%" PRIu64 " records, no trailer before it)",
                       s->pub.index, s->count);
    if (kind == OBJ_TRAILER) {
        if (end_stream(r, s, off, &r->obj.data))
            return -1;
        /* keep the state's memory for the next stream */
        r->spare = s;
        r->cur = NULL;
        return 0;
    }
    return take_record(r, s, off, bytes, n, rec) ? -1 : 1;
}

static sstate *find_open(db_dbt_reader *r, const uint8_t id[8], size_t *at)
{
    for (size_t i = 0; i < r->nopen; i++)
        if (!memcmp(r->open[i]->pub.id, id, 8)) {
            *at = i;
            return r->open[i];
        }
    return NULL;
}

/* One message from ZeroMQ: 1 record, 0 consumed, -1 error. */
static int zmq_object(db_dbt_reader *r, db_dbt_record *rec)
{
    uint8_t id[8];
    const uint8_t *bytes;
    size_t n, at = 0;
    db_err e = {0};
    if (db_zsock_recv(r->zs, id, &bytes, &n, (int)r->nopen, &e)) {
        /* say which streams were left without a trailer: the caller can
         * tell from their ids and kinds which producers to rerun */
        char open[512] = "";
        size_t len = 0, i;
        for (i = 0; i < r->nopen && len + 64 < sizeof open; i++) {
            const sstate *o = r->open[i];
            len += (size_t)snprintf(open + len, sizeof open - len, "%sstream ", i ? ", " : "; unfinished: ");
            for (int b = 0; b < 8; b++)
                len += (size_t)snprintf(open + len, sizeof open - len, "%02x", o->pub.id[b]);
            len += (size_t)snprintf(open + len, sizeof open - len, " (%.40s, %" PRIu64 " record%s)", o->kind,
                                    o->count, o->count == 1 ? "" : "s");
        }
        if (i < r->nopen)
            snprintf(open + len, sizeof open - len, ", ...");
        return db_err_set(&r->saved, e.code, "%s (%" PRIu64 " of %" PRIu64 " streams finished%s)", e.msg,
                          r->streams_done, r->want_streams, open);
    }
    sstate *s = find_open(r, id, &at);
    /* for messages about a stream we do not know yet */
    sstate tmp = {0};
    memcpy(tmp.pub.id, id, 8);
    const sstate *ctx = s ? s : &tmp;
    db_mpwalk w;
    db_mpwalk_init(&w, r->max_object);
    int st = db_mpwalk_run(&w, bytes, n);
    if (st == DB_MPW_BAD)
        return rd_fail(r, ctx, 0, DB_EFORMAT, "bad msgpack: %s", w.why);
    if (st == DB_MPW_MORE)
        return rd_fail(r, ctx, 0, DB_EFORMAT, "message of %zu bytes ends inside a msgpack object", n);
    if (w.off != n)
        return rd_fail(r, ctx, 0, DB_EFORMAT, "message has %zu bytes after its msgpack object", n - (size_t)w.off);
    int kind;
    if (unpack(r, ctx, 0, &r->obj, bytes, n) || classify(r, ctx, 0, &r->obj.data, &kind))
        return -1;
    if (!s) {
        if (kind != OBJ_HEADER)
            return rd_fail(r, ctx, 0, DB_EFORMAT, "%s from a stream that sent no header", obj_kind_name(kind));
        if (r->nopen == DB_DBT_MAX_OPEN_STREAMS)
            return rd_fail(r, ctx, 0, DB_EFORMAT, "more than %d streams open at once", DB_DBT_MAX_OPEN_STREAMS);
        sstate **no = realloc(r->open, (r->nopen + 1) * sizeof *no);
        if (!no || !(s = calloc(1, sizeof *s))) {
            if (no)
                r->open = no;
            return rd_fail(r, ctx, 0, DB_ENOMEM, "out of memory");
        }
        r->open = no;
        r->open[r->nopen++] = s;
        memcpy(s->pub.id, id, 8);
        return start_stream(r, s, 0, bytes, n);
    }
    if (kind == OBJ_HEADER)
        return rd_fail(r, s, 0, DB_EFORMAT, "a second header (%" PRIu64 " records, no trailer before it)", s->count);
    if (kind == OBJ_TRAILER) {
        if (end_stream(r, s, 0, &r->obj.data))
            return -1;
        r->open[at] = r->open[--r->nopen];
        sstate_free(s);
        return 0;
    }
    return take_record(r, s, 0, bytes, n, rec) ? -1 : 1;
}

int db_dbt_next(db_dbt_reader *r, db_dbt_record *rec, db_err *err)
{
    if (r->failed) {
        if (err)
            *err = r->saved;
        return -1;
    }
    memset(rec, 0, sizeof *rec);
    for (;;) {
        if (r->done)
            return 0;
        int rc;
        if (r->zs) {
            if (r->streams_done >= r->want_streams) {
                r->done = 1;
                continue;
            }
            rc = zmq_object(r, rec);
        } else {
            const uint8_t *bytes;
            size_t n;
            rc = src_object(r, &bytes, &n);
            if (rc == 0) {
                if (r->cur)
                    rc = rd_fail(r, r->cur, UINT64_MAX, DB_EFORMAT,
                                 "truncated stream (%" PRIu64 " records, no trailer)", r->cur->count);
                else if (!r->nheaders)
                    rc = rd_fail(r, NULL, UINT64_MAX, DB_EFORMAT, "empty input (no dbt stream header)");
                else
                    r->done = 1;
                if (rc == 0)
                    continue;
            } else if (rc == 1) {
                rc = byte_object(r, bytes, n, rec);
                r->pos += n;
                r->in_off += n;
            }
        }
        if (rc < 0) {
            r->failed = 1;
            memset(rec, 0, sizeof *rec);
            if (err)
                *err = r->saved;
            return -1;
        }
        if (rc == 1)
            return 1;
    }
}

int db_dbt_record_tensor(const db_dbt_record *rec, db_dtype want, db_tensor *out, db_err *err)
{
    if (db_tensor_alloc(out, want, rec->ndim, rec->shape, err))
        return db_err_prefix(err, "record '%s'", rec->name);
    int64_t numel = db_shape_numel(rec->ndim, rec->shape);
    if (numel > 0 && db_convert(out->data, want, rec->data, rec->dtype, (size_t)numel, err)) {
        db_tensor_free(out);
        return db_err_prefix(err, "record '%s'", rec->name);
    }
    return 0;
}

/* ======================================================================
 * Writer
 * ====================================================================== */

struct db_dbt_writer {
    char *label;
    int kind;       /* DB_DBT_FILE, DB_DBT_STDIO, DB_DBT_ZMQ */
    db_outfile out; /* files: the temporary that close renames */
    FILE *f;        /* files and stdout */
    db_zsock *zs;
    uint8_t id[8]; /* ZeroMQ stream id of the open stream */
    int in_stream;
    uint64_t nstreams;
    uint32_t crc;
    uint64_t count;
    msgpack_sbuffer sb; /* the object being built (without tensor data) */
    msgpack_packer pk;
    int broken; /* an I/O error: the output can take no more bytes */
    db_err saved;
};

static int wr_io_fail(db_dbt_writer *w, db_err *err)
{
    w->broken = 1;
    w->saved = *err;
    return -1;
}

/* Write one object: a (packed fields) followed by b (tensor data). */
static int emit(db_dbt_writer *w, const void *a, size_t an, const void *b, size_t bn, int in_crc, db_err *err)
{
    if (w->kind == DB_DBT_ZMQ) {
        if (db_zsock_send(w->zs, w->id, a, an, b, bn, err))
            return wr_io_fail(w, err);
    } else if (fwrite(a, 1, an, w->f) != an || (bn && fwrite(b, 1, bn, w->f) != bn)) {
        db_err_set(err, DB_EIO, "%s: write: %s", w->label, strerror(errno));
        return wr_io_fail(w, err);
    }
    if (in_crc) {
        w->crc = db_crc32c(w->crc, a, an);
        if (bn)
            w->crc = db_crc32c(w->crc, b, bn);
    }
    return 0;
}

static void pack_cstr(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str_with_body(pk, s, strlen(s));
}

/* Refuse what a reader would refuse: a name or kind it cannot take. */
static int check_name(const db_dbt_writer *w, const char *what, const char *s, db_err *err)
{
    if (!s)
        return db_err_set(err, DB_EUSAGE, "%s: %s is NULL", w->label, what);
    size_t n = strlen(s);
    if (n > DB_DBT_MAX_NAME)
        return db_err_set(err, DB_EUSAGE, "%s: %s of %zu bytes (limit %d)", w->label, what, n, DB_DBT_MAX_NAME);
    return 0;
}

/* Caller-packed metadata must be exactly one map that nests inside its
 * object within the reader's limits. */
static int check_meta(const db_dbt_writer *w, const char *what, const void *meta, size_t len, db_err *err)
{
    if (!meta || !len)
        return 0;
    db_mpwalk mw;
    db_mpwalk_init(&mw, DB_DBT_MAX_OBJECT);
    mw.max_depth = DB_DBT_MAX_DEPTH - 1; /* the object around it is one level */
    int st = db_mpwalk_run(&mw, meta, len);
    uint8_t c = *(const uint8_t *)meta;
    if (st == DB_MPW_BAD)
        return db_err_set(err, DB_EUSAGE, "%s: %s meta: %s", w->label, what, mw.why);
    if (st == DB_MPW_MORE || mw.off != len)
        return db_err_set(err, DB_EUSAGE, "%s: %s meta is not exactly one msgpack object", w->label, what);
    if (!((c & 0xf0) == 0x80 || c == 0xde || c == 0xdf))
        return db_err_set(err, DB_EUSAGE, "%s: %s meta is not a msgpack map", w->label, what);
    if (mw.values > DB_DBT_MAX_VALUES - 64)
        return db_err_set(err, DB_EUSAGE, "%s: %s meta has too many values", w->label, what);
    return 0;
}

static void pack_meta(db_dbt_writer *w, const void *meta, size_t len)
{
    msgpack_pack_str_with_body(&w->pk, "meta", 4);
    if (meta && len)
        msgpack_sbuffer_write(&w->sb, meta, len);
    else
        msgpack_pack_map(&w->pk, 0);
}

int db_dbt_open_write(db_dbt_writer **wp, const char *target, const db_dbt_wopts *opt, db_err *err)
{
    *wp = NULL;
    db_dbt_target t;
    if (db_dbt_parse_target(&t, target, err))
        return -1;
    if (t.kind == DB_DBT_ZMQ && t.streams)
        return db_err_set(err, DB_EUSAGE, "%s: streams=N is a reader option", target);
    db_dbt_writer *w = calloc(1, sizeof *w);
    if (!w || !(w->label = strdup(t.kind == DB_DBT_STDIO ? "stdout" : t.kind == DB_DBT_ZMQ ? t.endpoint : target))) {
        free(w);
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", target);
    }
    w->kind = t.kind;
    msgpack_sbuffer_init(&w->sb);
    msgpack_packer_init(&w->pk, &w->sb, msgpack_sbuffer_write);
    int rc = 0;
    if (t.kind == DB_DBT_ZMQ) {
        int linger = t.linger_ms >= 0 ? t.linger_ms : opt && opt->linger_ms > 0 ? opt->linger_ms : 60000;
        int timeout = t.timeout_ms >= 0 ? t.timeout_ms : opt ? opt->timeout_ms : 0;
        rc = db_zsock_open(&w->zs, &t, 0, timeout, linger, 0, err);
    } else if (t.kind == DB_DBT_STDIO) {
        w->f = stdout;
    } else {
        rc = db_outfile_open(&w->out, target, err);
        w->f = w->out.f;
    }
    if (rc) {
        msgpack_sbuffer_destroy(&w->sb);
        free(w->label);
        free(w);
        return -1;
    }
    *wp = w;
    return 0;
}

int db_dbt_end_stream(db_dbt_writer *w, db_err *err)
{
    if (w->broken) {
        *err = w->saved;
        return -1;
    }
    if (!w->in_stream)
        return db_err_set(err, DB_EUSAGE, "%s: no open stream to end", w->label);
    msgpack_sbuffer_clear(&w->sb);
    msgpack_pack_map(&w->pk, 3);
    pack_cstr(&w->pk, "end");
    msgpack_pack_true(&w->pk);
    pack_cstr(&w->pk, "count");
    msgpack_pack_uint64(&w->pk, w->count);
    pack_cstr(&w->pk, "crc32c");
    msgpack_pack_uint32(&w->pk, w->crc);
    if (emit(w, w->sb.data, w->sb.size, NULL, 0, 0, err))
        return -1;
    w->in_stream = 0;
    return 0;
}

static void new_stream_id(uint8_t id[8])
{
    if (getrandom(id, 8, GRND_NONBLOCK) == 8)
        return;
    /* no entropy yet (early boot): distinct enough for demultiplexing */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t v = (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec << 30 ^ (uint64_t)getpid() << 48 ^ (uintptr_t)id;
    memcpy(id, &v, 8);
}

int db_dbt_write_header(db_dbt_writer *w, const char *kind, const void *meta, size_t meta_len, db_err *err)
{
    if (w->broken) {
        *err = w->saved;
        return -1;
    }
    if (check_name(w, "stream kind", kind, err) || check_meta(w, "header", meta, meta_len, err))
        return -1;
    if (w->in_stream && db_dbt_end_stream(w, err))
        return -1;
    new_stream_id(w->id);
    msgpack_sbuffer_clear(&w->sb);
    msgpack_pack_map(&w->pk, 4);
    pack_cstr(&w->pk, "format");
    pack_cstr(&w->pk, "dbt");
    pack_cstr(&w->pk, "version");
    msgpack_pack_int(&w->pk, DB_DBT_VERSION);
    pack_cstr(&w->pk, "kind");
    pack_cstr(&w->pk, kind);
    pack_meta(w, meta, meta_len);
    if (!w->sb.data)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", w->label);
    w->crc = 0;
    w->count = 0;
    if (emit(w, w->sb.data, w->sb.size, NULL, 0, 1, err))
        return -1;
    w->in_stream = 1;
    w->nstreams++;
    return 0;
}

int db_dbt_write_record(db_dbt_writer *w, const char *name, db_dtype dtype, int ndim, const int64_t *shape,
                        const void *data, const void *meta, size_t meta_len, db_err *err)
{
    if (w->broken) {
        *err = w->saved;
        return -1;
    }
    if (!w->in_stream)
        return db_err_set(err, DB_EUSAGE, "%s: record before a stream header", w->label);
    if (check_name(w, "record name", name, err))
        return -1;
    if ((unsigned)dtype >= DB_NDTYPE)
        return db_err_set(err, DB_EUSAGE, "%s: record '%s': invalid dtype %d", w->label, name, (int)dtype);
    if (ndim < 0 || ndim > DB_MAXDIM || (ndim && !shape))
        return db_err_set(err, DB_EUSAGE, "%s: record '%s': ndim %d outside [0, %d]", w->label, name, ndim,
                          DB_MAXDIM);
    int64_t nbytes = db_shape_nbytes(dtype, ndim, shape);
    if (nbytes < 0)
        return db_err_set(err, DB_EUSAGE, "%s: record '%s': negative or overflowing shape", w->label, name);
    if (nbytes && !data)
        return db_err_set(err, DB_EUSAGE, "%s: record '%s': no data", w->label, name);
    if (check_meta(w, "record", meta, meta_len, err))
        return -1;
    msgpack_sbuffer_clear(&w->sb);
    msgpack_pack_map(&w->pk, 5);
    pack_cstr(&w->pk, "name");
    pack_cstr(&w->pk, name);
    pack_cstr(&w->pk, "dtype");
    pack_cstr(&w->pk, db_dtype_name(dtype));
    pack_cstr(&w->pk, "shape");
    msgpack_pack_array(&w->pk, (size_t)ndim);
    for (int i = 0; i < ndim; i++)
        msgpack_pack_int64(&w->pk, shape[i]);
    pack_meta(w, meta, meta_len);
    /* data last: a reader streaming a big record has seen the rest first */
    pack_cstr(&w->pk, "data");
    msgpack_pack_bin(&w->pk, (size_t)nbytes);
    if (!w->sb.data)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", w->label);
    if ((uint64_t)nbytes > UINT32_MAX || (uint64_t)nbytes + w->sb.size > DB_DBT_MAX_OBJECT)
        return db_err_set(err, DB_EUSAGE,
                          "%s: record '%s' is %" PRId64 " bytes; one dbt object holds at most 4 GiB (split the tensor)",
                          w->label, name, nbytes);
    if (emit(w, w->sb.data, w->sb.size, data, (size_t)nbytes, 1, err))
        return -1;
    w->count++;
    return 0;
}

int db_dbt_write_tensor(db_dbt_writer *w, const char *name, const db_tensor *t, const void *meta, size_t meta_len,
                        db_err *err)
{
    if (t->device != DB_CPU)
        return db_err_set(err, DB_EUSAGE, "%s: record '%s': tensor is not in CPU memory", w->label, name);
    return db_dbt_write_record(w, name, t->dtype, t->ndim, t->shape, t->data, meta, meta_len, err);
}

static void writer_free(db_dbt_writer *w)
{
    msgpack_sbuffer_destroy(&w->sb);
    free(w->label);
    free(w);
}

void db_dbt_abort(db_dbt_writer *w, const char *why)
{
    if (!w)
        return;
    if (w->kind == DB_DBT_FILE) {
        db_outfile_abort(&w->out);
    } else {
        /* bytes already went out: tell the reader, so it fails now rather
         * than at a timeout or by calling it truncated */
        if (w->in_stream && !w->broken) {
            msgpack_sbuffer_clear(&w->sb);
            msgpack_pack_map(&w->pk, 4);
            pack_cstr(&w->pk, "end");
            msgpack_pack_true(&w->pk);
            pack_cstr(&w->pk, "count");
            msgpack_pack_uint64(&w->pk, w->count);
            pack_cstr(&w->pk, "crc32c");
            msgpack_pack_uint32(&w->pk, w->crc);
            pack_cstr(&w->pk, "error");
            pack_cstr(&w->pk, why && *why ? why : "aborted");
            db_err e;
            if (w->sb.data)
                emit(w, w->sb.data, w->sb.size, NULL, 0, 0, &e);
        }
        if (w->kind == DB_DBT_STDIO)
            fflush(w->f);
        db_zsock_close(w->zs, 1, NULL);
    }
    writer_free(w);
}

int db_dbt_close(db_dbt_writer *w, db_err *err)
{
    if (!w)
        return 0;
    if (w->broken) {
        *err = w->saved;
        db_dbt_abort(w, NULL);
        return -1;
    }
    if (!w->nstreams) {
        db_err_set(err, DB_EUSAGE, "%s: nothing written (no stream header)", w->label);
        db_dbt_abort(w, NULL);
        return -1;
    }
    if (w->in_stream && db_dbt_end_stream(w, err)) {
        db_dbt_abort(w, NULL);
        return -1;
    }
    int rc = 0;
    if (w->kind == DB_DBT_FILE) {
        rc = db_outfile_commit(&w->out, err);
    } else if (w->kind == DB_DBT_STDIO) {
        if (fflush(w->f))
            rc = db_err_set(err, DB_EIO, "%s: write: %s", w->label, strerror(errno));
    } else {
        rc = db_zsock_close(w->zs, 0, err);
    }
    writer_free(w);
    return rc;
}
