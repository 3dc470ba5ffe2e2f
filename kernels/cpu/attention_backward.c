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
 * Work items are (batch, head) pairs: an item owns its head's columns of dq,
 * dk and dv outright and accumulates dK/dV in its thread's buffers in query
 * order, so the result is bit-identical at any thread count (no cross-thread
 * reduction); the cost is parallelism limited to B*NH items.  Every product
 * is written as an axpy along a contiguous row (omp simd, no horizontal
 * reductions), so lanes never reorder a sum.  The item is compiled twice, for
 * AVX-512 (ctx->simd) and for the baseline ISA; with -std=c11 GCC does not
 * contract a*x+y into FMAs, so both give the same bits (test_ops_backward
 * checks).
 *
 * Speed (2 cores, Tq = Tk = 1024, 8 heads of 40): ~170 ms against the
 * forward's ~15 ms.  The axpys are load/store bound; a register-blocked
 * micro-kernel like the forward's (avx512.c) is the next step.
 *
 * Per thread:
 *   kt, vt   (HS, Tk)  k and v of the head, transposed: S and dP are built
 *                      row by row as sums over d of q[r][d] * kt[d][:]
 *   kh       (Tk, HS)  k of the head, rows (for dQ)
 *   dkh, dvh (Tk, HS)  the head's dK, dV accumulators
 *   qb, dob  (QB, HS)  the block's queries and output gradients
 *   S, dS    (QB, Tk)  scores -> probabilities, dP -> dS */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

enum { QB = 16 }; /* queries per block: kt/vt are streamed once per block */

