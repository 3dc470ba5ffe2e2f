/* VAE (AutoencoderKL) vs diffusers 0.27 (tests/data/refs/vae.safetensors, made
 * from the tiny-dev model): posterior mean and logvar of the reference image
 * and the decode of the reference latents within relative L2 1e-4, from the
 * diffusers folder and from the .ckpt (bit-identical: the layout must not
 * matter).  Plus batch slicing, a negative control and bad input. */
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

static void check(const char *what, const float *c, const float *r, size_t n)
{
    tap_cmp m = tap_compare(c, r, n);
    tap_ok(m.rel <= TOL, "%s: rel L2 %.3g (max |err| %.3g at %zu: %.7g vs %.7g)", what, m.rel, m.maxabs, m.at,
           n ? c[m.at] : 0.0, n ? r[m.at] : 0.0);
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
    float *image, *mean, *logvar, *moments, *dec_in, *dec_out;
} refs;

typedef struct outs {
    float *mean, *logvar, *dec;
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
    o->mean = malloc(nz * sizeof(float));
    o->logvar = malloc(nz * sizeof(float));
    o->dec = malloc(no * sizeof(float));
    char what[256];
    int rc = db_vae_encode(v, o->mean, o->logvar, r->image, 1, H, W, &e);
    if (tap_ok(rc == 0, "%s: encode %dx%d: %s", rel, W, H, rc ? e.msg : "ok")) {
        snprintf(what, sizeof what, "%s: posterior mean", rel);
        check(what, o->mean, r->mean, nz);
        snprintf(what, sizeof what, "%s: posterior logvar", rel);
        check(what, o->logvar, r->logvar, nz);
    }
    rc = db_vae_decode(v, o->dec, r->dec_in, 1, (int)r->zs[2], (int)r->zs[3], &e);
    if (tap_ok(rc == 0, "%s: decode %dx%d latents: %s", rel, (int)r->zs[3], (int)r->zs[2], rc ? e.msg : "ok")) {
        snprintf(what, sizeof what, "%s: decoded image", rel);
        check(what, o->dec, r->dec_out, no);
    }
    return v;
}

int main(void)
{
    db_err e = {0};
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

    db_ctx *ctx = NULL;
    if (!tap_ok(!db_ctx_create(&ctx, DB_CPU, 0, &e), "cpu context: %s", e.msg))
        return tap_done();

    db_model m1, m2;
    memset(&m1, 0, sizeof m1);
    memset(&m2, 0, sizeof m2);
    outs o1 = {0}, o2 = {0};
    db_vae *v1 = run_model(ctx, "tests/data/tiny/diffusers", &r, &o1, &m1);
    db_vae *v2 = run_model(ctx, "tests/data/tiny/tiny.ckpt", &r, &o2, &m2);
    if (o1.dec && o2.dec)
        tap_ok(!memcmp(o1.mean, o2.mean, nz * sizeof(float)) && !memcmp(o1.logvar, o2.logvar, nz * sizeof(float)) &&
                   !memcmp(o1.dec, o2.dec, no * sizeof(float)),
               "diffusers folder and .ckpt give bit-identical outputs");

    if (v1 && o1.dec) {
        const int H = (int)r.is[2], W = (int)r.is[3], h = (int)r.zs[2], w = (int)r.zs[3];
        /* a batch of 2 (the image and its negative) is two single-image runs */
        float *img2 = malloc(2 * ni * sizeof(float)), *mean2 = malloc(2 * nz * sizeof(float));
        float *lat2 = malloc(2 * nz * sizeof(float)), *dec2 = malloc(2 * no * sizeof(float));
        float *m1n = malloc(nz * sizeof(float)), *d1n = malloc(no * sizeof(float));
        for (size_t i = 0; i < ni; i++) {
            img2[i] = r.image[i];
            img2[ni + i] = -r.image[i];
        }
        for (size_t i = 0; i < nz; i++) {
            lat2[i] = -r.dec_in[i];
            lat2[nz + i] = r.dec_in[i];
        }
        int ok = !db_vae_encode(v1, mean2, NULL, img2, 2, H, W, &e) &&
                 !db_vae_encode(v1, m1n, NULL, img2 + ni, 1, H, W, &e) &&
                 !db_vae_decode(v1, dec2, lat2, 2, h, w, &e) && !db_vae_decode(v1, d1n, lat2, 1, h, w, &e);
        tap_ok(ok && !memcmp(mean2, o1.mean, nz * sizeof(float)) && !memcmp(mean2 + nz, m1n, nz * sizeof(float)) &&
                   !memcmp(dec2, d1n, no * sizeof(float)) && !memcmp(dec2 + no, o1.dec, no * sizeof(float)),
               "batch of 2 == two single runs (encode without logvar, decode) %s", ok ? "" : e.msg);
        free(img2);
        free(mean2);
        free(lat2);
        free(dec2);
        free(m1n);
        free(d1n);

        /* negative control: slightly different latents are caught */
        float *lat = malloc(nz * sizeof(float));
        for (size_t i = 0; i < nz; i++)
            lat[i] = r.dec_in[i] * 1.01f;
        db_vae_decode(v1, o1.dec, lat, 1, h, w, &e);
        tap_cmp m = tap_compare(o1.dec, r.dec_out, no);
        tap_ok(m.rel > TOL, "negative control: latents x 1.01 decode to rel L2 %.3g > %g", m.rel, TOL);
        free(lat);

        /* bad sizes are refused */
        tap_ok(db_vae_encode(v1, o1.mean, NULL, r.image, 1, H - 4, W, &e) == -1, "H not a multiple of %d refused: %s",
               db_vae_factor(v1), e.msg);
        tap_ok(db_vae_decode(v1, o1.dec, r.dec_in, 0, h, w, &e) == -1, "zero batch refused: %s", e.msg);
        db_vae_trim(v1);
        e.msg[0] = 0;
        tap_ok(!db_vae_decode(v1, o1.dec, r.dec_in, 1, h, w, &e), "decode after trim: %s", e.msg);
    }

    db_vae_free(v1);
    db_vae_free(v2);
    db_model_close(&m1);
    db_model_close(&m2);
    free(o1.mean);
    free(o1.logvar);
    free(o1.dec);
    free(o2.mean);
    free(o2.logvar);
    free(o2.dec);
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
