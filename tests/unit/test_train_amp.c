/* The trainer in bf16 and fp16 (kernels/ops.h's autocast, emulated on the
 * CPU) and fp16's dynamic loss scaling (train.h), on the tiny model with
 * test_train.c's three reference batches:
 *   - bf16 and fp16 losses stay within LOSS_BAND (relative) of fp32's at
 *     every step, and are not fp32's (the emulation is in the path);
 *   - fp16 with a forced large initial scale and growth interval 2: the
 *     first steps overflow and are skipped (weights, moments and the
 *     update count untouched, the scale halved each time), then steps
 *     apply, and after 2 finite steps in a row the scale doubles (and here
 *     overflows again: the scale settles as GradScaler's does);
 *   - the counters round-trip through a checkpoint's state.json
 *     (db_train_ckpt_restore_counters), and fp32 never scales. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/train_ckpt.h"
#include "libcommon/sd/weights.h"
#include "tap.h"

#define NREF TAP_TRAIN_REF_STEPS
#define LR 1e-3
/* bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per
 * operand), fp16 11; over the tiny model's few layers and steps the loss
 * moves far less (measured: bf16 4.4e-4, fp16 5.1e-5 at worst), so the
 * band catches a broken emulation, not rounding. */
#define LOSS_BAND 2e-2
/* 2^20: measured on this model and these batches, scales of 2^18 and up
 * overflow fp16 somewhere in the backward (GradScaler's 2^16 does not),
 * so the first steps are skipped and halving reaches a scale that fits
 * within a few steps. */
#define FORCE_SCALE 1048576.0
#define AMP_STEPS 6


static int same(const db_weights *a, const db_weights *b)
{
    return a->numel == b->numel && !memcmp(a->data, b->data, a->numel * sizeof(float));
}

static int all_zero(const db_weights *a)
{
    for (size_t i = 0; i < a->numel; i++)
        if (a->data[i] != 0.0f)
            return 0;
    return 1;
}

/* NREF steps in precision p; losses into s. */
static int run_prec(db_ctx *ctx, const db_model *m, const tap_train_ref *in, db_precision p, db_train_stats s[NREF],
                    db_err *err)
{
    db_train_opts o = db_train_opts_defaults(LR, NREF);
    o.train_text = 1;
    db_ctx_set_precision(ctx, p);
    db_trainer *t = NULL;
    int rc = db_trainer_create(&t, ctx, m, &o, err);
    for (int k = 0; rc == 0 && k < NREF; k++)
        rc = tap_train_ref_step(t, in, k, &s[k], err);
    db_trainer_free(t);
    db_ctx_set_precision(ctx, DB_PREC_F32);
    return rc;
}

static void test_bands(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    db_train_stats s32[NREF], sp[2][NREF];
    const db_precision ps[2] = {DB_PREC_BF16, DB_PREC_F16};
    int rc = run_prec(ctx, m, in, DB_PREC_F32, s32, &err);
    if (!tap_ok(rc == 0, "fp32: %d steps%s%s", NREF, rc ? ": " : "", rc ? err.msg : ""))
        return;
    tap_ok(s32[0].loss_scale == 0 && !s32[0].skipped, "fp32: no loss scaling (scale %g)", s32[0].loss_scale);
    for (int q = 0; q < 2; q++) {
        const char *pn = db_precision_name(ps[q]);
        rc = run_prec(ctx, m, in, ps[q], sp[q], &err);
        if (!tap_ok(rc == 0, "%s: %d steps%s%s", pn, NREF, rc ? ": " : "", rc ? err.msg : ""))
            continue;
        double worst = 0;
        int differs = 0, skipped = 0;
        for (int k = 0; k < NREF; k++) {
            const double rel = fabs(sp[q][k].loss - s32[k].loss) / fabs(s32[k].loss);
            worst = rel > worst ? rel : worst;
            differs |= sp[q][k].loss != s32[k].loss;
            skipped += sp[q][k].skipped;
            tap_diag("%s step %d: loss %.7f (fp32 %.7f, rel %.2e), grad norm %.5f (fp32 %.5f), scale %g", pn, k + 1,
                     sp[q][k].loss, s32[k].loss, rel, sp[q][k].grad_norm, s32[k].grad_norm, sp[q][k].loss_scale);
        }
        tap_ok(worst < LOSS_BAND, "%s: every step's loss within %g of fp32's (worst %.2e)", pn, LOSS_BAND, worst);
        tap_ok(differs, "%s: the losses are not fp32's (the emulation is in the path)", pn);
        tap_ok(!skipped, "%s: no step skipped at the default scale", pn);
        if (ps[q] == DB_PREC_F16)
            tap_ok(sp[q][0].loss_scale == 65536.0 && sp[q][NREF - 1].loss_scale == 65536.0,
                   "fp16: GradScaler's initial scale 65536, unchanged before 2000 steps (%g)",
                   sp[q][NREF - 1].loss_scale);
        else
            tap_ok(sp[q][0].loss_scale == 0, "bf16: no loss scaling");
    }
}

