// Scaled dot-product attention BACKWARD on tensor cores, for the bf16 / fp16
// precision modes (kernels/ops.h db_precision): the twin of the fp32 kernels
// of attention_backward.cu (same math, same two-pass deterministic design,
// no atomics) with the five matrix products on nvcuda::wmma 16x16x16
// fragments of bf16 or fp16 and fp32 accumulators.  With s = q_i . k_j,
// scale = 1 / sqrt(HS) and the forward's lse (natural log):
//   P_ij = exp2(s_ij scale log2(e) - lse_i log2(e))   (fp32, = expf(s scale - lse))
//   dP_ij = dO_i . v_j     D_i = dO_i . O_i (fp32, from the 16-bit dO and O)
//   dS_ij = P_ij (dP_ij - D_i) scale                  (fp32)
//   dQ_i = sum_j dS_ij k_j   dK_j = sum_i dS_ij q_i   dV_j = sum_i P_ij dO_i
// (the kernels round and multiply P (dP - D) and apply `scale` to the fp32
// dQ and dK sums as they are stored, as FlashAttention-2 does: the rounded
// operand is then 1 / scale = sqrt(HS) times larger, further from fp16's
// subnormal range, which small gradients and P ~ 1 / Tk push it towards;
// fp16 training has loss scaling for the rest, README).
// S and dP are fp32 products of 16-bit operands (exact products, fp32 sums);
// P and dS are computed in fp32 and ROUNDED TO THE COMPUTE TYPE where they
// are tensor-core operands: dS for dQ = dS K (pass 1), P for dV = P^T dO and
// dS for dK = dS^T Q (pass 2).  Those are this kernel's rounded
// intermediates (the forward rounds P for P V likewise); dq, dk, dv are fp32
// sums, NOT rounded to the compute type (the caller's job).
//
// Passes (every output element summed by one fixed sequence of mma: bitwise
// deterministic):
//   D    one warp per (b, h, query): D_i in fp32;
//   dQ   grid (ceil(Tq / 64), B NH): a block owns 64 queries (warp w rows
//        16w..16w+15) and streams key tiles of 64 (causal: up to its last
//        query); per tile a warp computes S = Q K^T and dP = dO V^T (16 x 64
//        each, 4 accumulator fragments x HSP/16 mma), stores them to its fp32
//        strips Ss and dPs (the fragment element -> (row, col) mapping is
//        unspecified, so everything row-wise goes through shared memory),
//        forms dS row-wise (lane pair 2r, 2r+1 owns row r, as the forward),
//        writes it rounded over its own dPs strip (the 16-bit row inside the
//        fp32 row, ldm 2 LDS), and accumulates dQ (16 x HSP fragments in
//        registers) += dS K;
//   dKdV grid (ceil(Tk / 64), B NH): a block owns 64 keys (warp w rows
//        16w..16w+15), streams query tiles of 64 (causal: from its first
//        key); per tile a warp computes S^T = K Q^T and dP^T = V dO^T,
//        forms P^T and dS^T row-wise (now a row is a key, the columns are
//        queries: their lse and D come from shared memory), writes them
//        rounded over its Ss / dPs strips, and accumulates dV += P^T dO and
//        dK += dS^T Q in registers.
// Masks as the forward: keys j >= Tk and queries i >= Tq are zero rows in the
// tiles and P = 0 there; causal (top-left): P_ij = 0 for j > i.  HS a
// multiple of 8 up to 160, padded to HSP = 16 ceil(HS / 16) with zero
// columns (they add nothing to S, dP, D; their dQ/dK/dV columns are not
// written).
//
// Shared memory per block (both passes alike), T = the compute type:
//   4 tiles (64, HSP + 8) of T: Q and dO (pass 1: the block's, pass 2: the
//   streamed tile), K and V (pass 1: the streamed tile, pass 2: the block's);
//   Ss, dPs (64, 72) fp32; pass 2 also lse and D of the query tile (64 each).
// = 66 KB at HS 40 (3 blocks, 12 warps per SM on H100's 228 KB), 74 KB at
// HS 64, 91 KB at HS 80, 123 KB at HS 160 (1 block).  The block's own
// operand fragments (Q, dO in pass 1; K, V in pass 2) are reloaded from
// shared memory per tile rather than held in registers: the two fp32
// accumulator sets of pass 2 alone take 2 x ND x 8 registers per lane (160 at
// HS 160), and holding the operands too would spill.
//
// Expected speed (estimate, not measured: no GPU here): 7 products of
// 2 Tq Tk HSP flop (S, dP, dQ in pass 1; S, dP, dV, dK in pass 2) against
// the forward's 2, so 3.5x the forward's mma work, 2 exp2 per score instead
// of 1, two fp32 strips per warp and tile instead of one, and fewer blocks
// per SM (3 at HS 40 against the forward's 4-5; 255 registers and a few
// spilled bytes in the dK/dV pass from HS 112 up).  If the forward runs at
// 80-150 TFLOP/s, expect 40-90 TFLOP/s counted the usual way (10 Tq Tk HS
// per head, 2.5 forwards): 1.2-2.7 ms for SD1.5's level-0 self-attention
// (B 2, 4096 x 4096, 8 x 40: 107 GFLOP) against an estimated 20-35 ms for the
// fp32 SIMT backward (it does the same dot products on CUDA cores).
// (H200, 2026-11-27: 45 TFLOP/s bf16 at that shape, 2.37 ms.)  Up to head
// size 80 the mma.sync kernels of attention_mma_backward.cu now run instead
// (S, dP kept in registers; DB_ATTN_MMA=0 keeps these); levers after
// those: cp.async double buffering of the streamed tiles, then wgmma.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <mma.h>

