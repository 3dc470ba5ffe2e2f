/* Does DreamBooth training learn?  On the tiny model (tests/data/tiny), one
 * synthetic "subject" (a fixed latent field, posterior logvar -12, with the
 * prompt "a photo of sks dog") and four class latents ("a photo of a dog"),
 * 40 steps of prior-preservation training (text encoder trained, lr 1e-3):
 *   - the instance loss on 16 fixed evaluation draws falls by a stated
 *     factor (LEARN_FACTOR);
 *   - the prior loss on the class latents does not rise (at most PRIOR_RISE
 *     x its start; this random-init base is still learning to denoise, so
 *     it falls), and the same training without the prior term (prior
 *     weight 0) ends with a prior loss at least PRIOR_GAIN x higher: the
 *     prior term is what keeps the class prompt from drifting;
 *   - 20-step DDIM sampling of "a photo of sks dog" from fixed noise lands
 *     nearer the subject than before training (by NEAR_FACTOR).
 * The factors are measured values rounded down with margin, printed as
 * diagnostics. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/clip.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/sched.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/trainset.h"
#include "libcommon/sd/unet.h"
#include "tap.h"

#define STEPS 40
#define NEVAL 16
#define LEARN_FACTOR 3.0  /* instance eval loss: before / after >= this (measured 6.4) */
#define PRIOR_RISE 1.1    /* prior eval loss after <= this x before */
#define PRIOR_GAIN 1.05   /* prior eval loss without / with the prior term >= this (measured 1.12) */
#define NEAR_FACTOR 0.5   /* sample distance to the subject: after <= this x before (measured 0.30) */

enum { C = TAP_LEARN_C, H = TAP_LEARN_H, W = TAP_LEARN_W, T = TAP_LEARN_T, N = TAP_LEARN_N };
typedef tap_learn fixture;

/* One micro-batch: instance row then a class row (tap.c). */
static int batch(db_trainer *tr, const fixture *f, uint64_t seed, uint64_t u, int eval, db_train_stats *s,
                 db_err *err)
{
    return tap_learn_batch(tr, f, 2, seed, u, eval, s, err);
}

/* Mean instance and prior loss over the evaluation draws (seed 1000). */
static int evaluate(db_trainer *tr, const fixture *f, double *li, double *lp, db_err *err)
{
    *li = *lp = 0;
    for (int k = 0; k < NEVAL; k++) {
        db_train_stats s;
        if (batch(tr, f, 1000, (uint64_t)k, 1, &s, err))
            return -1;
        *li += s.loss_instance / NEVAL;
        *lp += s.loss_prior / NEVAL;
    }
    return 0;
}

/* 20-step DDIM sample of the identifier prompt from fixed noise; returns
 * the RMS distance of the result to the subject. */
static double sample_distance(db_trainer *tr, const db_model *m, const fixture *f, db_err *err)
{
    db_sched *s = NULL;
    float x[N], out[N], ctx[T * 32 * 32]; /* context: T x D, D <= 1024 for the tiny model */
    db_clip *clip = db_trainer_clip(tr);
    if (clip->arch.hidden * T > (int)(sizeof ctx / sizeof *ctx))
        return db_err_set(err, DB_EUSAGE, "text width too large for the test"), NAN;
    if (db_sched_create(&s, "ddim", m->scheduler, err) || db_sched_set_timesteps(s, 20, err))
        return NAN;
    if (db_clip_forward(clip, ctx, NULL, NULL, f->ids_inst, 1, T, err))
        return NAN;
    db_noise_latents(x, N, 7, 0, 0);
    for (int i = 0; i < db_sched_nsteps(s); i++) {
        const float tt = (float)db_sched_timestep(s, i);
        if (db_unet_forward(db_trainer_unet(tr), out, x, &tt, ctx, 1, H, W, T, err) ||
            db_sched_step(s, i, out, x, N, NULL, NULL, err)) {
            db_sched_free(s);
            return NAN;
        }
    }
    db_sched_free(s);
    double d = 0;
    for (int k = 0; k < N; k++)
        d += ((double)x[k] - f->subject[k]) * ((double)x[k] - f->subject[k]);
    return sqrt(d / N);
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    db_model m;
    static fixture f;
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 0, &err) == 0 &&
                    db_model_open(&m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0 &&
                    tap_learn_make(&f, &err) == 0,
                "model, tokenizer, prompts%s%s", err.code ? ": " : "", err.msg))
        return tap_done();

    db_train_opts o = db_train_opts_defaults(1e-3, STEPS);
    o.train_text = 1;
    db_trainer *tr = NULL, *t0 = NULL;
    db_train_opts o0 = o;
    o0.prior_weight = 0;
    int rc = db_trainer_create(&tr, ctx, &m, &o, &err);
    rc = rc ? rc : db_trainer_create(&t0, ctx, &m, &o0, &err);
    if (!tap_ok(rc == 0, "trainers%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return tap_done();
    double li0, lp0, li1, lp1, li2, lp2;
    rc = evaluate(tr, &f, &li0, &lp0, &err);
    const double d0 = rc ? NAN : sample_distance(tr, &m, &f, &err);
    for (int step = 0; rc == 0 && step < STEPS; step++) {
        db_train_stats s;
        rc = batch(tr, &f, 5, (uint64_t)step, 0, NULL, &err);
        rc = rc ? rc : db_trainer_apply(tr, &s, &err);
        rc = rc ? rc : batch(t0, &f, 5, (uint64_t)step, 0, NULL, &err);
        rc = rc ? rc : db_trainer_apply(t0, &s, &err);
    }
    rc = rc ? rc : evaluate(tr, &f, &li1, &lp1, &err);
    rc = rc ? rc : evaluate(t0, &f, &li2, &lp2, &err);
    const double d1 = rc ? NAN : sample_distance(tr, &m, &f, &err);
    if (!tap_ok(rc == 0 && isfinite(d0) && isfinite(d1), "%d training steps and evaluations%s%s", STEPS,
                err.code ? ": " : "", err.msg))
        return tap_done();
    tap_diag("instance loss %.4f -> %.4f (x%.2f), prior loss %.4f -> %.4f (x%.2f); without the prior term: "
             "instance %.4f, prior %.4f; sample RMS distance to the subject %.4f -> %.4f (x%.2f)",
             li0, li1, li0 / li1, lp0, lp1, lp1 / lp0, li2, lp2, d0, d1, d1 / d0);
    tap_ok(li0 / li1 >= LEARN_FACTOR, "instance loss falls by at least %gx: %.4f -> %.4f", LEARN_FACTOR, li0, li1);
    tap_ok(lp1 <= PRIOR_RISE * lp0, "prior loss does not rise (<= %gx): %.4f -> %.4f", PRIOR_RISE, lp0, lp1);
    tap_ok(lp2 >= PRIOR_GAIN * lp1, "without the prior term the prior loss ends >= %gx higher: %.4f vs %.4f",
           PRIOR_GAIN, lp2, lp1);
    tap_ok(d1 <= NEAR_FACTOR * d0, "sampling the identifier lands nearer the subject: %.4f -> %.4f (<= %gx)", d0,
           d1, NEAR_FACTOR);
    db_trainer_free(tr);
    db_trainer_free(t0);
    db_model_close(&m);
    db_ctx_destroy(ctx);
    return tap_done();
}
