/* The CPU's bf16/fp16 emulation of the matmul-class ops (kernels/ops.h above
 * db_precision, kernels/cpu/autocast.c), against a reference built here from
 * the documented rule alone: round every floating input with db_convert
 * (f32 -> bf16/f16 -> f32), run the op in fp32, round every output the same
 * way; a parameter gradient's contribution is computed into zeros, rounded,
 * then added to the buffer.  lse stays fp32.
 *
 * Per op and compute type: bit-identical to the reference; every rounded
 * output is a compute-type value; the outputs differ from fp32 mode (so a
 * dispatcher that ignored the precision would fail); a second call adds a
 * second rounded contribution to the parameter gradients; 1 and 2 threads
 * give the same bits.  Then fp16 overflow (an input or a result past 65504
 * is inf; bf16 stays finite), the inlined rounding against db_convert on
 * special and swept bit patterns, and fp32 mode untouched by the feature. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/ops.h"
#include "libcommon/core/tensor.h"
#include "tap.h"

#define MAXI 6
#define MAXO 4

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

/* xorshift64*: uniform in [-1, 1) */
static float urand(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545f4914f6cdd1dull;
    return (float)((double)(r >> 40) / (double)(1ull << 23) - 1.0);
}

static db_dtype ptype(db_precision p) { return p == DB_PREC_BF16 ? DB_BF16 : DB_F16; }

/* x rounded to p by the library's conversions (the rule's definition). */
static void ref_round(float *x, size_t n, db_precision p)
{
    uint16_t *h = malloc(n * sizeof *h);
    db_err e = {0};
    db_convert(h, ptype(p), x, DB_F32, n, &e);
    db_convert(x, DB_F32, h, ptype(p), n, &e);
    free(h);
}

static int representable(const float *x, size_t n, db_precision p)
{
    float *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    ref_round(y, n, p);
    const int ok = !memcmp(x, y, n * sizeof *y);
    free(y);
    return ok;
}

/* One op call: inputs, assigned outputs, accumulated (+=) outputs. */
typedef struct ac_case ac_case;
typedef int (*run_fn)(db_ctx *c, const ac_case *k, float *const *in, float **out);
struct ac_case {
    const char *name;
    int nin, nout;
    size_t ni[MAXI], no[MAXO];
    int raw[MAXI];  /* 1: an fp32 input by the rule (attention's lse) */
    int acc[MAXO];  /* 1: parameter gradient, +=; 0: assigned */
    int f32[MAXO];  /* 1: an fp32 output by the rule (lse) */
    float *in[MAXI];
    float *init[MAXO]; /* the accumulated outputs' starting values */
    int s[14];
    run_fn run;
};

static float **outs_new(const ac_case *k)
{
    float **o = calloc(MAXO, sizeof *o);
    for (int j = 0; j < k->nout; j++) {
        o[j] = malloc(k->no[j] * sizeof(float));
        for (size_t i = 0; i < k->no[j]; i++)
            o[j][i] = k->acc[j] ? k->init[j][i] : NAN; /* assigned outputs must not read the old values */
    }
    return o;
}

static void outs_free(float **o)
{
    for (int j = 0; j < MAXO; j++)
        free(o[j]);
    free(o);
}

static db_ctx *mkctx(int threads, db_precision p)
{
    db_ctx *c;
    db_err e = {0};
    if (db_ctx_create(&c, DB_CPU, threads, &e)) {
        tap_diag("context: %s", e.msg);
        return NULL;
    }
    db_ctx_set_precision(c, p);
    return c;
}

/* The op in precision p (the emulation), `calls` times into the same buffers. */
static float **run_prec(const ac_case *k, db_precision p, int threads, int calls)
{
    db_ctx *c = mkctx(threads, p);
    if (!c)
        return NULL;
    float **o = outs_new(k);
    for (int r = 0; r < calls; r++)
        if (k->run(c, k, k->in, o)) {
            tap_diag("%s: %s", k->name, c->err.msg);
            outs_free(o);
            o = NULL;
            break;
        }
    db_ctx_destroy(c);
    return o;
}

/* The rule, spelled out: rounded inputs, fp32 op, rounded outputs; each
 * call's parameter-gradient contribution rounded before it is added. */
