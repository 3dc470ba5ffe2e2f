/* Optimizer math: AdamW against hand values, pinned float bits (from an
 * independent Python transcription of torch's float32 operation order) and
 * a double-precision transcription over 100 steps; clipping against a naive
 * double computation; lr schedules against diffusers' formulas. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "libcommon/sd/optim.h"
#include "tap.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* xorshift64*: a fixed sequence, independent of the library's generators */
static double urand(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (double)((*s * 2685821657736338717ull) >> 11) * 0x1p-53;
}

static void adamw_hand(void)
{
    /* p0 = 1, g = 0.5 then -0.25, lr 1e-3; bits from Python with every
     * float32 operation rounded via struct.pack('f'). */
    static const struct {
        double wd;
        uint32_t p1, p2, m2, v2;
        double d1, d2; /* the same in exact (double) arithmetic */
    } c[] = {
        {0.0, 0x3f7fbe77u, 0x3f7fad03u, 0x3ca3d709u, 0x39a3b57du, 0.99900000002, 0.9987336629870784},
        {1e-2, 0x3f7fbdcfu, 0x3f7fabb3u, 0x3ca3d709u, 0x39a3b57du, 0.99899000002, 0.9987136730870783},
    };
    for (size_t k = 0; k < 2; k++) {
        db_adamw hp = db_adamw_defaults(1e-3);
        hp.weight_decay = c[k].wd;
        float p = 1.0f, m = 0.0f, v = 0.0f, g = 0.5f;
        db_adamw_step(&p, &m, &v, &g, 1, &hp, 1);
        tap_ok(fbits(p) == c[k].p1 && fabs(p - c[k].d1) < 1e-7 && fbits(m) == 0x3d4ccccdu && fbits(v) == 0x3983126fu,
               "adamw step 1, wd %g: p %.9g (want %.9g)", c[k].wd, p, c[k].d1);
        g = -0.25f;
        db_adamw_step(&p, &m, &v, &g, 1, &hp, 2);
        tap_ok(fbits(p) == c[k].p2 && fabs(p - c[k].d2) < 1e-7 && fbits(m) == c[k].m2 && fbits(v) == c[k].v2,
               "adamw step 2, wd %g: p %.9g (want %.9g) m %08x v %08x", c[k].wd, p, c[k].d2, fbits(m), fbits(v));
    }
}

/* 100 steps of random gradients vs the textbook update in double */
static void adamw_vs_double(double wd)
{
    enum { N = 1000, STEPS = 100 };
    float *p = malloc(N * sizeof *p), *m = calloc(N, sizeof *m), *v = calloc(N, sizeof *v), *g = malloc(N * sizeof *g);
    double *pd = malloc(N * sizeof *pd), *md = calloc(N, sizeof *md), *vd = calloc(N, sizeof *vd);
    float *p0 = malloc(N * sizeof *p0);
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < N; i++)
        p[i] = p0[i] = (float)(2.0 * urand(&s) - 1.0), pd[i] = p[i];
    db_adamw hp = db_adamw_defaults(1e-3);
    hp.weight_decay = wd;
    for (int64_t t = 1; t <= STEPS; t++) {
        for (size_t i = 0; i < N; i++)
            g[i] = (float)((2.0 * urand(&s) - 1.0) * (i % 7 == 0 ? 1e-3 : 1.0));
        db_adamw_step(p, m, v, g, N, &hp, t);
        double bc1 = 1.0 - pow(hp.beta1, (double)t), bc2 = 1.0 - pow(hp.beta2, (double)t);
        for (size_t i = 0; i < N; i++) {
            pd[i] -= hp.lr * wd * pd[i];
            md[i] = hp.beta1 * md[i] + (1.0 - hp.beta1) * g[i];
            vd[i] = hp.beta2 * vd[i] + (1.0 - hp.beta2) * g[i] * g[i];
            pd[i] -= hp.lr / bc1 * md[i] / (sqrt(vd[i]) / sqrt(bc2) + hp.eps);
        }
    }
    double worst = 0.0, moved = 0.0;
    for (size_t i = 0; i < N; i++) {
        double e = fabs(p[i] - pd[i]);
        worst = e > worst ? e : worst;
        e = fabs(md[i] - m[i]) / (fabs(md[i]) + 1e-6) + fabs(vd[i] - v[i]) / (vd[i] + 1e-12);
        worst = e * 1e-3 > worst ? e * 1e-3 : worst; /* moments: 1e-3 * relative error */
        moved += fabs(pd[i] - p0[i]);
    }
    /* float rounding drifts by a few ulps of 1 over 100 steps; with weight
     * decay, torch's factor (float)(1 - lr*wd) = 0.99999f is off by up to
     * 3e-8 relative, a systematic drift of up to 3e-6 after 100 steps.  A
     * wrong bias correction or eps placement moves p by ~1e-4 or more. */
    tap_ok(worst < 6e-6 && moved / N > 1e-3, "adamw 100 steps vs double, wd %g: worst %.3g (mean move %.3g)", wd, worst,
           moved / N);
    free(p), free(m), free(v), free(g), free(pd), free(md), free(vd), free(p0);
}

