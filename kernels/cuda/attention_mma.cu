// Attention forward on tensor cores with S and P in registers: the same
// contract and math as attention_tc.cu (scores in log2 units, online
// softmax whose reference max moves only by more than `rescale`, P rounded
// to the compute type for P V, l the fp32 sum for lse, lt the rounded sum
// for out = O / lt, out not rounded), but through mma.sync m16n8k16
// (kernels/cuda/mma.h), whose fragment layout is known: the accumulators
// of S = Q K^T for keys 16kk .. 16kk + 15 are, element for element, the A
// fragment of P for P V's k-step kk, so scores and probabilities never
// touch shared memory; row maxima and sums are shuffles over the 4 lanes
// that share a row.  FlashAttention-2's layout and, by default, its
// pipelining: the next key/value tile is copied in by cp.async
// (kernels/cuda/cp_async.h, load_kv_tile<true>) while the block computes on
// this one, in two buffers; DB_ATTN_CPASYNC=0 in the environment
// (db_cuda_attn_cpasync) loads each tile, then uses it, as before
// (2026-11-27: written without a GPU; run.sh times both).
//
// The default since an H200 timed it against the WMMA kernel (2026-11-27:
// 17 % faster at SD1.5's bf16 self-attention, fp16 even); DB_ATTN_MMA=0 in
// the environment (read at each call by attention_tc.cu) selects the WMMA
// kernel, and tests/gpu/run.sh times both.
//
// Block: NWARP = 4 warps over (b, h, BR MR queries), warp w owns the MR
// row tiles of 16 queries from 16 MR w (MR = 1; 2 with DB_ATTN_MR=2 up to
// head size 80: mr_max below); lane 4g + t holds rows g and g + 8 of
// each.  Shared memory: Qs (BR MR, LDH), then per key tile Ks, Vs (BT =
// 64, LDH) in the compute type, LDH = HSP + 8 (HSP: HS rounded up to 16,
// zero columns); pipelined, two such K, V pairs, Qs in the second pair
// (the queries are in registers before the second tile lands there).
// Registers per thread and row tile: Q fragments 4 NK words, S 32 floats,
// P 16 words, O 8 NK floats (HS 160: 40 + 32 + 16 + 80).
// Session 13 (2026-11-27, blind): the operands by ldmatrix
// (attention_mma_common.h; DB_ATTN_LDSM=0: the earlier loads), two row
// tiles a warp sharing each K and V fragment (DB_ATTN_MR), and a softmax
// without per-key masks on whole tiles, with paired conversions and the
// bare ex2 (exp2_ftz); the same bits as before in the emulator.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "kernels/cuda/attention_mma_common.h"
#include "kernels/cuda/attention_tc.h"

using namespace db_attn_tc;
using namespace db_attn_mma;

namespace {

// the row maximum / sum over the 4 lanes of a quad (they share rows g, g + 8)
__device__ __forceinline__ float quad_max(float x)
{
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One row's reference max update (attention_tc.cu's rule): *m moves to tmax
// when tmax exceeds it by more than rescale; *corr rescales what was summed
// before (0 on the row's first visible tile: nothing was), mref the max the
// tile's p are taken against (0 while the row has seen nothing: p = 0).
__device__ __forceinline__ float row_ref(float *m, float tmax, float rescale, float *corr)
{
    const bool up = tmax > *m + rescale;
    const float mnew = up ? tmax : *m;
    *corr = up ? exp2f(*m - mnew) : 1.0f;
    *m = mnew;
    return mnew == -INFINITY ? 0.0f : mnew;
}

// A tile's scores s to log2 units (times qscale), the keys a row may not
// see (MASK: j >= its limit jlim) -inf; *tA, *tB: the maxima of rows g and
// g + 8 over this lane's columns.  Without MASK the caller knows every key
// of the tile visible to every row: the same values, no compares.
template <bool MASK>
__device__ __forceinline__ void scale_max(float (&s)[BT / 8][4], float *tA, float *tB, float qscale, int j0, int jlimA,
                                          int jlimB)
{
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < BT / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = j0 + 8 * nt + 2 * t + (e & 1);
            const float y = !MASK || j < (e < 2 ? jlimA : jlimB) ? s[nt][e] * qscale : -INFINITY;
            s[nt][e] = y;
            if (e < 2)
                *tA = fmaxf(*tA, y);
            else
                *tB = fmaxf(*tB, y);
        }
}

