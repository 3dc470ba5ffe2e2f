// Scaled dot-product attention forward, flash style, fp32: the twin of
// kernels/cpu/attention.c with its math: q pre-multiplied (in float) by
// log2(e) / sqrt(HS), an online softmax in base 2 (exp2f) per key tile, and
// lse = ln 2 * (m + log2 l) in double: the natural-log sum of exp of the
// query's scaled scores.  Causal: query i sees keys j <= i (top-left).
//
// Correct first, plain CUDA cores (no tensor cores: those would be TF32).
// A block is NWARP warps over (b, h, QB queries); each warp owns QW queries.
// Per key tile of KT = 32 keys (K and V staged in shared memory):
//   scores: lane j computes the warp's QW scores of key j0 + j (the query
//           vectors are broadcast reads of shared memory, K rows padded to
//           HS + 1 floats so the 32 lanes hit 32 banks);
//   softmax: tile max and sum by warp shuffles (a fixed tree: deterministic);
//   P V:   lanes own head dims d = lane + 32 k (k < KS, HS <= 32 KS), each
//          probability broadcast from its lane by a shuffle.
// So no (Tq, Tk) score matrix exists, and HS up to 160 is supported.
//
// bf16 / fp16 (c->precision, kernels/ops.h db_precision): for HS a multiple
// of 8 (SD's 40/80/160, CLIP's 64) the WMMA flash kernel of attention_tc.cu
// on 16-bit q, k, v; other head sizes this float32 kernel on rounded copies.
// out is rounded to the compute type in place either way (lse stays float32).
#include <math.h>

#include "kernels/cuda/attention_tc.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/reduce.h"

enum {
    NWARP = 4,       // warps per block
    QW = 4,          // queries per warp
    QB = NWARP * QW, // queries per block
    KT = 32,         // keys per tile: one per lane
    HS_MAX = 160     // 5 head-dim slots per lane
};

// grid (ceil(Tq / QB), B * NH), block NWARP * 32, dynamic shared memory
// (QB HS + KT (HS + 1) + KT HS) floats.
// out (B, Tq, NH*HS); lse (B, NH, Tq) or NULL; q (B, Tq, NH*HS); k, v (B, Tk, NH*HS).
template <int KS>
__global__ static void __launch_bounds__(NWARP * 32)
    attention_forward_kernel(float *out, float *lse, const float *q, const float *k, const float *v, int Tq, int Tk,
                             int NH, int HS, int causal, float qscale)
{
    extern __shared__ float smem[];
    float *Qs = smem;               // (QB, HS), pre-scaled
    float *Ks = Qs + QB * HS;       // (KT, HS + 1)
    float *Vs = Ks + KT * (HS + 1); // (KT, HS)
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, i0 = blockIdx.x * QB;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t C = (size_t)NH * HS;

    for (int t = threadIdx.x; t < QB * HS; t += blockDim.x) {
        const int r = t / HS, d = t % HS, i = i0 + r;
        Qs[t] = i < Tq ? q[((size_t)b * Tq + i) * C + (size_t)h * HS + d] * qscale : 0.0f;
    }
    float m[QW], l[QW], acc[QW][KS];
#pragma unroll
    for (int r = 0; r < QW; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int s = 0; s < KS; s++)
            acc[r][s] = 0.0f;
    }
    // causal: no query of the block sees a key past its last query
    const int kend = causal && i0 + QB < Tk ? i0 + QB : Tk;
    const float *qw = Qs + warp * QW * HS;
    for (int j0 = 0; j0 < kend; j0 += KT) {
        __syncthreads(); // the previous tile is consumed (and Qs is written)
        for (int t = threadIdx.x; t < KT * HS; t += blockDim.x) {
            const int jj = t / HS, d = t % HS, j = j0 + jj;
            const size_t src = ((size_t)b * Tk + j) * C + (size_t)h * HS + d;
            Ks[jj * (HS + 1) + d] = j < Tk ? k[src] : 0.0f;
            Vs[jj * HS + d] = j < Tk ? v[src] : 0.0f;
        }
        __syncthreads();

        const int j = j0 + lane;
        float s[QW];
#pragma unroll
        for (int r = 0; r < QW; r++)
            s[r] = 0.0f;
        const float *kr = Ks + lane * (HS + 1);
        for (int d = 0; d < HS; d++) {
            const float kd = kr[d];
#pragma unroll
            for (int r = 0; r < QW; r++)
                s[r] += qw[r * HS + d] * kd;
        }
#pragma unroll
        for (int r = 0; r < QW; r++) {
            const int i = i0 + warp * QW + r;
            const bool valid = j < Tk && (!causal || j <= i);
            const float sv = valid ? s[r] : -INFINITY;
            float tmax = sv;
            for (int o = 16; o > 0; o >>= 1)
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
            const float mnew = fmaxf(m[r], tmax);
            const float p = valid ? exp2f(sv - mnew) : 0.0f;
            // 0 on the first visible tile; 1 when this tile shows the query nothing
            const float corr = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - mnew);
            float psum = p;
            for (int o = 16; o > 0; o >>= 1)
                psum += __shfl_xor_sync(0xffffffffu, psum, o);
            l[r] = l[r] * corr + psum;
            m[r] = mnew;
#pragma unroll
            for (int t = 0; t < KS; t++)
                acc[r][t] *= corr;
            s[r] = p;
        }
        for (int jj = 0; jj < KT; jj++) {
            float vv[KS];
#pragma unroll
            for (int t = 0; t < KS; t++) {
                const int d = lane + 32 * t;
                vv[t] = d < HS ? Vs[jj * HS + d] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < QW; r++) {
                const float pj = __shfl_sync(0xffffffffu, s[r], jj);
#pragma unroll
                for (int t = 0; t < KS; t++)
                    acc[r][t] += pj * vv[t];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < QW; r++) {
        const int i = i0 + warp * QW + r;
        if (i >= Tq)
            continue;
        const float inv = 1.0f / l[r];
        float *dst = out + ((size_t)b * Tq + i) * C + (size_t)h * HS;
#pragma unroll
        for (int t = 0; t < KS; t++) {
            const int d = lane + 32 * t;
            if (d < HS)
                dst[d] = acc[r][t] * inv;
        }
        if (lse && lane == 0)
            lse[(size_t)bh * Tq + i] = (float)(0.6931471805599453 * ((double)m[r] + log2((double)l[r])));
    }
}

