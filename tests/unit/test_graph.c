/* db_graph (kernels/ops.h) on the ctx of tap_device() (cpu, cpu-strict):
 * the capture runs nothing, each launch runs the recorded work on the
 * buffers as they are then, the graph keeps the arguments it was captured
 * with (a caller changing its struct afterwards does not reach the
 * replays, as with a CUDA graph's kernel arguments), fn's failure at a
 * launch comes back, and a failed ctx refuses a capture.  The CUDA
 * graph itself is checked by tests/gpu/test_cuda_ops.c (emulator, GPU). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda_api.h"
#include "kernels/ops.h"
#include "libcommon/sd/unet.h"
#include "tap.h"

typedef struct work {
    db_ctx *c;
    float *x, *y; /* device buffers: y = scale * x + y */
    float scale;
    size_t n;
    int *calls;   /* host counter of fn's calls */
    int fail;
} work;

static int work_run(void *arg, db_err *err)
{
    work *w = arg;
    (*w->calls)++;
    if (w->fail)
        return db_err_set(err, DB_EIO, "work: asked to fail");
    if (db_axpby_forward(w->c, w->y, w->x, w->y, w->scale, 1.0f, w->n))
        return db_err_set(err, w->c->err.code, "work: %s", w->c->err.msg);
    return 0;
}

/* A stand-in CUDA backend's graphs (no GPU: a hand-made ctx, as
 * test_ops' dispatch test): a capture records nothing and the work runs
 * (fn is called between begin and end, as by a stream capture), a launch
 * counts, and answers 1 (stale, ops.h) when asked to. */
static struct fake_graphs {
    int token, launches, frees, stale_next;
} fk;
static int fk_begin(db_ctx *c) { return 0; }
static void *fk_end(db_ctx *c) { return &fk.token; }
static int fk_launch(db_ctx *c, void *g)
{
    fk.launches++;
    if (fk.stale_next) {
        fk.stale_next = 0;
        return 1;
    }
    return 0;
}
static void fk_free(db_ctx *c, void *g) { fk.frees++; }

typedef struct count_arg {
    int *calls;
} count_arg;
static int count_run(void *arg, db_err *err)
{
    (*((count_arg *)arg)->calls)++;
    return 0;
}

/* db_unet_graph_run_on over that backend: a direct call, a record, replays;
 * a launch that answers stale drops the graph and runs the call directly,
 * and the next call records again. */
static void test_slot_stale(void)
{
    db_cuda_api api = {.abi = DB_CUDA_ABI, .graph_begin = fk_begin, .graph_end = fk_end, .graph_launch = fk_launch,
                       .graph_free = fk_free};
    db_ctx f = {.device = DB_CUDA, .threads = 1, .cuda_api = &api};
    db_unet_graph s;
    memset(&s, 0, sizeof s);
    const unsigned gen = 7;
    int calls = 0, rc = 0;
    count_arg a = {&calls};
    db_err err = {0};
    /* calls 1-3: direct, record (+ its launch), replay; 4: stale; 5: record again */
    static const int want_calls[] = {1, 2, 2, 3, 4}, want_launches[] = {0, 1, 2, 3, 4}, want_frees[] = {0, 0, 0, 1, 1};
    for (int i = 0; i < 5; i++) {
        fk.stale_next = i == 3;
        rc |= db_unet_graph_run_on(&s, &f, &gen, count_run, &a, sizeof a, NULL, &err);
        tap_ok(rc == 0 && calls == want_calls[i] && fk.launches == want_launches[i] && fk.frees == want_frees[i] &&
                   !f.err.code && (i != 3 || !s.g),
               "graph slot, call %d%s: fn ran %d times (want %d), %d launches (%d), %d graphs freed (%d)%s%s", i + 1,
               i == 3 ? " (the launch answers stale)" : "", calls, want_calls[i], fk.launches, want_launches[i],
               fk.frees, want_frees[i], rc ? ": " : "", rc ? err.msg : "");
    }
    tap_ok(s.g && !s.off, "graph slot: recorded again after the stale graph, still on");
    db_unet_graph_free(&s);
    tap_ok(fk.frees == 2, "graph slot: its graph freed with it (%d)", fk.frees);
}

