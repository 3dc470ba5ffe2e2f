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
// reductions with a fixed order (norm.cu db_cuda_colsum_done).
//
// bf16 / fp16 (c->precision, kernels/ops.h db_precision): the operands are
// converted to the compute type (autocast.cu) and multiplied by cublasGemmEx
// with float32 accumulation (tensor cores; cuBLAS's default math allows them
// for 16-bit inputs).  A product rounded on its own (the GEMM's output, the
// data and parameter gradients) is stored by cuBLAS in the compute type,
// rounded to nearest even as autocast.cu rounds, and widened to float32 by
// one conversion pass (db_cuda_from16; += for a parameter-gradient
// contribution): 8 bytes an element where a float32 C rounded in place took
// 12, and 12 where a float32 scratch rounded into the gradient took 16.  So
// is the linear's forward product without a bias; with one it stays float32
// (the epilogue adds the bias before the one rounding).  The bias terms are
// summed in float32 from the rounded values and rounded once.  One rounding
// per output, as the CPU reference does (float32 op on rounded inputs,
// output rounded).  db_linear_multi_forward / _backward (an attention's
// projections of one input) convert that input once for all n products,
// and widen each input-gradient term straight into dinp (+=).
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/attention_tc.h"
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

// Cm (float32, or the compute type when c16) = alpha op(A) op(B) + beta Cm
// on operands of the compute type
int db_cuda_gemm16(db_ctx *c, int batch, int transa, int transb, int M, int N, int K, float alpha, const void *A,
                   int lda, long long sa, const void *B, int ldb, long long sb, float beta, void *Cm, int c16, int ldc,
                   long long sc)
{
    if (batch == 0 || M == 0 || N == 0)
        return 0;
    db_cuda_state *st = db_cuda_st(c);
    const cublasOperation_t oa = transa ? CUBLAS_OP_T : CUBLAS_OP_N, ob = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cudaDataType_t t = c->precision == DB_PREC_F16 ? CUDA_R_16F : CUDA_R_16BF, tc = c16 ? t : CUDA_R_32F;
    if (batch == 1)
        DB_CUBLAS(c, cublasGemmEx(st->blas, ob, oa, N, M, K, &alpha, B, t, ldb, A, t, lda, &beta, Cm, tc, ldc,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        DB_CUBLAS(c, cublasGemmStridedBatchedEx(st->blas, ob, oa, N, M, K, &alpha, B, t, ldb, sb, A, t, lda, sa, &beta,
                                                Cm, tc, ldc, sc, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}

// out (N, OC) += bias (OC) broadcast over rows
// The epilogue's value of one element: the linear_epilogue_kernel's v.
__device__ __forceinline__ float epilogue1(float v, const float *bias, size_t j, int mode)
{
    if (mode) {
        const int f16 = mode == 2;
        return db_cuda_round16(bias ? v + db_cuda_round16(bias[j], f16) : v, f16);
    }
    return bias ? v + bias[j] : v;
}

// The linear's epilogue over out (N, OC), in one pass:
//   v = out + bias                  (fp32; without a bias v = out: no + 0.0f, -0 stays -0)
//   v = round(out + round(bias))    (16-bit modes: the float32 sum of the product and
//                                    the rounded bias, rounded once; without a bias round(out))
//   out = v + res                   (db_linear_add_forward's residual, after the rounding)
// mode: 0 fp32, 1 bf16, 2 fp16.
// src: the product, out itself (float) or cublasLt's 16-bit sums with the
// bias in them already (then bias NULL: the rounding is the identity)
template <typename X>
__global__ static void linear_epilogue_kernel(float *out, const X *src, const float *bias, const float *res, size_t N,
                                              int OC, int mode)
{
    const size_t total = N * (size_t)OC;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const float v = epilogue1(db_cuda_f32(src[i]), bias, i % OC, mode);
        out[i] = res ? v + res[i] : v;
    }
}

// db_linear_geglu_forward's epilogue: proj (N, 2FF) gets the linear's
// epilogue (bias, rounding) and out (N, FF) = hidden * gelu(gate) of the
// finished row, one thread per (row, j): it reads and writes proj's two
// halves at j and writes out, so proj is read once.
// (src as linear_epilogue_kernel's: proj itself, or cublasLt's sums)
// out16 (N, FF) of the compute type: out rounded (its twin, cuda.h), or NULL
template <typename X>
__global__ static void linear_geglu_epilogue_kernel(float *proj, const X *src, float *out, void *out16,
                                                    const float *bias, size_t N, int FF, int mode)
{
    const size_t total = N * (size_t)FF;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / FF, j = i % FF;
        const X *q = src + r * 2 * FF;
        const float h = epilogue1(db_cuda_f32(q[j]), bias, j, mode);
        const float g = epilogue1(db_cuda_f32(q[FF + j]), bias, FF + j, mode);
        if (proj) { // (NULL: inference, not kept)
            float *p = proj + r * 2 * FF;
            p[j] = h;
            p[FF + j] = g;
        }
        const float o = h * db_cuda_gelu_erf1(g);
        out[i] = o;
        if (out16)
            db_cuda_store16(out16, i, o, mode == 2);
    }
}

// part (nchunk, OC) = per chunk of `rows` rows, the column sums of dout
// (N, OC) in double, rows in order.  grid (ceil(OC / 128), nchunk), block
// 128.  rows: db_cuda_part_rows (32 at SD's sizes: the H200 profile had 256
// leave this at 96 blocks for 8192 x 320, 16 us a launch).  r16: 0 as is,
// 1 / 2 each element rounded to bf16 / fp16 first (the 16-bit modes'
// rounded dout, without a rounded copy of it in memory).  X: float, or the
// compute type where the rounded copy is at hand anyway (half the bytes;
// its values round to themselves, so the same sums).  tickets
// (db_cuda_colsum_last; NULL: none): the last block of a column tile
// finishes the tile's columns of job jb (whose part is this part).
enum { COLSUM_BATCH = 8 };
// (colsum_part_kernel's column j, rows [r0, r0 + rows))
template <typename X>
__device__ static void colsum_part_col(double *part, const X *dout, int N, int OC, int rows, int r16, int j, int r0)
{
    const int r1 = r0 + rows < N ? r0 + rows : N;
    const X *col = dout + j;
    const int rnd = sizeof(X) == 4 ? r16 : 0; // (values of the compute type round to themselves)
    double s = 0;
    int r = r0;
    // eight loads in flight before their additions (one at a time left each
    // thread waiting out a load's latency per row: 12.7 us for 8192 x 320 on
    // the H200, call 4); the additions keep their order, so the same bits
    for (; r + COLSUM_BATCH <= r1; r += COLSUM_BATCH) {
        float v[COLSUM_BATCH];
#pragma unroll
        for (int k = 0; k < COLSUM_BATCH; k++)
            v[k] = db_cuda_f32(col[(size_t)(r + k) * OC]);
#pragma unroll
        for (int k = 0; k < COLSUM_BATCH; k++)
            s += rnd ? db_cuda_round16(v[k], rnd == 2) : v[k];
    }
    for (; r < r1; r++) {
        const float v = db_cuda_f32(col[(size_t)r * OC]);
        s += rnd ? db_cuda_round16(v, rnd == 2) : v;
    }
    part[(size_t)blockIdx.y * OC + j] = s;
}

template <typename X>
__global__ static void colsum_part_kernel(double *part, const X *dout, int N, int OC, int rows, int r16,
                                          unsigned *tickets, db_colsum_job jb)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x, r0 = blockIdx.y * rows;
    if (j < OC)
        colsum_part_col(part, dout, N, OC, rows, r16, j, r0);
    if (tickets && db_cuda_colsum_last(&tickets[blockIdx.x], gridDim.y)) {
        const int j0 = blockIdx.x * blockDim.x;
        db_cuda_colsum_finish(jb, j0, j0 + (int)blockDim.x < OC ? j0 + (int)blockDim.x : OC);
    }
}

// The 16-bit operands of one op: scratch from db_cuda_to16, freed together.
struct ops16 {
    void *p[3];
};
static void ops16_free(db_ctx *c, ops16 *o)
{
    for (int i = 0; i < 3; i++)
        db_cuda_free(c, o->p[i]);
}

// dst (n floats) = round(a product), or += when accumulate: gemm(t) stores
// the product in t, n values of the compute type (cuBLAS's store rounds),
// widened into dst by one pass
template <typename F> static int via16(db_ctx *c, float *dst, size_t n, int accumulate, F &&gemm)
{
    if (n == 0)
        return 0;
    void *t = db_cuda_alloc(c, n * 2);
    int r = t ? gemm(t) : -1;
    if (r == 0)
        r = db_cuda_from16(c, dst, t, n, accumulate);
    db_cuda_free(c, t);
    return r;
}

// 16-bit gemm_forward: Cm = round(alpha op(A') op(B') + beta Cm'), ' = rounded
// (beta 0: through a 16-bit C; else Cm, an input too, rounded in place first
// and the float32 C rounded after)
static int gemm_forward16(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                          int transa, int transb, float alpha, float beta)
{
    if (batch == 0 || M == 0 || N == 0)
        return 0;
    const size_t nc = (size_t)batch * M * N;
    ops16 o = {{db_cuda_to16(c, A, (size_t)batch * M * K), db_cuda_to16(c, B, (size_t)batch * K * N), NULL}};
    int r = o.p[0] && o.p[1] ? 0 : -1;
    auto gemm = [&](void *Cv, int c16) {
        return db_cuda_gemm16(c, batch, transa, transb, M, N, K, alpha, o.p[0], transa ? M : K, (long long)M * K,
                              o.p[1], transb ? K : N, (long long)K * N, beta, Cv, c16, N, (long long)M * N);
    };
    if (r == 0 && beta == 0.0f) // (beta 0 ignores Cm, NaN included)
        r = via16(c, Cm, nc, 0, [&](void *t) { return gemm(t, 1); });
    else if (r == 0) {
        r = db_cuda_round(c, Cm, Cm, nc, 0);
        if (r == 0)
            r = gemm(Cm, 0);
        if (r == 0)
            r = db_cuda_round(c, Cm, Cm, nc, 0);
    }
    ops16_free(c, &o);
    return r;
}

extern "C" int db_cuda_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N,
                                    int K, int transa, int transb, float alpha, float beta)
{
    DB_ENTER(c);
    if (db_cuda_prec16(c))
        return gemm_forward16(c, Cm, A, B, batch, M, N, K, transa, transb, alpha, beta);
    return db_cuda_sgemm(c, batch, transa, transb, M, N, K, alpha, A, transa ? M : K, (long long)M * K, B,
                         transb ? K : N, (long long)K * N, beta, Cm, N, (long long)M * N);
}

