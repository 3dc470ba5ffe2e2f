// Group norm (+ fused SiLU), layer norm and softmax, forward and backward:
// the twins of kernels/cpu/norm.c and norm_backward.c, with their math:
// two-pass statistics accumulated in double (mean, then the mean of squared
// deviations from the float mean), rstd = (float)(1 / sqrt(var + eps)) in
// double, softmax sums in double.  One thread block per group / row; the
// block reductions (reduce.h) have a fixed order, and parameter gradients are
// per-chunk partials summed in index order (db_cuda_finish_colsum), so every
// result is deterministic.
//
// Known slow spot (correct first): a group norm block walks a whole group, so
// the VAE's 512-channel 512x512 levels give only B*32 blocks.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/reduce.h"

enum { NORM_THREADS = 512, ROW_THREADS = 256, PART_ROWS = 256 };

// dst (C) += (float) sum_r part[r, :], r in order.  One thread per column.
__global__ static void finish_colsum_kernel(float *dst, const double *part, int nchunk, int C)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C)
        return;
    double s = 0;
    for (int r = 0; r < nchunk; r++)
        s += part[(size_t)r * C + j];
    dst[j] += (float)s;
}

int db_cuda_finish_colsum(db_ctx *c, float *dst, const double *part, int nchunk, int C)
{
    if (C == 0)
        return 0;
    finish_colsum_kernel<<<(C + 127) / 128, 128, 0, db_cuda_st(c)->stream>>>(dst, part, nchunk, C);
    DB_LAUNCHED(c);
    return 0;
}

// ---- forward ------------------------------------------------------------------------

// grid B*G, block NORM_THREADS.  out, inp (B, C, HW); mean, rstd (B, G) or NULL;
// weight, bias (C).  out may equal inp (each element read then written by one thread).
__global__ static void groupnorm_forward_kernel(float *out, float *mean, float *rstd, const float *inp,
                                                const float *weight, const float *bias, int C, int HW, int G, float eps,
                                                int silu)
{
    __shared__ double sh[32];
    const int bg = blockIdx.x, g = bg % G, cg = C / G;
    const size_t n = (size_t)cg * HW;
    const float *x = inp + (size_t)bg * n;
    float *y = out + (size_t)bg * n;
    double s = 0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        s += x[i];
    const float mu = (float)(db_block_sum(s, sh) / (double)n);
    double s2 = 0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double d = (double)x[i] - mu;
        s2 += d * d;
    }
    const double var = db_block_sum(s2, sh) / (double)n;
    const float rs = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        if (mean)
            mean[bg] = mu;
        if (rstd)
            rstd[bg] = rs;
    }
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int cc = g * cg + (int)(i / HW);
        // y = (x - mu) * rs * w + b = x * a + (b - mu * a), as norm.c
        const float a = rs * weight[cc], shft = bias[cc] - mu * a;
        const float t = x[i] * a + shft;
        y[i] = silu ? t / (1.0f + expf(-t)) : t;
    }
}

extern "C" int db_cuda_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                         const float *weight, const float *bias, int B, int C, int HW, int G, float eps,
                                         int silu)
{
    DB_ENTER(c);
    if (B * G == 0)
        return 0;
    groupnorm_forward_kernel<<<B * G, NORM_THREADS, 0, db_cuda_st(c)->stream>>>(out, mean, rstd, inp, weight, bias, C,
                                                                                HW, G, eps, silu);
    DB_LAUNCHED(c);
    return 0;
}

// grid N, block ROW_THREADS.  out, inp (N, C); mean, rstd (N) or NULL; weight, bias (C).
__global__ static void layernorm_forward_kernel(float *out, float *mean, float *rstd, const float *inp,
                                                const float *weight, const float *bias, int C, float eps)
{
    __shared__ double sh[32];
    const int r = blockIdx.x;
    const float *x = inp + (size_t)r * C;
    float *y = out + (size_t)r * C;
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        s += x[i];
    const float mu = (float)(db_block_sum(s, sh) / C);
    double s2 = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const double d = (double)x[i] - mu;
        s2 += d * d;
    }
    const double var = db_block_sum(s2, sh) / C;
    const float rs = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        if (mean)
            mean[r] = mu;
        if (rstd)
            rstd[r] = rs;
    }
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        y[i] = (x[i] - mu) * rs * weight[i] + bias[i];
}

