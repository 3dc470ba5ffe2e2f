/* CLIP text encoder vs transformers 4.26 (tests/data/refs/text_encoder.safetensors,
 * made from the tiny-dev model): last_hidden_state, penultimate_ln ("clip
 * skip 2"), every hidden state and pooler_output within relative L2 1e-4,
 * for every id row of the reference, from the diffusers folder and from the
 * .ckpt (same numbers: the layout must not matter).  Plus batch
 * independence, a negative control and bad input.  On the device of
 * $DB_TEST_DEVICE (tap.h; cpu by default): the outputs and the hidden
 * states are that device's buffers (clip.h), fetched to the host to be
 * compared; the ids stay host memory, as db_clip_forward takes them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/sd/clip.h"
#include "tap.h"

#define TOL 1e-4

/* c: host memory (a fetched output). */
static void check(const char *what, const float *c, const float *r, size_t n)
{
    tap_cmp m = tap_compare(c, r, n);
    tap_ok(m.rel <= TOL, "%s: %s: rel L2 %.3g (max |err| %.3g at %zu: %.7g vs %.7g)", tap_device(), what, m.rel,
           m.maxabs, m.at, n ? c[m.at] : 0.0, n ? r[m.at] : 0.0);
}

/* A reference tensor as f32 (or i32 when want is DB_I32); exits on a
 * broken fixture (the test cannot run without it). */
static void *ref(db_tindex *ix, const char *name, db_dtype want, int64_t *shape, int ndim)
{
    long k = db_tindex_find(ix, name);
    db_tensor t;
    db_err e = {0};
    if (k < 0 || ix->v[k].ndim != ndim || db_tindex_load(ix, (size_t)k, want, &t, &e)) {
        tap_ok(0, "reference tensor '%s' (%d dims): %s", name, ndim, k < 0 ? "missing" : e.msg);
        exit(tap_done());
    }
    for (int d = 0; d < ndim; d++)
        shape[d] = t.shape[d];
    return t.data;
}

typedef struct refs {
    int B, T, D, nh;  /* sequences, tokens, width, hidden states (L+1) */
    int32_t *ids;     /* (B, T) */
    float *last;      /* (B, T, D) */
    float *penult;    /* (B, T, D) */
    float *hidden;    /* (L+1, B, T, D) */
    float *pooled;    /* (B, D) */
} refs;

/* Host copies of the outputs (hidden: every hidden state), and the device
 * buffers the forward wrote (on the CPU the same memory: tap_mirror). */
typedef struct outs {
    float *last, *penult, *pooled, *hidden;
    float *d_last, *d_penult, *d_pooled;
} outs;

/* Run the encoder of the model at `rel` on the reference ids; check every
 * output; keep the outputs in o. */
