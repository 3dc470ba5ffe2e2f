/* Group norm (+ fused SiLU), layer norm, softmax: memory-bound row loops,
 * parallel over groups / rows.  Statistics are two-pass (mean, then the mean
 * of squared deviations) so a large mean does not cancel the variance away. */
#include <math.h>
#include <omp.h>

#include "kernels/cpu/cpu.h"

static double sum_portable(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i];
    return s;
}

static double sumsq_dev_portable(const float *x, size_t n, float mean)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - mean;
        s += d * d;
    }
    return s;
}

static float silu1(float x) { return x / (1.0f + expf(-x)); }

int db_cpu_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                             const float *bias, int B, int C, int HW, int G, float eps, int silu)
{
    const int cg = C / G;                 /* channels per group */
    const size_t n = (size_t)cg * HW;     /* a group is contiguous in NCHW */
    const int simd = c->simd;
#pragma omp parallel for num_threads(c->threads) schedule(dynamic)
    for (int bg = 0; bg < B * G; bg++) {
        const float *x = inp + (size_t)bg * n;
        float *y = out + (size_t)bg * n;
        const float mu = (float)((simd ? db_avx512_sum(x, n) : sum_portable(x, n)) / (double)n);
        const double var = (simd ? db_avx512_sumsq_dev(x, n, mu) : sumsq_dev_portable(x, n, mu)) / (double)n;
        const float rs = (float)(1.0 / sqrt(var + (double)eps));
        if (mean)
            mean[bg] = mu;
        if (rstd)
            rstd[bg] = rs;
        for (int ch = 0; ch < cg; ch++) {
            const int cc = (bg % G) * cg + ch;
            /* y = (x - mu) * rs * w + b = x * a + (b - mu * a) */
            const float a = rs * weight[cc], sh = bias[cc] - mu * a;
            const float *xc = x + (size_t)ch * HW;
            float *yc = y + (size_t)ch * HW;
            if (simd) {
                db_avx512_scale_shift(yc, xc, (size_t)HW, a, sh, silu);
            } else {
                for (int i = 0; i < HW; i++) {
                    float t = xc[i] * a + sh;
                    yc[i] = silu ? silu1(t) : t;
                }
            }
        }
    }
    return 0;
}

int db_cpu_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                             const float *bias, int N, int C, float eps)
{
    const int simd = c->simd;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++) {
        const float *x = inp + (size_t)r * C;
        float *y = out + (size_t)r * C;
        const float mu = (float)((simd ? db_avx512_sum(x, (size_t)C) : sum_portable(x, (size_t)C)) / C);
        const double var =
            (simd ? db_avx512_sumsq_dev(x, (size_t)C, mu) : sumsq_dev_portable(x, (size_t)C, mu)) / C;
        const float rs = (float)(1.0 / sqrt(var + (double)eps));
        if (mean)
            mean[r] = mu;
        if (rstd)
            rstd[r] = rs;
        if (simd) {
            db_avx512_norm_affine(y, x, weight, bias, (size_t)C, mu, rs);
        } else {
            for (int i = 0; i < C; i++)
                y[i] = (x[i] - mu) * rs * weight[i] + bias[i];
        }
    }
    return 0;
}

int db_cpu_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    const int simd = c->simd;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++) {
        const float *x = inp + (size_t)r * C;
        float *y = out + (size_t)r * C;
        if (simd) {
            db_avx512_softmax_row(y, x, (size_t)C);
            continue;
        }
        float mx = -INFINITY;
        for (int i = 0; i < C; i++)
            mx = x[i] > mx ? x[i] : mx;
        double sum = 0;
        for (int i = 0; i < C; i++) {
            y[i] = expf(x[i] - mx);
            sum += y[i];
        }
        const float inv = (float)(1.0 / sum);
        for (int i = 0; i < C; i++)
            y[i] *= inv;
    }
    return 0;
}
