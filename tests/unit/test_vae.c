/* VAE (AutoencoderKL) vs diffusers 0.27 (tests/data/refs/vae.safetensors, made
 * from the tiny-dev model): posterior mean and logvar of the reference image
 * and the decode of the reference latents within relative L2 1e-4, from the
 * diffusers folder and from the .ckpt (bit-identical: the layout must not
 * matter).  Plus batch slicing, a negative control and bad input.  On the
 * device of $DB_TEST_DEVICE (tap.h; cpu by default): images and latents are
 * that device's buffers (vae.h), put there and fetched back around the
 * calls. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/sd/vae.h"
#include "tap.h"

#define TOL 1e-4

/* c: host memory (a fetched output). */
static void check(const char *what, const float *c, const float *r, size_t n)
{
    tap_cmp m = tap_compare(c, r, n);
    tap_ok(m.rel <= TOL, "%s: %s: rel L2 %.3g (max |err| %.3g at %zu: %.7g vs %.7g)", tap_device(), what, m.rel,
           m.maxabs, m.at, n ? c[m.at] : 0.0, n ? r[m.at] : 0.0);
}

/* A reference tensor as f32 with its 4-d shape; exits on a broken fixture. */
static float *ref(db_tindex *ix, const char *name, int64_t *shape)
{
    long k = db_tindex_find(ix, name);
    db_tensor t;
    db_err e = {0};
    if (k < 0 || ix->v[k].ndim != 4 || db_tindex_load(ix, (size_t)k, DB_F32, &t, &e)) {
        tap_ok(0, "reference tensor '%s' (4 dims): %s", name, k < 0 ? "missing" : e.msg);
        exit(tap_done());
    }
    memcpy(shape, t.shape, 4 * sizeof *shape);
    return t.data;
}

typedef struct refs {
    int64_t is[4], zs[4], os[4]; /* image (1, 3, H, W), latents (1, Z, h, w), decoded (1, 3, H, W) */
    float *image, *mean, *logvar, *moments, *dec_in, *dec_out; /* host */
    const float *image_d, *dec_in_d; /* the inputs on the ctx's device (tap_put) */
} refs;

/* Host copies of the outputs and the device buffers the VAE wrote (on the
 * CPU the same memory: tap_mirror). */
typedef struct outs {
    float *mean, *logvar, *dec;
    float *d_mean, *d_logvar, *d_dec;
} outs;

static size_t numel4(const int64_t *s) { return (size_t)(s[0] * s[1] * s[2] * s[3]); }

static db_vae *run_model(db_ctx *ctx, const char *rel, const refs *r, outs *o, db_model *m)
{
    db_err e = {0};
    if (!tap_ok(!db_model_open(m, tap_path(rel), NULL, &e), "open %s: %s", rel, e.msg))
        return NULL;
    db_vae *v = NULL;
    if (!tap_ok(!db_vae_create(&v, ctx, m, &e), "%s: create vae: %s", rel, e.msg))
        return NULL;
    const int f = db_vae_factor(v);
    const int H = (int)r->is[2], W = (int)r->is[3];
    if (!tap_ok(r->zs[2] * f == H && r->zs[3] * f == W && m->arch.vae.latent_channels == r->zs[1],
                "%s: factor %d, %d latent channels fit the reference", rel, f, m->arch.vae.latent_channels))
        return v;
    const size_t nz = numel4(r->zs), no = numel4(r->os);
    o->d_mean = tap_dev_alloc(ctx, nz * sizeof(float));
    o->d_logvar = tap_dev_alloc(ctx, nz * sizeof(float));
    o->d_dec = tap_dev_alloc(ctx, no * sizeof(float));
    o->mean = tap_mirror(ctx, o->d_mean, nz * sizeof(float));
    o->logvar = tap_mirror(ctx, o->d_logvar, nz * sizeof(float));
    o->dec = tap_mirror(ctx, o->d_dec, no * sizeof(float));
    char what[256];
    int rc = db_vae_encode(v, o->d_mean, o->d_logvar, r->image_d, 1, H, W, &e);
    if (!rc && (db_ctx_copy(ctx, o->mean, o->d_mean, nz * sizeof(float), DB_COPY_D2H) ||
                db_ctx_copy(ctx, o->logvar, o->d_logvar, nz * sizeof(float), DB_COPY_D2H)))
        rc = db_err_set(&e, ctx->err.code, "fetch the posterior: %s", ctx->err.msg);
    if (tap_ok(rc == 0, "%s: %s: encode %dx%d: %s", tap_device(), rel, W, H, rc ? e.msg : "ok")) {
        snprintf(what, sizeof what, "%s: posterior mean", rel);
        check(what, o->mean, r->mean, nz);
        snprintf(what, sizeof what, "%s: posterior logvar", rel);
        check(what, o->logvar, r->logvar, nz);
    }
    rc = db_vae_decode(v, o->d_dec, r->dec_in_d, 1, (int)r->zs[2], (int)r->zs[3], &e);
    if (!rc && db_ctx_copy(ctx, o->dec, o->d_dec, no * sizeof(float), DB_COPY_D2H))
        rc = db_err_set(&e, ctx->err.code, "fetch the image: %s", ctx->err.msg);
    if (tap_ok(rc == 0, "%s: %s: decode %dx%d latents: %s", tap_device(), rel, (int)r->zs[3], (int)r->zs[2],
               rc ? e.msg : "ok")) {
        snprintf(what, sizeof what, "%s: decoded image", rel);
        check(what, o->dec, r->dec_out, no);
    }
    return v;
}