#include <type_traits>

#include "kernels/cuda/attention_tc.h"
#include "kernels/cuda/attention_tc_common.h"

using namespace nvcuda;
using namespace db_attn_tc;

namespace {

constexpr int LDS16 = 2 * LDS; // the fp32 strips' rows seen as 16-bit elements (P, dS written over them)
constexpr float LOG2E = 1.4426950408889634f;

// shared memory bytes of either pass
template <typename T> constexpr size_t smem_bytes(int ND)
{
    return sizeof(T) * 4 * (size_t)BR * (16 * ND + 8) + sizeof(float) * (2 * (size_t)BR * LDS + 2 * BT);
}

// A (16 x 64, fp32, into the warp's strip sw) = X Y^T: X the warp's 16 rows
// of xs (row-major, LDH), Y the 64 rows of ys (row-major, LDH), HSP / 16 mma
// per output fragment, summed in d order either way.  Up to HS 96 the four
// accumulators are live at once so each X fragment is loaded once (5 ND
// fragment loads instead of 8 ND); above, one at a time (register pressure:
// the dK/dV pass is at 255 registers from HS 112).
template <typename T, int ND> __device__ __forceinline__ void gemm_nt(float *sw, const T *xw, const T *ys)
{
    constexpr int LDH = 16 * ND + 8;
    if constexpr (ND <= 6) {
        facc s[BT / 16];
#pragma unroll
        for (int n = 0; n < BT / 16; n++)
            wmma::fill_fragment(s[n], 0.0f);
#pragma unroll
        for (int d = 0; d < ND; d++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::load_matrix_sync(a, xw + 16 * d, LDH);
#pragma unroll
            for (int n = 0; n < BT / 16; n++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
                wmma::load_matrix_sync(bt, ys + n * 16 * LDH + 16 * d, LDH);
                wmma::mma_sync(s[n], a, bt, s[n]);
            }
        }
#pragma unroll
        for (int n = 0; n < BT / 16; n++)
            wmma::store_matrix_sync(sw + 16 * n, s[n], LDS, wmma::mem_row_major);
    } else {
#pragma unroll
        for (int n = 0; n < BT / 16; n++) {
            facc s;
            wmma::fill_fragment(s, 0.0f);
#pragma unroll
            for (int d = 0; d < ND; d++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
                wmma::load_matrix_sync(a, xw + 16 * d, LDH);
                wmma::load_matrix_sync(bt, ys + n * 16 * LDH + 16 * d, LDH);
                wmma::mma_sync(s, a, bt, s);
            }
            wmma::store_matrix_sync(sw + 16 * n, s, LDS, wmma::mem_row_major);
        }
    }
}

// Pass 1: dq (B, Tq, NH*HS) fp32.  grid (ceil(Tq / BR), B NH), block NWARP 32,
// dynamic shared memory smem_bytes<T>(ND).
template <typename T, int ND>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_tc_dq_kernel(float *dq, const T *dout, const float *lse, const float *D, const T *q, const T *k, const T *v,
                      int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale)
{
    constexpr int HSP = 16 * ND, LDH = HSP + 8;
    extern __shared__ __align__(128) float smem[];
    T *Qs = (T *)smem;                   // (BR, LDH) the block's queries
    T *dOs = Qs + BR * LDH;              // (BR, LDH)
    T *Ks = dOs + BR * LDH;              // (BT, LDH) the key tile
    T *Vs = Ks + BT * LDH;               // (BT, LDH)
    float *Ss = (float *)(Vs + BT * LDH); // (BR, LDS) scores
    float *dPs = Ss + BR * LDS;           // (BR, LDS) dP, then dS (compute type) over it
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    load_rows(Qs, q, b, h, i0, BR, Tq, Tq, NH, HS, LDH);
    load_rows(dOs, dout, b, h, i0, BR, Tq, Tq, NH, HS, LDH);
    // row-wise work: lane pair (2r, 2r + 1) owns row r of the warp's strip
    const int r = lane >> 1, hf = lane & 1, row = warp * 16 + r, i = i0 + row;
    const float l2 = i < Tq ? lse[(size_t)bh * Tq + i] * LOG2E : 0.0f;
    const float Di = i < Tq ? D[(size_t)bh * Tq + i] : 0.0f;
    const int jlim = i >= Tq ? 0 : causal && i + 1 < Tk ? i + 1 : Tk; // keys j < jlim are seen
    float *sw = Ss + warp * 16 * LDS, *dpw = dPs + warp * 16 * LDS;
    const float *srow = Ss + row * LDS, *dprow = dPs + row * LDS;
    T *dsw = (T *)dpw, *dsrow = (T *)(dPs + row * LDS);
    const T *qw = Qs + warp * 16 * LDH, *ow = dOs + warp * 16 * LDH;
    facc acc[ND];
#pragma unroll
    for (int d = 0; d < ND; d++)
        wmma::fill_fragment(acc[d], 0.0f);

    const int kend = causal && i0 + BR < Tk ? i0 + BR : Tk; // causal: no key past the block's last query
    for (int j0 = 0; j0 < kend; j0 += BT) {
        __syncthreads(); // the previous tile is consumed (first time: Qs, dOs written)
        load_rows(Ks, k, b, h, j0, BT, Tk, Tk, NH, HS, LDH);
        load_rows(Vs, v, b, h, j0, BT, Tk, Tk, NH, HS, LDH);
        __syncthreads();
        gemm_nt<T, ND>(sw, qw, Ks);  // S = Q K^T
        gemm_nt<T, ND>(dpw, ow, Vs); // dP = dO V^T
        __syncwarp();
        // dS of row r, this lane's column quads 2t + hf, packed as the compute type
        uint2 u[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const int c0 = 4 * (2 * t + hf);
            const float4 s4 = *(const float4 *)(srow + c0), p4 = *(const float4 *)(dprow + c0);
            const float sv[4] = {s4.x, s4.y, s4.z, s4.w}, dpv[4] = {p4.x, p4.y, p4.z, p4.w};
            unsigned w[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = j0 + c0 + e < jlim ? exp2f(sv[e] * qscale - l2) : 0.0f;
                w[e] = tc<T>::bits(tc<T>::from(p * (dpv[e] - Di))); // dS / scale
            }
            u[t] = pack4(w);
        }
        __syncwarp(); // the row's fp32 dP is read by both lanes before dS overwrites it
#pragma unroll
        for (int t = 0; t < 8; t++)
            *(uint2 *)(dsrow + 4 * (2 * t + hf)) = u[t];
        __syncwarp();
        gemm_nn<T, ND>(acc, dsw, LDS16, Ks); // dQ / scale += (dS / scale) K
    }
    store_rows<ND>(dq, acc, scale, sw, b, h, i0 + warp * 16, Tq, NH, HS, lane);
}

// Pass 2: dk, dv (B, Tk, NH*HS) fp32 (either may be NULL).  grid
// (ceil(Tk / BR), B NH, nsplit), block NWARP 32, dynamic shared memory
// smem_bytes<T>(ND).  Block z streams the query tiles [z qtiles, (z + 1)
// qtiles) only and writes its sums at dk, dv + z * part (a partial of the
// split, summed by dkv_reduce_kernel); one split: the result itself.
template <typename T, int ND>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_tc_dkv_kernel(float *dk, float *dv, const T *dout, const float *lse, const float *D, const T *q, const T *k,
                       const T *v, int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale, int qtiles,
                       size_t part)
{
    constexpr int HSP = 16 * ND, LDH = HSP + 8;
    extern __shared__ __align__(128) float smem[];
    T *Qs = (T *)smem;                   // (BT, LDH) the query tile
    T *dOs = Qs + BT * LDH;              // (BT, LDH)
    T *Kb = dOs + BT * LDH;              // (BR, LDH) the block's keys
    T *Vb = Kb + BR * LDH;               // (BR, LDH)
    float *Ss = (float *)(Vb + BR * LDH); // (BR, LDS) S^T, then P^T (compute type) over it
    float *dPs = Ss + BR * LDS;           // (BR, LDS) dP^T, then dS^T (compute type) over it
    float *l2s = dPs + BR * LDS;          // (BT) the tile's lse log2(e)
    float *Ds = l2s + BT;                 // (BT) the tile's D
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, j0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    load_rows(Kb, k, b, h, j0, BR, Tk, Tk, NH, HS, LDH);
    load_rows(Vb, v, b, h, j0, BR, Tk, Tk, NH, HS, LDH);
    // row-wise work: lane pair (2r, 2r + 1) owns key row r of the warp's strip
    const int r = lane >> 1, hf = lane & 1, row = warp * 16 + r, j = j0 + row;
    float *sw = Ss + warp * 16 * LDS, *dpw = dPs + warp * 16 * LDS;
    const float *srow = Ss + row * LDS, *dprow = dPs + row * LDS;
    T *pw = (T *)sw, *dsw = (T *)dpw, *prow = (T *)(Ss + row * LDS), *dsrow = (T *)(dPs + row * LDS);
    const T *kw = Kb + warp * 16 * LDH, *vw = Vb + warp * 16 * LDH;
    facc gk[ND], gv[ND];
#pragma unroll
    for (int d = 0; d < ND; d++) {
        wmma::fill_fragment(gk[d], 0.0f);
        wmma::fill_fragment(gv[d], 0.0f);
    }

    // causal: queries before the block's first key see none of its keys
    const int qa = blockIdx.z * qtiles * BT, qb = qa + qtiles * BT < Tq ? qa + qtiles * BT : Tq;
    for (int q0 = causal && j0 > qa ? j0 : qa; q0 < qb; q0 += BT) {
        __syncthreads(); // the previous tile is consumed (first time: Kb, Vb written)
        load_rows(Qs, q, b, h, q0, BT, Tq, Tq, NH, HS, LDH);
        load_rows(dOs, dout, b, h, q0, BT, Tq, Tq, NH, HS, LDH);
        if (threadIdx.x < BT) {
            const int i = q0 + threadIdx.x;
            l2s[threadIdx.x] = i < Tq ? lse[(size_t)bh * Tq + i] * LOG2E : 0.0f;
            Ds[threadIdx.x] = i < Tq ? D[(size_t)bh * Tq + i] : 0.0f;
        }
        __syncthreads();
        gemm_nt<T, ND>(sw, kw, Qs);   // S^T = K Q^T
        gemm_nt<T, ND>(dpw, vw, dOs); // dP^T = V dO^T
        __syncwarp();
        // P^T and dS^T of key row r, this lane's column (query) quads 2t + hf
        uint2 up[8], ud[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const int c0 = 4 * (2 * t + hf);
            const float4 s4 = *(const float4 *)(srow + c0), p4 = *(const float4 *)(dprow + c0);
            const float4 l4 = *(const float4 *)(l2s + c0), d4 = *(const float4 *)(Ds + c0);
            const float sv[4] = {s4.x, s4.y, s4.z, s4.w}, dpv[4] = {p4.x, p4.y, p4.z, p4.w};
            const float lv[4] = {l4.x, l4.y, l4.z, l4.w}, dv_[4] = {d4.x, d4.y, d4.z, d4.w};
            unsigned wp[4], wd[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = q0 + c0 + e;
                const bool valid = i < Tq && j < Tk && (!causal || j <= i);
                const float p = valid ? exp2f(sv[e] * qscale - lv[e]) : 0.0f;
                wp[e] = tc<T>::bits(tc<T>::from(p));
                wd[e] = tc<T>::bits(tc<T>::from(p * (dpv[e] - dv_[e]))); // dS / scale
            }
            up[t] = pack4(wp);
            ud[t] = pack4(wd);
        }
        __syncwarp(); // both lanes of a row have read its fp32 S^T and dP^T
#pragma unroll
        for (int t = 0; t < 8; t++) {
            *(uint2 *)(prow + 4 * (2 * t + hf)) = up[t];
            *(uint2 *)(dsrow + 4 * (2 * t + hf)) = ud[t];
        }
        __syncwarp();
        gemm_nn<T, ND>(gv, pw, LDS16, dOs); // dV += P^T dO
        gemm_nn<T, ND>(gk, dsw, LDS16, Qs); // dK / scale += (dS / scale)^T Q
    }
    if (dv)
        store_rows<ND>(dv + blockIdx.z * part, gv, 1.0f, sw, b, h, j0 + warp * 16, Tk, NH, HS, lane);
    if (dk)
        store_rows<ND>(dk + blockIdx.z * part, gk, scale, sw, b, h, j0 + warp * 16, Tk, NH, HS, lane);
}

// dst[i] = sum over z < nsplit of part[z n + i], z in order (deterministic);
// r16 1 / 2: the sum rounded to bf16 / fp16 (kept fp32)
__global__ static void dkv_reduce_kernel(float *dst, const float *part, size_t n, int nsplit, int r16)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float s = part[i];
        for (int z = 1; z < nsplit; z++)
            s += part[(size_t)z * n + i];
        dst[i] = r16 ? db_cuda_round16(s, r16 == 2) : s;
    }
}