// ---- 16-bit linears with a bias through cublasLt -------------------------------------
// t16 (N, OC) = round(x16 @ w16^T + b16): cublasLt's bias epilogue
// (CUBLASLT_EPILOGUE_BIAS, D of the compute type) adds the bias -- in the
// compute type, i.e. the rounded bias the contract adds -- to the float32
// sums and rounds once, as linear_epilogue_kernel does after a float32
// product: 2 bytes an element stored where the float32 product was 4 and
// the epilogue's pass read them again.  A plan per (N, C, OC, precision):
// descriptors and the heuristic's first algorithm, asked once, outside any
// capture; ok 0 where cublasLt offers none, or DB_GEMM_LT=0 (the float32
// product and the epilogue kernel, as before).
struct db_cuda_lt_plan {
    int key[4];
    int ok;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
    db_cuda_lt_plan *next;
};
static const size_t LT_WS = (size_t)32 << 20; // cuBLAS's advice for Hopper

void db_cuda_lt_plans_free(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    for (db_cuda_lt_plan *p = st->lt_plans, *n; p; p = n) {
        n = p->next;
        if (p->op)
            cublasLtMatmulDescDestroy(p->op);
        if (p->a)
            cublasLtMatrixLayoutDestroy(p->a);
        if (p->b)
            cublasLtMatrixLayoutDestroy(p->b);
        if (p->d)
            cublasLtMatrixLayoutDestroy(p->d);
        free(p);
    }
    st->lt_plans = NULL;
    if (st->lt_ws)
        cudaFree(st->lt_ws);
    st->lt_ws = NULL;
    if (st->lt)
        cublasLtDestroy(st->lt);
    st->lt = NULL;
}