static void test_skip(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    db_train_opts o = db_train_opts_defaults(LR, AMP_STEPS);
    o.train_text = 1;
    o.loss_scale_init = FORCE_SCALE;
    o.loss_scale_interval = 2;
    db_ctx_set_precision(ctx, DB_PREC_F16);
    db_trainer *t = NULL;
    int rc = db_trainer_create(&t, ctx, m, &o, &err);
    if (!tap_ok(rc == 0, "fp16 trainer with initial scale 2^20%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return;
    db_train_state st;
    db_trainer_state(t, &st);
    db_weights u0, x0;
    if (db_weights_like(&u0, st.unet, &err) || db_weights_like(&x0, st.text, &err))
        return (void)tap_ok(0, "copies: %s", err.msg);
    memcpy(u0.data, st.unet->data, u0.numel * sizeof(float));
    memcpy(x0.data, st.text->data, x0.numel * sizeof(float));

    /* GradScaler's rule, mirrored: what the scale must be after each step */
    int nskip = 0, napplied = 0, first_skipped = 0, halves = 1, untouched = 1, counters = 1;
    double expect = FORCE_SCALE, first_applied_scale = 0;
    int64_t tracker = 0;
    db_weights pu, px, pm; /* the state before the step */
    if (db_weights_like(&pu, st.unet, &err) || db_weights_like(&px, st.text, &err) ||
        db_weights_like(&pm, st.unet_m, &err))
        return (void)tap_ok(0, "copies: %s", err.msg);
    int k;
    for (k = 0; k < AMP_STEPS; k++) {
        db_trainer_state(t, &st);
        memcpy(pu.data, st.unet->data, pu.numel * sizeof(float));
        memcpy(px.data, st.text->data, px.numel * sizeof(float));
        memcpy(pm.data, st.unet_m->data, pm.numel * sizeof(float));
        db_train_stats s;
        if ((rc = tap_train_ref_step(t, in, k, &s, &err)))
            break;
        db_trainer_state(t, &st);
        tap_diag("step %d: %s, scale %g, grad norm %g, loss %.6f", k + 1, s.skipped ? "skipped" : "applied",
                 s.loss_scale, s.grad_norm, s.loss);
        halves &= s.loss_scale == expect;
        counters &= s.step == k + 1 && st.step == k + 1 && st.opt_step == napplied + !s.skipped;
        if (s.skipped) {
            first_skipped |= k == 0;
            nskip++;
            expect *= 0.5, tracker = 0;
            untouched &= same(st.unet, &pu) && same(st.text, &px) && same(st.unet_m, &pm) && !isfinite(s.grad_norm);
        } else {
            if (!napplied++)
                first_applied_scale = s.loss_scale;
            if (++tracker == o.loss_scale_interval)
                expect *= 2, tracker = 0;
            untouched &= !same(st.unet, &pu) && isfinite(s.grad_norm);
        }
        halves &= st.loss_scale == expect && st.growth_tracker == tracker;
    }
    db_weights_free(&pu), db_weights_free(&px), db_weights_free(&pm);
    tap_ok(rc == 0, "fp16: %d steps%s%s", k, rc ? ": " : "", rc ? err.msg : "");
    tap_ok(first_skipped && nskip >= 2, "the first step overflowed and was skipped (%d skipped in all)", nskip);
    tap_ok(untouched, "a skipped step leaves the weights and moments bit-identical; an applied one moves them");
    tap_ok(halves, "the scale follows GradScaler: halves on each skip (2^20 -> %g at the first applied step), "
           "doubles after 2 finite steps in a row", first_applied_scale);
    tap_ok(counters, "step counts every step, the update count only applied ones (%d of %d)", napplied, k);
    tap_ok(napplied >= 2 && !same(st.unet, &u0) && !same(st.text, &x0) && !all_zero(st.unet_m),
           "the later steps apply (%d)", napplied);

    /* the counters through a checkpoint's state.json */
    db_trainer_state(t, &st);
    json_t *js = json_pack("{s:I, s:I, s:f, s:I}", "step", (json_int_t)st.step, "optimizer_step",
                           (json_int_t)st.opt_step, "loss_scale", st.loss_scale, "growth_tracker",
                           (json_int_t)st.growth_tracker);
    char *text = json_dumps(js, JSON_COMPACT);
    json_t *back = json_loads(text, 0, NULL);
    db_trainer *t2 = NULL;
    rc = db_trainer_create(&t2, ctx, m, &o, &err);
    rc = rc ? rc : db_train_ckpt_restore_counters(back, t2, &err);
    db_train_state st2;
    if (rc == 0)
        db_trainer_state(t2, &st2);
    tap_ok(rc == 0 && st2.step == st.step && st2.opt_step == st.opt_step && st2.loss_scale == st.loss_scale &&
               st2.growth_tracker == st.growth_tracker,
           "state.json %s restores the counters%s%s", text, rc ? ": " : "", rc ? err.msg : "");
    /* an older checkpoint (no optimizer_step, no scale): every step an update, the initial scale */
    json_t *old = json_pack("{s:I}", "step", (json_int_t)7);
    rc = db_train_ckpt_restore_counters(old, t2, &err);
    db_trainer_state(t2, &st2);
    tap_ok(rc == 0 && st2.step == 7 && st2.opt_step == 7 && st2.loss_scale == st.loss_scale,
           "a checkpoint without the new keys: optimizer_step = step, the scale kept");
    json_t *bad = json_pack("{s:I, s:I}", "step", (json_int_t)3, "optimizer_step", (json_int_t)4);
    db_err e2 = {0};
    tap_ok(db_train_ckpt_restore_counters(bad, t2, &e2) != 0 && e2.code == DB_EFORMAT,
           "more updates than steps is refused: %s", e2.msg);
    json_decref(js), json_decref(back), json_decref(old), json_decref(bad);
    free(text);
    db_trainer_free(t2);

    /* fp32 resumes of that state ignore the scale */
    db_ctx_set_precision(ctx, DB_PREC_F32);
    rc = db_trainer_create(&t2, ctx, m, &o, &err);
    if (rc == 0) {
        db_trainer_set_step(t2, 5);
        rc = db_trainer_set_amp(t2, 4, 1024.0, 1, &err);
        db_trainer_state(t2, &st2);
    }
    tap_ok(rc == 0 && st2.opt_step == 4 && st2.loss_scale == 0, "an fp32 trainer takes the update count, not the "
           "scale");
    db_trainer_free(t2);
    db_weights_free(&u0);
    db_weights_free(&x0);
    db_trainer_free(t);
}

/* bf16's packed weight gradients (train.h no_grad16, DB_ASSIGN_PACK16) are
 * the float32 ones' values: the same losses, gradient norms (each tensor's
 * and the clip's), weights and moments, bit for bit, with the text encoder
 * trained (its gradients stay float32) and without, with clipping that
 * scales and with none, with 8-bit AdamW.  A trainer that may not pack
 * (per-tensor clipping, two micro-batches, fp32) packs nothing. */
static void test_grad16(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    for (int v = 0; v < 4; v++) {
        db_trainer *t[2] = {NULL, NULL};
        db_train_stats s[2][NREF];
        double *gn[2] = {NULL, NULL};
        size_t ngn = 0, npk[2] = {0, 0};
        int rc = 0, same_norms = 1;
        db_ctx_set_precision(ctx, DB_PREC_BF16);
        for (int k = 0; k < 2 && rc == 0; k++) {
            db_train_opts o = db_train_opts_defaults(LR, NREF);
            o.train_text = v != 1;
            o.max_grad_norm = v == 2 ? 0.0 : 1e-3; /* 1e-3: every step scales */
            o.no_grad16 = k;
            o.optimizer = v == 3 ? DB_OPTIM_ADAMW8BIT : DB_OPTIM_ADAMW;
            rc = db_trainer_create(&t[k], ctx, m, &o, &err);
            for (int j = 0; rc == 0 && j < NREF; j++)
                rc = tap_train_ref_step(t[k], in, j, &s[k][j], &err);
            npk[k] = rc ? 0 : db_trainer_packed_grads(t[k]);
            ngn = rc ? 0 : db_trainer_grad_norms(t[k], NULL, 0);
            gn[k] = ngn ? malloc(ngn * sizeof(double)) : NULL;
            if (gn[k])
                db_trainer_grad_norms(t[k], gn[k], ngn);
        }
        db_ctx_set_precision(ctx, DB_PREC_F32);
        const char *what = v == 0 ? "text encoder trained" : v == 1 ? "UNet alone" : v == 2 ? "no clipping" : "8-bit AdamW";
        if (tap_ok(rc == 0, "bf16 packed weight gradients (%s): %d steps%s%s", what, NREF, rc ? ": " : "",
                   rc ? err.msg : "")) {
            int same_loss = 1;
            for (int j = 0; j < NREF; j++) {
                if (s[0][j].loss != s[1][j].loss || s[0][j].grad_norm != s[1][j].grad_norm)
                    tap_diag("step %d: loss %.9g / %.9g, norm %.9g / %.9g (packed / float32)", j + 1, s[0][j].loss,
                             s[1][j].loss, s[0][j].grad_norm, s[1][j].grad_norm);
                same_loss &= s[0][j].loss == s[1][j].loss && s[0][j].grad_norm == s[1][j].grad_norm;
            }
            const db_weights *wu = db_unet_weights(db_trainer_unet(t[0]));
            for (size_t i = 0, told = 0; gn[0] && gn[1] && i < ngn; i++) {
                if (gn[0][i] != gn[1][i] && told++ < 3)
                    tap_diag("tensor %zu (%s): norm %.9g packed, %.9g float32", i,
                             i < wu->ix.n ? wu->ix.v[i].name : "the text encoder's", gn[0][i], gn[1][i]);
                same_norms &= gn[0][i] == gn[1][i];
            }
            db_train_state a, b;
            db_trainer_state(t[0], &a);
            db_trainer_state(t[1], &b);
            int same_w = same(a.unet, b.unet) && (!a.text || same(a.text, b.text));
            if (v == 3) /* the 8-bit moments: codes and scales */
                same_w = same_w && !memcmp(a.unet_q8->m_q, b.unet_q8->m_q, a.unet_q8->ncodes) &&
                         !memcmp(a.unet_q8->v_q, b.unet_q8->v_q, a.unet_q8->ncodes) &&
                         !memcmp(a.unet_q8->m_absmax, b.unet_q8->m_absmax, a.unet_q8->nblocks * sizeof(float)) &&
                         !memcmp(a.unet_q8->m32, b.unet_q8->m32, a.unet_q8->nsmall * sizeof(float));
            else
                same_w = same_w && same(a.unet_m, b.unet_m) && same(a.unet_v, b.unet_v) &&
                         (!a.text || same(a.text_m, b.text_m));
            /* the tiny UNet's rank-2 and rank-4 tensors: its linear and conv weights */
            size_t want = 0;
            for (size_t i = 0; i < wu->ix.n; i++)
                want += wu->ix.v[i].ndim >= 2;
            tap_ok(npk[0] == want && want > 100 && npk[1] == 0,
                   "bf16 packed weight gradients (%s): the backward packed %zu tensors (of %zu linear and conv "
                   "weights), none with no_grad16 (%zu)", what, npk[0], want, npk[1]);
            tap_ok(same_loss && same_norms && same_w && gn[0] && ngn > 600,
                   "bf16 packed weight gradients (%s): losses, clip norms, %zu tensor norms, weights and moments "
                   "are float32 gradients' bit for bit (loss %.7f, norm %.6g)",
                   what, ngn, s[0][NREF - 1].loss, s[0][NREF - 1].grad_norm);
        }
        for (int k = 0; k < 2; k++) {
            db_trainer_free(t[k]);
            free(gn[k]);
        }
    }
    /* where something else reads the gradients in float32, nothing is packed */
    for (int v = 0; v < 3; v++) {
        db_train_opts o = db_train_opts_defaults(LR, NREF);
        const char *what = v == 0 ? "per-tensor clipping" : v == 1 ? "two micro-batches a step" : "fp32 precision";
        o.clip_per_tensor = v == 0;
        o.grad_accum = v == 1 ? 2 : 1;
        db_ctx_set_precision(ctx, v == 2 ? DB_PREC_F32 : DB_PREC_BF16);
        db_trainer *t = NULL;
        db_train_stats st;
        int rc = db_trainer_create(&t, ctx, m, &o, &err);
        for (int j = 0; rc == 0 && j < 2; j++)
            rc = tap_train_ref_step(t, in, j, &st, &err);
        tap_ok(rc == 0 && db_trainer_packed_grads(t) == 0, "bf16 packed weight gradients: none with %s%s%s", what,
               rc ? ": " : "", rc ? err.msg : "");
        db_trainer_free(t);
        db_ctx_set_precision(ctx, DB_PREC_F32);
    }
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 0, &err) == 0, "cpu context%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
    static tap_train_fix fx;
    if (tap_train_fix_open(&fx))
        return tap_done();
    const tap_train_ref *in = &fx.in;
    db_model *m = &fx.m;
    test_grad16(ctx, m, in);
    test_bands(ctx, m, in);
    test_skip(ctx, m, in);
    tap_train_fix_close(&fx);
    db_ctx_destroy(ctx);
    return tap_done();
}
