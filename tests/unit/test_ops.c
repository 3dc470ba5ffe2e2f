/* CPU ops (kernels/ops.h) against naive double-precision references written
 * here, on fresh random inputs (never zeros).  Pass: relative L2 error per
 * tensor <= 1e-5 (data movement ops: bit-exact).  Ops with AVX-512 kernels
 * run twice, with them and with the portable loops.  Attention has its own
 * file, test_ops_attention.c. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "kernels/cuda_api.h"
#include "libcommon/sd/optim.h"
#include "tap.h"

#define TOL 1e-5

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

static float *rnd(size_t n, float scale, float offset)
{
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = urand() * scale + offset;
    return p;
}

static double *dalloc(size_t n) { return calloc(n, sizeof(double)); }

/* Relative L2 error of got against ref; reports the worst element on failure. */
static int check(const char *what, const char *path, const float *got, const double *ref, size_t n, double tol)
{
    double num = 0, den = 0, worst = -1;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
        if (fabs(d) > worst || isnan(d)) {
            worst = isnan(d) ? INFINITY : fabs(d);
            wi = i;
        }
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    int ok = rel <= tol; /* NaN fails */
    tap_ok(ok, "%s [%s]: rel L2 %.2e", what, path, rel);
    if (!ok)
        tap_diag("worst element %zu: got %.9g want %.9g", wi, got[wi], ref[wi]);
    return ok;
}

static int check_exact(const char *what, const float *got, const float *want, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += memcmp(&got[i], &want[i], sizeof got[i]) != 0;
    return tap_ok(bad == 0, "%s: bit-exact (%zu differ)", what, bad);
}

/* ---- references ---------------------------------------------------------- */

static void ref_gemm(double *Cm, const float *A, const float *B, const float *C0, int batch, int M, int N, int K,
                     int ta, int tb, double alpha, double beta)
{
    for (int b = 0; b < batch; b++)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0;
                for (int k = 0; k < K; k++) {
                    double a = ta ? A[(size_t)b * M * K + (size_t)k * M + i] : A[(size_t)b * M * K + (size_t)i * K + k];
                    double bb = tb ? B[(size_t)b * K * N + (size_t)j * K + k] : B[(size_t)b * K * N + (size_t)k * N + j];
                    s += a * bb;
                }
                size_t o = (size_t)b * M * N + (size_t)i * N + j;
                Cm[o] = alpha * s + (beta != 0 ? beta * C0[o] : 0);
            }
}

static void ref_conv(double *out, const float *inp, const float *w, const float *bias, int B, int C, int H, int W,
                     int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    for (int b = 0; b < B; b++)
        for (int o = 0; o < OC; o++)
            for (int y = 0; y < OH; y++)
                for (int x = 0; x < OW; x++) {
                    double s = bias ? bias[o] : 0;
                    for (int ci = 0; ci < C; ci++)
                        for (int ky = 0; ky < KH; ky++)
                            for (int kx = 0; kx < KW; kx++) {
                                int iy = y * stride + ky - pad0, ix = x * stride + kx - pad0;
                                if (iy < 0 || iy >= H || ix < 0 || ix >= W)
                                    continue;
                                s += (double)inp[(((size_t)b * C + ci) * H + iy) * W + ix] *
                                     w[(((size_t)o * C + ci) * KH + ky) * KW + kx];
                            }
                    out[(((size_t)b * OC + o) * OH + y) * OW + x] = s;
                }
}

static double silu_d(double x) { return x / (1 + exp(-x)); }
static double gelu_erf_d(double x) { return 0.5 * x * (1 + erf(x / sqrt(2.0))); }
static double gelu_tanh_d(double x) { return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }
static double quick_gelu_d(double x) { return x / (1 + exp(-1.702 * x)); }

/* ---- tests ----------------------------------------------------------------- */

