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
// Grid-stride loops.  These are memory-bound passes (a float read, a
// 2-byte or 4-byte write): where every pointer is 16-byte aligned (the
// allocator's buffers and tensors at 4-element offsets are), a thread moves
// four elements per step, one 16-byte load and one 8- or 16-byte store,
// and the last n % 4 elements go one by one; else one element per step.
// The conversions are the same per element either way (bits unchanged):
// only the memory transactions differ.
#include "kernels/cuda/cuda.h"

enum { CONV_THREADS = 256 };

struct __align__(16) f32x4 {
    float v[4];
};
template <typename T> struct __align__(8) x4_16 {
    T v[4];
};

__device__ __forceinline__ static void store16(__nv_bfloat16 *d, float v) { *d = __float2bfloat16_rn(v); }
__device__ __forceinline__ static void store16(__half *d, float v) { *d = __float2half_rn(v); }
__device__ __forceinline__ static float load16(const __nv_bfloat16 *s) { return __bfloat162float(*s); }
__device__ __forceinline__ static float load16(const __half *s) { return __half2float(*s); }

// four elements of a type as one aligned load or store
template <typename X> struct quad {
    typedef x4_16<X> t;
};
template <> struct quad<float> {
    typedef f32x4 t;
};

// The grid-stride pass of the kernels below: op(dst element, src element)
// for every element, four at a time when vec (a group of src loaded at
// once, and of dst when read_dst, then stored at once), the tail of n % 4
// one by one.
template <typename D, typename S, typename Op>
__device__ __forceinline__ static void pass4(D *dst, const S *src, size_t n, int vec, int read_dst, Op op)
{
    typedef typename quad<D>::t DV;
    typedef typename quad<S>::t SV;
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (vec) {
        const size_t n4 = n / 4;
        for (size_t i = tid; i < n4; i += stride) {
            const SV a = ((const SV *)src)[i];
            DV b;
            if (read_dst)
                b = ((const DV *)dst)[i];
            for (int k = 0; k < 4; k++)
                op(b.v[k], a.v[k]);
            ((DV *)dst)[i] = b;
        }
        done = n4 * 4;
    }
    for (size_t i = done + tid; i < n; i += stride)
        op(dst[i], src[i]);
}

// dst (16-bit) = src; vec: four at a time (aligned, see above)
template <typename T> __global__ static void to16_kernel(T *dst, const float *src, size_t n, int vec)
{
    pass4(dst, src, n, vec, 0, [](T &d, float x) { store16(&d, x); });
}

// dst = (float) src, or by put (DB_PUT_*); conversions to float are exact
template <typename T> __global__ static void from16_kernel(float *dst, const T *src, size_t n, int put, int vec)
{
    pass4(dst, src, n, vec, put == DB_PUT_ADD, [put](float &d, const T &x) { db_cuda_put(&d, load16(&x), put); });
}

// dst = round(src), or by put (DB_PUT_*); dst == src allowed (each element
// is read, then written, by one thread)
__global__ static void round_kernel(float *dst, const float *src, size_t n, int f16, int put, int vec)
{
    pass4(dst, src, n, vec, put == DB_PUT_ADD,
          [f16, put](float &d, float x) { db_cuda_put(&d, db_cuda_round16(x, f16), put); });
}

// element i of dst by put, DB_PUT_PACK16 included (cuda.h): the 16-bit
// element i at dst's address, or the float one
template <typename T> __device__ __forceinline__ static void put16(float *dst, size_t i, float v, int put)
{
    if (put == DB_PUT_PACK16)
        store16((T *)(void *)dst + i, __fadd_rn(0.0f, v));
    else
        db_cuda_put(dst + i, v, put);
}

// DB_PUT_PACK16 of a flat widening: dst = src's values (as put16)
template <typename T> __global__ static void pack16_copy_kernel(T *dst, const T *src, size_t n, int vec)
{
    pass4(dst, src, n, vec, 0, [](T &d, const T &x) { store16(&d, __fadd_rn(0.0f, load16(&x))); });
}

// DB_PUT_PACK16 of a rounding: dst = round(src) (as put16)
template <typename T> __global__ static void pack16_round_kernel(T *dst, const float *src, size_t n, int f16, int vec)
{
    pass4(dst, src, n, vec, 0, [f16](T &d, float x) { store16(&d, __fadd_rn(0.0f, db_cuda_round16(x, f16))); });
}

// Four at a time: both pointers 16-byte aligned (the 16-bit side's 8 bytes
// a step need only 8, but its element offset matches the float side's)
static inline int vec4(const void *a, const void *b, size_t n)
{
    return n >= 4 && ((uintptr_t)a % 16) == 0 && ((uintptr_t)b % 16) == 0;
}
// the grid for n elements moved four at a time when vec
static inline unsigned grid4(size_t n, int vec) { return db_cuda_grid(vec ? (n + 3) / 4 : n, CONV_THREADS); }

// ---- channels-last conversions ----------------------------------------------------
// A (C, HW) plane per sample transposed through a 32x33 float tile in
// shared memory, so both the reads and the writes are coalesced runs of 32.
enum { TT = 32, TROWS = 8 };


// sample b's tile (hw0 / TT, c0 / TT) of dst (B, HW, C) = round(src (B, C,
// HW)), by a block of (TT, TROWS) threads
template <typename T>
__device__ __forceinline__ static void to16_nhwc_tile(T *dst, const float *src, int C, int HW, unsigned b, int hw0,
                                                      int c0)
{
    __shared__ float tile[TT][TT + 1];
    const size_t plane = (size_t)C * HW * b;
    for (int k = threadIdx.y; k < TT; k += TROWS) {
        const int ch = c0 + k, hw = hw0 + threadIdx.x;
        if (ch < C && hw < HW)
            tile[k][threadIdx.x] = src[plane + (size_t)ch * HW + hw];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < TT; k += TROWS) {
        const int hw = hw0 + k, ch = c0 + threadIdx.x;
        if (ch < C && hw < HW)
            store16(dst + plane + (size_t)hw * C + ch, tile[threadIdx.x][k]);
    }
}