// the plan of shape (N, C, OC) in c's precision; NULL while capturing
// before one exists (or without host memory): the caller's other path
static db_cuda_lt_plan *lt_plan(db_ctx *c, int N, int C, int OC)
{
    db_cuda_state *st = db_cuda_st(c);
    const int key[4] = {N, C, OC, (int)c->precision};
    for (db_cuda_lt_plan *p = st->lt_plans; p; p = p->next)
        if (!memcmp(p->key, key, sizeof key))
            return p;
    db_cuda_lt_plan *p = st->capturing ? NULL : (db_cuda_lt_plan *)calloc(1, sizeof *p);
    if (!p)
        return NULL;
    memcpy(p->key, key, sizeof key);
    p->next = st->lt_plans;
    st->lt_plans = p;
    const char *off = getenv("DB_GEMM_LT");
    if (off && !strcmp(off, "0"))
        return p;
    if (!st->lt && cublasLtCreate(&st->lt) != CUBLAS_STATUS_SUCCESS)
        return st->lt = NULL, p;
    if (!st->lt_ws && cudaMalloc(&st->lt_ws, LT_WS) != cudaSuccess) {
        (void)cudaGetLastError();
        return st->lt_ws = NULL, p;
    }
    const cudaDataType_t t = c->precision == DB_PREC_F16 ? CUDA_R_16F : CUDA_R_16BF;
    const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const uint32_t align_w = 16; // a weight's place in its buffer's working copy: 32-byte aligned
    const size_t ws = LT_WS;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t h;
    int got = 0;
    // row-major through column-major (the file's note): D (OC, N) = W^T' X'
    // with W stored (C, OC) column-major, read transposed, X (C, N)
    const bool ok =
        cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof tr) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatrixLayoutCreate(&p->a, t, C, OC, C) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatrixLayoutCreate(&p->b, t, C, N, C) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatrixLayoutCreate(&p->d, t, OC, N, OC) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w,
                                             sizeof align_w) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoGetHeuristic(st->lt, p->op, p->a, p->b, p->d, p->d, pref, 1, &h, &got) ==
            CUBLAS_STATUS_SUCCESS &&
        got > 0 && h.state == CUBLAS_STATUS_SUCCESS;
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    if (ok)
        p->algo = h.algo, p->ok = 1;
    return p;
}

// t16 = round(x16 w16^T + b16) by plan p: 0; 1 when cublasLt refused it
// (p then off: the caller takes the other path, now and after); -1 on a
// failure.  The other operands come from the allocator (256-byte aligned);
// the bias, a working copy's place like the weight, is checked too.
static int lt_linear(db_ctx *c, db_cuda_lt_plan *p, void *t16, const void *x16, const void *w16, const void *b16)
{
    db_cuda_state *st = db_cuda_st(c);
    const float one = 1.0f, zero = 0.0f;
    if ((uintptr_t)w16 % 16 || (uintptr_t)x16 % 256 || (uintptr_t)t16 % 256 || (uintptr_t)b16 % 16 ||
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b16, sizeof b16) !=
            CUBLAS_STATUS_SUCCESS)
        return 1;
    const cublasStatus_t s = cublasLtMatmul(st->lt, p->op, &one, w16, p->a, x16, p->b, &zero, t16, p->d, t16, p->d,
                                            &p->algo, st->lt_ws, LT_WS, st->stream);
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE || s == CUBLAS_STATUS_ARCH_MISMATCH) {
        p->ok = 0;
        return 1;
    }
    return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "cublasLtMatmul: %s", cublasGetStatusString(s));
}

// ---- the linear's forward -------------------------------------------------------------

// Where a 16-bit linear's product went (linear_product16): in f32, float32
// -- rounded already (no bias), or the bare sums when bias_left (the
// epilogue adds the bias and rounds) -- or, bias added and rounded by
// cublasLt, in t16 (f32 NULL).  f32 is the caller's out, or where it gave
// none, own: scratch of the product's size.  keep16: without a bias, the
// compute-type product f32 was widened from (its exact 16-bit form, which
// linear_epilogue hands on as out's twin).  prod16_free frees t16, own and
// keep16.
struct prod16 {
    void *t16;
    float *f32, *own;
    int bias_left;
    void *keep16;
};

static void prod16_free(db_ctx *c, prod16 *pr)
{
    db_cuda_free(c, pr->t16); // stream-ordered: reused only by work queued after
    db_cuda_free(c, pr->own);
    db_cuda_free(c, pr->keep16);
    pr->t16 = NULL, pr->own = NULL, pr->keep16 = NULL;
}

// pr's float32 product's place: out, else scratch of n floats (pr->own)
static float *prod16_room(db_ctx *c, prod16 *pr, float *out, size_t n)
{
    if (!pr->f32)
        pr->f32 = out ? out : (pr->own = (float *)db_cuda_alloc(c, n * sizeof(float)));
    return pr->f32;
}

// out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C), in the 16-bit
// modes from the input's 16-bit copy x16.  Without a bias nothing joins the
// product before its one rounding, so cuBLAS stores it in the compute type
// and one pass widens it (via16: 8 bytes an element where the float32
// product and a rounding pass took 12) -- the epilogue's rounding is then
// the identity.  With one, cublasLt's bias epilogue where it can (above),
// else the float32 product of the rounded operands.  The same for the
// plain, residual and GEGLU forms, so each keeps its "exactly
// db_linear_forward then ..." bits.  out NULL (a caller that keeps no
// float32 product): scratch where one is made.
// Cv (N, OC) = x16 (N, C) @ w16^T, w16 stored (OC, C): the compute type
// when c16 (cuBLAS's store rounds), else float32 sums
static int product16(db_ctx *c, const void *x16, const void *w16, int N, int C, int OC, void *Cv, int c16)
{
    return db_cuda_gemm16(c, 1, 0, 1, N, OC, C, 1.0f, x16, C, 0, w16, C, 0, 0.0f, Cv, c16, OC, 0);
}