/* y[0..n) += a * x[0..n) */
static inline __attribute__((always_inline)) void axpy(float *restrict y, float a, const float *restrict x, int n)
{
#pragma omp simd
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

/* One call's tensors and sizes. */
typedef struct attn_args {
    float *dq, *dk, *dv;
    const float *dout, *out, *lse, *q, *k, *v;
    int B, Tq, Tk, NH, HS, causal;
    float scale;
    size_t th, tk16, qh; /* per-thread buffer sizes */
} attn_args;

/* The whole backward of one (batch, head) item into its thread's buffers
 * buf.  always_inline: compiled once per caller below, so the AVX-512
 * caller gets 16-lane loops and the portable one the baseline ISA. */
static inline __attribute__((always_inline)) void item(const attn_args *a, int bh, float *buf)
{
    const int Tq = a->Tq, Tk = a->Tk, HS = a->HS, causal = a->causal, b = bh / a->NH, h = bh % a->NH;
    const size_t C = (size_t)a->NH * HS, th = a->th, tk16 = a->tk16, qh = a->qh;
    const float scale = a->scale;
    float *kt = buf, *vt = kt + th, *kh = vt + th, *dkh = kh + th, *dvh = dkh + th;
    float *qb = dvh + th, *dob = qb + qh, *S = dob + qh, *dS = S + QB * tk16;
    float Di[QB], li[QB];

    for (int j = 0; j < Tk; j++) {
        const float *kj = a->k + ((size_t)b * Tk + j) * C + (size_t)h * HS;
        const float *vj = a->v + ((size_t)b * Tk + j) * C + (size_t)h * HS;
        memcpy(kh + (size_t)j * HS, kj, HS * sizeof *kh);
        for (int d = 0; d < HS; d++) {
            kt[(size_t)d * Tk + j] = kj[d];
            vt[(size_t)d * Tk + j] = vj[d];
        }
    }
    memset(dkh, 0, (size_t)Tk * HS * sizeof *dkh);
    memset(dvh, 0, (size_t)Tk * HS * sizeof *dvh);

    for (int i0 = 0; i0 < Tq; i0 += QB) {
        const int nq = Tq - i0 < QB ? Tq - i0 : QB;
        /* keys any query of the block sees */
        const int nkb = causal && i0 + nq < Tk ? i0 + nq : Tk;
        for (int r = 0; r < nq; r++) {
            const size_t row = ((size_t)b * Tq + i0 + r) * C + (size_t)h * HS;
            memcpy(qb + (size_t)r * HS, a->q + row, HS * sizeof *qb);
            memcpy(dob + (size_t)r * HS, a->dout + row, HS * sizeof *dob);
            float s = 0.0f;
            for (int d = 0; d < HS; d++)
                s += a->dout[row + d] * a->out[row + d];
            Di[r] = s;
            li[r] = a->lse[(size_t)bh * Tq + i0 + r];
        }
        /* S = q k^T, dP = dO v^T over the block's keys */
        for (int r = 0; r < nq; r++) {
            float *Sr = S + (size_t)r * tk16, *dPr = dS + (size_t)r * tk16;
            memset(Sr, 0, (size_t)nkb * sizeof *Sr);
            memset(dPr, 0, (size_t)nkb * sizeof *dPr);
            for (int d = 0; d < HS; d++) {
                axpy(Sr, qb[(size_t)r * HS + d], kt + (size_t)d * Tk, nkb);
                axpy(dPr, dob[(size_t)r * HS + d], vt + (size_t)d * Tk, nkb);
            }
            /* P and dS in place; keys this query may not see: 0 */
            const int nk = causal && i0 + r + 1 < nkb ? i0 + r + 1 : nkb;
            for (int j = 0; j < nk; j++) {
                const float p = expf(Sr[j] * scale - li[r]);
                Sr[j] = p;
                dPr[j] = p * (dPr[j] - Di[r]) * scale;
            }
            for (int j = nk; j < nkb; j++)
                Sr[j] = dPr[j] = 0.0f;
        }
        /* dQ = dS k (scale folded into dS) */
        if (a->dq) {
            for (int r = 0; r < nq; r++) {
                float *dqr = a->dq + ((size_t)b * Tq + i0 + r) * C + (size_t)h * HS;
                const float *dSr = dS + (size_t)r * tk16;
                memset(dqr, 0, HS * sizeof *dqr);
                for (int j = 0; j < nkb; j++)
                    axpy(dqr, dSr[j], kh + (size_t)j * HS, HS);
            }
        }
        /* dK += dS^T q, dV += P^T dO: key rows stay in L1 across the block */
        for (int j = 0; j < nkb; j++) {
            float *dkj = dkh + (size_t)j * HS, *dvj = dvh + (size_t)j * HS;
            for (int r = 0; r < nq; r++) {
                axpy(dkj, dS[(size_t)r * tk16 + j], qb + (size_t)r * HS, HS);
                axpy(dvj, S[(size_t)r * tk16 + j], dob + (size_t)r * HS, HS);
            }
        }
    }
    for (int j = 0; j < Tk; j++) {
        const size_t row = ((size_t)b * Tk + j) * C + (size_t)h * HS;
        if (a->dk)
            memcpy(a->dk + row, dkh + (size_t)j * HS, HS * sizeof *a->dk);
        if (a->dv)
            memcpy(a->dv + row, dvh + (size_t)j * HS, HS * sizeof *a->dv);
    }
}

static void item_portable(const attn_args *a, int bh, float *buf) { item(a, bh, buf); }

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static void item_avx512(const attn_args *a, int bh,
                                                                                            float *buf)
{
    item(a, bh, buf);
}

int db_cpu_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                              const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk,
                              int NH, int HS, int causal)
{
    const attn_args a = {.dq = dq, .dk = dk, .dv = dv, .dout = dout, .out = out, .lse = lse, .q = q, .k = k, .v = v,
                         .B = B, .Tq = Tq, .Tk = Tk, .NH = NH, .HS = HS, .causal = causal,
                         .scale = (float)(1.0 / sqrt((double)HS)), .th = DB_PAD16((size_t)Tk * HS),
                         .tk16 = DB_PAD16(Tk), .qh = DB_PAD16((size_t)QB * HS)};
    const size_t per_thread = 5 * a.th + 2 * a.qh + 2 * QB * a.tk16;
    const int nthreads = c->threads, simd = c->simd;
    float *scratch = db_cpu_scratch(c, sizeof(float) * per_thread * nthreads);
    if (!scratch)
        return db_err_prefix(&c->err, "attention backward");
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int bh = 0; bh < B * NH; bh++) {
        float *buf = scratch + per_thread * omp_get_thread_num();
        if (simd)
            item_avx512(&a, bh, buf);
        else
            item_portable(&a, bh, buf);
    }
    return 0;
}
