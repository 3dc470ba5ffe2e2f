/* Benchmark (not a test): the SD1.5 UNet forward on the CPU, fp32.
 *
 *   bench_unet [B [H [runs [threads]]]]     defaults: 1 64 2 0 (all cores)
 *
 * Weights are fresh ones from the architecture table (db_init_tensor, seed 1)
 * built in memory, so no 3.4 GB checkpoint is needed.  Reports the seconds
 * per forward (best of `runs` after one warm-up), GFLOP/s against the
 * standard count (401.6 GMAC = 803.2 GFLOP per sample at 64x64 latents,
 * scaled by (H/64)^2 for other sizes: only an estimate there, attention
 * grows faster), the machine's fp32 GEMM rate measured in the same run
 * (a 2048^3 db_gemm_forward), and where the time went per block kind.
 *
 * Build (no Makefile rule yet):
 *   make build/libdb.a && mkdir -p build/bench && \
 *   gcc -I. -D_GNU_SOURCE -std=c11 -O2 -fopenmp tests/bench/bench_unet.c build/libdb.a \
 *       -fopenmp -lmsgpackc -lzmq -lzip -ljansson -lxxhash -lutf8proc -ldnnl -lpng -lm -ldl -lpthread \
 *       -o build/bench/bench_unet
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/init.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/weights.h"

#define GMAC_PER_SAMPLE_64 401.6

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The UNet weights of arch `a`, freshly initialised, in db_weights' layout
 * (table order, each tensor 16-float aligned, names without the prefix). */
static int fresh_weights(db_weights *w, const db_arch *a, uint64_t seed, db_err *err)
{
    db_tname *t = NULL;
    size_t n = 0;
    memset(w, 0, sizeof *w);
    w->comp = DB_COMP_UNET;
    db_tindex_init(&w->ix);
    if (db_arch_names(a, &t, &n, err))
        return -1;
    const char *prefix = db_comp_prefix(DB_COMP_UNET);
    const size_t lp = strlen(prefix);
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (t[i].comp != DB_COMP_UNET)
            continue;
        db_tentry e;
        memset(&e, 0, sizeof e);
        e.name = t[i].compvis + lp;
        e.dtype = DB_F32;
        e.ndim = t[i].ndim;
        memcpy(e.shape, t[i].shape, sizeof t[i].shape);
        int64_t numel = db_shape_numel(e.ndim, e.shape);
        e.nbytes = (uint64_t)numel * 4;
        e.comp = DB_COMP_UNET;
        e.key = (int64_t)i; /* row of the table, for the init pass */
        e.offset = (int64_t)w->numel;
        rc = db_tindex_add(&w->ix, &e, err);
        w->numel += ((size_t)numel + 15) & ~(size_t)15;
    }
    w->n = w->ix.n;
    if (rc == 0 && !(w->data = aligned_alloc(64, w->numel * sizeof(float))))
        rc = db_err_set(err, DB_ENOMEM, "out of memory for %zu weights", w->numel);
    for (size_t k = 0; k < w->ix.n && rc == 0; k++)
        rc = db_init_tensor(&t[w->ix.v[k].key], seed, w->data + w->ix.v[k].offset, DB_F32, err);
    free(t);
    if (rc)
        db_weights_free(w);
    return rc;
}

/* A deterministic pseudo-random fill in [-1, 1). */
static void fill(float *x, size_t n, uint32_t s)
{
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = (float)(s >> 8) / (float)(1u << 23) - 1.0f;
    }
}

/* fp32 GEMM rate of this machine through the same op the models use. */
static double gemm_gflops(db_ctx *c)
{
    const int n = 2048;
    float *A = aligned_alloc(64, (size_t)n * n * 4), *B = aligned_alloc(64, (size_t)n * n * 4),
          *C = aligned_alloc(64, (size_t)n * n * 4);
    fill(A, (size_t)n * n, 1);
    fill(B, (size_t)n * n, 2);
    db_gemm_forward(c, C, A, B, 1, n, n, n, 0, 0, 1.0f, 0.0f); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        double t0 = now();
        db_gemm_forward(c, C, A, B, 1, n, n, n, 0, 0, 1.0f, 0.0f);
        double dt = now() - t0;
        if (dt < best)
            best = dt;
    }
    free(A);
    free(B);
    free(C);
    return 2.0 * n * n * (double)n / best * 1e-9;
}

/* Best-of-3 seconds of one op call (after a warm-up call). */
#define TIME_OP(dst, call)                     \
    do {                                       \
        call;                                  \
        dst = 1e30;                            \
        for (int r_ = 0; r_ < 3; r_++) {       \
            double t_ = now();                 \
            call;                              \
            t_ = now() - t_;                   \
            dst = t_ < dst ? t_ : dst;         \
        }                                      \
    } while (0)

/* The level-0 ops of SD1.5 at 64x64 (C = 320, 4096 tokens, 8 heads x 40):
 * self-attention (5 per forward), a C x C projection (~30 per forward, plus
 * the 8C and 4C feed-forward ones) and a 3x3 conv (~15 per forward). */
