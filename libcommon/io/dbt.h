/* The tensor stream (.dbt): how the tools hand tensors to each other.
 *
 * A stream is a sequence of msgpack objects: a header map, records, a trailer
 * (man/dbt.5 has the byte-level rules).  Streams concatenate, so `cat a b` is
 * a valid input, and one object is one ZeroMQ message, so the same bytes
 * travel over files, pipes and sockets.
 *
 * Writing:
 *     db_dbt_writer *w;
 *     db_meta m;  db_meta_init(&m);  db_meta_put_str(&m, "tool", "db-prep");
 *     db_dbt_open_write(&w, "out.dbt", NULL, err);          // or "-" or "tcp://host:5555"
 *     db_dbt_write_header(w, "latents", m.buf, m.len, err);   // after db_meta_finish
 *     db_dbt_write_record(w, "mean", DB_F32, 4, shape, data, NULL, 0, err);
 *     db_dbt_close(w, err);        // trailer, fsync, rename into place
 *
 * Reading:
 *     db_dbt_reader *r;  db_dbt_record rec;  int rc;
 *     db_dbt_open_read(&r, "in.dbt", NULL, err);
 *     while ((rc = db_dbt_next(r, &rec, err)) == 1) use(&rec);
 *     db_dbt_reader_close(r);      // rc 0: every stream ended with a good trailer
 *
 * Records are handed out as soon as they arrive, before the trailer that
 * vouches for them: a consumer must treat what it got as provisional until
 * db_dbt_next returns 0 (a -1 means truncated or corrupt input).
 */
#ifndef DB_DBT_H
#define DB_DBT_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"
#include "../core/tensor.h"

/* Hostile-input limits (a reader refuses anything beyond them; a writer
 * refuses to produce it). */
#define DB_DBT_VERSION 1
#define DB_DBT_MAX_NAME 4096                 /* bytes in a record name or stream kind */
#define DB_DBT_MAX_STR (1u << 20)            /* bytes in any msgpack str */
#define DB_DBT_MAX_DEPTH 32                  /* nested maps/arrays, the object itself included */
#define DB_DBT_MAX_VALUES (1u << 22)         /* msgpack values in one object */
#define DB_DBT_MAX_OBJECT (UINT64_C(1) << 32) /* default bytes in one object (4 GiB) */
#define DB_DBT_MAX_OPEN_STREAMS 4096         /* ZeroMQ fan-in: streams open at once */

/* ---- metadata: build a msgpack map ------------------------------------- */

/* A growable msgpack map under construction.  Calls never fail on their own:
 * an error (out of memory, a key where none belongs) is remembered and
 * reported by db_meta_finish, so building reads as a plain list of puts.
 *
 *     db_meta m;
 *     db_meta_init(&m);                       // opens the top-level map
 *     db_meta_put_str(&m, "caption", "a photo of sks dog");
 *     db_meta_put_map(&m, "crop");            // nested map ...
 *     db_meta_put_int(&m, "x", 12);
 *     db_meta_end(&m);                        // ... closed
 *     db_meta_put_array(&m, "size");          // array: elements take key NULL
 *     db_meta_put_int(&m, NULL, 512);
 *     db_meta_put_int(&m, NULL, 512);
 *     db_meta_end(&m);
 *     if (db_meta_finish(&m, err)) ...        // m.buf, m.len: the packed map
 *     db_meta_free(&m);
 *
 * Counts are patched in when a container closes, so callers never count. */
typedef struct db_meta {
    char *buf; /* packed bytes; a complete map after db_meta_finish */
    size_t len, cap;
    int depth; /* open containers */
    struct {
        size_t off; /* where the container's reserved 5-byte header is */
        uint32_t n; /* entries (map pairs or array elements) so far */
        int is_map;
    } open[DB_DBT_MAX_DEPTH];
    int failed; /* first error: 1 out of memory, 2 misuse */
} db_meta;

