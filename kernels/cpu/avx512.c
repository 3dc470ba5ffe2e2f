/* AVX-512 inner loops for the CPU ops.  Every function carries a target
 * attribute instead of the build using -mavx512f, so the library still runs on
 * CPUs without AVX-512: the ops call these only when ctx->simd is set (probed
 * at ctx creation), and otherwise run the portable loops in their own files.
 *
 * Vector math here (exp, exp2, erf) is accurate to a few ulp, which the
 * tests hold to relative L2 error <= 1e-5 against double-precision
 * references; erf is Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the
 * formula PyTorch's vectorised CPU erf uses. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

#include "kernels/cpu/cpu.h"

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
/* Full unrolling of the register-tile loops, so the accumulator arrays live in
 * zmm registers, not on the stack. */
#define UNROLL _Pragma("GCC unroll 16")

/* Mask of the first n (< 16) lanes. */
AVX512 static inline __mmask16 tail_mask(size_t n) { return (__mmask16)((1u << n) - 1u); }

/* e^x with Cody-Waite reduction (x = n ln2 + r, ln2 split in two so n*ln2 is
 * exact), so large |x| keeps full relative accuracy. */
AVX512 static inline __m512 exp_ps(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 < 2^-149: 0 */
    x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));   /* e^89 > FLT_MAX: inf */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 high part: 8 bits */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);    /* ln2 - high part */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* x * sigmoid(a x) = x / (1 + e^(-a x)). */
AVX512 static inline __m512 x_sigmoid_ps(__m512 x, float a)
{
    __m512 e = exp_ps(_mm512_mul_ps(x, _mm512_set1_ps(-a)));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* erf by Abramowitz & Stegun 7.1.26 on |x|, sign restored. */
AVX512 static inline __m512 erf_ps(__m512 x)
{
    __m512 ax = _mm512_abs_ps(x);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = exp_ps(_mm512_mul_ps(_mm512_mul_ps(ax, ax), _mm512_set1_ps(-1.0f)));
    __m512 y = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
    /* copy the sign of x onto y (y >= 0) */
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

AVX512 static inline __m512 gelu_erf_ps(__m512 x)
{
    __m512 e = erf_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3):
 * the sigmoid form has no cancellation near tanh = -1. */
AVX512 static inline __m512 gelu_tanh_ps(__m512 x)
{
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x), _mm512_set1_ps(0.7978845608028654f));
    __m512 e = exp_ps(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* The activation loops share one shape: full vectors, then a masked tail. */
#define UNARY_LOOP(expr_of_x)                                      \
    size_t i = 0;                                                  \
    for (; i + 16 <= n; i += 16) {                                 \
        __m512 x = _mm512_loadu_ps(inp + i);                       \
        _mm512_storeu_ps(out + i, (expr_of_x));                    \
    }                                                              \
    if (i < n) {                                                   \
        __mmask16 k = tail_mask(n - i);                            \
        __m512 x = _mm512_maskz_loadu_ps(k, inp + i);              \
        _mm512_mask_storeu_ps(out + i, k, (expr_of_x));            \
    }

AVX512 void db_avx512_silu(float *out, const float *inp, size_t n) { UNARY_LOOP(x_sigmoid_ps(x, 1.0f)) }
AVX512 void db_avx512_quick_gelu(float *out, const float *inp, size_t n) { UNARY_LOOP(x_sigmoid_ps(x, 1.702f)) }
AVX512 void db_avx512_gelu_erf(float *out, const float *inp, size_t n) { UNARY_LOOP(gelu_erf_ps(x)) }
AVX512 void db_avx512_gelu_tanh(float *out, const float *inp, size_t n) { UNARY_LOOP(gelu_tanh_ps(x)) }

AVX512 void db_avx512_geglu(float *out, const float *hidden, const float *gate, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 g = gelu_erf_ps(_mm512_loadu_ps(gate + i));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(hidden + i), g));
    }
    if (i < n) {
        __mmask16 k = tail_mask(n - i);
        __m512 g = gelu_erf_ps(_mm512_maskz_loadu_ps(k, gate + i));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, hidden + i), g));
    }
}

/* Four independent fp32 accumulators of 16 lanes (64 partial sums) over
 * blocks of at most 4096 elements, each block's total added in double: the
 * error stays near fp32 rounding of a 64-term sum whatever n is. */