static void free_outs(db_ctx *ctx, outs *o)
{
    if (o->d_mean) { /* the mirrors exist with their device buffers */
        tap_host_free(ctx, o->mean);
        tap_host_free(ctx, o->logvar);
        tap_host_free(ctx, o->dec);
    }
    tap_dev_free(ctx, o->d_mean);
    tap_dev_free(ctx, o->d_logvar);
    tap_dev_free(ctx, o->d_dec);
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
    if (!tap_ok(!db_safetensors_open(&st, tap_path("tests/data/refs/vae.safetensors"), NULL, -1, &ix, &e),
                "reference: %s", e.msg))
        return tap_done();
    refs r;
    int64_t s[4];
    r.image = ref(&ix, "image", r.is);
    r.mean = ref(&ix, "mean", r.zs);
    r.logvar = ref(&ix, "logvar", s);
    r.moments = ref(&ix, "moments", s);
    r.dec_in = ref(&ix, "decode_in", s);
    r.dec_out = ref(&ix, "decode_out", r.os);
    const size_t nz = numel4(r.zs), no = numel4(r.os), ni = numel4(r.is);

    /* the reference logvar is the clamped second half of the moments */
    tap_cmp lm = tap_compare(r.logvar, r.moments + nz, nz);
    tap_ok(lm.maxabs == 0, "fixture: logvar = moments[:, Z:] (inside the clamp range)");

    if (!tap_ok(!crc, "%s context: %s", tap_device(), ce.msg))
        return tap_done();
    r.image_d = tap_put(ctx, r.image, ni * sizeof(float));
    r.dec_in_d = tap_put(ctx, r.dec_in, nz * sizeof(float));
    if (!r.image_d || !r.dec_in_d) { /* (no line when it works: the CPU output stays as it was) */
        tap_ok(0, "%s: inputs onto the device: %s", tap_device(), ctx->err.msg);
        return tap_done();
    }

    db_model m1, m2;
    memset(&m1, 0, sizeof m1);
    memset(&m2, 0, sizeof m2);
    outs o1 = {0}, o2 = {0};
    db_vae *v1 = run_model(ctx, "tests/data/tiny/diffusers", &r, &o1, &m1);
    db_vae *v2 = run_model(ctx, "tests/data/tiny/tiny.ckpt", &r, &o2, &m2);
    if (o1.d_dec && o2.d_dec)
        tap_ok(!memcmp(o1.mean, o2.mean, nz * sizeof(float)) && !memcmp(o1.logvar, o2.logvar, nz * sizeof(float)) &&
                   !memcmp(o1.dec, o2.dec, no * sizeof(float)),
               "diffusers folder and .ckpt give bit-identical outputs");

    if (v1 && o1.d_dec) {
        const int H = (int)r.is[2], W = (int)r.is[3], h = (int)r.zs[2], w = (int)r.zs[3];
        /* a batch of 2 (the image and its negative) is two single-image runs */
        float *img2 = malloc(2 * ni * sizeof(float));
        float *lat2 = malloc(2 * nz * sizeof(float));
        for (size_t i = 0; i < ni; i++) {
            img2[i] = r.image[i];
            img2[ni + i] = -r.image[i];
        }
        for (size_t i = 0; i < nz; i++) {
            lat2[i] = -r.dec_in[i];
            lat2[nz + i] = r.dec_in[i];
        }
        const float *img2_d = tap_put(ctx, img2, 2 * ni * sizeof(float));
        const float *lat2_d = tap_put(ctx, lat2, 2 * nz * sizeof(float));
        float *mean2_d = tap_dev_alloc(ctx, 2 * nz * sizeof(float)), *dec2_d = tap_dev_alloc(ctx, 2 * no * sizeof(float));
        float *m1n_d = tap_dev_alloc(ctx, nz * sizeof(float)), *d1n_d = tap_dev_alloc(ctx, no * sizeof(float));
        int ok = img2_d && lat2_d && !db_vae_encode(v1, mean2_d, NULL, img2_d, 2, H, W, &e) &&
                 !db_vae_encode(v1, m1n_d, NULL, img2_d + ni, 1, H, W, &e) &&
                 !db_vae_decode(v1, dec2_d, lat2_d, 2, h, w, &e) && !db_vae_decode(v1, d1n_d, lat2_d, 1, h, w, &e);
        const float *mean2 = ok ? tap_fetch(ctx, mean2_d, 2 * nz * sizeof(float)) : NULL;
        const float *dec2 = ok ? tap_fetch(ctx, dec2_d, 2 * no * sizeof(float)) : NULL;
        const float *m1n = ok ? tap_fetch(ctx, m1n_d, nz * sizeof(float)) : NULL;
        const float *d1n = ok ? tap_fetch(ctx, d1n_d, no * sizeof(float)) : NULL;
        if (ok && !(mean2 && dec2 && m1n && d1n))
            ok = !db_err_set(&e, ctx->err.code, "fetch: %s", ctx->err.msg);
        /* db-train --plan's validation row counts the decode's workspace */
        db_vae_trim(v1);
        const int dec_ok = ok && !db_vae_decode(v1, d1n_d, lat2_d, 1, h, w, &e);
        tap_ok(dec_ok && db_vae_allocated_bytes(v1) == db_vae_decode_bytes_arch(&m1.arch.vae, h, w),
               "decode workspace %zu bytes, predicted %zu (db_vae_decode_bytes_arch)", db_vae_allocated_bytes(v1),
               db_vae_decode_bytes_arch(&m1.arch.vae, h, w));
        tap_ok(ok && !memcmp(mean2, o1.mean, nz * sizeof(float)) && !memcmp(mean2 + nz, m1n, nz * sizeof(float)) &&
                   !memcmp(dec2, d1n, no * sizeof(float)) && !memcmp(dec2 + no, o1.dec, no * sizeof(float)),
               "%s: batch of 2 == two single runs (encode without logvar, decode) %s", tap_device(), ok ? "" : e.msg);
        tap_host_free(ctx, mean2);
        tap_host_free(ctx, dec2);
        tap_host_free(ctx, m1n);
        tap_host_free(ctx, d1n);
        tap_dev_free(ctx, mean2_d);
        tap_dev_free(ctx, dec2_d);
        tap_dev_free(ctx, m1n_d);
        tap_dev_free(ctx, d1n_d);
        tap_put_free(ctx, img2_d);
        tap_put_free(ctx, lat2_d);
        free(img2);
        free(lat2);

        /* negative control: slightly different latents are caught */
        float *lat = malloc(nz * sizeof(float));
        for (size_t i = 0; i < nz; i++)
            lat[i] = r.dec_in[i] * 1.01f;
        const float *lat_d = tap_put(ctx, lat, nz * sizeof(float));
        int moved = lat_d && !db_vae_decode(v1, o1.d_dec, lat_d, 1, h, w, &e) &&
                    !db_ctx_copy(ctx, o1.dec, o1.d_dec, no * sizeof(float), DB_COPY_D2H);
        tap_cmp m = moved ? tap_compare(o1.dec, r.dec_out, no) : (tap_cmp){0, 0, 0};
        tap_ok(moved && m.rel > TOL, "%s: negative control: latents x 1.01 decode to rel L2 %.3g > %g", tap_device(),
               m.rel, TOL);
        tap_put_free(ctx, lat_d);
        free(lat);

        /* bad sizes are refused */
        tap_ok(db_vae_encode(v1, o1.d_mean, NULL, r.image_d, 1, H - 4, W, &e) == -1,
               "H not a multiple of %d refused: %s", db_vae_factor(v1), e.msg);
        tap_ok(db_vae_decode(v1, o1.d_dec, r.dec_in_d, 0, h, w, &e) == -1, "zero batch refused: %s", e.msg);
        db_vae_trim(v1);
        e.msg[0] = 0;
        tap_ok(!db_vae_decode(v1, o1.d_dec, r.dec_in_d, 1, h, w, &e), "decode after trim: %s", e.msg);
    }

    db_vae_free(v1);
    db_vae_free(v2);
    db_model_close(&m1);
    db_model_close(&m2);
    free_outs(ctx, &o1);
    free_outs(ctx, &o2);
    tap_put_free(ctx, r.image_d);
    tap_put_free(ctx, r.dec_in_d);
    free(r.image);
    free(r.mean);
    free(r.logvar);
    free(r.moments);
    free(r.dec_in);
    free(r.dec_out);
    db_ctx_destroy(ctx);
    db_safetensors_close(st);
    db_tindex_free(&ix);
    return tap_done();
}
