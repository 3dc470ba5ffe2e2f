// Scaled dot-product attention forward on tensor cores, for the bf16 / fp16
// precision modes (kernels/ops.h db_precision): flash attention (online
// softmax over key tiles, no (Tq, Tk) matrix) through the portable
// nvcuda::wmma API, 16x16x16 fragments of bf16 or fp16 with fp32
// accumulators.  Same math and conventions as attention.cu (the fp32 twin):
// scores in log2 units (q.k * log2(e) / sqrt(HS), here applied in fp32 to the
// fp32 score, not to q), softmax with exp2f, lse = ln 2 * (m + log2 l) in
// double, causal = query i sees keys j <= i (top-left).
//
// Block: NWARP = 4 warps over (b, h, BR = 64 queries); warp w owns query rows
// 16w..16w+15 of the block.  Shared memory (rows padded by 8 elements = 16
// bytes so the 8 rows an ldmatrix phase reads land in distinct banks):
//   Ks, Vs (BT = 64 keys, HSP + 8)  the key tile, compute type; HSP = HS
//           rounded up to 16 with zero columns, rows past Tk zero
//   Ss     (BR, 72) fp32            scores, each warp its 16-row strip
//   Ps     (BR, 72) compute type    probabilities
//   Qs     (BR, HSP + 8)            the queries, only until every warp holds
//           its Q fragments in registers: it aliases Ss and Ps
// Per key tile, each warp:
//   1. S (16 x 64) = Q K^T: 4 accumulator fragments, HSP/16 mma each, stored
//      to its strip of Ss (WMMA leaves the fragment element -> (row, col)
//      mapping unspecified, so everything row-wise goes through memory);
//   2. softmax in fp32: lane pair (2r, 2r+1) owns row r, each lane 8 float4
//      column quads (interleaved so a quarter-warp's float4 reads hit 8
//      distinct 16-byte bank groups); row max by a shuffle, p = exp2(s - m),
//      P rounded to the compute type (THE one rounded intermediate: the
//      tensor cores take bf16/fp16 operands) and stored to Ps;
//   3. O (16 x HSP, fp32 accumulator fragments kept in registers) += P V.
// O is never rescaled row-wise in registers (the mapping is unspecified).
// Instead the reference max m of a row moves only when the tile's max
// exceeds it by more than RESCALE_LOG2 = 8 (a factor 256): p <= 2^8 then,
// exact enough in fp32 sums and far from fp16's 65504.  When a row of the
// warp must move (rare after the first tile: score maxima of later tiles
// seldom jump by 8 in log2 units), the warp round-trips its O fragments
// through its Ss strip and scales rows there.  The first visible tile only
// sets m (O is zero).  l sums the fp32 p (for lse, so lse is as accurate as
// the fp32 kernel's), lt the rounded p (for out = O / lt: the weights that
// multiplied V sum to 1, a constant V row comes out exact).
//
// Tile choice for H100 (228 KB shared memory and 64 K registers per SM):
// 64 queries x 64 keys per block of 4 warps, so S and P stay 16 x 64 per
// warp, and 48 KB (HS 40) .. 90 KB (HS 160) of shared memory: 4-5 blocks
// (16-20 warps) per SM at HS 40, 2-3 at HS 160.  Larger query tiles per warp
// would cut the K/V fragment reloads but need more registers for S.
//
// Expected speed (estimate, to be measured): the H100 SXM dense bf16 peak
// of ~990 TFLOP/s is wgmma's; mma.sync (what WMMA compiles to: HMMA in
// SASS) reaches roughly 60 % of it in microbenchmarks, and tuned mma.sync
// flash attention (FlashAttention-2) ~35 % at head dim 64-128.  This kernel
// round-trips S and P through shared memory (per warp and key tile at
// HS 40: ~24 KB of shared traffic for ~0.2 MFLOP of mma, HS padded 40 -> 48
// wastes 1/6), does not pipeline the K/V loads (no cp.async / TMA), and does
// 32 exp2 per lane per tile: it is shared-memory and issue bound.  Expect
// 8-15 % of peak, ~80-150 TFLOP/s: 0.3-0.55 ms for SD1.5's first level
// self-attention (B 2, 4096 x 4096, 8 x 40: 43 GFLOP) against 5-10 ms
// predicted for the fp32 SIMT kernel.  Cross-attention (Tk = 77, two key
// tiles, 60 % used) is bound by reading q and writing the fp32 out.  Levers
// after measuring: cp.async double buffering of K/V, S kept in registers
// with mma.sync PTX (known fragment layout: attention_mma.cu, the default
// since the H200 timed it; DB_ATTN_MMA=0 selects this kernel), then wgmma + TMA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <mma.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/attention_tc.h"
#include "kernels/cuda/attention_tc_common.h"

