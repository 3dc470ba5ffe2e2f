/* bench_ops: the machine's fp32 GEMM peak, then SD1.5's hot ops at their real
 * shapes, each reported in ms, GFLOP/s and as a fraction of that peak (the
 * peak is measured in the same run, so the ratios survive a noisy machine).
 * Not a test: `make bench` runs it.
 *
 *   bench_ops [threads]       (default: all cores)
 *
 * Times are the best of several runs after a warm-up (first calls build and
 * cache oneDNN primitives). */
#include <math.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *buf(size_t n, float scale)
{
    float *p = aligned_alloc(64, (n * sizeof(float) + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "bench_ops: out of memory\n");
        exit(1);
    }
    uint32_t s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * scale;
    }
    return p;
}

/* One benchmark: a closure over sizes and buffers. */
typedef struct bench {
    const char *name, *shape;
    double flop;  /* per call; 0: report bandwidth instead */
    double bytes; /* moved per call (read + write), for memory-bound ops */
    int (*run)(db_ctx *c, struct bench *b);
    int i[8];
    float *p[6];
} bench;

static double peak = 0;

/* Best of `reps` timed calls after one warm-up, in seconds. */
static double time_best(db_ctx *c, bench *b, int reps)
{
    if (b->run(c, b) != 0) {
        fprintf(stderr, "bench_ops: %s: %s\n", b->name, c->err.msg);
        exit(1);
    }
    double best = INFINITY;
    for (int r = 0; r < reps; r++) {
        double t = now();
        b->run(c, b);
        t = now() - t;
        best = t < best ? t : best;
    }
    return best;
}

static void report(db_ctx *c, bench *b, int reps)
{
    double t = time_best(c, b, reps);
    if (b->flop > 0)
        printf("%-26s %-34s %9.2f ms %8.1f GFLOP/s %6.0f%%\n", b->name, b->shape, t * 1e3, b->flop / t * 1e-9,
               100 * b->flop / t * 1e-9 / peak);
    else
        printf("%-26s %-34s %9.2f ms %8.1f GB/s\n", b->name, b->shape, t * 1e3, b->bytes / t * 1e-9);
    fflush(stdout);
}

static int run_sgemm(db_ctx *c, bench *b)
{
    int n = b->i[0];
    return dnnl_sgemm('N', 'N', n, n, n, 1.0f, b->p[0], n, b->p[1], n, 0.0f, b->p[2], n) == dnnl_success ? 0 : -1;
}
static int run_gemm(db_ctx *c, bench *b)
{
    int n = b->i[0];
    return db_gemm_forward(c, b->p[2], b->p[0], b->p[1], 1, n, n, n, 0, 0, 1.0f, 0.0f);
}
static int run_conv(db_ctx *c, bench *b)
{
    int *i = b->i; /* B, C, H, OC, K, stride, pad */
    return db_conv2d_forward(c, b->p[2], b->p[0], b->p[1], b->p[3], i[0], i[1], i[2], i[2], i[3], i[4], i[4], i[5],
                             i[6], i[6]);
}
static int run_attn(db_ctx *c, bench *b)
{
    int *i = b->i; /* B, Tq, Tk, NH, HS */
    return db_attention_forward(c, b->p[3], NULL, b->p[0], b->p[1], b->p[2], i[0], i[1], i[2], i[3], i[4], 0);
}
static int run_linear(db_ctx *c, bench *b)
{
    return db_linear_forward(c, b->p[2], b->p[0], b->p[1], b->p[3], b->i[0], b->i[1], b->i[2]);
}
/* the transformer's residual after its output projection: two ops, then the fused one */
static int run_linear_then_add(db_ctx *c, bench *b)
{
    const size_t n = (size_t)b->i[0] * b->i[2];
    return db_linear_forward(c, b->p[2], b->p[0], b->p[1], b->p[3], b->i[0], b->i[1], b->i[2]) ||
           db_add_forward(c, b->p[2], b->p[2], b->p[4], n);
}
static int run_linear_add(db_ctx *c, bench *b)
{
    return db_linear_add_forward(c, b->p[2], b->p[0], b->p[1], b->p[3], b->p[4], b->i[0], b->i[1], b->i[2]);
}
/* the feed-forward's projection and GEGLU: two ops, then the fused one */
static int run_linear_then_geglu(db_ctx *c, bench *b)
{
    return db_linear_forward(c, b->p[2], b->p[0], b->p[1], b->p[3], b->i[0], b->i[1], 2 * b->i[2]) ||
           db_geglu_forward(c, b->p[4], b->p[2], b->i[0], b->i[2]);
}
static int run_linear_geglu(db_ctx *c, bench *b)
{
    return db_linear_geglu_forward(c, b->p[2], b->p[4], b->p[0], b->p[1], b->p[3], b->i[0], b->i[1], b->i[2]);
}
/* the Transformer2D's output back to (B, C, HW) plus its input */
static int run_transpose_then_add(db_ctx *c, bench *b)
{
    const size_t n = (size_t)b->i[0] * b->i[1] * b->i[2];
    return db_transpose_forward(c, b->p[1], b->p[0], b->i[0], b->i[1], b->i[2]) ||
           db_add_forward(c, b->p[1], b->p[1], b->p[2], n);
}
static int run_transpose_add(db_ctx *c, bench *b)
{
    return db_transpose_add_forward(c, b->p[1], b->p[0], b->p[2], b->i[0], b->i[1], b->i[2]);
}
static int run_geglu(db_ctx *c, bench *b) { return db_geglu_forward(c, b->p[1], b->p[0], b->i[0], b->i[1]); }
static int run_groupnorm(db_ctx *c, bench *b)
{
    int *i = b->i; /* B, C, HW, silu */
    return db_groupnorm_forward(c, b->p[1], NULL, NULL, b->p[0], b->p[2], b->p[3], i[0], i[1], i[2], 32, 1e-5f, i[3]);
}
static int run_layernorm(db_ctx *c, bench *b)
{
    return db_layernorm_forward(c, b->p[1], NULL, NULL, b->p[0], b->p[2], b->p[3], b->i[0], b->i[1], 1e-5f);
}

