/* UNet forward against diffusers 0.27.2 (tests/data/refs/unet.safetensors,
 * from ../shared/data/tiny-dev/refs: latents (B, 4, 16, 16), int64 timesteps
 * (B), context (B, 77, 32), out = unet(latents, timesteps, context).sample) on
 * the tiny-dev model in both stored layouts (diffusers folder, .ckpt), at the
 * reference batch and at batch 1; plus the training layout of the workspace,
 * a perturbed input that must miss (the check can fail), and bad sizes. */
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
    db_tensor latents, timesteps, context, out; /* all converted to f32 */
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

static void free_ref(ref *r)
{
    db_tensor_free(&r->latents);
    db_tensor_free(&r->timesteps);
    db_tensor_free(&r->context);
    db_tensor_free(&r->out);
}

static int check(const char *what, const float *got, const float *want, size_t n)
{
    tap_cmp c = tap_compare(got, want, n);
    int ok = tap_ok(c.rel <= REL_TOL, "%s: rel L2 %.3g (tol %g), worst [%zu] %.7g vs %.7g (|d| %.3g, ref atol %g)",
                    what, c.rel, REL_TOL, c.at, got[c.at], want[c.at], c.maxabs, REF_ATOL);
    if (c.maxabs > REF_ATOL)
        tap_diag("%s: max |d| %.3g above the reference's suggested atol %g", what, c.maxabs, REF_ATOL);
    return ok;
}

/* Forward of `layout` at the reference batch; returns the output (malloc'd) or NULL. */
static float *run_layout(db_ctx *ctx, const char *rel, const ref *r, int keep)
{
    db_err err = {0};
    db_model m;
    db_unet *u = NULL;
    const int B = (int)r->latents.shape[0], H = (int)r->latents.shape[2], W = (int)r->latents.shape[3];
    const int Tc = (int)r->context.shape[1];
    float *out = malloc(db_tensor_nbytes(&r->out));
    if (db_model_open(&m, tap_path(rel), NULL, &err)) {
        tap_ok(0, "%s: open: %s", rel, err.msg);
        free(out);
        return NULL;
    }
    int rc = db_unet_create(&u, ctx, &m, &err);
    db_model_close(&m);
    if (!tap_ok(rc == 0, "%s: unet create%s%s", rel, rc ? ": " : "", rc ? err.msg : "")) {
        free(out);
        return NULL;
    }
    db_unet_keep_activations(u, keep);
    rc = db_unet_forward(u, out, r->latents.data, r->timesteps.data, r->context.data, B, H, W, Tc, &err);
    if (!tap_ok(rc == 0, "%s: forward B=%d %dx%d Tc=%d%s (%zu KiB workspace)%s%s", rel, B, H, W, Tc,
                keep ? " keeping activations" : "", db_unet_workspace_bytes(u, B, H, W, Tc) >> 10, rc ? ": " : "",
                rc ? err.msg : "")) {
        free(out);
        out = NULL;
    }
    db_unet_free(u);
    return out;
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    ref r;
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 0, &err) == 0, "cpu context%s%s", err.code ? ": " : "", err.msg) ||
        !tap_ok(load_ref(&r, &err) == 0, "reference tensors%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
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
    float *o = malloc(nout * sizeof *o);
    if (u) {
        const float *lat = r.latents.data, *ts = r.timesteps.data, *cx = r.context.data;
        /* batch 1, each sample alone (a smaller workspace layout, then back up) */
        for (int b = 0; b < B; b++) {
            int rc = db_unet_forward(u, o, lat + (size_t)b * nper, ts + b, cx + (size_t)b * Tc * D, 1, H, W, Tc, &err);
            char what[64];
            snprintf(what, sizeof what, "batch 1, sample %d", b);
            if (tap_ok(rc == 0, "%s: forward%s%s", what, rc ? ": " : "", rc ? err.msg : ""))
                check(what, o, want + (size_t)b * nper, nper);
        }
        int rc = db_unet_forward(u, o, lat, ts, cx, B, H, W, Tc, &err);
        if (tap_ok(rc == 0, "batch %d after batch 1%s%s", B, rc ? ": " : "", rc ? err.msg : ""))
            check("batch again", o, want, nout);

        /* the comparison can fail: other timesteps give another output */
        float *ts2 = malloc((size_t)B * sizeof *ts2);
        for (int b = 0; b < B; b++)
            ts2[b] = ts[b] + 50.0f;
        rc = db_unet_forward(u, o, lat, ts2, cx, B, H, W, Tc, &err);
        tap_cmp c = tap_compare(o, want, nout);
        tap_ok(rc == 0 && c.rel > 100 * REL_TOL, "timesteps + 50 miss the reference (rel L2 %.3g)", c.rel);
        free(ts2);

        /* in place: out == sample */
        float *io = malloc(nout * sizeof *io);
        memcpy(io, lat, nout * sizeof *io);
        rc = db_unet_forward(u, io, io, ts, cx, B, H, W, Tc, &err);
        if (tap_ok(rc == 0, "in place (out == sample)%s%s", rc ? ": " : "", rc ? err.msg : ""))
            check("in place", io, want, nout);
        free(io);

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

    free(o);
    free(o_diff);
    free(o_ckpt);
    free(o_keep);
    free_ref(&r);
    db_ctx_destroy(ctx);
    return tap_done();
}
