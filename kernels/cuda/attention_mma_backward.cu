// Attention backward on tensor cores with S, dP, P and dS in registers: the
// contract and math of attention_tc_backward.cu's WMMA kernels (the same
// two passes, the same rounded operands: dS / scale for dQ and dK, P for
// dV; dQ and dK scaled by 1 / sqrt(HS) as they are stored; D and lse from
// the caller), through mma.sync m16n8k16 (kernels/cuda/mma.h) as
// attention_mma.cu does the forward: the accumulators of a 16 x 64 product
// are, element for element, the A fragments of the next product over those
// 64, so S and dP never go through shared memory and a row's values stay
// with the 4 lanes that computed them.
//
//   dQ   grid (ceil(Tq / 64), B NH): warp w owns queries 16w .. 16w + 15 of
//        the block's 64 (their Q and dO fragments in registers); per key
//        tile of 64: S = Q K^T, dP = dO V^T (B fragments: rows of K, V),
//        dS = round(P (dP - D)) with P = exp2(S qscale - lse log2 e), then
//        dQ += dS K (B fragments: columns of K, two keys a word);
//   dK dV grid (ceil(Tk / 64), B NH, nsplit): warp w owns keys 16w ..; per
//        query tile: S^T = K Q^T, dP^T = V dO^T (A fragments of K and V
//        reloaded from shared memory per tile: holding them too would spill
//        at HS 80), P^T and dS^T with the columns' (queries') lse and D from
//        shared memory, dV += round(P^T) dO, dK += dS^T Q.
// Masks as the WMMA kernels: keys j >= Tk, queries i >= Tq, and causal
// j > i give P = 0.  HS a multiple of 8 up to MMA_BWD_HS_MAX (80): the
// accumulators of the dK/dV pass take 16 ND floats a lane (ND = HSP / 16)
// beside 96 for S^T, dP^T and their fragments; HS 160 (SD1.5's 16x16 level,
// 256 tokens) stays on the WMMA kernels.
//
// Shared memory per block: four (64, HSP + 8) tiles of the compute type
// (Q, dO, K, V), and 2 x 64 floats (the dK/dV pass's lse and D of the
// query tile): 25 KB at HS 40, 45 KB at HS 80.  Both passes stream their
// tiles through cp.async, the next copied in while the block computes on
// this one (db_cuda_attn_cpasync; DB_ATTN_CPASYNC=0 loads, then uses): the
// dQ pass in its four tiles (Q and dO are in registers after the first),
// the dK/dV pass in two more (38 KB at HS 40, 67 KB at HS 80).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "kernels/cuda/attention_mma_common.h"
#include "kernels/cuda/attention_tc.h"

using namespace db_attn_tc;
using namespace db_attn_mma;

namespace {

constexpr float LOG2E = 1.4426950408889634f;

// rows r (16 of the warp: this lane's g and g + 8) of acc * scale into
// dst (B, T_, NH*HS), head h; rnd: each value rounded to T (kept fp32)
template <typename T, int NK>
__device__ __forceinline__ void store_acc(float *dst, const float (&acc)[2 * NK][4], float scale, int b, int h, int rA,
                                          int T_, int NH, int HS, int rnd)
{
    const int lane = threadIdx.x & 31, t = lane & 3, HC = HS / 8, rB = rA + 8;
    const size_t C = (size_t)NH * HS;
#pragma unroll
    for (int n = 0; n < 2 * NK; n++) {
        if (n >= HC)
            break;
        const size_t col = (size_t)h * HS + 8 * n + 2 * t;
        if (rA < T_)
            put2<T>(dst + ((size_t)b * T_ + rA) * C + col, acc[n][0] * scale, acc[n][1] * scale, rnd);
        if (rB < T_)
            put2<T>(dst + ((size_t)b * T_ + rB) * C + col, acc[n][2] * scale, acc[n][3] * scale, rnd);
    }
}

// The dQ pass's dS / scale = round(P (dP - D)) for a lane's two rows (lse
// l2A, l2B in log2 units, D DA, DB) as the A fragments of dS K, rounded two
// at a time; MASK: keys j at or past a row's limit get P = 0 (without it
// the caller knows the tile visible to every row: the same values).
template <typename T, bool MASK>
__device__ __forceinline__ void ds_frags(uint32_t (&dsa)[BT / 16][4], const float (&s)[BT / 8][4],
                                         const float (&dp)[BT / 8][4], float qscale, float l2A, float l2B, float DA,
                                         float DB, int j0, int jlimA, int jlimB)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < BT / 8; nt++) {
        float d[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = j0 + 8 * nt + 2 * t + (e & 1);
            const bool rowA = e < 2;
            const float p =
                !MASK || j < (rowA ? jlimA : jlimB) ? exp2_ftz(s[nt][e] * qscale - (rowA ? l2A : l2B)) : 0.0f;
            d[e] = p * (dp[nt][e] - (rowA ? DA : DB));
        }
        dsa[nt / 2][(nt & 1) * 2 + 0] = tc<T>::pair(d[0], d[1]); // row g
        dsa[nt / 2][(nt & 1) * 2 + 1] = tc<T>::pair(d[2], d[3]); // row g + 8
    }
}

