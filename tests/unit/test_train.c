/* Three whole DreamBooth steps against diffusers' math
 * (tests/data/refs/train_steps.{json,safetensors}, from
 * ../shared/data/tiny-dev/refs; see its json "recipe"): text encoder
 * trainable, instance row 0 + prior row 1, prior weight 1, clip 1.0, AdamW
 * lr 1e-3 wd 1e-2, every random draw (posterior eps, noise, timesteps) an
 * input.  Checked per step: loss, loss_instance, loss_prior and the global
 * grad norm before clipping (relative 1e-5); after step 3 every UNet and
 * text-encoder weight (relative L2 1e-4 per tensor).  Gradients that are zero
 * in exact arithmetic (see ZERO_TOL in test_unet_backward.c) are roundoff
 * with a random sign, which AdamW turns into full +-lr steps: those tensors
 * are checked with an absolute bound instead.
 * Also: the same three steps twice give bit-identical weights, and on one
 * thread too; a NaN in the input stops the step with a clear error and
 * leaves the weights untouched. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/clip.h"
#include "libcommon/sd/sched.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/weights.h"
#include "tap.h"

#define REL_TOL 1e-4
#define LOSS_TOL 1e-5
#define ZERO_TOL 1e-6
#define NSTEPS TAP_TRAIN_REF_STEPS
#define LR 1e-3

/* train_steps.json, per step: loss, loss_instance, loss_prior, grad norm */
static const double REF[NSTEPS][4] = {
    {2.4017653465270996, 1.2432993650436401, 1.158466100692749, 4.914669990539551},
    {1.9468729496002197, 0.9506545066833496, 0.9962184429168701, 3.806699275970459},
    {1.5805904865264893, 0.8151532411575317, 0.7654371857643127, 3.0197901725769043},
};


/* Run the three steps; stats[k] per step.  perturb: move every clean
 * latent by one ulp first (the conditioning probe, see compare_weights). */
static int run(db_trainer *t, const tap_train_ref *in, int perturb, db_train_stats stats[NSTEPS], db_err *err)
{
    const size_t n = (size_t)in->B * in->C * in->H * in->W;
    float *lat = malloc(n * sizeof *lat);
    int rc = 0;
    for (int k = 0; k < NSTEPS && rc == 0; k++) {
        const db_train_batch b = tap_train_ref_batch(in, k, lat);
        for (size_t q = 0; perturb && q < n; q++) /* +-1 ulp, a fixed pseudo-random sign per element */
            lat[q] = nextafterf(lat[q], ((q * 2654435761u + (unsigned)perturb * 0x9e3779b9u) >> 7) & 1 ? INFINITY
                                                                                                   : -INFINITY);
        rc = db_trainer_accumulate(t, &b, NULL, err);
        rc = rc ? rc : db_trainer_apply(t, &stats[k], err);
    }
    free(lat);
    return rc;
}

/* Compare component comp's weights w with after/<component>/<diffusers name>.
 * A tensor that started at zero holds nothing but three AdamW updates, and
 * an element whose gradient changes sign between steps makes its m / sqrt(v)
 * a difference of nearly equal numbers: float32 roundoff of the gradients
 * (ours or torch's) is amplified there.  The test measures that conditioning
 * instead of guessing it: probe[0] and probe[1] hold the weights of the same
 * three steps with every input latent moved by one ulp (two sign patterns),
 * and a tensor's tolerance is max(REL_TOL, 8 x its larger relative L2 change
 * under the probes).  (The reference manifest's rule is 4 x the fp32-fp64
 * difference; 8 x here because the probes perturb only the inputs, while
 * torch and this code also round the gradients' reductions in different
 * orders.  Measured: 7 zero-initialised biases of 720 tensors need it, the
 * largest at 2.2e-4 with a probe sensitivity of 5e-5; probes move some
 * such tensors by 1e-3.)  zero[i]: tensor i's gradient is
 * roundoff only (checked with an absolute bound). */
