/* The CPU's emulation of bf16/fp16 compute ("autocast", kernels/ops.h above
 * db_precision): each matmul-class op rounds its floating inputs into
 * temporary copies, runs the float32 kernel on them, and rounds its outputs
 * in place.  Parameter-gradient contributions go through a zeroed temporary
 * so that each contribution is rounded before the += into the caller's
 * float32 buffer, as a bf16/fp16 weight.grad would be cast and added.
 *
 * A reference, not a speed-up: the float32 kernels do the arithmetic (the
 * products of compute-type values are exact in float32, the sums float32),
 * so the result is what tensor cores give up to summation order.  The
 * rounding is libcommon/core/tensor.c's db_f32_to_bf16 / db_f32_to_f16 then
 * back (round to nearest even; fp16 overflows to +-inf; NaN stays NaN,
 * quieted), inlined here so the loops run without a call per element; the
 * unit test (tests/unit/test_autocast.c) checks the two agree bit for bit.
 *
 * Element-wise work only, so the result does not depend on the thread count
 * beyond what the float32 kernel itself guarantees. */
#include <string.h>

#include "kernels/cpu/cpu.h"

static inline uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* db_bf16_to_f32(db_f32_to_bf16(f)) */
static inline float round_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep the top payload bits, force quiet */
        return u2f((u | 0x00400000u) & 0xffff0000u);
    u += 0x7fffu + ((u >> 16) & 1);
    return u2f(u & 0xffff0000u);
}

/* db_f32_to_f16 then db_f16_to_f32, without the 16-bit detour where the
 * value is a float32 already: the same decisions in the same order. */
static inline float round_f16(float f)
{
    const uint32_t u = f2u(f);
    const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) { /* NaN: f16 keeps the top 10 payload bits, quiet */
        const uint32_t man = 0x200u | ((a >> 13) & 0x3ffu);
        return u2f(sign | 0x7f800000u | (man << 13) | 0x400000u);
    }
    if (a >= 0x477ff000u) /* >= 65520 rounds to inf */
        return u2f(sign | 0x7f800000u);
    if (a < 0x38800000u) { /* below 2^-14: an f16 subnormal or zero, q * 2^-24 */
        if (a < 0x33000000u)
            return u2f(sign);
        const uint32_t man = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(a >> 23); /* 14..24 */
        uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        const float v = (float)q * 0x1p-24f; /* exact; q == 1024 is 2^-14, the smallest normal */
        return sign ? -v : v;
    }
    /* normal: round the mantissa from 23 to 10 bits; a carry moves the
     * exponent up, to inf past 65504 */
    uint32_t r = a;
    const uint32_t rem = r & 0x1fffu;
    r &= ~0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 0x2000u)))
        r += 0x2000u;
    if (r >= 0x47800000u) /* 2^16: past f16's largest exponent */
        return u2f(sign | 0x7f800000u);
    return u2f(sign | r);
}

/* Enough work per thread to pay for waking the team. */
#define ROUND_PAR_MIN 32768

void db_cpu_round_prec(float *x, size_t n, db_precision p)
{
    if (p == DB_PREC_BF16) {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            x[i] = round_bf16(x[i]);
    } else if (p == DB_PREC_F16) {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            x[i] = round_f16(x[i]);
    }
}

void db_cpu_round_prec_copy(float *dst, const float *src, size_t n, db_precision p)
{
    if (p == DB_PREC_BF16) {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            dst[i] = round_bf16(src[i]);
    } else if (p == DB_PREC_F16) {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            dst[i] = round_f16(src[i]);
    } else if (dst != src)
        memcpy(dst, src, n * sizeof(float));
}

/* dst[i] += round(src[i]): a parameter gradient's contribution. */
static void add_rounded(float *dst, const float *src, size_t n, db_precision p)
{
    if (p == DB_PREC_BF16) {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            dst[i] += round_bf16(src[i]);
    } else {
#pragma omp parallel for schedule(static) if (n >= ROUND_PAR_MIN)
        for (size_t i = 0; i < n; i++)
            dst[i] += round_f16(src[i]);
    }
}

/* The temporaries of one op: freed together whatever happened. */
#define TMP_MAX 8
typedef struct tmps {
    db_ctx *c;
    float *p[TMP_MAX];
    int n;
    int failed;
} tmps;

static void tmps_free(tmps *t)
{
    for (int i = 0; i < t->n; i++)
        db_ctx_free(t->c, t->p[i]);
}

static float *tmp_alloc(tmps *t, size_t n)
{
    float *p = t->failed ? NULL : db_ctx_alloc(t->c, n * sizeof(float));
    if (!p)
        t->failed = 1;
    else
        t->p[t->n++] = p;
    return p;
}

/* A rounded copy of src (n floats); NULL src gives NULL (an optional input). */
static const float *rin(tmps *t, const float *src, size_t n)
{
    if (!src)
        return NULL;
    float *d = tmp_alloc(t, n);
    if (d)
        db_cpu_round_prec_copy(d, src, n, t->c->precision);
    return d;
}

/* A zeroed buffer for a parameter gradient's contribution; NULL when the
 * caller does not want that gradient. */
static float *rgrad(tmps *t, const float *dst, size_t n)
{
    if (!dst)
        return NULL;
    float *d = tmp_alloc(t, n);
    if (d)
        memset(d, 0, n * sizeof(float));
    return d;
}

static void rout(db_ctx *c, float *x, size_t n)
{
    if (x)
        db_cpu_round_prec(x, n, c->precision);
}

static void radd(db_ctx *c, float *dst, const float *contrib, size_t n)
{
    if (dst)
        add_rounded(dst, contrib, n, c->precision);
}

