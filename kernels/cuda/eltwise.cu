// Activations, elementwise arithmetic, layout ops and embeddings, forward and
// backward: the twins of kernels/cpu/eltwise.c and eltwise_backward.c, with
// the same formulas (and the full-precision expf / erff / tanhf / sinf: the
// library is built without --use_fast_math).  Memory-bound grid-stride loops;
// every output element is written by one thread, so all of it is
// deterministic, including the embedding gradient (see there).
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/reduce.h"
#include "kernels/ddim_step.h"

enum { THREADS = 256 };

#define GRID_STRIDE(i, n)                                                                                              \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

typedef enum { ACT_SILU, ACT_GELU_ERF, ACT_GELU_TANH, ACT_QUICK_GELU } act_kind;

__device__ __forceinline__ float gelu_erf1(float x) { return db_cuda_gelu_erf1(x); }

__device__ __forceinline__ float act1(act_kind kind, float x)
{
    switch (kind) {
    case ACT_SILU:
        return x / (1.0f + expf(-x));
    case ACT_GELU_ERF:
        return gelu_erf1(x);
    case ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_QUICK_GELU:
        return x / (1.0f + expf(-1.702f * x));
    }
    return x;
}

__device__ __forceinline__ float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float gelu_erf_grad1(float x)
{
    // 0.5 (1 + erf(x / sqrt 2)) + x phi(x)
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

__device__ __forceinline__ float act_grad1(act_kind kind, float x)
{
    switch (kind) {
    case ACT_SILU: {
        const float s = sigmoid1(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case ACT_GELU_ERF:
        return gelu_erf_grad1(x);
    case ACT_GELU_TANH: {
        const float k = 0.7978845608028654f, x2 = x * x;
        const float t = tanhf(k * (x + 0.044715f * x2 * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x2);
    }
    case ACT_QUICK_GELU: {
        const float s = sigmoid1(1.702f * x);
        return s + 1.702f * x * s * (1.0f - s);
    }
    }
    return 1.0f;
}

// out, inp (N); out may equal inp
__global__ static void act_kernel(act_kind kind, float *out, const float *inp, size_t N)
{
    GRID_STRIDE(i, N) out[i] = act1(kind, inp[i]);
}

// dinp, dout, inp (N); dinp may equal dout
__global__ static void act_backward_kernel(act_kind kind, float *dinp, const float *dout, const float *inp, size_t N)
{
    GRID_STRIDE(i, N) dinp[i] = dout[i] * act_grad1(kind, inp[i]);
}

static int activation(db_ctx *c, act_kind kind, float *out, const float *inp, size_t N)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    act_kernel<<<db_cuda_grid(N, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(kind, out, inp, N);
    DB_LAUNCHED(c);
    return 0;
}

static int activation_backward(db_ctx *c, act_kind kind, float *dinp, const float *dout, const float *inp, size_t N)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    act_backward_kernel<<<db_cuda_grid(N, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(kind, dinp, dout, inp, N);
    DB_LAUNCHED(c);
    return 0;
}

extern "C" int db_cuda_silu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    return activation(c, ACT_SILU, out, inp, N);
}

extern "C" int db_cuda_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind)
{
    return activation(c, kind == DB_GELU_TANH ? ACT_GELU_TANH : ACT_GELU_ERF, out, inp, N);
}

extern "C" int db_cuda_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    return activation(c, ACT_QUICK_GELU, out, inp, N);
}

extern "C" int db_cuda_silu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    return activation_backward(c, ACT_SILU, dinp, dout, inp, N);
}

extern "C" int db_cuda_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N,
                                     db_gelu_kind kind)
{
    return activation_backward(c, kind == DB_GELU_TANH ? ACT_GELU_TANH : ACT_GELU_ERF, dinp, dout, inp, N);
}

extern "C" int db_cuda_quick_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    return activation_backward(c, ACT_QUICK_GELU, dinp, dout, inp, N);
}

// out (N, C); inp (N, 2C) = [hidden | gate] per row
__global__ static void geglu_kernel(float *out, const float *inp, int N, int C)
{
    GRID_STRIDE(i, (size_t)N * C)
    {
        const size_t r = i / C, j = i % C;
        const float *h = inp + r * 2 * C;
        out[i] = h[j] * gelu_erf1(h[C + j]);
    }
}