// MR: row tiles of 16 queries a warp, so a block owns BR MR queries and
// each K or V fragment loaded from shared memory serves MR products (half
// the shared-memory loads a score with 2).  2 is possible up to head size
// 80 (two tiles' S, P and O fit in registers: 168 at head size 40, 242 at
// 80), and was the default (session 13, blind) where the grid kept two
// blocks a multiprocessor; call 9 (H200, 2026-11-28) measured it slower
// at SD1.5's 4096-token level, B2 8x40 bf16: 0.3466 ms against 0.3159
// with one tile a warp.  So 1, and DB_ATTN_MR=2 forces 2 (where the head
// size allows) for a later card to time again.
template <int NK> constexpr int mr_max() { return NK <= 5 ? 2 : 1; }

// shared memory of a block: Qs (BR MR rows), Ks, Vs; pipelined, two K, V
// pairs with Qs in the second (MR <= 2 tiles: its K and V)
template <typename T, int NK, int MR> constexpr size_t smem_bytes(bool pipe)
{
    return sizeof(T) * (pipe ? 4 : MR + 2) * BT * (16 * NK + 8);
}

// grid (ceil(Tq / (BR MR)), B * NH), block NWARP * 32, dynamic shared
// memory smem_bytes<T, NK, MR>(PIPE).  Warp w owns the MR row tiles of
// queries i0 + 16 (MR w + mr) .., mr < MR; a lane's rows in tile mr are
// i[mr][0] (g) and i[mr][1] (g + 8).
template <typename T, int NK, bool PIPE, bool LDSM, int MR>
__global__ static void __launch_bounds__(NWARP * 32)
    attention_mma_kernel(float *out, T *out16, float *lse, const T *q, const T *k, const T *v, int Tq, int Tk, int NH,
                         int HS, int causal, float qscale, float rescale, int rnd)
{
    constexpr int HSP = 16 * NK, LDH = HSP + 8, BQ = BR * MR;
    static_assert(BR == BT && MR <= 2, "Qs is laid out as one or two key tiles");
    extern __shared__ __align__(128) float smem[];
    // PIPE: pair 0 at 0 (K) and BT LDH (V), pair 1 at 2 BT LDH and 3 BT LDH,
    // Qs = pair 1; else Qs, Ks, Vs in turn
    T *const base = (T *)smem;
    T *Qs = PIPE ? base + 2 * BT * LDH : base; // (BQ, LDH)
    T *Ks = PIPE ? base : base + BQ * LDH;     // (BT, LDH): the tile in use
    T *Vs = Ks + BT * LDH;                     // (BT, LDH)
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t C = (size_t)NH * HS;
    const int HC = HS / 8; // 8-wide head-dimension tiles
    const int kend = causal && i0 + BQ < Tk ? i0 + BQ : Tk;

    if (PIPE) { // the first tile on its way while the queries load
        if (kend > 0)
            load_kv_tile<true>(base, base + BT * LDH, k, v, b, h, 0, Tk, NH, HS, LDH);
        db_cp::commit();
    }
    load_rows(Qs, q, b, h, i0, BQ, Tq, Tq, NH, HS, LDH);
    __syncthreads();
    uint32_t qa[MR][NK][4];
#pragma unroll
    for (int mr = 0; mr < MR; mr++)
        a_frags<T, NK, LDSM>(qa[mr], Qs + (warp * MR + mr) * 16 * LDH, LDH);
    if (PIPE)
        __syncthreads(); // every warp's queries read out of pair 1 before the second tile is copied there
    float o[MR][2 * NK][4];
    int ir[MR][2], jlim[MR][2];
    float m[MR][2], l[MR][2], lt[MR][2];
#pragma unroll
    for (int mr = 0; mr < MR; mr++) {
#pragma unroll
        for (int n = 0; n < 2 * NK; n++)
            o[mr][n][0] = o[mr][n][1] = o[mr][n][2] = o[mr][n][3] = 0.0f;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            ir[mr][r] = i0 + (warp * MR + mr) * 16 + g + 8 * r;
            jlim[mr][r] = causal && ir[mr][r] + 1 < Tk ? ir[mr][r] + 1 : Tk;
            m[mr][r] = -INFINITY, l[mr][r] = 0.0f, lt[mr][r] = 0.0f;
        }
    }
    const int jall = causal && i0 + 1 < Tk ? i0 + 1 : Tk; // keys below it are visible to every row of the block

    for (int j0 = 0, it = 0; j0 < kend; j0 += BT, it++) {
        if (PIPE) {
            // pair it & 1 holds this tile; the next one goes into the other
            // pair (consumed in the previous iteration, and the queries read
            // out of it before the loop: both behind a barrier)
            T *const cur = base + (it & 1) * 2 * BT * LDH, *const nxt = base + (~it & 1) * 2 * BT * LDH;
            if (j0 + BT < kend)
                load_kv_tile<true>(nxt, nxt + BT * LDH, k, v, b, h, j0 + BT, Tk, NH, HS, LDH);
            db_cp::commit(); // (empty past the last tile: one group per iteration either way)
            db_cp::wait<1>(); // this thread's copies of this tile have landed
            __syncthreads();  // and every thread's
            Ks = cur, Vs = cur + BT * LDH;
        } else {
            __syncthreads(); // the previous tile is consumed
            load_kv_tile(Ks, Vs, k, v, b, h, j0, Tk, NH, HS, LDH);
            __syncthreads();
        }

        // S (16 x 64 a row tile) = Q K^T: n-tile nt holds keys 8 nt .. 8 nt + 7
        float s[MR][BT / 8][4];
        prod_nt_m<T, NK, LDSM, MR>(s, qa, Ks, LDH);
        uint32_t pa[MR][BT / 16][4];
#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
            // scores in log2 units, masked (only where a key of the tile
            // lies past a row's limit: block-uniform); the rows' tile maxima
            float tA = -INFINITY, tB = -INFINITY;
            if (j0 + BT <= jall)
                scale_max<false>(s[mr], &tA, &tB, qscale, j0, jlim[mr][0], jlim[mr][1]);
            else
                scale_max<true>(s[mr], &tA, &tB, qscale, j0, jlim[mr][0], jlim[mr][1]);
            tA = quad_max(tA), tB = quad_max(tB);
            float corrA, corrB;
            const float refA = row_ref(&m[mr][0], tA, rescale, &corrA), refB = row_ref(&m[mr][1], tB, rescale, &corrB);

            // p, rounded to T two at a time: the A fragments of P (k-step kk
            // = keys 16 kk ..); the sums add p and its rounding in key order
            float psA = 0.0f, psB = 0.0f, ptA = 0.0f, ptB = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BT / 8; nt++) {
                const float p0 = exp2_ftz(s[mr][nt][0] - refA), p1 = exp2_ftz(s[mr][nt][1] - refA);
                const float p2 = exp2_ftz(s[mr][nt][2] - refB), p3 = exp2_ftz(s[mr][nt][3] - refB);
                const uint32_t wA = tc<T>::pair(p0, p1), wB = tc<T>::pair(p2, p3);
                psA += p0, ptA += tc<T>::lo(wA), psA += p1, ptA += tc<T>::hi(wA);
                psB += p2, ptB += tc<T>::lo(wB), psB += p3, ptB += tc<T>::hi(wB);
                pa[mr][nt / 2][(nt & 1) * 2 + 0] = wA; // row g
                pa[mr][nt / 2][(nt & 1) * 2 + 1] = wB; // row g + 8
            }
            l[mr][0] = l[mr][0] * corrA + quad_sum(psA), lt[mr][0] = lt[mr][0] * corrA + quad_sum(ptA);
            l[mr][1] = l[mr][1] * corrB + quad_sum(psB), lt[mr][1] = lt[mr][1] * corrB + quad_sum(ptB);
            if (corrA != 1.0f || corrB != 1.0f) // (the reference max moves seldom: o * 1 is o)
