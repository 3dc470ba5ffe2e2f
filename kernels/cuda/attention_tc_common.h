// What the tensor-core attention forward (attention_tc.cu) and backward
// (attention_tc_backward.cu) share: the block and tile geometry, the bf16 /
// fp16 traits, staging head rows into shared memory, the P V-shaped WMMA
// product and the fp32 row store.  One copy, because the backward recomputes
// the forward's P from its lse: the two must agree on the score scale, and
// each product sums in one fixed order (bitwise deterministic results).
// Internal to libdb_cuda.so (C++, compiled by nvcc or, translated, by the
// CPU emulator of tests/gpu/emu).
#ifndef DB_CUDA_ATTENTION_TC_COMMON_H
#define DB_CUDA_ATTENTION_TC_COMMON_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <mma.h>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cp_async.h"
#include "kernels/cuda/cuda.h"

namespace db_attn_tc {

using namespace nvcuda;

enum {
    NWARP = 4,       // warps per block
    BR = 16 * NWARP, // rows a block owns (forward: queries; backward: queries, then keys): 16 per warp
    BT = 64,         // streamed tile (forward: keys; backward: keys, then queries)
    LDS = BT + 8,    // row stride of the fp32 strips (floats) and of the forward's Ps (elements)
    TC_HS_MAX = 160, // ND = HSP / 16 <= 10
};

// The kernels are instantiated per fragment count ND = ceil(HS / 16), 1 ..
// TC_HS_MAX / 16: f(std::integral_constant<int, ND>{}) for the head size's
// (the callers have checked HS against TC_HS_MAX).
template <int ND = 1, typename F> inline int with_nd(int HS, F &&f)
{
    if constexpr (ND < TC_HS_MAX / 16)
        if ((HS + 15) / 16 > ND)
            return with_nd<ND + 1>(HS, f);
    return f(std::integral_constant<int, ND>{});
}

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): two run-time
// switches (the mma.sync kernels' cp.async pipeline and ldmatrix loads) as
// template arguments
template <typename F> inline int with_flags(bool a, bool b, F &&f)
{
    if (a)
        return b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
    return b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

// f(T{}, pipe, ldsm): the compute type (DB_PREC_BF16: __nv_bfloat16, else
// __half) and the mma.sync kernels' two switches (with_flags) as template
// arguments; the forward and backward launchers' one dispatch
template <typename F> inline int with_types(int dtype, bool pipe, bool ldsm, F &&f)
{
    return with_flags(pipe, ldsm, [&](auto p, auto l) {
        return dtype == DB_PREC_BF16 ? f(__nv_bfloat16(), p, l) : f(__half(), p, l);
    });
}

// log2(e) / sqrt(HS), computed in double and rounded once to fp32: the scale
// that takes q . k to log2 units (the softmax runs on exp2f); the backward
// recomputes the forward's P with it, so both must use this one
inline float score_scale_log2(int HS)
{
    return (float)(1.0 / sqrt((double)HS) * 1.4426950408889634);
}

// the compute type T (bf16 or fp16): fp32 -> T rounded to nearest even,
// T -> fp32 (exact), and T's 16 bits (to pack rounded values, pack4);
// pair: two floats rounded as from() into one word (lo in the low half:
// one cvt.rn.*x2 instruction), lo / hi: a word's halves back to fp32
template <typename T, typename R> struct tc_halves {
    static __device__ __forceinline__ float lo(uint32_t w) { return half_of(w & 0xffffu); }
    static __device__ __forceinline__ float hi(uint32_t w) { return half_of(w >> 16); }
    static __device__ __forceinline__ float half_of(uint32_t u)
    {
        R r;
        r.x = (unsigned short)u;
        return (float)T(r);
    }
    template <typename R2> static __device__ __forceinline__ uint32_t word(R2 r)
    {
        return (uint32_t)r.x | (uint32_t)r.y << 16;
    }
};
template <typename T> struct tc;
template <> struct tc<__nv_bfloat16> : tc_halves<__nv_bfloat16, __nv_bfloat16_raw> {
    static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ unsigned bits(__nv_bfloat16 x) { return ((__nv_bfloat16_raw)x).x; }
    static __device__ __forceinline__ uint32_t pair(float lo, float hi)
    {
        return word((__nv_bfloat162_raw)__floats2bfloat162_rn(lo, hi));
    }
};
template <> struct tc<__half> : tc_halves<__half, __half_raw> {
    static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
    static __device__ __forceinline__ unsigned bits(__half x) { return ((__half_raw)x).x; }
    static __device__ __forceinline__ uint32_t pair(float lo, float hi)
    {
        return word((__half2_raw)__floats2half2_rn(lo, hi));
    }
};

// *p = (x, y) (two consecutive floats, 8-byte aligned), each rounded to T
// and kept fp32 when rnd: the 16-bit ops' outputs as the kernels store them
template <typename T> __device__ __forceinline__ void put2(float *p, float x, float y, int rnd)
{
    if (rnd)
        x = tc<T>::to(tc<T>::from(x)), y = tc<T>::to(tc<T>::from(y));
    *(float2 *)p = make_float2(x, y);
}

// 2^x for the mma.sync kernels' probabilities (x: a score less the row's
// reference max, or its log-sum-exp in the backward): the bare MUFU.EX2
// (ex2.approx.ftz), without the compare and two multiplies exp2f adds to
// keep results under 2^-126; those are flushed to 0.  The forward's sums
// stay as they were (a row's sums hold a term >= 1 from the tile that set
// its reference, so a term under 2^-126 is lost in their rounding); in the
// backward such a P, times dP - D or dO, is below every fp32 sum's
// rounding unless the whole sum is as small (fp16 rounds it to 0 anyway).
// The emulator: exp2f, flushed the same way.
__device__ __forceinline__ float exp2_ftz(float x)
{
#ifdef DB_CUDA_EMU_H
    const float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.0f : y;
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// four consecutive compute-type elements (their bits, as tc<T>::bits) as
// one 8-byte store: a lane writes its column quad of a rounded row at once
__device__ __forceinline__ uint2 pack4(const unsigned (&u)[4])
{
    return make_uint2(u[0] | u[1] << 16, u[2] | u[3] << 16);
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> facc;

// n rows of a head (16-byte pieces, zero past HS and past `valid` rows) from
// x (B, T, NH*HS) at row r0 into dst (n, LDH)
template <typename T>
__device__ __forceinline__ void load_rows(T *dst, const T *x, int b, int h, int r0, int n, int valid, int T_, int NH,
                                          int HS, int LDH)
{
    const int CH = LDH / 8, HC = HS / 8;
    const size_t C = (size_t)NH * HS;
    for (int t = threadIdx.x; t < n * CH; t += blockDim.x) {
        const int rr = t / CH, cc = t % CH, r = r0 + rr;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (cc < HC && r < valid)
            val = *(const uint4 *)(x + ((size_t)b * T_ + r) * C + (size_t)h * HS + 8 * cc);
        *(uint4 *)(dst + rr * LDH + 8 * cc) = val;
    }
}

// The key and value tile at key j0: BT rows of k and v (B, Tk, NH*HS) into
// Ks and Vs (BT, LDH) as load_rows stages them (zero past HS and past Tk),
// in one loop, so that a thread has both loads of a chunk in flight at once.
// ASYNC: queued as cp.async copies instead (cp_async.h; the caller commits
// and waits).
template <bool ASYNC = false, typename T>
__device__ __forceinline__ void load_kv_tile(T *Ks, T *Vs, const T *k, const T *v, int b, int h, int j0, int Tk,
                                             int NH, int HS, int LDH)
{
    const int CH = LDH / 8, HC = HS / 8;
    const size_t C = (size_t)NH * HS;
    for (int t = threadIdx.x; t < BT * CH; t += blockDim.x) {
        const int jj = t / CH, cc = t % CH, j = j0 + jj;
        const bool in = cc < HC && j < Tk;
        const size_t src = in ? ((size_t)b * Tk + j) * C + (size_t)h * HS + 8 * cc : 0;
        T *const kd = Ks + jj * LDH + 8 * cc, *const vd = Vs + jj * LDH + 8 * cc;
        if constexpr (ASYNC) {
            db_cp::copy16(kd, k + src, in ? 16 : 0);
            db_cp::copy16(vd, v + src, in ? 16 : 0);
        } else {
            uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
            if (in) {
                kx = *(const uint4 *)(k + src);
                vx = *(const uint4 *)(v + src);
            }
            *(uint4 *)kd = kx;
            *(uint4 *)vd = vx;
        }
    }
}

// acc (16 x HSP) += A Y: A (16 x 64, compute type) the warp's rows at aw
// (ldm lda), Y (64 x HSP) row-major in ys (LDH); each output fragment sums
// its four 16-key slices in key order
template <typename T, int ND>
__device__ __forceinline__ void gemm_nn(facc (&acc)[ND], const T *aw, int lda, const T *ys)
{
    constexpr int LDH = 16 * ND + 8;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[BT / 16];
#pragma unroll
    for (int kk = 0; kk < BT / 16; kk++)
        wmma::load_matrix_sync(a[kk], aw + 16 * kk, lda);
#pragma unroll
    for (int n = 0; n < ND; n++) {
#pragma unroll
        for (int kk = 0; kk < BT / 16; kk++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
            wmma::load_matrix_sync(bf, ys + kk * 16 * LDH + 16 * n, LDH);
            wmma::mma_sync(acc[n], a[kk], bf, acc[n]);
        }
    }
}

// out rows r0 .. r0 + 15 (row-major (B, Tr, NH*HS), fp32) = f acc, through
// the warp's strip sw, one row at a time across the warp (coalesced).  f is
// the same in every lane, or PER_ROW: row rr is scaled by lane 2 rr's f (the
// lane pair that owns the row in the row-wise work).  Not PER_ROW, f stays a
// compile-time constant where the caller's is (1.0f: no multiply at all).
// Fragments acc[g, g + n) (n <= 4) into the warp's strip sw (16 x 64
// floats, row stride LDS), between warp barriers (the strip is reused).
template <int ND> __device__ __forceinline__ void stage4(float *sw, const facc (&acc)[ND], int g, int n)
{
    __syncwarp();
#pragma unroll
    for (int t = 0; t < 4; t++)
        if (t < n)
            wmma::store_matrix_sync(sw + 16 * t, acc[g + t], LDS, wmma::mem_row_major);
    __syncwarp();
}

template <int ND, bool PER_ROW = false>
__device__ __forceinline__ void store_rows(float *out, const facc (&acc)[ND], float f, float *sw, int b, int h, int r0,
                                           int Tr, int NH, int HS, int lane)
{
    const size_t C = (size_t)NH * HS;
#pragma unroll
    for (int g = 0; g < ND; g += 4) {
        const int n = ND - g < 4 ? ND - g : 4;
        stage4(sw, acc, g, n);
        for (int rr = 0; rr < 16; rr++) {
            const int ir = r0 + rr, d = 16 * g + lane;
            if (ir >= Tr) // the same rr in every lane: the whole warp leaves
                break;
            const float fr = PER_ROW ? __shfl_sync(0xffffffffu, f, 2 * rr) : f;
            float *dst = out + ((size_t)b * Tr + ir) * C + (size_t)h * HS;
            if (lane < 16 * n && d < HS)
                dst[d] = sw[rr * LDS + lane] * fr;
            if (lane + 32 < 16 * n && d + 32 < HS)
                dst[d + 32] = sw[rr * LDS + lane + 32] * fr;
        }
    }
    __syncwarp();
}

// For the test hooks: n floats rounded to the compute type (round to
// nearest even) and uploaded as raw 16-bit words; waits for the copy, since
// the host staging buffer dies at return
inline void *to_device_type(db_ctx *c, const float *x, size_t n, int dtype)
{
    std::vector<unsigned short> h(n);
    for (size_t i = 0; i < n; i++)
        h[i] = dtype == DB_PREC_BF16 ? ((__nv_bfloat16_raw)__float2bfloat16_rn(x[i])).x
                                     : ((__half_raw)__float2half_rn(x[i])).x;
    void *d = db_cuda_alloc(c, n * 2 + 16);
    if (d && cudaMemcpyAsync(d, h.data(), n * 2, cudaMemcpyHostToDevice, db_cuda_st(c)->stream) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "cudaMemcpyAsync: %s", cudaGetErrorString(cudaGetLastError()));
        db_cuda_free(c, d);
        return NULL;
    }
    if (d && cudaStreamSynchronize(db_cuda_st(c)->stream) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "cudaStreamSynchronize: %s",
                     cudaGetErrorString(cudaGetLastError()));
        db_cuda_free(c, d);
        return NULL;
    }
    return d;
}

} // namespace db_attn_tc

#endif