static void bench_conv(db_ctx *c, int B, int C, int H, int OC, int K, int stride, int pad, int reps)
{
    int OH = (H + 2 * pad - K) / stride + 1;
    char shape[64];
    snprintf(shape, sizeof shape, "B%d %d->%d %dx%d k%d s%d", B, C, OC, H, H, K, stride);
    bench b = {.name = "conv2d", .shape = shape, .flop = 2.0 * B * OC * OH * OH * C * K * K, .run = run_conv,
               .i = {B, C, H, OC, K, stride, pad}};
    b.p[0] = buf((size_t)B * C * H * H, 1), b.p[1] = buf((size_t)OC * C * K * K, 0.1f);
    b.p[2] = buf((size_t)B * OC * OH * OH, 1), b.p[3] = buf((size_t)OC, 1);
    report(c, &b, reps);
    for (int i = 0; i < 4; i++)
        free(b.p[i]);
}

static void bench_attn(db_ctx *c, const char *name, int B, int Tq, int Tk, int NH, int HS, int reps)
{
    char shape[64];
    snprintf(shape, sizeof shape, "B%d Tq%d Tk%d NH%d HS%d", B, Tq, Tk, NH, HS);
    /* q k^T and p v: 2 * 2 * Tq * Tk * HS per (batch, head) */
    bench b = {.name = name, .shape = shape, .flop = 4.0 * B * NH * Tq * Tk * HS, .run = run_attn,
               .i = {B, Tq, Tk, NH, HS}};
    size_t C = (size_t)NH * HS;
    b.p[0] = buf((size_t)B * Tq * C, 2), b.p[1] = buf((size_t)B * Tk * C, 2), b.p[2] = buf((size_t)B * Tk * C, 1);
    b.p[3] = buf((size_t)B * Tq * C, 1);
    report(c, &b, reps);
    for (int i = 0; i < 4; i++)
        free(b.p[i]);
}

static void bench_linear(db_ctx *c, const char *name, int N, int C, int OC, int reps)
{
    char shape[64];
    snprintf(shape, sizeof shape, "(%d, %d) -> %d + bias", N, C, OC);
    bench b = {.name = name, .shape = shape, .flop = 2.0 * N * C * OC, .run = run_linear, .i = {N, C, OC}};
    b.p[0] = buf((size_t)N * C, 1), b.p[1] = buf((size_t)OC * C, 0.1f), b.p[2] = buf((size_t)N * OC, 1);
    b.p[3] = buf((size_t)OC, 1);
    report(c, &b, reps);
    for (int i = 0; i < 4; i++)
        free(b.p[i]);
}