static void test_gemm(db_ctx *c, const char *path)
{
    struct { int batch, M, N, K; } shapes[] = {{3, 37, 53, 29}, {1, 300, 1100, 64}, {2, 5, 7, 300}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int bt = shapes[s].batch, M = shapes[s].M, N = shapes[s].N, K = shapes[s].K;
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                float *A = rnd((size_t)bt * M * K, 1, 0), *B = rnd((size_t)bt * K * N, 1, 0);
                float *C0 = rnd((size_t)bt * M * N, 1, 0), *Cm = malloc((size_t)bt * M * N * sizeof *Cm);
                double *ref = dalloc((size_t)bt * M * N);
                memcpy(Cm, C0, (size_t)bt * M * N * sizeof *Cm);
                ref_gemm(ref, A, B, C0, bt, M, N, K, ta, tb, 0.7, 0.3);
                char what[128];
                snprintf(what, sizeof what, "gemm %dx(%dx%dx%d) ta=%d tb=%d alpha .7 beta .3", bt, M, N, K, ta, tb);
                tap_ok(db_gemm_forward(c, Cm, A, B, bt, M, N, K, ta, tb, 0.7f, 0.3f) == 0, "%s runs", what);
                check(what, path, Cm, ref, (size_t)bt * M * N, TOL);
                if (ta == tb) { /* beta 0 must ignore C, NaN included */
                    for (size_t i = 0; i < (size_t)bt * M * N; i++)
                        Cm[i] = NAN;
                    ref_gemm(ref, A, B, C0, bt, M, N, K, ta, tb, 1.0, 0.0);
                    db_gemm_forward(c, Cm, A, B, bt, M, N, K, ta, tb, 1.0f, 0.0f);
                    snprintf(what, sizeof what, "gemm %dx(%dx%dx%d) ta=tb=%d beta 0 over NaN", bt, M, N, K, ta);
                    check(what, path, Cm, ref, (size_t)bt * M * N, TOL);
                }
                free(A), free(B), free(C0), free(Cm), free(ref);
            }
    }
}

static void test_linear(db_ctx *c, const char *path)
{
    struct { int N, C, OC, bias; } shapes[] = {{77, 768, 100, 1}, {300, 64, 1030, 1}, {33, 40, 17, 0}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s].N, C = shapes[s].C, OC = shapes[s].OC;
        float *x = rnd((size_t)N * C, 1, 0), *w = rnd((size_t)OC * C, 0.1f, 0), *b = rnd((size_t)OC, 1, 0.5f);
        float *out = malloc((size_t)N * OC * sizeof *out);
        double *ref = dalloc((size_t)N * OC);
        ref_gemm(ref, x, w, NULL, 1, N, OC, C, 0, 1, 1.0, 0.0);
        if (shapes[s].bias)
            for (int i = 0; i < N; i++)
                for (int j = 0; j < OC; j++)
                    ref[(size_t)i * OC + j] += b[j];
        char what[96];
        snprintf(what, sizeof what, "linear (%d, %d) -> %d%s", N, C, OC, shapes[s].bias ? " + bias" : "");
        tap_ok(db_linear_forward(c, out, x, w, shapes[s].bias ? b : NULL, N, C, OC) == 0, "%s runs", what);
        check(what, path, out, ref, (size_t)N * OC, TOL);
        free(x), free(w), free(b), free(out), free(ref);
    }
}

static void test_conv(db_ctx *c, const char *path)
{
    struct { int B, C, H, W, OC, K, stride, pad0, pad1, bias; } shapes[] = {
        {2, 5, 11, 13, 7, 3, 1, 1, 1, 1},  /* odd everything, 3x3 same */
        {1, 6, 9, 7, 10, 3, 2, 1, 1, 1},   /* UNet downsample: stride 2, padding 1 */
        {2, 8, 8, 8, 8, 3, 2, 0, 1, 1},    /* VAE downsample: pad (0,1,0,1), stride 2 */
        {1, 32, 6, 5, 48, 1, 1, 0, 0, 0},  /* 1x1 shortcut, no bias (the GEMM path) */
        {2, 16, 6, 5, 24, 1, 1, 0, 0, 1},  /* 1x1 + bias, batch 2 (the GEMM path) */
        {1, 16, 7, 7, 8, 1, 2, 1, 1, 1},   /* 1x1 with stride and padding (oneDNN) */
        {1, 32, 10, 10, 64, 3, 1, 1, 1, 1}, /* small image: NCHW + GEMM convolution */
        {1, 32, 20, 20, 48, 3, 1, 1, 1, 1}, /* 400 pixels: blocked layouts */
        {1, 4, 12, 12, 32, 3, 1, 1, 1, 1},  /* conv_in: 4 latent channels */
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s].B, C = shapes[s].C, H = shapes[s].H, W = shapes[s].W, OC = shapes[s].OC, K = shapes[s].K;
        int st = shapes[s].stride, p0 = shapes[s].pad0, p1 = shapes[s].pad1;
        int OH = (H + p0 + p1 - K) / st + 1, OW = (W + p0 + p1 - K) / st + 1;
        size_t no = (size_t)B * OC * OH * OW;
        char what[128];
        snprintf(what, sizeof what, "conv2d (%d,%d,%d,%d) -> %d, %dx%d stride %d pad %d/%d%s", B, C, H, W, OC, K, K,
                 st, p0, p1, shapes[s].bias ? " + bias" : "");
        /* twice: the second call runs the cached primitive on new data */
        for (int rep = 0; rep < 2; rep++) {
            float *x = rnd((size_t)B * C * H * W, 1, 0), *w = rnd((size_t)OC * C * K * K, 0.2f, 0);
            float *b = rnd((size_t)OC, 1, 0), *out = malloc(no * sizeof *out);
            double *ref = dalloc(no);
            const float *bias = shapes[s].bias ? b : NULL;
            ref_conv(ref, x, w, bias, B, C, H, W, OC, K, K, st, p0, p1);
            int rc = db_conv2d_forward(c, out, x, w, bias, B, C, H, W, OC, K, K, st, p0, p1);
            if (!tap_ok(rc == 0, "%s runs%s", what, rep ? " (cached)" : ""))
                tap_diag("%s", c->err.msg);
            check(what, path, out, ref, no, TOL);
            free(x), free(w), free(b), free(out), free(ref);
        }
    }
}