// Pass 1: dq (B, Tq, NH*HS) fp32.  grid (ceil(Tq / BR), B NH), block NWARP
// 32, dynamic shared memory 4 BR LDH sizeof(T).  PIPE (db_cuda_attn_cpasync,
// as the forward): the next K, V tile copied in by cp.async while this one
// is used; the two pairs are Ks, Vs and, once their fragments are in
// registers, Qs, dOs.
template <typename T, int NK, bool PIPE, bool LDSM>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_mma_dq_kernel(float *dq, const T *dout, const float *lse, const float *D, const T *q, const T *k, const T *v,
                       int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale, int rnd)
{
    constexpr int LDH = 16 * NK + 8;
    static_assert(BR == BT, "the tiles share one layout");
    extern __shared__ __align__(128) float smem[];
    T *Qs = (T *)smem, *dOs = Qs + BR * LDH, *Ks = dOs + BR * LDH, *Vs = Ks + BT * LDH;
    T *const pair0 = Ks, *const pair1 = Qs; // PIPE: tile it in pair0 when it is even, else pair1 (K, then V at + BT LDH)
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int kend = causal && i0 + BR < Tk ? i0 + BR : Tk; // causal: no key past the block's last query

    if (PIPE) { // the first key tile on its way while the queries load
        if (kend > 0)
            load_kv_tile<true>(pair0, pair0 + BT * LDH, k, v, b, h, 0, Tk, NH, HS, LDH);
        db_cp::commit();
    }
    load_kv_tile(Qs, dOs, q, dout, b, h, i0, Tq, NH, HS, LDH);
    __syncthreads();
    uint32_t qa[NK][4], oa[NK][4];
    a_frags<T, NK, LDSM>(qa, Qs + warp * 16 * LDH, LDH);
    a_frags<T, NK, LDSM>(oa, dOs + warp * 16 * LDH, LDH);
    if (PIPE)
        __syncthreads(); // every warp's fragments read out of Qs, dOs before the second tile is copied there
    const int iA = i0 + warp * 16 + g, iB = iA + 8; // this lane's two rows
    const float l2A = iA < Tq ? lse[(size_t)bh * Tq + iA] * LOG2E : 0.0f;
    const float l2B = iB < Tq ? lse[(size_t)bh * Tq + iB] * LOG2E : 0.0f;
    const float DA = iA < Tq ? D[(size_t)bh * Tq + iA] : 0.0f, DB = iB < Tq ? D[(size_t)bh * Tq + iB] : 0.0f;
    const int jlimA = iA >= Tq ? 0 : causal && iA + 1 < Tk ? iA + 1 : Tk;
    const int jlimB = iB >= Tq ? 0 : causal && iB + 1 < Tk ? iB + 1 : Tk;
    // keys below jall are visible to every row of the block (none when it has rows past Tq)
    const int jall = i0 + BR > Tq ? 0 : causal && i0 + 1 < Tk ? i0 + 1 : Tk;
    float acc[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int j0 = 0, it = 0; j0 < kend; j0 += BT, it++) {
        if (PIPE) {
            T *const nxt = it & 1 ? pair0 : pair1;
            if (j0 + BT < kend)
                load_kv_tile<true>(nxt, nxt + BT * LDH, k, v, b, h, j0 + BT, Tk, NH, HS, LDH);
            db_cp::commit(); // (empty past the last tile)
            db_cp::wait<1>();
            __syncthreads();
            Ks = it & 1 ? pair1 : pair0, Vs = Ks + BT * LDH;
        } else {
            __syncthreads(); // the previous tile is consumed
            load_kv_tile(Ks, Vs, k, v, b, h, j0, Tk, NH, HS, LDH);
            __syncthreads();
        }
        float s[BT / 8][4], dp[BT / 8][4];
        prod_nt<T, NK, LDSM>(s, qa, Ks, LDH);  // S = Q K^T
        prod_nt<T, NK, LDSM>(dp, oa, Vs, LDH); // dP = dO V^T
        // dS / scale = round(P (dP - D)): the A fragments of dQ's product
        uint32_t dsa[BT / 16][4];
        if (j0 + BT <= jall)
            ds_frags<T, false>(dsa, s, dp, qscale, l2A, l2B, DA, DB, j0, jlimA, jlimB);
        else
            ds_frags<T, true>(dsa, s, dp, qscale, l2A, l2B, DA, DB, j0, jlimA, jlimB);
        prod_nn<T, NK, LDSM>(acc, dsa, Ks, LDH, HS / 8); // dQ / scale += (dS / scale) K
        if (PIPE)
            __syncthreads(); // this pair consumed before the next iteration fills it again
    }
    store_acc<T, NK>(dq, acc, scale, b, h, iA, Tq, NH, HS, rnd);
}