static int linear_product16(db_ctx *c, prod16 *pr, float *out, const void *x16, const float *weight,
                            const float *bias, int N, int C, int OC)
{
    *pr = prod16{};
    const size_t n = (size_t)N * OC;
    void *w16 = db_cuda_to16(c, weight, (size_t)OC * C);
    if (!w16)
        return -1;
    auto gemm = [&](void *Cv, int c16) { return product16(c, x16, w16, N, C, OC, Cv, c16); };
    int r = 1;
    if (!bias) { // via16, its 16-bit product kept
        void *t = prod16_room(c, pr, out, n) ? db_cuda_alloc(c, n * 2) : NULL;
        r = t ? gemm(t, 1) : -1;
        if (r == 0)
            r = db_cuda_from16(c, pr->f32, t, n, 0);
        if (r == 0)
            pr->keep16 = t;
        else
            db_cuda_free(c, t);
    } else if (db_cuda_lt_plan *p = lt_plan(c, N, C, OC); p && p->ok) {
        void *b16 = db_cuda_to16(c, bias, (size_t)OC);
        pr->t16 = b16 ? db_cuda_alloc(c, (size_t)N * OC * 2) : NULL;
        r = pr->t16 ? lt_linear(c, p, pr->t16, x16, w16, b16) : -1;
        db_cuda_free(c, b16);
        if (r != 0) {
            db_cuda_free(c, pr->t16);
            pr->t16 = NULL;
        }
    }
    if (r == 1) { // the float32 product: the epilogue adds the bias
        pr->bias_left = 1;
        r = prod16_room(c, pr, out, n) ? gemm(pr->f32, 0) : -1;
    }
    db_cuda_free(c, w16);
    if (r)
        prod16_free(c, pr);
    return r;
}

// The product, as above (fp32: the float32 product, bias_left when there
// is one); mode: the epilogue's, 0 fp32, 1 bf16, 2 fp16
static int linear_product(db_ctx *c, prod16 *pr, float *out, const float *inp, const float *weight,
                          const float *bias, int N, int C, int OC, int *mode)
{
    *mode = db_cuda_prec16(c) ? (c->precision == DB_PREC_F16 ? 2 : 1) : 0;
    if (!*mode) {
        *pr = prod16{};
        pr->bias_left = bias != NULL;
        if (!prod16_room(c, pr, out, (size_t)N * OC))
            return -1;
        const int r = db_cuda_sgemm(c, 1, 0, 1, N, OC, C, 1.0f, inp, C, 0, weight, C, 0, 0.0f, pr->f32, OC, 0);
        if (r)
            prod16_free(c, pr);
        return r;
    }
    void *x16 = db_cuda_to16(c, inp, (size_t)N * C);
    const int r = x16 ? linear_product16(c, pr, out, x16, weight, bias, N, C, OC) : -1;
    db_cuda_free(c, x16);
    return r;
}

// f(src) with the epilogue's source: the 16-bit sums t16 (cublasLt's, of
// the mode's type) or, without them, the float32 product in f32
template <class F> static void with_src(const float *f32, const void *t16, int mode, F f)
{
    if (!t16)
        f(f32);
    else if (mode == 2)
        f((const __half *)t16);
    else
        f((const __nv_bfloat16 *)t16);
}

// out = bias, rounding and residual over the product pr left (pr freed):
// nothing to do for a product in out with neither a bias left nor a
// residual.  Without a residual in a 16-bit mode, the product's 16-bit
// form where there is one -- cublasLt's rounded sums, or the bias-free
// product out was widened from -- is out's exact rounding: out's twin
// (cuda.h) for the op that reads out next (the cross-attention's q goes
// to the attention so, without a conversion).
static int linear_epilogue(db_ctx *c, prod16 *pr, float *out, const float *bias, const float *res, int N, int OC,
                           int mode)
{
    const float *b = pr->bias_left ? bias : NULL;
    if (pr->t16 || pr->f32 != out || b || res) {
        const unsigned grid = db_cuda_grid((size_t)N * OC, 256);
        cudaStream_t s = db_cuda_st(c)->stream;
        with_src(pr->f32, pr->t16, mode, [&](auto src) {
            linear_epilogue_kernel<<<grid, 256, 0, s>>>(out, src, b, res, (size_t)N, OC, mode);
        });
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) {
            prod16_free(c, pr);
            return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "linear epilogue: %s", cudaGetErrorString(e));
        }
    }
    void *twin = NULL; // (t16 holds the bias already: never with a bias left)
    if (!res && mode) {
        void **from = pr->keep16 ? &pr->keep16 : &pr->t16;
        twin = *from;
        *from = NULL;
    }
    prod16_free(c, pr);
    db_cuda_twin_put(c, out, (size_t)N * OC, twin);
    return 0;
}

extern "C" int db_cuda_linear_add_forward(db_ctx *c, float *out, const float *inp, const float *weight,
                                          const float *bias, const float *res, int N, int C, int OC)
{
    DB_ENTER(c);
    if (N == 0 || OC == 0)
        return 0;
    int mode;
    prod16 pr;
    if (linear_product(c, &pr, out, inp, weight, bias, N, C, OC, &mode) != 0)
        return -1;
    return linear_epilogue(c, &pr, out, bias, res, N, OC, mode);
}