using namespace nvcuda;
using namespace db_attn_tc;

namespace {

constexpr float RESCALE_LOG2 = 8.0f; // move a row's reference max when it grows by more (log2 units)

// Multiply row r of the warp's O (16 x 16 ND, fragments o) by f: lane pair
// (2r, 2r+1) passes its row's factor.  Through the warp's Ss strip (16 x 64
// floats), 4 fragments at a time.
template <int ND> __device__ __forceinline__ void scale_rows(facc (&o)[ND], float *sw, float f, int r, int hf)
{
#pragma unroll
    for (int g = 0; g < ND; g += 4) {
        const int n = ND - g < 4 ? ND - g : 4;
        stage4(sw, o, g, n);
        for (int cc = hf; cc < 16 * n; cc += 2)
            sw[r * LDS + cc] *= f;
        __syncwarp();
#pragma unroll
        for (int t = 0; t < 4; t++)
            if (t < n)
                wmma::load_matrix_sync(o[g + t], sw + 16 * t, LDS, wmma::mem_row_major);
    }
    __syncwarp();
}

// grid (ceil(Tq / BR), B * NH), block NWARP * 32, dynamic shared memory
// 2 BT (HSP + 8) sizeof(T) + BR LDS (4 + sizeof(T)) bytes.
template <typename T, int ND>
__global__ static void __launch_bounds__(NWARP * 32)
    attention_tc_kernel(float *out, float *lse, const T *q, const T *k, const T *v, int Tq, int Tk, int NH, int HS,
                        int causal, float qscale, float rescale)
{
    constexpr int HSP = 16 * ND, LDH = HSP + 8;
    static_assert(BR * LDH * sizeof(T) <= BR * LDS * (sizeof(float) + sizeof(T)), "Qs must fit in Ss + Ps");
    extern __shared__ __align__(128) float smem[];
    T *Ks = (T *)smem;                    // (BT, LDH)
    T *Vs = Ks + BT * LDH;                // (BT, LDH)
    float *Ss = (float *)(Vs + BT * LDH); // (BR, LDS)
    T *Ps = (T *)(Ss + BR * LDS);         // (BR, LDS)
    T *Qs = (T *)Ss;                      // (BR, LDH), until the Q fragments are loaded
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    load_rows(Qs, q, b, h, i0, BR, Tq, Tq, NH, HS, LDH);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[ND];
#pragma unroll
    for (int d = 0; d < ND; d++)
        wmma::load_matrix_sync(qa[d], Qs + warp * 16 * LDH + 16 * d, LDH);
    facc o[ND];
#pragma unroll
    for (int d = 0; d < ND; d++)
        wmma::fill_fragment(o[d], 0.0f);

    // softmax: lane pair (2r, 2r + 1) owns row r of the warp's strip
    const int r = lane >> 1, hf = lane & 1, row = warp * 16 + r, i = i0 + row;
    float *sw = Ss + warp * 16 * LDS, *srow = Ss + row * LDS;
    T *pw = Ps + warp * 16 * LDS, *prow = Ps + row * LDS;
    float m = -INFINITY, l = 0.0f, lt = 0.0f;
    // keys this row may see: j < jlim
    const int jlim = causal && i + 1 < Tk ? i + 1 : Tk;
    // causal: no query of the block sees a key past its last query
    const int kend = causal && i0 + BR < Tk ? i0 + BR : Tk;

    for (int j0 = 0; j0 < kend; j0 += BT) {
        __syncthreads(); // the previous tile is consumed; every warp holds its Q fragments (Qs is dead)
        load_kv_tile(Ks, Vs, k, v, b, h, j0, Tk, NH, HS, LDH);
        __syncthreads();

        // 1. S = Q K^T into the warp's strip
#pragma unroll
        for (int n = 0; n < BT / 16; n++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
            facc s;
            wmma::fill_fragment(s, 0.0f);
#pragma unroll
            for (int d = 0; d < ND; d++) {
                wmma::load_matrix_sync(kb, Ks + n * 16 * LDH + 16 * d, LDH);
                wmma::mma_sync(s, qa[d], kb, s);
            }
            wmma::store_matrix_sync(sw + 16 * n, s, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // 2. online softmax of row r: this lane's column quads 2t + hf
        float sv[32];
        float tmax = -INFINITY;
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const int c0 = 4 * (2 * t + hf);
            const float4 x = *(const float4 *)(srow + c0);
            const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float y = j0 + c0 + e < jlim ? xs[e] * qscale : -INFINITY;
                sv[4 * t + e] = y;
                tmax = fmaxf(tmax, y);
            }
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const bool up = tmax > m + rescale; // also the row's first visible tile (m = -inf)
        const float mnew = up ? tmax : m;
        const float corr = up ? exp2f(m - mnew) : 1.0f; // 0 on the first visible tile
        int need = up && m != -INFINITY;                 // O holds something to rescale
#pragma unroll
        for (int o_ = 16; o_ > 0; o_ >>= 1)
            need |= __shfl_xor_sync(0xffffffffu, need, o_);
        const float mref = mnew == -INFINITY ? 0.0f : mnew; // a row that saw nothing yet: p = 0, not NaN
        float ps = 0.0f, pts = 0.0f;
#pragma unroll
        for (int t = 0; t < 8; t++) {
            unsigned u[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = exp2f(sv[4 * t + e] - mref);
                const T pr = tc<T>::from(p);
                ps += p;
                pts += tc<T>::to(pr);
                u[e] = tc<T>::bits(pr);
            }
            *(uint2 *)(prow + 4 * (2 * t + hf)) = pack4(u);
        }
        ps += __shfl_xor_sync(0xffffffffu, ps, 1);
        pts += __shfl_xor_sync(0xffffffffu, pts, 1);
        l = l * corr + ps;
        lt = lt * corr + pts;
        m = mnew;
        if (need) // warp-uniform
            scale_rows<ND>(o, sw, corr, r, hf);
        __syncwarp();

        // 3. O += P V
        gemm_nn<T, ND>(o, pw, LDS, Vs);
    }

    // out = O / lt: lane pair (2r, 2r + 1) holds row r's 1 / lt
    store_rows<ND, true>(out, o, 1.0f / lt, sw, b, h, i0 + warp * 16, Tq, NH, HS, lane);
    if (lse && hf == 0 && i < Tq)
        lse[(size_t)bh * Tq + i] = (float)(0.6931471805599453 * ((double)m + log2((double)l)));
}

template <typename T, int ND>
static int launch(db_ctx *c, float *out, float *lse, const void *q, const void *k, const void *v, int B, int Tq,
                  int Tk, int NH, int HS, int causal, float rescale)
{
    constexpr int LDH = 16 * ND + 8;
    const size_t smem = sizeof(T) * 2 * BT * LDH + (sizeof(float) + sizeof(T)) * BR * LDS;
    void (*kern)(float *, float *, const T *, const T *, const T *, int, int, int, int, int, float, float) =
        attention_tc_kernel<T, ND>;
    if (db_cuda_smem_optin(c, kern, smem))
        return -1;
    const float qscale = score_scale_log2(HS);
    dim3 grid((unsigned)((Tq + BR - 1) / BR), (unsigned)(B * NH));
    kern<<<grid, NWARP * 32, smem, db_cuda_st(c)->stream>>>(out, lse, (const T *)q, (const T *)k, (const T *)v, Tq, Tk,
                                                             NH, HS, causal, qscale, rescale);
    DB_LAUNCHED(c);
    return 0;
}

template <typename T>
static int dispatch(db_ctx *c, float *out, float *lse, const void *q, const void *k, const void *v, int B, int Tq,
                    int Tk, int NH, int HS, int causal, float rescale)
{
    return with_nd(HS, [&](auto nd) {
        return launch<T, decltype(nd)::value>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal, rescale);
    });
}

int attention_tc(db_ctx *c, float *out, void *out16, int *wrote16, float *lse, const void *q, const void *k,
                 const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS, int causal, float rescale, int rnd)
{
    if (wrote16)
        *wrote16 = 0;
    DB_ENTER(c);
    if (dtype != DB_PREC_BF16 && dtype != DB_PREC_F16)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc: dtype %d is not bf16 (1) or fp16 (2)",
                            dtype);
    if (HS < 8 || HS > TC_HS_MAX || HS % 8 != 0)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc: head size %d not a multiple of 8 in 8..%d",
                            HS, TC_HS_MAX);
    if (B * NH > 65535)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc: %d batch x heads over 65535", B * NH);
    if (((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) & 15) // the tiles are read 16 bytes at a time
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc: q, k, v not 16-byte aligned");
    if (B * NH == 0 || Tq == 0)
        return 0;
    // the mma.sync kernel (attention_mma.cu) unless DB_ATTN_MMA=0: on an H200
    // (2026-11-27) it took 0.455 ms where this WMMA one took 0.547 at SD1.5's
    // bf16 self-attention, and no more at any shape in bf16 (fp16: even)
    // (rnd: the mma.sync kernel rounds out as it stores it; after the WMMA
    // one, a rounding pass)
    if (db_cuda_attn_mma()) {
        const int r = db_cuda_attention_mma_forward(c, out, rnd ? out16 : NULL, lse, q, k, v, dtype, B, Tq, Tk, NH,
                                                    HS, causal, rescale, rnd);
        if (r == 0 && wrote16)
            *wrote16 = rnd && out16;
        return r;
    }
    const int r = dtype == DB_PREC_BF16
                      ? dispatch<__nv_bfloat16>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal, rescale)
                      : dispatch<__half>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal, rescale);
    if (r != 0 || !rnd)
        return r;
    return db_cuda_round_as(c, out, out, (size_t)B * Tq * NH * HS, dtype == DB_PREC_F16, 0);
}