static void op_rates(db_ctx *c, int B)
{
    const int T = 4096, C = 320, NH = 8;
    const size_t n = (size_t)B * T * C;
    float *q = aligned_alloc(64, n * 4), *k = aligned_alloc(64, n * 4), *v = aligned_alloc(64, n * 4),
          *o = aligned_alloc(64, n * 4), *wt = aligned_alloc(64, (size_t)9 * C * C * 4);
    fill(q, n, 5);
    fill(k, n, 6);
    fill(v, n, 7);
    fill(wt, (size_t)9 * C * C, 8);
    double ta, tl, tc;
    TIME_OP(ta, db_attention_forward(c, o, NULL, q, k, v, B, T, T, NH, C / NH, 0));
    TIME_OP(tl, db_linear_forward(c, o, q, wt, NULL, B * T, C, C));
    TIME_OP(tc, db_conv2d_forward(c, o, q, wt, NULL, B, C, 64, 64, C, 3, 3, 1, 1, 1));
    double fa = 4.0 * B * T * (double)T * C * 1e-9, fl = 2.0 * B * T * (double)C * C * 1e-9, fc = 9 * fl;
    printf("  level-0 ops: attention %.3f s (%.1f GFLOP/s, x5 = %.2f s), linear %dx%d->%d %.4f s (%.1f GFLOP/s), "
           "conv3x3 %d->%d %.3f s (%.1f GFLOP/s)\n",
           ta, fa / ta, 5 * ta, B * T, C, C, tl, fl / tl, C, C, tc, fc / tc);
    if (c->err.code)
        printf("  (op error: %s)\n", c->err.msg);
    free(q);
    free(k);
    free(v);
    free(o);
    free(wt);
}

int main(int argc, char **argv)
{
    int B = argc > 1 ? atoi(argv[1]) : 1, H = argc > 2 ? atoi(argv[2]) : 64, runs = argc > 3 ? atoi(argv[3]) : 2;
    int threads = argc > 4 ? atoi(argv[4]) : 0;
    const int Tc = 77;
    if (B < 1 || H < 8 || runs < 1 || threads < 0) {
        fprintf(stderr, "usage: bench_unet [B [H [runs [threads]]]]\n");
        return 2;
    }
    db_err err = {0};
    db_ctx *ctx = NULL;
    db_arch a;
    db_weights w;
    db_unet *u = NULL;
    if (db_ctx_create(&ctx, DB_CPU, threads, &err) || db_arch_preset(&a, "sd15", &err)) {
        fprintf(stderr, "bench_unet: %s\n", err.msg);
        return 1;
    }
    double t0 = now();
    if (fresh_weights(&w, &a, 1, &err) || db_unet_create_from(&u, ctx, &a.unet, &w, &err)) {
        fprintf(stderr, "bench_unet: %s\n", err.msg);
        return 1;
    }
    printf("sd15 unet: %zu parameters, fresh weights in %.1f s, %d threads\n", db_unet_weights(u)->numel,
           now() - t0, ctx->threads);

    const int C = a.unet.in_channels, D = a.unet.context_dim;
    size_t nx = (size_t)B * C * H * H, nc = (size_t)B * Tc * D;
    float *x = malloc(nx * 4), *out = malloc(nx * 4), *cx = malloc(nc * 4), *ts = malloc((size_t)B * 4);
    fill(x, nx, 3);
    fill(cx, nc, 4);
    for (int b = 0; b < B; b++)
        ts[b] = 500.0f + b;
    double peak = gemm_gflops(ctx);

    double best = 1e30, tk[DB_UNET_NT] = {0};
    for (int r = 0; r <= runs; r++) { /* r == 0: warm-up (workspace, oneDNN primitives) */
        t0 = now();
        if (db_unet_forward(u, out, x, ts, cx, B, H, H, Tc, &err)) {
            fprintf(stderr, "bench_unet: %s\n", err.msg);
            return 1;
        }
        double dt = now() - t0;
        printf("  forward %d%s: %.3f s\n", r, r ? "" : " (warm-up)", dt);
        if (r && dt < best) {
            best = dt;
            db_unet_last_times(u, tk);
        }
    }
    double gflop = 2.0 * GMAC_PER_SAMPLE_64 * B * (H / 64.0) * (H / 64.0);
    printf("sd15 unet fp32 cpu B=%d %dx%d latents: %.3f s per forward, %.1f GFLOP/s (%.1f GFLOP%s); "
           "fp32 GEMM peak %.1f GFLOP/s (%.0f%%); workspace %.0f MiB\n",
           B, H, H, best, gflop / best, gflop, H == 64 ? "" : ", scaled estimate", peak, 100.0 * gflop / best / peak,
           (double)db_unet_workspace_bytes(u, B, H, H, Tc) / (1 << 20));
    printf("  time by block: resblocks %.2f s, transformers %.2f s, down/upsamplers %.2f s, embed+in/out %.2f s\n",
           tk[DB_UNET_T_RES], tk[DB_UNET_T_ATTN], tk[DB_UNET_T_SAMPLE], tk[DB_UNET_T_EMBED]);
    if (H == 64)
        op_rates(ctx, B);
    free(x);
    free(out);
    free(cx);
    free(ts);
    db_unet_free(u);
    db_ctx_destroy(ctx);
    return 0;
}