template <int KS>
static int launch(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B, int Tq,
                  int Tk, int NH, int HS, int causal)
{
    const float qscale = (float)(1.0 / sqrt((double)HS) * 1.4426950408889634);
    const size_t smem = sizeof(float) * ((size_t)QB * HS + (size_t)KT * (HS + 1) + (size_t)KT * HS);
    if (db_cuda_smem_optin(c, attention_forward_kernel<KS>, smem))
        return -1;
    dim3 grid((unsigned)((Tq + QB - 1) / QB), (unsigned)(B * NH));
    attention_forward_kernel<KS>
        <<<grid, NWARP * 32, smem, db_cuda_st(c)->stream>>>(out, lse, q, k, v, Tq, Tk, NH, HS, causal, qscale);
    DB_LAUNCHED(c);
    return 0;
}

// Head sizes over HS_MAX (the VAE's mid-block attention: one head of 512
// channels over every latent pixel) through cuBLAS instead: per sample and
// chunk of n queries, S = (log2(e) / sqrt(HS)) Q K^T for all heads (a strided
// batch, fp32 default math: no TF32), a row softmax in base 2 that writes P
// over S and lse, then out = P V.  The score chunk is at most
// GEMM_SCORE_BYTES (n >= 1), so memory stays bounded at any image size.
enum { SOFTMAX_THREADS = 256 };
static const size_t GEMM_SCORE_BYTES = (size_t)128 << 20;

// one block per row of S (NH * n rows of Tk); row r is query i0 + r % n of
// head r / n; causal: keys j > that query get probability 0
__global__ static void __launch_bounds__(SOFTMAX_THREADS)
    softmax_rows_kernel(float *S, float *lse, int n, int Tk, int Tq, int i0, int causal)
{
    __shared__ float red[32];
    const int row = blockIdx.x, h = row / n, i = i0 + row % n;
    const int kend = causal && i + 1 < Tk ? i + 1 : Tk;
    float *s = S + (size_t)row * Tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < kend; j += blockDim.x)
        m = fmaxf(m, s[j]);
    m = db_block_max(m, red);
    float l = 0.0f;
    for (int j = threadIdx.x; j < kend; j += blockDim.x)
        l += exp2f(s[j] - m);
    l = db_block_sum(l, red); // a fixed tree: deterministic
    const float inv = 1.0f / l;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        s[j] = j < kend ? exp2f(s[j] - m) * inv : 0.0f;
    if (lse && threadIdx.x == 0)
        lse[(size_t)h * Tq + i] = kend ? (float)(0.6931471805599453 * ((double)m + log2((double)l))) : -INFINITY;
}