extern "C" int db_cuda_linear_geglu_forward(db_ctx *c, float *proj, float *out, const float *inp, const float *weight,
                                            const float *bias, int N, int C, int FF)
{
    DB_ENTER(c);
    if (N == 0 || FF == 0)
        return 0;
    // proj NULL (inference): where the product is float32 (fp32, or a
    // 16-bit GEMM without cublasLt's bias epilogue) linear_product makes it
    // in scratch; with the epilogue's 16-bit sums the projection never
    // reaches memory in float32 (half the epilogue's traffic: it was
    // written only for the backward)
    int mode;
    prod16 pr;
    if (linear_product(c, &pr, proj, inp, weight, bias, N, C, 2 * FF, &mode))
        return -1;
    const float *b = pr.bias_left ? bias : NULL;
    const unsigned grid = db_cuda_grid((size_t)N * FF, 256);
    cudaStream_t s = db_cuda_st(c)->stream;
    // out goes to the feed-forward's second linear next: its 16-bit twin
    // (cuda.h) in the same pass (NULL in fp32)
    void *o16 = db_cuda_twin_alloc(c, (size_t)N * FF);
    if (c->err.code) {
        prod16_free(c, &pr);
        return -1;
    }
    with_src(pr.f32, pr.t16, mode, [&](auto src) {
        linear_geglu_epilogue_kernel<<<grid, 256, 0, s>>>(proj, src, out, o16, b, (size_t)N, FF, mode);
    });
    prod16_free(c, &pr);
    return db_cuda_twin_launched(c, out, (size_t)N * FF, o16, "linear_geglu epilogue");
}

extern "C" int db_cuda_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                                      int N, int C, int OC)
{
    return db_cuda_linear_add_forward(c, out, inp, weight, bias, NULL, N, C, OC);
}

// db_linear_multi_forward: the input's 16-bit copy made once for the n products
extern "C" int db_cuda_linear_multi_forward(db_ctx *c, float *const *out, const float *inp,
                                            const float *const *weight, const float *const *bias, int n, int N,
                                            int C, int OC)
{
    DB_ENTER(c);
    if (!db_cuda_prec16(c)) {
        for (int i = 0; i < n; i++)
            if (db_cuda_linear_add_forward(c, out[i], inp, weight[i], bias ? bias[i] : NULL, NULL, N, C, OC))
                return -1;
        return 0;
    }
    if (N == 0 || OC == 0)
        return 0;
    const int mode = c->precision == DB_PREC_F16 ? 2 : 1;
    void *x16 = db_cuda_to16(c, inp, (size_t)N * C);
    int r = x16 ? 0 : -1;
    int biased = 0;
    for (int i = 0; bias && i < n; i++)
        biased |= bias[i] != NULL;
    if (r == 0 && !biased) { // each product stored by cuBLAS in the compute type, all widened by one launch
        static_assert((int)DB_LINEAR_MULTI_MAX <= (int)DB_CUDA_TO16_MANY, "one db_cuda_from16_many call");
        const size_t ny = (size_t)N * OC;
        char *t = (char *)db_cuda_alloc(c, (size_t)n * ny * 2);
        r = t ? 0 : -1;
        for (int i = 0; i < n && r == 0; i++) {
            void *w16 = db_cuda_to16(c, weight[i], (size_t)OC * C);
            r = w16 ? product16(c, x16, w16, N, C, OC, t + i * ny * 2, 1) : -1;
            db_cuda_free(c, w16);
        }
        if (r == 0)
            r = db_cuda_from16_many(c, out, t, ny, n);
        db_cuda_free(c, t);
        db_cuda_free(c, x16);
        return r ? -1 : 0;
    }
    for (int i = 0; i < n && r == 0; i++) {
        const float *b = bias ? bias[i] : NULL;
        prod16 pr;
        r = linear_product16(c, &pr, out[i], x16, weight[i], b, N, C, OC);
        if (r == 0)
            r = linear_epilogue(c, &pr, out[i], b, NULL, N, OC, mode);
    }
    db_cuda_free(c, x16);
    return r;
}

// db_attention_qkv_forward: where the attention runs on tensor cores in a
// 16-bit mode (db_cuda_attention_forward's test), the three products are
// stored by cuBLAS in the compute type (as linear_multi's unbiased path) and
// handed to the attention kernel as they are: its conversion of q, k, v is
// the identity on them, so the same bits; q, k, v are widened from them (one
// launch) only when given.  Elsewhere the two ops.
extern "C" int db_cuda_attention_qkv_forward(db_ctx *c, float *q, float *k, float *v, float *out, float *lse,
                                             const float *x, const float *wq, const float *wk, const float *wv, int B,
                                             int T, int C, int NH, int causal)
{
    DB_ENTER(c);
    const int N = B * T, HS = C / NH;
    const size_t ny = (size_t)N * C;
    const float *const w[3] = {wq, wk, wv};
    if (!db_cuda_prec16(c) || HS % 8 != 0 || HS > 160 || B * NH > 65535 || N == 0) {
        float *t = q ? NULL : (float *)db_cuda_alloc(c, 3 * ny * sizeof(float));
        if (!q && !t && ny)
            return -1;
        float *const qkv[3] = {q ? q : t, q ? k : t + ny, q ? v : t + 2 * ny};
        int r = db_cuda_linear_multi_forward(c, qkv, x, w, NULL, 3, N, C, C);
        if (r == 0)
            r = db_cuda_attention_forward(c, out, lse, qkv[0], qkv[1], qkv[2], B, T, T, NH, HS, causal);
        db_cuda_free(c, t);
        return r ? -1 : 0;
    }
    // each product at a 256-byte boundary (the attention's 16-byte loads)
    const size_t sy = (ny * 2 + 255) / 256 * 256;
    void *x16 = db_cuda_to16(c, x, ny);
    char *t = x16 ? (char *)db_cuda_alloc(c, 3 * sy) : NULL;
    int r = t ? 0 : -1;
    for (int i = 0; i < 3 && r == 0; i++) {
        void *w16 = db_cuda_to16(c, w[i], (size_t)C * C);
        r = w16 ? product16(c, x16, w16, N, C, C, t + i * sy, 1) : -1;
        db_cuda_free(c, w16);
    }
    if (r == 0 && q) {
        const db_cuda_widen_job jobs[3] = {{q, t, ny, 1, 0, DB_PUT_SET},
                                           {k, t + sy, ny, 1, 0, DB_PUT_SET},
                                           {v, t + 2 * sy, ny, 1, 0, DB_PUT_SET}};
        r = db_cuda_widen(c, jobs, 3);
    }
    // out and its 16 bits (out's twin for the output projection next: cuda.h)
    if (r == 0)
        r = db_cuda_attention_tc_forward_twin(c, out, lse, t, t + sy, t + 2 * sy, (int)c->precision, B, T, T, NH, HS,
                                              causal);
    db_cuda_free(c, t); // (stream order keeps them alive for the kernels)
    db_cuda_free(c, x16);
    return r ? -1 : 0;
}

