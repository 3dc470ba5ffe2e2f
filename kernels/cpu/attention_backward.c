/* Backward of scaled dot-product attention, flash style: the probabilities
 * are recomputed from q, k and the saved lse one block of queries at a time,
 * so what exists at any time is a (QB, Tk) tile per thread, never a (Tq, Tk)
 * matrix.  With s = q_i . k_j / sqrt(HS), P_ij = exp(s_ij - lse_i):
 *   dV_j += P_ij dO_i
 *   dP_ij = dO_i . v_j
 *   dS_ij = P_ij (dP_ij - D_i),   D_i = dO_i . O_i  (= sum_j P_ij dP_ij)
 *   dQ_i  = sum_j dS_ij k_j / sqrt(HS)
 *   dK_j += dS_ij q_i / sqrt(HS)
 * causal: query i sees keys j <= i (top-left aligned, as the forward).
 *
 * Per block of QB queries the five products are sgemm calls reading q, k,
 * v and dO in place (leading dimension C = NH * HS picks the head):
 *   S  (QB, Tk) = q_blk k^T        dP (QB, Tk) = dO_blk v^T
 *   dQ_blk      = dS k             dK += dS^T q_blk      dV += P^T dO_blk
 *
 * Work items are (batch, head) pairs: an item owns its head's columns of dq,
 * dk and dv outright and accumulates dK/dV in its thread's buffers in query
 * order, and every sgemm runs sequentially inside the item (the implicit
 * task's thread count set to 1, as db_cpu_sgemm_fixed does), so the result
 * is bit-identical at any thread count (no cross-thread reduction); the cost
 * is parallelism limited to B*NH items.  The elementwise part is compiled
 * twice, for AVX-512 (ctx->simd) and for the baseline ISA; with -std=c11 GCC
 * does not contract a*x+y into FMAs, so both give the same bits
 * (test_ops_backward checks).
 *
 * Speed (2 cores, one image, Tq = Tk = 4096, 8 heads of 40, SD1.5's level
 * 0): 0.39 s (138 GFLOP/s counting 2.5x the forward's 21.5 GFLOP), against
 * 1.57 s for the earlier per-row axpy loops; 1024 tokens, 10 heads of 64:
 * 0.039 s against 0.129 s.  The expf of the probabilities is now a visible
 * share; a vector exp must keep both ISA builds' bits equal.
 *
 * Per thread:
 *   dkh, dvh (Tk, HS)  the head's dK, dV accumulators
 *   S, dS    (QB, Tk)  scores -> probabilities, dP -> dS */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

enum { QB = 128 }; /* queries per block */

/* One call's tensors and sizes. */
typedef struct attn_args {
    float *dq, *dk, *dv;
    const float *dout, *out, *lse, *q, *k, *v;
    int B, Tq, Tk, NH, HS, causal;
    float scale;
    size_t th, tk16; /* per-thread buffer sizes */
} attn_args;

/* P and dS of one block in place (S -> P, dP -> dS); keys a query may not
 * see get 0.  always_inline: compiled once per ISA below. */
static inline __attribute__((always_inline)) void probs(const attn_args *a, float *S, float *dS, const float *Di,
                                                         const float *li, int i0, int nq, int nkb)
{
    const float scale = a->scale;
    for (int r = 0; r < nq; r++) {
        float *Sr = S + (size_t)r * a->tk16, *dPr = dS + (size_t)r * a->tk16;
        const int nk = a->causal && i0 + r + 1 < nkb ? i0 + r + 1 : nkb;
        const float l = li[r], D = Di[r];
        for (int j = 0; j < nk; j++) {
            const float p = expf(Sr[j] * scale - l);
            Sr[j] = p;
            dPr[j] = p * (dPr[j] - D) * scale;
        }
        for (int j = nk; j < nkb; j++)
            Sr[j] = dPr[j] = 0.0f;
    }
}

static void probs_portable(const attn_args *a, float *S, float *dS, const float *Di, const float *li, int i0, int nq,
                           int nkb)
{
    probs(a, S, dS, Di, li, i0, nq, nkb);
}

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static void
probs_avx512(const attn_args *a, float *S, float *dS, const float *Di, const float *li, int i0, int nq, int nkb)
{
    probs(a, S, dS, Di, li, i0, nq, nkb);
}

/* The whole backward of one (batch, head) item, with its thread's buffers
 * buf.  Returns a dnnl status. */
