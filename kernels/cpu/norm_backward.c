/* Backward of group norm (+ fused SiLU), layer norm and softmax.
 *
 * With xhat = (x - mean) * rstd and g the gradient reaching xhat
 * (dout * weight, after the SiLU's derivative when fused), over the n
 * elements that share one mean/rstd:
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 * and the affine parameters get dweight += sum(dy * xhat), dbias += sum(dy),
 * dy being the gradient at the affine output (before SiLU's derivative: after).
 *
 * Determinism: every sum has a fixed order that does not depend on the
 * thread count: per-row / per-group sums run inside one task; parameter
 * gradients are per (b, c) partials (group norm) or whole columns walked in
 * row order (layer norm), combined in index order.  So results are
 * bit-identical at any thread count. */
#include <math.h>
#include <omp.h>

#include "kernels/cpu/cpu.h"

enum { COLS = 64 }; /* layer norm parameter columns per task */

int db_cpu_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *bias, const float *add, int B, int C, int HW, int G, int silu)
{
    const int cg = C / G;
    const size_t n = (size_t)cg * HW;
    const int want_params = dweight || dbias;
    /* per (b, c): sum(dy * xhat), sum(dy) */
    double *part = want_params ? db_cpu_scratch(c, sizeof(double) * 2 * (size_t)B * C) : NULL;
    if (want_params && !part)
        return db_err_prefix(&c->err, "groupnorm backward");
#pragma omp parallel for num_threads(c->threads) schedule(dynamic)
    for (int bg = 0; bg < B * G; bg++) {
        const int b = bg / G, g = bg % G;
        const float mu = mean[bg], rs = rstd[bg];
        const float *x = inp + (size_t)bg * n, *dy0 = dout + (size_t)bg * n;
        /* pass 1: the sums over the group */
        double sum_g = 0, sum_gx = 0;
        for (int ch = 0; ch < cg; ch++) {
            const int cc = g * cg + ch;
            const float w = weight[cc], bb = bias[cc];
            const float *xc = x + (size_t)ch * HW, *dc = dy0 + (size_t)ch * HW;
            double s_dy = 0, s_dyx = 0;
            for (int i = 0; i < HW; i++) {
                const float xh = (xc[i] - mu) * rs;
                float dy = dc[i];
                if (silu) { /* d silu(z)/dz = s (1 + z (1 - s)), z the affine output */
                    const float z = xh * w + bb, sg = 1.0f / (1.0f + expf(-z));
                    dy *= sg * (1.0f + z * (1.0f - sg));
                }
                s_dy += dy;
                s_dyx += (double)dy * xh;
            }
            sum_g += s_dy * w;
            sum_gx += s_dyx * w;
            if (want_params) {
                part[2 * ((size_t)b * C + cc)] = s_dyx;
                part[2 * ((size_t)b * C + cc) + 1] = s_dy;
            }
        }
        if (!dinp)
            continue;
        const float mg = (float)(sum_g / (double)n), mgx = (float)(sum_gx / (double)n);
        /* pass 2: dx */
        float *dx = dinp + (size_t)bg * n;
        for (int ch = 0; ch < cg; ch++) {
            const int cc = g * cg + ch;
            const float w = weight[cc], bb = bias[cc];
            const float *xc = x + (size_t)ch * HW, *dc = dy0 + (size_t)ch * HW;
            float *dxc = dx + (size_t)ch * HW;
            const float *ac = add ? add + (size_t)bg * n + (size_t)ch * HW : NULL;
            for (int i = 0; i < HW; i++) {
                const float xh = (xc[i] - mu) * rs;
                float dy = dc[i];
                if (silu) {
                    const float z = xh * w + bb, sg = 1.0f / (1.0f + expf(-z));
                    dy *= sg * (1.0f + z * (1.0f - sg));
                }
                const float v = rs * (dy * w - mg - xh * mgx);
                dxc[i] = ac ? ac[i] + v : v; /* (db_add_forward's sum) */
            }
        }
    }
    if (want_params) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int cc = 0; cc < C; cc++) {
            double sw = 0, sb = 0;
            for (int b = 0; b < B; b++) {
                sw += part[2 * ((size_t)b * C + cc)];
                sb += part[2 * ((size_t)b * C + cc) + 1];
            }
            if (dweight)
                dweight[cc] += (float)sw;
            if (dbias)
                dbias[cc] += (float)sb;
        }
    }
    return 0;
}

int db_cpu_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *add, int N, int C)
{
    if (dinp) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int r = 0; r < N; r++) {
            const float *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
            const float mu = mean[r], rs = rstd[r];
            double sg = 0, sgx = 0;
            for (int i = 0; i < C; i++) {
                const float g = dy[i] * weight[i];
                sg += g;
                sgx += (double)g * ((x[i] - mu) * rs);
            }
            const float mg = (float)(sg / C), mgx = (float)(sgx / C);
            float *dx = dinp + (size_t)r * C;
            const float *ad = add ? add + (size_t)r * C : NULL;
            for (int i = 0; i < C; i++) {
                const float v = rs * (dy[i] * weight[i] - mg - (x[i] - mu) * rs * mgx);
                dx[i] = ad ? ad[i] + v : v; /* (db_add_forward's sum) */
            }
        }
    }
    if (dweight || dbias) {
        const int nblk = (C + COLS - 1) / COLS;
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int j0 = blk * COLS, nj = C - j0 < COLS ? C - j0 : COLS;
            double sw[COLS] = {0}, sb[COLS] = {0};
            for (int r = 0; r < N; r++) {
                const float *x = inp + (size_t)r * C + j0, *dy = dout + (size_t)r * C + j0;
                const float mu = mean[r], rs = rstd[r];
                for (int j = 0; j < nj; j++) {
                    sw[j] += (double)dy[j] * ((x[j] - mu) * rs);
                    sb[j] += dy[j];
                }
            }
            for (int j = 0; j < nj; j++) {
                if (dweight)
                    dweight[j0 + j] += (float)sw[j];
                if (dbias)
                    dbias[j0 + j] += (float)sb[j];
            }
        }
    }
    return 0;
}

int db_cpu_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C)
{
    /* dx = y * (dy - sum(dy * y)) */
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++) {
        const float *y = out + (size_t)r * C, *dy = dout + (size_t)r * C;
        double s = 0;
        for (int i = 0; i < C; i++)
            s += (double)dy[i] * y[i];
        const float sf = (float)s;
        float *dx = dinp + (size_t)r * C;
        for (int i = 0; i < C; i++)
            dx[i] = y[i] * (dy[i] - sf);
    }
    return 0;
}
