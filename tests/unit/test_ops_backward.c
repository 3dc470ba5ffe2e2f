/* CPU backward ops (kernels/ops.h) against central finite differences of a
 * double-precision forward written here: for L = sum(out * R), R random,
 *   dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h
 * on up to NSAMP coordinates of every input (all of them for small inputs).
 * The double forward makes the reference independent of the backward's
 * algebra; h = 1e-4 keeps truncation (~h^2) and rounding (~1e-16 L / h) far
 * below the tolerance.  Pass: relative L2 <= 1e-5 per gradient.
 *
 * Each case also checks the conventions: activation gradients are assigned
 * (buffers start as NaN and a second call gives the same bits), parameter
 * gradients accumulate (a second call doubles them), NULL gradient pointers
 * skip that work without changing the others, and the outputs the op
 * guarantees deterministic (all of them) are bit-identical with 1 and 2
 * threads, and at a shape where plain multi-threaded sgemm was not, with 1
 * and 16.  Attention runs both builds of its loops (AVX-512 and portable)
 * and checks they agree bit for bit. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "tap.h"

#define TOL 1e-5
#define FD_H 1e-4
#define NSAMP 128
#define MAXIN 3

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

/* xorshift64*: uniform in [-1, 1) */
static float urand(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545f4914f6cdd1dull;
    return (float)((double)(r >> 40) / (double)(1ull << 23) - 1.0);
}

/* ---- a problem: inputs, sizes, a double forward and a float backward ------- */

typedef struct prob prob;
/* out (nout) = the op's forward in double on x[] */
typedef void (*fwd_fn)(const prob *p, double *out);
/* The op's backward on xf[]: runs the float forward for what it saves, then
 * the backward with dout = R; g[k] is the gradient of input k, NULL = skip. */
typedef int (*bwd_fn)(db_ctx *c, const prob *p, float *g[MAXIN]);

struct prob {
    const char *name;
    int nin;
    size_t n[MAXIN];      /* input sizes */
    int param[MAXIN];     /* 1: parameter gradient (+=); 0: activation gradient (=) */
    int det[MAXIN];       /* 1: bit-identical at any thread count is promised */
    int fd[MAXIN];        /* 1: check against finite differences (0: no gradient, e.g. tokens) */
    float *xf[MAXIN];     /* inputs */
    double *x[MAXIN];     /* the same, in double (perturbed by the FD loop) */
    size_t nout;
    float *Rf;            /* dout */
    int s[12];            /* sizes, per op */
    float alpha;
    const int32_t *tokens;
    fwd_fn fwd;
    bwd_fn bwd;
    int assign;           /* the op's assign (ops.h), for the ops that take one */
    int has_assign;       /* 1: the op takes it */
};

static double loss(const prob *p, double *out)
{
    p->fwd(p, out);
    double L = 0;
    for (size_t i = 0; i < p->nout; i++)
        L += out[i] * p->Rf[i];
    return L;
}

static void prob_init(prob *p)
{
    for (int k = 0; k < p->nin; k++) {
        p->xf[k] = malloc(p->n[k] * sizeof(float));
        p->x[k] = malloc(p->n[k] * sizeof(double));
        for (size_t i = 0; i < p->n[k]; i++)
            p->x[k][i] = p->xf[k][i] = urand();
    }
    p->Rf = malloc(p->nout * sizeof(float));
    for (size_t i = 0; i < p->nout; i++)
        p->Rf[i] = urand();
}

static void prob_free(prob *p)
{
    for (int k = 0; k < p->nin; k++) {
        free(p->xf[k]);
        free(p->x[k]);
    }
    free(p->Rf);
}

/* Fresh gradient buffers: zeros for parameters, NaN for activations (an
 * assigned gradient must overwrite it); only for inputs in mask. */
static void grads_alloc(const prob *p, float *g[MAXIN], unsigned mask)
{
    for (int k = 0; k < MAXIN; k++) {
        g[k] = NULL;
        if (k >= p->nin || !(mask >> k & 1))
            continue;
        g[k] = malloc(p->n[k] * sizeof(float));
        for (size_t i = 0; i < p->n[k]; i++)
            g[k][i] = p->param[k] ? 0.0f : NAN;
    }
}

static void grads_free(float *g[MAXIN])
{
    for (int k = 0; k < MAXIN; k++)
        free(g[k]);
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof *a) == 0; }

static double worst_fd = 0; /* the largest relative error seen, for the summary */