AVX512 double db_avx512_sum(const float *x, size_t n)
{
    double total = 0;
    for (size_t b = 0; b < n; b += 4096) {
        size_t e = b + 4096 < n ? b + 4096 : n, i = b;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 64 <= e; i += 64) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + i + 16));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + i + 32));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + i + 48));
        }
        for (; i < e; i += 16) {
            __mmask16 k = e - i >= 16 ? (__mmask16)0xffff : tail_mask(e - i);
            a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(k, x + i));
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    return total;
}

AVX512 double db_avx512_sumsq_dev(const float *x, size_t n, float mean)
{
    double total = 0;
    __m512 m = _mm512_set1_ps(mean);
    for (size_t b = 0; b < n; b += 4096) {
        size_t e = b + 4096 < n ? b + 4096 : n, i = b;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 64 <= e; i += 64) {
            __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), m);
            __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), m);
            __m512 d2 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 32), m);
            __m512 d3 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 48), m);
            a0 = _mm512_fmadd_ps(d0, d0, a0);
            a1 = _mm512_fmadd_ps(d1, d1, a1);
            a2 = _mm512_fmadd_ps(d2, d2, a2);
            a3 = _mm512_fmadd_ps(d3, d3, a3);
        }
        for (; i < e; i += 16) {
            __mmask16 k = e - i >= 16 ? (__mmask16)0xffff : tail_mask(e - i);
            __m512 d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + i), m);
            a0 = _mm512_fmadd_ps(d, d, a0);
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    return total;
}

AVX512 void db_avx512_scale_shift(float *out, const float *inp, size_t n, float a, float b, int silu)
{
    __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    if (silu) {
        UNARY_LOOP(x_sigmoid_ps(_mm512_fmadd_ps(x, va, vb), 1.0f))
    } else {
        UNARY_LOOP(_mm512_fmadd_ps(x, va, vb))
    }
}

AVX512 void db_avx512_norm_affine(float *out, const float *x, const float *w, const float *b, size_t n, float mean,
                                  float rstd)
{
    __m512 vm = _mm512_set1_ps(mean), vr = _mm512_set1_ps(rstd);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm), vr);
        v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, b + i));
        _mm512_mask_storeu_ps(out + i, k, v);
    }
}

AVX512 void db_avx512_softmax_row(float *out, const float *x, size_t n)
{
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
        mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, x + i));
    }
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m));
        sum = _mm512_mask_add_ps(sum, k, sum, e);
        _mm512_mask_storeu_ps(out + i, k, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, out + i), inv));
    }
}

/* ---- attention tiles (layouts in attention.c) ----------------------------------- */

/* 2^x for x <= 0 (score minus running max): x = n + f, |f| <= 1/2, 2^f by
 * Cephes' exp2f polynomial (relative error 1.4e-7), times 2^n by vscalefps.
 * The clamp turns -inf (an empty running max) into 2^-150 = 0, not NaN. */