// ---- db_linear_fan_forward: few rows, many projections, one launch ------------------
// A warp per (projection, output feature): its lanes stride over the C
// products of every row (the input staged in shared memory as the op reads
// it: rounded in the 16-bit modes), a xor-shuffle tree sums each row's
// lanes (a fixed order: the same bits every call), and lane r writes row r
// with the linear's epilogue (+ the rounded bias, one rounding).  SD1.5's
// 22 ResBlock time projections (2 x 1280 in, 20160 features out) were 66
// launches of a few us; this reads their 16-bit weights (52 MB) once.
enum { FAN_ROWS = 8, FAN_WARPS = 8, FAN_SMEM = 48 << 10 };
struct fan_args {
    const void *w[DB_LINEAR_FAN_MAX]; // (OC_i, C): the compute type, or float32 (T)
    const float *b[DB_LINEAR_FAN_MAX];
    float *out[DB_LINEAR_FAN_MAX];
    int start[DB_LINEAR_FAN_MAX + 1]; // the first feature of each projection; start[n]: all of them
};

template <typename T>
__global__ static void __launch_bounds__(FAN_WARPS * 32)
    linear_fan_kernel(const fan_args a, const float *inp, int n, int N, int C, int r16)
{
    extern __shared__ float smem[]; // inp (N, C) as read
    for (int i = threadIdx.x; i < N * C; i += blockDim.x)
        smem[i] = r16 ? db_cuda_round16(inp[i], r16 == 2) : inp[i];
    __syncthreads();
    const int f = blockIdx.x * FAN_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (f >= a.start[n])
        return; // (a whole warp)
    int i = 0;
    while (a.start[i + 1] <= f)
        i++;
    const int o = f - a.start[i], OC = a.start[i + 1] - a.start[i];
    const T *wr = (const T *)a.w[i] + (size_t)o * C;
    float acc[FAN_ROWS];
#pragma unroll
    for (int r = 0; r < FAN_ROWS; r++)
        acc[r] = 0.0f;
    for (int k = lane; k < C; k += 32) {
        const float wk = db_cuda_f32(wr[k]);
#pragma unroll
        for (int r = 0; r < FAN_ROWS; r++)
            if (r < N)
                acc[r] = fmaf(wk, smem[r * C + k], acc[r]);
    }
    float mine = 0.0f; // lane r's row
#pragma unroll
    for (int r = 0; r < FAN_ROWS; r++) {
        float v = acc[r];
#pragma unroll
        for (int sh = 16; sh > 0; sh >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, sh);
        if (lane == r)
            mine = v;
    }
    if (lane < N) {
        const float *b = a.b[i];
        if (b)
            mine += r16 ? db_cuda_round16(b[o], r16 == 2) : b[o];
        a.out[i][(size_t)lane * OC + o] = r16 ? db_cuda_round16(mine, r16 == 2) : mine;
    }
}

extern "C" int db_cuda_linear_fan_forward(db_ctx *c, float *const *out, const float *inp, const float *const *weight,
                                          const float *const *bias, const int *OC, int n, int N, int C)
{
    DB_ENTER(c);
    const size_t smem = (size_t)N * C * sizeof(float);
    if (N > FAN_ROWS || smem > FAN_SMEM) { // many rows: n linears (each a GEMM worth its launch)
        for (int i = 0; i < n; i++)
            if (db_cuda_linear_add_forward(c, out[i], inp, weight[i], bias ? bias[i] : NULL, NULL, N, C, OC[i]))
                return -1;
        return 0;
    }
    const int p16 = db_cuda_prec16(c), r16 = !p16 ? 0 : c->precision == DB_PREC_F16 ? 2 : 1;
    fan_args a;
    memset(&a, 0, sizeof a);
    int r = 0;
    for (int i = 0; i < n; i++) {
        // the 16-bit modes read the weight's working copy (a lent pointer for
        // declared weights; else converted here, and freed below)
        a.w[i] = p16 ? db_cuda_to16(c, weight[i], (size_t)OC[i] * C) : (const void *)weight[i];
        if (!a.w[i])
            r = -1;
        a.b[i] = bias ? bias[i] : NULL;
        a.out[i] = out[i];
        a.start[i + 1] = a.start[i] + OC[i];
    }
    if (r == 0) {
        const unsigned grid = (unsigned)((a.start[n] + FAN_WARPS - 1) / FAN_WARPS);
        cudaStream_t st = db_cuda_st(c)->stream;
        if (!p16)
            linear_fan_kernel<float><<<grid, FAN_WARPS * 32, smem, st>>>(a, inp, n, N, C, 0);
        else if (r16 == 2)
            linear_fan_kernel<__half><<<grid, FAN_WARPS * 32, smem, st>>>(a, inp, n, N, C, r16);
        else
            linear_fan_kernel<__nv_bfloat16><<<grid, FAN_WARPS * 32, smem, st>>>(a, inp, n, N, C, r16);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "linear_fan_kernel: %s", cudaGetErrorString(e));
    }
    for (int i = 0; p16 && i < n; i++)
        db_cuda_free(c, (void *)a.w[i]);
    return r ? -1 : 0;
}