// Query tiles per split of pass 2.  Its grid has a block per 64 keys and
// head: 32 blocks for SD's cross-attention (77 keys, B 2 x 8 heads) on a
// 132-SM card, each streaming all 64 query tiles.  So when the keys give
// fewer than DKV_FEW blocks, the queries are split towards DKV_BLOCKS
// blocks, at least DKV_MIN_TILES query tiles each (from the shape alone,
// not the card, so the bits are the same everywhere).  H200, 2026-11-27:
// the cross-attention backward 0.373 -> 0.115 ms; splitting 256 blocks of
// 16 tiles (1024 x 1024, 8 x 80) or 64 blocks of 4 (256 x 256, 8 x 160) in
// two or four had made those 15-25 % slower, hence the two floors.
enum { DKV_FEW = 132, DKV_BLOCKS = 264, DKV_MIN_TILES = 8 };
static int dkv_qtiles(int Tq, int Tk, int BNH)
{
    const int nq = (Tq + BT - 1) / BT, blocks = (Tk + BR - 1) / BR * BNH;
    int nsplit = blocks >= DKV_FEW ? 1 : (DKV_BLOCKS + blocks - 1) / blocks;
    nsplit = nsplit > nq / DKV_MIN_TILES ? nq / DKV_MIN_TILES : nsplit;
    nsplit = nsplit < 1 ? 1 : nsplit;
    return (nq + nsplit - 1) / nsplit;
}

