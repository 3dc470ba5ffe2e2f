/* Fused ops against the op sequences they replace, bit for bit:
 * db_linear_add_forward == db_linear_forward then db_add_forward, and
 * db_linear_geglu_forward == db_linear_forward then db_geglu_forward, and
 * db_transpose_add_forward == db_transpose_forward then db_add_forward, in fp32,
 * bf16 and fp16 (the CPU's autocast emulation), with and without a bias,
 * on 1 and 2 threads, with signed zeros and NaN among the residuals; and
 * a NULL residual is the plain linear.  A broken fusion (the residual added
 * before the bias or the rounding) fails: the check is made against such a
 * variant too.  db_linear_multi_forward / _backward == their definitions
 * (n linears; n linear backwards with the input gradients added in order,
 * or added to the old dinp), with their argument checks.  And
 * db_conv2d_add_forward == db_conv2d_forward then db_add_forward (or
 * db_add_channel_forward), the addend apart, out itself, or per channel;
 * db_linear_fan_forward == one db_linear_forward per width;
 * db_layernorm_backward_add == db_layernorm_backward then db_add_forward,
 * and db_groupnorm_backward_add likewise (the addend apart or dinp itself,
 * the parameter gradients the same). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/sd/noise.h"
#include "tap.h"

static float *rnd(size_t n, uint64_t stream, float scale)
{
    float *x = malloc(n * sizeof *x);
    db_noise_fill(x, n, 11, stream, 0);
    for (size_t i = 0; i < n; i++)
        x[i] *= scale;
    return x;
}

static int same_bits(const float *a, const float *b, size_t n) { return !memcmp(a, b, n * sizeof *a); }

/* db_attention_qkv_forward is its definition on the CPU: the projections,
 * then the attention, bit for bit, q, k, v kept or not; half of them NULL
 * is refused */
static void t_attention_qkv(db_ctx *c)
{
    enum { B = 2, T = 9, C = 24, NH = 3 };
    const size_t n = (size_t)B * T * C, nl = (size_t)B * NH * T;
    float *x = rnd(n, 11, 1.0f), *wq = rnd((size_t)C * C, 12, 0.2f), *wk = rnd((size_t)C * C, 13, 0.2f),
          *wv = rnd((size_t)C * C, 14, 0.2f);
    float *qkv = malloc(6 * n * sizeof *qkv), *o = malloc(3 * n * sizeof *o), *l = malloc(3 * nl * sizeof *l);
    const db_precision ps[] = {DB_PREC_F32, DB_PREC_BF16};
    for (int p = 0; p < 2; p++)
        for (int causal = 0; causal < 2; causal++) {
            db_ctx_set_precision(c, ps[p]);
            float *const q2[3] = {qkv + 3 * n, qkv + 4 * n, qkv + 5 * n};
            const float *const w[3] = {wq, wk, wv};
            int rc = db_attention_qkv_forward(c, qkv, qkv + n, qkv + 2 * n, o, l, x, wq, wk, wv, B, T, C, NH, causal) ||
                     db_attention_qkv_forward(c, NULL, NULL, NULL, o + n, l + nl, x, wq, wk, wv, B, T, C, NH,
                                              causal) ||
                     db_linear_multi_forward(c, q2, x, w, NULL, 3, B * T, C, C) ||
                     db_attention_forward(c, o + 2 * n, l + 2 * nl, q2[0], q2[1], q2[2], B, T, T, NH, C / NH, causal);
            tap_ok(rc == 0 && same_bits(qkv, qkv + 3 * n, 3 * n) && same_bits(o, o + 2 * n, n) &&
                       same_bits(o + n, o + 2 * n, n) && same_bits(l, l + 2 * nl, nl) && same_bits(l + nl, l + 2 * nl, nl),
                   "%s%s: attention_qkv_forward == linear_multi_forward then attention_forward, q, k, v kept or not",
                   db_precision_name(ps[p]), causal ? " causal" : "");
        }
    db_ctx_set_precision(c, DB_PREC_F32);
    tap_ok(db_attention_qkv_forward(c, qkv, NULL, NULL, o, l, x, wq, wk, wv, B, T, C, NH, 0) != 0 &&
               c->err.code == DB_EUSAGE,
           "attention_qkv_forward: q given without k and v is refused (%s)", c->err.msg);
    db_ctx_clear_error(c);
    free(x), free(wq), free(wk), free(wv), free(qkv), free(o), free(l);
}