// dinp (N, 2C); dout (N, C); inp (N, 2C); dinp16 (N, 2C) of the compute
// type (f16: fp16, else bf16): dinp rounded (its twin, cuda.h), or NULL
__global__ static void geglu_backward_kernel(float *dinp, void *dinp16, int f16, const float *dout, const float *inp,
                                             int N, int C)
{
    GRID_STRIDE(i, (size_t)N * C)
    {
        const size_t r = i / C, j = i % C;
        const float h = inp[r * 2 * C + j], g = inp[r * 2 * C + C + j], d = dout[i];
        const float dh = d * 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)), dg = d * h * gelu_erf_grad1(g);
        dinp[r * 2 * C + j] = dh;
        dinp[r * 2 * C + C + j] = dg;
        if (dinp16) {
            db_cuda_store16(dinp16, r * 2 * C + j, dh, f16);
            db_cuda_store16(dinp16, r * 2 * C + C + j, dg, f16);
        }
    }
}

extern "C" int db_cuda_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    DB_ENTER(c);
    if ((size_t)N * C == 0)
        return 0;
    geglu_kernel<<<db_cuda_grid((size_t)N * C, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(out, inp, N, C);
    DB_LAUNCHED(c);
    return 0;
}

extern "C" int db_cuda_geglu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C)
{
    DB_ENTER(c);
    if ((size_t)N * C == 0)
        return 0;
    // dinp goes to the feed-forward's first linear's backward next: its
    // 16-bit twin (cuda.h) in the same pass
    const size_t n = (size_t)N * 2 * C;
    void *d16 = db_cuda_twin_alloc(c, n);
    if (c->err.code)
        return -1;
    geglu_backward_kernel<<<db_cuda_grid((size_t)N * C, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(
        dinp, d16, c->precision == DB_PREC_F16, dout, inp, N, C);
    return db_cuda_twin_launched(c, dinp, n, d16, "geglu_backward kernel");
}

// ---- arithmetic ---------------------------------------------------------------------

// out = alpha a + beta b (b unused when beta == 0), or a * b when mul; (N) each.
// Explicit _rn intrinsics: no fused multiply-add, the CPU's rounding exactly.
__global__ static void binary_kernel(int mul, float *out, const float *a, const float *b, float alpha, float beta,
                                     size_t N)
{
    if (mul) {
        GRID_STRIDE(i, N) out[i] = __fmul_rn(a[i], b[i]);
    } else if (beta == 0.0f) {
        GRID_STRIDE(i, N) out[i] = __fmul_rn(alpha, a[i]);
    } else {
        GRID_STRIDE(i, N) out[i] = __fadd_rn(__fmul_rn(alpha, a[i]), __fmul_rn(beta, b[i]));
    }
}

static int binary(db_ctx *c, int mul, float *out, const float *a, const float *b, float alpha, float beta, size_t N)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    binary_kernel<<<db_cuda_grid(N, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(mul, out, a, b, alpha, beta, N);
    DB_LAUNCHED(c);
    return 0;
}

extern "C" int db_cuda_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    return binary(c, 0, out, a, b, 1.0f, 1.0f, N);
}

extern "C" int db_cuda_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    return binary(c, 1, out, a, b, 1.0f, 1.0f, N);
}

extern "C" int db_cuda_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta,
                                     size_t N)
{
    return binary(c, 0, out, x, y, alpha, beta, N);
}

// One DDIM step (ops.h db_ddim_step_forward): kernels/ddim_step.h's
// element, the scheduler's host loop's operations, so the same bits
__global__ static void ddim_step_kernel(float *x, float *px0, const float *mo, const float *noise, size_t N,
                                        const db_ddim_coef k)
{
    GRID_STRIDE(i, N)
    {
        float x0;
        x[i] = db_ddim_elem(&k, x[i], mo[i], k.noise_on ? noise[i] : 0.0f, &x0);
        if (px0)
            px0[i] = x0;
    }
}

extern "C" int db_cuda_ddim_step_forward(db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise,
                                         size_t N, const db_ddim_coef *k)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    ddim_step_kernel<<<db_cuda_grid(N, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(x, pred_x0, mo, noise, N, *k);
    DB_LAUNCHED(c);
    return 0;
}

