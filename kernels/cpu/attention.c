/* Scaled dot-product attention, flash style.
 *
 * Work is split into items (batch b, head h, block of QB = 48 queries), run in
 * parallel.  An item walks the keys in blocks of BK with an online softmax:
 * per query it keeps the running max m and sum l of 2^(score - m), and an
 * output accumulator that is rescaled whenever m grows.  So the scores that
 * exist at any time are one BK x QB tile per thread (24 KiB), never a (Tq, Tk)
 * matrix: SD1.5's first level, 4096 tokens x 8 heads, would need 512 MiB per
 * image for the full matrices.
 *
 * Queries live in the SIMD lanes: the tiles are stored transposed,
 *   Qt  (HS, QB)   the item's queries, pre-scaled (rows past Tq zero)
 *   St  (BK, QB)   scores, then probabilities in place
 *   Ot  (HS8, QB)  unnormalised output (HS8 = HS rounded up to 8)
 *   m, l, corr (QB)
 * so the softmax over keys is a column operation (plain vector max/add down
 * the rows, no horizontal reductions) and a head dim of 40 needs no padding
 * (tiles step 8 head dims, not 16 lanes).  Keys and values are packed once
 * per call so each tile step reads one sequential stream of 8 floats:
 *   Kp  per (b, h): groups of 8 keys, each (HS, 8)       (keys padded to Tk8)
 *   Vp  per (b, h): chunks of 8 head dims, each (Tk8, 8) (dims padded to HS8)
 * Packing is one pass over k and v; the tile products re-read them Tq/QB times.
 *
 * Scores are in log2 units: q is pre-multiplied by log2(e)/sqrt(HS), so the
 * softmax uses 2^x, and lse = ln 2 * (m + log2 l).
 *
 * The tile products and the softmax step run in avx512.c when ctx->simd is
 * set, else in the portable loops below (same blocking, same results to
 * rounding). */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

enum {
    QB = DB_ATTN_QB, /* queries per item */
    BK = 128,        /* keys per block, a multiple of 8: St is BK x QB floats */
};

/* ---- portable tile kernels (same contracts as the db_avx512_attn_* ones) ---- */

static void qk_portable(float *St, const float *Kp, const float *Qt, int HS, int nk)
{
    for (int j = 0; j < nk; j++) {
        const float *k8 = Kp + (size_t)(j / 8) * HS * 8 + j % 8; /* key j's d-th value at k8[8 d] */
        float *s = St + (size_t)j * QB;
        for (int r = 0; r < QB; r++)
            s[r] = 0.0f;
        for (int d = 0; d < HS; d++) {
            const float kd = k8[(size_t)d * 8], *q = Qt + (size_t)d * QB;
            for (int r = 0; r < QB; r++)
                s[r] += kd * q[r];
        }
    }
}

static void softmax_portable(float *St, int nk, float *m, float *l, float *corr, int causal, int i0, int j0)
{
    for (int r = 0; r < QB; r++) {
        /* keys visible to query i0 + r in this block: all, or j0 + j <= i0 + r */
        int n = causal && i0 + r - j0 + 1 < nk ? i0 + r - j0 + 1 : nk;
        float mnew = m[r];
        for (int j = 0; j < n; j++)
            mnew = fmaxf(mnew, St[(size_t)j * QB + r]);
        float sum = 0.0f;
        for (int j = 0; j < nk; j++) {
            float *s = &St[(size_t)j * QB + r];
            *s = j < n ? exp2f(*s - mnew) : 0.0f;
            sum += *s;
        }
        corr[r] = n > 0 ? exp2f(m[r] - mnew) : 1.0f; /* 0 on the first block */
        l[r] = l[r] * corr[r] + sum;
        m[r] = mnew;
    }
}

static void pv_portable(float *Ot, const float *corr, const float *P, const float *Vp, size_t ldv, int HS8, int nk)
{
    for (int d = 0; d < HS8; d++) {
        const float *v8 = Vp + (size_t)(d / 8) * ldv + d % 8; /* key j's value at v8[8 j] */
        float *o = Ot + (size_t)d * QB;
        for (int r = 0; r < QB; r++)
            o[r] *= corr[r];
        for (int j = 0; j < nk; j++) {
            const float vd = v8[(size_t)j * 8], *p = P + (size_t)j * QB;
            for (int r = 0; r < QB; r++)
                o[r] += vd * p[r];
        }
    }
}

/* ---- the op ---------------------------------------------------------------------- */