/* g against finite differences on a sample of input k's coordinates. */
static void check_fd(const prob *p, int k, const float *g)
{
    const size_t n = p->n[k], ns = n < NSAMP ? n : NSAMP;
    double *out = malloc(p->nout * sizeof *out);
    double num = 0, den = 0, worst = -1;
    size_t wi = 0;
    double wref = 0;
    for (size_t s = 0; s < ns; s++) {
        /* all coordinates, or a scattered sample (an even stride can alias
         * with the tensor's row length and miss whole columns) */
        const size_t i = ns == n ? s : (size_t)((s * 2654435761ull + 12345) % n);
        const double x0 = p->x[k][i];
        p->x[k][i] = x0 + FD_H;
        const double lp = loss(p, out);
        p->x[k][i] = x0 - FD_H;
        const double lm = loss(p, out);
        p->x[k][i] = x0;
        const double ref = (lp - lm) / (2 * FD_H), d = (double)g[i] - ref;
        num += d * d;
        den += ref * ref;
        if (!(fabs(d) <= worst)) {
            worst = isnan(d) ? INFINITY : fabs(d);
            wi = i;
            wref = ref;
        }
    }
    free(out);
    const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (!(rel <= worst_fd))
        worst_fd = rel;
    if (!tap_ok(rel <= TOL, "%s: d(input %d) vs finite differences (%zu of %zu): rel L2 %.2e", p->name, k, ns, n,
                rel))
        tap_diag("worst element %zu: got %.9g want %.9g", wi, g[wi], wref);
}

/* The whole battery for one problem.  c1 has 1 thread, c2 2 threads. */
static void run_case(db_ctx *c1, db_ctx *c2, prob *p)
{
    const unsigned all = (1u << p->nin) - 1;
    float *g1[MAXIN], *g2[MAXIN];
    grads_alloc(p, g1, all);
    if (!tap_ok(p->bwd(c1, p, g1) == 0, "%s: backward runs (%s)", p->name, c1->err.msg)) {
        db_ctx_clear_error(c1);
        grads_free(g1);
        return;
    }
    for (int k = 0; k < p->nin; k++)
        if (p->fd[k])
            check_fd(p, k, g1[k]);

    /* second call into the same buffers: parameters double, activations repeat */
    float *first[MAXIN] = {0};
    for (int k = 0; k < p->nin; k++) {
        first[k] = malloc(p->n[k] * sizeof(float));
        memcpy(first[k], g1[k], p->n[k] * sizeof(float));
    }
    p->bwd(c1, p, g1);
    int conv_ok = 1;
    for (int k = 0; k < p->nin; k++) {
        if (p->param[k]) {
            double num = 0, den = 0;
            for (size_t i = 0; i < p->n[k]; i++) {
                const double d = (double)g1[k][i] - 2.0 * first[k][i];
                num += d * d;
                den += 4.0 * first[k][i] * first[k][i];
            }
            conv_ok &= num <= 1e-12 * den; /* rel 1e-6: sgemm's beta = 1 may round differently */
        } else {
            conv_ok &= same_bits(g1[k], first[k], p->n[k]);
        }
    }
    tap_ok(conv_ok, "%s: second call: parameter gradients doubled, activation gradients assigned", p->name);

    /* assign: parameter gradients written over whatever they held (NaN
     * here) with the first call's bits (its += into zeros) */
    if (p->has_assign) {
        grads_alloc(p, g2, all);
        for (int k = 0; k < p->nin; k++)
            for (size_t i = 0; p->param[k] && i < p->n[k]; i++)
                g2[k][i] = NAN;
        p->assign = 1;
        int as_ok = p->bwd(c1, p, g2) == 0;
        p->assign = 0;
        for (int k = 0; k < p->nin; k++)
            as_ok &= same_bits(g2[k], first[k], p->n[k]);
        tap_ok(as_ok, "%s: assign: parameter gradients written (over NaN) with the bits of += into zeros", p->name);
        grads_free(g2);
    }

    /* NULL pointers: each gradient alone, the rest skipped, gives the same bits */
    if (p->nin > 1) {
        int null_ok = 1;
        for (int k = 0; k < p->nin; k++) {
            grads_alloc(p, g2, 1u << k);
            null_ok &= p->bwd(c1, p, g2) == 0 && same_bits(g2[k], first[k], p->n[k]);
            grads_free(g2);
        }
        tap_ok(null_ok, "%s: NULL gradient pointers skip their work, the others unchanged", p->name);
    }

    /* 2 threads: the promised outputs bit-identical */
    grads_alloc(p, g2, all);
    if (p->bwd(c2, p, g2) == 0) {
        int det_ok = 1, ndet = 0;
        for (int k = 0; k < p->nin; k++)
            if (p->det[k]) {
                ndet++;
                det_ok &= same_bits(g2[k], first[k], p->n[k]);
            }
        if (ndet)
            tap_ok(det_ok, "%s: 1 vs 2 threads: bit-identical (%d of %d gradients promised)", p->name, ndet, p->nin);
    } else {
        tap_ok(0, "%s: backward on 2 threads: %s", p->name, c2->err.msg);
        db_ctx_clear_error(c2);
    }
    grads_free(g2);
    for (int k = 0; k < p->nin; k++)
        free(first[k]);
    grads_free(g1);
}

/* ---- linear and gemm ------------------------------------------------------- */