int main(void)
{
    db_err err = {0};
    db_ctx *c1 = NULL, *c2 = NULL;
    if (!tap_ok(db_ctx_create(&c1, DB_CPU, 1, &err) == 0 && db_ctx_create(&c2, DB_CPU, 2, &err) == 0,
                "cpu contexts%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
    enum { N = 67, C = 40, OC = 33 };
    float *x = rnd((size_t)N * C, 1, 1.0f), *w = rnd((size_t)OC * C, 2, 0.2f), *b = rnd(OC, 3, 0.5f);
    float *r = rnd((size_t)N * OC, 4, 1.0f);
    r[0] = -0.0f, r[1] = 0.0f, r[2] = NAN; /* the adds' edge cases pass through the same way */
    float *want = malloc((size_t)N * OC * sizeof *want), *got = malloc((size_t)N * OC * sizeof *got);
    float *wrong = malloc((size_t)N * OC * sizeof *wrong);
    t_attention_qkv(c1);
    const db_precision ps[] = {DB_PREC_F32, DB_PREC_BF16, DB_PREC_F16};
    db_ctx *cs[] = {c1, c2};
    for (int p = 0; p < 3; p++)
        for (int t = 0; t < 2; t++)
            for (int hb = 0; hb < 2; hb++) {
                db_ctx *c = cs[t];
                db_ctx_set_precision(c, ps[p]);
                const float *bias = hb ? b : NULL;
                int rc = db_linear_forward(c, want, x, w, bias, N, C, OC) ||
                         db_add_forward(c, want, want, r, (size_t)N * OC) ||
                         db_linear_add_forward(c, got, x, w, bias, r, N, C, OC);
                tap_ok(rc == 0 && same_bits(want, got, (size_t)N * OC),
                       "%s, %d thread(s), %s bias: linear + residual == linear then add, bit for bit%s%s",
                       db_precision_name(ps[p]), t + 1, hb ? "with" : "no", rc ? ": " : "", rc ? c->err.msg : "");
                rc = db_linear_add_forward(c, got, x, w, bias, NULL, N, C, OC) ||
                     db_linear_forward(c, want, x, w, bias, N, C, OC);
                tap_ok(rc == 0 && same_bits(want, got, (size_t)N * OC), "%s, %d thread(s), %s bias: no residual == "
                       "the plain linear", db_precision_name(ps[p]), t + 1, hb ? "with" : "no");
                if (hb && t == 0) {
                    /* the check can fail: the residual before the bias is another sum */
                    rc = db_linear_forward(c, wrong, x, w, NULL, N, C, OC) ||
                         db_add_forward(c, wrong, wrong, r, (size_t)N * OC);
                    for (int i = 0; rc == 0 && i < N; i++)
                        for (int j = 0; j < OC; j++)
                            wrong[(size_t)i * OC + j] += b[j];
                    db_linear_add_forward(c, got, x, w, bias, r, N, C, OC);
                    tap_ok(rc == 0 && !same_bits(wrong, got, (size_t)N * OC),
                           "%s: adding the residual before the bias differs (the comparison can fail)",
                           db_precision_name(ps[p]));
                }
                db_ctx_set_precision(c, DB_PREC_F32);
            }
    /* linear + GEGLU: proj (N, 2FF) and out (N, FF) == linear then geglu */
    enum { FF = 24 };
    float *w2 = rnd((size_t)2 * FF * C, 5, 0.2f), *b2 = rnd(2 * FF, 6, 0.5f);
    float *pw = malloc((size_t)N * 2 * FF * sizeof *pw), *pg = malloc((size_t)N * 2 * FF * sizeof *pg);
    float *ow = malloc((size_t)N * FF * sizeof *ow), *og = malloc((size_t)N * FF * sizeof *og);
    for (int p = 0; p < 3; p++)
        for (int t = 0; t < 2; t++)
            for (int hb = 0; hb < 2; hb++) {
                db_ctx *c = cs[t];
                db_ctx_set_precision(c, ps[p]);
                const int rc = db_linear_forward(c, pw, x, w2, hb ? b2 : NULL, N, C, 2 * FF) ||
                               db_geglu_forward(c, ow, pw, N, FF) ||
                               db_linear_geglu_forward(c, pg, og, x, w2, hb ? b2 : NULL, N, C, FF);
                tap_ok(rc == 0 && same_bits(pw, pg, (size_t)N * 2 * FF) && same_bits(ow, og, (size_t)N * FF),
                       "%s, %d thread(s), %s bias: linear + GEGLU == linear then geglu (projection and output), bit "
                       "for bit%s%s", db_precision_name(ps[p]), t + 1, hb ? "with" : "no", rc ? ": " : "",
                       rc ? c->err.msg : "");
                /* proj NULL (inference): the same output, nothing kept */
                for (size_t i = 0; i < (size_t)N * FF; i++)
                    og[i] = NAN;
                const int rn = db_linear_geglu_forward(c, NULL, og, x, w2, hb ? b2 : NULL, N, C, FF);
                tap_ok(rn == 0 && same_bits(ow, og, (size_t)N * FF),
                       "%s, %d thread(s), %s bias: linear + GEGLU without keeping the projection: the same output%s%s",
                       db_precision_name(ps[p]), t + 1, hb ? "with" : "no", rn ? ": " : "", rn ? c->err.msg : "");
                db_ctx_set_precision(c, DB_PREC_F32);
            }
    free(w2), free(b2), free(pw), free(pg), free(ow), free(og);

    /* transpose + residual: (B, M, N) -> (B, N, M), plus res */
    {
        enum { TBt = 2, TM = 45, TN = 70 };
        const size_t n = (size_t)TBt * TM * TN;
        float *tin = rnd(n, 7, 1.0f), *tres = rnd(n, 8, 1.0f);
        float *t2 = malloc(n * sizeof *t2), *t1 = malloc(n * sizeof *t1);
        tres[3] = -0.0f;
        for (int t = 0; t < 2; t++) {
            const int rc = db_transpose_forward(cs[t], t2, tin, TBt, TM, TN) ||
                           db_add_forward(cs[t], t2, t2, tres, n) ||
                           db_transpose_add_forward(cs[t], t1, tin, tres, TBt, TM, TN);
            tap_ok(rc == 0 && same_bits(t1, t2, n), "%d thread(s): transpose + residual == transpose then add, bit "
                   "for bit (2 x 45 x 70, partial tiles)", t + 1);
        }
        free(tin), free(tres), free(t2), free(t1);
    }

    /* several linears of one input, forward and backward (the projections of
     * an attention: n = 3, with and without biases; n = 2 into an
     * accumulated input gradient, cross-attention's context) */
    {
        enum { MC = 24, MOC = 40 };
        const size_t nx = (size_t)N * MC, ny = (size_t)N * MOC, nw = (size_t)MOC * MC;
        float *mx = rnd(nx, 20, 1.0f), *mw[3], *mb[3], *dy[3], *o1[3], *o2[3], *gw1[3], *gw2[3], *gb1[3], *gb2[3];
        for (int i = 0; i < 3; i++) {
            mw[i] = rnd(nw, 21 + i, 0.2f), mb[i] = rnd(MOC, 24 + i, 0.5f), dy[i] = rnd(ny, 27 + i, 1.0f);
            o1[i] = malloc(ny * sizeof(float)), o2[i] = malloc(ny * sizeof(float));
            gw1[i] = rnd(nw, 30 + i, 0.1f), gw2[i] = malloc(nw * sizeof(float));
            gb1[i] = rnd(MOC, 33 + i, 0.1f), gb2[i] = malloc(MOC * sizeof(float));
            memcpy(gw2[i], gw1[i], nw * sizeof(float)), memcpy(gb2[i], gb1[i], MOC * sizeof(float));
        }
        float *dx1 = rnd(nx, 36, 1.0f), *dx2 = malloc(nx * sizeof *dx2), *dt = malloc(nx * sizeof *dt);
        memcpy(dx2, dx1, nx * sizeof *dx2);
        for (int p = 0; p < 3; p++)
            for (int hb = 0; hb < 2; hb++) {
                db_ctx *c = cs[hb]; /* 1 thread without biases, 2 with */
                db_ctx_set_precision(c, ps[p]);
                const float *const *bias = hb ? (const float *const *)mb : NULL;
                int rc = db_linear_multi_forward(c, o1, mx, (const float *const *)mw, bias, 3, N, MC, MOC);
                for (int i = 0; i < 3 && rc == 0; i++)
                    rc = db_linear_forward(c, o2[i], mx, mw[i], hb ? mb[i] : NULL, N, MC, MOC);
                int same = rc == 0;
                for (int i = 0; i < 3; i++)
                    same = same && same_bits(o1[i], o2[i], ny);
                tap_ok(same, "%s, %s bias: 3 linears of one input == 3 db_linear_forward, bit for bit%s%s",
                       db_precision_name(ps[p]), hb ? "with" : "no", rc ? ": " : "", rc ? c->err.msg : "");
                /* backward, n = 3, dinp assigned: d0 + d1 + d2 in that order */
                rc = db_linear_multi_backward(c, dx1, gw1, hb ? gb1 : NULL, (const float *const *)dy, mx,
                                              (const float *const *)mw, 3, N, MC, MOC, 0, 0);
                for (int i = 0; i < 3 && rc == 0; i++)
                    rc = db_linear_backward(c, i ? dt : dx2, gw2[i], hb ? gb2[i] : NULL, dy[i], mx, mw[i], N, MC,
                                            MOC, 0) ||
                         (i && db_add_forward(c, dx2, dx2, dt, nx));
                same = rc == 0 && same_bits(dx1, dx2, nx);
                for (int i = 0; i < 3; i++)
                    same = same && same_bits(gw1[i], gw2[i], nw) && same_bits(gb1[i], gb2[i], MOC);
                tap_ok(same, "%s, %s bias: their backward == 3 db_linear_backward and 2 adds (dinp, dweight +=, "
                       "dbias +=), bit for bit%s%s", db_precision_name(ps[p]), hb ? "with" : "no", rc ? ": " : "",
                       rc ? c->err.msg : "");
                /* n = 2 added to dinp, no dweight of the second */
                float *gw_one[2] = {gw1[0], NULL};
                rc = db_linear_multi_backward(c, dx1, gw_one, NULL, (const float *const *)dy, mx,
                                              (const float *const *)mw, 2, N, MC, MOC, 1, 0);
                for (int i = 0; i < 2 && rc == 0; i++)
                    rc = db_linear_backward(c, dt, i ? NULL : gw2[0], NULL, dy[i], mx, mw[i], N, MC, MOC, 0) ||
                         db_add_forward(c, dx2, dx2, dt, nx);
                tap_ok(rc == 0 && same_bits(dx1, dx2, nx) && same_bits(gw1[0], gw2[0], nw),
                       "%s: 2 linears' backward added to dinp (accumulate) == 2 backwards and 2 adds, bit for bit%s%s",
                       db_precision_name(ps[p]), rc ? ": " : "", rc ? c->err.msg : "");
                if (p == 0 && hb == 0) { /* the comparison can fail: d0 + (d1 + d2) is another sum */
                    float *e = malloc(nx * sizeof *e);
                    rc = db_linear_backward(c, dx2, NULL, NULL, dy[1], mx, mw[1], N, MC, MOC, 0) ||
                         db_linear_backward(c, dt, NULL, NULL, dy[2], mx, mw[2], N, MC, MOC, 0) ||
                         db_add_forward(c, dx2, dx2, dt, nx) ||
                         db_linear_backward(c, e, NULL, NULL, dy[0], mx, mw[0], N, MC, MOC, 0) ||
                         db_add_forward(c, dx2, e, dx2, nx) ||
                         db_linear_multi_backward(c, dx1, NULL, NULL, (const float *const *)dy, mx,
                                                  (const float *const *)mw, 3, N, MC, MOC, 0, 0);
                    tap_ok(rc == 0 && !same_bits(dx1, dx2, nx), "fp32: the input gradient summed in another order "
                           "differs (the comparison can fail)");
                    free(e);
                }
                db_ctx_set_precision(c, DB_PREC_F32);
            }
        /* the argument checks */
        float *ov[3] = {o1[0], o1[1], mx}, *dup[2] = {o1[0], o1[0]};
        const float *const *cw = (const float *const *)mw;
        for (int i = 0; i < 5; i++) { /* one at a time: the error is sticky */
            static const char *what[] = {"n = 0", "n over the most", "an output on the input",
                                         "two outputs in one place", "dinp without weights"};
            const int rc = i == 0   ? db_linear_multi_forward(c1, o1, mx, cw, NULL, 0, N, MC, MOC)
                           : i == 1 ? db_linear_multi_forward(c1, o1, mx, cw, NULL, DB_LINEAR_MULTI_MAX + 1, N, MC,
                                                              MOC)
                           : i == 2 ? db_linear_multi_forward(c1, ov, mx, cw, NULL, 3, N, MC, MOC)
                           : i == 3 ? db_linear_multi_forward(c1, dup, mx, cw, NULL, 2, N, MC, MOC)
                                    : db_linear_multi_backward(c1, dx1, NULL, NULL, (const float *const *)dy, mx,
                                                               NULL, 2, N, MC, MOC, 0, 0);
            tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "linear multi: %s is refused: %s", what[i], c1->err.msg);
            db_ctx_clear_error(c1);
        }
        for (int i = 0; i < 3; i++)
            free(mw[i]), free(mb[i]), free(dy[i]), free(o1[i]), free(o2[i]), free(gw1[i]), free(gw2[i]),
                free(gb1[i]), free(gb2[i]);
        free(mx), free(dx1), free(dx2), free(dt);
    }

    /* convolution + addend: a buffer of its own, out itself (out += conv),
     * per channel (B, OC); 3x3 padded and 1x1 (the conv1x1 GEMM path) */
    {
        enum { CB = 2, CC = 5, CH = 9, CW = 7, COC = 6 };
        const size_t ny = (size_t)CB * COC * CH * CW;
        float *cx = rnd((size_t)CB * CC * CH * CW, 40, 1.0f), *cw3 = rnd((size_t)COC * CC * 9, 41, 0.2f);
        float *cw1 = rnd((size_t)COC * CC, 42, 0.2f), *cb = rnd(COC, 43, 0.5f), *ca = rnd(ny, 44, 1.0f);
        float *cv = rnd((size_t)CB * COC, 45, 1.0f), *cwant = malloc(ny * sizeof *cwant);
        float *cgot = malloc(ny * sizeof *cgot);
        ca[0] = -0.0f, ca[1] = NAN;
        for (int p = 0; p < 3; p++)
            for (int t = 0; t < 2; t++)
                for (int k = 0; k < 2; k++)
                    for (int mode = 0; mode < 3; mode++) {
                        static const char *const mname[3] = {"an addend", "out += conv", "per channel"};
                        db_ctx *c = cs[t];
                        const int K = k ? 3 : 1, pd = k;
                        const float *wt = k ? cw3 : cw1, *bias = mode == 1 ? NULL : cb;
                        db_ctx_set_precision(c, ps[p]);
                        int rc = db_conv2d_forward(c, cwant, cx, wt, bias, CB, CC, CH, CW, COC, K, K, 1, pd, pd) ||
                                 (mode == 2 ? db_add_channel_forward(c, cwant, cwant, cv, CB, COC, CH * CW)
                                            : db_add_forward(c, cwant, cwant, ca, ny));
                        if (mode == 1)
                            memcpy(cgot, ca, ny * sizeof *cgot);
                        rc = rc || db_conv2d_add_forward(c, cgot, cx, wt, bias, mode == 0 ? ca : mode == 1 ? cgot : cv,
                                                         mode == 2, CB, CC, CH, CW, COC, K, K, 1, pd, pd);
                        tap_ok(rc == 0 && same_bits(cwant, cgot, ny),
                               "%s, %d thread(s), %dx%d, %s: conv + addend == conv then add, bit for bit%s%s",
                               db_precision_name(ps[p]), t + 1, K, K, mname[mode], rc ? ": " : "",
                               rc ? c->err.msg : "");
                        db_ctx_set_precision(c, DB_PREC_F32);
                    }
        /* the check can fail: the per-channel addend folded into the bias
         * (one sum before the rounding) is another value in bf16 */
        db_ctx_set_precision(c1, DB_PREC_BF16);
        float *fold = malloc(COC * sizeof *fold);
        for (int j = 0; j < COC; j++)
            fold[j] = cb[j] + cv[j];
        int rc = db_conv2d_forward(c1, cwant, cx, cw3, fold, 1, CC, CH, CW, COC, 3, 3, 1, 1, 1) ||
                 db_conv2d_add_forward(c1, cgot, cx, cw3, cb, cv, 1, 1, CC, CH, CW, COC, 3, 3, 1, 1, 1);
        tap_ok(rc == 0 && !same_bits(cwant, cgot, ny / CB), "bf16: the addend folded into the bias differs (the "
               "comparison can fail)");
        db_ctx_set_precision(c1, DB_PREC_F32);
        rc = db_conv2d_add_forward(c1, cgot, cx, cw3, cb, cgot, 1, CB, CC, CH, CW, COC, 3, 3, 1, 1, 1);
        tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "conv + addend: a per-channel addend on the output is refused: %s",
               c1->err.msg);
        db_ctx_clear_error(c1);
        free(cx), free(cw3), free(cw1), free(cb), free(ca), free(cv), free(cwant), free(cgot), free(fold);
    }

    /* linears of one input, each its own width (a UNet's time projections):
     * == one db_linear_forward each, with and without biases, and the
     * argument checks */
    {
        enum { FN = 3, FR = 2, FC = 40 };
        const int foc[FN] = {24, 8, 33};
        float *fx = rnd((size_t)FR * FC, 50, 1.0f), *fw[FN], *fb[FN], *fo[FN], *fr[FN];
        for (int i = 0; i < FN; i++) {
            fw[i] = rnd((size_t)foc[i] * FC, 51 + i, 0.2f), fb[i] = rnd(foc[i], 55 + i, 0.5f);
            fo[i] = malloc((size_t)FR * foc[i] * sizeof(float)), fr[i] = malloc((size_t)FR * foc[i] * sizeof(float));
        }
        for (int p = 0; p < 3; p++)
            for (int hb = 0; hb < 2; hb++) {
                db_ctx_set_precision(c1, ps[p]);
                int rc = db_linear_fan_forward(c1, fo, fx, (const float *const *)fw,
                                               hb ? (const float *const *)fb : NULL, foc, FN, FR, FC);
                int same = rc == 0;
                for (int i = 0; i < FN && same; i++)
                    same = db_linear_forward(c1, fr[i], fx, fw[i], hb ? fb[i] : NULL, FR, FC, foc[i]) == 0 &&
                           same_bits(fo[i], fr[i], (size_t)FR * foc[i]);
                tap_ok(same, "%s, %s bias: linears of widths 24, 8, 33 at once == one linear each, bit for bit%s%s",
                       db_precision_name(ps[p]), hb ? "with" : "no", rc ? ": " : "", rc ? c1->err.msg : "");
                db_ctx_set_precision(c1, DB_PREC_F32);
            }
        int zoc[FN] = {24, 0, 33};
        float *ov[FN] = {fo[0], fo[0], fo[2]}, *on[FN] = {fo[0], fx, fo[2]};
        for (int i = 0; i < 5; i++) {
            static const char *what[] = {"n = 0", "n over the most", "a width of 0", "two outputs in one place",
                                         "an output on the input"};
            const float *const *cw = (const float *const *)fw;
            const int rc = i == 0   ? db_linear_fan_forward(c1, fo, fx, cw, NULL, foc, 0, FR, FC)
                           : i == 1 ? db_linear_fan_forward(c1, fo, fx, cw, NULL, foc, DB_LINEAR_FAN_MAX + 1, FR, FC)
                           : i == 2 ? db_linear_fan_forward(c1, fo, fx, cw, NULL, zoc, FN, FR, FC)
                           : i == 3 ? db_linear_fan_forward(c1, ov, fx, cw, NULL, foc, FN, FR, FC)
                                    : db_linear_fan_forward(c1, on, fx, cw, NULL, foc, FN, FR, FC);
            tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "linear fan: %s is refused: %s", what[i], c1->err.msg);
            db_ctx_clear_error(c1);
        }
        for (int i = 0; i < FN; i++)
            free(fw[i]), free(fb[i]), free(fo[i]), free(fr[i]);
        free(fx);
    }

    /* layer norm backward + the residual's gradient: the addend apart and
     * dinp itself (a CLIP layer's dres +=); C 40 (the any-width path) */
    {
        enum { LN = 37, LC = 40 };
        const size_t n = (size_t)LN * LC;
        float *lx = rnd(n, 60, 1.0f), *ldy = rnd(n, 61, 1.0f), *lw = rnd(LC, 62, 0.5f), *la = rnd(n, 63, 1.0f);
        float *mean = malloc(LN * sizeof *mean), *rstd = malloc(LN * sizeof *rstd), *tmp = malloc(n * sizeof *tmp);
        float *lwant = malloc(n * sizeof *lwant), *lgot = malloc(n * sizeof *lgot);
        float *gw[2] = {rnd(LC, 64, 1.0f), rnd(LC, 64, 1.0f)}, *gb[2] = {rnd(LC, 65, 1.0f), rnd(LC, 65, 1.0f)};
        la[0] = -0.0f, la[1] = NAN;
        for (int row = 0; row < LN; row++) { /* the forward's statistics */
            const float *xr = lx + (size_t)row * LC;
            double s = 0, q = 0;
            for (int i = 0; i < LC; i++)
                s += xr[i], q += (double)xr[i] * xr[i];
            mean[row] = (float)(s / LC), rstd[row] = (float)(1.0 / sqrt(q / LC - (s / LC) * (s / LC) + 1e-5));
        }
        for (int p = 0; p < 3; p++)
            for (int t = 0; t < 2; t++)
                for (int self = 0; self < 2; self++) {
                    db_ctx *c = cs[t];
                    db_ctx_set_precision(c, ps[p]);
                    int rc = db_layernorm_backward(c, tmp, gw[0], gb[0], ldy, mean, rstd, lx, lw, LN, LC, 0) ||
                             db_add_forward(c, lwant, la, tmp, n);
                    memcpy(lgot, la, n * sizeof *lgot);
                    rc = rc || db_layernorm_backward_add(c, lgot, gw[1], gb[1], ldy, mean, rstd, lx, lw,
                                                         self ? lgot : la, LN, LC, 0);
                    tap_ok(rc == 0 && same_bits(lwant, lgot, n) && same_bits(gw[0], gw[1], LC) &&
                               same_bits(gb[0], gb[1], LC),
                           "%s, %d thread(s), %s: layer norm backward + addend == the backward then add, bit for "
                           "bit%s%s",
                           db_precision_name(ps[p]), t + 1, self ? "dinp itself" : "an addend", rc ? ": " : "",
                           rc ? c->err.msg : "");
                    db_ctx_set_precision(c, DB_PREC_F32);
                }
        /* the check can fail: the addend joined by a fused multiply-add (one
         * rounding, as a contracting compiler would make it) differs */
        int differ = 0;
        for (int row = 0; row < LN; row++) {
            const size_t o = (size_t)row * LC;
            const float mu = mean[row], rs = rstd[row];
            double sg = 0, sgx = 0;
            for (int i = 0; i < LC; i++) {
                const float g = ldy[o + i] * lw[i];
                sg += g, sgx += (double)g * ((lx[o + i] - mu) * rs);
            }
            const float mg = (float)(sg / LC), mgx = (float)(sgx / LC);
            for (int i = 0; i < LC; i++) {
                const float inner = ldy[o + i] * lw[i] - mg - (lx[o + i] - mu) * rs * mgx;
                const float f = fmaf(rs, inner, la[o + i]);
                differ += o + i >= 2 && memcmp(&f, &lwant[o + i], sizeof f) != 0;
            }
        }
        tap_ok(differ > 0, "the sum as one fused multiply-add differs in %d of %zu values (the comparison can fail)",
               differ, n - 2);
        int rc = db_layernorm_backward_add(c1, lgot, NULL, NULL, ldy, mean, rstd, lx, lw, NULL, LN, LC, 0);
        tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "layer norm backward + addend: no addend is refused: %s",
               c1->err.msg);
        db_ctx_clear_error(c1);
        free(lx), free(ldy), free(lw), free(la), free(mean), free(rstd), free(tmp), free(lwant), free(lgot);
        free(gw[0]), free(gw[1]), free(gb[0]), free(gb[1]);
    }

    /* group norm backward + the shortcut's gradient, with and without the
     * fused SiLU */
    {
        enum { GB = 2, GC = 12, GHW = 21, GG = 4 };
        const size_t n = (size_t)GB * GC * GHW;
        float *gx = rnd(n, 70, 1.0f), *gdy = rnd(n, 71, 1.0f), *gwt = rnd(GC, 72, 0.5f), *gbs = rnd(GC, 73, 0.5f);
        float *ga = rnd(n, 74, 1.0f), *gy = malloc(n * sizeof *gy), *gt = malloc(n * sizeof *gt);
        float *gwant = malloc(n * sizeof *gwant), *ggot = malloc(n * sizeof *ggot);
        float *mean = malloc(GB * GG * sizeof *mean), *rstd = malloc(GB * GG * sizeof *rstd);
        float *gpw[2] = {rnd(GC, 75, 1.0f), rnd(GC, 75, 1.0f)}, *gpb[2] = {rnd(GC, 76, 1.0f), rnd(GC, 76, 1.0f)};
        ga[0] = -0.0f, ga[1] = NAN;
        for (int p = 0; p < 3; p++)
            for (int t = 0; t < 2; t++)
                for (int k = 0; k < 4; k++) {
                    const int silu = k & 1, self = k >> 1;
                    db_ctx *c = cs[t];
                    db_ctx_set_precision(c, ps[p]);
                    int rc = db_groupnorm_forward(c, gy, mean, rstd, gx, gwt, gbs, GB, GC, GHW, GG, 1e-5f, silu) ||
                             db_groupnorm_backward(c, gt, gpw[0], gpb[0], gdy, mean, rstd, gx, gwt, gbs, GB, GC, GHW, GG,
                                                   silu, 0) ||
                             db_add_forward(c, gwant, ga, gt, n);
                    memcpy(ggot, ga, n * sizeof *ggot);
                    rc = rc || db_groupnorm_backward_add(c, ggot, gpw[1], gpb[1], gdy, mean, rstd, gx, gwt, gbs,
                                                         self ? ggot : ga, GB, GC, GHW, GG, silu, 0);
                    tap_ok(rc == 0 && same_bits(gwant, ggot, n) && same_bits(gpw[0], gpw[1], GC) &&
                               same_bits(gpb[0], gpb[1], GC),
                           "%s, %d thread(s), %s, %s: group norm backward + addend == the backward then add, bit for "
                           "bit%s%s",
                           db_precision_name(ps[p]), t + 1, silu ? "SiLU" : "no SiLU",
                           self ? "dinp itself" : "an addend", rc ? ": " : "", rc ? c->err.msg : "");
                    db_ctx_set_precision(c, DB_PREC_F32);
                }
        /* the check can fail: another addend (one value off by an ulp) differs */
        ga[5] = nextafterf(ga[5], INFINITY);
        int rc = db_groupnorm_backward_add(c1, ggot, NULL, NULL, gdy, mean, rstd, gx, gwt, gbs, ga, GB, GC, GHW, GG, 1,
                                           0);
        tap_ok(rc == 0 && !same_bits(gwant, ggot, n) && same_bits(gwant + 6, ggot + 6, n - 6),
               "an addend one ulp off in one value gives other bits there only (the comparison can fail)");
        rc = db_groupnorm_backward_add(c1, NULL, NULL, NULL, gdy, mean, rstd, gx, gwt, gbs, ga, GB, GC, GHW, GG, 1, 0);
        tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "group norm backward + addend: no dinp is refused: %s",
               c1->err.msg);
        db_ctx_clear_error(c1);
        free(gx), free(gdy), free(gwt), free(gbs), free(ga), free(gy), free(gt), free(gwant), free(ggot);
        free(mean), free(rstd), free(gpw[0]), free(gpw[1]), free(gpb[0]), free(gpb[1]);
    }

    const int rc = db_linear_add_forward(c1, got, x, w, b, got, N, C, OC);
    tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "a residual aliasing the output is refused: %s", c1->err.msg);
    db_ctx_clear_error(c1);
    free(x), free(w), free(b), free(r), free(want), free(got), free(wrong);
    db_ctx_destroy(c1);
    db_ctx_destroy(c2);
    return tap_done();
}