static void test_groupnorm(db_ctx *c, const char *path)
{
    struct { int B, C, HW, G, silu; float offset; } shapes[] = {
        {2, 64, 50, 32, 0, 3.0f}, {1, 96, 37, 32, 1, -1.0f}, {2, 12, 1000, 4, 1, 0.5f}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s].B, C = shapes[s].C, HW = shapes[s].HW, G = shapes[s].G, silu = shapes[s].silu;
        size_t n = (size_t)B * C * HW;
        const float eps = 1e-5f;
        float *x = rnd(n, 2, shapes[s].offset), *w = rnd(C, 1, 1), *b = rnd(C, 1, 0);
        float *out = malloc(n * sizeof *out), *mean = malloc((size_t)B * G * sizeof *mean),
              *rstd = malloc((size_t)B * G * sizeof *rstd);
        double *ref = dalloc(n), *rmean = dalloc((size_t)B * G), *rrstd = dalloc((size_t)B * G);
        int cg = C / G;
        for (int bg = 0; bg < B * G; bg++) {
            const float *xg = x + (size_t)bg * cg * HW;
            double mu = 0, var = 0;
            for (size_t i = 0; i < (size_t)cg * HW; i++)
                mu += xg[i];
            mu /= (double)cg * HW;
            for (size_t i = 0; i < (size_t)cg * HW; i++)
                var += (xg[i] - mu) * (xg[i] - mu);
            var /= (double)cg * HW;
            rmean[bg] = mu;
            rrstd[bg] = 1 / sqrt(var + eps);
            for (int ch = 0; ch < cg; ch++) {
                int cc = (bg % G) * cg + ch;
                for (int i = 0; i < HW; i++) {
                    double y = (xg[(size_t)ch * HW + i] - mu) * rrstd[bg] * w[cc] + b[cc];
                    ref[(size_t)bg * cg * HW + (size_t)ch * HW + i] = silu ? silu_d(y) : y;
                }
            }
        }
        char what[96];
        snprintf(what, sizeof what, "groupnorm (%d,%d,%d) G=%d%s", B, C, HW, G, silu ? " + silu" : "");
        tap_ok(db_groupnorm_forward(c, out, mean, rstd, x, w, b, B, C, HW, G, eps, silu) == 0, "%s runs", what);
        check(what, path, out, ref, n, TOL);
        check("  its mean", path, mean, rmean, (size_t)B * G, TOL);
        check("  its rstd", path, rstd, rrstd, (size_t)B * G, TOL);
        float *y = malloc(n * sizeof *y);
        memcpy(y, x, n * sizeof *y);
        db_groupnorm_forward(c, y, NULL, NULL, y, w, b, B, C, HW, G, eps, silu);
        check_exact("  in place, no stats: same output", y, out, n);
        free(y);
        free(x), free(w), free(b), free(out), free(mean), free(rstd), free(ref), free(rmean), free(rrstd);
    }
}