static db_clip *run_model(db_ctx *ctx, const char *rel, const refs *r, outs *o, db_model *m)
{
    db_err e = {0};
    const size_t N = (size_t)r->B * r->T, ND = N * r->D;
    if (!tap_ok(!db_model_open(m, tap_path(rel), NULL, &e), "open %s: %s", rel, e.msg))
        return NULL;
    db_clip *c = NULL;
    if (!tap_ok(!db_clip_create(&c, ctx, m, &e), "%s: create text encoder: %s", rel, e.msg))
        return NULL;
    tap_ok(c->arch.hidden == r->D && c->arch.layers + 1 == r->nh, "%s: width %d, %d layers (reference %d, %d)", rel,
           c->arch.hidden, c->arch.layers, r->D, r->nh - 1);
    if (c->arch.hidden != r->D || c->arch.layers + 1 != r->nh)
        return c;
    const size_t npool = (size_t)r->B * r->D;
    o->d_last = tap_dev_alloc(ctx, ND * sizeof(float));
    o->d_penult = tap_dev_alloc(ctx, ND * sizeof(float));
    o->d_pooled = tap_dev_alloc(ctx, npool * sizeof(float));
    o->last = tap_mirror(ctx, o->d_last, ND * sizeof(float));
    o->penult = tap_mirror(ctx, o->d_penult, ND * sizeof(float));
    o->pooled = tap_mirror(ctx, o->d_pooled, npool * sizeof(float));
    o->hidden = malloc((size_t)r->nh * ND * sizeof(float));
    int rc = db_clip_forward(c, o->d_last, o->d_penult, o->d_pooled, r->ids, r->B, r->T, &e);
    if (!rc && (db_ctx_copy(ctx, o->last, o->d_last, ND * sizeof(float), DB_COPY_D2H) ||
                db_ctx_copy(ctx, o->penult, o->d_penult, ND * sizeof(float), DB_COPY_D2H) ||
                db_ctx_copy(ctx, o->pooled, o->d_pooled, npool * sizeof(float), DB_COPY_D2H)))
        rc = db_err_set(&e, ctx->err.code, "fetch the outputs: %s", ctx->err.msg);
    if (!tap_ok(rc == 0, "%s: %s: forward of %d x %d ids: %s", tap_device(), rel, r->B, r->T, rc ? e.msg : "ok"))
        return c;
    char what[256];
    snprintf(what, sizeof what, "%s: last_hidden_state (%d prompts)", rel, r->B);
    check(what, o->last, r->last, ND);
    snprintf(what, sizeof what, "%s: penultimate_ln (clip skip 2)", rel);
    check(what, o->penult, r->penult, ND);
    snprintf(what, sizeof what, "%s: pooler_output (state at argmax id)", rel);
    check(what, o->pooled, r->pooled, (size_t)r->B * r->D);
    for (int k = 0; k < r->nh; k++) {
        const float *h = db_clip_hidden(c, k); /* in the workspace: device memory */
        snprintf(what, sizeof what, "%s: hidden_states[%d]", rel, k);
        if (!tap_ok(h != NULL, "%s available", what))
            continue;
        float *hk = o->hidden + (size_t)k * ND;
        if (db_ctx_copy(ctx, hk, h, ND * sizeof(float), DB_COPY_D2H)) {
            tap_ok(0, "%s: fetch: %s", what, ctx->err.msg);
            continue;
        }
        check(what, hk, r->hidden + (size_t)k * ND, ND);
    }
    /* clip skip through the general accessor: k = L-1 is penultimate_ln */
    float *p2 = tap_dev_alloc(ctx, ND * sizeof(float));
    rc = db_clip_hidden_ln(c, p2, c->arch.layers - 1, &e);
    const float *p2h = rc ? NULL : tap_fetch(ctx, p2, ND * sizeof(float));
    tap_ok(p2h && !memcmp(p2h, o->penult, ND * sizeof(float)), "%s: %s: db_clip_hidden_ln(L-1) == penultimate_ln %s",
           tap_device(), rel, rc ? e.msg : p2h ? "" : ctx->err.msg);
    if (p2h)
        tap_host_free(ctx, p2h);
    tap_dev_free(ctx, p2);
    return c;
}

static void free_outs(db_ctx *ctx, outs *o)
{
    if (o->d_last) { /* the mirrors exist with their device buffers */
        tap_host_free(ctx, o->last);
        tap_host_free(ctx, o->penult);
        tap_host_free(ctx, o->pooled);
    }
    tap_dev_free(ctx, o->d_last);
    tap_dev_free(ctx, o->d_penult);
    tap_dev_free(ctx, o->d_pooled);
    free(o->hidden);
}