void db_meta_init(db_meta *m);
void db_meta_free(db_meta *m);
/* In a map, key is the entry's key (not NULL); in an array, key must be NULL. */
void db_meta_put_str(db_meta *m, const char *key, const char *val);
void db_meta_put_strn(db_meta *m, const char *key, const char *val, size_t n);
void db_meta_put_int(db_meta *m, const char *key, int64_t v);
void db_meta_put_float(db_meta *m, const char *key, double v); /* as float64 */
void db_meta_put_bool(db_meta *m, const char *key, int v);
void db_meta_put_nil(db_meta *m, const char *key);
void db_meta_put_bin(db_meta *m, const char *key, const void *p, size_t n);
/* Any value read from a stream (copied). */
void db_meta_put_obj(db_meta *m, const char *key, const msgpack_object *v);
/* Every pair of a map read from a stream (keys must be strings). */
void db_meta_merge(db_meta *m, const msgpack_object *map);
/* Open a nested map / array; db_meta_end closes the innermost one. */
void db_meta_put_map(db_meta *m, const char *key);
void db_meta_put_array(db_meta *m, const char *key);
void db_meta_end(db_meta *m);
/* Close the top-level map; m->buf / m->len are then the packed map. */
int db_meta_finish(db_meta *m, db_err *err);

/* ---- metadata: read a msgpack map --------------------------------------- */

/* The value under a string key of a map, or NULL (also when map is not a map). */
const msgpack_object *db_meta_get(const msgpack_object *map, const char *key);
/* 1 when key is present with a value of that kind, else 0 (outputs untouched).
 * db_meta_str gives the bytes in place: not NUL-terminated. */
int db_meta_str(const msgpack_object *map, const char *key, const char **s, size_t *len);
/* NUL-terminated malloc'd copy, or NULL (absent, not a str, contains NUL, no memory). */
char *db_meta_strdup(const msgpack_object *map, const char *key);
int db_meta_int(const msgpack_object *map, const char *key, int64_t *v);  /* ints within int64 */
int db_meta_float(const msgpack_object *map, const char *key, double *v); /* floats and ints */
int db_meta_bool(const msgpack_object *map, const char *key, int *v);

/* ---- stream targets ------------------------------------------------------ */

/* What a stream argument names.  "tcp://..." and "ipc://..." are ZeroMQ
 * endpoints, "-" is stdin/stdout, anything else a file path.  Endpoint
 * options follow a '?', joined by '&':
 *   streams=N   reader: end after N streams have sent their trailers (default 1)
 *   timeout=MS  reader: receive timeout; writer: send timeout (default none)
 *   linger=MS   writer: how long close waits to deliver (default 60000)
 *   heartbeat=MS both: ZMTP heartbeat interval (default 2000, 0 = off); a
 *               peer silent for 5 intervals is dropped as gone
 *   bind | connect  override the default role:
 *               tcp: a host of '*' binds, any other host connects;
 *               ipc: a reader binds and a writer connects (a collector). */
typedef struct db_dbt_target {
    enum { DB_DBT_FILE, DB_DBT_STDIO, DB_DBT_ZMQ } kind;
    char endpoint[512]; /* ZMQ: the endpoint without options */
    int bind;           /* ZMQ: 1 bind, 0 connect, -1 default (decided by role) */
    int streams;        /* 0: not given */
    int timeout_ms;     /* -1: not given */
    int linger_ms;      /* -1: not given */
    int heartbeat_ms;   /* -1: not given (DB_ZMQ_HEARTBEAT_MS) */
} db_dbt_target;

/* ZMTP heartbeats: ping every interval, drop a peer that stays silent for
 * DB_ZMQ_HEARTBEAT_MISSES intervals (a host that went down or a cut network
 * never closes its TCP connection; without pings nobody would notice). */
#define DB_ZMQ_HEARTBEAT_MS 2000
#define DB_ZMQ_HEARTBEAT_MISSES 5
/* A reader whose peers have all disconnected while streams are open waits
 * this long (or the heartbeat timeout, if longer) for a reconnect before it
 * calls those streams cut. */
#define DB_ZMQ_GONE_GRACE_MS 1000

int db_dbt_parse_target(db_dbt_target *t, const char *arg, db_err *err);

/* ---- writer ------------------------------------------------------------- */

typedef struct db_dbt_writer db_dbt_writer;

/* Zero means the default.  An endpoint's own ?linger= and ?timeout= win. */
typedef struct db_dbt_wopts {
    int linger_ms;  /* ZeroMQ: close waits this long to deliver; 0 = 60000 */
    int timeout_ms; /* ZeroMQ: a send that cannot proceed fails after this; 0 = wait forever */
} db_dbt_wopts;