static dnnl_status_t item(const attn_args *a, int bh, float *buf, int simd)
{
    const int Tq = a->Tq, Tk = a->Tk, HS = a->HS, causal = a->causal, b = bh / a->NH, h = bh % a->NH;
    const int C = a->NH * HS, ld = (int)a->tk16;
    float *dkh = buf, *dvh = dkh + a->th, *S = dvh + a->th, *dS = S + QB * a->tk16;
    const float *qh = a->q + (size_t)b * Tq * C + (size_t)h * HS, *oh = a->dout + (size_t)b * Tq * C + (size_t)h * HS;
    const float *kh = a->k + (size_t)b * Tk * C + (size_t)h * HS, *vh = a->v + (size_t)b * Tk * C + (size_t)h * HS;
    float Di[QB], li[QB];
    dnnl_status_t st = dnnl_success;

    memset(dkh, 0, (size_t)Tk * HS * sizeof *dkh);
    memset(dvh, 0, (size_t)Tk * HS * sizeof *dvh);
    for (int i0 = 0; i0 < Tq && st == dnnl_success; i0 += QB) {
        const int nq = Tq - i0 < QB ? Tq - i0 : QB;
        const int nkb = causal && i0 + nq < Tk ? i0 + nq : Tk; /* keys any query of the block sees */
        const float *qb = qh + (size_t)i0 * C, *dob = oh + (size_t)i0 * C;
        for (int r = 0; r < nq; r++) {
            const size_t row = ((size_t)b * Tq + i0 + r) * C + (size_t)h * HS;
            float s = 0.0f;
            for (int d = 0; d < HS; d++)
                s += a->dout[row + d] * a->out[row + d];
            Di[r] = s;
            li[r] = a->lse[(size_t)bh * Tq + i0 + r];
        }
        /* S = q k^T, dP = dO v^T over the block's keys */
        st = dnnl_sgemm('N', 'T', nq, nkb, HS, 1.0f, qb, C, kh, C, 0.0f, S, ld);
        if (st == dnnl_success)
            st = dnnl_sgemm('N', 'T', nq, nkb, HS, 1.0f, dob, C, vh, C, 0.0f, dS, ld);
        if (st != dnnl_success)
            break;
        if (simd)
            probs_avx512(a, S, dS, Di, li, i0, nq, nkb);
        else
            probs_portable(a, S, dS, Di, li, i0, nq, nkb);
        /* dQ = dS k (scale folded into dS); dK += dS^T q; dV += P^T dO */
        if (a->dq)
            st = dnnl_sgemm('N', 'N', nq, HS, nkb, 1.0f, dS, ld, kh, C, 0.0f,
                            a->dq + ((size_t)b * Tq + i0) * C + (size_t)h * HS, C);
        if (st == dnnl_success)
            st = dnnl_sgemm('T', 'N', nkb, HS, nq, 1.0f, dS, ld, qb, C, 1.0f, dkh, HS);
        if (st == dnnl_success)
            st = dnnl_sgemm('T', 'N', nkb, HS, nq, 1.0f, S, ld, dob, C, 1.0f, dvh, HS);
    }
    for (int j = 0; j < Tk && st == dnnl_success; j++) {
        const size_t row = ((size_t)b * Tk + j) * C + (size_t)h * HS;
        if (a->dk)
            memcpy(a->dk + row, dkh + (size_t)j * HS, HS * sizeof *a->dk);
        if (a->dv)
            memcpy(a->dv + row, dvh + (size_t)j * HS, HS * sizeof *a->dv);
    }
    return st;
}

int db_cpu_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                              const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk,
                              int NH, int HS, int causal)
{
    const attn_args a = {.dq = dq, .dk = dk, .dv = dv, .dout = dout, .out = out, .lse = lse, .q = q, .k = k, .v = v,
                         .B = B, .Tq = Tq, .Tk = Tk, .NH = NH, .HS = HS, .causal = causal,
                         .scale = (float)(1.0 / sqrt((double)HS)), .th = DB_PAD16((size_t)Tk * HS),
                         .tk16 = DB_PAD16(Tk)};
    const size_t per_thread = 2 * a.th + 2 * QB * a.tk16;
    const int nthreads = c->threads, simd = c->simd;
    float *scratch = db_cpu_scratch(c, sizeof(float) * per_thread * nthreads);
    if (!scratch)
        return db_err_prefix(&c->err, "attention backward");
    dnnl_status_t status = dnnl_success;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int bh = 0; bh < B * NH; bh++) {
        /* one sequential sgemm per call: see db_cpu_sgemm_fixed */
        omp_set_num_threads(1);
        dnnl_status_t s = item(&a, bh, scratch + per_thread * omp_get_thread_num(), simd);
        if (s != dnnl_success) {
#pragma omp atomic write
            status = s;
        }
    }
    return status == dnnl_success ? 0 : db_cpu_dnnl_fail(c, status, "attention backward sgemm");
}