// Pass 2: dk, dv (B, Tk, NH*HS) fp32 (either may be NULL).  grid
// (ceil(Tk / BR), B NH, nsplit), block NWARP 32, dynamic shared memory
// dkv_smem(PIPE): Q, dO, K, V tiles and the query tile's lse and D (2 BT
// floats); PIPE, a second Q, dO pair and lse, D, the next query tile
// copied in (cp.async; lse and D by plain loads) while this one is used.
// Block z streams the query tiles [z qtiles, (z + 1) qtiles) only and
// writes its sums at dk, dv + z * part (the WMMA pass's split, summed by
// the caller).
template <typename T, int NK> constexpr size_t dkv_smem(bool pipe)
{
    return sizeof(T) * (size_t)(16 * NK + 8) * BT * (pipe ? 6 : 4) + sizeof(float) * BT * (pipe ? 4 : 2);
}

// one query tile's lse (log2 units) and D into l2s, Ds (plain loads)
__device__ __forceinline__ void load_lse_d(float *l2s, float *Ds, const float *lse, const float *D, int bh, int q0,
                                           int Tq)
{
    if (threadIdx.x < BT) {
        const int i = q0 + threadIdx.x;
        l2s[threadIdx.x] = i < Tq ? lse[(size_t)bh * Tq + i] * LOG2E : 0.0f;
        Ds[threadIdx.x] = i < Tq ? D[(size_t)bh * Tq + i] : 0.0f;
    }
}

// The dK/dV pass's P^T and dS^T / scale for a lane's two key rows jA, jB
// against the query tile at q0 (its lse in log2 units and D in l2s, Ds),
// rounded two at a time, as the A fragments of P^T dO and dS^T Q; MASK:
// queries past Tq, keys past Tk and (causal) keys after the query get
// P = 0 (without it the caller knows every pair of the tiles valid).
template <typename T, bool MASK>
__device__ __forceinline__ void pds_frags(uint32_t (&pa)[BT / 16][4], uint32_t (&dsa)[BT / 16][4],
                                          const float (&s)[BT / 8][4], const float (&dp)[BT / 8][4], float qscale,
                                          const float *l2s, const float *Ds, int q0, int jA, int jB, int Tq, int Tk,
                                          int causal)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < BT / 8; nt++) {
        const int c0 = 8 * nt + 2 * t;
        const float2 l2 = *(const float2 *)(l2s + c0), dd = *(const float2 *)(Ds + c0);
        float p[4], d[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = q0 + c0 + (e & 1), j = e < 2 ? jA : jB;
            const bool valid = !MASK || (i < Tq && j < Tk && (!causal || j <= i));
            p[e] = valid ? exp2_ftz(s[nt][e] * qscale - (e & 1 ? l2.y : l2.x)) : 0.0f;
            d[e] = p[e] * (dp[nt][e] - (e & 1 ? dd.y : dd.x));
        }
        pa[nt / 2][(nt & 1) * 2 + 0] = tc<T>::pair(p[0], p[1]);
        pa[nt / 2][(nt & 1) * 2 + 1] = tc<T>::pair(p[2], p[3]);
        dsa[nt / 2][(nt & 1) * 2 + 0] = tc<T>::pair(d[0], d[1]);
        dsa[nt / 2][(nt & 1) * 2 + 1] = tc<T>::pair(d[2], d[3]);
    }
}

