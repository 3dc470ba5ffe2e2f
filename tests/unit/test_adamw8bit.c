/* 8-bit AdamW (optim.h, bitsandbytes' block-wise AdamW8bit): the dynamic
 * maps' properties, the nearest-code search against brute force, the
 * quantise / dequantise round trip's error bound per block, the first step
 * equal to float32 AdamW bit for bit (zero moments quantise exactly), the
 * update of one step and of 30 steps against float32 AdamW within a stated
 * band, and the OpenMP step bit-identical to the serial one.  Then the
 * issue's parity run: PARITY_STEPS steps of DreamBooth training on the tiny
 * model (tests/data/tiny, lr 1e-3, UNet only; DB_PARITY_TEXT=1 trains the
 * text encoder too, DB_PARITY_STEPS=N runs N steps) with 8-bit and with
 * float32 AdamW from the same draws: the loss curves' WINDOW-step moving
 * averages within WINDOW_BAND of each other in every window, the final
 * evaluation loss (fixed draws) within FINAL_BAND. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/optim.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/trainset.h"
#include "libcommon/sd/unet.h"
#include "tap.h"

/* The measured bands, rounded up with margin (the values are printed).
 * The moments themselves come back within ~2% (rel L2, dominated by each
 * block's large values), but Adam's update m / sqrt(v) is about the same
 * size for every element, and an element far below its block's max sits
 * where the dynamic map's codes are sparse (exp_avg_sq scales as g^2, so
 * a gradient 1% of the block's largest is 1e-4 of its scale): those
 * elements carry most of the update's difference. */
#define ONE_STEP_BAND 0.25   /* rel L2 of one step's update from quantised moments (measured 0.181) */
#define MULTI_STEP_BAND 0.15 /* rel L2 of 30 steps' total update (measured 0.103) */
/* the parity run (see parity()) */
#define PARITY_STEPS 200
#define WINDOW 20         /* steps per moving-average window */
#define WINDOW_BAND 0.02  /* |mean 8-bit - mean float32| / mean float32 per window (measured max 0.08%) */
#define FINAL_BAND 0.02   /* final evaluation loss, same relative measure (measured 0.12%) */

/* xorshift64*: a fixed sequence, independent of the library's generators */
static double urand(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (double)((*s * 2685821657736338717ull) >> 11) * 0x1p-53;
}