// dst (B, HW, C) = round(src (B, C, HW)); grid (HW tiles, C tiles, B)
template <typename T>
__global__ static void __launch_bounds__(TT *TROWS) to16_nhwc_kernel(T *dst, const float *src, int C, int HW)
{
    to16_nhwc_tile(dst, src, C, HW, blockIdx.z, blockIdx.x * TT, blockIdx.y * TT);
}

// A fill's BF_PER consecutive values from element i0 (db_cuda_fill_job):
// the first one's channel by one 64-bit division, then stepped; one 16-byte
// store (y is 16-byte aligned: db_cuda_alloc's).  (H200, call 5: a 64-bit
// modulo and a 2-byte store per value, 0.7 TB/s, 1.6 ms of a 15.8 ms VAE
// decode.)
enum { BF_PER = 8 };
__device__ __forceinline__ static unsigned short bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ static unsigned short bits16(__half x) { return __half_as_ushort(x); }
template <typename T> __device__ __forceinline__ static void fill16_group(const db_cuda_fill_job &f, size_t i0)
{
    int c, hw = 0;
    if (f.nhwc) {
        c = (int)(i0 % (size_t)f.OC);
    } else {
        const size_t plane = i0 / (size_t)f.OHW;
        hw = (int)(i0 - plane * (size_t)f.OHW), c = (int)(plane % (size_t)f.OC);
    }
    unsigned short h[BF_PER];
    for (int q = 0; q < BF_PER; q++) {
        T v;
        store16(&v, f.bias[c]);
        h[q] = bits16(v);
        if (f.nhwc ? ++c == f.OC : ++hw == f.OHW) {
            if (!f.nhwc)
                hw = 0, c++;
            if (c == f.OC)
                c = 0;
        }
    }
    if (i0 + BF_PER <= f.n) {
        uint4 u;
        u.x = h[0] | (unsigned)h[1] << 16, u.y = h[2] | (unsigned)h[3] << 16;
        u.z = h[4] | (unsigned)h[5] << 16, u.w = h[6] | (unsigned)h[7] << 16;
        *(uint4 *)((unsigned short *)f.y + i0) = u;
    } else {
        for (size_t i = i0; i < f.n; i++)
            ((unsigned short *)f.y)[i] = h[i - i0];
    }
}

// db_cuda_to16_nhwc_jobs's launch: grid (HW tiles, C tiles, z); z0[i] the
// first z of conversion i (a z a sample; blocks past a job's own tiles
// return), z from z0[k] the fill's slices, every thread there a
// grid-stride over the fill's groups of BF_PER values
struct nhwc_segs {
    db_cuda_nhwc_job j[2];
    unsigned z0[3], zf; // zf = z0[k]
    db_cuda_fill_job f;
    int k;
};

template <typename T> __global__ static void __launch_bounds__(TT *TROWS) to16_nhwc_jobs_kernel(const nhwc_segs s)
{
    const unsigned z = blockIdx.z;
    if (z >= s.zf) {
        const size_t per = (size_t)gridDim.x * gridDim.y * TT * TROWS;
        const size_t stride = per * (gridDim.z - s.zf), groups = (s.f.n + BF_PER - 1) / BF_PER;
        const size_t t0 = ((size_t)(z - s.zf) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        const db_cuda_fill_job f = s.f;
        for (size_t t = t0 * TT * TROWS + threadIdx.y * TT + threadIdx.x; t < groups; t += stride)
            fill16_group<T>(f, t * BF_PER);
        return;
    }
    const int i = s.k > 1 && z >= s.z0[1];
    T *dst = (T *)(i ? s.j[1].dst : s.j[0].dst);
    const float *src = i ? s.j[1].src : s.j[0].src;
    const int C = i ? s.j[1].C : s.j[0].C, HW = i ? s.j[1].HW : s.j[0].HW;
    const int hw0 = blockIdx.x * TT, c0 = blockIdx.y * TT;
    if (hw0 < HW && c0 < C) // (the whole block, before the tile's barrier)
        to16_nhwc_tile(dst, src, C, HW, z - (i ? s.z0[1] : 0u), hw0, c0);
}

// the fill alone (NCHW plans, small planes): a thread a group
template <typename T> __global__ static void fill16_kernel(const db_cuda_fill_job f)
{
    const size_t groups = (f.n + BF_PER - 1) / BF_PER;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < groups; t += (size_t)gridDim.x * blockDim.x)
        fill16_group<T>(f, t * BF_PER);
}

// The value a widening writes: (float) the compute-type x, plus the addend
// (conv2d_add_forward) when there is one -- add (B, C, HW) like dst, or
// with per_channel add (B, C) over the plane; after the widening, as
// db_add_forward / db_add_channel_forward would add it to the result
__device__ __forceinline__ static float with_add(float x, const float *add, int per_channel, int b, int C, int ch,
                                                 size_t i)
{
    return add ? x + add[per_channel ? (size_t)b * C + ch : i] : x;
}

