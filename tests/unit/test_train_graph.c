/* The trainer's UNet forward and backward replayed as graphs (train.h
 * no_graph 0, the default) against the same run op by op (no_graph 1):
 * every step's loss and the final weights bit-identical, over micro-batches
 * whose size changes (1 and 2 rows: the graphs are re-recorded and the
 * trainer's buffers grow between them), evaluations between steps (a
 * forward that keeps no activations: another UNet layout), gradient
 * accumulation, checkpointing, the text encoder trained, bf16 and 8-bit
 * AdamW, the compute precision switched mid-run (a graph keeps the
 * precision it was recorded in), and the fused backward, whose graph holds
 * the optimizer steps (their lr and step count read from device memory:
 * a linear schedule changes the lr every step); and evaluations in two orders give the
 * same losses (the frozen text encoder's output is reused only for the
 * same token ids).  On the ctx of tap_device() (cpu, cpu-strict): there a replay
 * calls the recorded function again on the graph's copy of its arguments,
 * so a stale argument (buffers freed when a larger batch came) reads freed
 * memory or the wrong rows and differs here.  The CUDA graphs themselves:
 * tests/gpu/test_cuda_ops.c (emulator), and this test on a GPU
 * (DB_TEST_DEVICE=cuda: tests/gpu/run.sh's tools stage, t0100). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/core/log.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/unet.h"
#include "tap.h"

static tap_learn fx;

typedef struct cfg {
    const char *name;
    db_precision prec;
    int text, ckpt, accum, q8;
    int to_bf16; /* micro-batch from which the ctx computes in bf16 (0: never) */
    int fused;   /* fused backward (train.h), with an lr that changes every step */
} cfg;

/* rows of each micro-batch, and whether an evaluation follows it */
static const int rows[] = {1, 1, 1, 2, 2, 2, 1, 2, 2, 1, 1, 1};
static const int evals[] = {0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1};
enum { NB = sizeof rows / sizeof rows[0] };

/* One run; losses (NB) and the trainer (weights read by the caller). */
static int run(db_ctx *c, const db_model *m, const cfg *k, int no_graph, double *loss, db_trainer **out,
               db_err *err)
{
    db_train_opts o = db_train_opts_defaults(1e-3, NB);
    o.train_text = k->text;
    o.gradient_checkpointing = k->ckpt;
    o.grad_accum = k->accum;
    o.optimizer = k->q8 ? DB_OPTIM_ADAMW8BIT : DB_OPTIM_ADAMW;
    o.no_graph = no_graph;
    /* a capture that is refused warns (then both runs go op by op and
     * agree): on stderr, where tests/gpu/run.sh looks for it */
    static const db_log lg = {"test_train_graph", DB_LOG_WARN};
    o.log = &lg;
    o.fused_backward = k->fused;
    if (k->fused) /* the optimizer steps inside the graph read this step's lr and count from device memory */
        o.unet_lr = o.text_lr = db_lr_schedule_make(DB_LR_LINEAR, 1e-3, 0, NB);
    db_ctx_set_precision(c, k->prec);
    db_trainer *t = NULL;
    if (db_trainer_create(&t, c, m, &o, err))
        return -1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < NB; i++) {
        db_train_stats s;
        if (k->to_bf16 && i == k->to_bf16) /* a graph recorded in fp32 must not replay now */
            db_ctx_set_precision(c, DB_PREC_BF16);
        rc = tap_learn_batch(t, &fx, rows[i], 3, (uint64_t)i, 0, &s, err);
        loss[i] = s.loss;
        if (rc == 0 && (i + 1) % k->accum == 0)
            rc = db_trainer_apply(t, NULL, err);
        if (rc == 0 && evals[i])
            rc = tap_learn_batch(t, &fx, 2, 1000, (uint64_t)i, 1, &s, err);
    }
    db_ctx_set_precision(c, DB_PREC_F32);
    *out = t;
    return rc;
}

/* weights on the ctx's device: fetched first (a memcmp of device pointers
 * crashed the first GPU run of this test) */
static int same(db_ctx *c, const db_weights *a, const db_weights *b)
{
    if (a->numel != b->numel)
        return 0;
    const size_t bytes = a->numel * sizeof(float);
    const void *ha = tap_fetch(c, a->data, bytes), *hb = tap_fetch(c, b->data, bytes);
    const int eq = ha && hb && !memcmp(ha, hb, bytes);
    tap_host_free(c, ha);
    tap_host_free(c, hb);
    return eq;
}