static float **run_ref(const ac_case *k, db_precision p, int calls)
{
    db_ctx *c = mkctx(1, DB_PREC_F32);
    if (!c)
        return NULL;
    float *rin[MAXI];
    for (int i = 0; i < k->nin; i++) {
        rin[i] = malloc(k->ni[i] * sizeof(float));
        memcpy(rin[i], k->in[i], k->ni[i] * sizeof(float));
        if (!k->raw[i])
            ref_round(rin[i], k->ni[i], p);
    }
    float **o = outs_new(k), **t = outs_new(k);
    for (int r = 0; r < calls; r++) {
        for (int j = 0; j < k->nout; j++)
            if (k->acc[j])
                memset(t[j], 0, k->no[j] * sizeof(float));
        if (k->run(c, k, rin, t))
            tap_diag("%s: reference: %s", k->name, c->err.msg);
        for (int j = 0; j < k->nout; j++) {
            if (!k->f32[j])
                ref_round(t[j], k->no[j], p);
            if (k->acc[j])
                for (size_t i = 0; i < k->no[j]; i++)
                    o[j][i] += t[j][i];
            else
                memcpy(o[j], t[j], k->no[j] * sizeof(float));
        }
    }
    outs_free(t);
    for (int i = 0; i < k->nin; i++)
        free(rin[i]);
    db_ctx_destroy(c);
    return o;
}

static void check_case(ac_case *k)
{
    for (int i = 0; i < k->nout; i++)
        if (k->acc[i]) {
            k->init[i] = malloc(k->no[i] * sizeof(float));
            for (size_t j = 0; j < k->no[i]; j++)
                k->init[i][j] = urand();
        }
    float **f32 = run_prec(k, DB_PREC_F32, 2, 1);
    const db_precision ps[2] = {DB_PREC_BF16, DB_PREC_F16};
    for (int q = 0; q < 2; q++) {
        const db_precision p = ps[q];
        const char *pn = db_precision_name(p);
        float **got = run_prec(k, p, 2, 1), **ref = run_ref(k, p, 1);
        float **got1 = run_prec(k, p, 1, 1);
        if (!tap_ok(got && ref && got1 && f32, "%s %s: runs", k->name, pn))
            continue;
        int same = 1, repr = 1, differs = 1, det = 1;
        for (int j = 0; j < k->nout; j++) {
            const size_t b = k->no[j] * sizeof(float);
            if (memcmp(got[j], ref[j], b)) {
                same = 0;
                tap_cmp cm = tap_compare(got[j], ref[j], k->no[j]);
                tap_diag("%s %s output %d: rel %.3g, worst at %zu: %.9g vs %.9g", k->name, pn, j, cm.rel, cm.at,
                         got[j][cm.at], ref[j][cm.at]);
            }
            /* (an accumulated gradient is init + a rounded contribution: the
             * reference comparison covers it) */
            if (!k->f32[j] && !k->acc[j])
                repr &= representable(got[j], k->no[j], p);
            if (!memcmp(got[j], f32[j], b))
                differs = 0;
            det &= !memcmp(got[j], got1[j], b);
        }
        tap_ok(same, "%s %s: bit-identical to round(inputs) -> fp32 op -> round(outputs)", k->name, pn);
        tap_ok(repr, "%s %s: every output is a %s value", k->name, pn, pn);
        tap_ok(differs, "%s %s: every output differs from fp32 mode", k->name, pn);
        tap_ok(det, "%s %s: 1 and 2 threads give the same bits", k->name, pn);
        int has_acc = 0;
        for (int j = 0; j < k->nout; j++)
            has_acc |= k->acc[j];
        if (has_acc) {
            float **got2 = run_prec(k, p, 2, 2), **ref2 = run_ref(k, p, 2);
            int ok = got2 && ref2;
            for (int j = 0; ok && j < k->nout; j++)
                ok &= !memcmp(got2[j], ref2[j], k->no[j] * sizeof(float));
            tap_ok(ok, "%s %s: two calls add two rounded contributions to the parameter gradients", k->name, pn);
            if (got2)
                outs_free(got2);
            if (ref2)
                outs_free(ref2);
        }
        outs_free(got), outs_free(ref), outs_free(got1);
    }
    if (f32)
        outs_free(f32);
}

static float *rvec(size_t n)
{
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = urand();
    return x;
}

