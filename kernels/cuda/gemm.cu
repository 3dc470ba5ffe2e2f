// GEMM and linear, forward and backward, on cuBLAS sgemm (fp32, default math:
// no TF32), plus the bias pass and the bias gradient.
//
// Row-major through a column-major library: a row-major (M, N) matrix is the
// column-major (N, M) one, so Cm = op(A) op(B) is computed as
// Cm^T = op(B)^T op(A)^T, i.e. cuBLAS gets B first and A second with the
// dimensions swapped and the same transpose flags.
//
// Determinism: cuBLAS sgemm gives the same bits for the same call on the same
// GPU and stream (no atomics unless enabled); the bias sums are two-stage
// reductions with a fixed order (norm.cu db_cuda_finish_colsum).
#include "kernels/cuda/cuda.h"

int db_cuda_sgemm(db_ctx *c, int batch, int transa, int transb, int M, int N, int K, float alpha, const float *A,
                  int lda, long long sa, const float *B, int ldb, long long sb, float beta, float *Cm, int ldc,
                  long long sc)
{
    if (batch == 0 || M == 0 || N == 0)
        return 0;
    db_cuda_state *st = db_cuda_st(c);
    const cublasOperation_t oa = transa ? CUBLAS_OP_T : CUBLAS_OP_N, ob = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batch == 1)
        DB_CUBLAS(c, cublasSgemm(st->blas, ob, oa, N, M, K, &alpha, B, ldb, A, lda, &beta, Cm, ldc));
    else
        DB_CUBLAS(c, cublasSgemmStridedBatched(st->blas, ob, oa, N, M, K, &alpha, B, ldb, sb, A, lda, sa, &beta, Cm,
                                               ldc, sc, batch));
    return 0;
}

// out (N, OC) += bias (OC) broadcast over rows
__global__ static void add_bias_rows_kernel(float *out, const float *bias, size_t N, int OC)
{
    const size_t total = N * (size_t)OC;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        out[i] += bias[i % OC];
}

// part (nchunk, OC) = per chunk of ROWS rows, the column sums of dout (N, OC) in
// double, rows in order.  grid (ceil(OC / 128), nchunk), block 128.
enum { BIAS_ROWS = 256 };
__global__ static void colsum_part_kernel(double *part, const float *dout, int N, int OC)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x, r0 = blockIdx.y * BIAS_ROWS;
    if (j >= OC)
        return;
    const int r1 = r0 + BIAS_ROWS < N ? r0 + BIAS_ROWS : N;
    double s = 0;
    for (int r = r0; r < r1; r++)
        s += dout[(size_t)r * OC + j];
    part[(size_t)blockIdx.y * OC + j] = s;
}

extern "C" int db_cuda_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N,
                                    int K, int transa, int transb, float alpha, float beta)
{
    DB_ENTER(c);
    return db_cuda_sgemm(c, batch, transa, transb, M, N, K, alpha, A, transa ? M : K, (long long)M * K, B,
                         transb ? K : N, (long long)K * N, beta, Cm, N, (long long)M * N);
}

extern "C" int db_cuda_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                                      int N, int C, int OC)
{
    DB_ENTER(c);
    // out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C); then + bias
    if (db_cuda_sgemm(c, 1, 0, 1, N, OC, C, 1.0f, inp, C, 0, weight, C, 0, 0.0f, out, OC, 0) != 0)
        return -1;
    if (bias && N > 0) {
        add_bias_rows_kernel<<<db_cuda_grid((size_t)N * OC, 256), 256, 0, db_cuda_st(c)->stream>>>(out, bias, (size_t)N,
                                                                                                   OC);
        DB_LAUNCHED(c);
    }
    return 0;
}

// gemm_backward.c's arrangement: each gradient is one product in its stored layout.
static int gemm_plain(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K, int transa,
                      int transb, float alpha)
{
    return db_cuda_sgemm(c, batch, transa, transb, M, N, K, alpha, A, transa ? M : K, (long long)M * K, B,
                         transb ? K : N, (long long)K * N, 0.0f, Cm, N, (long long)M * N);
}

extern "C" int db_cuda_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B,
                                     int batch, int M, int N, int K, int transa, int transb, float alpha)
{
    DB_ENTER(c);
    //   dA (M, K)  = alpha dCm @ op(B)^T        dA stored (K, M) = alpha op(B) @ dCm^T
    //   dB (K, N)  = alpha op(A)^T @ dCm        dB stored (N, K) = alpha dCm^T @ op(A)
    if (dA) {
        int r = transa ? gemm_plain(c, dA, B, dCm, batch, K, M, N, transb, 1, alpha)
                       : gemm_plain(c, dA, dCm, B, batch, M, K, N, 0, !transb, alpha);
        if (r)
            return -1;
    }
    if (dB) {
        int r = transb ? gemm_plain(c, dB, dCm, A, batch, N, K, M, 1, transa, alpha)
                       : gemm_plain(c, dB, A, dCm, batch, K, N, M, !transa, 0, alpha);
        if (r)
            return -1;
    }
    return 0;
}

extern "C" int db_cuda_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                       const float *inp, const float *weight, int N, int C, int OC)
{
    DB_ENTER(c);
    // dinp (N, C) = dout (N, OC) @ weight (OC, C)
    if (dinp && db_cuda_sgemm(c, 1, 0, 0, N, C, OC, 1.0f, dout, OC, 0, weight, C, 0, 0.0f, dinp, C, 0) != 0)
        return -1;
    // dweight (OC, C) += dout^T (OC, N) @ inp (N, C)
    if (dweight && db_cuda_sgemm(c, 1, 1, 0, OC, C, N, 1.0f, dout, OC, 0, inp, C, 0, 1.0f, dweight, C, 0) != 0)
        return -1;
    if (dbias && N > 0 && OC > 0) {
        const int nchunk = (N + BIAS_ROWS - 1) / BIAS_ROWS;
        double *part = (double *)db_cuda_alloc(c, sizeof(double) * (size_t)nchunk * OC);
        if (!part)
            return -1;
        dim3 grid((unsigned)((OC + 127) / 128), (unsigned)nchunk);
        colsum_part_kernel<<<grid, 128, 0, db_cuda_st(c)->stream>>>(part, dout, N, OC);
        cudaError_t e = cudaGetLastError();
        int r = e == cudaSuccess ? db_cuda_finish_colsum(c, dbias, part, nchunk, OC) : -1;
        db_cuda_free(c, part);
        DB_CU(c, e);
        return r;
    }
    return 0;
}
