// Backward of scaled dot-product attention, flash style, fp32: the twin of
// kernels/cpu/attention_backward.c with its math.  With s = q_i . k_j,
// scale = 1 / sqrt(HS) and the saved lse (natural log, of the scaled scores):
//   P_ij  = expf(s_ij * scale - lse_i)       dP_ij = dO_i . v_j
//   D_i   = dO_i . O_i                         dS_ij = P_ij (dP_ij - D_i) scale
//   dQ_i  = sum_j dS_ij k_j    dK_j = sum_i dS_ij q_i    dV_j = sum_i P_ij dO_i
// causal: query i sees keys j <= i (top-left, as the forward).
//
// Deterministic without atomics: the probabilities are recomputed twice,
// once in a pass over query blocks that owns dQ (keys streamed through
// shared memory, as the forward) and once in a pass over key blocks that owns
// dK and dV (queries streamed); every output element is summed by one lane in
// a fixed order.  Both passes keep the forward's layout: a warp owns W rows
// (queries, or keys), the lane index runs over the streamed tile for the dot
// products and over head dims for the accumulation (d = lane + 32 t, t < KS).
// Correct first; no tensor cores (TF32 would miss the fp32 parity).
//
// bf16 / fp16 (c->precision, kernels/ops.h db_precision): for HS a multiple
// of 8 up to 160 (SD's 40/80/160, CLIP's 64) the tensor-core backward of
// attention_tc_backward.cu on 16-bit copies of dout, out, q, k, v (lse is
// float32 by the contract): the same math and two passes, the products on
// WMMA with fp32 accumulation, P and dS rounded to the compute type where
// they are mma operands; then dq, dk, dv rounded in place.  Other head sizes:
// these float32 kernels on rounded copies of the five inputs, outputs
// rounded in place (the contract's numbers, none of the speed).
#include <math.h>

#include "kernels/cuda/attention_tc.h"
#include "kernels/cuda/cuda.h"

enum {
    NWARP = 4,      // warps per block
    W = 4,          // rows (queries or keys) per warp
    RB = NWARP * W, // rows per block
    TT = 32,        // streamed tile: one row per lane
    HS_MAX = 160
};

// D (B*NH*Tq, laid out (B, NH, Tq)) = dO . O per query and head: one warp
// per entry, grid-stride over the entries
template <typename T>
__global__ static void attn_d_kernel(float *D, const T *dout, const T *out, int B, int Tq, int NH, int HS)
{
    const size_t n = (size_t)B * NH * Tq, nwarps = (size_t)gridDim.x * blockDim.x / 32;
    const int lane = threadIdx.x & 31;
    for (size_t e = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; e < n; e += nwarps) {
        const int i = (int)(e % Tq), h = (int)(e / Tq % NH), b = (int)(e / ((size_t)Tq * NH));
        const size_t row = ((size_t)b * Tq + i) * NH * HS + (size_t)h * HS;
        float s = 0.0f;
        for (int d = lane; d < HS; d += 32)
            s += db_cuda_f32(dout[row + d]) * db_cuda_f32(out[row + d]);
        for (int o = 16; o > 0; o >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0)
            D[e] = s;
    }
}

template <typename T>
int db_cuda_attn_d(db_ctx *c, float *D, const T *dout, const T *out, int B, int Tq, int NH, int HS)
{
    const size_t n = (size_t)B * NH * Tq;
    attn_d_kernel<T><<<db_cuda_grid(n * 32, 256), 256, 0, db_cuda_st(c)->stream>>>(D, dout, out, B, Tq, NH, HS);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "attn_d_kernel: %s", cudaGetErrorString(e));
    return 0;
}
template int db_cuda_attn_d<float>(db_ctx *, float *, const float *, const float *, int, int, int, int);
template int db_cuda_attn_d<__nv_bfloat16>(db_ctx *, float *, const __nv_bfloat16 *, const __nv_bfloat16 *, int, int,
                                           int, int);
template int db_cuda_attn_d<__half>(db_ctx *, float *, const __half *, const __half *, int, int, int, int);

