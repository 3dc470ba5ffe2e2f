/* Fused ops against the op sequences they replace, bit for bit:
 * db_linear_add_forward == db_linear_forward then db_add_forward, and
 * db_linear_geglu_forward == db_linear_forward then db_geglu_forward, and
 * db_transpose_add_forward == db_transpose_forward then db_add_forward, in fp32,
 * bf16 and fp16 (the CPU's autocast emulation), with and without a bias,
 * on 1 and 2 threads, with signed zeros and NaN among the residuals; and
 * a NULL residual is the plain linear.  A broken fusion (the residual added
 * before the bias or the rounding) fails: the check is made against such a
 * variant too. */
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

    const int rc = db_linear_add_forward(c1, got, x, w, b, got, N, C, OC);
    tap_ok(rc != 0 && c1->err.code == DB_EUSAGE, "a residual aliasing the output is refused: %s", c1->err.msg);
    db_ctx_clear_error(c1);
    free(x), free(w), free(b), free(r), free(want), free(got), free(wrong);
    db_ctx_destroy(c1);
    db_ctx_destroy(c2);
    return tap_done();
}
