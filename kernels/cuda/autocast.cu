// Autocast conversions (kernels/ops.h db_precision): float32 <-> bf16 / fp16
// and "round a float32 to the compute type, keep it a float32".  The
// matmul-class ops call these around cuBLAS / cuDNN / the attention kernels
// in a 16-bit mode; fp32 mode never reaches this file.
//
// Rounding is the hardware's round to nearest even (__float2bfloat16_rn,
// __float2half_rn): the same rule as libcommon/core/tensor.c db_convert,
// which the CPU reference uses, so a rounded value is bit-identical on both
// sides.  fp16 overflow gives +-inf, NaN stays NaN.
//
// Grid-stride loops, one element per step: these are memory-bound passes
// (a float read, a 2-byte or 4-byte write), and the per-element work is one
// conversion, so nothing fancier would pay.
#include "kernels/cuda/cuda.h"

enum { CONV_THREADS = 256 };

// dst (bf16) = src
__global__ static void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

// dst (fp16) = src
__global__ static void to_f16_kernel(__half *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

// dst = (float) src, or dst += (float) src; conversions to float are exact
__global__ static void from_bf16_kernel(float *dst, const __nv_bfloat16 *src, size_t n, int accumulate)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = __bfloat162float(src[i]);
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

__global__ static void from_f16_kernel(float *dst, const __half *src, size_t n, int accumulate)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = __half2float(src[i]);
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// dst = round(src) or dst += round(src); dst == src allowed (each element is
// read, then written, by one thread)
__global__ static void round_kernel(float *dst, const float *src, size_t n, int f16, int accumulate)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = db_cuda_round16(src[i], f16);
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

void *db_cuda_to16(db_ctx *c, const float *src, size_t n)
{
    void *dst = db_cuda_alloc(c, n * 2);
    if (!dst || n == 0)
        return dst;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (c->precision == DB_PREC_F16)
        to_f16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>((__half *)dst, src, n);
    else
        to_bf16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>((__nv_bfloat16 *)dst, src, n);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        db_cuda_free(c, dst);
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "to16 kernel: %s", cudaGetErrorString(e));
        return NULL;
    }
    return dst;
}

int db_cuda_from16(db_ctx *c, float *dst, const void *src, size_t n, int accumulate)
{
    if (n == 0)
        return 0;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (c->precision == DB_PREC_F16)
        from_f16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>(dst, (const __half *)src, n,
                                                                              accumulate);
    else
        from_bf16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>(dst, (const __nv_bfloat16 *)src, n,
                                                                               accumulate);
    DB_LAUNCHED(c);
    return 0;
}

int db_cuda_round(db_ctx *c, float *dst, const float *src, size_t n, int accumulate)
{
    if (n == 0)
        return 0;
    round_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, db_cuda_st(c)->stream>>>(
        dst, src, n, c->precision == DB_PREC_F16, accumulate);
    DB_LAUNCHED(c);
    return 0;
}

float *db_cuda_rounded_copy(db_ctx *c, const float *src, size_t n)
{
    float *dst = (float *)db_cuda_alloc(c, n * sizeof(float));
    if (dst && db_cuda_round(c, dst, src, n, 0) != 0) {
        db_cuda_free(c, dst);
        return NULL;
    }
    return dst;
}