// da = dout * b, db = dout * a (either NULL); all (N); outputs may alias inputs
__global__ static void mul_backward_kernel(float *da, float *db, const float *dout, const float *a, const float *b,
                                           size_t N)
{
    GRID_STRIDE(i, N)
    {
        const float d = dout[i], ai = a[i], bi = b[i]; // read all first: outputs may alias
        if (da)
            da[i] = d * bi;
        if (db)
            db[i] = d * ai;
    }
}

extern "C" int db_cuda_mul_backward(db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b,
                                    size_t N)
{
    DB_ENTER(c);
    if (N == 0 || (!da && !db))
        return 0;
    mul_backward_kernel<<<db_cuda_grid(N, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(da, db, dout, a, b, N);
    DB_LAUNCHED(c);
    return 0;
}

// out, inp (B, C, HW); vec (B, C)
__global__ static void add_channel_kernel(float *out, const float *inp, const float *vec, size_t BC, int HW)
{
    GRID_STRIDE(i, BC * HW) out[i] = inp[i] + vec[i / HW];
}

extern "C" int db_cuda_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C,
                                           int HW)
{
    DB_ENTER(c);
    const size_t n = (size_t)B * C * HW;
    if (n == 0)
        return 0;
    add_channel_kernel<<<db_cuda_grid(n, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(out, inp, vec, (size_t)B * C,
                                                                                        HW);
    DB_LAUNCHED(c);
    return 0;
}

// grid B*C, block THREADS.  dvec (B, C) = sum over HW of dout (B, C, HW), in double
__global__ static void add_channel_backward_kernel(float *dvec, const float *dout, int HW)
{
    __shared__ double sh[32];
    const float *d = dout + (size_t)blockIdx.x * HW;
    double s = 0;
    for (int i = threadIdx.x; i < HW; i += blockDim.x)
        s += d[i];
    s = db_block_sum(s, sh);
    if (threadIdx.x == 0)
        dvec[blockIdx.x] = (float)s;
}

extern "C" int db_cuda_add_channel_backward(db_ctx *c, float *dvec, const float *dout, int B, int C, int HW)
{
    DB_ENTER(c);
    if (B * C == 0)
        return 0;
    add_channel_backward_kernel<<<B * C, THREADS, 0, db_cuda_st(c)->stream>>>(dvec, dout, HW);
    DB_LAUNCHED(c);
    return 0;
}

// ---- layout -------------------------------------------------------------------------

// out (B, C1+C2, HW); a (B, C1, HW); b (B, C2, HW)
__global__ static void concat_kernel(float *out, const float *a, const float *b, int B, size_t na, size_t nb)
{
    GRID_STRIDE(i, (size_t)B * (na + nb))
    {
        const size_t bi = i / (na + nb), k = i % (na + nb);
        out[i] = k < na ? a[bi * na + k] : b[bi * nb + k - na];
    }
}

// da (B, C1, HW), db (B, C2, HW) (either NULL); dout (B, C1+C2, HW)
__global__ static void concat_backward_kernel(float *da, float *db, const float *dout, int B, size_t na, size_t nb)
{
    GRID_STRIDE(i, (size_t)B * (na + nb))
    {
        const size_t bi = i / (na + nb), k = i % (na + nb);
        if (k < na) {
            if (da)
                da[bi * na + k] = dout[i];
        } else if (db) {
            db[bi * nb + k - na] = dout[i];
        }
    }
}

extern "C" int db_cuda_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1,
                                               int C2, int HW)
{
    DB_ENTER(c);
    const size_t na = (size_t)C1 * HW, nb = (size_t)C2 * HW;
    if (B == 0 || na + nb == 0)
        return 0;
    concat_kernel<<<db_cuda_grid((size_t)B * (na + nb), THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(out, a, b, B, na,
                                                                                                       nb);
    DB_LAUNCHED(c);
    return 0;
}

extern "C" int db_cuda_concat_channels_backward(db_ctx *c, float *da, float *db, const float *dout, int B, int C1,
                                                int C2, int HW)
{
    DB_ENTER(c);
    const size_t na = (size_t)C1 * HW, nb = (size_t)C2 * HW;
    if (B == 0 || na + nb == 0 || (!da && !db))
        return 0;
    concat_backward_kernel<<<db_cuda_grid((size_t)B * (na + nb), THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(
        da, db, dout, B, na, nb);
    DB_LAUNCHED(c);
    return 0;
}

// grid (ceil(N/32), ceil(M/32), B), block (32, 8).  out (B, N, M); inp (B, M, N);
// res (B, N, M) added as each element is written, or NULL; out16 (B, N,
// M) of the compute type (f16: fp16, else bf16), out rounded, or NULL.
// A 32x33 shared tile: reads and writes both coalesced, no bank conflicts.
__global__ static void transpose_kernel(float *out, void *out16, int f16, const float *inp, const float *res, int M,
                                        int N)
{
    __shared__ float tile[32][33];
    const size_t base = (size_t)blockIdx.z * M * N;
    const int j = blockIdx.x * 32 + threadIdx.x; // column of inp
    for (int k = threadIdx.y; k < 32; k += 8) {
        const int i = blockIdx.y * 32 + k; // row of inp
        if (i < M && j < N)
            tile[k][threadIdx.x] = inp[base + (size_t)i * N + j];
    }
    __syncthreads();
    const int i = blockIdx.y * 32 + threadIdx.x; // column of out
    for (int k = threadIdx.y; k < 32; k += 8) {
        const int jj = blockIdx.x * 32 + k; // row of out
        if (jj < N && i < M) {
            const size_t o = base + (size_t)jj * M + i;
            const float v = res ? tile[threadIdx.x][k] + res[o] : tile[threadIdx.x][k];
            out[o] = v;
            if (out16)
                db_cuda_store16(out16, o, v, f16);
        }
    }
}

extern "C" int db_cuda_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N)
{
    return db_cuda_transpose_add_forward(c, out, inp, NULL, B, M, N);
}

extern "C" int db_cuda_transpose_add_forward(db_ctx *c, float *out, const float *inp, const float *res, int B, int M,
                                             int N)
{
    DB_ENTER(c);
    if ((size_t)B * M * N == 0)
        return 0;
    if (B > 65535)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "transpose: batch %d over 65535", B);
    // the plain transpose's output (the transformer's tokens) goes to a
    // linear next: its 16-bit twin (cuda.h) in the same pass
    const size_t n = (size_t)B * M * N;
    void *o16 = res ? NULL : db_cuda_twin_alloc(c, n);
    if (c->err.code)
        return -1;
    dim3 grid((unsigned)((N + 31) / 32), (unsigned)((M + 31) / 32), (unsigned)B), block(32, 8);
    transpose_kernel<<<grid, block, 0, db_cuda_st(c)->stream>>>(out, o16, c->precision == DB_PREC_F16, inp, res, M,
                                                                  N);
    return db_cuda_twin_launched(c, out, n, o16, "transpose kernel");
}