int main(void)
{
    db_err err = {0};
    db_ctx *c = NULL;
    db_model m;
    /* DB_TEST_MODEL: another tiny-architecture model (tests/gpu/run.sh
     * makes one with db-ckpt init where the device call has no tests/data) */
    const char *model = getenv("DB_TEST_MODEL") ? getenv("DB_TEST_MODEL") : tap_path("tests/data/tiny/diffusers");
    if (!tap_ok(tap_ctx_create(&c, &err) == 0 &&
                    db_model_open(&m, model, NULL, &err) == 0 &&
                    tap_learn_make(&fx, &err) == 0,
                "%s ctx, tiny model, prompts%s%s", tap_device(), err.code ? ": " : "", err.msg))
        return tap_done();
    static const cfg cfgs[] = {
        {"fp32 AdamW", DB_PREC_F32, 0, 0, 1, 0, 0, 0},
        {"fp32, text encoder, checkpointing, 2 micro-batches a step", DB_PREC_F32, 1, 1, 2, 0, 0, 0},
        {"bf16 8-bit AdamW, text encoder", DB_PREC_BF16, 1, 0, 1, 1, 0, 0},
        {"fp32, then bf16 from micro-batch 5", DB_PREC_F32, 0, 0, 1, 0, 5, 0},
        {"fused backward, bf16 AdamW, text encoder, linear lr", DB_PREC_BF16, 1, 0, 1, 0, 0, 1},
        {"fused backward, bf16 8-bit AdamW, text encoder, checkpointing, linear lr", DB_PREC_BF16, 1, 1, 1, 1, 0, 1},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        const cfg *k = &cfgs[i];
        double lg[NB], ld[NB];
        db_trainer *tg = NULL, *td = NULL;
        int rc = run(c, &m, k, 0, lg, &tg, &err);
        rc = rc ? rc : run(c, &m, k, 1, ld, &td, &err);
        if (tap_ok(rc == 0, "%s: %d micro-batches with graphs and without%s%s", k->name, NB, rc ? ": " : "",
                   rc ? err.msg : "")) {
            tap_ok(!memcmp(lg, ld, sizeof lg), "%s: every loss bit-identical (last %.9g, %.9g)", k->name, lg[NB - 1],
                   ld[NB - 1]);
            db_train_state sg, sd;
            db_trainer_state(tg, &sg);
            db_trainer_state(td, &sd);
            tap_ok(same(c, sg.unet, sd.unet), "%s: UNet weights bit-identical", k->name);
            if (k->text)
                tap_ok(sg.text && sd.text && same(c, sg.text, sd.text), "%s: text encoder weights bit-identical",
                       k->name);
        }
        db_trainer_free(tg);
        db_trainer_free(td);
        db_err_clear(&err);
    }
    /* history: a micro-batch's numbers do not depend on the ones before it
     * (the frozen text encoder's output is reused only for the same ids,
     * the graphs only for the same arguments): evaluations in two orders,
     * prompts alternating (1 row: instance or class prompt by u's parity)
     * and batch sizes changing */
    static const int us[] = {0, 1, 1, 2, 3, 0, 4, 5, 5, 2};
    static const int rs[] = {1, 1, 2, 1, 1, 2, 1, 1, 1, 2};
    enum { NE = sizeof us / sizeof us[0] };
    double fwd[NE], rev[NE];
    db_trainer *ta = NULL, *tb = NULL;
    db_train_opts o = db_train_opts_defaults(1e-3, 10);
    int rc = db_trainer_create(&ta, c, &m, &o, &err) || db_trainer_create(&tb, c, &m, &o, &err);
    for (int i = 0; rc == 0 && i < NE; i++) {
        db_train_stats s;
        rc = tap_learn_batch(ta, &fx, rs[i], 5, (uint64_t)us[i], 1, &s, &err);
        fwd[i] = s.loss;
    }
    for (int i = NE - 1; rc == 0 && i >= 0; i--) {
        db_train_stats s;
        rc = tap_learn_batch(tb, &fx, rs[i], 5, (uint64_t)us[i], 1, &s, &err);
        rev[i] = s.loss;
    }
    int bad = 0;
    for (int i = 0; rc == 0 && i < NE; i++)
        bad += memcmp(&fwd[i], &rev[i], sizeof fwd[i]) != 0;
    tap_ok(rc == 0 && bad == 0, "%d evaluations in two orders: the same losses bit for bit (%d differ)%s%s", NE, bad,
           rc ? ": " : "", rc ? err.msg : "");
    db_trainer_free(ta);
    db_trainer_free(tb);
    db_model_close(&m);
    db_ctx_destroy(c);
    return tap_done();
}