static void case_free(ac_case *k)
{
    for (int i = 0; i < k->nin; i++)
        free(k->in[i]);
    for (int j = 0; j < k->nout; j++)
        free(k->init[j]);
}

/* ---- the ops ---------------------------------------------------------------- */

static int run_gemm_fwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_gemm_forward(c, out[0], in[0], in[1], s[0], s[1], s[2], s[3], s[4], s[5], 0.5f, 0.0f);
}
static int run_gemm_bwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_gemm_backward(c, out[0], out[1], in[0], in[1], in[2], s[0], s[1], s[2], s[3], s[4], s[5], 0.5f);
}
static int run_linear_fwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    return db_linear_forward(c, out[0], in[0], in[1], in[2], k->s[0], k->s[1], k->s[2]);
}
static int run_linear_bwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    return db_linear_backward(c, out[0], out[1], out[2], in[0], in[1], in[2], k->s[0], k->s[1], k->s[2], 0);
}
static int run_conv_fwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_conv2d_forward(c, out[0], in[0], in[1], in[2], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                             s[9]);
}
static int run_conv_bwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_conv2d_backward(c, out[0], out[1], out[2], in[0], in[1], in[2], s[0], s[1], s[2], s[3], s[4], s[5],
                              s[6], s[7], s[8], s[9], 0);
}
static int run_attn_fwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_attention_forward(c, out[0], out[1], in[0], in[1], in[2], s[0], s[1], s[2], s[3], s[4], s[5]);
}
static int run_attn_bwd(db_ctx *c, const ac_case *k, float *const *in, float **out)
{
    const int *s = k->s;
    return db_attention_backward(c, out[0], out[1], out[2], in[0], in[1], in[2], in[3], in[4], in[5], s[0], s[1],
                                 s[2], s[3], s[4], s[5]);
}