// sample b's tile (hw0 / TT, c0 / TT) of dst (B, C, HW) = (float) src (B,
// HW, C) (+ add), or by put (DB_PUT_*), by threads (tx, ty) of (TT, TROWS)
template <typename T>
__device__ __forceinline__ static void from16_tile(float (*tile)[TT + 1], float *dst, const T *src, int C, int HW,
                                                   int put, const float *add, int per_channel, unsigned b, int hw0,
                                                   int c0, int tx, int ty)
{
    const size_t plane = (size_t)C * HW * b;
    for (int k = ty; k < TT; k += TROWS) {
        const int hw = hw0 + k, ch = c0 + tx;
        if (ch < C && hw < HW)
            tile[k][tx] = load16(src + plane + (size_t)hw * C + ch);
    }
    __syncthreads();
    for (int k = ty; k < TT; k += TROWS) {
        const int ch = c0 + k, hw = hw0 + tx;
        const size_t i = plane + (size_t)ch * HW + hw;
        if (ch < C && hw < HW)
            put16<T>(dst, i, with_add(tile[tx][k], add, per_channel, (int)b, C, ch, i), put);
    }
}

// dst (B, C, HW) = (float) src (B, HW, C) (+ add), or by put (DB_PUT_*)
template <typename T>
__global__ static void __launch_bounds__(TT *TROWS)
    from16_nchw_kernel(float *dst, const T *src, int C, int HW, int put, const float *add, int per_channel)
{
    __shared__ float tile[TT][TT + 1];
    from16_tile(tile, dst, src, C, HW, put, add, per_channel, blockIdx.z, blockIdx.x * TT, blockIdx.y * TT,
                threadIdx.x, threadIdx.y);
}

// Small planes (HW <= SMALL_HW: a 3x3 filter's KH KW = 9, its B being OC):
// the 32x32 tiles would leave most threads idle and write 9-float runs.  A
// block takes SMALL_CT channels of one plane instead, whose NCHW side is one
// contiguous run of SMALL_CT HW values, staged (HW, SMALL_CT) in shared
// memory.  (H200, 2026-11-27: the filter gradients through the 32x32 kernel
// took 75 us a launch, 13.7 ms of a bf16 training step.)
enum { SMALL_HW = 16, SMALL_CT = 256 };

// dst (B, HW, C) = round(src (B, C, HW)); grid (C chunks, B), block SMALL_CT
template <typename T>
__global__ static void __launch_bounds__(SMALL_CT) to16_nhwc_small_kernel(T *dst, const float *src, int C, int HW)
{
    __shared__ float tile[SMALL_HW][SMALL_CT + 1];
    const size_t plane = (size_t)C * HW * blockIdx.y;
    const int c0 = blockIdx.x * SMALL_CT, nc = C - c0 < SMALL_CT ? C - c0 : SMALL_CT;
    const float *s = src + plane + (size_t)c0 * HW; // nc * HW contiguous values
    for (int i = threadIdx.x; i < nc * HW; i += SMALL_CT)
        tile[i % HW][i / HW] = s[i];
    __syncthreads();
    if (threadIdx.x < nc)
        for (int k = 0; k < HW; k++)
            store16(dst + plane + (size_t)k * C + c0 + threadIdx.x, tile[k][threadIdx.x]);
}

// sample b's channels [c0, c0 + SMALL_CT) of dst (B, C, HW) = (float) src
// (B, HW, C) (+ add), or by put (DB_PUT_*), by SMALL_CT threads (t)
template <typename T>
__device__ __forceinline__ static void from16_small(float (*tile)[SMALL_CT + 1], float *dst, const T *src, int C,
                                                    int HW, int put, const float *add, int per_channel, unsigned b,
                                                    int c0, int t)
{
    const size_t plane = (size_t)C * HW * b;
    const int nc = C - c0 < SMALL_CT ? C - c0 : SMALL_CT;
    if (t < nc)
        for (int k = 0; k < HW; k++)
            tile[k][t] = load16(src + plane + (size_t)k * C + c0 + t);
    __syncthreads();
    const size_t d0 = plane + (size_t)c0 * HW; // nc * HW contiguous values
    for (int i = t; i < nc * HW; i += SMALL_CT)
        put16<T>(dst, d0 + i, with_add(tile[i % HW][i / HW], add, per_channel, (int)b, C, c0 + i / HW, d0 + i), put);
}

// dst (B, C, HW) = (float) src (B, HW, C) (+ add), or by put (DB_PUT_*)
template <typename T>
__global__ static void __launch_bounds__(SMALL_CT)
    from16_nchw_small_kernel(float *dst, const T *src, int C, int HW, int put, const float *add, int per_channel)
{
    __shared__ float tile[SMALL_HW][SMALL_CT + 1];
    from16_small(tile, dst, src, C, HW, put, add, per_channel, blockIdx.y, blockIdx.x * SMALL_CT, threadIdx.x);
}

// db_cuda_from16_nchw_jobs's launch: a 1-D grid of 256-thread blocks, job
// i's blocks from b0[i] -- its tiles (HW tiles, C tiles, B) when its planes
// are larger than SMALL_HW, else its (C chunks, B) -- each doing what the
// job's own kernel's block does (the same code, the same bits)
static_assert(TT * TROWS == SMALL_CT, "one block size for both widenings");
struct nchw_segs {
    db_cuda_nchw_job j[2];
    unsigned b0[3], gx[2], gy[2];
};