static void test_layernorm(db_ctx *c, const char *path)
{
    struct { int N, C; } shapes[] = {{77, 768}, {5, 37}, {64, 320}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s].N, C = shapes[s].C;
        const float eps = 1e-5f;
        float *x = rnd((size_t)N * C, 3, 1), *w = rnd(C, 1, 1), *b = rnd(C, 1, 0);
        float *out = malloc((size_t)N * C * sizeof *out), *mean = malloc(N * sizeof *mean),
              *rstd = malloc(N * sizeof *rstd);
        double *ref = dalloc((size_t)N * C), *rmean = dalloc(N), *rrstd = dalloc(N);
        for (int r = 0; r < N; r++) {
            const float *xr = x + (size_t)r * C;
            double mu = 0, var = 0;
            for (int i = 0; i < C; i++)
                mu += xr[i];
            mu /= C;
            for (int i = 0; i < C; i++)
                var += (xr[i] - mu) * (xr[i] - mu);
            var /= C;
            rmean[r] = mu;
            rrstd[r] = 1 / sqrt(var + eps);
            for (int i = 0; i < C; i++)
                ref[(size_t)r * C + i] = (xr[i] - mu) * rrstd[r] * w[i] + b[i];
        }
        char what[64];
        snprintf(what, sizeof what, "layernorm (%d, %d)", N, C);
        tap_ok(db_layernorm_forward(c, out, mean, rstd, x, w, b, N, C, eps) == 0, "%s runs", what);
        check(what, path, out, ref, (size_t)N * C, TOL);
        check("  its mean", path, mean, rmean, N, TOL);
        check("  its rstd", path, rstd, rrstd, N, TOL);
        free(x), free(w), free(b), free(out), free(mean), free(rstd), free(ref), free(rmean), free(rrstd);
    }
}

static void test_softmax(db_ctx *c, const char *path)
{
    struct { int N, C; } shapes[] = {{10, 77}, {3, 1000}, {4, 5}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s].N, C = shapes[s].C;
        float *x = rnd((size_t)N * C, 8, 2), *out = malloc((size_t)N * C * sizeof *out);
        double *ref = dalloc((size_t)N * C);
        for (int r = 0; r < N; r++) {
            double mx = -INFINITY, sum = 0;
            for (int i = 0; i < C; i++)
                mx = fmax(mx, x[(size_t)r * C + i]);
            for (int i = 0; i < C; i++)
                sum += ref[(size_t)r * C + i] = exp(x[(size_t)r * C + i] - mx);
            for (int i = 0; i < C; i++)
                ref[(size_t)r * C + i] /= sum;
        }
        char what[64];
        snprintf(what, sizeof what, "softmax (%d, %d)", N, C);
        tap_ok(db_softmax_forward(c, out, x, N, C) == 0, "%s runs", what);
        check(what, path, out, ref, (size_t)N * C, TOL);
        free(x), free(out), free(ref);
    }
}