// rnd: dq, dk, dv rounded to T (db_cuda_attention_tc_backward's round_out)
template <typename T, int ND>
static int launch(db_ctx *c, float *dq, float *dk, float *dv, const float *D, const void *dout, const float *lse,
                  const void *q, const void *k, const void *v, int B, int Tq, int Tk, int NH, int HS, int causal,
                  int rnd)
{
    cudaStream_t st = db_cuda_st(c)->stream;
    const size_t smem = smem_bytes<T>(ND);
    const float scale = (float)(1.0 / sqrt((double)HS)); // as attention_backward.c
    const float qscale = score_scale_log2(HS);
    const bool mma = HS <= MMA_BWD_HS_MAX && db_cuda_attn_mma(); // attention_mma_backward.cu's kernels
    const int dtype = std::is_same<T, __half>::value ? DB_PREC_F16 : DB_PREC_BF16, f16 = dtype == DB_PREC_F16;
    if (dq && mma) {
        if (db_cuda_attention_mma_backward(c, dq, NULL, NULL, D, dout, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal,
                                           scale, qscale, 0, 1, 0, rnd))
            return -1;
    } else if (dq) {
        void (*kern)(float *, const T *, const float *, const float *, const T *, const T *, const T *, int, int, int,
                     int, int, float, float) = attn_tc_dq_kernel<T, ND>;
        if (db_cuda_smem_optin(c, kern, smem))
            return -1;
        dim3 grid((unsigned)((Tq + BR - 1) / BR), (unsigned)(B * NH));
        kern<<<grid, NWARP * 32, smem, st>>>(dq, (const T *)dout, lse, D, (const T *)q, (const T *)k, (const T *)v, Tq,
                                              Tk, NH, HS, causal, scale, qscale);
        DB_LAUNCHED(c);
        if (rnd && db_cuda_round_as(c, dq, dq, (size_t)B * Tq * NH * HS, f16, 0))
            return -1;
    }
    if (dk || dv) {
        const int qtiles = dkv_qtiles(Tq, Tk, B * NH), nsplit = ((Tq + BT - 1) / BT + qtiles - 1) / qtiles;
        const size_t n = (size_t)B * Tk * NH * HS;
        // split: partial sums (nsplit of each wanted output), then their sum
        float *pk = nsplit > 1 && dk ? (float *)db_cuda_alloc(c, sizeof(float) * n * nsplit) : dk,
              *pv = nsplit > 1 && dv ? (float *)db_cuda_alloc(c, sizeof(float) * n * nsplit) : dv;
        int r = (dk && !pk) || (dv && !pv) ? -1 : 0;
        // rounded: by the mma.sync pass when it writes the sums, else by their sum (or a pass)
        if (r == 0 && mma)
            r = db_cuda_attention_mma_backward(c, NULL, pk, pv, D, dout, lse, q, k, v, dtype, B, Tq, Tk, NH, HS,
                                               causal, scale, qscale, qtiles, nsplit, n, rnd && nsplit == 1);
        else if (r == 0) {
            void (*kern2)(float *, float *, const T *, const float *, const float *, const T *, const T *, const T *,
                          int, int, int, int, int, float, float, int, size_t) = attn_tc_dkv_kernel<T, ND>;
            r = db_cuda_smem_optin(c, kern2, smem);
            if (r == 0) {
                dim3 grid((unsigned)((Tk + BR - 1) / BR), (unsigned)(B * NH), (unsigned)nsplit);
                kern2<<<grid, NWARP * 32, smem, st>>>(pk, pv, (const T *)dout, lse, D, (const T *)q, (const T *)k,
                                                       (const T *)v, Tq, Tk, NH, HS, causal, scale, qscale, qtiles,
                                                       n);
            }
        }
        if (r == 0) {
            const int r16 = rnd ? 1 + f16 : 0;
            if (nsplit > 1 && dk)
                dkv_reduce_kernel<<<db_cuda_grid(n, 256), 256, 0, st>>>(dk, pk, n, nsplit, r16);
            if (nsplit > 1 && dv)
                dkv_reduce_kernel<<<db_cuda_grid(n, 256), 256, 0, st>>>(dv, pv, n, nsplit, r16);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess)
                r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "attention_tc backward (dk, dv): %s",
                                 cudaGetErrorString(e));
        }
        if (r == 0 && rnd && !mma && nsplit == 1) // the WMMA pass wrote the sums unrounded
            for (float *o : {dk, dv})
                if (r == 0 && o)
                    r = db_cuda_round_as(c, o, o, n, f16, 0);
        if (nsplit > 1) { // stream order keeps them alive for the kernels
            if (pk)
                db_cuda_free(c, pk);
            if (pv)
                db_cuda_free(c, pv);
        }
        return r;
    }
    return 0;
}