static void fwd_linear(const prob *p, double *out)
{
    const int N = p->s[0], C = p->s[1], OC = p->s[2];
    for (int r = 0; r < N; r++)
        for (int o = 0; o < OC; o++) {
            double s = p->x[2][o];
            for (int i = 0; i < C; i++)
                s += p->x[0][(size_t)r * C + i] * p->x[1][(size_t)o * C + i];
            out[(size_t)r * OC + o] = s;
        }
}

static int bwd_linear(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_linear_backward(c, g[0], g[1], g[2], p->Rf, p->xf[0], p->xf[1], p->s[0], p->s[1], p->s[2],
                              p->assign);
}

static void test_linear(db_ctx *c1, db_ctx *c2)
{
    const int shapes[][3] = {{7, 13, 5}, {130, 20, 260}}; /* the second: several output tiles */
    for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
        const int N = shapes[t][0], C = shapes[t][1], OC = shapes[t][2];
        prob p = {.name = "linear", .has_assign = 1, .nin = 3, .n = {(size_t)N * C, (size_t)OC * C, (size_t)OC},
                  .param = {0, 1, 1}, .det = {1, 1, 1}, .fd = {1, 1, 1}, .nout = (size_t)N * OC,
                  .s = {N, C, OC}, .fwd = fwd_linear, .bwd = bwd_linear};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
}

static double mat(const double *X, int b, int rows, int cols, int r, int col, int trans)
{
    /* element (r, col) of op(X[b]), X[b] stored (rows, cols) or (cols, rows) when trans */
    const double *m = X + (size_t)b * rows * cols;
    return trans ? m[(size_t)col * rows + r] : m[(size_t)r * cols + col];
}

static void fwd_gemm(const prob *p, double *out)
{
    const int batch = p->s[0], M = p->s[1], N = p->s[2], K = p->s[3], ta = p->s[4], tb = p->s[5];
    for (int b = 0; b < batch; b++)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0;
                for (int k = 0; k < K; k++)
                    s += mat(p->x[0], b, M, K, i, k, ta) * mat(p->x[1], b, K, N, k, j, tb);
                out[((size_t)b * M + i) * N + j] = p->alpha * s;
            }
}

static int bwd_gemm(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_gemm_backward(c, g[0], g[1], p->Rf, p->xf[0], p->xf[1], p->s[0], p->s[1], p->s[2], p->s[3], p->s[4],
                            p->s[5], p->alpha);
}

static void test_gemm(db_ctx *c1, db_ctx *c2)
{
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            const int batch = 3, M = 9, N = 11, K = 7;
            prob p = {.name = ta ? (tb ? "gemm TT" : "gemm TN") : (tb ? "gemm NT" : "gemm NN"), .nin = 2,
                      .n = {(size_t)batch * M * K, (size_t)batch * K * N}, .det = {1, 1}, .fd = {1, 1},
                      .nout = (size_t)batch * M * N,
                      .s = {batch, M, N, K, ta, tb}, .alpha = 0.7f, .fwd = fwd_gemm, .bwd = bwd_gemm};
            prob_init(&p);
            run_case(c1, c2, &p);
            prob_free(&p);
        }
}

/* ---- conv2d ------------------------------------------------------------------ */

static void fwd_conv(const prob *p, double *out)
{
    const int B = p->s[0], C = p->s[1], H = p->s[2], W = p->s[3], OC = p->s[4], KH = p->s[5], KW = p->s[6];
    const int stride = p->s[7], pad0 = p->s[8], pad1 = p->s[9];
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    for (int b = 0; b < B; b++)
        for (int o = 0; o < OC; o++)
            for (int y = 0; y < OH; y++)
                for (int x = 0; x < OW; x++) {
                    double s = p->x[2][o];
                    for (int ci = 0; ci < C; ci++)
                        for (int ky = 0; ky < KH; ky++)
                            for (int kx = 0; kx < KW; kx++) {
                                const int iy = y * stride + ky - pad0, ix = x * stride + kx - pad0;
                                if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                                    s += p->x[0][(((size_t)b * C + ci) * H + iy) * W + ix] *
                                         p->x[1][(((size_t)o * C + ci) * KH + ky) * KW + kx];
                            }
                    out[(((size_t)b * OC + o) * OH + y) * OW + x] = s;
                }
}

static int bwd_conv(db_ctx *c, const prob *p, float *g[MAXIN])
{
    const int *s = p->s;
    return db_conv2d_backward(c, g[0], g[1], g[2], p->Rf, p->xf[0], p->xf[1], s[0], s[1], s[2], s[3], s[4], s[5],
                              s[6], s[7], s[8], s[9], p->assign);
}