/* linear + residual: the two ops, then db_linear_add_forward (one pass fewer) */
static void bench_linear_res(db_ctx *c, int N, int C, int OC, int reps)
{
    char shape[64];
    snprintf(shape, sizeof shape, "(%d, %d) -> %d + bias + res", N, C, OC);
    bench b = {.name = "linear, then add", .shape = shape, .flop = 2.0 * N * C * OC, .run = run_linear_then_add,
               .i = {N, C, OC}};
    b.p[0] = buf((size_t)N * C, 1), b.p[1] = buf((size_t)OC * C, 0.1f), b.p[2] = buf((size_t)N * OC, 1);
    b.p[3] = buf((size_t)OC, 1), b.p[4] = buf((size_t)N * OC, 1);
    report(c, &b, reps);
    b.name = "linear_add (fused)", b.run = run_linear_add;
    report(c, &b, reps);
    for (int i = 0; i < 5; i++)
        free(b.p[i]);
}

/* linear (N, C) -> 2FF then GEGLU -> FF: the two ops, then db_linear_geglu_forward */
static void bench_linear_geglu(db_ctx *c, int N, int C, int FF, int reps)
{
    char shape[64];
    snprintf(shape, sizeof shape, "(%d, %d) -> 2x%d + bias, geglu", N, C, FF);
    bench b = {.name = "linear, then geglu", .shape = shape, .flop = 2.0 * N * C * 2 * FF,
               .run = run_linear_then_geglu, .i = {N, C, FF}};
    b.p[0] = buf((size_t)N * C, 1), b.p[1] = buf((size_t)2 * FF * C, 0.1f), b.p[2] = buf((size_t)N * 2 * FF, 1);
    b.p[3] = buf((size_t)2 * FF, 1), b.p[4] = buf((size_t)N * FF, 1);
    report(c, &b, reps);
    b.name = "linear_geglu (fused)", b.run = run_linear_geglu;
    report(c, &b, reps);
    for (int i = 0; i < 5; i++)
        free(b.p[i]);
}

