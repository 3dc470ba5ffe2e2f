/* db_attention_forward against a naive double-precision softmax(q k^T /
 * sqrt(HS)) v on fresh random inputs, output and log-sum-exp, relative L2
 * error <= 1e-5, with the AVX-512 kernels and with the portable loops.
 * Shapes cover CLIP (T 77, causal, HS 64), SD cross-attention (Tk 77 != Tq),
 * small and odd head sizes (8, 40, 80, 160) and T 1024 (several query and key
 * blocks of the online softmax). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/ops.h"
#include "tap.h"

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static float urand(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545f4914f6cdd1dull;
    return (float)((double)(r >> 40) / (double)(1ull << 23) - 1.0);
}

static float *rnd(size_t n, float scale)
{
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = urand() * scale;
    return p;
}

static double rel_l2(const float *got, const double *ref, size_t n, size_t *worst)
{
    double num = 0, den = 0, wd = -1;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (isnan(d))
            return INFINITY;
        num += d * d;
        den += ref[i] * ref[i];
        if (d > wd)
            wd = d, *worst = i;
    }
    return sqrt(num / den);
}

/* out (B, Tq, NH*HS), lse (B, NH, Tq) */
static void ref_attention(double *out, double *lse, const float *q, const float *k, const float *v, int B, int Tq,
                          int Tk, int NH, int HS, int causal)
{
    const size_t C = (size_t)NH * HS;
    double *s = malloc((size_t)Tk * sizeof *s);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < Tq; i++) {
                const float *qi = q + ((size_t)b * Tq + i) * C + (size_t)h * HS;
                int n = causal && i + 1 < Tk ? i + 1 : Tk;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < n; j++) {
                    const float *kj = k + ((size_t)b * Tk + j) * C + (size_t)h * HS;
                    double d = 0;
                    for (int e = 0; e < HS; e++)
                        d += (double)qi[e] * kj[e];
                    s[j] = d / sqrt((double)HS);
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j < n; j++)
                    sum += s[j] = exp(s[j] - mx);
                lse[((size_t)b * NH + h) * Tq + i] = mx + log(sum);
                double *o = out + ((size_t)b * Tq + i) * C + (size_t)h * HS;
                for (int e = 0; e < HS; e++)
                    o[e] = 0;
                for (int j = 0; j < n; j++) {
                    const float *vj = v + ((size_t)b * Tk + j) * C + (size_t)h * HS;
                    for (int e = 0; e < HS; e++)
                        o[e] += s[j] / sum * vj[e];
                }
            }
    free(s);
}

int main(void)
{
    db_ctx *c;
    db_err err = {0};
    if (!tap_ok(db_ctx_create(&c, DB_CPU, 0, &err) == 0, "cpu context created"))
        return tap_done();
    const int has_simd = c->simd;
    struct { int B, Tq, Tk, NH, HS, causal; float scale; } cases[] = {
        {2, 77, 77, 12, 64, 1, 1.5f},  /* CLIP ViT-L/14 text self-attention */
        {2, 77, 77, 4, 40, 1, 1.0f},   /* causal, HS 40 */
        {1, 100, 77, 8, 40, 0, 1.5f},  /* SD cross-attention: 77 context keys */
        {2, 50, 50, 3, 8, 0, 2.0f},    /* HS 8 */
        {1, 1024, 1024, 2, 40, 0, 1.5f}, /* tiles: 16 query blocks x 4 key blocks */
        {1, 300, 600, 2, 80, 1, 1.5f}, /* HS 80, causal with Tq != Tk */
        {1, 70, 33, 2, 160, 0, 1.0f},  /* HS 160 (SD1.5 level 3: 1280 / 8) */
        {1, 1, 5, 1, 3, 0, 1.0f},      /* one query, tiny head */
    };
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !has_simd)
            break;
        c->simd = pass == 0 ? has_simd : 0;
        const char *path = c->simd ? "avx512" : "portable";
        for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
            int B = cases[t].B, Tq = cases[t].Tq, Tk = cases[t].Tk, NH = cases[t].NH, HS = cases[t].HS;
            int causal = cases[t].causal;
            size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
            /* scale > 1 gives peaked softmaxes, so the running max matters */
            float *q = rnd(nq, cases[t].scale), *k = rnd(nk, cases[t].scale), *v = rnd(nk, 1.0f);
            float *out = malloc(nq * sizeof *out), *lse = malloc(nl * sizeof *lse);
            double *rout = malloc(nq * sizeof *rout), *rlse = malloc(nl * sizeof *rlse);
            ref_attention(rout, rlse, q, k, v, B, Tq, Tk, NH, HS, causal);
            char what[128];
            snprintf(what, sizeof what, "attention B=%d Tq=%d Tk=%d NH=%d HS=%d%s [%s]", B, Tq, Tk, NH, HS,
                     causal ? " causal" : "", path);
            int rc = db_attention_forward(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
            if (!tap_ok(rc == 0, "%s runs", what))
                tap_diag("%s", c->err.msg);
            size_t wi = 0;
            double e = rel_l2(out, rout, nq, &wi);
            if (!tap_ok(e <= 1e-5, "%s: out rel L2 %.2e", what, e))
                tap_diag("worst element %zu: got %.9g want %.9g", wi, out[wi], rout[wi]);
            e = rel_l2(lse, rlse, nl, &wi);
            if (!tap_ok(e <= 1e-5, "%s: lse rel L2 %.2e", what, e))
                tap_diag("worst element %zu: got %.9g want %.9g", wi, lse[wi], rlse[wi]);
            /* lse is optional */
            float *out2 = malloc(nq * sizeof *out2);
            db_attention_forward(c, out2, NULL, q, k, v, B, Tq, Tk, NH, HS, causal);
            size_t same = 0;
            for (size_t i = 0; i < nq; i++)
                same += out2[i] == out[i];
            tap_ok(same == nq, "%s: same output without lse", what);
            free(q), free(k), free(v), free(out), free(out2), free(lse), free(rout), free(rlse);
        }
    }
    db_ctx_destroy(c);
    return tap_done();
}