extern "C" int db_cuda_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                         const float *weight, const float *bias, int N, int C, float eps)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    layernorm_forward_kernel<<<N, ROW_THREADS, 0, db_cuda_st(c)->stream>>>(out, mean, rstd, inp, weight, bias, C, eps);
    DB_LAUNCHED(c);
    return 0;
}

// grid N, block ROW_THREADS.  out, inp (N, C); out may equal inp.
__global__ static void softmax_forward_kernel(float *out, const float *inp, int C)
{
    __shared__ float shf[32];
    __shared__ double sh[32];
    const float *x = inp + (size_t)blockIdx.x * C;
    float *y = out + (size_t)blockIdx.x * C;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        mx = fmaxf(mx, x[i]);
    mx = db_block_max(mx, shf);
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        s += expf(x[i] - mx);
    const float inv = (float)(1.0 / db_block_sum(s, sh));
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        y[i] = expf(x[i] - mx) * inv; // the same expf value the sum saw
}

extern "C" int db_cuda_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    softmax_forward_kernel<<<N, ROW_THREADS, 0, db_cuda_st(c)->stream>>>(out, inp, C);
    DB_LAUNCHED(c);
    return 0;
}

// ---- backward -----------------------------------------------------------------------

// dy after the fused SiLU's derivative (z = the affine output), as norm_backward.c
__device__ __forceinline__ float gn_dy(float dy, float xh, float w, float bb, int silu)
{
    if (silu) {
        const float z = xh * w + bb, sg = 1.0f / (1.0f + expf(-z));
        dy *= sg * (1.0f + z * (1.0f - sg));
    }
    return dy;
}

// grid B*G, block NORM_THREADS.  dinp (B, C, HW) = or NULL; partw, partb (B, C):
// per (b, channel) sum(dy * xhat), sum(dy), or NULL; dout, inp (B, C, HW);
// mean, rstd (B, G); weight, bias (C).
__global__ static void groupnorm_backward_kernel(float *dinp, double *partw, double *partb, const float *dout,
                                                 const float *mean, const float *rstd, const float *inp,
                                                 const float *weight, const float *bias, int C, int HW, int G, int silu)
{
    __shared__ double sh[32];
    const int bg = blockIdx.x, b = bg / G, g = bg % G, cg = C / G;
    const size_t n = (size_t)cg * HW;
    const float mu = mean[bg], rs = rstd[bg];
    const float *x = inp + (size_t)bg * n, *dy0 = dout + (size_t)bg * n;
    // pass 1: per channel sums, combined over the group in channel order
    double sum_g = 0, sum_gx = 0;
    for (int ch = 0; ch < cg; ch++) {
        const int cc = g * cg + ch;
        const float w = weight[cc], bb = bias[cc];
        const float *xc = x + (size_t)ch * HW, *dc = dy0 + (size_t)ch * HW;
        double s_dy = 0, s_dyx = 0;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            const float xh = (xc[i] - mu) * rs, dy = gn_dy(dc[i], xh, w, bb, silu);
            s_dy += dy;
            s_dyx += (double)dy * xh;
        }
        s_dy = db_block_sum(s_dy, sh);
        s_dyx = db_block_sum(s_dyx, sh);
        sum_g += s_dy * w;
        sum_gx += s_dyx * w;
        if (partw && threadIdx.x == 0) {
            partw[(size_t)b * C + cc] = s_dyx;
            partb[(size_t)b * C + cc] = s_dy;
        }
    }
    if (!dinp)
        return;
    const float mg = (float)(sum_g / (double)n), mgx = (float)(sum_gx / (double)n);
    float *dx = dinp + (size_t)bg * n;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int cc = g * cg + (int)(i / HW);
        const float w = weight[cc];
        const float xh = (x[i] - mu) * rs, dy = gn_dy(dy0[i], xh, w, bias[cc], silu);
        dx[i] = rs * (dy * w - mg - xh * mgx);
    }
}

extern "C" int db_cuda_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                          const float *mean, const float *rstd, const float *inp, const float *weight,
                                          const float *bias, int B, int C, int HW, int G, int silu)
{
    DB_ENTER(c);
    if (B * G == 0)
        return 0;
    const int want_params = dweight || dbias;
    double *part = NULL;
    if (want_params) {
        part = (double *)db_cuda_alloc(c, sizeof(double) * 2 * (size_t)B * C);
        if (!part)
            return -1;
    }
    groupnorm_backward_kernel<<<B * G, NORM_THREADS, 0, db_cuda_st(c)->stream>>>(
        dinp, part, part ? part + (size_t)B * C : NULL, dout, mean, rstd, inp, weight, bias, C, HW, G, silu);
    cudaError_t e = cudaGetLastError();
    int r = 0;
    if (e == cudaSuccess && dweight)
        r |= db_cuda_finish_colsum(c, dweight, part, B, C);
    if (e == cudaSuccess && dbias)
        r |= db_cuda_finish_colsum(c, dbias, part + (size_t)B * C, B, C);
    db_cuda_free(c, part);
    DB_CU(c, e);
    return r ? -1 : 0;
}