static void test_conv(db_ctx *c1, db_ctx *c2)
{
    /* B, C, H, W, OC, KH, KW, stride, pad0, pad1 */
    const int shapes[][10] = {
        {2, 3, 7, 6, 4, 3, 3, 1, 1, 1}, /* ResBlock conv */
        {2, 3, 9, 8, 5, 3, 3, 2, 0, 1}, /* VAE downsampler: stride 2, asymmetric pad */
        {1, 4, 8, 8, 3, 3, 3, 2, 1, 1}, /* UNet downsampler */
        {2, 5, 4, 5, 6, 1, 1, 1, 0, 0}, /* 1x1: the direct GEMM path */
        {1, 2, 6, 7, 3, 2, 3, 3, 1, 0}, /* rectangular kernel, stride 3, rows left unread */
    };
    for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
        const int *s = shapes[t];
        const int OH = (s[2] + s[8] + s[9] - s[5]) / s[7] + 1, OW = (s[3] + s[8] + s[9] - s[6]) / s[7] + 1;
        prob p = {.name = "conv2d", .has_assign = 1, .nin = 3,
                  .n = {(size_t)s[0] * s[1] * s[2] * s[3], (size_t)s[4] * s[1] * s[5] * s[6], (size_t)s[4]},
                  .param = {0, 1, 1}, .det = {1, 1, 1}, .fd = {1, 1, 1}, .nout = (size_t)s[0] * s[4] * OH * OW,
                  .fwd = fwd_conv, .bwd = bwd_conv};
        memcpy(p.s, s, sizeof shapes[0]);
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
}

/* ---- norms and softmax ------------------------------------------------------ */

#define EPS 1e-5f

static void fwd_groupnorm(const prob *p, double *out)
{
    const int B = p->s[0], C = p->s[1], HW = p->s[2], G = p->s[3], silu = p->s[4], cg = C / G;
    const size_t n = (size_t)cg * HW;
    for (int bg = 0; bg < B * G; bg++) {
        const double *x = p->x[0] + bg * n;
        double mu = 0, var = 0;
        for (size_t i = 0; i < n; i++)
            mu += x[i];
        mu /= (double)n;
        for (size_t i = 0; i < n; i++)
            var += (x[i] - mu) * (x[i] - mu);
        const double rs = 1 / sqrt(var / (double)n + EPS);
        for (size_t i = 0; i < n; i++) {
            const int cc = (bg % G) * cg + (int)(i / HW);
            const double y = (x[i] - mu) * rs * p->x[1][cc] + p->x[2][cc];
            out[bg * n + i] = silu ? y / (1 + exp(-y)) : y;
        }
    }
}

static int bwd_groupnorm(db_ctx *c, const prob *p, float *g[MAXIN])
{
    const int B = p->s[0], C = p->s[1], HW = p->s[2], G = p->s[3], silu = p->s[4];
    float *out = malloc(p->nout * sizeof *out);
    float *mean = malloc(B * G * sizeof *mean), *rstd = malloc(B * G * sizeof *rstd);
    int r = db_groupnorm_forward(c, out, mean, rstd, p->xf[0], p->xf[1], p->xf[2], B, C, HW, G, EPS, silu);
    if (r == 0)
        r = db_groupnorm_backward(c, g[0], g[1], g[2], p->Rf, mean, rstd, p->xf[0], p->xf[1], p->xf[2], B, C, HW, G,
                                  silu, p->assign);
    free(out);
    free(mean);
    free(rstd);
    return r;
}

static void test_groupnorm(db_ctx *c1, db_ctx *c2)
{
    /* B, C, HW, G, silu */
    const int shapes[][5] = {{2, 8, 15, 4, 0}, {2, 8, 15, 4, 1}, {3, 6, 7, 3, 1}, {1, 4, 9, 1, 0}};
    for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
        const int *s = shapes[t];
        const size_t n = (size_t)s[0] * s[1] * s[2];
        prob p = {.name = s[4] ? "groupnorm+silu" : "groupnorm", .has_assign = 1, .nin = 3, .n = {n, (size_t)s[1], (size_t)s[1]},
                  .param = {0, 1, 1}, .det = {1, 1, 1}, .fd = {1, 1, 1}, .nout = n, .fwd = fwd_groupnorm,
                  .bwd = bwd_groupnorm};
        memcpy(p.s, s, sizeof shapes[0]);
        prob_init(&p);
        for (size_t i = 0; i < n; i++) /* an offset and a spread the statistics must see through */
            p.x[0][i] = p.xf[0][i] = p.xf[0][i] * 3.0f + 0.5f;
        run_case(c1, c2, &p);
        prob_free(&p);
    }
}

static void fwd_layernorm(const prob *p, double *out)
{
    const int N = p->s[0], C = p->s[1];
    for (int r = 0; r < N; r++) {
        const double *x = p->x[0] + (size_t)r * C;
        double mu = 0, var = 0;
        for (int i = 0; i < C; i++)
            mu += x[i];
        mu /= C;
        for (int i = 0; i < C; i++)
            var += (x[i] - mu) * (x[i] - mu);
        const double rs = 1 / sqrt(var / C + EPS);
        for (int i = 0; i < C; i++)
            out[(size_t)r * C + i] = (x[i] - mu) * rs * p->x[1][i] + p->x[2][i];
    }
}