// dQ pass.  grid (ceil(Tq / RB), B*NH), block NWARP*32, dynamic shared memory
// (2 RB HS + 2 TT (HS + 1)) floats.
// dq (B, Tq, NH*HS); dout, q (B, Tq, NH*HS); k, v (B, Tk, NH*HS); lse, D (B, NH, Tq).
template <int KS>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_dq_kernel(float *dq, const float *dout, const float *lse, const float *D, const float *q, const float *k,
                   const float *v, int Tq, int Tk, int NH, int HS, int causal, float scale)
{
    extern __shared__ float smem[];
    float *Qs = smem;               // (RB, HS)
    float *dOs = Qs + RB * HS;      // (RB, HS)
    float *Ks = dOs + RB * HS;      // (TT, HS + 1)
    float *Vs = Ks + TT * (HS + 1); // (TT, HS + 1)
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * RB;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t C = (size_t)NH * HS;

    for (int t = threadIdx.x; t < RB * HS; t += blockDim.x) {
        const int r = t / HS, d = t % HS, i = i0 + r;
        const size_t src = ((size_t)b * Tq + i) * C + (size_t)h * HS + d;
        Qs[t] = i < Tq ? q[src] : 0.0f;
        dOs[t] = i < Tq ? dout[src] : 0.0f;
    }
    float li[W], Di[W], acc[W][KS];
#pragma unroll
    for (int r = 0; r < W; r++) {
        const int i = i0 + warp * W + r;
        li[r] = i < Tq ? lse[(size_t)bh * Tq + i] : 0.0f;
        Di[r] = i < Tq ? D[(size_t)bh * Tq + i] : 0.0f;
#pragma unroll
        for (int t = 0; t < KS; t++)
            acc[r][t] = 0.0f;
    }
    const int kend = causal && i0 + RB < Tk ? i0 + RB : Tk;
    const float *qw = Qs + warp * W * HS, *ow = dOs + warp * W * HS;
    for (int j0 = 0; j0 < kend; j0 += TT) {
        __syncthreads();
        for (int t = threadIdx.x; t < TT * HS; t += blockDim.x) {
            const int jj = t / HS, d = t % HS, j = j0 + jj;
            const size_t src = ((size_t)b * Tk + j) * C + (size_t)h * HS + d;
            Ks[jj * (HS + 1) + d] = j < Tk ? k[src] : 0.0f;
            Vs[jj * (HS + 1) + d] = j < Tk ? v[src] : 0.0f;
        }
        __syncthreads();
        const int j = j0 + lane;
        float s[W], dp[W];
#pragma unroll
        for (int r = 0; r < W; r++)
            s[r] = dp[r] = 0.0f;
        const float *kr = Ks + lane * (HS + 1), *vr = Vs + lane * (HS + 1);
        for (int d = 0; d < HS; d++) {
            const float kd = kr[d], vd = vr[d];
#pragma unroll
            for (int r = 0; r < W; r++) {
                s[r] += qw[r * HS + d] * kd;
                dp[r] += ow[r * HS + d] * vd;
            }
        }
#pragma unroll
        for (int r = 0; r < W; r++) {
            const int i = i0 + warp * W + r;
            const bool valid = j < Tk && i < Tq && (!causal || j <= i);
            const float p = valid ? expf(s[r] * scale - li[r]) : 0.0f;
            s[r] = p * (dp[r] - Di[r]) * scale; // dS
        }
        for (int jj = 0; jj < TT; jj++) {
            float kv[KS];
#pragma unroll
            for (int t = 0; t < KS; t++) {
                const int d = lane + 32 * t;
                kv[t] = d < HS ? Ks[jj * (HS + 1) + d] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < W; r++) {
                const float ds = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int t = 0; t < KS; t++)
                    acc[r][t] += ds * kv[t];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < W; r++) {
        const int i = i0 + warp * W + r;
        if (i >= Tq)
            continue;
        float *dst = dq + ((size_t)b * Tq + i) * C + (size_t)h * HS;
#pragma unroll
        for (int t = 0; t < KS; t++) {
            const int d = lane + 32 * t;
            if (d < HS)
                dst[d] = acc[r][t];
        }
    }
}

// dK, dV pass.  grid (ceil(Tk / RB), B*NH), block NWARP*32, dynamic shared
// memory (2 RB HS + 2 TT (HS + 1) + 2 TT) floats.
// dk, dv (B, Tk, NH*HS) or NULL; the rest as attn_dq_kernel.
template <int KS>
__global__ static void __launch_bounds__(NWARP * 32)
    attn_dkv_kernel(float *dk, float *dv, const float *dout, const float *lse, const float *D, const float *q,
                    const float *k, const float *v, int Tq, int Tk, int NH, int HS, int causal, float scale)
{
    extern __shared__ float smem[];
    float *Kb = smem;                // (RB, HS) the block's keys
    float *Vb = Kb + RB * HS;        // (RB, HS)
    float *Qt = Vb + RB * HS;        // (TT, HS + 1) a tile of queries
    float *dOt = Qt + TT * (HS + 1); // (TT, HS + 1)
    float *lt = dOt + TT * (HS + 1); // (TT) their lse
    float *Dt = lt + TT;             // (TT) their D
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, j0 = blockIdx.x * RB;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t C = (size_t)NH * HS;

    for (int t = threadIdx.x; t < RB * HS; t += blockDim.x) {
        const int r = t / HS, d = t % HS, j = j0 + r;
        const size_t src = ((size_t)b * Tk + j) * C + (size_t)h * HS + d;
        Kb[t] = j < Tk ? k[src] : 0.0f;
        Vb[t] = j < Tk ? v[src] : 0.0f;
    }
    float gk[W][KS], gv[W][KS];
#pragma unroll
    for (int r = 0; r < W; r++)
#pragma unroll
        for (int t = 0; t < KS; t++)
            gk[r][t] = gv[r][t] = 0.0f;
    // causal: queries before the block's first key see none of its keys
    const int istart = causal ? j0 / TT * TT : 0;
    const float *kw = Kb + warp * W * HS, *vw = Vb + warp * W * HS;
    for (int q0 = istart; q0 < Tq; q0 += TT) {
        __syncthreads();
        for (int t = threadIdx.x; t < TT * HS; t += blockDim.x) {
            const int ii = t / HS, d = t % HS, i = q0 + ii;
            const size_t src = ((size_t)b * Tq + i) * C + (size_t)h * HS + d;
            Qt[ii * (HS + 1) + d] = i < Tq ? q[src] : 0.0f;
            dOt[ii * (HS + 1) + d] = i < Tq ? dout[src] : 0.0f;
        }
        if (threadIdx.x < TT) {
            const int i = q0 + threadIdx.x;
            lt[threadIdx.x] = i < Tq ? lse[(size_t)bh * Tq + i] : 0.0f;
            Dt[threadIdx.x] = i < Tq ? D[(size_t)bh * Tq + i] : 0.0f;
        }
        __syncthreads();
        const int i = q0 + lane;
        float s[W], dp[W];
#pragma unroll
        for (int r = 0; r < W; r++)
            s[r] = dp[r] = 0.0f;
        const float *qr = Qt + lane * (HS + 1), *orow = dOt + lane * (HS + 1);
        for (int d = 0; d < HS; d++) {
            const float qd = qr[d], od = orow[d];
#pragma unroll
            for (int r = 0; r < W; r++) {
                s[r] += qd * kw[r * HS + d];
                dp[r] += od * vw[r * HS + d];
            }
        }
        float p[W];
#pragma unroll
        for (int r = 0; r < W; r++) {
            const int j = j0 + warp * W + r;
            const bool valid = i < Tq && j < Tk && (!causal || j <= i);
            p[r] = valid ? expf(s[r] * scale - lt[lane]) : 0.0f;
            s[r] = p[r] * (dp[r] - Dt[lane]) * scale; // dS
        }
        for (int ii = 0; ii < TT; ii++) {
            float qv[KS], ov[KS];
#pragma unroll
            for (int t = 0; t < KS; t++) {
                const int d = lane + 32 * t;
                qv[t] = d < HS ? Qt[ii * (HS + 1) + d] : 0.0f;
                ov[t] = d < HS ? dOt[ii * (HS + 1) + d] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < W; r++) {
                const float ds = __shfl_sync(0xffffffffu, s[r], ii), pp = __shfl_sync(0xffffffffu, p[r], ii);
#pragma unroll
                for (int t = 0; t < KS; t++) {
                    gk[r][t] += ds * qv[t];
                    gv[r][t] += pp * ov[t];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < W; r++) {
        const int j = j0 + warp * W + r;
        if (j >= Tk)
            continue;
        const size_t row = ((size_t)b * Tk + j) * C + (size_t)h * HS;
#pragma unroll
        for (int t = 0; t < KS; t++) {
            const int d = lane + 32 * t;
            if (d < HS) {
                if (dk)
                    dk[row + d] = gk[r][t];
                if (dv)
                    dv[row + d] = gv[r][t];
            }
        }
    }
}

template <int KS>
static int launch(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *lse, const float *D,
                  const float *q, const float *k, const float *v, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    cudaStream_t s = db_cuda_st(c)->stream;
    const float scale = (float)(1.0 / sqrt((double)HS)); // as attention_backward.c
    if (dq) {
        const size_t smem = sizeof(float) * (2 * (size_t)RB * HS + 2 * (size_t)TT * (HS + 1));
        if (db_cuda_smem_optin(c, attn_dq_kernel<KS>, smem))
            return -1;
        dim3 grid((unsigned)((Tq + RB - 1) / RB), (unsigned)(B * NH));
        attn_dq_kernel<KS><<<grid, NWARP * 32, smem, s>>>(dq, dout, lse, D, q, k, v, Tq, Tk, NH, HS, causal, scale);
        DB_LAUNCHED(c);
    }
    if ((dk || dv) && Tk > 0) {
        const size_t smem = sizeof(float) * (2 * (size_t)RB * HS + 2 * (size_t)TT * (HS + 1) + 2 * TT);
        if (db_cuda_smem_optin(c, attn_dkv_kernel<KS>, smem))
            return -1;
        dim3 grid((unsigned)((Tk + RB - 1) / RB), (unsigned)(B * NH));
        attn_dkv_kernel<KS>
            <<<grid, NWARP * 32, smem, s>>>(dk, dv, dout, lse, D, q, k, v, Tq, Tk, NH, HS, causal, scale);
        DB_LAUNCHED(c);
    }
    return 0;
}

static int attention_backward32(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                                const float *lse, const float *q, const float *k, const float *v, int B, int Tq,
                                int Tk, int NH, int HS, int causal)
{
    if (B * NH == 0 || (!dq && !dk && !dv))
        return 0;
    if (HS < 1 || HS > HS_MAX)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention backward: head size %d outside 1..%d", HS,
                            HS_MAX);
    if (B * NH > 65535)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention backward: %d batch x heads over 65535",
                            B * NH);
    if (Tq == 0) { // no query: dK, dV are zero
        const size_t bytes = sizeof(float) * (size_t)B * Tk * NH * HS;
        if (dk)
            DB_CU(c, cudaMemsetAsync(dk, 0, bytes, db_cuda_st(c)->stream));
        if (dv)
            DB_CU(c, cudaMemsetAsync(dv, 0, bytes, db_cuda_st(c)->stream));
        return 0;
    }
    const size_t n = (size_t)B * NH * Tq;
    float *D = (float *)db_cuda_alloc(c, sizeof(float) * n);
    if (!D)
        return -1;
    int r = -1;
    if (db_cuda_attn_d(c, D, dout, out, B, Tq, NH, HS) == 0) {
        switch ((HS + 31) / 32) {
        case 1:
            r = launch<1>(c, dq, dk, dv, dout, lse, D, q, k, v, B, Tq, Tk, NH, HS, causal);
            break;
        case 2:
            r = launch<2>(c, dq, dk, dv, dout, lse, D, q, k, v, B, Tq, Tk, NH, HS, causal);
            break;
        case 3:
            r = launch<3>(c, dq, dk, dv, dout, lse, D, q, k, v, B, Tq, Tk, NH, HS, causal);
            break;
        case 4:
            r = launch<4>(c, dq, dk, dv, dout, lse, D, q, k, v, B, Tq, Tk, NH, HS, causal);
            break;
        default:
            r = launch<5>(c, dq, dk, dv, dout, lse, D, q, k, v, B, Tq, Tk, NH, HS, causal);
            break;
        }
    }
    db_cuda_free(c, D); // stream order keeps it alive for the kernels
    return r;
}

extern "C" int db_cuda_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout,
                                          const float *out, const float *lse, const float *q, const float *k,
                                          const float *v, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    DB_ENTER(c);
    // fp32; and in a 16-bit mode the cases with nothing to round (no output,
    // zeros for Tq 0) or an unsupported shape (the same error)
    if (!db_cuda_prec16(c) || B * NH == 0 || (!dq && !dk && !dv) || Tq == 0 || HS < 1 || HS > HS_MAX ||
        B * NH > 65535)
        return attention_backward32(c, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    const size_t nq = (size_t)B * Tq * NH * HS, nk = (size_t)B * Tk * NH * HS;
    // the operands: 16-bit for the tensor cores (attention_tc_backward.cu),
    // else rounded fp32 copies for the kernels of this file
    const int tc = HS % 8 == 0 && HS <= 160 && Tk >= 1;
    const float *src[5] = {dout, out, q, k, v};
    const size_t n[5] = {nq, nq, nq, nk, nk};
    void *op[5] = {NULL, NULL, NULL, NULL, NULL};
    int r = tc ? db_cuda_to16_many(c, op, src, n, 5) : 0; // (one launch for the five)
    for (int i = 0; i < 5 && !tc; i++)
        if (!(op[i] = db_cuda_rounded_copy(c, src[i], n[i])))
            r = -1;
    if (r == 0)
        r = tc ? db_cuda_attention_tc_backward(c, dq, dk, dv, op[0], op[1], lse, op[2], op[3], op[4],
                                               (int)c->precision, B, Tq, Tk, NH, HS, causal, 1)
               : attention_backward32(c, dq, dk, dv, (const float *)op[0], (const float *)op[1], lse,
                                      (const float *)op[2], (const float *)op[3], (const float *)op[4], B, Tq, Tk,
                                      NH, HS, causal);
    // the tensor-core path rounds its outputs as it writes them; here a pass
    float *outs[3] = {dq, dk, dv};
    for (int i = 0; i < 3; i++)
        if (r == 0 && outs[i] && !tc)
            r = db_cuda_round(c, outs[i], outs[i], i ? nk : nq, 0);
    for (int i = 0; i < 5; i++)
        db_cuda_free(c, op[i]); // stream order keeps them alive for the kernels
    return r ? -1 : 0;
}