// gemm_backward.c's arrangement: each gradient is one product in its stored
// layout.  A and B are float32 (sgemm) or compute-type (p16) operands; Cm =
// the product, rounded when p16 (via16).
static int gemm_plain(db_ctx *c, int p16, float *Cm, const void *A, const void *B, int batch, int M, int N, int K,
                      int transa, int transb, float alpha)
{
    if (p16)
        return via16(c, Cm, (size_t)batch * M * N, 0, [&](void *t) {
            return db_cuda_gemm16(c, batch, transa, transb, M, N, K, alpha, A, transa ? M : K, (long long)M * K, B,
                                  transb ? K : N, (long long)K * N, 0.0f, t, 1, N, (long long)M * N);
        });
    return db_cuda_sgemm(c, batch, transa, transb, M, N, K, alpha, (const float *)A, transa ? M : K, (long long)M * K,
                         (const float *)B, transb ? K : N, (long long)K * N, 0.0f, Cm, N, (long long)M * N);
}

extern "C" int db_cuda_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B,
                                     int batch, int M, int N, int K, int transa, int transb, float alpha)
{
    DB_ENTER(c);
    const int p16 = db_cuda_prec16(c);
    const size_t na = (size_t)batch * M * K, nb = (size_t)batch * K * N;
    const void *a = A, *b = B, *dc = dCm;
    ops16 o = {{NULL, NULL, NULL}};
    if (p16) { // the operands each product needs, in the compute type
        if (!(o.p[0] = db_cuda_to16(c, dCm, (size_t)batch * M * N)) || (dA && !(o.p[1] = db_cuda_to16(c, B, nb))) ||
            (dB && !(o.p[2] = db_cuda_to16(c, A, na)))) {
            ops16_free(c, &o);
            return -1;
        }
        dc = o.p[0];
        b = o.p[1];
        a = o.p[2];
    }
    //   dA (M, K)  = alpha dCm @ op(B)^T        dA stored (K, M) = alpha op(B) @ dCm^T
    //   dB (K, N)  = alpha op(A)^T @ dCm        dB stored (N, K) = alpha dCm^T @ op(A)
    int r = 0;
    if (dA) {
        r = transa ? gemm_plain(c, p16, dA, b, dc, batch, K, M, N, transb, 1, alpha)
                   : gemm_plain(c, p16, dA, dc, b, batch, M, K, N, 0, !transb, alpha);
    }
    if (r == 0 && dB) {
        r = transb ? gemm_plain(c, p16, dB, dc, a, batch, N, K, M, 1, transa, alpha)
                   : gemm_plain(c, p16, dB, a, dc, batch, K, N, M, !transa, 0, alpha);
    }
    ops16_free(c, &o);
    return r ? -1 : 0;
}

// dst (OC) += column sums of dout (N, OC): two-stage, fixed order; r16 1 /
// 2: each dout element rounded to bf16 / fp16 as it is summed, and the
// float sum rounded so before it is added (the 16-bit modes' dbias).  X:
// float, or dout's copy in the compute type (r16 its type); put
// DB_PUT_FRESH: assigned (dst not read)
template <typename X> static int bias_grad(db_ctx *c, float *dst, const X *dout, int N, int OC, int r16, int put)
{
    const int rows = db_cuda_part_rows(N), nchunk = (N + rows - 1) / rows;
    double *part = (double *)db_cuda_alloc(c, sizeof(double) * (size_t)nchunk * OC);
    if (!part)
        return -1;
    dim3 grid((unsigned)((OC + 127) / 128), (unsigned)nchunk);
    unsigned *tk = grid.x <= DB_CUDA_TICKETS ? db_cuda_tickets(c) : NULL;
    const db_colsum_job jb{dst, part, nchunk, OC, r16, put};
    colsum_part_kernel<<<grid, 128, 0, db_cuda_st(c)->stream>>>(part, dout, N, OC, rows, r16, tk, jb);
    cudaError_t e = cudaGetLastError();
    int r = e != cudaSuccess ? -1 : db_cuda_colsum_done(c, tk, jb);
    db_cuda_free(c, part);
    DB_CU(c, e);
    return r;
}