static int bwd_layernorm(db_ctx *c, const prob *p, float *g[MAXIN])
{
    const int N = p->s[0], C = p->s[1];
    float *out = malloc(p->nout * sizeof *out), *mean = malloc(N * sizeof *mean), *rstd = malloc(N * sizeof *rstd);
    int r = db_layernorm_forward(c, out, mean, rstd, p->xf[0], p->xf[1], p->xf[2], N, C, EPS);
    if (r == 0)
        r = db_layernorm_backward(c, g[0], g[1], g[2], p->Rf, mean, rstd, p->xf[0], p->xf[1], N, C, p->assign);
    free(out);
    free(mean);
    free(rstd);
    return r;
}

static void test_layernorm(db_ctx *c1, db_ctx *c2)
{
    const int shapes[][2] = {{5, 7}, {33, 150}};
    for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
        const int N = shapes[t][0], C = shapes[t][1];
        prob p = {.name = "layernorm", .has_assign = 1, .nin = 3, .n = {(size_t)N * C, (size_t)C, (size_t)C}, .param = {0, 1, 1},
                  .det = {1, 1, 1}, .fd = {1, 1, 1}, .nout = (size_t)N * C, .s = {N, C}, .fwd = fwd_layernorm,
                  .bwd = bwd_layernorm};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
}

static void fwd_softmax(const prob *p, double *out)
{
    const int N = p->s[0], C = p->s[1];
    for (int r = 0; r < N; r++) {
        const double *x = p->x[0] + (size_t)r * C;
        double mx = -INFINITY, sum = 0;
        for (int i = 0; i < C; i++)
            mx = fmax(mx, x[i]);
        for (int i = 0; i < C; i++)
            sum += exp(x[i] - mx);
        for (int i = 0; i < C; i++)
            out[(size_t)r * C + i] = exp(x[i] - mx) / sum;
    }
}

static int bwd_softmax(db_ctx *c, const prob *p, float *g[MAXIN])
{
    float *out = malloc(p->nout * sizeof *out);
    int r = db_softmax_forward(c, out, p->xf[0], p->s[0], p->s[1]);
    if (r == 0)
        r = db_softmax_backward(c, g[0], p->Rf, out, p->s[0], p->s[1]);
    free(out);
    return r;
}

static void test_softmax(db_ctx *c1, db_ctx *c2)
{
    const int N = 6, C = 37;
    prob p = {.name = "softmax", .nin = 1, .n = {(size_t)N * C}, .det = {1}, .fd = {1}, .nout = (size_t)N * C,
              .s = {N, C}, .fwd = fwd_softmax, .bwd = bwd_softmax};
    prob_init(&p);
    for (size_t i = 0; i < p.n[0]; i++)
        p.x[0][i] = p.xf[0][i] = p.xf[0][i] * 4.0f;
    run_case(c1, c2, &p);
    prob_free(&p);
}

/* ---- attention -------------------------------------------------------------- */

static void fwd_attention(const prob *p, double *out)
{
    const int B = p->s[0], Tq = p->s[1], Tk = p->s[2], NH = p->s[3], HS = p->s[4], causal = p->s[5];
    const size_t C = (size_t)NH * HS;
    double *sc = malloc((size_t)Tk * sizeof *sc);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < Tq; i++) {
                const double *qi = p->x[0] + ((size_t)b * Tq + i) * C + (size_t)h * HS;
                const int nk = causal && i + 1 < Tk ? i + 1 : Tk;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < nk; j++) {
                    const double *kj = p->x[1] + ((size_t)b * Tk + j) * C + (size_t)h * HS;
                    double s = 0;
                    for (int d = 0; d < HS; d++)
                        s += qi[d] * kj[d];
                    sc[j] = s / sqrt((double)HS);
                    mx = fmax(mx, sc[j]);
                }
                for (int j = 0; j < nk; j++)
                    sum += sc[j] = exp(sc[j] - mx);
                double *o = out + ((size_t)b * Tq + i) * C + (size_t)h * HS;
                for (int d = 0; d < HS; d++) {
                    double s = 0;
                    for (int j = 0; j < nk; j++)
                        s += sc[j] * p->x[2][((size_t)b * Tk + j) * C + (size_t)h * HS + d];
                    o[d] = s / sum;
                }
            }
    free(sc);
}

static int bwd_attention(db_ctx *c, const prob *p, float *g[MAXIN])
{
    const int B = p->s[0], Tq = p->s[1], Tk = p->s[2], NH = p->s[3], HS = p->s[4], causal = p->s[5];
    float *out = malloc(p->nout * sizeof *out), *lse = malloc((size_t)B * NH * Tq * sizeof *lse);
    int r = db_attention_forward(c, out, lse, p->xf[0], p->xf[1], p->xf[2], B, Tq, Tk, NH, HS, causal);
    if (r == 0)
        r = db_attention_backward(c, g[0], g[1], g[2], p->Rf, out, lse, p->xf[0], p->xf[1], p->xf[2], B, Tq, Tk, NH,
                                  HS, causal);
    free(out);
    free(lse);
    return r;
}