#define Z(x) ((size_t)(x))

int db_cpu_ac_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                           int transa, int transb, float alpha, float beta)
{
    tmps t = {.c = c};
    const float *a = rin(&t, A, Z(batch) * M * K), *b = rin(&t, B, Z(batch) * K * N);
    int rc = -1;
    if (!t.failed) {
        if (beta != 0.0f) /* Cm is an input too; it is overwritten anyway */
            rout(c, Cm, Z(batch) * M * N);
        rc = db_cpu_gemm_forward(c, Cm, a, b, batch, M, N, K, transa, transb, alpha, beta);
        if (rc == 0)
            rout(c, Cm, Z(batch) * M * N);
    }
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N,
                             int C, int OC)
{
    tmps t = {.c = c};
    const float *x = rin(&t, inp, Z(N) * C), *w = rin(&t, weight, Z(OC) * C), *b = rin(&t, bias, Z(OC));
    int rc = -1;
    if (!t.failed && (rc = db_cpu_linear_forward(c, out, x, w, b, N, C, OC)) == 0)
        rout(c, out, Z(N) * OC);
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B,
                             int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    tmps t = {.c = c};
    const float *x = rin(&t, inp, Z(B) * C * H * W), *w = rin(&t, weight, Z(OC) * C * KH * KW),
                *b = rin(&t, bias, Z(OC));
    int rc = -1;
    if (!t.failed && (rc = db_cpu_conv2d_forward(c, out, x, w, b, B, C, H, W, OC, KH, KW, stride, pad0, pad1)) == 0)
        rout(c, out, Z(B) * OC * OH * OW);
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v,
                                int B, int Tq, int Tk, int NH, int HS, int causal)
{
    const size_t nq = Z(B) * Tq * NH * HS, nk = Z(B) * Tk * NH * HS;
    tmps t = {.c = c};
    const float *rq = rin(&t, q, nq), *rk = rin(&t, k, nk), *rv = rin(&t, v, nk);
    int rc = -1;
    if (!t.failed && (rc = db_cpu_attention_forward(c, out, lse, rq, rk, rv, B, Tq, Tk, NH, HS, causal)) == 0)
        rout(c, out, nq); /* lse stays float32: it is softmax state, not an output of the matmuls */
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B,
                            int batch, int M, int N, int K, int transa, int transb, float alpha)
{
    const size_t nA = Z(batch) * M * K, nB = Z(batch) * K * N;
    tmps t = {.c = c};
    /* dA needs B, dB needs A: round only what the kernel will read */
    const float *d = rin(&t, dCm, Z(batch) * M * N), *a = rin(&t, dB ? A : NULL, nA), *b = rin(&t, dA ? B : NULL, nB);
    int rc = -1;
    if (!t.failed && (rc = db_cpu_gemm_backward(c, dA, dB, d, a, b, batch, M, N, K, transa, transb, alpha)) == 0) {
        rout(c, dA, nA);
        rout(c, dB, nB);
    }
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int C, int OC)
{
    tmps t = {.c = c};
    const float *d = rin(&t, dout, Z(N) * OC), *x = rin(&t, dweight ? inp : NULL, Z(N) * C),
                *w = rin(&t, dinp ? weight : NULL, Z(OC) * C);
    float *gw = rgrad(&t, dweight, Z(OC) * C), *gb = rgrad(&t, dbias, Z(OC));
    int rc = -1;
    if (!t.failed && (rc = db_cpu_linear_backward(c, dinp, gw, gb, d, x, w, N, C, OC)) == 0) {
        rout(c, dinp, Z(N) * C);
        radd(c, dweight, gw, Z(OC) * C);
        radd(c, dbias, gb, Z(OC));
    }
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int B, int C, int H, int W, int OC, int KH, int KW,
                              int stride, int pad0, int pad1)
{
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t nx = Z(B) * C * H * W, nw = Z(OC) * C * KH * KW;
    tmps t = {.c = c};
    const float *d = rin(&t, dout, Z(B) * OC * OH * OW), *x = rin(&t, dweight ? inp : NULL, nx),
                *w = rin(&t, dinp ? weight : NULL, nw);
    float *gw = rgrad(&t, dweight, nw), *gb = rgrad(&t, dbias, Z(OC));
    int rc = -1;
    if (!t.failed && (rc = db_cpu_conv2d_backward(c, dinp, gw, gb, d, x, w, B, C, H, W, OC, KH, KW, stride, pad0,
                                                  pad1)) == 0) {
        rout(c, dinp, nx);
        radd(c, dweight, gw, nw);
        radd(c, dbias, gb, Z(OC));
    }
    tmps_free(&t);
    return rc;
}

int db_cpu_ac_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                                 const float *lse, const float *q, const float *k, const float *v, int B, int Tq,
                                 int Tk, int NH, int HS, int causal)
{
    const size_t nq = Z(B) * Tq * NH * HS, nk = Z(B) * Tk * NH * HS;
    tmps t = {.c = c};
    /* out is an input here (the forward's saved output, D = rowsum(dout * out)) */
    const float *d = rin(&t, dout, nq), *o = rin(&t, out, nq), *rq = rin(&t, q, nq), *rk = rin(&t, k, nk),
                *rv = rin(&t, v, nk);
    int rc = -1;
    if (!t.failed &&
        (rc = db_cpu_attention_backward(c, dq, dk, dv, d, o, lse, rq, rk, rv, B, Tq, Tk, NH, HS, causal)) == 0) {
        rout(c, dq, nq);
        rout(c, dk, nk);
        rout(c, dv, nk);
    }
    tmps_free(&t);
    return rc;
}