static float nrand(uint64_t *s)
{
    const double u1 = urand(s) + 1e-300, u2 = urand(s);
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

static void maps_props(const db_q8_maps *mp)
{
    const db_q8_map *maps[2] = {&mp->m, &mp->v};
    for (int s = 0; s < 2; s++) {
        const db_q8_map *m = maps[s];
        int mono = 1, mids = 1;
        for (int k = 0; k < 255; k++) {
            mono &= m->code[k] < m->code[k + 1];
            mids &= m->code[k] < m->mid[k] && m->mid[k] < m->code[k + 1];
        }
        tap_ok(mono, "%s map: 256 codes strictly ascending", s ? "unsigned" : "signed");
        tap_ok(mids, "%s map: each decision point lies between its two codes", s ? "unsigned" : "signed");
        tap_ok(m->code[255] == 1.0f, "%s map: the top code is 1", s ? "unsigned" : "signed");
    }
    const db_q8_map *sg = &mp->m, *us = &mp->v;
    tap_ok(sg->code[127] == 0.0f && !signbit(sg->code[127]), "signed map: code 127 is +0");
    int sym = 1;
    for (int k = 0; k < 127; k++)
        sym &= sg->code[k] == -sg->code[254 - k];
    tap_ok(sym, "signed map: codes 0..126 mirror 128..254 (and 255 = 1 has no mirror, as in bnb)");
    tap_ok(fabsf(sg->code[0] + 0.99296875f) < 1e-7f, "signed map: the bottom code is -0.99296875 (%.9g)",
           sg->code[0]);
    tap_ok(fabsf(sg->code[128] - 5.5e-7f) < 1e-12f, "signed map: the smallest positive code is 5.5e-7 (%.9g)",
           sg->code[128]);
    tap_ok(us->code[0] == 0.0f && us->code[1] > 0.0f && fabsf(us->code[1] - 3.25e-7f) < 1e-12f,
           "unsigned map: 0, then 3.25e-7 (%.9g)", us->code[1]);
    db_q8_maps again;
    db_q8_maps_make(&again);
    tap_ok(memcmp(&again, mp, sizeof again) == 0, "the maps are a pure function (same bits twice)");
}

/* db_q8_nearest picks a code at minimal distance (brute force; up to the
 * rounding of the float decision points). */
static void nearest_brute(const db_q8_maps *mp)
{
    uint64_t s = 7;
    int bad = 0;
    for (int it = 0; it < 200000; it++) {
        const int sg = it & 1;
        const db_q8_map *m = sg ? &mp->m : &mp->v;
        float x = (float)(sg ? 2 * urand(&s) - 1 : urand(&s));
        if (it % 5 == 0) /* also the small magnitudes, where the codes crowd */
            x = (float)((sg ? (urand(&s) < 0.5 ? -1 : 1) : 1) * pow(10.0, -7 * urand(&s)));
        if (it % 97 == 0) /* exactly on a decision point */
            x = m->mid[(int)(urand(&s) * 255)];
        const int c = db_q8_nearest(m->mid, x);
        const float d = fabsf(x - m->code[c]);
        for (int k = 0; k < 256; k++) {
            const float dk = fabsf(x - m->code[k]);
            /* the decision points are float midpoints, so a value within
             * rounding of one may go either way */
            if (dk < d - 2e-7f * fmaxf(fabsf(x), fabsf(m->code[k]))) {
                if (bad++ < 3)
                    tap_diag("x %.9g: code %d (%.9g), but %d (%.9g) is nearer", x, c, m->code[c], k, m->code[k]);
                break;
            }
        }
    }
    tap_ok(bad == 0, "nearest code = brute-force nearest on 200000 values (%d off)", bad);
    tap_ok(db_q8_nearest(mp->m.mid, 1.0f) == 255 && db_q8_nearest(mp->m.mid, -1.0f) == 0 &&
               db_q8_nearest(mp->m.mid, 0.0f) == 127 && db_q8_nearest(mp->v.mid, 0.0f) == 0 &&
               db_q8_nearest(mp->m.mid, NAN) == 0,
           "nearest code of 1, -1, 0 (both maps) and NaN: 255, 0, 127, 0, 0");
}

/* Round trip per block: the scale is the block's max |x|; every element is
 * off by at most half the gap between the codes around it (times the
 * scale); a block's largest positive element comes back exactly; no sign
 * flips (a negative exp_avg never becomes +0 or positive). */
static void round_trip(const db_q8_maps *mp)
{
    enum { N = 10 * DB_Q8_BLOCK + 77 };
    const size_t nb = (N + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y), *am = malloc(nb * sizeof *am);
    uint8_t *q = malloc(N);
    uint64_t s = 11;
    for (int sg = 1; sg >= 0; sg--) {
        const db_q8_map *m = sg ? &mp->m : &mp->v;
        for (size_t i = 0; i < N; i++) {
            const size_t b = i / DB_Q8_BLOCK;
            const double scale = pow(10.0, -(double)(b % 8)); /* blocks 1e0 .. 1e-7 */
            float v = (float)(scale * nrand(&s));
            if (b == 3) /* an outlier block: one big value, the rest tiny */
                v = i % DB_Q8_BLOCK == 5 ? 100.0f : (float)(1e-4 * nrand(&s));
            if (b == 4) /* an all-zero block */
                v = 0.0f;
            x[i] = sg ? v : v * v;
        }
        db_q8_quantize(q, am, x, N, m, sg);
        db_q8_dequantize(y, q, am, N, m);
        int scale_ok = 1, bound_ok = 1, top_ok = 1, sign_ok = 1;
        double worst_rel = 0; /* over elements with |x| >= 0.1 scale */
        for (size_t b = 0; b < nb; b++) {
            const size_t beg = b * DB_Q8_BLOCK, end = beg + DB_Q8_BLOCK < N ? beg + DB_Q8_BLOCK : N;
            float mx = 0;
            size_t top = beg;
            for (size_t i = beg; i < end; i++) {
                if (fabsf(x[i]) > mx)
                    mx = fabsf(x[i]);
                if (x[i] > x[top])
                    top = i;
            }
            scale_ok &= am[b] == mx;
            for (size_t i = beg; i < end; i++) {
                const float r = mx > 0 ? x[i] / mx : 0;
                int lo = 0;
                while (lo < 255 && m->code[lo + 1] <= r)
                    lo++;
                const float hi = lo < 255 ? m->code[lo + 1] : m->code[255];
                const double gap = r <= m->code[0] ? m->code[0] - r : (hi - m->code[lo]) / 2;
                const double err = fabs((double)y[i] - x[i]);
                /* bnb's sign rule moves a small negative exp_avg from +0 to
                 * the smallest negative code: off by at most that code */
                const int moved = sg && x[i] < 0 && q[i] == 126 && r > m->mid[126];
                const double bound = moved ? -m->code[126] : gap * 1.000001 + 1e-7;
                if (err > bound * mx + 1e-37) {
                    if (bound_ok)
                        tap_diag("block %zu element %zu: x %.9g back %.9g (scale %.9g)", b, i, x[i], y[i], mx);
                    bound_ok = 0;
                }
                if (mx > 0 && fabsf(x[i]) >= 0.1f * mx && err / fabs(x[i]) > worst_rel)
                    worst_rel = err / fabs(x[i]);
                if (sg && x[i] < 0 && !(y[i] < 0) && mx > 0)
                    sign_ok = 0;
            }
            if (mx > 0 && x[top] == mx)
                top_ok &= y[top] == x[top];
        }
        const char *k = sg ? "signed (exp_avg)" : "unsigned (exp_avg_sq)";
        tap_ok(scale_ok, "%s: the block scale is the block's max |x| (%zu blocks, the last partial)", k, nb);
        tap_ok(bound_ok, "%s: every element within half its code gap x the block scale (the sign rule's moves within the smallest code)", k);
        tap_ok(top_ok, "%s: a block's max |x|, when positive, comes back exactly", k);
        tap_ok(worst_rel < 0.0705, "%s: elements >= 0.1 x scale within 7.05%% (worst %.4f%%)", k, 100 * worst_rel);
        if (sg)
            tap_ok(sign_ok, "signed: no negative value comes back as zero or positive");
        int zero_ok = am[4] == 0;
        for (size_t i = 4 * DB_Q8_BLOCK; i < 5 * DB_Q8_BLOCK; i++)
            zero_ok &= y[i] == 0 && q[i] == (sg ? 127 : 0);
        tap_ok(zero_ok, "%s: an all-zero block has scale 0 and the zero code", k);
    }
    free(x), free(y), free(am), free(q);
}

typedef struct q8state {
    float *p;
    uint8_t *mq, *vq;
    float *ma, *va;
} q8state;

static q8state q8_alloc(const float *p0, size_t n)
{
    const size_t nb = (n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    q8state s = {malloc(n * sizeof(float)), calloc(n, 1), calloc(n, 1), calloc(nb, sizeof(float)),
                 calloc(nb, sizeof(float))};
    memcpy(s.p, p0, n * sizeof(float));
    return s;
}

static void q8_free(q8state *s) { free(s->p), free(s->mq), free(s->vq), free(s->ma), free(s->va); }

/* rel L2 of (a - p0) against (b - p0) */
static double rel_update(const float *a, const float *b, const float *p0, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double da = (double)a[i] - p0[i], dbb = (double)b[i] - p0[i];
        num += (da - dbb) * (da - dbb);
        den += dbb * dbb;
    }
    return sqrt(num / den);
}

static void vs_fp32(const db_q8_maps *mp)
{
    enum { N = 40 * DB_Q8_BLOCK + 33, STEPS = 30 };
    uint64_t s = 3;
    float *p0 = malloc(N * sizeof *p0), *g = malloc(N * sizeof *g), *bias = malloc(N * sizeof *bias);
    float *p = malloc(N * sizeof *p), *m = calloc(N, sizeof *m), *v = calloc(N, sizeof *v);
    for (size_t i = 0; i < N; i++) {
        p0[i] = 0.1f * nrand(&s);
        bias[i] = 0.3f * nrand(&s) * (float)pow(10.0, -(double)(i / DB_Q8_BLOCK % 4)); /* per-block magnitudes */
    }
    const db_adamw hp = db_adamw_defaults(1e-3);
    q8state q = q8_alloc(p0, N);
    memcpy(p, p0, N * sizeof *p);
    /* gradients: a steady per-element direction plus noise, as a training run's */
    for (int t = 1; t <= STEPS; t++) {
        for (size_t i = 0; i < N; i++)
            g[i] = bias[i] + 0.5f * fabsf(bias[i]) * nrand(&s);
        db_adamw_step(p, m, v, g, N, &hp, t);
        db_adamw8bit_step(q.p, q.mq, q.vq, q.ma, q.va, g, N, &hp, t, mp);
        if (t == 1)
            tap_ok(memcmp(p, q.p, N * sizeof *p) == 0,
                   "step 1 from zero moments: the 8-bit step equals float32 AdamW bit for bit");
    }
    {
        float *y = malloc(N * sizeof *y);
        db_q8_dequantize(y, q.mq, q.ma, N, &mp->m);
        double nm = 0, dm = 0, nv = 0, dv = 0;
        for (size_t i = 0; i < N; i++)
            nm += ((double)y[i] - m[i]) * ((double)y[i] - m[i]), dm += (double)m[i] * m[i];
        db_q8_dequantize(y, q.vq, q.va, N, &mp->v);
        for (size_t i = 0; i < N; i++)
            nv += ((double)y[i] - v[i]) * ((double)y[i] - v[i]), dv += (double)v[i] * v[i];
        tap_diag("after 30 steps: 8-bit moments against float32's: exp_avg rel L2 %.4f, exp_avg_sq %.4f",
                 sqrt(nm / dm), sqrt(nv / dv));
        free(y);
    }
    const double multi = rel_update(q.p, p, p0, N);
    tap_diag("30 steps: rel L2 of the 8-bit total update against float32 AdamW's: %.5f", multi);
    tap_ok(multi < MULTI_STEP_BAND, "30 steps: 8-bit update within %.0f%% of float32's (rel L2 %.4f)",
           100 * MULTI_STEP_BAND, multi);

    /* one step from the same moments: float32 AdamW from (m, v) against the
     * 8-bit step from (m, v) quantised */
    const size_t nb = (N + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    q8state r = q8_alloc(p, N);
    db_q8_quantize(r.mq, r.ma, m, N, &mp->m, 1);
    db_q8_quantize(r.vq, r.va, v, N, &mp->v, 0);
    float *pa = malloc(N * sizeof *pa);
    memcpy(pa, p, N * sizeof *pa);
    for (size_t i = 0; i < N; i++)
        g[i] = bias[i] + 0.5f * fabsf(bias[i]) * nrand(&s);
    db_adamw_step(pa, m, v, g, N, &hp, STEPS + 1);
    db_adamw8bit_step(r.p, r.mq, r.vq, r.ma, r.va, g, N, &hp, STEPS + 1, mp);
    const double one = rel_update(r.p, pa, p, N);
    tap_diag("one step from quantised moments: rel L2 of the update %.5f (%zu blocks)", one, nb);
    tap_ok(one < ONE_STEP_BAND, "one step: 8-bit update within %.0f%% of float32's (rel L2 %.4f)",
           100 * ONE_STEP_BAND, one);
    q8_free(&q), q8_free(&r);
    free(p0), free(g), free(bias), free(p), free(m), free(v), free(pa);
}

/* The OpenMP step against the serial one, several steps, on a size with a
 * partial last block. */
static void omp_bits(const db_q8_maps *mp)
{
    const size_t n = 600 * DB_Q8_BLOCK + 101;
    uint64_t s = 5;
    float *p0 = malloc(n * sizeof *p0), *g = malloc(n * sizeof *g);
    for (size_t i = 0; i < n; i++)
        p0[i] = nrand(&s);
    q8state a = q8_alloc(p0, n), b = q8_alloc(p0, n);
    const db_adamw hp = db_adamw_defaults(1e-2);
    const int threads = omp_get_max_threads() < 4 ? 4 : omp_get_max_threads();
    for (int t = 1; t <= 4; t++) {
        for (size_t i = 0; i < n; i++)
            g[i] = nrand(&s) * (float)(i % 3 + 1);
        db_adamw8bit_step(a.p, a.mq, a.vq, a.ma, a.va, g, n, &hp, t, mp);
        omp_set_num_threads(threads);
        db_adamw8bit_step_omp(b.p, b.mq, b.vq, b.ma, b.va, g, n, &hp, t, mp);
    }
    const size_t nb = (n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    tap_ok(memcmp(a.p, b.p, n * sizeof(float)) == 0 && memcmp(a.mq, b.mq, n) == 0 && memcmp(a.vq, b.vq, n) == 0 &&
               memcmp(a.ma, b.ma, nb * sizeof(float)) == 0 && memcmp(a.va, b.va, nb * sizeof(float)) == 0,
           "OpenMP step (%d threads) bit-identical to the serial one: p, codes, scales after 4 steps", threads);
    q8_free(&a), q8_free(&b);
    free(p0), free(g);
}

/* ---- the parity run on the tiny model ------------------------------------------------ */

enum { NEVAL = 8 };
typedef tap_learn fixture;

/* one micro-batch of draws (seed, u), test_train_learn.c's problem one row
 * at a time (half the cost per step; tap.c) */
static int pbatch(db_trainer *tr, const fixture *f, uint64_t seed, uint64_t u, int eval, db_train_stats *s,
                  db_err *err)
{
    return tap_learn_batch(tr, f, 1, seed, u, eval, s, err);
}

static int peval(db_trainer *tr, const fixture *f, double *loss, db_err *err)
{
    *loss = 0;
    for (int k = 0; k < NEVAL; k++) {
        db_train_stats s;
        if (pbatch(tr, f, 1000, (uint64_t)k, 1, &s, err))
            return -1;
        *loss += s.loss / NEVAL;
    }
    return 0;
}

static void parity(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    db_model m;
    static fixture f;
    /* one thread: the tiny model's ops are too small to gain from two, and
     * under make check's passive OpenMP waits their many short parallel
     * regions cost more than they give (200 steps: 35 s on one thread, 75 s
     * on two); the results are the same bits either way */
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 1, &err) == 0 &&
                    db_model_open(&m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0 &&
                    tap_learn_make(&f, &err) == 0,
                "parity: model, tokenizer, prompts%s%s", err.code ? ": " : "", err.msg))
        return;
    const char *se = getenv("DB_PARITY_STEPS"); /* for measuring longer runs by hand */
    const int steps = se && atoi(se) >= WINDOW ? atoi(se) / WINDOW * WINDOW : PARITY_STEPS;
    db_train_opts o = db_train_opts_defaults(1e-3, steps); /* test_train_learn.c's: large steps, where quantisation shows most */
    o.train_text = getenv("DB_PARITY_TEXT") ? 1 : 0;
    db_train_opts o8 = o;
    o8.optimizer = DB_OPTIM_ADAMW8BIT;
    db_trainer *t32 = NULL, *t8 = NULL;
    int rc = db_trainer_create(&t32, ctx, &m, &o, &err);
    rc = rc ? rc : db_trainer_create(&t8, ctx, &m, &o8, &err);
    if (!tap_ok(rc == 0, "parity: two trainers%s%s", rc ? ": " : "", rc ? err.msg : "")) {
        db_trainer_free(t32);
        db_model_close(&m);
        db_ctx_destroy(ctx);
        return;
    }
    double *l32 = calloc((size_t)steps, sizeof *l32), *l8 = calloc((size_t)steps, sizeof *l8);
    const db_weights *w32 = db_unet_weights(db_trainer_unet(t32)), *w8 = db_unet_weights(db_trainer_unet(t8));
    float *w0 = malloc(w32->numel * sizeof *w0);
    memcpy(w0, w32->data, w32->numel * sizeof *w0);
    for (int step = 0; rc == 0 && step < steps; step++) {
        db_train_stats s;
        rc = pbatch(t32, &f, 5, (uint64_t)step, 0, NULL, &err);
        rc = rc ? rc : db_trainer_apply(t32, &s, &err);
        l32[step] = s.loss;
        rc = rc ? rc : pbatch(t8, &f, 5, (uint64_t)step, 0, NULL, &err);
        rc = rc ? rc : db_trainer_apply(t8, &s, &err);
        l8[step] = s.loss;
    }
    double e32 = 0, e8 = 0;
    rc = rc ? rc : peval(t32, &f, &e32, &err);
    rc = rc ? rc : peval(t8, &f, &e8, &err);
    if (tap_ok(rc == 0, "parity: %d steps of both optimizers and the evaluations%s%s", steps, rc ? ": " : "",
               rc ? err.msg : "")) {
        double worst = 0;
        int wworst = 0;
        for (int w = 0; w < steps / WINDOW; w++) {
            double a = 0, b = 0;
            for (int k = w * WINDOW; k < (w + 1) * WINDOW; k++)
                a += l32[k] / WINDOW, b += l8[k] / WINDOW;
            const double d = fabs(b - a) / a;
            tap_diag("steps %3d-%3d: mean loss float32 %.5f, 8-bit %.5f (%+.2f%%)", w * WINDOW + 1, (w + 1) * WINDOW,
                     a, b, 100 * (b - a) / a);
            if (d > worst)
                worst = d, wworst = w;
        }
        /* the weights: apart (the 8-bit path ran), but by much less than
         * they moved */
        double dd = 0, mv = 0;
        for (size_t i = 0; i < w32->numel; i++) {
            const double a = (double)w32->data[i] - w0[i], b = (double)w8->data[i] - w0[i];
            dd += (a - b) * (a - b);
            mv += a * a;
        }
        tap_ok(dd > 0 && sqrt(dd / mv) < 0.5, "parity: the UNet weights differ (the 8-bit path ran) by %.4f of how far "
               "float32 AdamW moved them", sqrt(dd / mv));
        const double fin = fabs(e8 - e32) / e32;
        tap_diag("evaluation loss after the run: float32 %.5f, 8-bit %.5f (%+.2f%%)", e32, e8,
                 100 * (e8 - e32) / e32);
        tap_ok(worst <= WINDOW_BAND, "parity: %d-step moving-average loss within %.0f%% in every window (worst %.2f%%, "
               "window %d)", WINDOW, 100 * WINDOW_BAND, 100 * worst, wworst + 1);
        tap_ok(fin <= FINAL_BAND, "parity: final evaluation loss within %.0f%% (%.5f vs %.5f: %.2f%%)",
               100 * FINAL_BAND, e8, e32, 100 * fin);
    }
    free(l32), free(l8), free(w0);
    db_trainer_free(t32);
    db_trainer_free(t8);
    db_model_close(&m);
    db_ctx_destroy(ctx);
}

int main(void)
{
    db_q8_maps mp;
    db_q8_maps_make(&mp);
    maps_props(&mp);
    nearest_brute(&mp);
    round_trip(&mp);
    vs_fp32(&mp);
    omp_bits(&mp);
    parity();
    return tap_done();
}