static void test_attention(db_ctx *c1, db_ctx *c2)
{
    /* B, Tq, Tk, NH, HS, causal */
    const int shapes[][6] = {
        {2, 13, 13, 2, 8, 0},  /* self-attention */
        {1, 50, 77, 2, 40, 0}, /* cross-attention, SD head size, a partial query block */
        {2, 9, 9, 3, 8, 1},    /* CLIP: causal */
        {1, 37, 6, 2, 8, 1},   /* causal, Tq > Tk: later query blocks see every key */
        {1, 5, 12, 1, 40, 1},  /* causal, Tq < Tk */
    };
    /* the AVX-512 build of the loops (when the CPU has it), then the portable one */
    const int has_simd = c1->simd;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !has_simd)
            break;
        c1->simd = c2->simd = pass == 0 ? has_simd : 0;
        for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
            const int *s = shapes[t];
            const size_t nq = (size_t)s[0] * s[1] * s[3] * s[4], nk = (size_t)s[0] * s[2] * s[3] * s[4];
            char name[64];
            snprintf(name, sizeof name, "attention%s [%s]", s[5] ? " causal" : "", c1->simd ? "avx512" : "portable");
            prob p = {.name = name, .nin = 3, .n = {nq, nk, nk}, .det = {1, 1, 1}, .fd = {1, 1, 1}, .nout = nq,
                      .fwd = fwd_attention, .bwd = bwd_attention};
            memcpy(p.s, s, sizeof shapes[0]);
            prob_init(&p);
            for (size_t i = 0; i < nq; i++) /* scores of a few units: a peaked softmax */
                p.x[0][i] = p.xf[0][i] = p.xf[0][i] * 2.0f;
            run_case(c1, c2, &p);
            prob_free(&p);
        }
    }
    c1->simd = c2->simd = has_simd;
    if (!has_simd)
        return;
    /* the two builds of the loops agree bit for bit (one forward for both) */
    const int B = 2, Tq = 21, Tk = 30, NH = 3, HS = 40;
    const size_t nq = (size_t)B * Tq * NH * HS, nk = (size_t)B * Tk * NH * HS;
    float *buf = malloc((3 * nq + 2 * nk + 6 * nk + (size_t)B * NH * Tq) * sizeof *buf);
    for (size_t i = 0; i < 3 * nq + 2 * nk; i++)
        buf[i] = urand();
    float *q = buf, *dout = q + nq, *out = dout + nq, *k = out + nq, *v = k + nk, *g = v + nk, *lse = g + 6 * nk;
    float *ga[3] = {g, g + nk, g + 2 * nk}, *gp[3] = {g + 3 * nk, g + 4 * nk, g + 5 * nk}; /* dq fits: Tq < Tk */
    int ok = db_attention_forward(c1, out, lse, q, k, v, B, Tq, Tk, NH, HS, 1) == 0;
    ok &= db_attention_backward(c1, ga[0], ga[1], ga[2], dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, 1) == 0;
    c1->simd = 0;
    ok &= db_attention_backward(c1, gp[0], gp[1], gp[2], dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, 1) == 0;
    c1->simd = has_simd;
    ok &= same_bits(ga[0], gp[0], nq) && same_bits(ga[1], gp[1], nk) && same_bits(ga[2], gp[2], nk);
    tap_ok(ok, "attention backward: AVX-512 and portable builds bit-identical");
    free(buf);
}

/* ---- activations and elementwise ------------------------------------------ */

static double act_d(int kind, double x)
{
    switch (kind) {
    case 0:
        return x / (1 + exp(-x));
    case 1:
        return 0.5 * x * (1 + erf(x / sqrt(2.0)));
    case 2:
        return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    default:
        return x / (1 + exp(-1.702 * x));
    }
}

static void fwd_act(const prob *p, double *out)
{
    for (size_t i = 0; i < p->nout; i++)
        out[i] = act_d(p->s[0], p->x[0][i]);
}

static int bwd_act(db_ctx *c, const prob *p, float *g[MAXIN])
{
    switch (p->s[0]) {
    case 0:
        return db_silu_backward(c, g[0], p->Rf, p->xf[0], p->nout);
    case 1:
        return db_gelu_backward(c, g[0], p->Rf, p->xf[0], p->nout, DB_GELU_ERF);
    case 2:
        return db_gelu_backward(c, g[0], p->Rf, p->xf[0], p->nout, DB_GELU_TANH);
    default:
        return db_quick_gelu_backward(c, g[0], p->Rf, p->xf[0], p->nout);
    }
}

static void fwd_geglu(const prob *p, double *out)
{
    const int N = p->s[0], C = p->s[1];
    for (int r = 0; r < N; r++)
        for (int i = 0; i < C; i++)
            out[(size_t)r * C + i] = p->x[0][(size_t)r * 2 * C + i] * act_d(1, p->x[0][(size_t)r * 2 * C + C + i]);
}

static int bwd_geglu(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_geglu_backward(c, g[0], p->Rf, p->xf[0], p->s[0], p->s[1]);
}