template <typename T>
static int dispatch(db_ctx *c, float *dq, float *dk, float *dv, const void *dout, const void *out, const float *lse,
                    const void *q, const void *k, const void *v, int B, int Tq, int Tk, int NH, int HS, int causal,
                    int rnd)
{
    const size_t n = (size_t)B * NH * Tq;
    float *D = (float *)db_cuda_alloc(c, sizeof(float) * n);
    if (!D)
        return -1;
    int r = -1;
    if (db_cuda_attn_d<T>(c, D, (const T *)dout, (const T *)out, B, Tq, NH, HS) == 0)
        r = with_nd(HS, [&](auto nd) {
            return launch<T, decltype(nd)::value>(c, dq, dk, dv, D, dout, lse, q, k, v, B, Tq, Tk, NH, HS, causal,
                                                  rnd);
        });
    db_cuda_free(c, D); // stream order keeps it alive for the kernels
    return r;
}

// ---- test hook -------------------------------------------------------------------------------

struct bwd_args {
    float *dq, *dk, *dv;
    const void *dout, *out;
    const float *lse;
    const void *q, *k, *v;
    int dtype, B, Tq, Tk, NH, HS, causal;
};

int bwd_run(db_ctx *c, void *p)
{
    const bwd_args *a = (const bwd_args *)p;
    return db_cuda_attention_tc_backward(c, a->dq, a->dk, a->dv, a->dout, a->out, a->lse, a->q, a->k, a->v, a->dtype,
                                         a->B, a->Tq, a->Tk, a->NH, a->HS, a->causal, 0);
}

} // namespace