// grid N, block ROW_THREADS.  dinp, dout, inp (N, C); mean, rstd (N); weight (C).
__global__ static void layernorm_backward_dinp_kernel(float *dinp, const float *dout, const float *mean,
                                                      const float *rstd, const float *inp, const float *weight, int C)
{
    __shared__ double sh[32];
    const int r = blockIdx.x;
    const float *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
    const float mu = mean[r], rs = rstd[r];
    double sg = 0, sgx = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float g = dy[i] * weight[i];
        sg += g;
        sgx += (double)g * ((x[i] - mu) * rs);
    }
    sg = db_block_sum(sg, sh);
    sgx = db_block_sum(sgx, sh);
    const float mg = (float)(sg / C), mgx = (float)(sgx / C);
    float *dx = dinp + (size_t)r * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        dx[i] = rs * (dy[i] * weight[i] - mg - (x[i] - mu) * rs * mgx);
}

// grid (ceil(C / 128), nchunk), block 128.  partw, partb (nchunk, C): over each
// chunk of PART_ROWS rows in order, sum(dy * xhat) and sum(dy) per column.
__global__ static void layernorm_backward_param_kernel(double *partw, double *partb, const float *dout,
                                                       const float *mean, const float *rstd, const float *inp, int N,
                                                       int C)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x, r0 = blockIdx.y * PART_ROWS;
    if (j >= C)
        return;
    const int r1 = r0 + PART_ROWS < N ? r0 + PART_ROWS : N;
    double sw = 0, sb = 0;
    for (int r = r0; r < r1; r++) {
        const float dy = dout[(size_t)r * C + j];
        sw += (double)dy * ((inp[(size_t)r * C + j] - mean[r]) * rstd[r]);
        sb += dy;
    }
    partw[(size_t)blockIdx.y * C + j] = sw;
    partb[(size_t)blockIdx.y * C + j] = sb;
}

extern "C" int db_cuda_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                          const float *mean, const float *rstd, const float *inp, const float *weight,
                                          int N, int C)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (dinp) {
        layernorm_backward_dinp_kernel<<<N, ROW_THREADS, 0, s>>>(dinp, dout, mean, rstd, inp, weight, C);
        DB_LAUNCHED(c);
    }
    if (dweight || dbias) {
        const int nchunk = (N + PART_ROWS - 1) / PART_ROWS;
        double *part = (double *)db_cuda_alloc(c, sizeof(double) * 2 * (size_t)nchunk * C);
        if (!part)
            return -1;
        dim3 grid((unsigned)((C + 127) / 128), (unsigned)nchunk);
        layernorm_backward_param_kernel<<<grid, 128, 0, s>>>(part, part + (size_t)nchunk * C, dout, mean, rstd, inp, N,
                                                             C);
        cudaError_t e = cudaGetLastError();
        int r = 0;
        if (e == cudaSuccess && dweight)
            r |= db_cuda_finish_colsum(c, dweight, part, nchunk, C);
        if (e == cudaSuccess && dbias)
            r |= db_cuda_finish_colsum(c, dbias, part + (size_t)nchunk * C, nchunk, C);
        db_cuda_free(c, part);
        DB_CU(c, e);
        if (r)
            return -1;
    }
    return 0;
}

// grid N, block ROW_THREADS.  dinp, dout, out (N, C): dx = y (dy - sum(dy y)).
__global__ static void softmax_backward_kernel(float *dinp, const float *dout, const float *out, int C)
{
    __shared__ double sh[32];
    const float *y = out + (size_t)blockIdx.x * C, *dy = dout + (size_t)blockIdx.x * C;
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        s += (double)dy[i] * y[i];
    const float sf = (float)db_block_sum(s, sh);
    float *dx = dinp + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        dx[i] = y[i] * (dy[i] - sf);
}

extern "C" int db_cuda_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    softmax_backward_kernel<<<N, ROW_THREADS, 0, db_cuda_st(c)->stream>>>(dinp, dout, out, C);
    DB_LAUNCHED(c);
    return 0;
}
