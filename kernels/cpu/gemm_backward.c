/* Backward of GEMM and linear: sgemm calls with the operands arranged so no
 * copies are needed, plus the bias sum.
 *
 * Determinism.  oneDNN's multi-threaded sgemm splits its work by the thread
 * count, sometimes along the reduction dimension: measured here, linear's
 * dinp at CLIP's shape (77 x 3072 -> 768) differs in the last bits between
 * 1 and 16 threads.  So every backward product goes through
 * db_cpu_sgemm_fixed: the output is cut into fixed tiles (independent of the
 * thread count), the tiles are shared out over our threads, and each is one
 * single-threaded sgemm.  A tile's bits then depend only on its shape.
 * The bias sums are ours: each column summed over the rows in row order, in
 * double. */
#include <omp.h>

#include "kernels/cpu/cpu.h"

enum {
    COLS = 64,   /* bias columns per task: one task's accumulators stay in L1 */
    TILE_M = 64, /* rows and columns of a fixed sgemm output tile: small enough */
    TILE_N = 128  /* that a 320 x 320 weight gradient still feeds 15 threads */
};

int db_cpu_sgemm_fixed(db_ctx *c, int batch, char transa, char transb, int M, int N, int K, float alpha,
                       const float *A, int lda, size_t sa, const float *B, int ldb, size_t sb, float beta, float *Cm,
                       int ldc, size_t sc)
{
    const int tm = (M + TILE_M - 1) / TILE_M, tn = (N + TILE_N - 1) / TILE_N, per = tm * tn;
    const int ta = transa == 'T', tb = transb == 'T';
    dnnl_status_t status = dnnl_success;
#pragma omp parallel for num_threads(c->threads) schedule(dynamic)
    for (long t = 0; t < (long)batch * per; t++) {
        const int bi = (int)(t / per), m0 = (int)(t % per) / tn * TILE_M, n0 = (int)(t % per) % tn * TILE_N;
        const int mb = M - m0 < TILE_M ? M - m0 : TILE_M, nb = N - n0 < TILE_N ? N - n0 : TILE_N;
        /* rows m0.. of op(A): A + m0 * lda, or columns m0.. of A when transposed */
        const float *a = A + bi * sa + (ta ? (size_t)m0 : (size_t)m0 * lda);
        const float *b = B + bi * sb + (tb ? (size_t)n0 * ldb : (size_t)n0);
        /* oneDNN threads by omp_get_max_threads() unless the region is
         * active, and a 1-thread region is not: set this implicit task's
         * count (its own ICV, gone when the region ends) so each tile is
         * always one sequential sgemm. */
        omp_set_num_threads(1);
        dnnl_status_t s = dnnl_sgemm(transa, transb, mb, nb, K, alpha, a, lda, b, ldb, beta,
                                     Cm + bi * sc + (size_t)m0 * ldc + n0, ldc);
        if (s != dnnl_success) {
#pragma omp atomic write
            status = s;
        }
    }
    return status == dnnl_success ? 0 : db_cpu_dnnl_fail(c, status, "sgemm");
}

/* db_cpu_gemm_forward's conventions, beta 0:
 * Cm (batch, M, N) = alpha op(A) @ op(B), matrices packed back to back. */
static int gemm_fixed(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K, int transa,
                      int transb, float alpha)
{
    return db_cpu_sgemm_fixed(c, batch, transa ? 'T' : 'N', transb ? 'T' : 'N', M, N, K, alpha, A, transa ? M : K,
                              (size_t)M * K, B, transb ? K : N, (size_t)K * N, 0.0f, Cm, N, (size_t)M * N);
}

int db_cpu_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B, int batch,
                         int M, int N, int K, int transa, int transb, float alpha)
{
    /* Forward: Cm (M, N) = alpha op(A) (M, K) @ op(B) (K, N).  Both gradients
     * are activation gradients: assigned (beta 0), each in A's / B's stored
     * layout.  Each is one batched product with the operands chosen so the
     * stored layouts need no copies:
     *   dA (M, K)  = alpha dCm @ op(B)^T        dA stored (K, M) = alpha op(B) @ dCm^T
     *   dB (K, N)  = alpha op(A)^T @ dCm        dB stored (N, K) = alpha dCm^T @ op(A) */
    if (dA) {
        int r = transa ? gemm_fixed(c, dA, B, dCm, batch, K, M, N, transb, 1, alpha)
                       : gemm_fixed(c, dA, dCm, B, batch, M, K, N, 0, !transb, alpha);
        if (r)
            return db_err_prefix(&c->err, "gemm backward (dA)");
    }
    if (dB) {
        int r = transb ? gemm_fixed(c, dB, dCm, A, batch, N, K, M, 1, transa, alpha)
                       : gemm_fixed(c, dB, A, dCm, batch, K, N, M, !transa, 0, alpha);
        if (r)
            return db_err_prefix(&c->err, "gemm backward (dB)");
    }
    return 0;
}

int db_cpu_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, int N, int C, int OC)
{
    /* dinp (N, C) = dout (N, OC) @ weight (OC, C) */
    if (dinp && db_cpu_sgemm_fixed(c, 1, 'N', 'N', N, C, OC, 1.0f, dout, OC, 0, weight, C, 0, 0.0f, dinp, C, 0) != 0)
        return db_err_prefix(&c->err, "linear backward (dinp)");
    /* dweight (OC, C) += dout^T (OC, N) @ inp (N, C) */
    if (dweight && db_cpu_sgemm_fixed(c, 1, 'T', 'N', OC, C, N, 1.0f, dout, OC, 0, inp, C, 0, 1.0f, dweight, C, 0) != 0)
        return db_err_prefix(&c->err, "linear backward (dweight)");
    if (dbias) {
        /* dbias (OC) += column sums of dout, blocks of COLS columns per task */
        const int nblk = (OC + COLS - 1) / COLS;
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int j0 = blk * COLS, nj = OC - j0 < COLS ? OC - j0 : COLS;
            double acc[COLS] = {0};
            for (int r = 0; r < N; r++) {
                const float *d = dout + (size_t)r * OC + j0;
                for (int j = 0; j < nj; j++)
                    acc[j] += d[j];
            }
            for (int j = 0; j < nj; j++)
                dbias[j0 + j] += (float)acc[j];
        }
    }
    return 0;
}
