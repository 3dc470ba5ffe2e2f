/* GEMM and linear on oneDNN's JIT sgemm (row-major, OpenMP inside).
 *
 * Measured here (2 cores, AVX-512) at SD shapes, one multi-threaded sgemm
 * followed by a bias pass beat both oneDNN's matmul primitive with a fused
 * bias (weights stored (OC, C) made it reorder them on every call: 2x slower)
 * and tiling C ourselves with the bias written into each tile before a
 * single-threaded sgemm (5-20% slower: every tile re-packs its panels). */
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
        /* few or big products: each one uses all threads */
        for (int b = 0; b < batch && status == dnnl_success; b++)
            status = dnnl_sgemm(ta, tb, M, N, K, alpha, A + b * sa, lda, B + b * sb, ldb, beta, Cm + b * sc, N);
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

int db_cpu_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C,
                          int OC)
{
    /* out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C) */
    dnnl_status_t s = dnnl_sgemm('N', 'T', N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (s != dnnl_success)
        return db_cpu_dnnl_fail(c, s, "sgemm (linear)");
    if (bias) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int r = 0; r < N; r++) {
            float *o = out + (size_t)r * OC;
            for (int j = 0; j < OC; j++)
                o[j] += bias[j];
        }
    }
    return 0;
}