// out (B, C, 2H, 2W); inp (B, C, H, W): one thread per output element
__global__ static void upsample_kernel(float *out, const float *inp, size_t BC, int H, int W)
{
    const int W2 = 2 * W, H2 = 2 * H;
    GRID_STRIDE(i, BC * H2 * W2)
    {
        const size_t bc = i / ((size_t)H2 * W2);
        const int y = (int)(i / W2 % H2), x = (int)(i % W2);
        out[i] = inp[(bc * H + y / 2) * W + x / 2];
    }
}

// dinp (B, C, H, W) = sum of each 2x2 block of dout (B, C, 2H, 2W), as the CPU
// pairs them: (top-left + top-right) + (bottom-left + bottom-right)
__global__ static void upsample_backward_kernel(float *dinp, const float *dout, size_t BC, int H, int W)
{
    GRID_STRIDE(i, BC * H * W)
    {
        const size_t r = i / W; // (bc, y) input row
        const int x = (int)(i % W);
        const float *y0 = dout + r * 4 * W, *y1 = y0 + 2 * W;
        dinp[i] = (y0[2 * x] + y0[2 * x + 1]) + (y1[2 * x] + y1[2 * x + 1]);
    }
}

extern "C" int db_cuda_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W)
{
    DB_ENTER(c);
    const size_t n = (size_t)B * C * 4 * H * W;
    if (n == 0)
        return 0;
    upsample_kernel<<<db_cuda_grid(n, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(out, inp, (size_t)B * C, H, W);
    DB_LAUNCHED(c);
    return 0;
}

extern "C" int db_cuda_upsample_nearest2x_backward(db_ctx *c, float *dinp, const float *dout, int B, int C, int H,
                                                   int W)
{
    DB_ENTER(c);
    const size_t n = (size_t)B * C * H * W;
    if (n == 0)
        return 0;
    upsample_backward_kernel<<<db_cuda_grid(n, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(dinp, dout, (size_t)B * C,
                                                                                              H, W);
    DB_LAUNCHED(c);
    return 0;
}

// ---- embeddings -------------------------------------------------------------------

// out (B, D); timesteps (B); freq (half): the frequencies, computed on the host
// with the C library's expf exactly as the CPU does (a 1-ulp difference in a
// frequency near 1 moves sin(1000 f) by 1e-4, beyond the parity tolerance).
__global__ static void timestep_kernel(float *out, const float *timesteps, const float *freq, int B, int D, int flip)
{
    const int half = D / 2;
    GRID_STRIDE(k, (size_t)B * D)
    {
        const int b = (int)(k / D), i = (int)(k % D);
        float v = 0.0f; // an odd D's last column
        if (i < 2 * half) {
            const int f = i < half ? i : i - half;
            const float arg = timesteps[b] * freq[f];
            const int want_cos = (i < half) == (flip != 0);
            v = want_cos ? cosf(arg) : sinf(arg);
        }
        out[k] = v;
    }
}

extern "C" int db_cuda_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D,
                                                  int flip_sin_to_cos, float shift, float max_period)
{
    DB_ENTER(c);
    if ((size_t)B * D == 0)
        return 0;
    const int half = D / 2;
    db_cuda_state *st = db_cuda_st(c);
    if (half > 0 && !(st->tfreq && st->tfreq_half == half && st->tfreq_shift == shift && st->tfreq_maxp == max_period)) {
        // a new table: never inside a capture (see tfreq in cuda.h); the
        // caller runs the op directly first (kernels/ops.h), or runs it
        // without a graph when this fails the capture
        if (st->capturing)
            return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                                "timestep embedding: first call for this table inside a graph capture");
        float *host = (float *)malloc(sizeof(float) * (size_t)half);
        if (!host)
            return db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "timestep embedding: out of host memory");
        // eltwise.c's float32 steps, on the host: the same expf
        const float neg_log = (float)-log((double)max_period);
        const float denom = (float)((double)half - (double)shift);
        for (int i = 0; i < half; i++)
            host[i] = expf((neg_log * (float)i) / denom);
        if (st->tfreq && st->tfreq_half < half) {
            cudaStreamSynchronize(st->stream); // the old table may still be read by queued kernels
            cudaFree(st->tfreq);
            st->tfreq = NULL;
        }
        cudaError_t e = st->tfreq ? cudaSuccess : cudaMalloc((void **)&st->tfreq, sizeof(float) * (size_t)half);
        // queued kernels may read the old values: the copy waits its turn
        if (e == cudaSuccess)
            e = cudaMemcpyAsync(st->tfreq, host, sizeof(float) * (size_t)half, cudaMemcpyHostToDevice, st->stream);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(st->stream); // host may go now
        free(host);
        if (e != cudaSuccess) {
            st->tfreq_half = 0;
            DB_CU(c, e);
        }
        st->tfreq_half = half, st->tfreq_shift = shift, st->tfreq_maxp = max_period;
    }
    timestep_kernel<<<db_cuda_grid((size_t)B * D, THREADS), THREADS, 0, st->stream>>>(out, timesteps, st->tfreq, B, D,
                                                                                      flip_sin_to_cos);
    DB_LAUNCHED(c);
    return 0;
}