static void test_activations(db_ctx *c, const char *path)
{
    const size_t n = 40000 + 7; /* several chunks and a vector tail */
    float *x = rnd(n, 6, 0), *out = malloc(n * sizeof *out);
    x[0] = -90.0f, x[1] = 90.0f, x[2] = -20.0f, x[3] = 1e-4f; /* exp overflow / underflow, tiny */
    double *ref = dalloc(n);
    struct { const char *name; double (*f)(double); } acts[] = {
        {"silu", silu_d}, {"gelu erf", gelu_erf_d}, {"gelu tanh", gelu_tanh_d}, {"quick_gelu", quick_gelu_d}};
    for (size_t a = 0; a < sizeof acts / sizeof acts[0]; a++) {
        for (size_t i = 0; i < n; i++)
            ref[i] = acts[a].f(x[i]);
        int rc = a == 0   ? db_silu_forward(c, out, x, n)
                 : a == 1 ? db_gelu_forward(c, out, x, n, DB_GELU_ERF)
                 : a == 2 ? db_gelu_forward(c, out, x, n, DB_GELU_TANH)
                          : db_quick_gelu_forward(c, out, x, n);
        tap_ok(rc == 0, "%s runs", acts[a].name);
        check(acts[a].name, path, out, ref, n, TOL);
    }
    /* in place */
    float *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    db_silu_forward(c, y, y, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = silu_d(x[i]);
    check("silu in place", path, y, ref, n, TOL);

    int N = 33, C = 43;
    float *g = rnd((size_t)N * 2 * C, 4, 0.5f), *go = malloc((size_t)N * C * sizeof *go);
    double *gref = dalloc((size_t)N * C);
    for (int r = 0; r < N; r++)
        for (int i = 0; i < C; i++)
            gref[(size_t)r * C + i] = (double)g[(size_t)r * 2 * C + i] * gelu_erf_d(g[(size_t)r * 2 * C + C + i]);
    tap_ok(db_geglu_forward(c, go, g, N, C) == 0, "geglu runs");
    check("geglu (33, 2*43) hidden * gelu(gate)", path, go, gref, (size_t)N * C, TOL);
    free(x), free(out), free(ref), free(y), free(g), free(go), free(gref);
}

static void test_arith(db_ctx *c, const char *path)
{
    const size_t n = 50000 + 3;
    float *a = rnd(n, 1, 0), *b = rnd(n, 1, 0), *out = malloc(n * sizeof *out);
    double *ref = dalloc(n);
    db_add_forward(c, out, a, b, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)a[i] + b[i];
    check("add", path, out, ref, n, 1e-7);
    db_mul_forward(c, out, a, b, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)a[i] * b[i];
    check("mul", path, out, ref, n, 1e-7);
    db_axpby_forward(c, out, a, b, 1.5f, -7.5f, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = 1.5 * a[i] - 7.5 * b[i];
    check("axpby 1.5 a - 7.5 b", path, out, ref, n, 1e-6);
    db_axpby_forward(c, out, a, NULL, 0.18215f, 0.0f, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = 0.18215 * a[i];
    check("axpby as a scale (y NULL)", path, out, ref, n, 1e-6);

    int B = 2, C = 5, HW = 37;
    float *x = rnd((size_t)B * C * HW, 1, 0), *v = rnd((size_t)B * C, 1, 0), *o = malloc((size_t)B * C * HW * 4);
    double *r2 = dalloc((size_t)B * C * HW);
    for (int i = 0; i < B * C * HW; i++)
        r2[i] = (double)x[i] + v[i / HW];
    db_add_channel_forward(c, o, x, v, B, C, HW);
    check("add_channel (2,5,37) + (2,5)", path, o, r2, (size_t)B * C * HW, 1e-7);
    free(a), free(b), free(out), free(ref), free(x), free(v), free(o), free(r2);
}

static void test_layout(db_ctx *c)
{
    int B = 2, C1 = 3, C2 = 5, HW = 31;
    float *a = rnd((size_t)B * C1 * HW, 1, 0), *b = rnd((size_t)B * C2 * HW, 1, 0);
    float *out = malloc((size_t)B * (C1 + C2) * HW * 4), *want = malloc((size_t)B * (C1 + C2) * HW * 4);
    for (int i = 0; i < B; i++)
        for (int ch = 0; ch < C1 + C2; ch++)
            for (int p = 0; p < HW; p++)
                want[((size_t)i * (C1 + C2) + ch) * HW + p] =
                    ch < C1 ? a[((size_t)i * C1 + ch) * HW + p] : b[((size_t)i * C2 + ch - C1) * HW + p];
    db_concat_channels_forward(c, out, a, b, B, C1, C2, HW);
    check_exact("concat channels (2,3,31)+(2,5,31)", out, want, (size_t)B * (C1 + C2) * HW);
    free(a), free(b), free(out), free(want);

    int M = 37, N = 70;
    float *x = rnd((size_t)B * M * N, 1, 0), *t = malloc((size_t)B * M * N * 4), *tw = malloc((size_t)B * M * N * 4);
    for (int i = 0; i < B; i++)
        for (int r = 0; r < M; r++)
            for (int q = 0; q < N; q++)
                tw[(size_t)i * M * N + (size_t)q * M + r] = x[(size_t)i * M * N + (size_t)r * N + q];
    db_transpose_forward(c, t, x, B, M, N);
    check_exact("transpose (2,37,70) -> (2,70,37)", t, tw, (size_t)B * M * N);
    free(x), free(t), free(tw);

    int Cc = 3, H = 5, W = 7;
    float *u = rnd((size_t)B * Cc * H * W, 1, 0), *uo = malloc((size_t)B * Cc * 4 * H * W * 4),
          *uw = malloc((size_t)B * Cc * 4 * H * W * 4);
    for (int i = 0; i < B * Cc; i++)
        for (int y = 0; y < 2 * H; y++)
            for (int q = 0; q < 2 * W; q++)
                uw[((size_t)i * 2 * H + y) * 2 * W + q] = u[((size_t)i * H + y / 2) * W + q / 2];
    db_upsample_nearest2x_forward(c, uo, u, B, Cc, H, W);
    check_exact("upsample nearest 2x (2,3,5,7)", uo, uw, (size_t)B * Cc * 4 * H * W);
    free(u), free(uo), free(uw);
}

static void test_embeddings(db_ctx *c)
{
    /* Values pinned from the float32 formula, each step rounded to float32
     * (Python: struct-packed floats), SD1.5's setting: D 320, flip, shift 0. */
    const float ts[4] = {1.0f, 500.0f, 999.0f, 981.5f};
    const int idx[5] = {0, 1, 7, 80, 159};
    const float want_cos[4][5] = {
        {0.5403022766113281f, 0.586503803730011f, 0.7848489880561829f, 0.9999499917030334f, 1.0f},
        {-0.8838492631912231f, 0.7027590870857239f, 0.396481990814209f, 0.28366219997406006f, 0.9985978007316589f},
        {0.9996498823165894f, 0.8026775121688843f, -0.08698814362287521f, -0.8444698452949524f, 0.9944063425064087f},
        {0.2451789230108261f, -0.9848882555961609f, -0.8177465200424194f, -0.9248247742652893f, 0.9946004152297974f}};
    const float want_sin[4][5] = {
        {0.8414709568023682f, 0.8099464774131775f, 0.619687020778656f, 0.009999833069741726f, 0.00010592537000775337f},
        {-0.4677717983722687f, 0.7114279270172119f, 0.9180424809455872f, -0.9589242935180664f, 0.05293792486190796f},
        {-0.02646075189113617f, 0.596413254737854f, 0.9962093234062195f, -0.5356031656265259f, 0.1056220605969429f},
        {0.9694778323173523f, 0.17319093644618988f, 0.5755784511566162f, -0.380393385887146f, 0.10377856343984604f}};
    float emb[4 * 320];
    tap_ok(db_timestep_embedding_forward(c, emb, ts, 4, 320, 1, 0.0f, 10000.0f) == 0, "timestep embedding runs");
    double worst = 0;
    for (int b = 0; b < 4; b++)
        for (int k = 0; k < 5; k++) {
            worst = fmax(worst, fabs((double)emb[b * 320 + idx[k]] - want_cos[b][k]));       /* cos first (flip) */
            worst = fmax(worst, fabs((double)emb[b * 320 + 160 + idx[k]] - want_sin[b][k])); /* then sin */
        }
    tap_ok(worst <= 2.5e-7, "timestep embedding D=320 flip shift=0 matches pinned float32 values (worst %.2e)", worst);

    /* odd D, no flip, shift 1: sin half first, zero last column */
    const float t2[2] = {37.0f, 640.25f};
    float e2[2 * 33];
    db_timestep_embedding_forward(c, e2, t2, 2, 33, 0, 1.0f, 10000.0f);
    const float w2[2][6] = {{-0.643538117f, 0.922193885f, -0.987292647f, -0.406920761f, 0.999976635f, 0.999993145f},
                            {-0.593098104f, 0.788645744f, -0.835517645f, 0.808630764f, 0.993009686f, 0.99795109f}};
    worst = 0;
    for (int b = 0; b < 2; b++) {
        for (int k = 0; k < 4; k++)
            worst = fmax(worst, fabs((double)e2[b * 33 + k] - w2[b][k]));
        worst = fmax(worst, fabs((double)e2[b * 33 + 30] - w2[b][4]));
        worst = fmax(worst, fabs((double)e2[b * 33 + 31] - w2[b][5]));
    }
    tap_ok(worst <= 2.5e-7 && e2[32] == 0.0f && e2[65] == 0.0f,
           "timestep embedding D=33 shift=1 sin-first matches pinned values, zero pad (worst %.2e)", worst);

    int B = 2, T = 7, C = 24, V = 50;
    int32_t tok[14];
    for (int i = 0; i < B * T; i++)
        tok[i] = (i * 17 + 3) % V;
    float *wte = rnd((size_t)V * C, 1, 0), *wpe = rnd((size_t)T * C, 1, 0), *out = malloc((size_t)B * T * C * 4),
          *want = malloc((size_t)B * T * C * 4);
    for (int i = 0; i < B * T; i++)
        for (int j = 0; j < C; j++)
            want[i * C + j] = wte[tok[i] * C + j] + wpe[(i % T) * C + j];
    tap_ok(db_embedding_forward(c, out, tok, wte, wpe, B, T, C, V) == 0, "token + position embedding runs");
    check_exact("token + position embedding (2, 7, 24)", out, want, (size_t)B * T * C);

    /* A bad token id is an error, the error is sticky, and clearing it recovers. */
    tok[5] = V;
    int rc = db_embedding_forward(c, out, tok, wte, wpe, B, T, C, V);
    tap_ok(rc == -1 && c->err.code == DB_EFORMAT && strstr(c->err.msg, "token id 50"), "token id >= V refused: %s",
           c->err.msg);
    tap_ok(db_add_forward(c, out, wte, wte, 4) == -1, "error is sticky: the next op returns -1");
    db_ctx_clear_error(c);
    tap_ok(db_add_forward(c, out, wte, wte, 4) == 0, "clearing the error recovers");
    tap_ok(db_conv2d_forward(c, out, wte, wte, NULL, 1, 1, 4, 4, 1, 3, 3, 0, 1, 1) == -1 && c->err.code == DB_EUSAGE,
           "conv2d with stride 0 refused: %s", c->err.msg);
    db_ctx_clear_error(c);
    free(wte), free(wpe), free(out), free(want);
}

/* The ctx's memory API on the CPU, device names, CUDA refused cleanly
 * where no backend or GPU is, and the optimizer ops against optim.c. */
static void test_device(db_ctx *c)
{
    db_err err = {0};
    float *p = db_ctx_alloc(c, 1000 * sizeof(float)), *q = db_ctx_alloc(c, 1000 * sizeof(float));
    void *z = db_ctx_alloc(c, 0);
    tap_ok(p && q && z && ((uintptr_t)p & 63) == 0 && ((uintptr_t)q & 63) == 0, "ctx alloc: 64-byte aligned");
    for (int i = 0; p && i < 1000; i++)
        p[i] = (float)i * 0.25f;
    int rc = db_ctx_copy(c, q, p, 1000 * sizeof(float), DB_COPY_H2D);
    rc |= db_ctx_copy(c, q, q, 1000 * sizeof(float), DB_COPY_D2D); /* same buffer: nothing */
    tap_ok(rc == 0 && q && !memcmp(p, q, 1000 * sizeof(float)), "ctx copy");
    rc = db_ctx_zero(c, q + 10, 20 * sizeof(float)) | db_ctx_sync(c);
    int zero = 1;
    for (int i = 0; q && i < 1000; i++)
        zero &= (q[i] == 0.0f) == ((i >= 10 && i < 30) || i == 0);
    tap_ok(rc == 0 && zero, "ctx zero and sync");

    /* optimizer ops: bit-identical to optim.c's */
    enum { N = 40000 };
    float *w0 = malloc(4 * N * sizeof(float)), *w1 = db_ctx_alloc(c, 4 * N * sizeof(float));
    for (int i = 0; i < 4 * N; i++)
        w0[i] = sinf((float)i * 0.37f) * (i % 7 == 0 ? 3.0f : 0.01f);
    for (int i = 0; i < 2 * N; i++)
        w0[N + i] = fabsf(w0[N + i]) * (i >= N); /* m, then v >= 0 */
    memcpy(w1, w0, 4 * N * sizeof(float));
    db_adamw hp = db_adamw_defaults(1e-3);
    db_adamw_step(w0, w0 + N, w0 + 2 * N, w0 + 3 * N, N, &hp, 3);
    rc = db_opt_adamw(c, w1, w1 + N, w1 + 2 * N, w1 + 3 * N, N, &hp, 3);
    tap_ok(rc == 0 && !memcmp(w0, w1, 3 * N * sizeof(float)), "db_opt_adamw is db_adamw_step, bit for bit");
    db_grad_ref r0[2] = {{w0, N, 0}, {w0 + N, 100, 0}}, r1[2] = {{w1, N, 0}, {w1 + N, 100, 0}};
    double n0 = db_clip_grad_norm(r0, 2, 0.5), n1 = -1;
    rc = db_clip_grad_norm_ctx(c, &n1, r1, 2, 0.5);
    tap_ok(rc == 0 && n0 == n1 && !memcmp(w0, w1, 3 * N * sizeof(float)),
           "clip through db_opt_sumsq/db_opt_scale is db_clip_grad_norm, bit for bit (%g)", n1);
    /* tensors back to back are scaled as one run, but never across a gap:
     * w[1000, 2000) and w[2500, ...) are no tensor's and stay as they are */
    db_grad_ref g0[3] = {{w0, 400, 0}, {w0 + 400, 600, 0}, {w0 + 2000, 500, 0}};
    db_grad_ref g1[3] = {{w1, 400, 0}, {w1 + 400, 600, 0}, {w1 + 2000, 500, 0}};
    n0 = db_clip_grad_norm(g0, 3, 1e-3), n1 = -1;
    rc = db_clip_grad_norm_ctx(c, &n1, g1, 3, 1e-3);
    tap_ok(rc == 0 && n0 == n1 && !memcmp(w0, w1, 3 * N * sizeof(float)) && w1[1500] == w0[1500],
           "clip of tensors with a gap between them: db_clip_grad_norm's bits, the gap untouched (%g)", n1);
    free(w0);
    db_ctx_free(c, w1);
    db_ctx_free(c, p);
    db_ctx_free(c, q);
    db_ctx_free(c, z);
    db_ctx_free(c, NULL);

    db_ctx *d = NULL;
    tap_ok(db_ctx_create_device(&d, "cpu", 1, &err) == 0 && d && d->device == DB_CPU, "device \"cpu\"");
    db_ctx_destroy(d);
    tap_ok(db_ctx_create_device(&d, "cuda:x", 1, &err) == -1 && !d && err.code == DB_EUSAGE, "\"cuda:x\" refused: %s",
           err.msg);
    tap_ok(db_ctx_create_device(&d, "tpu", 1, &err) == -1 && !d && err.code == DB_EUSAGE, "\"tpu\" refused: %s",
           err.msg);
    /* CUDA: a ctx where the backend and a GPU are, else DB_EUNSUPP saying why
     * (here: no libdb_cuda.so, one without the op table, or no GPU) */
    const char *names[] = {"cuda", "cuda:1"};
    for (int i = 0; i < 2; i++) {
        db_err_clear(&err);
        rc = i == 0 ? db_ctx_create(&d, DB_CUDA, 1, &err) : db_ctx_create_device(&d, names[i], 1, &err);
        if (rc == 0) {
            tap_ok(d && d->device == DB_CUDA && d->cuda_api, "%s: a CUDA context", names[i]);
            db_ctx_destroy(d);
        } else {
            tap_ok(!d && err.code == DB_EUNSUPP && strstr(err.msg, "cuda:"), "%s refused cleanly: %s", names[i],
                   err.msg);
        }
    }
}

/* A stand-in backend member: marks that dispatch reached the table. */
static int fake_add(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    out[0] = 42.0f;
    return 0;
}

/* Dispatch on a CUDA ctx goes through the table, and a member the backend
 * left NULL is an error naming the op (no GPU needed: a hand-made ctx). */
static void test_cuda_dispatch(void)
{
    db_cuda_api api = {.abi = DB_CUDA_ABI, .add_forward = fake_add};
    db_ctx f = {.device = DB_CUDA, .threads = 1, .cuda_api = &api};
    float x[4] = {0};
    tap_ok(db_add_forward(&f, x, x, x, 4) == 0 && x[0] == 42.0f, "cuda dispatch calls the table's member");
    tap_ok(db_conv2d_backward(&f, x, NULL, NULL, x, x, x, 1, 1, 2, 2, 1, 1, 1, 1, 0, 0, 0) == -1 &&
               f.err.code == DB_EUNSUPP && strstr(f.err.msg, "conv2d backward: not implemented on CUDA"),
           "a missing member is reported: %s", f.err.msg);
    db_err_clear(&f.err);
    tap_ok(db_opt_sumsq(&f, &(double){0}, x, 4) == -1 && strstr(f.err.msg, "not implemented on CUDA"),
           "optimizer ops are CPU only for now: %s", f.err.msg);
}

int main(void)
{
    db_ctx *c;
    db_err err = {0};
    if (!tap_ok(db_ctx_create(&c, DB_CPU, 0, &err) == 0, "cpu context created"))
        return tap_done();
    tap_diag("threads %d, AVX-512 %s", c->threads, c->simd ? "yes" : "no");
    /* GEMM, linear and conv run on oneDNN whatever ctx->simd says: once. */
    test_gemm(c, "oneDNN");
    test_linear(c, "oneDNN");
    test_conv(c, "oneDNN");
    /* Ops with AVX-512 kernels: both paths. */
    const int has_simd = c->simd;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !has_simd)
            break; /* the first pass was already the portable one */
        c->simd = pass == 0 ? has_simd : 0;
        const char *path = c->simd ? "avx512" : "portable";
        test_groupnorm(c, path);
        test_layernorm(c, path);
        test_softmax(c, path);
        test_activations(c, path);
        test_arith(c, path);
    }
    c->simd = has_simd;
    test_layout(c);
    test_embeddings(c);
    test_device(c);
    test_cuda_dispatch();
    db_ctx_destroy(c);

    db_ctx *bad;
    tap_ok(db_ctx_create(&bad, (db_device)7, 1, &err) == -1 && bad == NULL, "an unknown device is refused: %s",
           err.msg);
    return tap_done();
}
