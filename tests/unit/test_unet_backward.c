/* UNet backward against diffusers 0.27.2 (tests/data/refs/unet_grads.safetensors,
 * from ../shared/data/tiny-dev/refs): with the forward inputs of
 * tests/data/refs/unet.safetensors (latents (B, 4, 16, 16), timesteps (B),
 * context (B, 77, 32), target (B, 4, 16, 16)) and
 *   loss = mean((unet(latents, timesteps, context) - target)^2),
 * the reference holds loss, grad_latents = d loss / d latents and
 * grad/<diffusers name> = d loss / d parameter for every UNet parameter.
 * Checked: the loss, every parameter gradient and grad_latents (relative L2
 * per tensor), that a second backward accumulates (gradients double), that
 * an assigned backward (unet.h) writes every gradient over NaN with the
 * first backward's bits, that a frozen backward (no gradients) still gives d latents, d context against a
 * central difference of the loss (no diffusers reference for it), that a
 * wrong dout misses, and that a backward without a training forward is
 * refused.  On the device of $DB_TEST_DEVICE (tap.h; cpu by default): the
 * forward's and backward's tensors and the gradient buffer are that
 * device's memory (unet.h), so inputs are put there and results fetched
 * back; the loss and its dout are computed on the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/weights.h"
#include "tap.h"

/* fp32 parity target of DESIGN §5 (relative L2 per tensor). */
#define REL_TOL 1e-4
/* Some gradients are zero in exact arithmetic: a per-channel constant added
 * just before a GroupNorm with one channel per group (the tiny model's level
 * 0: 32 channels, 32 groups) cancels, so conv1.bias and time_emb_proj of
 * those ResBlocks, and every bias feeding conv_norm_out, get only roundoff
 * (L2 ~1e-8 in the reference, against ~1e-2 for real gradients).  A relative
 * error means nothing there; such a tensor passes when both sides are below
 * this L2 norm. */
#define ZERO_TOL 1e-6

static double l2(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    return sqrt(s);
}



/* A gradient sink's check (the fused backward's window): each unit's
 * gradients against one plain backward's (want, host), the alignment
 * padding in its span zero (no op writes it, and the window held NaN or
 * another unit's gradients there before). */
typedef struct win_check {
    db_ctx *ctx;
    const db_weights *w;
    const float *want;
    size_t units, bad_tensors, bad_padding;
} win_check;