static void fwd_mul(const prob *p, double *out)
{
    for (size_t i = 0; i < p->nout; i++)
        out[i] = p->x[0][i] * p->x[1][i];
}

static int bwd_mul(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_mul_backward(c, g[0], g[1], p->Rf, p->xf[0], p->xf[1], p->nout);
}

static void fwd_add_channel(const prob *p, double *out) /* inp fixed at 0: the gradient is dvec's */
{
    const int BC = p->s[0] * p->s[1], HW = p->s[2];
    for (int bc = 0; bc < BC; bc++)
        for (int i = 0; i < HW; i++)
            out[(size_t)bc * HW + i] = p->x[0][bc];
}

static int bwd_add_channel(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_add_channel_backward(c, g[0], p->Rf, p->s[0], p->s[1], p->s[2]);
}

static void fwd_concat(const prob *p, double *out)
{
    const int B = p->s[0], C1 = p->s[1], C2 = p->s[2], HW = p->s[3];
    for (int b = 0; b < B; b++) {
        memcpy(out + (size_t)b * (C1 + C2) * HW, p->x[0] + (size_t)b * C1 * HW, (size_t)C1 * HW * sizeof *out);
        memcpy(out + ((size_t)b * (C1 + C2) + C1) * HW, p->x[1] + (size_t)b * C2 * HW, (size_t)C2 * HW * sizeof *out);
    }
}

static int bwd_concat(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_concat_channels_backward(c, g[0], g[1], p->Rf, p->s[0], p->s[1], p->s[2], p->s[3]);
}

static void fwd_upsample(const prob *p, double *out)
{
    const int BC = p->s[0] * p->s[1], H = p->s[2], W = p->s[3];
    for (int bc = 0; bc < BC; bc++)
        for (int y = 0; y < 2 * H; y++)
            for (int x = 0; x < 2 * W; x++)
                out[((size_t)bc * 2 * H + y) * 2 * W + x] = p->x[0][((size_t)bc * H + y / 2) * W + x / 2];
}

static int bwd_upsample(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_upsample_nearest2x_backward(c, g[0], p->Rf, p->s[0], p->s[1], p->s[2], p->s[3]);
}

static void fwd_embedding(const prob *p, double *out)
{
    const int B = p->s[0], T = p->s[1], C = p->s[2];
    for (int i = 0; i < B * T; i++)
        for (int j = 0; j < C; j++)
            out[(size_t)i * C + j] = p->x[0][(size_t)p->tokens[i] * C + j] + p->x[1][(size_t)(i % T) * C + j];
}

static int bwd_embedding(db_ctx *c, const prob *p, float *g[MAXIN])
{
    return db_embedding_backward(c, g[0], g[1], p->Rf, p->tokens, p->s[0], p->s[1], p->s[2], p->s[3]);
}