template <typename T> __global__ static void __launch_bounds__(SMALL_CT) from16_nchw_jobs_kernel(const nchw_segs s)
{
    __shared__ float buf[SMALL_HW * (SMALL_CT + 1)]; // the larger of the two tiles
    const int i = blockIdx.x >= s.b0[1];
    const unsigned q = blockIdx.x - (i ? s.b0[1] : 0u), gx = i ? s.gx[1] : s.gx[0], gy = i ? s.gy[1] : s.gy[0];
    float *dst = i ? s.j[1].dst : s.j[0].dst;
    const T *src = (const T *)(i ? s.j[1].src : s.j[0].src);
    const int C = i ? s.j[1].C : s.j[0].C, HW = i ? s.j[1].HW : s.j[0].HW, put = i ? s.j[1].put : s.j[0].put;
    if (HW > SMALL_HW)
        from16_tile((float(*)[TT + 1])buf, dst, src, C, HW, put, NULL, 0, q / (gx * gy), (int)(q % gx) * TT,
                    (int)(q / gx % gy) * TT, (int)threadIdx.x % TT, (int)threadIdx.x / TT);
    else
        from16_small((float(*)[SMALL_CT + 1])buf, dst, src, C, HW, put, NULL, 0, q / gx, (int)(q % gx) * SMALL_CT,
                     (int)threadIdx.x);
}

// one launch per 65535 samples (the grid's z limit; y for small planes);
// to16: dst16/src32, else dst32/src16 (+ add, see with_add)
static int nhwc_launch(db_ctx *c, int to16, void *dst, const void *src, int B, int C, int HW, int put,
                       const float *add = NULL, int per_channel = 0)
{
    if (B <= 0 || C <= 0 || HW <= 0)
        return 0;
    cudaStream_t s = db_cuda_st(c)->stream;
    const int f16 = c->precision == DB_PREC_F16;
    const size_t plane = (size_t)C * HW;
    for (int b0 = 0; b0 < B; b0 += 65535) {
        const int nb = B - b0 < 65535 ? B - b0 : 65535;
        const dim3 grid((unsigned)((HW + TT - 1) / TT), (unsigned)((C + TT - 1) / TT), (unsigned)nb),
            block(TT, TROWS);
        const size_t o = plane * b0;
        const float *ad = add ? add + (per_channel ? (size_t)C * b0 : o) : NULL;
        if (HW <= SMALL_HW) {
            const dim3 sg((unsigned)((C + SMALL_CT - 1) / SMALL_CT), (unsigned)nb);
            if (to16 && f16)
                to16_nhwc_small_kernel<<<sg, SMALL_CT, 0, s>>>((__half *)dst + o, (const float *)src + o, C, HW);
            else if (to16)
                to16_nhwc_small_kernel<<<sg, SMALL_CT, 0, s>>>((__nv_bfloat16 *)dst + o, (const float *)src + o, C,
                                                               HW);
            else if (f16)
                from16_nchw_small_kernel<<<sg, SMALL_CT, 0, s>>>((float *)dst + o, (const __half *)src + o, C, HW,
                                                                 put, ad, per_channel);
            else
                from16_nchw_small_kernel<<<sg, SMALL_CT, 0, s>>>((float *)dst + o, (const __nv_bfloat16 *)src + o, C,
                                                                 HW, put, ad, per_channel);
            DB_LAUNCHED(c);
            continue;
        }
        if (to16 && f16)
            to16_nhwc_kernel<<<grid, block, 0, s>>>((__half *)dst + o, (const float *)src + o, C, HW);
        else if (to16)
            to16_nhwc_kernel<<<grid, block, 0, s>>>((__nv_bfloat16 *)dst + o, (const float *)src + o, C, HW);
        else if (f16)
            from16_nchw_kernel<<<grid, block, 0, s>>>((float *)dst + o, (const __half *)src + o, C, HW, put, ad,
                                                      per_channel);
        else
            from16_nchw_kernel<<<grid, block, 0, s>>>((float *)dst + o, (const __nv_bfloat16 *)src + o, C, HW,
                                                      put, ad, per_channel);
        DB_LAUNCHED(c);
    }
    return 0;
}

void *db_cuda_to16_nhwc(db_ctx *c, const float *src, int B, int C, int HW)
{
    void *dst = db_cuda_alloc(c, (size_t)B * C * HW * 2);
    if (dst && nhwc_launch(c, 1, dst, src, B, C, HW, 0) != 0) {
        db_cuda_free(c, dst);
        return NULL;
    }
    return dst;
}

int db_cuda_to16_nhwc_jobs(db_ctx *c, db_cuda_nhwc_job *jobs, int k, const db_cuda_fill_job *fill)
{
    nhwc_segs s;
    memset(&s, 0, sizeof s);
    int r = 0, one = 1; // one: all in one launch (planes past SMALL_HW, z within the grid's limit)
    unsigned gx = 1, gy = 1;
    for (int i = 0; i < k; i++) {
        jobs[i].dst = NULL;
        const size_t n = (size_t)jobs[i].B * jobs[i].C * jobs[i].HW;
        if (r == 0 && n && !(jobs[i].dst = db_cuda_alloc(c, n * 2)))
            r = -1;
        one &= jobs[i].HW > SMALL_HW && n > 0;
        s.j[i] = jobs[i];
        s.z0[i + 1] = s.z0[i] + (unsigned)jobs[i].B;
        const unsigned x = (unsigned)((jobs[i].HW + TT - 1) / TT), y = (unsigned)((jobs[i].C + TT - 1) / TT);
        gx = x > gx ? x : gx, gy = y > gy ? y : gy;
    }
    s.k = k, s.zf = s.z0[k];
    const size_t groups = fill && fill->n ? (fill->n + BF_PER - 1) / BF_PER : 0;
    const size_t per = (size_t)gx * gy * TT * TROWS; // threads a fill slice
    size_t slices = (groups + per - 1) / per;
    slices = slices > 64 ? 64 : slices;
    one &= k >= 1 && k <= 2 && s.z0[k] + slices <= 65535 && gy <= 65535;
    const int f16 = c->precision == DB_PREC_F16;
    cudaStream_t st = db_cuda_st(c)->stream;
    if (r == 0 && one && s.z0[k] + slices > 0) {
        if (groups)
            s.f = *fill;
        const dim3 grid(gx, gy, (unsigned)(s.z0[k] + slices)), block(TT, TROWS);
        if (f16)
            to16_nhwc_jobs_kernel<__half><<<grid, block, 0, st>>>(s);
        else
            to16_nhwc_jobs_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(s);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "to16_nhwc_jobs kernel: %s", cudaGetErrorString(e));
    } else if (r == 0) { // one launch each
        for (int i = 0; i < k && r == 0; i++)
            r = nhwc_launch(c, 1, jobs[i].dst, jobs[i].src, jobs[i].B, jobs[i].C, jobs[i].HW, 0);
        if (r == 0 && groups) {
            const unsigned grid = db_cuda_grid(groups, 256);
            if (f16)
                fill16_kernel<__half><<<grid, 256, 0, st>>>(*fill);
            else
                fill16_kernel<__nv_bfloat16><<<grid, 256, 0, st>>>(*fill);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess)
                r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "fill16 kernel: %s", cudaGetErrorString(e));
        }
    }
    if (r != 0)
        for (int i = 0; i < k; i++) {
            db_cuda_free(c, jobs[i].dst);
            jobs[i].dst = NULL;
        }
    return r ? -1 : 0;
}