static void adamw_decay_and_omp(void)
{
    enum { N = 100003 };
    float *buf = malloc(8 * N * sizeof *buf);
    float *p = buf, *m = p + N, *v = m + N, *g = v + N, *p2 = g + N, *m2 = p2 + N, *v2 = m2 + N, *p3 = v2 + N;
    uint64_t s = 42;
    for (size_t i = 0; i < N; i++) {
        p[i] = p2[i] = p3[i] = (float)(urand(&s) - 0.5);
        m[i] = m2[i] = v[i] = v2[i] = 0.0f;
    }
    db_adamw hp = db_adamw_defaults(1e-2);
    for (int64_t t = 1; t <= 5; t++) {
        for (size_t i = 0; i < N; i++)
            g[i] = (float)(urand(&s) - 0.5);
        db_adamw_step(p, m, v, g, N, &hp, t);
        db_adamw_step_omp(p2, m2, v2, g, N, &hp, t);
    }
    tap_ok(memcmp(p, p2, N * sizeof *p) == 0 && memcmp(m, m2, N * sizeof *m) == 0 && memcmp(v, v2, N * sizeof *v) == 0,
           "adamw OpenMP version bit-identical to serial (n %d, 5 steps)", N);

    /* zero gradient, zero moments: only the decay acts, p *= (1 - lr*wd);
     * with wd 0 the step leaves p bit-identical */
    memset(g, 0, N * sizeof *g);
    memset(m, 0, N * sizeof *m);
    memset(v, 0, N * sizeof *v);
    memcpy(p, p3, N * sizeof *p);
    db_adamw_step(p, m, v, g, N, &hp, 1);
    int ok = 1;
    for (size_t i = 0; i < N; i++)
        ok &= p[i] == p3[i] * (float)(1.0 - 1e-2 * 1e-2) && (p[i] != p3[i] || p3[i] == 0.0f);
    tap_ok(ok, "adamw with wd 1e-2 and zero grad scales p by (1 - lr*wd)");
    memcpy(p, p3, N * sizeof *p);
    hp.weight_decay = 0.0;
    db_adamw_step(p, m, v, g, N, &hp, 1);
    tap_ok(memcmp(p, p3, N * sizeof *p) == 0, "adamw with wd 0 and zero grad leaves p unchanged");
    free(buf);
}

static void clipping(void)
{
    enum { NT = 5 };
    const size_t sizes[NT] = {1, 4095, 4096, 50000, 123457};
    float *g[NT], *ref[NT];
    db_grad_ref refs[NT];
    uint64_t s = 7;
    double ss = 0.0;
    for (int k = 0; k < NT; k++) {
        g[k] = malloc(sizes[k] * sizeof(float));
        ref[k] = malloc(sizes[k] * sizeof(float));
        double sk = 0.0;
        for (size_t i = 0; i < sizes[k]; i++) {
            g[k][i] = ref[k][i] = (float)((urand(&s) - 0.5) * 0.01);
            sk += (double)g[k][i] * g[k][i];
        }
        ss += sk;
        refs[k] = (db_grad_ref){g[k], sizes[k], 0};
    }
    double want = sqrt(ss);
    /* under the max: a no-op, bit for bit */
    double n1 = db_clip_grad_norm(refs, NT, want * 2.0);
    int same = 1;
    for (int k = 0; k < NT; k++)
        same &= memcmp(g[k], ref[k], sizes[k] * sizeof(float)) == 0;
    tap_ok(fabs(n1 - want) <= 1e-6 * want && same, "clip: norm %.9g vs naive %.9g, no-op under max", n1, want);
    /* over the max: every gradient scaled by max / (norm + 1e-6) */
    double maxn = want / 3.0;
    double n2 = db_clip_grad_norm(refs, NT, maxn);
    double coef = maxn / (want + 1e-6), worst = 0.0, ss2 = 0.0;
    for (int k = 0; k < NT; k++)
        for (size_t i = 0; i < sizes[k]; i++) {
            double e = fabs(g[k][i] - ref[k][i] * coef);
            worst = e > worst ? e : worst;
            ss2 += (double)g[k][i] * g[k][i];
        }
    tap_ok(n2 == n1 && worst <= 1e-6 * 0.005 && fabs(sqrt(ss2) - maxn) <= 1e-5 * maxn,
           "clip: scaled to max (norm after %.9g, want %.9g, worst %.3g)", sqrt(ss2), maxn, worst);
    /* fixed chunks: the same bits with 1 thread and with 3 */
    int nthreads = omp_get_max_threads();
    omp_set_num_threads(1);
    double n3 = db_clip_grad_norm(refs, NT, 1e30);
    omp_set_num_threads(3);
    double n4 = db_clip_grad_norm(refs, NT, 1e30);
    omp_set_num_threads(nthreads);
    tap_ok(n3 == n4, "clip: norm bit-identical with 1 and 3 threads");
    tap_ok(db_clip_grad_norm(refs, 0, 1.0) == 0.0, "clip: no tensors gives 0");
    for (int k = 0; k < NT; k++)
        free(g[k]), free(ref[k]);
}