// *bad = the smallest position whose token is outside [0, V) (INT_MAX: none).
// atomicMin gives the same answer whatever the order.
__global__ static void check_tokens_kernel(int *bad, const int32_t *tokens, int n, int V)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && (tokens[i] < 0 || tokens[i] >= V))
        atomicMin(bad, i);
}

// Validates tokens (B*T) on the device; the one sync is the price of the
// CPU's error contract (an id outside [0, V) is an error, not a wild read).
static int check_tokens(db_ctx *c, const char *op, const int32_t *tokens, int n, int V)
{
    db_cuda_state *st = db_cuda_st(c);
    const int none = INT_MAX;
    DB_CU(c, cudaMemcpyAsync(st->flag, &none, sizeof none, cudaMemcpyHostToDevice, st->stream));
    check_tokens_kernel<<<(n + 255) / 256, 256, 0, st->stream>>>(st->flag, tokens, n, V);
    DB_LAUNCHED(c);
    int at = INT_MAX;
    DB_CU(c, cudaMemcpyAsync(&at, st->flag, sizeof at, cudaMemcpyDeviceToHost, st->stream));
    DB_CU(c, cudaStreamSynchronize(st->stream));
    if (at == INT_MAX)
        return 0;
    int32_t id = 0;
    DB_CU(c, cudaMemcpy(&id, tokens + at, sizeof id, cudaMemcpyDeviceToHost));
    return db_cuda_fail(c, DB_EFORMAT, __FILE__, __LINE__, "%s: token id %d at position %d is outside [0, %d)", op,
                        (int)id, at, V);
}

