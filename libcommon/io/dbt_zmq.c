/* ZeroMQ transport for .dbt streams: PUSH for writers, PULL for readers.
 *
 * Each dbt object travels as one message of two frames: an 8-byte stream id
 * (random per stream, chosen by the writer) and the msgpack object.  PULL
 * fair-queues whole messages from every connected PUSH, so a collector can
 * tell several producers' streams apart by the id (fan-in).  Every socket has
 * its own context: the library keeps no global state. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "dbt.h"

struct db_zsock {
    void *ctx, *sock;
    int is_reader;
    int linger_ms;
    zmq_msg_t msg; /* the last received object frame (readers) */
    int have_msg;
    char endpoint[512];  /* as given (for messages) */
    char resolved[512];  /* ZMQ_LAST_ENDPOINT after a bind */
};

static int zerr(db_err *err, const db_zsock *z, const char *what)
{
    int e = zmq_errno();
    return db_err_set(err, e == ENOMEM ? DB_ENOMEM : DB_EIO, "%s: %s: %s", z->endpoint, what, zmq_strerror(e));
}

int db_zsock_open(db_zsock **zp, const db_dbt_target *t, int is_reader, int timeout_ms, int linger_ms,
                  uint64_t max_msg, db_err *err)
{
    *zp = NULL;
    db_zsock *z = calloc(1, sizeof *z);
    if (!z)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", t->endpoint);
    snprintf(z->endpoint, sizeof z->endpoint, "%s", t->endpoint);
    z->is_reader = is_reader;
    z->linger_ms = linger_ms;
    z->ctx = zmq_ctx_new();
    if (!z->ctx) {
        zerr(err, z, "zmq_ctx_new");
        free(z);
        return -1;
    }
    z->sock = zmq_socket(z->ctx, is_reader ? ZMQ_PULL : ZMQ_PUSH);
    if (!z->sock) {
        zerr(err, z, "zmq_socket");
        goto fail;
    }
    /* readers never have anything to deliver: drop everything on close */
    int linger = is_reader ? 0 : linger_ms;
    if (zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof linger)) {
        zerr(err, z, "ZMQ_LINGER");
        goto fail;
    }
    if (timeout_ms > 0 &&
        zmq_setsockopt(z->sock, is_reader ? ZMQ_RCVTIMEO : ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms)) {
        zerr(err, z, "timeout");
        goto fail;
    }
    if (is_reader && max_msg) {
        /* a peer sending more is disconnected before we buffer it */
        int64_t mx = max_msg > INT64_MAX ? INT64_MAX : (int64_t)max_msg;
        if (zmq_setsockopt(z->sock, ZMQ_MAXMSGSIZE, &mx, sizeof mx)) {
            zerr(err, z, "ZMQ_MAXMSGSIZE");
            goto fail;
        }
    }
    /* ipc has no host to say who binds: the collector (reader) does */
    int bind = t->bind >= 0 ? t->bind : is_reader;
    if (bind) {
        if (zmq_bind(z->sock, t->endpoint)) {
            zerr(err, z, "bind");
            goto fail;
        }
        size_t n = sizeof z->resolved;
        if (zmq_getsockopt(z->sock, ZMQ_LAST_ENDPOINT, z->resolved, &n))
            snprintf(z->resolved, sizeof z->resolved, "%s", t->endpoint);
    } else if (zmq_connect(z->sock, t->endpoint)) {
        zerr(err, z, "connect");
        goto fail;
    }
    *zp = z;
    return 0;
fail:
    if (z->sock) {
        int zero = 0;
        zmq_setsockopt(z->sock, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(z->sock);
    }
    zmq_ctx_term(z->ctx);
    free(z);
    return -1;
}