int db_cpu_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B,
                             int Tq, int Tk, int NH, int HS, int causal)
{
    const size_t C = (size_t)NH * HS; /* row stride of q, k, v, out */
    const int nbh = B * NH, nqb = (Tq + QB - 1) / QB;
    const int simd = c->simd;
    /* scores in log2 units: q . k / sqrt(HS) * log2(e) */
    const float qscale = (float)(1.0 / sqrt((double)HS) * 1.4426950408889634);

    const int Tk8 = (Tk + 7) & ~7, HS8 = (HS + 7) & ~7;
    const size_t kp_n = (size_t)Tk8 * HS, vp_n = (size_t)HS8 * Tk8; /* per (b, h) */
    /* per thread: Qt (HS x QB), Ot (HS8 x QB), St (BK x QB), m, l, corr (QB) */
    const size_t per_thread = (size_t)QB * ((size_t)HS + HS8 + BK + 3);
    float *scratch = db_cpu_scratch(c, sizeof(float) * ((kp_n + vp_n) * nbh + per_thread * c->threads));
    if (!scratch)
        return db_err_prefix(&c->err, "attention");
    float *Kp = scratch, *Vp = Kp + kp_n * nbh, *thread_bufs = Vp + vp_n * nbh;

#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int bh = 0; bh < nbh; bh++) {
        const int b = bh / NH, h = bh % NH;
        float *kp = Kp + kp_n * bh, *vp = Vp + vp_n * bh;
        for (int j = 0; j < Tk8; j++) {
            float *kd = kp + (size_t)(j / 8) * HS * 8 + j % 8, *vd = vp + (size_t)j * 8;
            if (j >= Tk) { /* padding keys: zero */
                for (int d = 0; d < HS; d++)
                    kd[(size_t)d * 8] = 0.0f;
                for (int d = 0; d < HS8; d++)
                    vd[(size_t)(d / 8) * Tk8 * 8 + d % 8] = 0.0f;
                continue;
            }
            const float *kj = k + ((size_t)b * Tk + j) * C + (size_t)h * HS;
            const float *vj = v + ((size_t)b * Tk + j) * C + (size_t)h * HS;
            for (int d = 0; d < HS; d++)
                kd[(size_t)d * 8] = kj[d];
            for (int d = 0; d < HS8; d++)
                vd[(size_t)(d / 8) * Tk8 * 8 + d % 8] = d < HS ? vj[d] : 0.0f;
        }
    }

#pragma omp parallel num_threads(c->threads)
    {
        float *Qt = thread_bufs + per_thread * omp_get_thread_num();
        float *Ot = Qt + (size_t)HS * QB, *St = Ot + (size_t)HS8 * QB;
        float *m = St + (size_t)BK * QB, *l = m + QB, *corr = l + QB;

#pragma omp for schedule(dynamic)
        for (int item = 0; item < nbh * nqb; item++) {
            const int bh = item / nqb, b = bh / NH, h = bh % NH;
            const int i0 = (item % nqb) * QB;
            const int nq = Tq - i0 < QB ? Tq - i0 : QB;
            const float *kp = Kp + kp_n * bh, *vp = Vp + vp_n * bh;
            const size_t ldv = (size_t)Tk8 * 8; /* between Vp's head-dim chunks */

            for (int d = 0; d < HS; d++) {
                const float *src = q + ((size_t)b * Tq + i0) * C + (size_t)h * HS + d;
                float *dst = Qt + (size_t)d * QB;
                for (int r = 0; r < nq; r++)
                    dst[r] = src[(size_t)r * C] * qscale;
                for (int r = nq; r < QB; r++)
                    dst[r] = 0.0f;
            }
            for (int r = 0; r < QB; r++) {
                m[r] = -INFINITY;
                l[r] = 0.0f;
            }
            memset(Ot, 0, (size_t)HS8 * QB * sizeof *Ot);

            /* Causal: the block's last query sees keys up to i0 + nq - 1. */
            const int kend = causal && i0 + nq < Tk ? i0 + nq : Tk;
            for (int j0 = 0; j0 < kend; j0 += BK) {
                const int nk = kend - j0 < BK ? kend - j0 : BK;
                /* j0 is a multiple of 8: whole key groups; padded keys are
                 * scored (as 0) but never enter the softmax (rows >= nk) */
                if (simd) {
                    db_avx512_attn_qk(St, kp + (size_t)j0 * HS, Qt, HS, nk);
                    db_avx512_attn_softmax(St, nk, m, l, corr, causal, i0, j0);
                    db_avx512_attn_pv(Ot, corr, St, vp + (size_t)j0 * 8, ldv, HS8, nk);
                } else {
                    qk_portable(St, kp + (size_t)j0 * HS, Qt, HS, nk);
                    softmax_portable(St, nk, m, l, corr, causal, i0, j0);
                    pv_portable(Ot, corr, St, vp + (size_t)j0 * 8, ldv, HS8, nk);
                }
            }

            for (int r = 0; r < nq; r++) {
                float *dst = out + ((size_t)b * Tq + i0 + r) * C + (size_t)h * HS;
                const float inv = 1.0f / l[r];
                for (int d = 0; d < HS; d++)
                    dst[d] = Ot[(size_t)d * QB + r] * inv;
                if (lse)
                    lse[(size_t)bh * Tq + i0 + r] = (float)(0.6931471805599453 * ((double)m[r] + log2((double)l[r])));
            }
        }
    }
    return 0;
}