/* diffusers' lambdas, written out again independently */
static double want_lr(db_lr_kind kind, double base, double W, double T, double step)
{
    if (kind == DB_LR_CONSTANT)
        return base;
    if (step < W)
        return base * step / fmax(1, W);
    double prog = (step - W) / fmax(1, T - W);
    switch (kind) {
    case DB_LR_CONSTANT_WITH_WARMUP:
        return base;
    case DB_LR_LINEAR:
        return base * fmax(0, (T - step) / fmax(1, T - W));
    case DB_LR_COSINE:
        return base * fmax(0, 0.5 * (1 + cos(M_PI * 0.5 * 2 * prog)));
    case DB_LR_COSINE_WITH_RESTARTS:
        return prog >= 1 ? 0.0 : base * fmax(0, 0.5 * (1 + cos(M_PI * fmod(1.0 * prog, 1.0))));
    case DB_LR_POLYNOMIAL:
        if (step > T)
            return base * (1e-7 / base);
        return base * (((base - 1e-7) * (1 - (step - W) / (T - W)) + 1e-7) / base);
    default:
        return NAN;
    }
}

static void schedules(void)
{
    const double base = 2e-6;
    const int64_t steps[] = {0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 101, 150};
    for (int k = DB_LR_CONSTANT; k <= DB_LR_POLYNOMIAL; k++) {
        db_lr_kind kind;
        int parsed = db_lr_kind_parse(db_lr_kind_name((db_lr_kind)k), &kind) == 0 && kind == (db_lr_kind)k;
        db_lr_schedule s = db_lr_schedule_make((db_lr_kind)k, base, 10, 100);
        double worst = 0.0;
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            double got = db_lr_at(&s, steps[i]), want = want_lr((db_lr_kind)k, base, 10, 100, (double)steps[i]);
            double e = fabs(got - want) / base;
            worst = e > worst || isnan(e) ? e : worst;
        }
        tap_ok(parsed && worst <= 1e-15, "lr %s: 12 steps vs formula (worst %.3g)", db_lr_kind_name((db_lr_kind)k), worst);
    }
    db_lr_kind dummy;
    tap_ok(db_lr_kind_parse("cosine_restarts", &dummy) < 0, "lr: unknown name rejected");

    db_lr_schedule lin = db_lr_schedule_make(DB_LR_LINEAR, 1e-6, 10, 100);
    tap_ok(db_lr_at(&lin, 5) == 0.5e-6 && db_lr_at(&lin, 55) == 0.5e-6 && db_lr_at(&lin, 0) == 0.0 &&
               db_lr_at(&lin, 10) == 1e-6 && db_lr_at(&lin, 100) == 0.0 && db_lr_at(&lin, 120) == 0.0,
           "lr linear warmup 10/100: 0, 0.5, 1, 0.5, 0, 0 x base at steps 0, 5, 10, 55, 100, 120");
    db_lr_schedule cw = db_lr_schedule_make(DB_LR_CONSTANT_WITH_WARMUP, 1e-6, 4, 100);
    tap_ok(db_lr_at(&cw, 1) == 0.25e-6 && db_lr_at(&cw, 4) == 1e-6 && db_lr_at(&cw, 1000) == 1e-6,
           "lr constant_with_warmup 4: 0.25, 1, 1 x base");
    db_lr_schedule cs = db_lr_schedule_make(DB_LR_COSINE, 1e-6, 0, 100);
    tap_ok(db_lr_at(&cs, 0) == 1e-6 && fabs(db_lr_at(&cs, 50) - 0.5e-6) < 1e-21 && fabs(db_lr_at(&cs, 100)) < 1e-21,
           "lr cosine: 1, 0.5, 0 x base at 0, 50, 100");
    db_lr_schedule cr = db_lr_schedule_make(DB_LR_COSINE_WITH_RESTARTS, 1e-6, 0, 100);
    cr.num_cycles = 2;
    tap_ok(db_lr_at(&cr, 0) == 1e-6 && db_lr_at(&cr, 50) == 1e-6 && fabs(db_lr_at(&cr, 25) - 0.5e-6) < 1e-21 &&
               fabs(db_lr_at(&cr, 75) - 0.5e-6) < 1e-21 && db_lr_at(&cr, 100) == 0.0,
           "lr cosine_with_restarts 2 cycles: restarts at the half");
    db_lr_schedule po = db_lr_schedule_make(DB_LR_POLYNOMIAL, 1e-3, 0, 100);
    po.power = 2.0;
    tap_ok(fabs(db_lr_at(&po, 50) - ((1e-3 - 1e-7) * 0.25 + 1e-7)) < 1e-18 && fabs(db_lr_at(&po, 100) - 1e-7) < 1e-18 &&
               fabs(db_lr_at(&po, 200) - 1e-7) < 1e-18,
           "lr polynomial power 2: 0.25 of range at half, lr_end at and after the end");
    db_lr_schedule cn = db_lr_schedule_make(DB_LR_CONSTANT, 1e-6, 10, 100);
    tap_ok(db_lr_at(&cn, 0) == 1e-6 && db_lr_at(&cn, 500) == 1e-6, "lr constant ignores warmup");
}

