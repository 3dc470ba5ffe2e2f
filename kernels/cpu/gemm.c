/* GEMM and linear on oneDNN's JIT sgemm, through fixed output tiles
 * (db_cpu_sgemm_fixed, gemm_backward.c): each tile one sequential sgemm,
 * the tiles shared out over our threads.
 *
 * Measured here (2 cores, AVX-512) at SD shapes, one multi-threaded sgemm
 * followed by a bias pass beat oneDNN's matmul primitive with a fused bias
 * (weights stored (OC, C) made it reorder them on every call: 2x slower),
 * and was 0-20% faster than the fixed tiles at large shapes (every tile
 * re-packs its panels) while slower at CLIP's 154-token ones.  But oneDNN's
 * threading splits the reduction by the thread count, so its bits depend on
 * it; training promises the same gradients at any thread count, so every
 * product here takes the fixed tiles. */
#include <omp.h>

#include "kernels/cpu/cpu.h"

int db_cpu_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                        int transa, int transb, float alpha, float beta)
{
    const char ta = transa ? 'T' : 'N', tb = transb ? 'T' : 'N';
    const int lda = transa ? M : K, ldb = transb ? K : N;
    const size_t sa = (size_t)M * K, sb = (size_t)K * N, sc = (size_t)M * N;
    dnnl_status_t status = dnnl_success;
    if (batch < c->threads || sc * K > ((size_t)1 << 24)) {
        /* few or big products: fixed output tiles over all threads (oneDNN's
         * own threading splits the reduction by the thread count, so its
         * bits would depend on it) */
        return db_cpu_sgemm_fixed(c, batch, ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, Cm, N, sc);
    } else {
        /* many small ones (per-head products): one per thread at a time;
         * oneDNN runs single-threaded inside a parallel region */
#pragma omp parallel for num_threads(c->threads) schedule(dynamic)
        for (int b = 0; b < batch; b++) {
            dnnl_status_t s =
                dnnl_sgemm(ta, tb, M, N, K, alpha, A + b * sa, lda, B + b * sb, ldb, beta, Cm + b * sc, N);
            if (s != dnnl_success) {
#pragma omp atomic write
                status = s;
            }
        }
    }
    if (status != dnnl_success)
        return db_cpu_dnnl_fail(c, status, "sgemm");
    return 0;
}

int db_cpu_linear_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                              const float *res, int N, int C, int OC)
{
    /* out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C); fixed
     * tiles: the same bits at any thread count (see db_cpu_gemm_forward) */
    if (db_cpu_sgemm_fixed(c, 1, 'N', 'T', N, OC, C, 1.0f, inp, C, 0, weight, C, 0, 0.0f, out, OC, 0))
        return db_err_prefix(&c->err, "linear");
    /* then (out + bias) + res in one pass: the two adds in the order the
     * separate ops make them (no + 0.0f where one is absent: -0 stays -0) */
    if (bias || res) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int r = 0; r < N; r++) {
            float *o = out + (size_t)r * OC;
            const float *e = res ? res + (size_t)r * OC : NULL;
            if (bias && e)
                for (int j = 0; j < OC; j++)
                    o[j] = (o[j] + bias[j]) + e[j];
            else if (bias)
                for (int j = 0; j < OC; j++)
                    o[j] += bias[j];
            else
                for (int j = 0; j < OC; j++)
                    o[j] += e[j];
        }
    }
    return 0;
}

int db_cpu_linear_geglu_forward(db_ctx *c, float *proj, float *out, const float *inp, const float *weight,
                                const float *bias, int N, int C, int FF)
{
    const int OC = 2 * FF;
    if (db_cpu_sgemm_fixed(c, 1, 'N', 'T', N, OC, C, 1.0f, inp, C, 0, weight, C, 0, 0.0f, proj, OC, 0))
        return db_err_prefix(&c->err, "linear");
    /* per row, while it is in cache: the bias (as db_cpu_linear_forward
     * adds it), then the GEGLU of the row (as db_cpu_geglu_forward makes it) */
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++) {
        float *p = proj + (size_t)r * OC;
        if (bias)
            for (int j = 0; j < OC; j++)
                p[j] += bias[j];
        db_cpu_geglu_row(c, out + (size_t)r * FF, p, FF);
    }
    return 0;
}

int db_cpu_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C,
                          int OC)
{
    return db_cpu_linear_add_forward(c, out, inp, weight, bias, NULL, N, C, OC);
}