// out (B, T, C); tokens (B, T); wte (V, C); wpe (maxT, C) or NULL
__global__ static void embedding_kernel(float *out, const int32_t *tokens, const float *wte, const float *wpe, int T,
                                        int C, size_t n)
{
    GRID_STRIDE(k, n)
    {
        const size_t i = k / C; // token position b*T + t
        const int j = (int)(k % C);
        const float e = wte[(size_t)tokens[i] * C + j];
        out[k] = wpe ? e + wpe[(i % T) * C + j] : e;
    }
}

extern "C" int db_cuda_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte,
                                         const float *wpe, int B, int T, int C, int V)
{
    DB_ENTER(c);
    const size_t n = (size_t)B * T * C;
    if (n == 0)
        return 0;
    if (check_tokens(c, "embedding", tokens, B * T, V) != 0)
        return -1;
    embedding_kernel<<<db_cuda_grid(n, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(out, tokens, wte, wpe, T, C, n);
    DB_LAUNCHED(c);
    return 0;
}

// Deterministic dwte (V, C) += without atomics: grid (BT, ceil(C / THREADS)).
// Block i works only if position i is its token's first occurrence; then each
// thread owns one column of that wte row and adds dout (BT, C) of every
// position with the same token, in position order: exactly the CPU's sequence
// of additions, so the result is bit-identical to it.  The first-occurrence
// scan costs O(BT^2) token reads per column block: trivial at CLIP's BT = 77 B.
__global__ static void embedding_backward_wte_kernel(float *dwte, const float *dout, const int32_t *tokens, int BT,
                                                     int C)
{
    const int i = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    const int32_t tok = tokens[i];
    for (int p = 0; p < i; p++)
        if (tokens[p] == tok)
            return; // an earlier position owns this row
    if (j >= C)
        return;
    float acc = dwte[(size_t)tok * C + j];
    for (int p = i; p < BT; p++)
        if (tokens[p] == tok)
            acc += dout[(size_t)p * C + j];
    dwte[(size_t)tok * C + j] = acc;
}

// dwpe (maxT, C) += sum over b of dout (B, T, C), b in order; rows T.. untouched
__global__ static void embedding_backward_wpe_kernel(float *dwpe, const float *dout, int B, int T, int C)
{
    GRID_STRIDE(k, (size_t)T * C)
    {
        float acc = dwpe[k];
        for (int b = 0; b < B; b++)
            acc += dout[(size_t)b * T * C + k];
        dwpe[k] = acc;
    }
}

extern "C" int db_cuda_embedding_backward(db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                                          int B, int T, int C, int V)
{
    DB_ENTER(c);
    if ((size_t)B * T * C == 0)
        return 0;
    if (check_tokens(c, "embedding backward", tokens, B * T, V) != 0)
        return -1;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (dwte) {
        dim3 grid((unsigned)(B * T), (unsigned)((C + THREADS - 1) / THREADS));
        embedding_backward_wte_kernel<<<grid, THREADS, 0, s>>>(dwte, dout, tokens, B * T, C);
        DB_LAUNCHED(c);
    }
    if (dwpe) {
        embedding_backward_wpe_kernel<<<db_cuda_grid((size_t)T * C, THREADS), THREADS, 0, s>>>(dwpe, dout, B, T, C);
        DB_LAUNCHED(c);
    }
    return 0;
}