// ---- test hook -------------------------------------------------------------------------------

struct tc_args {
    float *out, *lse;
    const void *q, *k, *v;
    int dtype, B, Tq, Tk, NH, HS, causal;
    float rescale;
    int rnd;
};

int tc_run(db_ctx *c, void *p)
{
    const tc_args *a = (const tc_args *)p;
    return attention_tc(c, a->out, NULL, NULL, a->lse, a->q, a->k, a->v, a->dtype, a->B, a->Tq, a->Tk, a->NH, a->HS,
                        a->causal, a->rescale, a->rnd);
}

} // namespace

bool db_cuda_attn_mma(void)
{
    const char *mma = getenv("DB_ATTN_MMA");
    return !(mma && strcmp(mma, "0") == 0);
}

bool db_cuda_attn_cpasync(void)
{
    const char *e = getenv("DB_ATTN_CPASYNC");
    return !(e && strcmp(e, "0") == 0);
}

bool db_cuda_attn_ldsm(void)
{
    const char *e = getenv("DB_ATTN_LDSM");
    return !(e && strcmp(e, "0") == 0);
}

int db_cuda_attn_mr(void)
{
    const char *e = getenv("DB_ATTN_MR");
    return !e ? 0 : strcmp(e, "1") == 0 ? 1 : strcmp(e, "2") == 0 ? 2 : 0;
}

