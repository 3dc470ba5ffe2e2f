/* Benchmark (not a test): the three SD1.5 networks at real sizes on the CPU,
 * fp32, with random weights built in memory (db_model_init_random), next to
 * the machine's fp32 GEMM rate measured in the same run:
 *
 *   UNet forward at 64x64 latents, batch 1 and 2   401.6 GMAC per sample
 *   VAE encode / decode at 512x512                  558 / 1257 GMAC
 *   text encoder, 77 tokens, batch 1                (counted from its shapes)
 *
 *   bench_models [runs]      (default 1 timed run after a warm-up)
 *
 * For scale (issue 3): diffusers on PyTorch 1.13 on this machine takes about
 * 7.6 s per UNet forward at batch 1 and 11 s per VAE decode at 512x512. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/clip.h"
#include "libcommon/sd/init.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/vae.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fill(float *x, size_t n, uint32_t s)
{
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = (float)(s >> 8) / (float)(1u << 23) - 1.0f;
    }
}

static double gemm_peak(db_ctx *c)
{
    const int n = 2048;
    float *A = aligned_alloc(64, (size_t)n * n * 4), *B = aligned_alloc(64, (size_t)n * n * 4),
          *C = aligned_alloc(64, (size_t)n * n * 4);
    fill(A, (size_t)n * n, 1);
    fill(B, (size_t)n * n, 2);
    db_gemm_forward(c, C, A, B, 1, n, n, n, 0, 0, 1.0f, 0.0f);
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        double t0 = now();
        db_gemm_forward(c, C, A, B, 1, n, n, n, 0, 0, 1.0f, 0.0f);
        double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    free(A);
    free(B);
    free(C);
    return 2.0 * n * (double)n * n / best * 1e-9;
}

static void report(const char *what, double s, double gflop, double peak)
{
    printf("%-34s %8.3f s  %7.1f GFLOP/s  %5.1f%% of peak\n", what, s, gflop / s, 100.0 * gflop / s / peak);
    fflush(stdout);
}

#define TIME(best, runs, call)                          \
    do {                                                \
        if (call)                                       \
            goto fail;                                  \
        best = 1e30;                                    \
        for (int r_ = 0; r_ < (runs); r_++) {           \
            double t0_ = now();                         \
            if (call)                                   \
                goto fail;                              \
            double dt_ = now() - t0_;                   \
            best = dt_ < best ? dt_ : best;             \
        }                                               \
    } while (0)

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 1;
    db_err e = {0};
    db_ctx *ctx = NULL;
    db_arch a;
    db_model m;
    db_unet *u = NULL;
    db_vae *v = NULL;
    db_clip *clip = NULL;
    if (db_ctx_create(&ctx, DB_CPU, 0, &e) || db_arch_preset(&a, "sd15", &e) ||
        db_model_init_random(&m, &a, 1, DB_F32, &e)) {
        fprintf(stderr, "bench_models: %s\n", e.msg);
        return 1;
    }
    double peak = gemm_peak(ctx), best;
    printf("fp32 GEMM peak (2048^3, same run): %.1f GFLOP/s, %d threads\n", peak, ctx->threads);

    /* text encoder: per token 4 D^2 (q k v o) + 2 D F (MLP) MACs per layer,
     * plus attention 2 T D per token per layer */
    {
        const db_text_arch *t = &a.text;
        double gflop = 2.0 * 77 * t->layers * (4.0 * t->hidden * t->hidden + 2.0 * t->hidden * t->intermediate +
                                                2.0 * 77 * t->hidden) * 1e-9;
        int32_t ids[77];
        for (int i = 0; i < 77; i++)
            ids[i] = i ? (i < 10 ? 320 + i : 49407) : 49406;
        float *out = malloc((size_t)77 * t->hidden * sizeof *out);
        if (db_clip_create(&clip, ctx, &m, &e))
            goto fail;
        TIME(best, runs, db_clip_forward(clip, out, NULL, NULL, ids, 1, 77, &e));
        report("text encoder B1 T77", best, gflop, peak);
        free(out);
        db_clip_free(clip);
        clip = NULL;
    }
    {
        if (db_unet_create(&u, ctx, &m, &e))
            goto fail;
        for (int B = 1; B <= 2; B++) {
            size_t n = (size_t)B * 4 * 64 * 64;
            float *x = malloc(n * sizeof *x), *o = malloc(n * sizeof *o), ts[2] = {500, 500};
            float *c = malloc((size_t)B * 77 * 768 * sizeof *c);
            fill(x, n, 3);
            fill(c, (size_t)B * 77 * 768, 4);
            TIME(best, runs, db_unet_forward(u, o, x, ts, c, B, 64, 64, 77, &e));
            char what[64];
            snprintf(what, sizeof what, "UNet forward B%d 64x64", B);
            report(what, best, 2.0 * 401.6 * B, peak);
            free(x);
            free(o);
            free(c);
        }
        db_unet_free(u);
        u = NULL;
    }
    {
        if (db_vae_create(&v, ctx, &m, &e))
            goto fail;
        size_t ni = (size_t)3 * 512 * 512, nl = (size_t)4 * 64 * 64;
        float *img = malloc(ni * sizeof *img), *mean = malloc(nl * sizeof *mean), *lv = malloc(nl * sizeof *lv);
        fill(img, ni, 5);
        TIME(best, runs, db_vae_encode(v, mean, lv, img, 1, 512, 512, &e));
        report("VAE encode 512x512", best, 2.0 * 558, peak);
        TIME(best, runs, db_vae_decode(v, img, mean, 1, 64, 64, &e));
        report("VAE decode 512x512", best, 2.0 * 1257, peak);
        free(img);
        free(mean);
        free(lv);
        db_vae_free(v);
        v = NULL;
    }
    db_model_close(&m);
    db_ctx_destroy(ctx);
    return 0;
fail:
    fprintf(stderr, "bench_models: %s\n", e.msg);
    if (u)
        db_unet_free(u);
    if (v)
        db_vae_free(v);
    if (clip)
        db_clip_free(clip);
    db_model_close(&m);
    db_ctx_destroy(ctx);
    return 1;
}