static void test_ops(void)
{
    { /* batch 2, M 5, N 7, K 9, A transposed */
        const int bt = 2, M = 5, N = 7, K = 9;
        ac_case f = {.name = "gemm", .nin = 2, .nout = 1, .ni = {bt * M * K, bt * K * N}, .no = {bt * M * N},
                     .s = {bt, M, N, K, 1, 0}, .run = run_gemm_fwd};
        f.in[0] = rvec(f.ni[0]), f.in[1] = rvec(f.ni[1]);
        check_case(&f);
        case_free(&f);
        ac_case b = {.name = "gemm backward", .nin = 3, .nout = 2, .ni = {bt * M * N, bt * M * K, bt * K * N},
                     .no = {bt * M * K, bt * K * N}, .s = {bt, M, N, K, 0, 1}, .run = run_gemm_bwd};
        for (int i = 0; i < 3; i++)
            b.in[i] = rvec(b.ni[i]);
        check_case(&b);
        case_free(&b);
    }
    {
        const int N = 6, C = 10, OC = 4;
        ac_case f = {.name = "linear", .nin = 3, .nout = 1, .ni = {N * C, OC * C, OC}, .no = {N * OC},
                     .s = {N, C, OC}, .run = run_linear_fwd};
        for (int i = 0; i < 3; i++)
            f.in[i] = rvec(f.ni[i]);
        check_case(&f);
        case_free(&f);
        ac_case b = {.name = "linear backward", .nin = 3, .nout = 3, .ni = {N * OC, N * C, OC * C},
                     .no = {N * C, OC * C, OC}, .acc = {0, 1, 1}, .s = {N, C, OC}, .run = run_linear_bwd};
        for (int i = 0; i < 3; i++)
            b.in[i] = rvec(b.ni[i]);
        check_case(&b);
        case_free(&b);
    }
    /* a padded 3x3 and the VAE's strided (0, 1)-padded downsampler */
    const int convs[2][10] = {{2, 3, 6, 5, 4, 3, 3, 1, 1, 1}, {1, 3, 8, 8, 2, 3, 3, 2, 0, 1}};
    for (int v = 0; v < 2; v++) {
        const int *s = convs[v];
        const int B = s[0], C = s[1], H = s[2], W = s[3], OC = s[4], KH = s[5], KW = s[6], st = s[7];
        const int OH = (H + s[8] + s[9] - KH) / st + 1, OW = (W + s[8] + s[9] - KW) / st + 1;
        ac_case f = {.name = v ? "conv2d stride 2" : "conv2d", .nin = 3, .nout = 1,
                     .ni = {B * C * H * W, OC * C * KH * KW, OC}, .no = {B * OC * OH * OW}, .run = run_conv_fwd};
        memcpy(f.s, s, sizeof convs[v]);
        for (int i = 0; i < 3; i++)
            f.in[i] = rvec(f.ni[i]);
        check_case(&f);
        case_free(&f);
        ac_case b = {.name = v ? "conv2d stride 2 backward" : "conv2d backward", .nin = 3, .nout = 3,
                     .ni = {B * OC * OH * OW, B * C * H * W, OC * C * KH * KW},
                     .no = {B * C * H * W, OC * C * KH * KW, OC}, .acc = {0, 1, 1}, .run = run_conv_bwd};
        memcpy(b.s, s, sizeof convs[v]);
        for (int i = 0; i < 3; i++)
            b.in[i] = rvec(b.ni[i]);
        check_case(&b);
        case_free(&b);
    }
    for (int causal = 0; causal < 2; causal++) {
        const int B = 2, Tq = 5, Tk = causal ? 5 : 7, NH = 2, HS = 8;
        const size_t nq = (size_t)B * Tq * NH * HS, nk = (size_t)B * Tk * NH * HS;
        ac_case f = {.name = causal ? "attention causal" : "attention", .nin = 3, .nout = 2, .ni = {nq, nk, nk},
                     .no = {nq, (size_t)B * NH * Tq}, .f32 = {0, 1}, .s = {B, Tq, Tk, NH, HS, causal},
                     .run = run_attn_fwd};
        for (int i = 0; i < 3; i++)
            f.in[i] = rvec(f.ni[i]);
        check_case(&f);
        /* the backward's saved out and lse: the fp32 forward's */
        float *o = malloc(nq * sizeof *o), *lse = malloc((size_t)B * NH * Tq * sizeof *lse);
        db_ctx *c = mkctx(1, DB_PREC_F32);
        db_attention_forward(c, o, lse, f.in[0], f.in[1], f.in[2], B, Tq, Tk, NH, HS, causal);
        db_ctx_destroy(c);
        ac_case b = {.name = causal ? "attention causal backward" : "attention backward", .nin = 6, .nout = 3,
                     .ni = {nq, nq, (size_t)B * NH * Tq, nq, nk, nk}, .raw = {0, 0, 1, 0, 0, 0}, .no = {nq, nk, nk},
                     .s = {B, Tq, Tk, NH, HS, causal}, .run = run_attn_bwd};
        b.in[0] = rvec(nq), b.in[1] = o, b.in[2] = lse;
        for (int i = 0; i < 3; i++) {
            b.in[3 + i] = malloc(f.ni[i] * sizeof(float));
            memcpy(b.in[3 + i], f.in[i], f.ni[i] * sizeof(float));
        }
        check_case(&b);
        case_free(&b);
        case_free(&f);
    }
}

/* fp16's range: 65504 is its largest value, so a product past it, or an
 * input past it, is inf; bf16 has fp32's range. */
static void test_overflow(void)
{
    float inp[2] = {200.0f, 200.0f}, w[2] = {200.0f, 200.0f}, out;
    db_ctx *c = mkctx(1, DB_PREC_F16);
    db_linear_forward(c, &out, inp, w, NULL, 1, 2, 1);
    tap_ok(isinf(out) && out > 0, "fp16: a linear result of 80000 is +inf (got %g)", out);
    float big[2] = {1e5f, -1e5f}, small[2] = {1e-3f, 1e-3f};
    db_linear_forward(c, &out, big, small, NULL, 1, 2, 1);
    tap_ok(isnan(out), "fp16: inputs past 65504 become inf before the product (inf - inf = %g)", out);
    db_linear_forward(c, &out, big, small, NULL, 1, 1, 1);
    tap_ok(isinf(out) && out > 0, "fp16: an input of 1e5 is inf (got %g)", out);
    /* a gradient contribution past the range: dweight = dout^T inp */
    float dout = 300.0f, x = 300.0f, dw = 1.0f, db = 0.0f;
    db_linear_backward(c, NULL, &dw, &db, &dout, &x, &x, 1, 1, 1, 0);
    tap_ok(isinf(dw) && db == 300.0f, "fp16: a dweight contribution of 90000 is inf when added (got %g, dbias %g)",
           dw, db);
    db_ctx_set_precision(c, DB_PREC_BF16);
    db_linear_forward(c, &out, inp, w, NULL, 1, 2, 1);
    tap_ok(out == 79872.0f, "bf16: 80000 stays finite, rounded to the bf16 value 79872 (got %.9g)", out);
    /* gemm's beta: the old Cm is an input too, rounded like A and B
     * (1 + 2^-12 is neither a bf16 nor an fp16 value; it rounds to 1) */
    float a0 = 0.0f, b0 = 0.0f, cm = 1.0f + 0x1p-12f;
    db_gemm_forward(c, &cm, &a0, &b0, 1, 1, 1, 1, 0, 0, 1.0f, 1.0f);
    tap_ok(cm == 1.0f, "bf16: gemm with beta 1 rounds the old Cm as an input (got %.9g)", cm);
    tap_ok(c->err.code == 0, "no op failed (%s)", c->err.msg);
    db_ctx_destroy(c);
}