static void compare_weights(const db_model *m, int comp, const char *folder, const db_weights *w,
                            const db_weights *before, db_weights *const probe[2], const db_tindex *rix,
                            const unsigned char *zero)
{
    db_err err = {0};
    db_tname *names = NULL;
    size_t nn = 0, nparam = 0, nok = 0, nzero = 0, nmiss = 0, nwide = 0;
    double widest = 0;
    double worst = 0, zworst = 0;
    char worst_name[200] = "(none)";
    if (db_arch_names(&m->arch, &names, &nn, &err)) {
        tap_ok(0, "name table: %s", err.msg);
        return;
    }
    const char *prefix = db_comp_prefix(comp);
    const size_t plen = strlen(prefix);
    const double zbound = 1.5 * 2 * NSTEPS * LR; /* each AdamW step moves an element by about lr at most */
    for (size_t i = 0; i < nn; i++) {
        if (names[i].comp != comp)
            continue;
        const char *cv = names[i].compvis + (strncmp(names[i].compvis, prefix, plen) == 0 ? plen : 0);
        char key[240];
        snprintf(key, sizeof key, "after/%s/%s", folder, names[i].diffusers);
        db_tensor ref = {0};
        db_err e2 = {0};
        long wi = db_tindex_find(&w->ix, cv);
        if (wi < 0 || tap_ref_get(rix, key, &ref, &e2)) {
            if (wi >= 0 || strstr(cv, "position_ids") == NULL) {
                tap_diag("%s: %s", cv, wi < 0 ? "not in the weights" : e2.msg);
                nmiss++;
            }
            continue;
        }
        const size_t k = (size_t)db_tensor_numel(&ref);
        const float *got = w->data + w->ix.v[wi].offset;
        nparam++;
        if (zero && zero[wi]) {
            nzero++;
            double mx = 0;
            for (size_t e = 0; e < k; e++) {
                double d = fabs((double)got[e] - ((const float *)ref.data)[e]);
                mx = d > mx ? d : mx;
            }
            zworst = mx > zworst ? mx : zworst;
            if (mx <= zbound)
                nok++;
            else
                tap_diag("%s: roundoff gradient, but max |diff| %.3g > %.3g", cv, mx, zbound);
            db_tensor_free(&ref);
            continue;
        }
        tap_cmp c = tap_compare(got, ref.data, k);
        const double s0 = tap_compare(probe[0]->data + w->ix.v[wi].offset, got, k).rel;
        const double s1 = tap_compare(probe[1]->data + w->ix.v[wi].offset, got, k).rel;
        const double sens = s0 > s1 ? s0 : s1;
        const double tol = 8 * sens > REL_TOL ? 8 * sens : REL_TOL;
        if (c.rel > REL_TOL && c.rel <= tol) {
            nwide++;
            widest = c.rel > widest ? c.rel : widest;
        }
        if (c.rel <= tol)
            nok++;
        else
            tap_diag("%s (%s): rel L2 %.3g (one-ulp sensitivity %.3g), worst [%zu] %.8g vs %.8g (was %.8g)", cv, names[i].diffusers, c.rel, sens, c.at,
                     got[c.at], ((const float *)ref.data)[c.at], before->data[w->ix.v[wi].offset + c.at]);
        if (!(c.rel <= worst)) {
            worst = c.rel;
            snprintf(worst_name, sizeof worst_name, "%s", cv);
        }
        db_tensor_free(&ref);
    }
    /* the weights moved: a test that cannot tell trained from untrained
     * weights would pass on a no-op optimizer */
    tap_cmp moved = tap_compare(w->data, before->data, w->numel);
    tap_ok(nmiss == 0 && nparam > 0 && nok == nparam,
           "%s weights after %d steps: %zu of %zu tensors pass: %zu within rel L2 %g, %zu (zero at the start) "
           "within 8x their one-ulp sensitivity (largest error %.3g), %zu with roundoff gradients within |diff| "
           "%.3g (worst %.3g); worst %s at %.3g; %zu missing",
           folder, NSTEPS, nok, nparam, nparam - nzero - nwide, REL_TOL, nwide, widest, nzero, zbound, zworst,
           worst_name, worst, nmiss);
    tap_ok(moved.rel > 1e-4, "%s weights moved from the start: rel L2 %.3g", folder, moved.rel);
    free(names);
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL, *ctx1 = NULL;
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 0, &err) == 0 && db_ctx_create(&ctx1, DB_CPU, 1, &err) == 0,
                "cpu contexts%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
    static tap_train_fix fx;
    if (tap_train_fix_open(&fx))
        return tap_done();
    const tap_train_ref in = fx.in;
    db_model *m = &fx.m;
    const db_tindex *rix = &fx.rix;
    int rc;
    db_train_opts o = db_train_opts_defaults(LR, NSTEPS);
    o.train_text = 1;
    db_trainer *t = NULL, *t2 = NULL;
    rc = db_trainer_create(&t, ctx, m, &o, &err);
    if (!tap_ok(rc == 0, "trainer%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();
    db_train_state st;
    db_trainer_state(t, &st);
    db_weights u0, t0;
    rc = db_weights_like(&u0, st.unet, &err) || db_weights_like(&t0, st.text, &err);
    memcpy(u0.data, st.unet->data, u0.numel * sizeof(float));
    memcpy(t0.data, st.text->data, t0.numel * sizeof(float));

    /* which UNet gradients are roundoff: one forward/backward of step 0 */
    unsigned char *zero = calloc(st.unet->n + st.text->n, 1);
    {
        float *lat = malloc((size_t)in.B * in.C * in.H * in.W * sizeof *lat);
        const db_train_batch b = tap_train_ref_batch(&in, 0, lat);
        db_train_opts o2 = o;
        o2.max_grad_norm = 0;
        db_trainer *tz = NULL;
        size_t nz = 0, nzt = 0;
        if (db_trainer_create(&tz, ctx, m, &o2, &err) == 0 && db_trainer_accumulate(tz, &b, NULL, &err) == 0) {
            /* roundoff tensors: gradient L2 below ZERO_TOL */
            const size_t ng = st.unet->n + st.text->n;
            double *g2 = calloc(ng, sizeof *g2);
            db_trainer_grad_norms(tz, g2, ng);
            for (size_t i = 0; i < ng; i++)
                if (g2[i] <= ZERO_TOL)
                    zero[i] = 1, nz += i < st.unet->n, nzt += i >= st.unet->n;
            free(g2);
        }
        db_trainer_free(tz);
        free(lat);
        /* the manifest (unet/param_grads analytically_zero_grad_tensors)
         * lists 19 such tensors for this model */
        tap_ok(nz == 19, "%zu UNet tensors with roundoff-only gradients (the reference's manifest lists 19)", nz);
        /* the key bias: q.(k + b) adds q.b to every score of a query, which
         * the softmax cancels, so each layer's k_proj.bias has none */
        tap_ok(nzt == (size_t)m->arch.text.layers, "%zu text-encoder tensors with roundoff-only gradients (the %d "
               "k_proj biases)", nzt, m->arch.text.layers);
    }

    /* a caller's second micro-batch before the step adds (the UNet's
     * backward assigns the first one's only: train.c unet_assigns): with
     * grad_accum 1, two micro-batches give twice the gradients that
     * grad_accum 2 gives for the same two batches (its dout is half, a
     * power-of-two scale that every op carries exactly) */
    {
        float *lat = malloc((size_t)in.B * in.C * in.H * in.W * sizeof *lat);
        db_train_opts ob = o;
        ob.grad_accum = 2;
        db_trainer *ta = NULL, *tb = NULL;
        int ok = db_trainer_create(&ta, ctx, m, &o, &err) == 0 && db_trainer_create(&tb, ctx, m, &ob, &err) == 0;
        for (int k = 0; k < 2 && ok; k++) {
            const db_train_batch b = tap_train_ref_batch(&in, k, lat);
            ok = db_trainer_accumulate(ta, &b, NULL, &err) == 0 && db_trainer_accumulate(tb, &b, NULL, &err) == 0;
        }
        const size_t ng = ok ? db_trainer_grad_norms(ta, NULL, 0) : 0;
        double *na = calloc(ng + 1, sizeof *na), *nb = calloc(ng + 1, sizeof *nb), worst = ok ? 0 : INFINITY;
        if (ok && db_trainer_grad_norms(ta, na, ng) == ng && db_trainer_grad_norms(tb, nb, ng) == ng)
            for (size_t i = 0; i < ng; i++) {
                const double d = fabs(na[i] - 2 * nb[i]) / (2 * nb[i] > 0 ? 2 * nb[i] : 1);
                worst = d > worst || d != d ? d : worst;
            }
        tap_ok(ok && ng > 0 && worst <= 1e-6,
               "grad_accum 1, two micro-batches before the step: the %zu tensors' gradient norms twice grad_accum "
               "2's (worst rel %.3g)%s%s", ng, worst, ok ? "" : ": ", ok ? "" : err.msg);
        free(na);
        free(nb);
        db_trainer_free(ta);
        db_trainer_free(tb);
        free(lat);
    }

    /* the loss's row weights, which the reference's recipe (prior weight
     * 1, no min-SNR) leaves at 1: --prior-loss-weight 2 and --snr-gamma
     * set so that the instance row's weight is w0 = 1 / 2.7.  By
     * linearity of the backward in d loss / d pred: the instance row alone
     * gives w0 times its unweighted gradients and loss, the prior row alone
     * twice (exactly: a power of two), and the two rows in one batch the
     * gradients of the two rows as two micro-batches of one row each
     * (which row's factor scales which row's gradient) */
    {
        const size_t per = (size_t)in.C * in.H * in.W;
        float *lat = malloc((size_t)in.B * per * sizeof *lat);
        const db_train_batch b2 = tap_train_ref_batch(&in, 0, lat);
        db_train_batch row[2];
        for (int r = 0; r < 2; r++) {
            row[r] = b2;
            row[r].B = 1, row[r].n_inst = r == 0;
            row[r].latents = b2.latents + r * per, row[r].noise = b2.noise + r * per;
            row[r].timesteps = b2.timesteps + r, row[r].ids = b2.ids + r * b2.T;
        }
        db_train_opts ow = o; /* weighted */
        ow.prior_weight = 2;
        double w0 = 0;
        {
            const float *acp = db_sched_alphas_cumprod(db_trainer_sched(t));
            const double a = acp[b2.timesteps[0]], snr = a / (1 - a);
            ow.snr_gamma = snr / 2.7, w0 = ow.snr_gamma / snr;
        }
        /* trainers: 0 both rows, weighted; 1 the rows one after the other,
         * weighted; 2 / 3 the instance row plain / weighted; 4 / 5 the
         * prior row plain / weighted */
        db_trainer *tw[6] = {0};
        db_train_stats sw[7];
        int ok = 1;
        for (int i = 0; i < 6 && ok; i++)
            ok = db_trainer_create(&tw[i], ctx, m, i == 2 || i == 4 ? &o : &ow, &err) == 0;
        ok = ok && db_trainer_accumulate(tw[0], &b2, &sw[0], &err) == 0 &&
             db_trainer_accumulate(tw[1], &row[0], &sw[1], &err) == 0 &&
             db_trainer_accumulate(tw[1], &row[1], &sw[6], &err) == 0;
        for (int i = 2; i < 6 && ok; i++)
            ok = db_trainer_accumulate(tw[i], &row[i >= 4], &sw[i], &err) == 0;
        const size_t ng = ok ? db_trainer_grad_norms(tw[0], NULL, 0) : 0;
        double *nrm[6], worst[3] = {0, 0, 0};
        for (int i = 0; i < 6; i++) {
            nrm[i] = calloc(ng + 1, sizeof *nrm[i]);
            ok = ok && db_trainer_grad_norms(tw[i], nrm[i], ng) == ng;
        }
        /* relative, with a floor for the roundoff-only tensors (norms ~1e-8,
         * where the other tensors' are 1e-4 .. 1) */
#define REL(a, b) (fabs((a) - (b)) / (fabs(b) + 1e-3))
        for (size_t i = 0; ok && i < ng; i++) {
            const double d[3] = {REL(nrm[0][i], nrm[1][i]), REL(nrm[3][i], w0 * nrm[2][i]),
                                 REL(nrm[5][i], 2 * nrm[4][i])};
            for (int q = 0; q < 3; q++)
                worst[q] = d[q] > worst[q] || d[q] != d[q] ? d[q] : worst[q];
        }
        tap_ok(ok && ng > 0 && worst[0] <= 1e-4,
               "prior weight 2, min-SNR: two rows in one batch give the gradients of the rows as two micro-batches "
               "(%zu tensors' norms, worst rel %.3g)%s%s", ng, worst[0], ok ? "" : ": ", ok ? "" : err.msg);
        tap_ok(ok && worst[1] <= 1e-5 && REL(sw[3].loss_instance, w0 * sw[2].loss_instance) <= 1e-6 &&
                   REL(sw[3].loss, sw[3].loss_instance) <= 1e-12,
               "min-SNR: the instance row's loss and gradients weighted by min(snr, gamma) / snr = %.4f (loss %.6g vs "
               "%.6g, worst gradient rel %.3g)", w0, sw[3].loss_instance, w0 * sw[2].loss_instance, worst[1]);
        tap_ok(ok && worst[2] <= 1e-6 && sw[5].loss == 2 * sw[5].loss_prior && sw[5].loss_prior == sw[4].loss_prior,
               "prior weight 2: the prior row's gradients twice the plain ones (worst rel %.3g), its loss %.6g = 2 x "
               "%.6g", worst[2], sw[5].loss, sw[5].loss_prior);
        tap_ok(ok && REL(sw[0].loss_instance, sw[1].loss_instance) <= 1e-5 &&
                   REL(sw[0].loss_prior, sw[6].loss_prior) <= 1e-5 &&
                   REL(sw[0].loss, sw[0].loss_instance + 2 * sw[0].loss_prior) <= 1e-12,
               "prior weight 2, min-SNR, two rows: loss %.6g = %.6g + 2 x %.6g, the rows' terms as alone",
               sw[0].loss, sw[0].loss_instance, sw[0].loss_prior);
#undef REL
        for (int i = 0; i < 6; i++) {
            free(nrm[i]);
            db_trainer_free(tw[i]);
        }
        free(lat);
    }

    db_train_stats s[NSTEPS];
    rc = run(t, &in, 0, s, &err);
    if (!tap_ok(rc == 0, "three steps%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();
    static const char *what[4] = {"loss", "loss_instance", "loss_prior", "grad norm"};
    for (int k = 0; k < NSTEPS; k++) {
        const double got[4] = {s[k].loss, s[k].loss_instance, s[k].loss_prior, s[k].grad_norm};
        for (int q = 0; q < 4; q++)
            tap_ok(fabs(got[q] - REF[k][q]) <= LOSS_TOL * fabs(REF[k][q]), "step %d %s %.9g vs %.9g (rel %.2g)",
                   k, what[q], got[q], REF[k][q], fabs(got[q] - REF[k][q]) / fabs(REF[k][q]));
    }
    tap_ok(s[NSTEPS - 1].step == NSTEPS && s[0].lr == LR, "step count %lld, lr %g", (long long)s[NSTEPS - 1].step,
           s[0].lr);
    /* the one-ulp probes */
    db_trainer *tp[2] = {NULL, NULL};
    db_train_state stp[2];
    for (int q = 0; q < 2; q++) {
        db_train_stats sp[NSTEPS];
        rc = db_trainer_create(&tp[q], ctx, m, &o, &err);
        rc = rc ? rc : run(tp[q], &in, q + 1, sp, &err);
        if (!tap_ok(rc == 0, "one-ulp probe run %d%s%s", q, rc ? ": " : "", rc ? err.msg : ""))
            return tap_done();
        db_trainer_state(tp[q], &stp[q]);
    }
    db_weights *pu[2] = {stp[0].unet, stp[1].unet}, *pt[2] = {stp[0].text, stp[1].text};
    compare_weights(m, DB_COMP_UNET, "unet", st.unet, &u0, pu, rix, zero);
    compare_weights(m, DB_COMP_TEXT, "text_encoder", st.text, &t0, pt, rix, zero + st.unet->n);
    db_trainer_free(tp[0]);
    db_trainer_free(tp[1]);

    /* determinism: a second trainer, one thread, the same steps: every bit */
    rc = db_trainer_create(&t2, ctx1, m, &o, &err);
    db_train_stats s2[NSTEPS];
    rc = rc ? rc : run(t2, &in, 0, s2, &err);
    if (tap_ok(rc == 0, "second run on one thread%s%s", rc ? ": " : "", rc ? err.msg : "")) {
        db_train_state st2;
        db_trainer_state(t2, &st2);
        int same = memcmp(st2.unet->data, st.unet->data, st.unet->numel * sizeof(float)) == 0 &&
                   memcmp(st2.text->data, st.text->data, st.text->numel * sizeof(float)) == 0 &&
                   memcmp(st2.unet_m->data, st.unet_m->data, st.unet->numel * sizeof(float)) == 0 &&
                   memcmp(st2.text_v->data, st.text_v->data, st.text->numel * sizeof(float)) == 0;
        tap_ok(same && s2[2].loss == s[2].loss && s2[2].grad_norm == s[2].grad_norm,
               "2 threads and 1 thread: bit-identical weights, moments, losses and norms");
    }

    /* a NaN in the latents: a clear error, nothing applied */
    {
        const size_t n = (size_t)in.B * in.C * in.H * in.W;
        float *lat = calloc(n, sizeof *lat);
        lat[5] = NAN;
        db_trainer_state(t2, &st);
        memcpy(u0.data, st.unet->data, u0.numel * sizeof(float));
        db_train_batch b = {.B = in.B, .n_inst = 1, .C = in.C, .H = in.H, .W = in.W, .T = 77, .latents = lat,
                            .noise = in.noise[0].data, .timesteps = in.ts[0].data, .ids = in.ids};
        db_err e3 = {0};
        rc = db_trainer_accumulate(t2, &b, NULL, &e3);
        rc = rc ? rc : db_trainer_apply(t2, NULL, &e3);
        tap_ok(rc != 0 && e3.code == DB_ENUMERIC && strstr(e3.msg, "diverged") &&
                   memcmp(u0.data, st.unet->data, u0.numel * sizeof(float)) == 0,
               "NaN input refused, weights untouched: %s", e3.msg);
        /* the refusal drops what the backward had added: a good batch
         * after it gives the gradients it gives a fresh trainer, bit for
         * bit (the text encoder's add into their buffer) */
        float *good = malloc(n * sizeof *good);
        const db_train_batch bg = tap_train_ref_batch(&in, 0, good);
        db_trainer *tn = NULL, *tg = NULL;
        db_err e4 = {0};
        int ok = db_trainer_create(&tn, ctx, m, &o, &e4) == 0 && db_trainer_create(&tg, ctx, m, &o, &e4) == 0 &&
                 db_trainer_accumulate(tn, &b, NULL, &e4) != 0;
        e4 = (db_err){0};
        ok = ok && db_trainer_accumulate(tn, &bg, NULL, &e4) == 0 && db_trainer_accumulate(tg, &bg, NULL, &e4) == 0;
        const size_t ng = ok ? db_trainer_grad_norms(tn, NULL, 0) : 0;
        double *na = calloc(ng + 1, sizeof *na), *nb = calloc(ng + 1, sizeof *nb);
        ok = ok && ng > 0 && db_trainer_grad_norms(tn, na, ng) == ng && db_trainer_grad_norms(tg, nb, ng) == ng &&
             memcmp(na, nb, ng * sizeof *na) == 0;
        tap_ok(ok, "after a refused NaN batch, a good one's %zu gradient norms are a fresh trainer's, bit for bit%s%s",
               ng, e4.code ? ": " : "", e4.code ? e4.msg : "");
        free(na);
        free(nb);
        free(good);
        db_trainer_free(tn);
        db_trainer_free(tg);
        free(lat);
    }

    db_trainer_free(t);
    db_trainer_free(t2);
    db_weights_free(&u0);
    db_weights_free(&t0);
    free(zero);
    tap_train_fix_close(&fx);
    db_ctx_destroy(ctx);
    db_ctx_destroy(ctx1);
    return tap_done();
}