int db_cuda_from16_nchw_jobs(db_ctx *c, const db_cuda_nchw_job *jobs, int k)
{
    nchw_segs s;
    memset(&s, 0, sizeof s);
    size_t nb[3] = {0, 0, 0}; // the blocks before job i
    for (int i = 0; i < k && i < 2; i++) {
        const db_cuda_nchw_job &j = jobs[i];
        const int tiled = j.HW > SMALL_HW;
        s.j[i] = j;
        s.gx[i] = (unsigned)(tiled ? (j.HW + TT - 1) / TT : (j.C + SMALL_CT - 1) / SMALL_CT);
        s.gy[i] = tiled ? (unsigned)((j.C + TT - 1) / TT) : 1u;
        nb[i + 1] = nb[i] + (size_t)s.gx[i] * s.gy[i] * (size_t)(j.B > 0 && j.C > 0 && j.HW > 0 ? j.B : 0);
        s.b0[i + 1] = (unsigned)nb[i + 1];
    }
    if (k != 2 || nb[1] == 0 || nb[2] == nb[1] || nb[2] > 0x7fffffffu) { // one launch each
        for (int i = 0; i < k; i++)
            if (nhwc_launch(c, 0, jobs[i].dst, jobs[i].src, jobs[i].B, jobs[i].C, jobs[i].HW, jobs[i].put) != 0)
                return -1;
        return 0;
    }
    cudaStream_t st = db_cuda_st(c)->stream;
    if (c->precision == DB_PREC_F16)
        from16_nchw_jobs_kernel<__half><<<s.b0[2], SMALL_CT, 0, st>>>(s);
    else
        from16_nchw_jobs_kernel<__nv_bfloat16><<<s.b0[2], SMALL_CT, 0, st>>>(s);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "from16_nchw_jobs kernel: %s", cudaGetErrorString(e));
    return 0;
}

int db_cuda_from16_nchw(db_ctx *c, float *dst, const void *src, int B, int C, int HW, int put)
{
    return nhwc_launch(c, 0, dst, src, B, C, HW, put);
}

int db_cuda_from16_nchw_add(db_ctx *c, float *dst, const void *src, int B, int C, int HW, const float *add,
                            int per_channel)
{
    return nhwc_launch(c, 0, dst, src, B, C, HW, DB_PUT_SET, add, per_channel);
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
    w->fr = NULL, w->nfr = 0, w->cap_fr = 0;
    w->fr_dev = NULL, w->nfr_dev = 0;
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
            free(st->shadow[i].fr);
            db_cuda_free(c, st->shadow[i].fr_dev);
            st->shadow[i] = st->shadow[--st->nshadow];
            if (s)
                db_cuda_free(c, s); // not owned by a declared buffer any more: a plain block
            return 1;
        }
    return 0;
}

static void *convert16(db_ctx *c, void *dst, const float *src, size_t n);
static int filters_write(db_ctx *c, db_cuda_shadow *w, size_t lo, size_t hi);

// the working copy of w, (re)built when stale or of another compute type
static void *shadow_ready(db_ctx *c, db_cuda_shadow *w)
{
    if (w->s && w->valid && w->prec == (int)c->precision)
        return w->s;
    if (!w->s && !(w->s = db_cuda_alloc(c, w->n * 2)))
        return NULL;
    w->prec = (int)c->precision;
    if (!convert16(c, w->s, w->p, w->n) || filters_write(c, w, 0, w->n) != 0)
        return NULL;
    w->valid = 1;
    db_cuda_st(c)->shadow_builds++;
    return w->s;
}

// The registered filters overlapping floats [lo, hi) of w's buffer written
// into its working copy again, transposed (after a pass that wrote them in
// the master's layout).  Whole filters: each is converted from its fp32
// master, which is what the copy must hold.
static int filters_write(db_ctx *c, db_cuda_shadow *w, size_t lo, size_t hi)
{
    for (int i = 0; i < w->nfr; i++) {
        const db_cuda_filter_range *f = &w->fr[i];
        const size_t n = (size_t)f->OC * f->C * f->KHW;
        if (f->off < hi && lo < f->off + n &&
            nhwc_launch(c, 1, (char *)w->s + f->off * 2, w->p + f->off, f->OC, f->C, f->KHW, 0) != 0)
            return -1;
    }
    return 0;
}

static int fr_by_off(const void *a, const void *b)
{
    const size_t x = ((const db_cuda_filter_range *)a)->off, y = ((const db_cuda_filter_range *)b)->off;
    return (x > y) - (x < y);
}