extern "C" int db_cuda_attention_tc_backward(db_ctx *c, float *dq, float *dk, float *dv, const void *dout,
                                             const void *out, const float *lse, const void *q, const void *k,
                                             const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS,
                                             int causal, int round_out)
{
    DB_ENTER(c);
    if (dtype != DB_PREC_BF16 && dtype != DB_PREC_F16)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                            "attention_tc backward: dtype %d is not bf16 (1) or fp16 (2)", dtype);
    if (HS < 8 || HS > TC_HS_MAX || HS % 8 != 0)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                            "attention_tc backward: head size %d not a multiple of 8 in 8..%d", HS, TC_HS_MAX);
    if (B * NH > 65535)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc backward: %d batch x heads over 65535",
                            B * NH);
    if (Tk < 1)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention_tc backward: no key (Tk %d)", Tk);
    if (((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)dout) & 15) // tiles read 16 bytes at a time
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                            "attention_tc backward: q, k, v, dout not 16-byte aligned");
    if (B * NH == 0 || (!dq && !dk && !dv))
        return 0;
    if (Tq == 0) { // no query: dK, dV are zero
        const size_t bytes = sizeof(float) * (size_t)B * Tk * NH * HS;
        if (dk)
            DB_CU(c, cudaMemsetAsync(dk, 0, bytes, db_cuda_st(c)->stream));
        if (dv)
            DB_CU(c, cudaMemsetAsync(dv, 0, bytes, db_cuda_st(c)->stream));
        return 0;
    }
    return dtype == DB_PREC_BF16
               ? dispatch<__nv_bfloat16>(c, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal, round_out)
               : dispatch<__half>(c, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal, round_out);
}