static void bench_transpose_add(db_ctx *c, int B, int HW, int C, int reps)
{
    char shape[64];
    snprintf(shape, sizeof shape, "(%d, %d, %d) -> (%d, %d, %d) + res", B, HW, C, B, C, HW);
    const size_t n = (size_t)B * HW * C;
    /* bytes: read inp and res, write out (the fused op's traffic) */
    bench b = {.name = "transpose, then add", .shape = shape, .bytes = 12.0 * n, .run = run_transpose_then_add,
               .i = {B, HW, C}};
    b.p[0] = buf(n, 1), b.p[1] = buf(n, 1), b.p[2] = buf(n, 1);
    report(c, &b, reps);
    b.name = "transpose_add (fused)", b.run = run_transpose_add;
    report(c, &b, reps);
    for (int i = 0; i < 3; i++)
        free(b.p[i]);
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    db_ctx *c;
    db_err err = {0};
    if (db_ctx_create(&c, DB_CPU, threads, &err) != 0) {
        fprintf(stderr, "bench_ops: %s\n", err.msg);
        return 1;
    }
    printf("bench_ops: %d threads, AVX-512 kernels %s, oneDNN %d.%d.%d\n", c->threads, c->simd ? "on" : "off",
           dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);

    /* Peak: the best of a few large square GEMMs (power-of-two leading
     * dimensions can alias in cache; 3072 and 4032 bracket that). */
    const int sizes[] = {3072, 4032};
    bench pk = {.name = "sgemm (oneDNN, peak)", .run = run_sgemm};
    for (size_t s = 0; s < 2; s++) {
        int n = sizes[s];
        pk.i[0] = n;
        pk.p[0] = buf((size_t)n * n, 1), pk.p[1] = buf((size_t)n * n, 1), pk.p[2] = buf((size_t)n * n, 1);
        double t = time_best(c, &pk, 3), g = 2.0 * n * n * n / t * 1e-9;
        printf("%-26s %-34s %9.2f ms %8.1f GFLOP/s\n", pk.name, n == 3072 ? "3072^3" : "4032^3", t * 1e3, g);
        peak = g > peak ? g : peak;
        if (n == 3072) {
            bench g2 = pk;
            g2.name = "db_gemm_forward";
            g2.shape = "3072^3";
            g2.flop = 2.0 * n * n * n;
            g2.run = run_gemm;
            report(c, &g2, 3);
        }
        for (int i = 0; i < 3; i++)
            free(pk.p[i]);
    }
    printf("peak fp32 GEMM: %.1f GFLOP/s (the %% column is relative to it)\n\n", peak);

    /* UNet convolutions (resnet 3x3 at each level; B2 = classifier-free guidance) */
    bench_conv(c, 1, 320, 64, 320, 3, 1, 1, 5);
    bench_conv(c, 2, 320, 64, 320, 3, 1, 1, 3);
    bench_conv(c, 1, 640, 32, 640, 3, 1, 1, 5);
    bench_conv(c, 1, 1280, 16, 1280, 3, 1, 1, 5);
    bench_conv(c, 2, 1280, 16, 1280, 3, 1, 1, 3);
    bench_conv(c, 1, 1280, 8, 1280, 3, 1, 1, 5);
    bench_conv(c, 1, 320, 64, 320, 3, 2, 1, 5);  /* downsampler */
    bench_conv(c, 1, 320, 64, 320, 1, 1, 0, 5);  /* proj_in / proj_out 1x1 */
    bench_conv(c, 1, 640, 64, 320, 1, 1, 0, 5);  /* skip shortcut 1x1 */
    bench_conv(c, 1, 4, 64, 320, 3, 1, 1, 5);    /* conv_in */
    bench_conv(c, 1, 128, 256, 128, 3, 1, 1, 3); /* VAE decoder at 256^2 */
    printf("\n");

    /* Attention at 64x64 latents: 4096 tokens, 8 heads of 40 */
    bench_attn(c, "attention self", 1, 4096, 4096, 8, 40, 3);
    bench_attn(c, "attention self", 2, 4096, 4096, 8, 40, 2);
    bench_attn(c, "attention cross", 1, 4096, 77, 8, 40, 5);
    bench_attn(c, "attention self", 1, 1024, 1024, 8, 80, 5);
    bench_attn(c, "attention self", 1, 256, 256, 8, 160, 5);
    bench_attn(c, "attention CLIP", 1, 77, 77, 12, 64, 20);
    printf("\n");

    /* Transformer linears at level 1 (4096 tokens of 320) */
    bench_linear(c, "linear GEGLU proj", 4096, 320, 2560, 5);
    bench_linear(c, "linear FF out", 4096, 1280, 320, 5);
    bench_linear(c, "linear q/k/v/out", 4096, 320, 320, 5);
    bench_linear(c, "linear CLIP MLP", 77, 768, 3072, 20);
    bench_linear_res(c, 4096, 320, 320, 9);   /* attention output + residual at level 1 */
    bench_linear_res(c, 4096, 1280, 320, 5);  /* feed-forward output + residual */
    bench_linear_geglu(c, 4096, 320, 1280, 5); /* the feed-forward's projection at level 1 */
    bench_transpose_add(c, 2, 4096, 320, 20);  /* a Transformer2D's output at level 1, batch 2 */
    {
        bench b = {.name = "geglu", .shape = "(4096, 2*1280)", .bytes = 4096.0 * 1280 * 3 * 4, .run = run_geglu,
                   .i = {4096, 1280}};
        b.p[0] = buf(4096 * 2560, 2), b.p[1] = buf(4096 * 1280, 1);
        report(c, &b, 5);
        free(b.p[0]), free(b.p[1]);
    }
    printf("\n");

    /* Normalisation */
    for (int silu = 0; silu < 2; silu++) {
        bench b = {.name = silu ? "groupnorm + silu" : "groupnorm", .shape = "(1, 320, 64x64) G32",
                   .bytes = 320.0 * 4096 * 2 * 4, .run = run_groupnorm, .i = {1, 320, 4096, silu}};
        b.p[0] = buf(320 * 4096, 2), b.p[1] = buf(320 * 4096, 1), b.p[2] = buf(320, 1), b.p[3] = buf(320, 1);
        report(c, &b, 10);
        for (int i = 0; i < 4; i++)
            free(b.p[i]);
    }
    {
        bench b = {.name = "layernorm", .shape = "(4096, 320)", .bytes = 4096.0 * 320 * 2 * 4, .run = run_layernorm,
                   .i = {4096, 320}};
        b.p[0] = buf(4096 * 320, 2), b.p[1] = buf(4096 * 320, 1), b.p[2] = buf(320, 1), b.p[3] = buf(320, 1);
        report(c, &b, 10);
        for (int i = 0; i < 4; i++)
            free(b.p[i]);
    }
    db_ctx_destroy(c);
    return 0;
}
