/* Benchmark (not a test): DreamBooth training steps of SD1.5 on this
 * machine's CPU, the configuration of issue 5's target: 64x64 latents, one
 * instance + one class row, text encoder trained, gradient checkpointing,
 * fp32 weights, gradients and AdamW moments.  Random-init weights (the
 * arithmetic does not depend on the values).
 *
 *   bench_train [steps=2] [latent=64] [checkpointing=1] [train_text=1] [arch=sd15]
 *
 * Prints seconds per step (forward+backward, optimizer), GFLOP/s against
 * the standard count (UNet 803.2 GFLOP forward per sample at 64x64; a
 * training step does 3 forwards' worth of useful work, 4 with checkpointing
 * recomputing the blocks) and against the machine's fp32 GEMM peak measured
 * in the same process, and the peak RSS. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/init.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/unet.h"

#define GFLOP_FWD_64 803.2 /* SD1.5 UNet forward per sample at 64x64 latents (401.6 GMAC) */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double peak_rss_mib(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) ? 0 : ru.ru_maxrss / 1024.0;
}

/* fp32 GEMM rate of this machine now: 2048^3, best of 3. */
static double gemm_gflops(db_ctx *c)
{
    const int n = 2048;
    float *a = malloc((size_t)n * n * 4), *b = malloc((size_t)n * n * 4), *o = malloc((size_t)n * n * 4);
    db_noise_fill(a, (size_t)n * n, 1, 0, 0);
    db_noise_fill(b, (size_t)n * n, 2, 0, 0);
    double best = 1e30;
    for (int r = 0; r < 4; r++) {
        double t0 = now();
        db_gemm_forward(c, o, a, b, 1, n, n, n, 0, 0, 1.0f, 0.0f);
        double dt = now() - t0;
        if (r && dt < best)
            best = dt;
    }
    free(a), free(b), free(o);
    return 2.0 * n * n * (double)n / best / 1e9;
}

int main(int argc, char **argv)
{
    const int steps = argc > 1 ? atoi(argv[1]) : 2, L = argc > 2 ? atoi(argv[2]) : 64;
    const int ckpt = argc > 3 ? atoi(argv[3]) : 1, train_text = argc > 4 ? atoi(argv[4]) : 1;
    const char *arch_name = argc > 5 ? argv[5] : "sd15";
    db_err err = {0};
    db_ctx *ctx = NULL;
    db_arch a;
    db_model m;
    if (db_ctx_create(&ctx, DB_CPU, 0, &err) || db_arch_preset(&a, arch_name, &err)) {
        fprintf(stderr, "bench_train: %s\n", err.msg);
        return 1;
    }
    double t0 = now();
    if (db_model_init_random(&m, &a, 1, DB_F16, &err)) {
        fprintf(stderr, "bench_train: %s\n", err.msg);
        return 1;
    }
    db_train_opts o = db_train_opts_defaults(1e-6, steps + 1);
    o.train_text = train_text;
    o.gradient_checkpointing = ckpt;
    db_trainer *tr = NULL;
    if (db_trainer_create(&tr, ctx, &m, &o, &err)) {
        fprintf(stderr, "bench_train: %s\n", err.msg);
        return 1;
    }
    db_model_close(&m); /* the trainer holds its own fp32 copies */
    printf("%s: random init + trainer (fp32 weights, grads, AdamW moments) %.1f s, %d threads\n", arch_name,
           now() - t0, ctx->threads);
    const double peak = gemm_gflops(ctx);

    const int B = 2, C = a.unet.in_channels, T = a.text.max_positions;
    const size_t n = (size_t)B * C * L * L;
    float *lat = malloc(n * 4), *noise = malloc(n * 4);
    db_noise_fill(lat, n, 3, 0, 0);
    db_noise_fill(noise, n, 4, 0, 0);
    int64_t ts[2] = {250, 750};
    int32_t ids[2 * 77];
    for (int i = 0; i < 2 * T; i++) /* BOS, a few words, EOS padding */
        ids[i] = i % T == 0 ? 49406 : i % T < 6 ? 320 + i % T : 49407;
    db_train_batch b = {.B = B, .n_inst = 1, .C = C, .H = L, .W = L, .T = T, .latents = lat, .noise = noise,
                        .timesteps = ts, .ids = ids};
    double best_fb = 1e30, best_opt = 1e30;
    for (int s = 0; s <= steps; s++) { /* s == 0: warm-up */
        db_train_stats st;
        double t1 = now();
        if (db_trainer_accumulate(tr, &b, &st, &err)) {
            fprintf(stderr, "bench_train: %s\n", err.msg);
            return 1;
        }
        double t2 = now();
        if (db_trainer_apply(tr, &st, &err)) {
            fprintf(stderr, "bench_train: %s\n", err.msg);
            return 1;
        }
        double t3 = now();
        printf("  step %d%s: forward+backward %.2f s, optimizer %.2f s, loss %.4f, peak RSS %.0f MiB\n", s,
               s ? "" : " (warm-up)", t2 - t1, t3 - t2, st.loss, peak_rss_mib());
        double ft[DB_UNET_NT], bt[DB_UNET_NT], rec;
        db_unet_last_times(db_trainer_unet(tr), ft);
        db_unet_last_backward_times(db_trainer_unet(tr), bt, &rec);
        printf("    UNet forward: res %.2f s, attn %.2f s, samplers %.2f s, embed/in/out %.2f s; backward: res %.2f s, "
               "attn %.2f s, samplers %.2f s, embed/in/out %.2f s, recompute %.2f s\n",
               ft[DB_UNET_T_RES], ft[DB_UNET_T_ATTN], ft[DB_UNET_T_SAMPLE], ft[DB_UNET_T_EMBED], bt[DB_UNET_T_RES],
               bt[DB_UNET_T_ATTN], bt[DB_UNET_T_SAMPLE], bt[DB_UNET_T_EMBED], rec);
        if (s && t2 - t1 < best_fb)
            best_fb = t2 - t1, best_opt = t3 - t2;
    }
    /* useful work: forward + backward = 3 forwards; checkpointing adds one */
    const double fwd = GFLOP_FWD_64 * B * (L / 64.0) * (L / 64.0);
    const double useful = 3 * fwd, done = (ckpt ? 4 : 3) * fwd, step = best_fb + best_opt;
    if (strcmp(arch_name, "sd15") != 0)
        printf("(the GFLOP figures below use SD1.5's count: meaningless for %s)\n", arch_name);
    printf("%s train step B=%d (1 instance + 1 class) %dx%d latents, text encoder %s, checkpointing %s: "
           "%.2f s/step (%.2f forward+backward, %.2f optimizer); UNet %.1f GFLOP/s useful (%.0f%% of the %.1f "
           "GFLOP/s GEMM peak), %.1f GFLOP/s executed (%.0f%%); peak RSS %.0f MiB\n",
           arch_name, B, L, L, train_text ? "trained" : "frozen", ckpt ? "on" : "off", step, best_fb, best_opt,
           useful / best_fb, 100 * useful / best_fb / peak, peak, done / best_fb, 100 * done / best_fb / peak,
           peak_rss_mib());
    db_trainer_free(tr);
    db_ctx_destroy(ctx);
    free(lat), free(noise);
    return 0;
}