const db_cuda_filter_range *db_cuda_shadow_filters(db_ctx *c, db_cuda_shadow *w, int *n)
{
    *n = 0;
    if (w->nfr == 0)
        return NULL;
    if (w->fr_dev && w->nfr_dev == w->nfr) {
        *n = w->nfr;
        return w->fr_dev;
    }
    // the host list sorted in place (its other readers search it whole)
    const size_t bytes = (size_t)w->nfr * sizeof *w->fr;
    qsort(w->fr, (size_t)w->nfr, sizeof *w->fr, fr_by_off);
    db_cuda_free(c, w->fr_dev);
    w->nfr_dev = 0;
    // a block of the ctx's allocator, written in stream order (it may have
    // been freed by an op still queued)
    cudaError_t e = cudaSuccess;
    if (!(w->fr_dev = (db_cuda_filter_range *)db_cuda_alloc(c, bytes)) ||
        (e = cudaMemcpyAsync(w->fr_dev, w->fr, bytes, cudaMemcpyHostToDevice, db_cuda_st(c)->stream)) != cudaSuccess) {
        if (e != cudaSuccess)
            db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "filter table: %s", cudaGetErrorString(e));
        return NULL;
    }
    w->nfr_dev = w->nfr;
    *n = w->nfr;
    return w->fr_dev;
}

void *db_cuda_filter16(db_ctx *c, const float *wt, int OC, int C, int KHW)
{
    const size_t n = (size_t)OC * C * KHW;
    db_cuda_shadow *w = n ? db_cuda_shadow_find(c, wt, n * sizeof(float)) : NULL;
    const size_t off = w ? (size_t)(wt - w->p) : 0;
    // a 1x1 filter reads the same either way; outside a declared buffer, or
    // at a place in its copy not 16-byte aligned, scratch: cuDNN picks
    // kernels by the operands' alignment, and a misaligned copy gave other
    // bits than scratch (fp16 data gradient, H200); our weights keep every
    // tensor 16 floats aligned, so the copy serves them all
    if (KHW == 1 || !w || (off * 2) % 16 != 0)
        return KHW == 1 ? db_cuda_to16(c, wt, n) : db_cuda_to16_nhwc(c, wt, OC, C, KHW);
    int i = 0;
    while (i < w->nfr && w->fr[i].off != off)
        i++;
    if (i == w->nfr) { // first call: registered, and written transposed now if the copy is current
        if (w->nfr == w->cap_fr) {
            const int cap = w->cap_fr ? 2 * w->cap_fr : 64;
            db_cuda_filter_range *fr = (db_cuda_filter_range *)realloc(w->fr, cap * sizeof *fr);
            if (!fr) {
                db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "conv2d: out of host memory");
                return NULL;
            }
            w->fr = fr, w->cap_fr = cap;
        }
        w->fr[w->nfr++] = (db_cuda_filter_range){off, OC, C, KHW};
        db_cuda_st(c)->filters_gen++;
        if (w->s && w->valid && w->prec == (int)c->precision &&
            nhwc_launch(c, 1, (char *)w->s + off * 2, wt, OC, C, KHW, 0) != 0)
            return NULL;
    } else if (w->fr[i].OC != OC || w->fr[i].C != C || w->fr[i].KHW != KHW) {
        db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "conv2d: a filter read as %dx%dx%d and as %dx%dx%d", OC, C, KHW,
                     w->fr[i].OC, w->fr[i].C, w->fr[i].KHW);
        return NULL;
    }
    char *s = (char *)shadow_ready(c, w);
    return s ? s + off * 2 : NULL;
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

// src's place in w's working copy (made current first); NULL with c->err set
static void *lend(db_ctx *c, db_cuda_shadow *w, const float *src)
{
    char *s = (char *)shadow_ready(c, w);
    return s ? s + (src - w->p) * 2 : NULL;
}

// ---- activation twins (cuda.h db_cuda_twin_*) ----

void db_cuda_twin_drop(db_ctx *c)
{
    db_cuda_state *st = c->cuda ? db_cuda_st(c) : NULL;
    if (!st)
        return;
    while (st->ntwin > 0) {
        const int i = --st->ntwin;
        void *s = st->twin_s[i];
        st->twin_s[i] = NULL;
        st->twin_p[i] = NULL;
        db_cuda_free(c, s);
    }
}

// twins an earlier op made (or of another type) freed: none can serve the
// op after this one
static void twin_drop_stale(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (st->ntwin && (st->twin_seq != c->op_seq || st->twin_prec != (int)c->precision))
        db_cuda_twin_drop(c);
}

void *db_cuda_twin_alloc(db_ctx *c, size_t n)
{
    twin_drop_stale(c);
    if (!db_cuda_prec16(c) || db_cuda_st(c)->twins_off || n == 0)
        return NULL;
    return db_cuda_alloc(c, n * 2);
}

void db_cuda_twin_put(db_ctx *c, const float *p, size_t n, void *s)
{
    twin_drop_stale(c);
    db_cuda_state *st = db_cuda_st(c);
    if (s && (st->twins_off || !db_cuda_prec16(c) || st->ntwin == DB_CUDA_NTWIN)) {
        db_cuda_free(c, s);
        return;
    }
    if (!s)
        return;
    for (int i = 0; i < st->ntwin; i++)
        if (st->twin_p[i] == p) { // (the op wrote p again: the newer form stands)
            db_cuda_free(c, st->twin_s[i]);
            st->twin_n[i] = n, st->twin_s[i] = s;
            st->twins_made++;
            return;
        }
    const int i = st->ntwin++;
    st->twin_p[i] = p;
    st->twin_n[i] = n;
    st->twin_s[i] = s;
    st->twin_prec = c->precision;
    st->twin_seq = c->op_seq;
    st->twins_made++;
}