#pragma unroll
                for (int n = 0; n < 2 * NK; n++)
                    o[mr][n][0] *= corrA, o[mr][n][1] *= corrA, o[mr][n][2] *= corrB, o[mr][n][3] *= corrB;
        }

        // O += P V: V's B fragments, two keys of one head dimension per word
        prod_nn_m<T, NK, LDSM, MR>(o, pa, Vs, LDH, HC);
        if (PIPE)
            __syncthreads(); // this pair consumed before the next iteration fills it again
    }

    // out = O / lt (fp32, rounded to T when rnd: the value the caller's
    // rounding pass gave), out16 (when given, with rnd) its T bits: the
    // output's activation twin (cuda.h), lse = ln 2 (m + log2 l)
#pragma unroll
    for (int mr = 0; mr < MR; mr++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int i = ir[mr][r];
            if (i >= Tq)
                continue;
            const float inv = 1.0f / lt[mr][r];
#pragma unroll
            for (int n = 0; n < 2 * NK; n++) {
                if (n >= HC)
                    break;
                const size_t e = ((size_t)b * Tq + i) * C + (size_t)h * HS + 8 * n + 2 * t;
                const float x = o[mr][n][2 * r] * inv, y = o[mr][n][2 * r + 1] * inv;
                put2<T>(out + e, x, y, rnd);
                if (out16)
                    *(uint32_t *)(out16 + e) = tc<T>::pair(x, y);
            }
            if (lse && t == 0)
                lse[(size_t)bh * Tq + i] = (float)(0.6931471805599453 * ((double)m[mr][r] + log2((double)l[mr][r])));
        }
}