AVX512 static inline __m512 exp2_neg_ps(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* St rows for 8 keys, all QB = 48 query columns (3 vectors):
 * St[r][:] = sum over d < HS of K8[d][r] * Qt[d][:], K8 one packed group
 * (HS, 8).  8 keys x 3 vectors = 24 accumulators. */
AVX512 static void qk_tile8(float *St, const float *K8, const float *Qt, int HS)
{
    __m512 acc[8][3];
    UNROLL for (int r = 0; r < 8; r++)
        UNROLL for (int u = 0; u < 3; u++)
            acc[r][u] = _mm512_setzero_ps();
    for (int d = 0; d < HS; d++) {
        const float *q = Qt + (size_t)d * DB_ATTN_QB, *kd = K8 + (size_t)d * 8;
        __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32);
        UNROLL for (int r = 0; r < 8; r++) {
            __m512 kb = _mm512_set1_ps(kd[r]);
            acc[r][0] = _mm512_fmadd_ps(kb, q0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(kb, q1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(kb, q2, acc[r][2]);
        }
    }
    UNROLL for (int r = 0; r < 8; r++)
        UNROLL for (int u = 0; u < 3; u++)
            _mm512_storeu_ps(St + (size_t)r * DB_ATTN_QB + 16 * u, acc[r][u]);
}

AVX512 void db_avx512_attn_qk(float *St, const float *Kp, const float *Qt, int HS, int nk)
{
    for (int j = 0; j < nk; j += 8)
        qk_tile8(St + (size_t)j * DB_ATTN_QB, Kp + (size_t)j * HS, Qt, HS);
}

AVX512 void db_avx512_attn_softmax(float *St, int nk, float *m, float *l, float *corr, int causal, int i0, int j0)
{
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int u = 0; u < 3; u++) {
        /* queries i0 + 16u + lane; under the causal mask key j is valid for
         * the lanes whose query index is >= j, and no lane beyond key `last` */
        const __m512i qi = _mm512_add_epi32(lane, _mm512_set1_epi32(i0 + 16 * u));
        int n = nk;
        if (causal && i0 + 16 * u + 15 - j0 + 1 < n) /* rows past this are masked in every lane */
            n = i0 + 16 * u + 15 - j0 + 1 > 0 ? i0 + 16 * u + 15 - j0 + 1 : 0;
        float *s = St + 16 * u;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < n; j++) {
            __mmask16 k = causal ? _mm512_cmp_epi32_mask(qi, _mm512_set1_epi32(j0 + j), _MM_CMPINT_NLT) : 0xffff;
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_loadu_ps(s + (size_t)j * DB_ATTN_QB));
        }
        const __m512 mold = _mm512_loadu_ps(m + 16 * u);
        const __m512 mnew = _mm512_max_ps(mold, mx);
        const __m512 cr = exp2_neg_ps(_mm512_sub_ps(mold, mnew)); /* 0 on the first block */
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < n; j++) {
            __mmask16 k = causal ? _mm512_cmp_epi32_mask(qi, _mm512_set1_epi32(j0 + j), _MM_CMPINT_NLT) : 0xffff;
            float *sj = s + (size_t)j * DB_ATTN_QB;
            __m512 p = _mm512_maskz_mov_ps(k, exp2_neg_ps(_mm512_sub_ps(_mm512_loadu_ps(sj), mnew)));
            sum = _mm512_add_ps(sum, p);
            _mm512_storeu_ps(sj, p);
        }
        for (int j = n; j < nk; j++)
            _mm512_storeu_ps(s + (size_t)j * DB_ATTN_QB, _mm512_setzero_ps());
        _mm512_storeu_ps(l + 16 * u, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * u), cr, sum));
        _mm512_storeu_ps(m + 16 * u, mnew);
        _mm512_storeu_ps(corr + 16 * u, cr);
    }
}

/* Ot rows d..d+7 (head dims), all 48 query columns: scaled by corr, then
 * += sum over the nk keys of V8[j][i] * P[j][:], V8 one packed chunk
 * (keys, 8).  8 x 3 = 24 accumulators. */
AVX512 static void pv_tile8(float *Ot, const float *corr, const float *P, const float *V8, int nk)
{
    __m512 acc[8][3];
    const __m512 c0 = _mm512_loadu_ps(corr), c1 = _mm512_loadu_ps(corr + 16), c2 = _mm512_loadu_ps(corr + 32);
    UNROLL for (int i = 0; i < 8; i++) {
        const float *o = Ot + (size_t)i * DB_ATTN_QB;
        acc[i][0] = _mm512_mul_ps(_mm512_loadu_ps(o), c0);
        acc[i][1] = _mm512_mul_ps(_mm512_loadu_ps(o + 16), c1);
        acc[i][2] = _mm512_mul_ps(_mm512_loadu_ps(o + 32), c2);
    }
    for (int j = 0; j < nk; j++) {
        const float *p = P + (size_t)j * DB_ATTN_QB, *vj = V8 + (size_t)j * 8;
        __m512 p0 = _mm512_loadu_ps(p), p1 = _mm512_loadu_ps(p + 16), p2 = _mm512_loadu_ps(p + 32);
        UNROLL for (int i = 0; i < 8; i++) {
            __m512 vb = _mm512_set1_ps(vj[i]);
            acc[i][0] = _mm512_fmadd_ps(vb, p0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(vb, p1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(vb, p2, acc[i][2]);
        }
    }
    UNROLL for (int i = 0; i < 8; i++)
        UNROLL for (int u = 0; u < 3; u++)
            _mm512_storeu_ps(Ot + (size_t)i * DB_ATTN_QB + 16 * u, acc[i][u]);
}

AVX512 void db_avx512_attn_pv(float *Ot, const float *corr, const float *P, const float *Vp, size_t ldv, int HS8,
                              int nk)
{
    for (int d = 0; d < HS8; d += 8)
        pv_tile8(Ot + (size_t)d * DB_ATTN_QB, corr, P, Vp + (size_t)(d / 8) * ldv, nk);
}
