/* ZeroMQ transport for .dbt streams: PUSH for writers, PULL for readers.
 *
 * Each dbt object travels as one message of two frames: an 8-byte stream id
 * (random per stream, chosen by the writer) and the msgpack object.  PULL
 * fair-queues whole messages from every connected PUSH, so a collector can
 * tell several producers' streams apart by the id (fan-in).  Every socket has
 * its own context: the library keeps no global state.
 *
 * Liveness.  PULL hides its peers: a producer that dies mid-stream just stops
 * sending, which looks the same as one that is slow.  Two libzmq mechanisms
 * tell them apart without any message of our own:
 *   - ZMTP heartbeats (both roles): the I/O thread pings every interval and
 *     drops a connection that stays silent for DB_ZMQ_HEARTBEAT_MISSES
 *     intervals, so a host that went down or a cut network ends up as a
 *     disconnect, like a killed process (whose kernel closes the socket);
 *   - a socket monitor (readers): ACCEPTED / CONNECTED and DISCONNECTED
 *     events on an inproc PAIR, polled with the data socket, count the peers.
 * A reader whose caller holds open streams and whose peers are all gone has
 * nobody left to finish them: it fails after a grace period instead of
 * waiting out the receive timeout. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "dbt.h"

/* Throw away the rest of a multipart message we refuse. */
static void drain(void *sock, zmq_msg_t *m)
{
    while (zmq_msg_more(m)) {
        zmq_msg_close(m);
        zmq_msg_init(m);
        if (zmq_msg_recv(m, sock, 0) < 0)
            break;
    }
}