template <typename T, int NK, bool PIPE, bool LDSM, int MR>
static int launch(db_ctx *c, float *out, void *out16, float *lse, const void *q, const void *k, const void *v, int B,
                  int Tq, int Tk, int NH, int HS, int causal, float rescale, int rnd)
{
    const size_t smem = smem_bytes<T, NK, MR>(PIPE);
    void (*kern)(float *, T *, float *, const T *, const T *, const T *, int, int, int, int, int, float, float, int) =
        attention_mma_kernel<T, NK, PIPE, LDSM, MR>;
    if (db_cuda_smem_optin(c, kern, smem))
        return -1;
    dim3 grid((unsigned)((Tq + BR * MR - 1) / (BR * MR)), (unsigned)(B * NH));
    kern<<<grid, NWARP * 32, smem, db_cuda_st(c)->stream>>>(out, rnd ? (T *)out16 : NULL, lse, (const T *)q,
                                                             (const T *)k, (const T *)v, Tq, Tk, NH, HS, causal,
                                                             score_scale_log2(HS), rescale, rnd);
    DB_LAUNCHED(c);
    return 0;
}

} // namespace

// attention_tc.cu's checks have passed (dtype, HS, alignment, B * NH).
int db_cuda_attention_mma_forward(db_ctx *c, float *out, void *out16, float *lse, const void *q, const void *k,
                                  const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS, int causal,
                                  float rescale, int rnd)
{
    return with_nd(HS, [&](auto nk) {
        constexpr int NK = decltype(nk)::value;
        const bool pipe = db_cuda_attn_cpasync(), ldsm = db_cuda_attn_ldsm();
        auto go = [&](auto t, auto p, auto l) {
            constexpr bool P = decltype(p)::value, L = decltype(l)::value;
            if (mr_max<NK>() == 2 && db_cuda_attn_mr() == 2)
                return launch<decltype(t), NK, P, L, mr_max<NK>()>(c, out, out16, lse, q, k, v, B, Tq, Tk, NH, HS,
                                                                     causal, rescale, rnd);
            return launch<decltype(t), NK, P, L, 1>(c, out, out16, lse, q, k, v, B, Tq, Tk, NH, HS, causal, rescale,
                                                    rnd);
        };
        return with_types(dtype, pipe, ldsm, go);
    });
}
