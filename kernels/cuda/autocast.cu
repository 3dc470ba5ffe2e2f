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

// ---- weight shadows ---------------------------------------------------------------

int db_cuda_declare_weights(db_ctx *c, const float *p, size_t n)
{
    DB_ENTER(c);
    db_cuda_state *st = db_cuda_st(c);
    if (!p || n == 0 || db_cuda_shadow_find(c, p, n * sizeof(float)))
        return 0;
    if (st->nshadow == DB_CUDA_NSHADOW) // only a speed-up: past the table, weights convert per op
        return 0;
    db_cuda_shadow *w = &st->shadow[st->nshadow++];
    w->p = p, w->n = n, w->s = NULL, w->prec = 0, w->valid = 0;
    return 0;
}

db_cuda_shadow *db_cuda_shadow_find(db_ctx *c, const void *p, size_t bytes)
{
    db_cuda_state *st = db_cuda_st(c);
    const char *a = (const char *)p;
    for (int i = 0; i < st->nshadow; i++) {
        const char *b = (const char *)st->shadow[i].p;
        if (a >= b && a + bytes <= b + st->shadow[i].n * sizeof(float))
            return &st->shadow[i];
    }
    return NULL;
}

void db_cuda_shadow_touch(db_ctx *c, const void *p, size_t bytes)
{
    if (!c->cuda)
        return;
    db_cuda_state *st = db_cuda_st(c);
    const char *a = (const char *)p;
    for (int i = 0; i < st->nshadow; i++) {
        const char *b = (const char *)st->shadow[i].p;
        if (a < b + st->shadow[i].n * sizeof(float) && b < a + bytes)
            st->shadow[i].valid = 0;
    }
}

int db_cuda_shadow_owns(db_ctx *c, const void *p)
{
    db_cuda_state *st = db_cuda_st(c);
    const char *a = (const char *)p;
    for (int i = 0; i < st->nshadow; i++) {
        const char *s = (const char *)st->shadow[i].s;
        if (s && a >= s && a < s + st->shadow[i].n * 2)
            return 1;
    }
    return 0;
}

int db_cuda_shadow_drop(db_ctx *c, const void *p)
{
    db_cuda_state *st = db_cuda_st(c);
    for (int i = 0; i < st->nshadow; i++)
        if (st->shadow[i].p == p) {
            void *s = st->shadow[i].s;
            st->shadow[i] = st->shadow[--st->nshadow];
            if (s)
                db_cuda_free(c, s); // not owned by a declared buffer any more: a plain block
            return 1;
        }
    return 0;
}

static void *convert16(db_ctx *c, void *dst, const float *src, size_t n);

// the working copy of w, (re)built when stale or of another compute type
static void *shadow_ready(db_ctx *c, db_cuda_shadow *w)
{
    if (w->s && w->valid && w->prec == (int)c->precision)
        return w->s;
    if (!w->s && !(w->s = db_cuda_alloc(c, w->n * 2)))
        return NULL;
    w->prec = (int)c->precision;
    if (!convert16(c, w->s, w->p, w->n))
        return NULL;
    w->valid = 1;
    return w->s;
}

// Before a graph replay: the working copies a capture baked in are read
// where they are, whatever happened to the weights since (an 8-bit AdamW
// step or a copy marks them stale; only a direct op call would rebuild
// them), so every built copy is brought up to date here first, in place.
int db_cuda_shadows_refresh(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (c->precision == DB_PREC_F32)
        return 0;
    for (int i = 0; i < st->nshadow; i++)
        if (st->shadow[i].s && !shadow_ready(c, &st->shadow[i]))
            return -1;
    return 0;
}

void *db_cuda_to16(db_ctx *c, const float *src, size_t n)
{
    db_cuda_shadow *w = n ? db_cuda_shadow_find(c, src, n * sizeof(float)) : NULL;
    if (w) {
        char *s = (char *)shadow_ready(c, w);
        return s ? s + (src - w->p) * 2 : NULL;
    }
    void *dst = db_cuda_alloc(c, n * 2);
    if (!dst || n == 0)
        return dst;
    if (!convert16(c, dst, src, n)) {
        db_cuda_free(c, dst);
        return NULL;
    }
    return dst;
}

// dst (n values of the compute type) = round(src); dst, or NULL with c->err set
static void *convert16(db_ctx *c, void *dst, const float *src, size_t n)
{
    if (!dst || n == 0)
        return dst;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (c->precision == DB_PREC_F16)
        to_f16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>((__half *)dst, src, n);
    else
        to_bf16_kernel<<<db_cuda_grid(n, CONV_THREADS), CONV_THREADS, 0, s>>>((__nv_bfloat16 *)dst, src, n);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
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