struct db_zsock {
    void *ctx, *sock;
    void *mon; /* readers: PAIR receiving the data socket's monitor events */
    int is_reader;
    int linger_ms;
    int timeout_ms; /* readers: receive timeout, 0 = none */
    int grace_ms;   /* readers: how long "no peers, open streams" may last */
    int peers;      /* readers: connected peers, from the monitor events */
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
    /* readers time out in zmq_poll (they also wait for monitor events) */
    z->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
    if (!is_reader && timeout_ms > 0 && zmq_setsockopt(z->sock, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms)) {
        zerr(err, z, "timeout");
        goto fail;
    }
    int hb = t->heartbeat_ms >= 0 ? t->heartbeat_ms : DB_ZMQ_HEARTBEAT_MS;
    int hb_timeout = hb * DB_ZMQ_HEARTBEAT_MISSES;
    z->grace_ms = hb_timeout > DB_ZMQ_GONE_GRACE_MS ? hb_timeout : DB_ZMQ_GONE_GRACE_MS;
    /* TTL tells the peer to drop us too when our pings stop: both ends of a
     * dead link learn of it, whichever side survived */
    if (hb > 0 && (zmq_setsockopt(z->sock, ZMQ_HEARTBEAT_IVL, &hb, sizeof hb) ||
                   zmq_setsockopt(z->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout) ||
                   zmq_setsockopt(z->sock, ZMQ_HEARTBEAT_TTL, &hb_timeout, sizeof hb_timeout))) {
        zerr(err, z, "heartbeat");
        goto fail;
    }
    /* the monitor's PAIR must be connected before the data socket binds or
     * connects: libzmq drops events that nobody is there to receive.  Each
     * socket has its own context, so a fixed inproc name cannot clash. */
    if (is_reader) {
        const char *mon_ep = "inproc://dbt-monitor";
        int zero = 0;
        if (zmq_socket_monitor(z->sock, mon_ep, ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED)) {
            zerr(err, z, "zmq_socket_monitor");
            goto fail;
        }
        /* no high-water mark: an event dropped while the caller was busy
         * between receives would skew the peer count for good (an inproc
         * pipe is unbounded when either end's limit is 0) */
        if (!(z->mon = zmq_socket(z->ctx, ZMQ_PAIR)) || zmq_setsockopt(z->mon, ZMQ_LINGER, &zero, sizeof zero) ||
            zmq_setsockopt(z->mon, ZMQ_RCVHWM, &zero, sizeof zero) || zmq_connect(z->mon, mon_ep)) {
            zerr(err, z, "monitor socket");
            goto fail;
        }
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
    if (z->mon)
        zmq_close(z->mon);
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

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Take every pending monitor event and update the peer count.  An event is
 * two frames: [u16 event, u32 value] and the endpoint; ACCEPTED / CONNECTED
 * and DISCONNECTED come in pairs per connection (a failed handshake is a
 * disconnect too), so the count cannot drift. */
static void take_events(db_zsock *z)
{
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        uint16_t ev = 0;
        if (zmq_msg_size(&m) >= 2)
            memcpy(&ev, zmq_msg_data(&m), 2);
        drain(z->mon, &m);
        zmq_msg_close(&m);
        if (ev == ZMQ_EVENT_ACCEPTED || ev == ZMQ_EVENT_CONNECTED)
            z->peers++;
        else if (ev == ZMQ_EVENT_DISCONNECTED && z->peers > 0)
            z->peers--;
    }
}

/* Wait until a message is ready: 0, or -1 at the receive timeout or when
 * every peer has been gone for the grace period while the caller has
 * open_streams without their trailers. */
static int wait_message(db_zsock *z, int open_streams, db_err *err)
{
    double start = now_ms(), gone_since = -1;
    for (;;) {
        take_events(z);
        double now = now_ms();
        long wait = -1;
        if (z->timeout_ms) {
            wait = (long)(z->timeout_ms - (now - start));
            if (wait <= 0)
                return db_err_set(err, DB_EIO, "%s: no message within the receive timeout", z->endpoint);
        }
        /* the grace covers messages still queued behind the disconnect
         * (the poll below hands them out first) and producers that reconnect
         * after a network hiccup; any event or message restarts the wait */
        if (open_streams > 0 && z->peers == 0) {
            if (gone_since < 0)
                gone_since = now;
            long left = (long)(z->grace_ms - (now - gone_since));
            if (left <= 0)
                return db_err_set(err, DB_EIO,
                                  "%s: every producer disconnected with %d stream%s unfinished (no trailer): "
                                  "a producer died mid-stream",
                                  z->endpoint, open_streams, open_streams == 1 ? "" : "s");
            if (wait < 0 || left < wait)
                wait = left;
        } else {
            gone_since = -1;
        }
        zmq_pollitem_t it[2] = {{z->sock, 0, ZMQ_POLLIN, 0}, {z->mon, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(it, 2, wait);
        if (rc < 0) {
            if (zmq_errno() == EINTR)
                continue;
            return zerr(err, z, "poll");
        }
        if (it[0].revents & ZMQ_POLLIN)
            return 0;
    }
}

static int recv_frame(db_zsock *z, zmq_msg_t *m, int flags, db_err *err)
{
    while (zmq_msg_recv(m, z->sock, flags) < 0) {
        if (zmq_errno() == EINTR)
            continue;
        if (zmq_errno() == EAGAIN)
            return db_err_set(err, DB_EIO, "%s: no message within the receive timeout", z->endpoint);
        return zerr(err, z, "receive");
    }
    return 0;
}

int db_zsock_recv(db_zsock *z, uint8_t id[8], const uint8_t **obj, size_t *n, int open_streams, db_err *err)
{
    if (z->have_msg) {
        zmq_msg_close(&z->msg);
        z->have_msg = 0;
    }
    zmq_msg_t head;
    int got;
    /* an EAGAIN after poll said readable is a spurious wakeup: wait again */
    do {
        if (wait_message(z, open_streams, err))
            return -1;
        zmq_msg_init(&head);
        got = zmq_msg_recv(&head, z->sock, ZMQ_DONTWAIT) >= 0;
        if (!got && zmq_errno() != EAGAIN && zmq_errno() != EINTR) {
            zmq_msg_close(&head);
            return zerr(err, z, "receive");
        }
        if (!got)
            zmq_msg_close(&head);
    } while (!got);
    if (zmq_msg_size(&head) != 8 || !zmq_msg_more(&head)) {
        size_t hs = zmq_msg_size(&head);
        int more = zmq_msg_more(&head);
        drain(z->sock, &head);
        zmq_msg_close(&head);
        return db_err_set(err, DB_EFORMAT,
                          "%s: message is not [8-byte stream id, dbt object] (first frame %zu bytes%s)",
                          z->endpoint, hs, more ? "" : ", no second frame");
    }
    memcpy(id, zmq_msg_data(&head), 8);
    zmq_msg_close(&head);
    zmq_msg_init(&z->msg);
    /* the frames of a message arrive together: the second is already here */
    if (recv_frame(z, &z->msg, 0, err)) {
        zmq_msg_close(&z->msg);
        return -1;
    }
    if (zmq_msg_more(&z->msg)) {
        drain(z->sock, &z->msg);
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

int db_zsock_peers(const db_zsock *z)
{
    return z->peers;
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
    if (z->mon) {
        zmq_socket_monitor(z->sock, NULL, 0);
        zmq_close(z->mon);
    }
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