// one sample's chunk of n queries from i0: S, softmax (P over S), out = P V
static int gemm_chunk(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, float *S,
                      int n, int i0, int Tq, int Tk, int NH, int HS, int causal)
{
    const int C = NH * HS;
    const float qscale = (float)(1.0 / sqrt((double)HS) * 1.4426950408889634);
    if (db_cuda_sgemm(c, NH, 0, 1, n, Tk, HS, qscale, q + (size_t)i0 * C, C, HS, k, C, HS, 0.0f, S, Tk,
                      (long long)n * Tk))
        return -1;
    softmax_rows_kernel<<<(unsigned)(NH * n), SOFTMAX_THREADS, 0, db_cuda_st(c)->stream>>>(S, lse, n, Tk, Tq, i0,
                                                                                          causal);
    DB_LAUNCHED(c);
    return db_cuda_sgemm(c, NH, 0, 0, n, HS, Tk, 1.0f, S, Tk, (long long)n * Tk, v, C, HS, 0.0f,
                         out + (size_t)i0 * C, C, HS);
}

static int attention_forward_gemm(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v,
                                  int B, int Tq, int Tk, int NH, int HS, int causal)
{
    const size_t C = (size_t)NH * HS, row = sizeof(float) * (size_t)NH * (Tk > 0 ? Tk : 1);
    const size_t fit = GEMM_SCORE_BYTES / row;
    const int n_max = fit < 1 ? 1 : fit > (size_t)Tq ? Tq : (int)fit;
    float *S = (float *)db_cuda_alloc(c, row * n_max);
    if (!S)
        return -1;
    int r = 0;
    for (int b = 0; b < B && r == 0; b++)
        for (int i0 = 0; i0 < Tq && r == 0; i0 += n_max)
            r = gemm_chunk(c, out + (size_t)b * Tq * C, lse ? lse + (size_t)b * NH * Tq : NULL,
                           q + (size_t)b * Tq * C, k + (size_t)b * Tk * C, v + (size_t)b * Tk * C, S,
                           Tq - i0 < n_max ? Tq - i0 : n_max, i0, Tq, Tk, NH, HS, causal);
    db_cuda_free(c, S); // stream order keeps it alive for the kernels
    return r;
}

static int attention_forward32(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v,
                               int B, int Tq, int Tk, int NH, int HS, int causal)
{
    if (B * NH == 0 || Tq == 0)
        return 0;
    if (HS < 1)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention: head size %d below 1", HS);
    if (HS > HS_MAX)
        return attention_forward_gemm(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    if (B * NH > 65535)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "attention: %d batch x heads over 65535", B * NH);
    switch ((HS + 31) / 32) {
    case 1:
        return launch<1>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    case 2:
        return launch<2>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    case 3:
        return launch<3>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    case 4:
        return launch<4>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    default:
        return launch<5>(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    }
}

extern "C" int db_cuda_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k,
                                         const float *v, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    DB_ENTER(c);
    // fp32; and in a 16-bit mode the cases that write nothing or fail the same
    if (!db_cuda_prec16(c) || B * NH == 0 || Tq == 0 || HS < 1 || B * NH > 65535)
        return attention_forward32(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    const size_t nq = (size_t)B * Tq * NH * HS, nk = (size_t)B * Tk * NH * HS;
    // the operands: 16-bit for the tensor cores (attention_tc.cu: SD's
    // 40/80/160, CLIP's 64), else rounded fp32 copies for this kernel
    const int tc = HS % 8 == 0 && HS <= 160 && Tk >= 1;
    const float *src[3] = {q, k, v};
    const size_t n[3] = {nq, nk, nk};
    void *op[3] = {NULL, NULL, NULL};
    int r = tc ? db_cuda_to16_many(c, op, src, n, 3) : 0; // (one launch for the three)
    for (int i = 0; i < 3 && !tc; i++)
        if (!(op[i] = db_cuda_rounded_copy(c, src[i], n[i])))
            r = -1;
    // out rounded: by the tensor-core kernel as it stores it (with its 16
    // bits, out's twin for the output projection next: cuda.h), else a pass
    if (r == 0)
        r = tc ? db_cuda_attention_tc_forward_twin(c, out, lse, op[0], op[1], op[2], (int)c->precision, B, Tq, Tk, NH,
                                                   HS, causal)
               : attention_forward32(c, out, lse, (const float *)op[0], (const float *)op[1], (const float *)op[2],
                                     B, Tq, Tk, NH, HS, causal);
    if (r == 0 && !tc)
        r = db_cuda_round(c, out, out, nq, 0);
    for (int i = 0; i < 3; i++)
        db_cuda_free(c, op[i]); // stream order keeps them alive for the kernel
    return r ? -1 : 0;
}