/* Open a file (written to a temporary beside it, renamed on close), "-"
 * (stdout), or a ZeroMQ endpoint (PUSH).  opt may be NULL. */
int db_dbt_open_write(db_dbt_writer **w, const char *target, const db_dbt_wopts *opt, db_err *err);
/* Start a stream.  meta: a packed msgpack map (db_meta) or NULL for {}.
 * Ends the previous stream of this writer first, if one is open. */
int db_dbt_write_header(db_dbt_writer *w, const char *kind, const void *meta, size_t meta_len, db_err *err);
/* One tensor: ndim in [0, 8], dims >= 0, data holds numel * dtype size bytes,
 * C-contiguous little-endian.  meta as for the header. */
int db_dbt_write_record(db_dbt_writer *w, const char *name, db_dtype dtype, int ndim, const int64_t *shape,
                        const void *data, const void *meta, size_t meta_len, db_err *err);
int db_dbt_write_tensor(db_dbt_writer *w, const char *name, const db_tensor *t, const void *meta,
                        size_t meta_len, db_err *err);
/* Write the open stream's trailer; a following header starts a new stream. */
int db_dbt_end_stream(db_dbt_writer *w, db_err *err);
/* End the open stream, then commit: a file is fsynced and renamed into place,
 * stdout flushed, a ZeroMQ socket closed once everything is delivered (an
 * error if that takes longer than the linger time).  Frees w, also on failure
 * (then as db_dbt_abort). */
int db_dbt_close(db_dbt_writer *w, db_err *err);
/* Give up: a file output is removed (nothing appears under its name); on a
 * pipe or socket an open stream gets a trailer carrying `why` (NULL: "aborted"),
 * so its reader fails at once instead of waiting.  Frees w. */
void db_dbt_abort(db_dbt_writer *w, const char *why);

/* ---- reader ------------------------------------------------------------- */

typedef struct db_dbt_reader db_dbt_reader;

/* Zero means the default.  An endpoint's own ?timeout= and ?streams= win. */
typedef struct db_dbt_ropts {
    uint64_t max_object; /* bytes in one msgpack object; 0 = DB_DBT_MAX_OBJECT */
    int timeout_ms;      /* ZeroMQ: fail when no message comes for this long; 0 = wait forever */
    int streams;         /* ZeroMQ: streams to collect before the end; 0 = 1 */
} db_dbt_ropts;

/* The stream a record belongs to (its header).  kind is NUL-terminated; meta
 * is the header's "meta" map (an empty map when the header had none). */
typedef struct db_dbt_stream {
    const char *kind;
    msgpack_object meta;
    uint64_t index;  /* 0, 1, ...: order in which stream headers arrived */
    uint8_t id[8];   /* ZeroMQ producer's stream id; zeros for files and pipes */
    uint64_t offset; /* byte offset of the header in a file or pipe */
} db_dbt_stream;

/* One tensor.  Every pointer (name, data, meta's contents, stream) stays
 * valid until the next db_dbt_next or db_dbt_reader_close. */
typedef struct db_dbt_record {
    const char *name; /* NUL-terminated, at most DB_DBT_MAX_NAME bytes */
    db_dtype dtype;
    int ndim;
    int64_t shape[DB_MAXDIM];
    const void *data; /* nbytes, C-contiguous little-endian, 64-byte aligned */
    uint64_t nbytes;
    msgpack_object meta; /* map (empty when the record had none) */
    const db_dbt_stream *stream;
    uint64_t index;  /* 0, 1, ...: position within its stream */
    uint64_t offset; /* byte offset in a file or pipe (0 over ZeroMQ) */
} db_dbt_record;

/* Open a file, "-" (stdin) or a ZeroMQ endpoint (PULL).  opt may be NULL.
 * A ZeroMQ reader ends after `streams` trailers (fan-in: one stream per
 * producer), keeping each stream's checks apart by its id. */
int db_dbt_open_read(db_dbt_reader **r, const char *source, const db_dbt_ropts *opt, db_err *err);
/* Read from memory (borrowed: must outlive the reader); label names it in errors. */
int db_dbt_open_mem(db_dbt_reader **r, const void *buf, size_t len, const char *label, const db_dbt_ropts *opt,
                    db_err *err);