static int win_ready(void *user, float *g, size_t lo, size_t hi, db_err *err)
{
    win_check *k = user;
    const float *h = tap_fetch(k->ctx, g, (hi - lo) * sizeof *g);
    if (!h)
        return db_err_set(err, DB_EIO, "window fetch: %s", k->ctx->err.msg);
    k->units++;
    for (size_t i = 0; i < k->w->ix.n; i++) {
        const db_tentry *e = &k->w->ix.v[i];
        const size_t o = (size_t)e->offset, n = (size_t)db_shape_numel(e->ndim, e->shape);
        if (o < lo || o >= hi)
            continue;
        k->bad_tensors += memcmp(h + (o - lo), k->want + o, n * sizeof *h) != 0;
        const size_t end = i + 1 < k->w->ix.n && (size_t)k->w->ix.v[i + 1].offset <= hi
                               ? (size_t)k->w->ix.v[i + 1].offset
                               : hi;
        for (size_t j = o + n; j < end; j++)
            k->bad_padding += h[j - lo] != 0.0f || signbit(h[j - lo]);
    }
    tap_host_free(k->ctx, h);
    return 0;
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    /* created first: its message is read after (argument order is unspecified) */
    int crc = tap_ctx_create(&ctx, &err);
    if (!tap_ok(crc == 0, "%s context%s%s", tap_device(), crc ? ": " : "", crc ? err.msg : ""))
        return tap_done();

    /* forward inputs and the target */
    db_tindex fix, gix;
    db_safetensors *fst = NULL, *gst = NULL;
    db_tensor lat = {0}, ts = {0}, cx = {0}, target = {0}, gl = {0}, loss_ref = {0};
    int rc = tap_ref_open(&fix, &fst, "tests/data/refs/unet.safetensors", &err);
    rc = rc ? rc : tap_ref_get(&fix, "latents", &lat, &err);
    rc = rc ? rc : tap_ref_get(&fix, "timesteps", &ts, &err);
    rc = rc ? rc : tap_ref_get(&fix, "context", &cx, &err);
    rc = rc ? rc : tap_ref_get(&fix, "target", &target, &err);
    rc = rc ? rc : tap_ref_open(&gix, &gst, "tests/data/refs/unet_grads.safetensors", &err);
    rc = rc ? rc : tap_ref_get(&gix, "grad_latents", &gl, &err);
    rc = rc ? rc : tap_ref_get(&gix, "loss", &loss_ref, &err);
    if (!tap_ok(rc == 0, "reference tensors%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();
    const int B = (int)lat.shape[0], H = (int)lat.shape[2], W = (int)lat.shape[3], Tc = (int)cx.shape[1];
    const size_t n = (size_t)db_tensor_numel(&lat), nout = (size_t)db_tensor_numel(&target);
    /* the inputs on the device (the tensors themselves on the CPU) */
    const float *lat_d = tap_put(ctx, lat.data, n * sizeof(float));
    const float *ts_d = tap_put(ctx, ts.data, db_tensor_nbytes(&ts));
    const float *cx_d = tap_put(ctx, cx.data, db_tensor_nbytes(&cx));
    if (!lat_d || !ts_d || !cx_d) { /* (no line when it works: the CPU output stays as it was) */
        tap_ok(0, "%s: inputs onto the device: %s", tap_device(), ctx->err.msg);
        return tap_done();
    }

    db_model m;
    db_unet *u = NULL;
    if (!tap_ok(db_model_open(&m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0, "open model%s%s",
                err.code ? ": " : "", err.msg))
        return tap_done();
    rc = db_unet_create(&u, ctx, &m, &err);
    if (!tap_ok(rc == 0, "unet create%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();

    /* device buffers, each with a host mirror (the same memory on the CPU) */
    float *out = tap_dev_alloc(ctx, nout * sizeof *out), *dout = tap_dev_alloc(ctx, nout * sizeof *dout);
    float *dlat = tap_dev_alloc(ctx, n * sizeof *dlat), *dlat2 = tap_dev_alloc(ctx, n * sizeof *dlat2);
    float *out_h = tap_mirror(ctx, out, nout * sizeof *out), *dout_h = tap_mirror(ctx, dout, nout * sizeof *dout);
    float *dlat_h = tap_mirror(ctx, dlat, n * sizeof *dlat), *dlat2_h = tap_mirror(ctx, dlat2, n * sizeof *dlat2);
#define D2H(h, d, k) db_ctx_copy(ctx, h, d, (k) * sizeof(float), DB_COPY_D2H)
#define H2D(d, h, k) db_ctx_copy(ctx, d, h, (k) * sizeof(float), DB_COPY_H2D)
/* a failed copy as a failed call, with the ctx's reason */
#define COPIED(x) ((x) ? db_err_set(&err, ctx->err.code, "copy: %s", ctx->err.msg) : 0)

    /* a backward needs a training forward first */
    rc = db_unet_forward(u, out, lat_d, ts_d, cx_d, B, H, W, Tc, &err);
    rc = rc ? rc : db_unet_backward(u, dlat, NULL, NULL, out, &err);
    tap_ok(rc != 0 && strstr(err.msg, "keep_activations"), "backward after an inference forward refused: %s",
           rc ? err.msg : "(accepted)");

    db_unet_keep_activations(u, 1);
    rc = db_unet_forward(u, out, lat_d, ts_d, cx_d, B, H, W, Tc, &err);
    rc = rc ? rc : COPIED(D2H(out_h, out, nout));
    tap_ok(rc == 0, "%s: training forward%s%s", tap_device(), rc ? ": " : "", rc ? err.msg : "");
    /* loss = mean((out - target)^2); dout = 2 (out - target) / numel */
    double loss = 0;
    for (size_t i = 0; i < nout; i++) {
        double d = (double)out_h[i] - ((const float *)target.data)[i];
        loss += d * d;
        dout_h[i] = (float)(2.0 * d / (double)nout);
    }
    loss /= (double)nout;
    const double lref = ((const float *)loss_ref.data)[0];
    tap_ok(fabs(loss - lref) <= 1e-5 * fabs(lref), "%s: loss %.8g vs %.8g", tap_device(), loss, lref);

    /* the gradients live on the device (db_weights_like of the UNet's); gh
     * is their host copy after the first backward (g.data itself on the CPU) */
    db_weights g;
    const float *gh = NULL;
    rc = COPIED(H2D(dout, dout_h, nout));
    rc = rc ? rc : db_weights_like(&g, db_unet_weights(u), &err);
    rc = rc ? rc : db_unet_backward(u, dlat, NULL, &g, dout, &err);
    rc = rc ? rc : COPIED(D2H(dlat_h, dlat, n));
    if (rc == 0 && !(gh = tap_fetch(ctx, g.data, g.numel * sizeof *g.data)))
        rc = COPIED(1);
    if (!tap_ok(rc == 0, "%s: backward%s%s", tap_device(), rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();

    /* grad_latents */
    tap_cmp c = tap_compare(dlat_h, gl.data, n);
    tap_ok(c.rel <= REL_TOL, "%s: grad_latents: rel L2 %.3g (tol %g), worst [%zu] %.7g vs %.7g", tap_device(), c.rel,
           REL_TOL, c.at, dlat_h[c.at], ((const float *)gl.data)[c.at]);

    /* every parameter, by the name table (CompVis <-> diffusers) */
    db_tname *names = NULL;
    size_t nn = 0, nparam = 0, nok = 0, nmiss = 0, nzero = 0;
    double worst = 0, zmax = 0; /* zmax: the largest L2 of ours among the zero ones */
    char worst_name[160] = "(none)";
    const char *prefix = db_comp_prefix(DB_COMP_UNET);
    const size_t plen = strlen(prefix);
    rc = db_arch_names(&m.arch, &names, &nn, &err);
    tap_ok(rc == 0, "name table%s%s", rc ? ": " : "", rc ? err.msg : "");
    const db_weights *wt = db_unet_weights(u);
    for (size_t i = 0; rc == 0 && i < nn; i++) {
        if (names[i].comp != DB_COMP_UNET)
            continue;
        const char *cv = names[i].compvis;
        if (strncmp(cv, prefix, plen) == 0)
            cv += plen;
        char key[200];
        snprintf(key, sizeof key, "grad/%s", names[i].diffusers);
        db_tensor ref = {0};
        db_err e2 = {0};
        const float *w = db_weights_get(wt, &e2, -1, "%s", cv);
        if (!w || tap_ref_get(&gix, key, &ref, &e2)) {
            tap_diag("%s", e2.msg);
            nmiss++;
            continue;
        }
        const size_t k = (size_t)db_tensor_numel(&ref);
        const float *got = gh + (w - wt->data); /* w: a device pointer, only its offset is used */
        tap_cmp t = tap_compare(got, ref.data, k);
        nparam++;
        const double ng = l2(got, k), nw = l2(ref.data, k);
        if (nw <= ZERO_TOL) { /* roundoff only: see ZERO_TOL */
            nzero++;
            zmax = ng > zmax ? ng : zmax;
            if (ng <= ZERO_TOL)
                nok++;
            else
                tap_diag("%s (%s): reference is zero (L2 %.3g) but ours has L2 %.3g", cv, names[i].diffusers, nw,
                         ng);
            db_tensor_free(&ref);
            continue;
        }
        if (t.rel <= REL_TOL)
            nok++;
        else
            tap_diag("%s (%s): rel L2 %.3g", cv, names[i].diffusers, t.rel);
        if (!(t.rel <= worst)) {
            worst = t.rel;
            snprintf(worst_name, sizeof worst_name, "%s", cv);
        }
        db_tensor_free(&ref);
    }
    size_t nref = 0; /* every reference gradient was compared */
    for (size_t i = 0; i < gix.n; i++)
        nref += strncmp(gix.v[i].name, "grad/", 5) == 0;
    tap_ok(nmiss == 0 && nparam > 0 && nparam == nref && nok == nparam,
           "%s: parameter gradients: %zu of %zu within rel L2 %g (%zu zero in exact arithmetic: both L2 <= %g, "
           "ours at most %.3g; %zu missing, %zu in the reference); worst %s at rel L2 %.3g",
           tap_device(), nok, nparam, REL_TOL, nzero, ZERO_TOL, zmax, nmiss, nref, worst_name, worst);
    free(names);

    /* a second backward accumulates: the parameter gradients double (twice:
     * host memory, the expected sum) */
    float *twice = malloc(g.numel * sizeof *twice), *once = malloc(g.numel * sizeof *once);
    memcpy(once, gh, g.numel * sizeof *once);
    memcpy(twice, gh, g.numel * sizeof *twice);
    for (size_t i = 0; i < g.numel; i++)
        twice[i] *= 2.0f;
    tap_host_free(ctx, gh);
    rc = db_unet_backward(u, dlat2, NULL, &g, dout, &err);
    gh = rc ? NULL : tap_fetch(ctx, g.data, g.numel * sizeof *g.data);
    rc = rc ? rc : gh ? COPIED(D2H(dlat2_h, dlat2, n)) : COPIED(1);
    c = rc ? (tap_cmp){INFINITY, INFINITY, 0} : tap_compare(gh, twice, g.numel);
    tap_ok(rc == 0 && c.rel <= 1e-6, "%s: two backwards accumulate: rel L2 to 2x one %.3g%s%s", tap_device(), c.rel,
           rc ? ": " : "", rc ? err.msg : "");
    c = rc ? (tap_cmp){INFINITY, INFINITY, 0} : tap_compare(dlat2_h, dlat_h, n);
    tap_ok(c.maxabs == 0, "%s: second backward: same d latents (max |d| %.3g)", tap_device(), c.maxabs);
    if (gh)
        tap_host_free(ctx, gh);
    free(twice);

    /* assign (unet.h): every weight gets one contribution, written over what
     * the buffer held (NaN here, the alignment padding too, which is not
     * written), with the bits of the first backward's += into zeros; a
     * weight the backward missed would stay NaN */
    float *nan_h = malloc(g.numel * sizeof *nan_h);
    for (size_t i = 0; i < g.numel; i++)
        nan_h[i] = NAN;
    rc = COPIED(H2D(g.data, nan_h, g.numel));
    rc = rc ? rc : db_unet_backward_to(u, dlat2, NULL, &g, NULL, 1, dout, &err);
    gh = rc ? NULL : tap_fetch(ctx, g.data, g.numel * sizeof *g.data);
    size_t nbad = 0, ncmp = 0;
    for (size_t i = 0; gh && i < wt->ix.n; i++) {
        const db_tentry *e = &wt->ix.v[i];
        const size_t o = (size_t)e->offset, k = (size_t)db_shape_numel(e->ndim, e->shape);
        ncmp += k;
        if (memcmp(gh + o, once + o, k * sizeof *gh) != 0 && nbad++ < 3)
            tap_diag("%s: first element %g, not %g", e->name, gh[o], once[o]);
    }
    tap_ok(rc == 0 && gh && nbad == 0 && ncmp > 0,
           "%s: assigned backward over NaN: the %zu parameter gradients of %zu tensors the bits of one backward's "
           "+= into zeros (%zu tensors differ)%s%s",
           tap_device(), ncmp, wt->ix.n, nbad, rc ? ": " : "", rc ? err.msg : "");
    if (gh)
        tap_host_free(ctx, gh);

    /* the same through a gradient sink's window (the fused backward: units
     * written unit by unit), the window NaN at the start: every unit's
     * gradients those bits again, its padding zero */
    const size_t nwin = db_weights_window_floats(wt);
    float *win = tap_dev_alloc(ctx, nwin * sizeof *win);
    win_check wk = {ctx, wt, once, 0, 0, 0};
    db_grad_sink sink = {win, nwin, win_ready, &wk};
    rc = win ? COPIED(H2D(win, nan_h, nwin)) : db_err_set(&err, DB_ENOMEM, "window");
    rc = rc ? rc : db_unet_backward_to(u, dlat2, NULL, NULL, &sink, 0, dout, &err);
    tap_ok(rc == 0 && wk.units > 0 && wk.bad_tensors == 0 && wk.bad_padding == 0,
           "%s: through a gradient window (NaN at the start): %zu units, %zu tensors differ from one backward's, "
           "%zu padding floats not zero%s%s",
           tap_device(), wk.units, wk.bad_tensors, wk.bad_padding, rc ? ": " : "", rc ? err.msg : "");
    tap_dev_free(ctx, win);
    free(nan_h);
    free(once);

    /* frozen: no parameter gradients, d latents all the same */
    db_ctx_zero(ctx, dlat2, n * sizeof *dlat2);
    rc = db_unet_backward(u, dlat2, NULL, NULL, dout, &err);
    rc = rc ? rc : COPIED(D2H(dlat2_h, dlat2, n));
    c = tap_compare(dlat2_h, dlat_h, n);
    tap_ok(rc == 0 && c.rel <= 1e-6, "%s: frozen backward: d latents rel L2 %.3g to the trained one%s%s",
           tap_device(), c.rel, rc ? ": " : "", rc ? err.msg : "");

    /* d context (no reference): the directional derivative along d context
     * itself, against a central difference of the loss */
    const size_t ncx = (size_t)db_tensor_numel(&cx);
    float *dcx = tap_dev_alloc(ctx, ncx * sizeof *dcx), *cx2 = tap_dev_alloc(ctx, ncx * sizeof *cx2);
    float *dcx_h = tap_mirror(ctx, dcx, ncx * sizeof *dcx), *cx2_h = tap_mirror(ctx, cx2, ncx * sizeof *cx2);
    rc = db_unet_backward(u, NULL, dcx, NULL, dout, &err);
    rc = rc ? rc : COPIED(D2H(dcx_h, dcx, ncx));
    const double ndc = rc ? 0 : l2(dcx_h, ncx), step = 1e-2 / (ndc > 0 ? ndc : 1);
    double lpm[2];
    for (int s = 0; s < 2 && rc == 0; s++) {
        const float *c0 = cx.data;
        for (size_t i = 0; i < ncx; i++)
            cx2_h[i] = c0[i] + (float)((s ? -step : step) * dcx_h[i]);
        rc = COPIED(H2D(cx2, cx2_h, ncx));
        rc = rc ? rc : db_unet_forward(u, out, lat_d, ts_d, cx2, B, H, W, Tc, &err);
        rc = rc ? rc : COPIED(D2H(out_h, out, nout));
        lpm[s] = 0;
        for (size_t i = 0; i < nout; i++) {
            double d = (double)out_h[i] - ((const float *)target.data)[i];
            lpm[s] += d * d;
        }
        lpm[s] /= (double)nout;
    }
    if (rc == 0) {
        const double fd = (lpm[0] - lpm[1]) / (2 * step), an = ndc * ndc;
        tap_ok(fabs(fd - an) <= 1e-2 * an, "%s: d context: <dcontext, dcontext> %.6g vs central difference %.6g",
               tap_device(), an, fd);
    } else {
        tap_ok(0, "%s: d context: %s", tap_device(), err.msg);
    }
    tap_host_free(ctx, dcx_h);
    tap_host_free(ctx, cx2_h);
    tap_dev_free(ctx, dcx);
    tap_dev_free(ctx, cx2);
    /* back to the reference forward for what follows */
    rc = db_unet_forward(u, out, lat_d, ts_d, cx_d, B, H, W, Tc, &err);

    /* the check can fail: a wrong dout misses the reference */
    for (size_t i = 0; i < nout; i++)
        dout_h[i] *= 1.01f;
    rc = rc ? rc : COPIED(H2D(dout, dout_h, nout));
    rc = rc ? rc : db_unet_backward(u, dlat2, NULL, NULL, dout, &err);
    rc = rc ? rc : COPIED(D2H(dlat2_h, dlat2, n));
    c = rc ? (tap_cmp){0, 0, 0} : tap_compare(dlat2_h, gl.data, n);
    tap_ok(rc == 0 && c.rel > 10 * REL_TOL, "%s: dout x 1.01 misses grad_latents (rel L2 %.3g)", tap_device(), c.rel);

    db_weights_free(&g);
    tap_host_free(ctx, out_h);
    tap_host_free(ctx, dout_h);
    tap_host_free(ctx, dlat_h);
    tap_host_free(ctx, dlat2_h);
    tap_dev_free(ctx, out);
    tap_dev_free(ctx, dout);
    tap_dev_free(ctx, dlat);
    tap_dev_free(ctx, dlat2);
    tap_put_free(ctx, lat_d);
    tap_put_free(ctx, ts_d);
    tap_put_free(ctx, cx_d);
    db_unet_free(u);
    db_model_close(&m);
    db_tensor_free(&lat);
    db_tensor_free(&ts);
    db_tensor_free(&cx);
    db_tensor_free(&target);
    db_tensor_free(&gl);
    db_tensor_free(&loss_ref);
    db_tindex_free(&fix);
    db_tindex_free(&gix);
    db_safetensors_close(fst);
    db_safetensors_close(gst);
    db_ctx_destroy(ctx);
    return tap_done();
}