int main(void)
{
    db_err err = {0};
    db_ctx *c = NULL;
    if (!tap_ok(tap_ctx_create(&c, &err) == 0, "%s ctx%s%s", tap_device(), err.code ? ": " : "", err.msg))
        return tap_done();
    enum { N = 5 };
    const float hx[N] = {1, 2, 3, 4, 5};
    float hy[N];
    float *x = db_ctx_alloc(c, sizeof hx), *y = db_ctx_alloc(c, sizeof hx);
    int calls = 0;
    db_ctx_copy(c, x, hx, sizeof hx, DB_COPY_H2D);
    db_ctx_zero(c, y, sizeof hx);
    work w = {c, x, y, 2.0f, N, &calls, 0};

    db_graph *g = NULL;
    int rc = db_graph_capture(c, &g, work_run, &w, sizeof w, &err);
    db_ctx_copy(c, hy, y, sizeof hy, DB_COPY_D2H);
    tap_ok(rc == 0 && g && hy[0] == 0.0f && hy[4] == 0.0f, "capture: 0, nothing run (y[4] = %g)", (double)hy[4]);
    w.scale = 100.0f; /* the caller's struct changes; the graph's copy does not */
    w.y = x;
    rc = db_graph_launch(g, &err) || db_graph_launch(g, &err);
    db_ctx_copy(c, hy, y, sizeof hy, DB_COPY_D2H);
    tap_ok(rc == 0 && hy[0] == 4.0f && hy[4] == 20.0f,
           "two launches: y = 2 * 2x with the captured scale and buffers (y[4] = %g, want 20)", (double)hy[4]);
    /* inputs refreshed in place reach the next launch */
    const float hx2[N] = {-1, -1, -1, -1, -1};
    db_ctx_copy(c, x, hx2, sizeof hx2, DB_COPY_H2D);
    rc = db_graph_launch(g, &err);
    db_ctx_copy(c, hy, y, sizeof hy, DB_COPY_D2H);
    tap_ok(rc == 0 && hy[0] == 2.0f && hy[4] == 18.0f, "a launch reads the inputs as they are then (y[4] = %g)",
           (double)hy[4]);
    db_graph_free(g);

    /* fn's failure: on the CPU nothing runs at the capture, so the launch
     * that runs fn fails; on CUDA fn runs during the stream capture, so the
     * capture fails with fn's message and returns 1 (run fn directly), the
     * ctx left without an error (kernels/ops.h) */
    w = (work){c, x, y, 2.0f, N, &calls, 1};
    g = NULL;
    int before = calls;
    rc = db_graph_capture(c, &g, work_run, &w, sizeof w, &err);
    if (c->device == DB_CUDA) {
        tap_ok(rc == 1 && !g && calls == before + 1 && strstr(err.msg, "asked to fail") && !c->err.code,
               "a failing fn fails the capture (cuda): %d %s", rc, err.msg);
    } else {
        const int at_capture = calls - before;
        const int lr = rc == 0 ? db_graph_launch(g, &err) : 0;
        tap_ok(rc == 0 && at_capture == 0 && lr == -1 && calls == before + 1 && strstr(err.msg, "asked to fail"),
               "a failing fn fails the launch: %s", err.msg);
    }
    db_graph_free(g);

    /* a failed ctx refuses */
    db_err_set(&c->err, DB_EIO, "earlier failure");
    g = NULL;
    rc = db_graph_capture(c, &g, work_run, &w, sizeof w, &err);
    tap_ok(rc == -1 && !g && strstr(err.msg, "earlier failure"), "a ctx with an error refuses: %d %s", rc, err.msg);
    db_ctx_clear_error(c);
    db_graph_free(NULL);

    db_ctx_free(c, x);
    db_ctx_free(c, y);
    db_ctx_destroy(c);
    test_slot_stale();
    return tap_done();
}