/* grad_coef: the clip's scaling folded into the step gives the bits of
 * scaling g first (db_scale) and stepping on it, for the fp32 and the 8-bit
 * step; 0 leaves g as it is.  Fails if the step ignores grad_coef or
 * applies it anywhere but to g. */
static void adamw_grad_coef(void)
{
    enum { N = 3 * DB_Q8_BLOCK + 77 };
    float *buf = malloc(10 * N * sizeof *buf);
    float *p = buf, *m = p + N, *v = m + N, *g = v + N, *gs = g + N, *p2 = gs + N, *m2 = p2 + N, *v2 = m2 + N;
    uint64_t s = 7;
    for (size_t i = 0; i < N; i++) {
        p[i] = p2[i] = (float)(urand(&s) - 0.5);
        m[i] = m2[i] = v[i] = v2[i] = 0.0f;
    }
    const float coef = 0.3172f;
    db_adamw hp = db_adamw_defaults(1e-2), hc = hp;
    hc.grad_coef = coef;
    int same = 1, moved = 0;
    for (int64_t t = 1; t <= 3; t++) {
        for (size_t i = 0; i < N; i++)
            g[i] = gs[i] = (float)(urand(&s) - 0.5);
        db_scale(gs, coef, N);
        db_adamw_step(p, m, v, gs, N, &hp, t);
        db_adamw_step_omp(p2, m2, v2, g, N, &hc, t);
        same &= !memcmp(p, p2, N * sizeof *p) && !memcmp(m, m2, N * sizeof *m) && !memcmp(v, v2, N * sizeof *v);
    }
    /* and g itself is left as it was (the step reads it scaled) */
    for (size_t i = 0; i < N; i++)
        moved |= g[i] == gs[i] && g[i] != 0.0f;
    tap_ok(same && !moved, "adamw grad_coef %g: the bits of scaling g first, 3 steps; g left unscaled", coef);

    /* the 8-bit step the same way */
    db_q8_maps maps;
    db_q8_maps_make(&maps);
    const size_t nb = (N + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    uint8_t *q = calloc(4 * N, 1);
    float *am = calloc(4 * nb, sizeof *am);
    for (size_t i = 0; i < N; i++)
        p[i] = p2[i] = (float)(urand(&s) - 0.5);
    same = 1;
    for (int64_t t = 1; t <= 3; t++) {
        for (size_t i = 0; i < N; i++)
            g[i] = gs[i] = (float)(urand(&s) - 0.5);
        db_scale(gs, coef, N);
        db_adamw8bit_step(p, q, q + N, am, am + nb, gs, N, &hp, t, &maps);
        db_adamw8bit_step(p2, q + 2 * N, q + 3 * N, am + 2 * nb, am + 3 * nb, g, N, &hc, t, &maps);
        same &= !memcmp(p, p2, N * sizeof *p) && !memcmp(q, q + 2 * N, 2 * N);
    }
    tap_ok(same, "adamw8bit grad_coef %g: the bits of scaling g first, 3 steps", coef);
    free(q), free(am), free(buf);
}

int main(void)
{
    adamw_hand();
    adamw_vs_double(0.0);
    adamw_vs_double(1e-2);
    adamw_decay_and_omp();
    adamw_grad_coef();
    clipping();
    schedules();
    return tap_done();
}