template <typename T, int NK, bool PIPE, bool LDSM>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_mma_dkv_kernel(float *dk, float *dv, const T *dout, const float *lse, const float *D, const T *q, const T *k,
                        const T *v, int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale, int qtiles,
                        size_t part, int rnd)
{
    constexpr int LDH = 16 * NK + 8;
    extern __shared__ __align__(128) float smem[];
    // tiles: Q, dO, K, V (and PIPE: Q', dO'), then the floats: lse, D (and lse', D')
    T *Qs = (T *)smem, *dOs = Qs + BT * LDH, *Kb = dOs + BT * LDH, *Vb = Kb + BR * LDH;
    T *const qpair0 = Qs, *const qpair1 = Vb + BR * LDH;
    float *const fbase = (float *)((T *)smem + (PIPE ? 6 : 4) * BT * LDH);
    float *l2s = fbase, *Ds = l2s + BT;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, j0 = blockIdx.x * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int jA = j0 + warp * 16 + g, jB = jA + 8; // this lane's two key rows
    const T *kw = Kb + warp * 16 * LDH, *vw = Vb + warp * 16 * LDH;

    load_kv_tile(Kb, Vb, k, v, b, h, j0, Tk, NH, HS, LDH);
    float gk[2 * NK][4], gv[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++) {
        gk[n][0] = gk[n][1] = gk[n][2] = gk[n][3] = 0.0f;
        gv[n][0] = gv[n][1] = gv[n][2] = gv[n][3] = 0.0f;
    }

    // causal: queries before the block's first key see none of its keys
    const int qa = blockIdx.z * qtiles * BT, qb = qa + qtiles * BT < Tq ? qa + qtiles * BT : Tq;
    const int qfirst = causal && j0 > qa ? j0 : qa;
    if (PIPE) { // the first query tile on its way (Kb, Vb were loaded above)
        if (qfirst < qb) {
            load_kv_tile<true>(qpair0, qpair0 + BT * LDH, q, dout, b, h, qfirst, Tq, NH, HS, LDH);
            load_lse_d(fbase, fbase + BT, lse, D, bh, qfirst, Tq);
        }
        db_cp::commit();
    }
    // query tiles from qall on (and whole) see every key of the block (none when it has keys past Tk)
    const int qall = j0 + BR > Tk ? Tq : causal ? j0 + BR - 1 : 0;
    for (int q0 = qfirst, it = 0; q0 < qb; q0 += BT, it++) {
        if (PIPE) {
            const int nx = ~it & 1;
            T *const qn = nx ? qpair1 : qpair0;
            if (q0 + BT < qb) {
                load_kv_tile<true>(qn, qn + BT * LDH, q, dout, b, h, q0 + BT, Tq, NH, HS, LDH);
                load_lse_d(fbase + 2 * BT * nx, fbase + 2 * BT * nx + BT, lse, D, bh, q0 + BT, Tq);
            }
            db_cp::commit(); // (empty past the last tile)
            db_cp::wait<1>();
            __syncthreads(); // (first time: Kb, Vb written too)
            Qs = it & 1 ? qpair1 : qpair0, dOs = Qs + BT * LDH, l2s = fbase + 2 * BT * (it & 1), Ds = l2s + BT;
        } else {
            __syncthreads(); // the previous tile is consumed (first time: Kb, Vb written)
            load_kv_tile(Qs, dOs, q, dout, b, h, q0, Tq, NH, HS, LDH);
            load_lse_d(l2s, Ds, lse, D, bh, q0, Tq);
            __syncthreads();
        }
        float s[BT / 8][4], dp[BT / 8][4];
        {
            uint32_t xa[NK][4];
            a_frags<T, NK, LDSM>(xa, kw, LDH);
            prod_nt<T, NK, LDSM>(s, xa, Qs, LDH); // S^T = K Q^T
            a_frags<T, NK, LDSM>(xa, vw, LDH);
            prod_nt<T, NK, LDSM>(dp, xa, dOs, LDH); // dP^T = V dO^T
        }
        // P^T and dS^T / scale, rounded: the A fragments of dV's and dK's products
        uint32_t pa[BT / 16][4], dsa[BT / 16][4];
        if (q0 >= qall && q0 + BT <= Tq)
            pds_frags<T, false>(pa, dsa, s, dp, qscale, l2s, Ds, q0, jA, jB, Tq, Tk, causal);
        else
            pds_frags<T, true>(pa, dsa, s, dp, qscale, l2s, Ds, q0, jA, jB, Tq, Tk, causal);
        prod_nn<T, NK, LDSM>(gv, pa, dOs, LDH, HS / 8);  // dV += P^T dO
        prod_nn<T, NK, LDSM>(gk, dsa, Qs, LDH, HS / 8); // dK / scale += (dS / scale)^T Q
        if (PIPE)
            __syncthreads(); // this pair consumed before the next iteration fills it again
    }
    if (dv)
        store_acc<T, NK>(dv + blockIdx.z * part, gv, 1.0f, b, h, jA, Tk, NH, HS, rnd);
    if (dk)
        store_acc<T, NK>(dk + blockIdx.z * part, gk, scale, b, h, jA, Tk, NH, HS, rnd);
}