// 16-bit backward of n linears of one input (n 1: linear_backward):
//   dinp = round(dout_0' W_0') (+= when dinp_acc), then += round(dout_i' W_i')
//   dweight_i += round(dout_i'^T x'), dbias_i += round(sum of dout_i' rows)
// (' = rounded; parameter gradients assigned when assign: ops.h).  One
// launch makes the 16-bit copies of inp, the douts and any weight that is
// not a shadow; the products go into one scratch, and one launch widens
// them all (dinp's n products summed in order): the same bits as a
// conversion and a widening per operand and product.
static int linear_backward16(db_ctx *c, float *dinp, int dinp_acc, float *const *dweight, float *const *dbias,
                             const float *const *dout, const float *inp, const float *const *weight, int n, int N,
                             int C, int OC, int assign)
{
    static_assert(1 + 2 * (int)DB_LINEAR_MULTI_MAX <= (int)DB_CUDA_TO16_MANY, "one db_cuda_to16_many call");
    static_assert(1 + (int)DB_LINEAR_MULTI_MAX <= (int)DB_CUDA_TO16_MANY, "one db_cuda_widen call");
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C;
    const int put = db_cuda_put_param(assign);
    int needx = 0;
    for (int i = 0; i < n; i++)
        needx |= dweight[i] && nw > 0;
    // 16-bit operands: [0] inp, [1 + i] dout_i, [1 + n + i] weight_i (lent when a shadow)
    void *op[1 + 2 * DB_LINEAR_MULTI_MAX];
    const float *src[1 + 2 * DB_LINEAR_MULTI_MAX] = {inp};
    size_t cnt[1 + 2 * DB_LINEAR_MULTI_MAX] = {needx && N > 0 ? nx : 0};
    for (int i = 0; i < n; i++) {
        src[1 + i] = dout[i], cnt[1 + i] = (size_t)N * OC;
        src[1 + n + i] = weight[i], cnt[1 + n + i] = dinp && nx ? nw : 0;
    }
    if (db_cuda_to16_many(c, op, src, cnt, 1 + 2 * n) != 0)
        return -1;
    // the products' scratch: dinp's n (at a stride of whole 16-byte lines), then each dweight_i
    const size_t sx = (nx + 7) / 8 * 8, sw = (nw + 7) / 8 * 8;
    // (DB_ASSIGN_PACK16: each dweight_i is its GEMM's 16-bit output, in its
    // own slot: no room here and no widening)
    const int pack = assign == DB_ASSIGN_PACK16;
    size_t room = dinp ? n * sx : 0;
    for (int i = 0; i < n; i++)
        room += dweight[i] && !pack ? sw : 0;
    char *t = room ? (char *)db_cuda_alloc(c, room * 2) : NULL;
    int r = room && !t ? -1 : 0;
    db_cuda_widen_job job[1 + DB_LINEAR_MULTI_MAX];
    int nj = 0;
    if (r == 0 && dinp && nx) { // dinp (N, C) = sum of dout_i (N, OC) @ weight_i (OC, C)
        for (int i = 0; i < n && r == 0; i++)
            r = db_cuda_gemm16(c, 1, 0, 0, N, C, OC, 1.0f, op[1 + i], OC, 0, op[1 + n + i], C, 0, 0.0f,
                               t + i * sx * 2, 1, C, 0);
        job[nj++] = db_cuda_widen_job{dinp, t, nx, n, sx, dinp_acc ? DB_PUT_ADD : DB_PUT_SET};
    }
    size_t at = dinp ? n * sx : 0;
    for (int i = 0; i < n && r == 0; i++) { // the contributions dout_i^T @ inp, rounded, added
        if (!dweight[i] || nw == 0)
            continue;
        void *dst = pack ? (void *)dweight[i] : (void *)(t + at * 2);
        r = db_cuda_gemm16(c, 1, 1, 0, OC, C, N, 1.0f, op[1 + i], OC, 0, op[0], C, 0, 0.0f, dst, 1, C, 0);
        if (pack)
            continue;
        job[nj++] = db_cuda_widen_job{dweight[i], t + at * 2, nw, 1, 0, put};
        at += sw;
    }
    if (r == 0 && nj)
        r = db_cuda_widen(c, job, nj);
    // float32 sum of the rounded dout (its 16-bit copy above), rounded, added
    for (int i = 0; i < n && r == 0; i++) {
        if (!dbias[i] || N == 0 || OC == 0)
            continue;
        r = c->precision == DB_PREC_F16 ? bias_grad(c, dbias[i], (const __half *)op[1 + i], N, OC, 2, put)
                                        : bias_grad(c, dbias[i], (const __nv_bfloat16 *)op[1 + i], N, OC, 1, put);
    }
    // one product widened into dinp: its 16-bit form, at t's start, is
    // dinp's exact rounding -- dinp's twin (cuda.h) for the op that reads
    // it next (the output projection's into the attention backward)
    if (r == 0 && n == 1 && dinp && nx && !dinp_acc) {
        db_cuda_twin_put(c, dinp, nx, t);
        t = NULL;
    }
    db_cuda_free(c, t);
    for (int i = 0; i < 1 + 2 * n; i++)
        db_cuda_free(c, op[i]);
    return r ? -1 : 0;
}

extern "C" int db_cuda_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                       const float *inp, const float *weight, int N, int C, int OC, int assign)
{
    DB_ENTER(c);
    if (db_cuda_prec16(c))
        return linear_backward16(c, dinp, 0, &dweight, &dbias, &dout, inp, &weight, 1, N, C, OC, assign);
    // dinp (N, C) = dout (N, OC) @ weight (OC, C)
    if (dinp && db_cuda_sgemm(c, 1, 0, 0, N, C, OC, 1.0f, dout, OC, 0, weight, C, 0, 0.0f, dinp, C, 0) != 0)
        return -1;
    // dweight (OC, C) += dout^T (OC, N) @ inp (N, C); fp32 assign: the reset,
    // then as += (beta 0 would keep a -0 that the add makes +0)
    if (assign && dweight && db_cuda_zero_f32(c, dweight, (size_t)OC * C) != 0)
        return -1;
    if (dweight && db_cuda_sgemm(c, 1, 1, 0, OC, C, N, 1.0f, dout, OC, 0, inp, C, 0, 1.0f, dweight, C, 0) != 0)
        return -1;
    if (dbias && N > 0 && OC > 0)
        return bias_grad(c, dbias, dout, N, OC, 0, db_cuda_put_param(assign));
    return 0;
}

// db_linear_multi_backward.  16-bit: linear_backward16 above, the n linears
// at once: each d_i widened straight into dinp (+= after the first), which
// is the float32 addition db_add_forward makes.  fp32: d_i through a
// scratch and the adds, as the definition.
extern "C" int db_cuda_linear_multi_backward(db_ctx *c, float *dinp, float *const *dweight, float *const *dbias,
                                             const float *const *dout, const float *inp, const float *const *weight,
                                             int n, int N, int C, int OC, int accumulate, int assign)
{
    DB_ENTER(c);
    const size_t nx = (size_t)N * C;
    if (db_cuda_prec16(c)) {
        float *none[DB_LINEAR_MULTI_MAX] = {NULL};
        const float *nowt[DB_LINEAR_MULTI_MAX] = {NULL};
        return linear_backward16(c, dinp, accumulate, dweight ? dweight : none, dbias ? dbias : none, dout, inp,
                                 weight ? weight : nowt, n, N, C, OC, assign);
    }
    float *d = dinp && (accumulate || n > 1) && nx ? (float *)db_cuda_alloc(c, nx * sizeof(float)) : NULL;
    int r = dinp && (accumulate || n > 1) && nx && !d ? -1 : 0;
    for (int i = 0; i < n && r == 0; i++) {
        float *di = !dinp ? NULL : i == 0 && !accumulate ? dinp : d;
        r = db_cuda_linear_backward(c, di, dweight ? dweight[i] : NULL, dbias ? dbias[i] : NULL, dout[i], inp,
                                    weight ? weight[i] : NULL, N, C, OC, assign);
        if (r == 0 && di && di == d)
            r = db_cuda_add_forward(c, dinp, dinp, d, nx);
    }
    db_cuda_free(c, d);
    return r;
}