int db_cuda_twin_launched(db_ctx *c, const float *p, size_t n, void *s, const char *what)
{
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        db_cuda_free(c, s);
        return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "%s: %s", what, cudaGetErrorString(e));
    }
    db_cuda_twin_put(c, p, n, s);
    return 0;
}

// The twin of exactly [src, src + n) made by the op before this one in the
// ctx's compute type, handed over (the caller frees it as its scratch);
// NULL: none (stale ones are freed)
static void *twin_take(db_ctx *c, const float *src, size_t n)
{
    db_cuda_state *st = db_cuda_st(c);
    if (!st->ntwin)
        return NULL;
    if (st->twin_seq + 1 != c->op_seq || st->twin_prec != (int)c->precision) {
        db_cuda_twin_drop(c);
        return NULL;
    }
    for (int i = 0; i < st->ntwin; i++)
        if (st->twin_p[i] == src && st->twin_n[i] == n) {
            void *s = st->twin_s[i];
            const int last = --st->ntwin;
            st->twin_p[i] = st->twin_p[last], st->twin_n[i] = st->twin_n[last], st->twin_s[i] = st->twin_s[last];
            st->twin_s[last] = NULL, st->twin_p[last] = NULL;
            st->twins_used++;
            return s;
        }
    return NULL;
}

void *db_cuda_to16(db_ctx *c, const float *src, size_t n)
{
    db_cuda_shadow *w = n ? db_cuda_shadow_find(c, src, n * sizeof(float)) : NULL;
    if (w)
        return lend(c, w, src);
    if (void *t = n ? twin_take(c, src, n) : NULL)
        return t;
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
    const int v = vec4(dst, src, n);
    if (c->precision == DB_PREC_F16)
        to16_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>((__half *)dst, src, n, v);
    else
        to16_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>((__nv_bfloat16 *)dst, src, n, v);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "to16 kernel: %s", cudaGetErrorString(e));
        return NULL;
    }
    return dst;
}

// db_cuda_to16_many's pass: the quads (four elements) of k tensors as one
// index space, q0[i] the first quad of tensor i; a quad four at a time when
// its tensor's pointers allow (vec) and it is whole, else one by one
struct to16_segs {
    const float *src[DB_CUDA_TO16_MANY];
    void *dst[DB_CUDA_TO16_MANY];
    size_t n[DB_CUDA_TO16_MANY], q0[DB_CUDA_TO16_MANY + 1];
    int vec[DB_CUDA_TO16_MANY], k;
};

template <typename T> __global__ static void to16_many_kernel(const to16_segs s)
{
    typedef typename quad<T>::t TV;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t g = blockIdx.x * (size_t)blockDim.x + threadIdx.x; g < s.q0[s.k]; g += stride) {
        int i = 0;
        while (g >= s.q0[i + 1])
            i++;
        const size_t e = (g - s.q0[i]) * 4;
        const float *src = s.src[i];
        T *dst = (T *)s.dst[i];
        if (s.vec[i] && e + 4 <= s.n[i]) {
            const f32x4 a = ((const f32x4 *)src)[e / 4];
            TV b;
            for (int j = 0; j < 4; j++)
                store16(&b.v[j], a.v[j]);
            ((TV *)dst)[e / 4] = b;
        } else {
            for (size_t j = e; j < e + 4 && j < s.n[i]; j++)
                store16(dst + j, src[j]);
        }
    }
}

int db_cuda_to16_many(db_ctx *c, void **dst, const float *const *src, const size_t *n, int k)
{
    to16_segs s;
    memset(&s, 0, sizeof s);
    int r = 0;
    for (int i = 0; i < k; i++) {
        dst[i] = NULL;
        db_cuda_shadow *w = n[i] ? db_cuda_shadow_find(c, src[i], n[i] * sizeof(float)) : NULL;
        if (n[i] == 0)
            continue;
        if (w) { // a weight's working copy, lent
            if (!(dst[i] = lend(c, w, src[i])))
                r = -1;
            continue;
        }
        if ((dst[i] = twin_take(c, src[i], n[i]))) // the previous op's rounded output
            continue;
        if (!(dst[i] = db_cuda_alloc(c, n[i] * 2))) {
            r = -1;
            continue;
        }
        s.src[s.k] = src[i], s.dst[s.k] = dst[i], s.n[s.k] = n[i], s.vec[s.k] = vec4(dst[i], src[i], n[i]);
        s.q0[s.k + 1] = s.q0[s.k] + (n[i] + 3) / 4;
        s.k++;
    }
    if (r == 0 && s.k) {
        cudaStream_t st = db_cuda_st(c)->stream;
        const unsigned grid = db_cuda_grid(s.q0[s.k], CONV_THREADS);
        if (c->precision == DB_PREC_F16)
            to16_many_kernel<__half><<<grid, CONV_THREADS, 0, st>>>(s);
        else
            to16_many_kernel<__nv_bfloat16><<<grid, CONV_THREADS, 0, st>>>(s);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "to16_many kernel: %s", cudaGetErrorString(e));
    }
    if (r != 0)
        for (int i = 0; i < k; i++) {
            db_cuda_free(c, dst[i]);
            dst[i] = NULL;
        }
    return r ? -1 : 0;
}

// db_cuda_widen's pass: the quads (four elements) of the jobs as one index
// space, q0[i] the first quad of job i; a quad four at a time when the
// job's pointers allow (vec) and it is whole, else one by one.  An element:
// the first source by put, then each further source added in order -- the
// float32 operations of m db_cuda_from16 calls (put, then DB_PUT_ADD).
struct widen_segs {
    db_cuda_widen_job j[DB_CUDA_TO16_MANY];
    size_t q0[DB_CUDA_TO16_MANY + 1];
    int vec[DB_CUDA_TO16_MANY], k;
};