/* 1: a record in *rec; 0: clean end of all input (every stream had a good
 * trailer); -1: error (and every later call fails the same way). */
int db_dbt_next(db_dbt_reader *r, db_dbt_record *rec, db_err *err);
/* Streams whose trailers were checked so far. */
uint64_t db_dbt_streams_done(const db_dbt_reader *r);
/* A bound endpoint as ZeroMQ resolved it ("tcp://127.0.0.1:*?bind" gets its
 * port here), or NULL when the reader is not a bound socket. */
const char *db_dbt_reader_endpoint(const db_dbt_reader *r);
void db_dbt_reader_close(db_dbt_reader *r);

/* Copy a record into a new CPU tensor of dtype want (converted). */
int db_dbt_record_tensor(const db_dbt_record *rec, db_dtype want, db_tensor *out, db_err *err);

/* ---- building blocks, exposed for tests and the fuzzer ------------------- */

/* Check that p[0..avail) starts with one msgpack object within the limits,
 * without allocating: every claimed length and count must fit the limit, and
 * nesting must stay within DB_DBT_MAX_DEPTH.  Resumable: a state that got
 * DB_MPW_MORE continues where it stopped when called again with more bytes
 * (same start, avail grown). */
enum { DB_MPW_DONE = 0, DB_MPW_MORE = 1, DB_MPW_BAD = -1 };
typedef struct db_mpwalk {
    uint64_t off;    /* bytes checked so far; the object's size when DONE */
    uint64_t values; /* values seen */
    int depth;
    int max_depth;   /* DB_DBT_MAX_DEPTH, less where the object nests inside another */
    uint64_t rem[DB_DBT_MAX_DEPTH + 1]; /* values still owed to each open container */
    uint64_t max_object;
    char why[160]; /* reason when BAD */
} db_mpwalk;

void db_mpwalk_init(db_mpwalk *w, uint64_t max_object);
int db_mpwalk_run(db_mpwalk *w, const uint8_t *p, uint64_t avail);

/* The ZeroMQ transport under the stream (dbt_zmq.c): a PUSH (writer) or PULL
 * (reader) socket with its own context, carrying one dbt object per message
 * as two frames [8-byte stream id, object]. */
typedef struct db_zsock db_zsock;

/* t->kind must be DB_DBT_ZMQ.  timeout_ms 0: block; linger_ms: writers only;
 * max_msg: readers drop larger messages (ZMQ_MAXMSGSIZE); t->heartbeat_ms
 * (-1: DB_ZMQ_HEARTBEAT_MS, 0: off) sets ZMTP heartbeats on both roles. */
int db_zsock_open(db_zsock **z, const db_dbt_target *t, int is_reader, int timeout_ms, int linger_ms,
                  uint64_t max_msg, db_err *err);
/* Send the object a (an bytes) followed by b (bn bytes) as one frame. */
int db_zsock_send(db_zsock *z, const uint8_t id[8], const void *a, size_t an, const void *b, size_t bn,
                  db_err *err);
/* Receive one message; *obj stays valid until the next recv or close.
 * open_streams: how many streams the caller holds without their trailer.
 * Readers watch their peers (a socket monitor): when every peer has
 * disconnected while open_streams > 0, no producer is left to finish those
 * streams, so after a grace period (the heartbeat timeout, for reconnects and
 * messages still in flight) this fails with "every producer disconnected"
 * instead of waiting out the receive timeout.  Complete streams whose
 * producers left are no reason to fail: with open_streams == 0 the reader
 * waits for new producers (up to the receive timeout). */
int db_zsock_recv(db_zsock *z, uint8_t id[8], const uint8_t **obj, size_t *n, int open_streams, db_err *err);
/* Readers: peers connected now (accepted or connected, not yet disconnected). */
int db_zsock_peers(const db_zsock *z);
const char *db_zsock_endpoint(const db_zsock *z);
/* Writers: wait up to the linger time for delivery (an error if it runs
 * out); with discard, wait at most briefly.  Frees z. */
int db_zsock_close(db_zsock *z, int discard, db_err *err);

#endif