extern "C" int db_cuda_attention_tc_forward(db_ctx *c, float *out, float *lse, const void *q, const void *k,
                                            const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS,
                                            int causal, int round_out)
{
    return attention_tc(c, out, NULL, NULL, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, RESCALE_LOG2, round_out);
}

int db_cuda_attention_tc_forward_twin(db_ctx *c, float *out, float *lse, const void *q, const void *k, const void *v,
                                      int dtype, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    const size_t n = (size_t)B * Tq * NH * HS;
    void *o16 = db_cuda_twin_alloc(c, n);
    if (c->err.code)
        return -1;
    int wrote16 = 0;
    const int r = attention_tc(c, out, o16, &wrote16, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, RESCALE_LOG2, 1);
    if (r || !wrote16) {
        db_cuda_free(c, o16);
        return r;
    }
    db_cuda_twin_put(c, out, n, o16);
    return 0;
}

extern "C" int db_cuda_time_ms(db_ctx *c, int (*fn)(db_ctx *, void *), void *arg, int warmup, int iters, float *ms);

// For tests/gpu/test_attention_tc.c (a C program that dlopens this library):
// host fp32 q, k, v are rounded to dtype and uploaded, the kernel runs once,
// out and lse (or NULL) come back to host fp32 buffers.  rescale_log2 < 0 is
// the kernel's default threshold for moving a row's reference max (0 moves
// it on every increase, as textbook flash attention).  iters > 0 and ms:
// then *ms = mean milliseconds of `iters` more runs (db_cuda_time_ms).
extern "C" __attribute__((visibility("default"))) int
db_cuda_test_attention_tc(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int dtype,
                          int B, int Tq, int Tk, int NH, int HS, int causal, float rescale_log2, int iters, float *ms)
{
    DB_ENTER(c);
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    void *dq = to_device_type(c, q, nq, dtype), *dk = dq ? to_device_type(c, k, nk, dtype) : NULL;
    void *dv = dk ? to_device_type(c, v, nk, dtype) : NULL;
    float *dout = dv ? (float *)db_cuda_alloc(c, nq * sizeof(float) + 16) : NULL;
    float *dlse = dout && lse ? (float *)db_cuda_alloc(c, nl * sizeof(float) + 16) : NULL;
    int rc = -1;
    tc_args a = {dout, dlse, dq, dk, dv, dtype, B, Tq, Tk, NH, HS, causal, rescale_log2 < 0 ? RESCALE_LOG2 : rescale_log2,
                 0};
    cudaStream_t st = db_cuda_st(c)->stream;
    if (!dout || (lse && !dlse))
        goto done;
    if (tc_run(c, &a) != 0)
        goto done;
    if (cudaMemcpyAsync(out, dout, nq * sizeof(float), cudaMemcpyDeviceToHost, st) != cudaSuccess ||
        (lse && cudaMemcpyAsync(lse, dlse, nl * sizeof(float), cudaMemcpyDeviceToHost, st) != cudaSuccess) ||
        cudaStreamSynchronize(st) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "attention_tc results: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    if (iters > 0 && ms && db_cuda_time_ms(c, tc_run, &a, 2, iters, ms) != 0)
        goto done;
    rc = 0;
done:
    if (dlse)
        db_cuda_free(c, dlse);
    if (dout)
        db_cuda_free(c, dout);
    if (dv)
        db_cuda_free(c, dv);
    if (dk)
        db_cuda_free(c, dk);
    if (dq)
        db_cuda_free(c, dq);
    return rc;
}