static void test_elementwise(db_ctx *c1, db_ctx *c2)
{
    static const char *names[] = {"silu", "gelu erf", "gelu tanh", "quick_gelu"};
    for (int kind = 0; kind < 4; kind++) {
        prob p = {.name = names[kind], .nin = 1, .n = {1001}, .det = {1}, .fd = {1}, .nout = 1001, .s = {kind},
                  .fwd = fwd_act, .bwd = bwd_act};
        prob_init(&p);
        for (size_t i = 0; i < p.n[0]; i++) /* the whole interesting range, tails included */
            p.x[0][i] = p.xf[0][i] = p.xf[0][i] * 6.0f;
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        const int N = 5, C = 19;
        prob p = {.name = "geglu", .nin = 1, .n = {(size_t)N * 2 * C}, .det = {1}, .fd = {1}, .nout = (size_t)N * C,
                  .s = {N, C}, .fwd = fwd_geglu, .bwd = bwd_geglu};
        prob_init(&p);
        for (size_t i = 0; i < p.n[0]; i++)
            p.x[0][i] = p.xf[0][i] = p.xf[0][i] * 3.0f;
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        prob p = {.name = "mul", .nin = 2, .n = {333, 333}, .det = {1, 1}, .fd = {1, 1}, .nout = 333,
                  .fwd = fwd_mul, .bwd = bwd_mul};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        const int B = 2, C = 5, HW = 37;
        prob p = {.name = "add_channel", .nin = 1, .n = {(size_t)B * C}, .det = {1}, .fd = {1},
                  .nout = (size_t)B * C * HW, .s = {B, C, HW}, .fwd = fwd_add_channel, .bwd = bwd_add_channel};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        const int B = 2, C1 = 3, C2 = 5, HW = 7;
        prob p = {.name = "concat_channels", .nin = 2, .n = {(size_t)B * C1 * HW, (size_t)B * C2 * HW},
                  .det = {1, 1}, .fd = {1, 1}, .nout = (size_t)B * (C1 + C2) * HW, .s = {B, C1, C2, HW},
                  .fwd = fwd_concat, .bwd = bwd_concat};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        const int B = 2, C = 3, H = 3, W = 5;
        prob p = {.name = "upsample_nearest2x", .nin = 1, .n = {(size_t)B * C * H * W}, .det = {1}, .fd = {1},
                  .nout = (size_t)B * C * 4 * H * W, .s = {B, C, H, W}, .fwd = fwd_upsample, .bwd = bwd_upsample};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
    {
        /* repeated token ids must add up; C > 64 spans two column blocks */
        const int B = 2, T = 6, C = 70, V = 9, maxT = 8;
        static const int32_t tokens[] = {3, 1, 3, 3, 8, 0, 1, 1, 2, 3, 8, 5};
        prob p = {.name = "embedding", .nin = 2, .n = {(size_t)V * C, (size_t)maxT * C}, .param = {1, 1},
                  .det = {1, 1}, .fd = {1, 1}, .nout = (size_t)B * T * C, .s = {B, T, C, V}, .tokens = tokens,
                  .fwd = fwd_embedding, .bwd = bwd_embedding};
        prob_init(&p);
        run_case(c1, c2, &p);
        prob_free(&p);
    }
}

/* Linear at CLIP's MLP shape (77 tokens, 3072 -> 768), where oneDNN's
 * multi-threaded sgemm gave different bits at 1 and 16 threads: the fixed
 * tiles must not.  c1 runs once before the 16-thread ctx exists and once
 * after it has raised the process-wide OpenMP count (a 1-thread region is
 * inactive, so oneDNN would see 16). */
static void test_sgemm_threads(db_ctx *c1)
{
    const int N = 77, C = 768, OC = 3072;
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C;
    float *x = malloc(nx * sizeof *x), *w = malloc(nw * sizeof *w), *dy = malloc((size_t)N * OC * sizeof *dy);
    float *g = calloc(3 * (nx + nw), sizeof *g);
    for (size_t i = 0; i < nx; i++)
        x[i] = urand();
    for (size_t i = 0; i < nw; i++)
        w[i] = urand();
    for (size_t i = 0; i < (size_t)N * OC; i++)
        dy[i] = urand();
    float *dx[3], *dw[3];
    for (int r = 0; r < 3; r++) {
        dx[r] = g + r * (nx + nw);
        dw[r] = dx[r] + nx;
    }
    int ok = db_linear_backward(c1, dx[0], dw[0], NULL, dy, x, w, N, C, OC, 0) == 0;
    db_ctx *c16;
    db_err err = {0};
    if (tap_ok(db_ctx_create(&c16, DB_CPU, 16, &err) == 0, "cpu context with 16 threads")) {
        ok &= db_linear_backward(c16, dx[1], dw[1], NULL, dy, x, w, N, C, OC, 0) == 0;
        ok &= db_linear_backward(c1, dx[2], dw[2], NULL, dy, x, w, N, C, OC, 0) == 0;
        for (int r = 1; r < 3; r++)
            ok &= same_bits(dx[0], dx[r], nx) && same_bits(dw[0], dw[r], nw);
        tap_ok(ok, "linear backward 77 x 3072 -> 768: 1 vs 16 threads bit-identical");
        db_ctx_destroy(c16);
    }
    free(x);
    free(w);
    free(dy);
    free(g);
}

/* ---- errors ------------------------------------------------------------------ */

static void test_errors(db_ctx *c)
{
    float dout[4] = {0}, dw[8] = {0};
    const int32_t bad[2] = {0, 9};
    tap_ok(db_embedding_backward(c, dw, NULL, dout, bad, 1, 2, 2, 4) == -1 && c->err.code == DB_EFORMAT,
           "embedding backward: a token id out of range is an error: %s", c->err.msg);
    tap_ok(db_silu_backward(c, dw, dout, dout, 4) == -1, "the error is sticky");
    db_ctx_clear_error(c);
    tap_ok(db_groupnorm_backward(c, dw, NULL, NULL, dout, dout, dout, dout, dout, dout, 1, 3, 1, 2, 0, 0) == -1 &&
               c->err.code == DB_EUSAGE,
           "groupnorm backward: C %% G != 0 is refused: %s", c->err.msg);
    db_ctx_clear_error(c);
}

int main(void)
{
    db_ctx *c1, *c2;
    db_err err = {0};
    if (!tap_ok(db_ctx_create(&c2, DB_CPU, 2, &err) == 0 && db_ctx_create(&c1, DB_CPU, 1, &err) == 0,
                "cpu contexts with 1 and 2 threads"))
        return tap_done();
    test_linear(c1, c2);
    test_gemm(c1, c2);
    test_conv(c1, c2);
    test_groupnorm(c1, c2);
    test_layernorm(c1, c2);
    test_softmax(c1, c2);
    test_attention(c1, c2);
    test_elementwise(c1, c2);
    test_errors(c1);
    test_sgemm_threads(c1);
    tap_diag("worst relative L2 against finite differences: %.2e", worst_fd);
    db_ctx_destroy(c1);
    db_ctx_destroy(c2);
    return tap_done();
}