extern "C" int db_cuda_time_ms(db_ctx *c, int (*fn)(db_ctx *, void *), void *arg, int warmup, int iters, float *ms);

// For tests/gpu/test_attention_tc.c (a C program that dlopens this library):
// host fp32 dout, out, q, k, v are rounded to dtype and uploaded, lse (fp32)
// uploaded, the backward runs once, dq, dk, dv (fp32, not rounded; any may be
// NULL) come back to host buffers.  iters > 0 and ms: then *ms = mean
// milliseconds of `iters` more runs (db_cuda_time_ms).
extern "C" __attribute__((visibility("default"))) int
db_cuda_test_attention_tc_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                                   const float *lse, const float *q, const float *k, const float *v, int dtype, int B,
                                   int Tq, int Tk, int NH, int HS, int causal, int iters, float *ms)
{
    DB_ENTER(c);
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    cudaStream_t st = db_cuda_st(c)->stream;
    void *d_q = to_device_type(c, q, nq, dtype), *d_k = d_q ? to_device_type(c, k, nk, dtype) : NULL;
    void *d_v = d_k ? to_device_type(c, v, nk, dtype) : NULL;
    void *d_do = d_v ? to_device_type(c, dout, nq, dtype) : NULL;
    void *d_o = d_do ? to_device_type(c, out, nq, dtype) : NULL;
    float *d_l = d_o ? (float *)db_cuda_alloc(c, nl * sizeof(float) + 16) : NULL;
    float *g_q = d_l && dq ? (float *)db_cuda_alloc(c, nq * sizeof(float) + 16) : NULL;
    float *g_k = d_l && dk ? (float *)db_cuda_alloc(c, nk * sizeof(float) + 16) : NULL;
    float *g_v = d_l && dv ? (float *)db_cuda_alloc(c, nk * sizeof(float) + 16) : NULL;
    int rc = -1;
    bwd_args a = {g_q, g_k, g_v, d_do, d_o, d_l, d_q, d_k, d_v, dtype, B, Tq, Tk, NH, HS, causal};
    if (!d_l || (dq && !g_q) || (dk && !g_k) || (dv && !g_v))
        goto done;
    if (cudaMemcpyAsync(d_l, lse, nl * sizeof(float), cudaMemcpyHostToDevice, st) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "lse upload: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    if (bwd_run(c, &a) != 0)
        goto done;
    if ((dq && cudaMemcpyAsync(dq, g_q, nq * sizeof(float), cudaMemcpyDeviceToHost, st) != cudaSuccess) ||
        (dk && cudaMemcpyAsync(dk, g_k, nk * sizeof(float), cudaMemcpyDeviceToHost, st) != cudaSuccess) ||
        (dv && cudaMemcpyAsync(dv, g_v, nk * sizeof(float), cudaMemcpyDeviceToHost, st) != cudaSuccess) ||
        cudaStreamSynchronize(st) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "attention_tc backward results: %s",
                     cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    if (iters > 0 && ms && db_cuda_time_ms(c, bwd_run, &a, 2, iters, ms) != 0)
        goto done;
    rc = 0;
done:
    db_cuda_free(c, g_v);
    db_cuda_free(c, g_k);
    db_cuda_free(c, g_q);
    db_cuda_free(c, d_l);
    db_cuda_free(c, d_o);
    db_cuda_free(c, d_do);
    db_cuda_free(c, d_v);
    db_cuda_free(c, d_k);
    db_cuda_free(c, d_q);
    return rc;
}