int db_zsock_send(db_zsock *z, const uint8_t id[8], const void *a, size_t an, const void *b, size_t bn,
                  db_err *err)
{
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, an + bn))
        return zerr(err, z, "zmq_msg_init_size");
    memcpy(zmq_msg_data(&m), a, an);
    if (bn)
        memcpy((char *)zmq_msg_data(&m) + an, b, bn);
    /* zmq delivers all frames of a message or none: a failure between the
     * two leaves nothing half-sent on the wire */
    while (zmq_send(z->sock, id, 8, ZMQ_SNDMORE) < 0) {
        if (zmq_errno() == EINTR)
            continue;
        zmq_msg_close(&m);
        return zmq_errno() == EAGAIN ? db_err_set(err, DB_EIO, "%s: send timed out (no reader?)", z->endpoint)
                                     : zerr(err, z, "send");
    }
    while (zmq_msg_send(&m, z->sock, 0) < 0) {
        if (zmq_errno() == EINTR)
            continue;
        zmq_msg_close(&m);
        return zmq_errno() == EAGAIN ? db_err_set(err, DB_EIO, "%s: send timed out (no reader?)", z->endpoint)
                                     : zerr(err, z, "send");
    }
    return 0;
}

static int recv_frame(db_zsock *z, zmq_msg_t *m, db_err *err)
{
    while (zmq_msg_recv(m, z->sock, 0) < 0) {
        if (zmq_errno() == EINTR)
            continue;
        if (zmq_errno() == EAGAIN)
            return db_err_set(err, DB_EIO, "%s: no message within the receive timeout", z->endpoint);
        return zerr(err, z, "receive");
    }
    return 0;
}

/* Throw away the rest of a multipart message we refuse. */
static void drain(db_zsock *z, zmq_msg_t *m)
{
    while (zmq_msg_more(m)) {
        zmq_msg_close(m);
        zmq_msg_init(m);
        if (zmq_msg_recv(m, z->sock, 0) < 0)
            break;
    }
}

int db_zsock_recv(db_zsock *z, uint8_t id[8], const uint8_t **obj, size_t *n, db_err *err)
{
    if (z->have_msg) {
        zmq_msg_close(&z->msg);
        z->have_msg = 0;
    }
    zmq_msg_t head;
    zmq_msg_init(&head);
    if (recv_frame(z, &head, err)) {
        zmq_msg_close(&head);
        return -1;
    }
    if (zmq_msg_size(&head) != 8 || !zmq_msg_more(&head)) {
        size_t hs = zmq_msg_size(&head);
        int more = zmq_msg_more(&head);
        drain(z, &head);
        zmq_msg_close(&head);
        return db_err_set(err, DB_EFORMAT,
                          "%s: message is not [8-byte stream id, dbt object] (first frame %zu bytes%s)",
                          z->endpoint, hs, more ? "" : ", no second frame");
    }
    memcpy(id, zmq_msg_data(&head), 8);
    zmq_msg_close(&head);
    zmq_msg_init(&z->msg);
    if (recv_frame(z, &z->msg, err)) {
        zmq_msg_close(&z->msg);
        return -1;
    }
    if (zmq_msg_more(&z->msg)) {
        drain(z, &z->msg);
        zmq_msg_close(&z->msg);
        return db_err_set(err, DB_EFORMAT, "%s: message has more than 2 frames", z->endpoint);
    }
    z->have_msg = 1;
    *obj = zmq_msg_data(&z->msg);
    *n = zmq_msg_size(&z->msg);
    return 0;
}

const char *db_zsock_endpoint(const db_zsock *z)
{
    return z->resolved[0] ? z->resolved : NULL;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int db_zsock_close(db_zsock *z, int discard, db_err *err)
{
    if (!z)
        return 0;
    if (z->have_msg)
        zmq_msg_close(&z->msg);
    int linger = z->linger_ms;
    if (discard && linger > 2000)
        linger = 2000; /* deliver an abort trailer if it is quick, never hang */
    if (z->is_reader)
        linger = 0;
    zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(z->sock);
    /* zmq cannot tell us whether queued messages went out; zmq_ctx_term
     * blocks until they have or the linger time ran out, so the time it
     * took tells which (a reader that vanished, or never came) */
    double t0 = now_ms();
    while (zmq_ctx_term(z->ctx) && zmq_errno() == EINTR)
        ;
    double waited = now_ms() - t0;
    int rc = 0;
    if (!z->is_reader && !discard && linger > 0 && waited >= linger - 1)
        rc = db_err_set(err, DB_EIO, "%s: not all messages delivered within %d ms (is a reader running?)",
                        z->endpoint, linger);
    free(z);
    return rc;
}
