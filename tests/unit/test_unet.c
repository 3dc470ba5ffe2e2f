/* UNet forward against diffusers 0.27.2 (tests/data/refs/unet.safetensors,
 * from ../shared/data/tiny-dev/refs: latents (B, 4, 16, 16), int64 timesteps
 * (B), context (B, 77, 32), out = unet(latents, timesteps, context).sample) on
 * the tiny-dev model in both stored layouts (diffusers folder, .ckpt), at the
 * reference batch and at batch 1; plus the training layout of the workspace,
 * a perturbed input that must miss (the check can fail), and bad sizes.
 * On the device of $DB_TEST_DEVICE (tap.h; cpu by default): the model's
 * tensors are that device's buffers, fetched to the host to be compared. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/unet.h"
#include "tap.h"

/* fp32 parity target of DESIGN §5 (relative L2 per tensor). */
#define REL_TOL 1e-4
/* The manifest's suggested_atol for unet/out (4 x max|fp32 - fp64|), reported only. */
#define REF_ATOL 5e-6

typedef struct ref {
    db_tensor latents, timesteps, context, out; /* all converted to f32, host */
    const float *lat_d, *ts_d, *cx_d;           /* the inputs on the ctx's device (tap_put) */
} ref;

static int load_ref(ref *r, db_err *err)
{
    db_tindex ix;
    db_safetensors *st = NULL;
    db_tindex_init(&ix);
    memset(r, 0, sizeof *r);
    int rc = db_safetensors_open(&st, tap_path("tests/data/refs/unet.safetensors"), NULL, -1, &ix, err);
    const char *names[4] = {"latents", "timesteps", "context", "out"};
    db_tensor *dst[4] = {&r->latents, &r->timesteps, &r->context, &r->out};
    for (int i = 0; i < 4 && rc == 0; i++) {
        long k = db_tindex_find(&ix, names[i]);
        rc = k < 0 ? db_err_set(err, DB_EFORMAT, "reference has no '%s'", names[i])
                   : db_tindex_load(&ix, (size_t)k, DB_F32, dst[i], err);
    }
    db_tindex_free(&ix);
    db_safetensors_close(st);
    return rc;
}

static void free_ref(db_ctx *c, ref *r)
{
    tap_put_free(c, r->lat_d);
    tap_put_free(c, r->ts_d);
    tap_put_free(c, r->cx_d);
    db_tensor_free(&r->latents);
    db_tensor_free(&r->timesteps);
    db_tensor_free(&r->context);
    db_tensor_free(&r->out);
}

/* got: host memory (a fetched output). */
static int check(const char *what, const float *got, const float *want, size_t n)
{
    tap_cmp c = tap_compare(got, want, n);
    int ok = tap_ok(c.rel <= REL_TOL,
                    "%s: %s: rel L2 %.3g (tol %g), worst [%zu] %.7g vs %.7g (|d| %.3g, ref atol %g)", tap_device(),
                    what, c.rel, REL_TOL, c.at, got[c.at], want[c.at], c.maxabs, REF_ATOL);
    if (c.maxabs > REF_ATOL)
        tap_diag("%s: max |d| %.3g above the reference's suggested atol %g", what, c.maxabs, REF_ATOL);
    return ok;
}

/* check() of a device buffer: fetched to the host first (on the CPU, read
 * in place).  A failed copy fails the check. */
static int check_dev(db_ctx *ctx, const char *what, const float *got_d, const float *want, size_t n)
{
    const float *got = tap_fetch(ctx, got_d, n * sizeof *got);
    if (!got)
        return tap_ok(0, "%s: %s: fetch the output: %s", tap_device(), what, ctx->err.msg);
    int ok = check(what, got, want, n);
    tap_host_free(ctx, got);
    return ok;
}

/* Forward of `layout` at the reference batch; returns the output (host
 * memory: free with free()) or NULL. */