/* The inlined rounding of autocast.c against db_convert: the values where
 * the rules have edges (ties, subnormals, the overflow threshold, NaN) and
 * a sweep of bit patterns. */
static void test_rounding(void)
{
    const uint32_t edge[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u,
                             0xffa12345u, 0x477fe000u, 0x477fefffu, 0x477ff000u, 0x477ff001u, 0x47800000u,
                             0x7f7fffffu, 0x38800000u, 0x387fffffu, 0x33000000u, 0x33000001u, 0x32ffffffu,
                             0x33800000u, 0x3f801000u, 0x3f803000u, 0x3f808000u, 0x3f818000u, 0x3f800001u,
                             0x00000001u, 0x807fffffu, 0x3c00f000u, 0x3c018000u};
    const size_t ne = sizeof edge / sizeof edge[0], nsweep = 1u << 22;
    const size_t n = ne + nsweep;
    uint32_t *u = malloc(n * sizeof *u);
    memcpy(u, edge, sizeof edge);
    for (size_t i = 0; i < nsweep; i++) /* a stride through all 2^32 patterns, odd so every bit varies */
        u[ne + i] = (uint32_t)(i * 1023u + (uint32_t)(i * 2654435761u));
    float *x = malloc(n * sizeof *x), *r = malloc(n * sizeof *r), *y = malloc(n * sizeof *y);
    memcpy(x, u, n * sizeof *x);
    for (int q = 0; q < 2; q++) {
        const db_precision p = q ? DB_PREC_F16 : DB_PREC_BF16;
        memcpy(r, x, n * sizeof *x);
        ref_round(r, n, p);
        db_cpu_round_prec_copy(y, x, n, p);
        size_t bad = n;
        for (size_t i = 0; i < n && bad == n; i++)
            if (memcmp(&y[i], &r[i], 4))
                bad = i;
        uint32_t ub = bad < n ? u[bad] : 0, gb = 0, rb = 0;
        if (bad < n)
            memcpy(&gb, &y[bad], 4), memcpy(&rb, &r[bad], 4);
        tap_ok(bad == n, "%s rounding: inlined loop == db_convert on %zu bit patterns (first miss %08x: %08x vs %08x)",
               db_precision_name(p), n, ub, gb, rb);
        db_cpu_round_prec(x, n, p); /* in place gives the same */
        tap_ok(!memcmp(x, r, n * sizeof *x), "%s rounding in place == the copy", db_precision_name(p));
        memcpy(x, u, n * sizeof *x);
    }
    free(u), free(x), free(r), free(y);
}

/* fp32 mode is the plain kernel: the ctx's default, and no rounding. */
static void test_f32(void)
{
    db_ctx *c = mkctx(1, DB_PREC_F32);
    tap_ok(c && c->precision == DB_PREC_F32, "a new ctx computes in fp32");
    float inp[3] = {1.0f + 0x1p-20f, 1.0f / 3, 2.0f}, w[3] = {1.0f, 1.0f, 0.0f}, out;
    db_linear_forward(c, &out, inp, w, NULL, 1, 3, 1);
    tap_ok(out == inp[0] + inp[1], "fp32: no rounding (got %.9g)", out);
    db_ctx_destroy(c);
}

int main(void)
{
    test_rounding();
    test_f32();
    test_overflow();
    test_ops();
    return tap_done();
}