template <typename T, int NK, bool PIPE, bool LDSM>
static int launch(db_ctx *c, float *dq, float *dk, float *dv, const float *D, const void *dout, const float *lse,
                  const void *q, const void *k, const void *v, int B, int Tq, int Tk, int NH, int HS, int causal,
                  float scale, float qscale, int qtiles, int nsplit, size_t part, int rnd)
{
    constexpr int LDH = 16 * NK + 8;
    cudaStream_t st = db_cuda_st(c)->stream;
    if (dq) {
        const size_t smem = sizeof(T) * 4 * (size_t)BR * LDH;
        void (*kern)(float *, const T *, const float *, const float *, const T *, const T *, const T *, int, int, int,
                     int, int, float, float, int) = attn_mma_dq_kernel<T, NK, PIPE, LDSM>;
        if (db_cuda_smem_optin(c, kern, smem))
            return -1;
        dim3 grid((unsigned)((Tq + BR - 1) / BR), (unsigned)(B * NH));
        kern<<<grid, NWARP * 32, smem, st>>>(dq, (const T *)dout, lse, D, (const T *)q, (const T *)k, (const T *)v, Tq,
                                              Tk, NH, HS, causal, scale, qscale, rnd);
        DB_LAUNCHED(c);
    }
    if (dk || dv) {
        const size_t smem = dkv_smem<T, NK>(PIPE);
        void (*kern)(float *, float *, const T *, const float *, const float *, const T *, const T *, const T *, int,
                     int, int, int, int, float, float, int, size_t, int) = attn_mma_dkv_kernel<T, NK, PIPE, LDSM>;
        if (db_cuda_smem_optin(c, kern, smem))
            return -1;
        dim3 grid((unsigned)((Tk + BR - 1) / BR), (unsigned)(B * NH), (unsigned)nsplit);
        kern<<<grid, NWARP * 32, smem, st>>>(dk, dv, (const T *)dout, lse, D, (const T *)q, (const T *)k, (const T *)v,
                                              Tq, Tk, NH, HS, causal, scale, qscale, qtiles, part, rnd);
        DB_LAUNCHED(c);
    }
    return 0;
}

} // namespace

int db_cuda_attention_mma_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *D, const void *dout,
                                   const float *lse, const void *q, const void *k, const void *v, int dtype, int B,
                                   int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale, int qtiles,
                                   int nsplit, size_t part, int rnd)
{
    if (HS > MMA_BWD_HS_MAX)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention mma backward: head size %d over %d", HS,
                            MMA_BWD_HS_MAX);
    return with_nd(HS, [&](auto nk) {
        constexpr int NK = decltype(nk)::value;
        if constexpr (16 * NK > MMA_BWD_HS_MAX + 15) {
            return -1; // not reached: HS checked above
        } else {
            auto go = [&](auto t, auto p, auto l) {
                return launch<decltype(t), NK, decltype(p)::value, decltype(l)::value>(
                    c, dq, dk, dv, D, dout, lse, q, k, v, B, Tq, Tk, NH, HS, causal, scale, qscale, qtiles, nsplit,
                    part, rnd);
            };
            return with_types(dtype, db_cuda_attn_cpasync(), db_cuda_attn_ldsm(), go);
        }
    });
}