static float *run_layout(db_ctx *ctx, const char *rel, const ref *r, int keep)
{
    db_err err = {0};
    db_model m;
    db_unet *u = NULL;
    const int B = (int)r->latents.shape[0], H = (int)r->latents.shape[2], W = (int)r->latents.shape[3];
    const int Tc = (int)r->context.shape[1];
    const size_t nb = db_tensor_nbytes(&r->out);
    float *out = tap_dev_alloc(ctx, nb);
    if (db_model_open(&m, tap_path(rel), NULL, &err)) {
        tap_ok(0, "%s: open: %s", rel, err.msg);
        tap_dev_free(ctx, out);
        return NULL;
    }
    int rc = db_unet_create(&u, ctx, &m, &err);
    db_model_close(&m);
    if (!tap_ok(rc == 0, "%s: unet create%s%s", rel, rc ? ": " : "", rc ? err.msg : "")) {
        tap_dev_free(ctx, out);
        return NULL;
    }
    db_unet_keep_activations(u, keep);
    rc = db_unet_forward(u, out, r->lat_d, r->ts_d, r->cx_d, B, H, W, Tc, &err);
    if (!tap_ok(rc == 0, "%s: %s: forward B=%d %dx%d Tc=%d%s (%zu KiB workspace)%s%s", tap_device(), rel, B, H, W,
                Tc, keep ? " keeping activations" : "", db_unet_workspace_bytes(u, B, H, W, Tc) >> 10,
                rc ? ": " : "", rc ? err.msg : "")) {
        tap_dev_free(ctx, out);
        out = NULL;
    }
    db_unet_free(u);
    if (out && ctx->device != DB_CPU) { /* hand back a host copy (on the CPU out is one) */
        float *h = tap_fetch(ctx, out, nb);
        if (!h)
            tap_ok(0, "%s: fetch the output: %s", rel, ctx->err.msg);
        tap_dev_free(ctx, out);
        out = h;
    }
    return out;
}

/* A host copy of n floats of device buffer dev that stays when dev
 * changes (tap_fetch is dev itself on the CPU); NULL on failure. */