template <typename T> __device__ __forceinline__ static float widen_one(const db_cuda_widen_job &j, size_t e)
{
    const T *s = (const T *)j.src + e;
    float v = j.put == DB_PUT_ADD ? j.dst[e] : 0.0f;
    db_cuda_put(&v, load16(s), j.put);
    for (int m = 1; m < j.m; m++)
        v = __fadd_rn(v, load16(s + (size_t)m * j.stride));
    return v;
}

template <typename T> __global__ static void widen_kernel(const widen_segs s)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t g = blockIdx.x * (size_t)blockDim.x + threadIdx.x; g < s.q0[s.k]; g += stride) {
        int i = 0;
        while (g >= s.q0[i + 1])
            i++;
        const db_cuda_widen_job &j = s.j[i];
        const size_t e = (g - s.q0[i]) * 4;
        if (s.vec[i] && e + 4 <= j.n) {
            f32x4 d;
            if (j.put == DB_PUT_ADD)
                d = *(const f32x4 *)(j.dst + e);
            x4_16<T> a = *(const x4_16<T> *)((const T *)j.src + e);
            for (int k = 0; k < 4; k++)
                db_cuda_put(&d.v[k], load16(&a.v[k]), j.put);
            for (int m = 1; m < j.m; m++) {
                a = *(const x4_16<T> *)((const T *)j.src + (size_t)m * j.stride + e);
                for (int k = 0; k < 4; k++)
                    d.v[k] = __fadd_rn(d.v[k], load16(&a.v[k]));
            }
            *(f32x4 *)(j.dst + e) = d;
        } else {
            for (size_t x = e; x < e + 4 && x < j.n; x++)
                j.dst[x] = widen_one<T>(j, x);
        }
    }
}

int db_cuda_widen(db_ctx *c, const db_cuda_widen_job *jobs, int k)
{
    widen_segs s;
    memset(&s, 0, sizeof s);
    for (int i = 0; i < k; i++) {
        const db_cuda_widen_job &j = jobs[i];
        if (!j.dst || j.n == 0 || j.m < 1)
            continue;
        if (s.k == DB_CUDA_TO16_MANY)
            return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "widen: more than %d jobs", DB_CUDA_TO16_MANY);
        s.j[s.k] = j;
        s.vec[s.k] = (uintptr_t)j.dst % 16 == 0 && (uintptr_t)j.src % 8 == 0 && (j.m == 1 || j.stride % 4 == 0);
        s.q0[s.k + 1] = s.q0[s.k] + (j.n + 3) / 4;
        s.k++;
    }
    if (s.k == 0)
        return 0;
    cudaStream_t st = db_cuda_st(c)->stream;
    const unsigned grid = db_cuda_grid(s.q0[s.k], CONV_THREADS);
    if (c->precision == DB_PREC_F16)
        widen_kernel<__half><<<grid, CONV_THREADS, 0, st>>>(s);
    else
        widen_kernel<__nv_bfloat16><<<grid, CONV_THREADS, 0, st>>>(s);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "widen kernel: %s", cudaGetErrorString(e));
    return 0;
}

int db_cuda_from16_many(db_ctx *c, float *const *dst, const void *src, size_t n, int k)
{
    db_cuda_widen_job j[DB_CUDA_TO16_MANY];
    for (int i = 0; i < k && i < DB_CUDA_TO16_MANY; i++)
        j[i] = db_cuda_widen_job{dst[i], (const char *)src + (size_t)i * n * 2, n, 1, 0, DB_PUT_SET};
    return db_cuda_widen(c, j, k);
}

int db_cuda_from16(db_ctx *c, float *dst, const void *src, size_t n, int put)
{
    if (n == 0)
        return 0;
    cudaStream_t s = db_cuda_st(c)->stream;
    const int v = vec4(dst, src, n);
    if (put == DB_PUT_PACK16) {
        if (c->precision == DB_PREC_F16)
            pack16_copy_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>((__half *)dst, (const __half *)src, n, v);
        else
            pack16_copy_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>((__nv_bfloat16 *)dst, (const __nv_bfloat16 *)src,
                                                                  n, v);
        DB_LAUNCHED(c);
        return 0;
    }
    if (c->precision == DB_PREC_F16)
        from16_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>(dst, (const __half *)src, n, put, v);
    else
        from16_kernel<<<grid4(n, v), CONV_THREADS, 0, s>>>(dst, (const __nv_bfloat16 *)src, n, put, v);
    DB_LAUNCHED(c);
    return 0;
}

int db_cuda_round_as(db_ctx *c, float *dst, const float *src, size_t n, int f16, int put)
{
    if (n == 0)
        return 0;
    const int v = vec4(dst, src, n);
    if (put == DB_PUT_PACK16) {
        if (f16)
            pack16_round_kernel<<<grid4(n, v), CONV_THREADS, 0, db_cuda_st(c)->stream>>>((__half *)dst, src, n, 1, v);
        else
            pack16_round_kernel<<<grid4(n, v), CONV_THREADS, 0, db_cuda_st(c)->stream>>>((__nv_bfloat16 *)dst, src,
                                                                                          n, 0, v);
        DB_LAUNCHED(c);
        return 0;
    }
    round_kernel<<<grid4(n, v), CONV_THREADS, 0, db_cuda_st(c)->stream>>>(dst, src, n, f16, put, v);
    DB_LAUNCHED(c);
    return 0;
}

int db_cuda_round(db_ctx *c, float *dst, const float *src, size_t n, int put)
{
    return db_cuda_round_as(c, dst, src, n, c->precision == DB_PREC_F16, put);
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