int main(void)
{
    db_err e = {0};
    /* the ctx before any TAP line: an optional device that is missing skips the whole test */
    db_ctx *ctx = NULL;
    int crc = tap_ctx_create(&ctx, &e);
    db_err ce = e;
    e = (db_err){0};
    db_tindex ix;
    db_tindex_init(&ix);
    db_safetensors *st = NULL;
    if (!tap_ok(!db_safetensors_open(&st, tap_path("tests/data/refs/text_encoder.safetensors"), NULL, -1, &ix, &e),
                "reference: %s", e.msg))
        return tap_done();
    refs r;
    int64_t s[4];
    r.ids = ref(&ix, "input_ids", DB_I32, s, 2);
    r.B = (int)s[0];
    r.T = (int)s[1];
    r.last = ref(&ix, "last_hidden_state", DB_F32, s, 3);
    r.D = (int)s[2];
    r.penult = ref(&ix, "penultimate_ln", DB_F32, s, 3);
    r.hidden = ref(&ix, "hidden_states", DB_F32, s, 4);
    r.nh = (int)s[0];
    r.pooled = ref(&ix, "pooler_output", DB_F32, s, 2);
    const size_t N = (size_t)r.B * r.T, ND = N * r.D;

    if (!tap_ok(!crc, "%s context: %s", tap_device(), ce.msg))
        return tap_done();

    db_model m1, m2;
    memset(&m1, 0, sizeof m1);
    memset(&m2, 0, sizeof m2);
    outs o1 = {0}, o2 = {0};
    db_clip *c1 = run_model(ctx, "tests/data/tiny/diffusers", &r, &o1, &m1);
    db_clip *c2 = run_model(ctx, "tests/data/tiny/tiny.ckpt", &r, &o2, &m2);
    if (c1 && c2 && o1.d_last && o2.d_last) {
        int same = !memcmp(o1.last, o2.last, ND * sizeof(float)) && !memcmp(o1.penult, o2.penult, ND * sizeof(float)) &&
                   !memcmp(o1.pooled, o2.pooled, (size_t)r.B * r.D * sizeof(float)) &&
                   !memcmp(o1.hidden, o2.hidden, (size_t)r.nh * ND * sizeof(float));
        tap_ok(same, "diffusers folder and .ckpt give bit-identical outputs");
    }

    if (c1 && o1.d_last) {
        /* batch independence: each prompt alone gives its row of the batch */
        const size_t TD = (size_t)r.T * r.D;
        float *one = tap_dev_alloc(ctx, TD * sizeof(float)), *pool = tap_dev_alloc(ctx, (size_t)r.D * sizeof(float));
        float *one_h = tap_mirror(ctx, one, TD * sizeof(float));
        float *pool_h = tap_mirror(ctx, pool, (size_t)r.D * sizeof(float));
        double worst = 0;
        int ok = 1;
        for (int b = 0; b < r.B && ok; b++) {
            ok = !db_clip_forward(c1, one, NULL, pool, r.ids + (size_t)b * r.T, 1, r.T, &e);
            if (ok && (db_ctx_copy(ctx, one_h, one, TD * sizeof(float), DB_COPY_D2H) ||
                       db_ctx_copy(ctx, pool_h, pool, (size_t)r.D * sizeof(float), DB_COPY_D2H)))
                ok = !db_err_set(&e, ctx->err.code, "fetch: %s", ctx->err.msg);
            tap_cmp m = tap_compare(one_h, o1.last + (size_t)b * TD, TD);
            tap_cmp p = tap_compare(pool_h, o1.pooled + (size_t)b * r.D, (size_t)r.D);
            worst = fmax(worst, fmax(m.rel, p.rel));
        }
        tap_ok(ok && worst <= 1e-6, "%s: one prompt at a time matches the batch of %d (worst rel %.3g) %s",
               tap_device(), r.B, worst, ok ? "" : e.msg);

        /* shorter sequences are fine (positions 0..T-1) */
        tap_ok(!db_clip_forward(c1, one, NULL, NULL, r.ids, 1, 10, &e), "T = 10 runs: %s", e.msg);
        tap_host_free(ctx, one_h);
        tap_host_free(ctx, pool_h);
        tap_dev_free(ctx, one);
        tap_dev_free(ctx, pool);

        /* negative control: a changed weight must be caught by the comparison
         * (the weights are device memory: the one float goes through the host) */
        float *bias = c1->p.layers[c1->arch.layers - 1].fc2_b;
        float saved = 0, bumped;
        int moved = !db_ctx_copy(ctx, &saved, bias, sizeof saved, DB_COPY_D2H);
        bumped = saved + 0.05f;
        moved = moved && !db_ctx_copy(ctx, bias, &bumped, sizeof bumped, DB_COPY_H2D);
        moved = moved && !db_clip_forward(c1, o1.d_last, NULL, NULL, r.ids, r.B, r.T, &e);
        moved = moved && !db_ctx_copy(ctx, o1.last, o1.d_last, ND * sizeof(float), DB_COPY_D2H);
        tap_cmp m = moved ? tap_compare(o1.last, r.last, ND) : (tap_cmp){0, 0, 0};
        tap_ok(moved && m.rel > TOL, "%s: negative control: fc2 bias + 0.05 gives rel L2 %.3g > %g", tap_device(),
               m.rel, TOL);
        db_ctx_copy(ctx, bias, &saved, sizeof saved, DB_COPY_H2D);

        /* bad input: clear errors, nothing computed */
        int32_t bad[2] = {49406, 49408};
        e.msg[0] = 0;
        tap_ok(db_clip_forward(c1, o1.d_last, NULL, NULL, bad, 1, 2, &e) == -1 && strstr(e.msg, "49408"),
               "id outside the vocabulary refused: %s", e.msg);
        tap_ok(db_clip_forward(c1, o1.d_last, NULL, NULL, r.ids, 1, c1->arch.max_positions + 1, &e) == -1,
               "T > max_positions refused: %s", e.msg);
        tap_ok(db_clip_hidden_ln(c1, o1.d_last, c1->arch.layers + 1, &e) == -1, "hidden state L+1 refused: %s",
               e.msg);
    }

    db_clip_free(c1);
    db_clip_free(c2);
    db_model_close(&m1);
    db_model_close(&m2);
    free_outs(ctx, &o1);
    free_outs(ctx, &o2);
    free(r.ids);
    free(r.last);
    free(r.penult);
    free(r.hidden);
    free(r.pooled);
    db_ctx_destroy(ctx);
    db_safetensors_close(st);
    db_tindex_free(&ix);
    return tap_done();
}