static float *snap(db_ctx *ctx, const float *dev, size_t n)
{
    float *h = tap_fetch(ctx, dev, n * sizeof *h), *k = h ? malloc(n * sizeof *k) : NULL;
    if (k)
        memcpy(k, h, n * sizeof *k);
    if (h)
        tap_host_free(ctx, h);
    return k;
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    ref r;
    /* created first: its message is read after (argument order is unspecified) */
    int crc = tap_ctx_create(&ctx, &err);
    if (!tap_ok(crc == 0, "%s context%s%s", tap_device(), crc ? ": " : "", crc ? err.msg : "") ||
        !tap_ok(load_ref(&r, &err) == 0, "reference tensors%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
    /* the forward's inputs live on the device (unet.h); on the CPU these are the tensors themselves */
    r.lat_d = tap_put(ctx, r.latents.data, db_tensor_nbytes(&r.latents));
    r.ts_d = tap_put(ctx, r.timesteps.data, db_tensor_nbytes(&r.timesteps));
    r.cx_d = tap_put(ctx, r.context.data, db_tensor_nbytes(&r.context));
    if (!r.lat_d || !r.ts_d || !r.cx_d) { /* (no line when it works: the CPU output stays as it was) */
        tap_ok(0, "%s: inputs onto the device: %s", tap_device(), ctx->err.msg);
        return tap_done();
    }
    const int B = (int)r.latents.shape[0], C = (int)r.latents.shape[1], H = (int)r.latents.shape[2],
              W = (int)r.latents.shape[3], Tc = (int)r.context.shape[1], D = (int)r.context.shape[2];
    const size_t nout = (size_t)db_tensor_numel(&r.out), nper = nout / (size_t)B;
    const float *want = r.out.data;

    /* every layout of the same weights: diffusers folder, CompVis .ckpt */
    float *o_diff = run_layout(ctx, "tests/data/tiny/diffusers", &r, 0);
    if (o_diff)
        check("diffusers folder vs diffusers", o_diff, want, nout);
    float *o_ckpt = run_layout(ctx, "tests/data/tiny/tiny.ckpt", &r, 0);
    if (o_ckpt)
        check("tiny.ckpt vs diffusers", o_ckpt, want, nout);
    if (o_diff && o_ckpt) {
        tap_cmp c = tap_compare(o_ckpt, o_diff, nout);
        tap_ok(c.maxabs == 0, "ckpt and diffusers layouts give the same output (max |d| %.3g)", c.maxabs);
    }
    /* the training layout (every block keeps its activations) computes the same */
    float *o_keep = run_layout(ctx, "tests/data/tiny/diffusers", &r, 1);
    if (o_keep && o_diff) {
        tap_cmp c = tap_compare(o_keep, o_diff, nout);
        tap_ok(c.maxabs == 0, "keep_activations: same output as inference (max |d| %.3g)", c.maxabs);
    }

    db_model m;
    db_unet *u = NULL;
    if (db_model_open(&m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0) {
        int rc = db_unet_create(&u, ctx, &m, &err);
        db_model_close(&m);
        tap_ok(rc == 0, "unet create again%s%s", rc ? ": " : "", rc ? err.msg : "");
    } else {
        tap_ok(0, "open: %s", err.msg);
    }
    float *o = tap_dev_alloc(ctx, nout * sizeof *o);
    if (u) {
        const float *lat = r.lat_d, *ts = r.ts_d, *cx = r.cx_d; /* device */
        /* batch 1, each sample alone (a smaller workspace layout, then back up) */
        for (int b = 0; b < B; b++) {
            int rc = db_unet_forward(u, o, lat + (size_t)b * nper, ts + b, cx + (size_t)b * Tc * D, 1, H, W, Tc, &err);
            char what[64];
            snprintf(what, sizeof what, "batch 1, sample %d", b);
            if (tap_ok(rc == 0, "%s: forward%s%s", what, rc ? ": " : "", rc ? err.msg : ""))
                check_dev(ctx, what, o, want + (size_t)b * nper, nper);
        }
        int rc = db_unet_forward(u, o, lat, ts, cx, B, H, W, Tc, &err);
        if (tap_ok(rc == 0, "batch %d after batch 1%s%s", B, rc ? ": " : "", rc ? err.msg : ""))
            check_dev(ctx, "batch again", o, want, nout);

        /* the comparison can fail: other timesteps give another output */
        const float *ts_h = r.timesteps.data;
        float *ts2 = malloc((size_t)B * sizeof *ts2);
        for (int b = 0; b < B; b++)
            ts2[b] = ts_h[b] + 50.0f;
        float *ts2_d = tap_put(ctx, ts2, (size_t)B * sizeof *ts2);
        rc = ts2_d ? db_unet_forward(u, o, lat, ts2_d, cx, B, H, W, Tc, &err) : -1;
        float *oh = rc ? NULL : tap_fetch(ctx, o, nout * sizeof *o);
        tap_cmp c = oh ? tap_compare(oh, want, nout) : (tap_cmp){0, 0, 0};
        tap_ok(oh && c.rel > 100 * REL_TOL, "%s: timesteps + 50 miss the reference (rel L2 %.3g)", tap_device(),
               c.rel);
        if (oh)
            tap_host_free(ctx, oh);
        tap_put_free(ctx, ts2_d);
        free(ts2);

        /* the context cache (sampling): the same output bits with it; for
         * a context that is not the cached one, or after the cached one's
         * contents changed and it was made again, still the plain output;
         * in fp32, then in bf16, where the CUDA backend keeps the cache's
         * 16-bit copy as it keeps the weights' (made again with the cache) */
        for (int pi = 0; pi < 2; pi++) {
            const db_precision prec = pi ? DB_PREC_BF16 : DB_PREC_F32;
            const char *pn = db_precision_name(prec);
            db_ctx_set_precision(ctx, prec);
            const size_t ncx = (size_t)B * Tc * D;
            float *cx2 = tap_dev_alloc(ctx, ncx * sizeof *cx2);
            int krc = db_unet_forward(u, o, lat, ts, cx, B, H, W, Tc, &err);
            float *plain = krc ? NULL : snap(ctx, o, nout), *cached = NULL, *alt = NULL, *want2 = NULL, *other = NULL;
            krc = krc || !plain || !cx2 || db_ctx_copy(ctx, cx2, cx, ncx * sizeof *cx2, DB_COPY_D2D) ||
                  db_unet_cache_context(u, cx2, B, Tc, &err) || db_unet_forward(u, o, lat, ts, cx2, B, H, W, Tc, &err);
            cached = krc ? NULL : snap(ctx, o, nout);
            tap_ok(cached && !memcmp(cached, plain, nout * sizeof *o),
                   "%s %s: the cross-attentions' k and v made ahead (context cache): the same output, bit for bit%s%s",
                   tap_device(), pn, err.code ? ": " : "", err.msg);
            /* another context's contents in the cached buffer (the two rows
             * swapped), made again: that context's plain output */
            float *stale = NULL;
            if (cached) {
                /* the contents changed and the cache not made again: the
                 * forward reads the cache (the caller's duty, unet.h), which
                 * is how this shows the cache is what the forward reads */
                krc = db_ctx_copy(ctx, cx2, cx + (size_t)Tc * D, (size_t)Tc * D * sizeof *cx2, DB_COPY_D2D) ||
                      db_ctx_copy(ctx, cx2 + (size_t)Tc * D, cx, (size_t)Tc * D * sizeof *cx2, DB_COPY_D2D) ||
                      db_unet_forward(u, o, lat, ts, cx2, B, H, W, Tc, &err);
                stale = krc ? NULL : snap(ctx, o, nout);
                krc = krc || !stale || db_unet_cache_context(u, NULL, 0, 0, &err) ||
                      db_unet_forward(u, o, lat, ts, cx2, B, H, W, Tc, &err);
                want2 = krc ? NULL : snap(ctx, o, nout);
                krc = krc || !want2 || db_unet_cache_context(u, cx2, B, Tc, &err) ||
                      db_unet_forward(u, o, lat, ts, cx2, B, H, W, Tc, &err);
                alt = krc ? NULL : snap(ctx, o, nout);
            }
            tap_ok(alt && want2 && !memcmp(alt, want2, nout * sizeof *o) && memcmp(want2, plain, nout * sizeof *o) &&
                       !memcmp(stale, cached, nout * sizeof *o),
                   "%s %s: the context cache is what the forward reads (new contents unseen until it is made again), "
                   "and made again it gives the new context's plain output%s%s", tap_device(), pn, err.code ? ": " : "",
                   err.msg);
            /* the cache holds cx2; a forward on cx (another pointer) makes its own */
            krc = db_unet_forward(u, o, lat, ts, cx, B, H, W, Tc, &err);
            other = krc ? NULL : snap(ctx, o, nout);
            tap_ok(other && plain && !memcmp(other, plain, nout * sizeof *o),
                   "%s %s: with the context cache on, a forward on another context pointer is the plain one",
                   tap_device(), pn);
            db_unet_cache_context(u, NULL, 0, 0, &err);
            free(plain), free(cached), free(alt), free(want2), free(other), free(stale);
            tap_dev_free(ctx, cx2);
        }
        db_ctx_set_precision(ctx, DB_PREC_F32);

        /* in place: out == sample */
        float *io = tap_dev_alloc(ctx, nout * sizeof *io);
        rc = io ? db_ctx_copy(ctx, io, lat, nout * sizeof *io, DB_COPY_D2D) : -1;
        rc = rc ? rc : db_unet_forward(u, io, io, ts, cx, B, H, W, Tc, &err);
        if (tap_ok(rc == 0, "in place (out == sample)%s%s", rc ? ": " : "", rc ? err.msg : ""))
            check_dev(ctx, "in place", io, want, nout);
        tap_dev_free(ctx, io);

        /* sizes the UNet cannot take */
        const db_unet_arch *a = db_unet_arch_of(u);
        int mult = 1 << (a->nlevels - 1);
        rc = db_unet_forward(u, o, lat, ts, cx, 1, H + mult / 2, W, Tc, &err);
        tap_ok(rc != 0 && err.code == DB_EUNSUPP && strstr(err.msg, "multiple of"), "latent %dx%d refused: %s",
               H + mult / 2, W, rc ? err.msg : "(accepted)");
        tap_ok(a->in_channels == C, "in_channels %d from config", a->in_channels);
        db_unet_free(u);
    }

    /* a weight of the wrong size is refused, naming it */
    if (db_model_open(&m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0) {
        db_weights w;
        if (db_weights_load(&w, &m, DB_COMP_UNET, &err) == 0) {
            db_unet_arch a = m.arch.unet;
            a.context_dim += 1; /* attn2.to_k would need (C, D + 1) */
            int rc = db_unet_create_from(&u, ctx, &a, &w, &err);
            tap_ok(rc != 0 && strstr(err.msg, "attn2.to_k"), "wrong context width refused: %s",
                   rc ? err.msg : "(accepted)");
            if (rc == 0)
                db_unet_free(u);
        }
        db_model_close(&m);
    }

    tap_dev_free(ctx, o);
    free(o_diff);
    free(o_ckpt);
    free(o_keep);
    free_ref(ctx, &r);
    db_ctx_destroy(ctx);
    return tap_done();
}
