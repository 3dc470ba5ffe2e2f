/* Whole-model benchmark of the SD1.5 architecture with random weights, on
 * any device (issue 6's make bench-cuda; issue 7's PyTorch side by side is
 * tests/gpu/bench_torch.py on the same shapes):
 *
 *   fwd     UNet forward, batch 2, LxL latents (64: 512x512 images); and
 *           the same forward replayed as a graph (unet_fwd_b2_graph:
 *           kernels/ops.h db_graph_capture, a CUDA graph on a GPU)
 *   train   one DreamBooth step: 1 instance + 1 prior row, UNet trained with
 *           AdamW, text encoder frozen, cached latents (db_trainer_*; its UNet
 *           forward and backward replayed as graphs, as db-train does); and
 *           the same step op by op (train_step_nograph)
 *   sample  text to image: DDIM, STEPS steps with classifier-free guidance
 *           (UNet batch 2 per step), VAE decode to 8L x 8L (db_txt2img, its
 *           steps replayed as a graph as db-sample does, the DDIM step on
 *           the device); the same run with the scheduler on the host between
 *           the UNet's calls (sample_ddim_cfg_hoststep), and with every step
 *           launched op by op (sample_ddim_cfg_nograph)
 *   vae     VAE decode of one image alone
 *
 *   bench_sd [--device cpu|cuda[:N]] [--precision fp32,bf16,...] [--only fwd,train,sample,vae]
 *            [--tiny] [--latent L] [--steps N] [--reps N] [--budget S] [--sample-budget S]
 *            [--gradient-checkpointing] [--fused-backward] [--train-text-encoder]
 *            [--optimizer adamw|adamw8bit] [--save] [--threads N] [--seed N]
 *
 * --only fused: the fused-backward step alone (train_step_fused).  The
 * memory targets of #7 (a full fine-tune with the text encoder in 16 GB,
 * in 10 GB with 8-bit moments and checkpointing) are this line's peak with
 * --train-text-encoder --gradient-checkpointing [--optimizer adamw8bit]
 * (run.sh's memory stage); its extra column names the configuration.
 * --plan prints, without a device, each asked training figure's device plan
 * (db-train --plan --device cuda's "predicted device peak" for the same
 * configuration) as `PLAN name=... precision=... mib=...`, and exits.
 *
 * Each figure: warm-up calls (the first builds plans, caches and workspaces),
 * then timed repetitions, as many as fit --budget seconds (at most --reps),
 * each closed by db_ctx_sync so the clock reads finished work; the median is
 * reported.  Peak memory is the device's (db_ctx_mem_stats, its peak reset
 * before the timed runs, so it holds the weights, the kept workspaces and the
 * transients of a call) or, on the CPU, the process's resident peak (VmHWM,
 * reset the same way through /proc/self/clear_refs).  FLOPs are counted from
 * the architecture (convolutions, linears and attention's two matmuls; 401.6
 * GMAC per SD1.5 UNet forward at 64x64, 1257 GMAC per VAE decode at 512x512);
 * a training step is counted as 3 forwards of its batch (useful work; the
 * recompute of checkpointing is not counted).
 *
 * Output: one line per figure as it is measured,
 *   BENCH impl=c name=unet_fwd_b2 device=cuda precision=fp32 ms=... tflops=... peak_mib=... reps=...
 * (the train line adds plan_mib, db-train --plan's device estimate for the
 * same configuration; the sample line steps=), then a markdown table.  A
 * figure that fails prints error=... and the exit status is 1.  --tiny uses
 * the tiny test model's architecture (make check's smoke test).  Under the
 * kernel tracer (tests/gpu/kprof.c, tests/gpu/README.md) each figure's
 * timed calls are a section of its report. */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "kernels/ops.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/clip.h"
#include "libcommon/sd/init.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/train_ckpt.h"
#include "libcommon/sd/txt2img.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/vae.h"
#include "libcommon/sd/weights.h"

/* ---- options and results ------------------------------------------------------------ */

typedef struct opts {
    const char *device, *precisions, *only;
    int tiny, latent, steps, reps, ckpt, fused, fused_only, save, threads, text, plan;
    db_optim_kind optimizer;
    double budget, sample_budget;
    unsigned long long seed;
} opts;

enum { MAXFIG = 32 };
typedef struct figure {
    char name[48], prec[8], extra[64];
    double ms, tflops, peak_mib, plan_mib;
    int reps, ok;
} figure;

static figure figs[MAXFIG];
static int nfig, failures;
static const char *devname_; /* "cpu" or "cuda" (without :N), for the BENCH lines */
static size_t rebuilt_;      /* the last measure's whole 16-bit weight-copy rebuilds (db_mem_stats.copies_built) */
static size_t twins_;        /* the last measure's activation twins taken a rep (db_mem_stats.twins_used; CUDA,
                                eager: a graph's replays run no host code, so they count none) */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- peak memory ------------------------------------------------------------------------- */

/* The CPU's resident peak can be reset (Linux >= 4.0: "5" to clear_refs
 * resets VmHWM), so each figure reports its own peak as CUDA does. */
static void cpu_peak_reset(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static double cpu_peak_mib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kib = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6))
            kib = atof(line + 6);
    if (f)
        fclose(f);
    if (kib <= 0) { /* no /proc: the process's peak since it started */
        struct rusage ru;
        kib = getrusage(RUSAGE_SELF, &ru) ? 0 : (double)ru.ru_maxrss;
    }
    return kib / 1024.0;
}

static void peak_reset(db_ctx *c)
{
    if (c->device == DB_CPU)
        cpu_peak_reset();
    else
        db_ctx_mem_reset_peak(c);
}

static double peak_mib(db_ctx *c)
{
    if (c->device == DB_CPU)
        return cpu_peak_mib();
    db_mem_stats s;
    db_ctx_mem_stats(c, &s);
    return s.tracked ? (double)s.peak / 1048576.0 : 0;
}

/* ---- FLOPs from the architecture ---------------------------------------------------------- */

/* Multiply-adds of one UNet forward of one sample at HxW latents and Tc
 * context tokens: every conv and linear, and attention's q k^T and p v. */
static double unet_macs(const db_unet_arch *a, int H, int W, int Tc)
{
    const double E = a->time_embed_dim, D = a->context_dim;
    double hw = (double)H * W, m = a->block_out[0] * E + E * E; /* time MLP */
    double skips[4 * DB_MAXLEVELS];
    int ns = 0;
    m += a->in_channels * (double)a->block_out[0] * 9 * hw; /* conv_in */
    double ch = a->block_out[0];
    skips[ns++] = ch;
#define RES(cin, cout) ((cin) * (cout) * 9 * hw + (cout) * (cout) * 9 * hw + E * (cout) + ((cin) != (cout) ? (cin) * (cout) * hw : 0))
#define TR(c)                                                                                                        \
    (a->transformer_depth *                                                                                          \
         ((c) * (c) * hw * 2 + 4 * (c) * (c) * hw + 2 * hw * hw * (c) + 2 * (c) * (c) * hw + 2 * D * (c) * Tc +        \
          2 * hw * Tc * (c) + 12 * (c) * (c) * hw))
    for (int i = 0; i < a->nlevels; i++) {
        for (int j = 0; j < a->layers_per_block; j++) {
            m += RES(ch, (double)a->block_out[i]);
            ch = a->block_out[i];
            if (a->cross_attn[i])
                m += TR(ch);
            skips[ns++] = ch;
        }
        if (i < a->nlevels - 1) {
            m += ch * ch * 9 * hw / 4;
            hw /= 4;
            skips[ns++] = ch;
        }
    }
    m += 2 * RES(ch, ch) + TR(ch); /* mid */
    for (int u = 0; u < a->nlevels; u++) {
        const double out = a->block_out[a->nlevels - 1 - u];
        for (int j = 0; j <= a->layers_per_block; j++) {
            const double cin = ch + skips[--ns];
            m += RES(cin, out);
            ch = out;
            if (a->up_cross_attn[u])
                m += TR(ch);
        }
        if (u < a->nlevels - 1) {
            hw *= 4;
            m += ch * ch * 9 * hw;
        }
    }
    m += ch * a->out_channels * 9 * hw; /* conv_out */
#undef RES
#undef TR
    return m;
}

/* Multiply-adds of one VAE decode from hxw latents. */
static double vae_decode_macs(const db_vae_arch *a, int h, int w)
{
    double hw = (double)h * w, Z = a->latent_channels, ch = a->block_out[a->nlevels - 1];
    double m = Z * Z * hw + Z * ch * 9 * hw;
#define RES(cin, cout) ((cin) * (cout) * 9 * hw + (cout) * (cout) * 9 * hw + ((cin) != (cout) ? (cin) * (cout) * hw : 0))
    m += 2 * RES(ch, ch) + 4 * ch * ch * hw + 2 * hw * hw * ch; /* mid: 2 ResBlocks, one-head attention */
    for (int u = 0; u < a->nlevels; u++) {
        const double out = a->block_out[a->nlevels - 1 - u];
        for (int j = 0; j <= a->layers_per_block; j++) {
            m += RES(ch, out);
            ch = out;
        }
        if (u < a->nlevels - 1) {
            hw *= 4;
            m += ch * ch * 9 * hw;
        }
    }
#undef RES
    return m + ch * a->out_channels * 9 * hw;
}

/* ---- timing --------------------------------------------------------------------------------- */

typedef int (*work_fn)(void *arg, db_err *err);

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One call of fn, finished on the device: seconds, or -1. */
static double timed_call(db_ctx *c, work_fn fn, void *arg, db_err *err)
{
    const double t0 = now();
    if (fn(arg, err))
        return -1;
    if (db_ctx_sync(c)) {
        db_err_set(err, c->err.code ? c->err.code : DB_EIO, "sync: %s", c->err.msg);
        return -1;
    }
    return now() - t0;
}

/* The kernel tracer's section marks (tests/gpu/kprof.c) when a run loads
 * it as CUDA_INJECTION64_PATH (a table per figure, of the timed calls):
 * label begins a section, NULL ends it with `calls` calls.  Else nothing. */
static void kprof_mark(const char *name, db_precision p, int calls)
{
    const char *path = getenv("CUDA_INJECTION64_PATH");
    void *h = path && *path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
    if (!h)
        return;
    if (name) {
        void (*begin)(const char *) = (void (*)(const char *))dlsym(h, "db_kprof_begin");
        char label[96];
        snprintf(label, sizeof label, "%s %s (%s)", name, db_precision_name(p), devname_);
        if (begin)
            begin(label);
    } else {
        void (*end)(int) = (void (*)(int))dlsym(h, "db_kprof_end");
        if (end)
            end(calls);
    }
    dlclose(h);
}

/* warmup calls, then up to maxreps timed ones within budget seconds (at
 * least one); *ms the median, *n the count; peak memory over the timed
 * ones.  name: the figure's, for the kernel tracer's sections. */
static int measure(db_ctx *c, const char *name, work_fn fn, void *arg, int warmup, int maxreps, double budget,
                   double *ms, int *n, double *peak, db_err *err)
{
    double last = 0;
    for (int i = 0; i < warmup; i++)
        if ((last = timed_call(c, fn, arg, err)) < 0)
            return -1;
    int reps = maxreps;
    if (warmup && last > 0 && budget > 0 && budget / last < reps)
        reps = (int)(budget / last);
    reps = reps < 1 ? 1 : reps;
    double t[256];
    reps = reps > 256 ? 256 : reps;
    peak_reset(c);
    db_mem_stats ms0;
    db_ctx_mem_stats(c, &ms0);
    kprof_mark(name, c->precision, 0);
    for (int i = 0; i < reps; i++) {
        if ((t[i] = timed_call(c, fn, arg, err)) < 0) {
            kprof_mark(NULL, c->precision, i + 1);
            return -1;
        }
        if (budget > 0 && i + 1 < reps && (i + 1) * t[0] > 2 * budget) { /* far slower than the warm-up said */
            reps = i + 1;
            break;
        }
    }
    kprof_mark(NULL, c->precision, reps);
    *peak = peak_mib(c);
    db_mem_stats ms1;
    db_ctx_mem_stats(c, &ms1);
    rebuilt_ = ms1.copies_built - ms0.copies_built;
    twins_ = (ms1.twins_used - ms0.twins_used) / (size_t)reps;
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    *ms = 1e3 * (reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]));
    *n = reps;
    return 0;
}

static void report(const char *name, db_precision p, double ms, double gflop, double peak, double plan, int reps,
                   const char *extra)
{
    figure *f = nfig < MAXFIG ? &figs[nfig++] : &figs[MAXFIG - 1];
    memset(f, 0, sizeof *f);
    snprintf(f->name, sizeof f->name, "%s", name);
    snprintf(f->prec, sizeof f->prec, "%s", db_precision_name(p));
    snprintf(f->extra, sizeof f->extra, "%s", extra ? extra : "");
    f->ms = ms, f->tflops = gflop / ms, f->peak_mib = peak, f->plan_mib = plan, f->reps = reps, f->ok = 1;
    /* gflop / ms = TFLOP/s: 1e9 / 1e-3 = 1e12 */
    printf("BENCH impl=c name=%s device=%s precision=%s ms=%.3f tflops=%.4g peak_mib=%.1f", name, devname_, f->prec,
           ms, f->tflops, peak);
    if (plan > 0)
        printf(" plan_mib=%.1f", plan);
    printf(" reps=%d", reps);
    /* whole 16-bit weight copies rebuilt in the timed reps: 0 in a steady
     * step; a sample makes one, the context cache's (db_unet_cache_context) */
    if (rebuilt_)
        printf(" rebuilt=%zu", rebuilt_);
    if (twins_) /* conversions a rep that the op before made in its own pass */
        printf(" twins=%zu", twins_);
    printf("%s%s\n", extra && *extra ? " " : "", extra ? extra : "");
    rebuilt_ = twins_ = 0;
    fflush(stdout);
}

static void report_error(const char *name, db_precision p, const char *msg)
{
    char clean[256];
    snprintf(clean, sizeof clean, "%s", msg);
    for (char *s = clean; *s; s++) /* one line, no quotes: the parsers split on spaces and '=' */
        if (*s == '\n' || *s == '"')
            *s = ' ';
    printf("BENCH impl=c name=%s device=%s precision=%s error=\"%s\"\n", name, devname_, db_precision_name(p), clean);
    fflush(stdout);
    failures++;
    if (nfig < MAXFIG) {
        figure *f = &figs[nfig++];
        memset(f, 0, sizeof *f);
        snprintf(f->name, sizeof f->name, "%s", name);
        snprintf(f->prec, sizeof f->prec, "%s", db_precision_name(p));
        snprintf(f->extra, sizeof f->extra, "error");
    }
}

/* ---- device buffers ---------------------------------------------------------------------- */

/* n floats of seeded normal noise on c's device (never zeros: see METHOD). */
static float *dev_noise(db_ctx *c, size_t n, uint64_t stream)
{
    float *h = malloc(n * sizeof *h), *d = db_ctx_alloc(c, n * sizeof *d);
    if (h && d) {
        db_noise_fill(h, n, 7, stream, 0);
        db_ctx_copy(c, d, h, n * sizeof *d, DB_COPY_H2D);
    }
    free(h);
    return d;
}

/* ---- (a) UNet forward ---------------------------------------------------------------------- */

typedef struct fwd_arg {
    db_unet *u;
    float *out, *x, *t, *ctx;
    int B, L, T;
} fwd_arg;

static int fwd_call(void *p, db_err *err)
{
    fwd_arg *a = p;
    return db_unet_forward(a->u, a->out, a->x, a->t, a->ctx, a->B, a->L, a->L, a->T, err);
}

/* one replay of a captured graph (unet_fwd_b2_graph) */
static int graph_call(void *p, db_err *err) { return db_graph_launch((db_graph *)p, err); }

/* A UNet on c from a copy of the host weights hw (kept for the next). */
static int unet_from_host(db_unet **u, db_ctx *c, const db_arch *a, const db_weights *hw, db_err *err)
{
    db_weights w;
    if (db_weights_like(&w, hw, err))
        return -1;
    memcpy(w.data, hw->data, hw->numel * sizeof(float));
    return db_unet_create_from(u, c, &a->unet, &w, err);
}

/* Timesteps on the device: both rows at t (a mid-schedule value). */
static float *dev_timesteps(db_ctx *c, int B, float t)
{
    float h[64];
    float *d = db_ctx_alloc(c, (size_t)B * sizeof *d);
    for (int i = 0; i < B && i < 64; i++)
        h[i] = t;
    if (d)
        db_ctx_copy(c, d, h, (size_t)B * sizeof *d, DB_COPY_H2D);
    return d;
}

static void bench_fwd(db_ctx *c, const db_arch *a, const db_weights *hw, const db_precision *precs, int np,
                      const opts *o)
{
    const int B = 2, L = o->latent, T = a->text.max_positions, C = a->unet.in_channels;
    const double gflop = 2 * B * unet_macs(&a->unet, L, L, T) * 1e-9;
    const size_t nlat = (size_t)B * C * L * L;
    db_err err = {0};
    db_unet *u = NULL;
    fwd_arg f = {.B = B, .L = L, .T = T};
    if (unet_from_host(&u, c, a, hw, &err)) {
        for (int i = 0; i < np; i++)
            report_error("unet_fwd_b2", precs[i], err.msg);
        return;
    }
    f.u = u;
    f.out = dev_noise(c, nlat, 1);
    f.x = dev_noise(c, nlat, 2);
    f.ctx = dev_noise(c, (size_t)B * T * a->unet.context_dim, 3);
    f.t = dev_timesteps(c, B, 500.0f);
    for (int i = 0; i < np; i++) {
        double ms, pk;
        int n;
        db_ctx_clear_error(c);
        db_ctx_set_precision(c, precs[i]);
        if (!f.out || !f.x || !f.ctx || !f.t)
            db_err_set(&err, DB_ENOMEM, "out of device memory for the inputs");
        if (err.code || measure(c, "unet_fwd_b2", fwd_call, &f, 2, o->reps, o->budget, &ms, &n, &pk, &err)) {
            report_error("unet_fwd_b2", precs[i], err.msg);
            report_error("unet_fwd_b2_graph", precs[i], "no direct forward");
            db_err_clear(&err);
            continue;
        }
        report("unet_fwd_b2", precs[i], ms, gflop, pk, 0, n, NULL);
        /* the same forward replayed as one graph (the sampler's steps from
         * the second on); the measured forwards above were its warm-up */
        db_graph *gr = NULL;
        const int r = db_graph_capture(c, &gr, fwd_call, &f, sizeof f, &err);
        if (r != 0 || measure(c, "unet_fwd_b2_graph", graph_call, gr, 2, o->reps, o->budget, &ms, &n, &pk, &err))
            report_error("unet_fwd_b2_graph", precs[i], err.msg);
        else
            report("unet_fwd_b2_graph", precs[i], ms, gflop, pk, 0, n, NULL);
        db_graph_free(gr);
        db_err_clear(&err);
    }
    db_ctx_free(c, f.out), db_ctx_free(c, f.x), db_ctx_free(c, f.ctx), db_ctx_free(c, f.t);
    db_unet_free(u);
    db_ctx_set_precision(c, DB_PREC_F32);
}

/* ---- (b) training step ----------------------------------------------------------------------- */

typedef struct train_arg {
    db_trainer *tr;
    db_train_batch b;
} train_arg;

static int train_call(void *p, db_err *err)
{
    train_arg *a = p;
    db_train_stats st;
    return db_trainer_accumulate(a->tr, &a->b, &st, err) || db_trainer_apply(a->tr, &st, err) ? -1 : 0;
}

/* --save: one checkpoint of the trainer's state (weights and AdamW moments,
 * what db-train writes) under $TMPDIR, written synchronously
 * (checkpoint_save: what a step waits for without --async-save), then begun
 * in the background (checkpoint_async_block: the host copy training waits
 * for with it) and joined (checkpoint_async: the whole write), through
 * db-train's stage (pinned memory on a GPU; checkpoint_stage_alloc its
 * allocation, which db-train does in the background) twice (_again: the
 * stage reused).  The sizes go in gb=; the figures for #7's "800 steps
 * with checkpoints at 500 and 800".  (The copies into malloc'd memory the
 * stage replaced were timed beside it in call 5, BENCHMARKS.md: 7.9 s
 * against 0.19 s; they took 27 s of the stage's 75.) */
static void bench_save(db_trainer *tr)
{
    const char *tmp = getenv("TMPDIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/bench_sd-save-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    db_err err = {0};
    if (!mkdtemp(dir)) {
        report_error("checkpoint_save", DB_PREC_F32, "cannot make a temporary directory");
        return;
    }
    db_train_state st;
    db_trainer_state(tr, &st);
    double bytes = 0;
    const db_weights *ws[] = {st.unet, st.unet_m, st.unet_v, st.text, st.text_m, st.text_v};
    for (size_t i = 0; i < sizeof ws / sizeof *ws; i++)
        bytes += ws[i] ? (double)ws[i]->numel * 4 : 0;
    char extra[64], sub[600];
    snprintf(extra, sizeof extra, "gb=%.2f", bytes * 1e-9);
    json_t *state = json_object(), *cfg = json_object();
    snprintf(sub, sizeof sub, "%s/sync", dir);
    mkdir(sub, 0700);
    double t0 = now();
    if (db_train_ckpt_save(sub, &st, NULL, state, cfg, NULL, &err) == 0)
        report("checkpoint_save", DB_PREC_F32, (now() - t0) * 1e3, 0, 0, 0, 1, extra);
    else
        report_error("checkpoint_save", DB_PREC_F32, err.msg);
    /* the background write with the stage db-train keeps (pinned on a
     * GPU): its allocation (done while training runs), then two
     * checkpoints through it */
    db_ckpt_stage *stage = NULL;
    t0 = now();
    const int have_stage = db_ckpt_stage_start(&stage, st.unet->ctx, db_ckpt_copy_bytes(&st), &err) == 0;
    const int pinned = have_stage && db_ckpt_stage_pinned(stage);
    if (have_stage)
        report("checkpoint_stage_alloc", DB_PREC_F32, (now() - t0) * 1e3, 0, 0, 0, 1, extra);
    else
        report_error("checkpoint_stage_alloc", DB_PREC_F32, err.msg);
    static const char *const names[2][2] = {{"checkpoint_async_block", "checkpoint_async"},
                                            {"checkpoint_async_block_again", "checkpoint_async_again"}};
    for (int k = 0; k < 2 && have_stage; k++) {
        db_ckpt_writer *w = NULL;
        char ex[96];
        snprintf(ex, sizeof ex, "%s %s", extra, pinned ? "copies=pinned" : "copies=stage");
        snprintf(sub, sizeof sub, "%s/async%d", dir, k);
        mkdir(sub, 0700);
        t0 = now();
        if (db_ckpt_writer_start(&w, sub, &st, NULL, state, cfg, stage, &err) == 0) {
            report(names[k][0], DB_PREC_F32, (now() - t0) * 1e3, 0, 0, 0, 1, ex);
            if (db_ckpt_writer_join(w, NULL, &err) == 0)
                report(names[k][1], DB_PREC_F32, (now() - t0) * 1e3, 0, 0, 0, 1, ex);
            else
                report_error(names[k][1], DB_PREC_F32, err.msg);
        } else
            report_error(names[k][0], DB_PREC_F32, err.msg);
        db_rm_rf(sub);
    }
    db_ckpt_stage_free(stage);
    json_decref(state);
    json_decref(cfg);
    db_rm_rf(dir);
}

/* db-train --plan's device estimate in MiB for this configuration, the
 * optimizer's state counted as tools/db-train.c counts it */
static double train_plan(const db_arch *a, const db_model *m, int B, int L, int T, const opts *o, int fused,
                         int graphs, db_precision p, db_train_device_plan *plan)
{
    db_unet_train_device_plan(a, B, L, L, T, o->text, o->ckpt, fused, graphs, p, plan);
    const size_t adam = db_tentries_optim_bytes(m->t.v, m->t.n, DB_COMP_UNET, o->optimizer) +
                        (o->text ? db_tentries_optim_bytes(m->t.v, m->t.n, DB_COMP_TEXT, o->optimizer) : 0);
    plan->total = plan->total - plan->moments + adam;
    plan->moments = adam;
    return plan->total / 1048576.0;
}

/* --plan: the device plans of the asked training figures, no device */
static int print_plans(opts *o, const char *arch_name, const db_precision *precs, int np, int want_train)
{
    db_arch a;
    db_model m;
    db_err err = {0};
    if (db_arch_preset(&a, arch_name, &err) || db_model_init_random(&m, &a, o->seed, DB_F32, &err)) {
        fprintf(stderr, "bench_sd: %s\n", err.msg);
        return 1;
    }
    const int L = o->latent ? o->latent : a.unet.sample_size;
    for (int mode = 0; mode < 3; mode++) {
        if (mode == 1 ? !o->fused : !want_train)
            continue;
        const char *name = mode == 1 ? "train_step_fused" : mode == 2 ? "train_step_nograph" : "train_step";
        for (int i = 0; i < np; i++) {
            db_train_device_plan plan;
            printf("PLAN name=%s precision=%s mib=%.1f\n", name, db_precision_name(precs[i]),
                   train_plan(&a, &m, 2, L, a.text.max_positions, o, mode == 1, mode != 2, precs[i], &plan));
        }
    }
    db_model_close(&m);
    return 0;
}

/* mode 0: the plain step (its UNet calls replayed as graphs, as db-train
 * does); 1: the fused backward (train.h), reported as train_step_fused;
 * 2: the plain step op by op (no_graph), train_step_nograph; 3: the plain
 * step with the UNet's weight gradients kept float32 (train.h no_grad16; bf16
 * only: the other precisions keep them so anyway), train_step_f32grads */
static void bench_train(db_ctx *c, const db_arch *a, const db_model *m, const db_precision *precs, int np,
                        const opts *o, int mode)
{
    const int fused = mode == 1;
    const char *name = mode == 1   ? "train_step_fused"
                       : mode == 2 ? "train_step_nograph"
                       : mode == 3 ? "train_step_f32grads"
                                   : "train_step";
    const int B = 2, L = o->latent, T = a->text.max_positions, C = a->unet.in_channels;
    /* useful work: forward + backward = 3 forwards of the batch */
    const double gflop = 3 * 2 * B * unet_macs(&a->unet, L, L, T) * 1e-9;
    const size_t n = (size_t)B * C * L * L;
    db_err err = {0};
    /* lr tiny and no warm-up: the weights stay near their init whatever
     * the step count, so every step does the same arithmetic */
    db_train_opts to = db_train_opts_defaults(1e-9, 1000000);
    to.gradient_checkpointing = o->ckpt;
    to.fused_backward = fused;
    to.train_text = o->text;
    to.optimizer = o->optimizer;
    to.no_graph = mode == 2;
    to.no_grad16 = mode == 3;
    train_arg t = {0};
    float *lat = malloc(n * sizeof *lat), *noise = malloc(n * sizeof *noise);
    int64_t ts[2] = {250, 750};
    int32_t *ids = malloc((size_t)B * T * sizeof *ids);
    if (!lat || !noise || !ids || db_trainer_create(&t.tr, c, m, &to, &err)) {
        if (!err.code)
            db_err_set(&err, DB_ENOMEM, "out of memory");
        for (int i = 0; i < np; i++)
            report_error(name, precs[i], err.msg);
        goto out;
    }
    db_noise_fill(lat, n, 3, 0, 0);
    db_noise_fill(noise, n, 4, 0, 0);
    for (int i = 0; i < B * T; i++) /* BOS, a few words, EOS padding (ids below any vocabulary's size) */
        ids[i] = i % T == 0 ? 49406 % a->text.vocab_size : i % T < 6 ? 320 + i % T : 49407 % a->text.vocab_size;
    t.b = (db_train_batch){.B = B, .n_inst = 1, .C = C, .H = L, .W = L, .T = T, .latents = lat, .noise = noise,
                           .timesteps = ts, .ids = ids};
    for (int i = 0; i < np; i++) {
        double ms, pk;
        int reps;
        db_ctx_clear_error(c);
        if (fused && precs[i] == DB_PREC_F16) { /* refused by the trainer (no skipping once begun) */
            report_error(name, precs[i], "the fused backward takes no fp16");
            continue;
        }
        if (mode == 3 && precs[i] != DB_PREC_BF16)
            continue;
        db_ctx_set_precision(c, precs[i]);
        db_train_device_plan plan;
        const double plan_mib = c->device == DB_CPU ? 0 : train_plan(a, m, B, L, T, o, fused, mode != 2, precs[i], &plan);
        /* four warm-up steps: the first builds the plans; the backward's
         * graph is recorded at the second, the forward's only at the third
         * (the backward's first call changed the UNet's layout after the
         * forward's first: db_unet_graph_run starts over); call 5 timed that
         * third step with two warm-ups */
        if (measure(c, name, train_call, &t, 4, o->reps, o->budget, &ms, &reps, &pk, &err)) {
            report_error(name, precs[i], err.msg);
        } else {
            char extra[64];
            snprintf(extra, sizeof extra, "%s%s%s", o->ckpt ? " checkpointing=1" : "", o->text ? " text_encoder=1" : "",
                     o->optimizer == DB_OPTIM_ADAMW8BIT ? " optimizer=adamw8bit" : "");
            report(name, precs[i], ms, gflop, pk, plan_mib, reps, *extra ? extra + 1 : NULL);
            if (plan_mib > 0)
                printf("# plan (MiB): weights %.1f, grads %.1f, AdamW %.1f, UNet activations %.1f, text %.1f, "
                       "batch %.1f, conversion %.1f, cuDNN workspace %.1f, rounding %.1f, graphs %.1f; measured "
                       "peak %.1f (%+.1f%% vs plan)\n",
                       plan.weights / 1048576.0, plan.grads / 1048576.0, plan.moments / 1048576.0,
                       plan.unet_act / 1048576.0, plan.text_act / 1048576.0, plan.batch / 1048576.0,
                       plan.convert / 1048576.0, plan.conv_ws / 1048576.0, plan.rounding / 1048576.0,
                       plan.graphs / 1048576.0, pk,
                       100.0 * (pk - plan_mib) / plan_mib);
            fflush(stdout); /* a timeout may end the program before the next figure */
        }
        db_err_clear(&err);
    }
    if (o->save && mode == 0 && t.tr)
        bench_save(t.tr);
out:
    db_trainer_free(t.tr);
    free(lat), free(noise), free(ids);
    db_ctx_set_precision(c, DB_PREC_F32);
}

/* ---- (c) text to image, and the VAE decode alone ------------------------------------------------ */

typedef struct sample_arg {
    db_sd *sd;
    db_txt2img_opts o;
} sample_arg;

static int sample_call(void *p, db_err *err)
{
    sample_arg *a = p;
    db_txt2img_out out;
    if (db_txt2img(a->sd, &a->o, 1, 0, &out, err))
        return -1;
    db_txt2img_out_free(&out);
    return 0;
}

typedef struct vae_arg {
    db_vae *v;
    float *img, *z;
    int h, w;
} vae_arg;

static int vae_call(void *p, db_err *err)
{
    vae_arg *a = p;
    return db_vae_decode(a->v, a->img, a->z, 1, a->h, a->w, err);
}

/* One more timed sample of s (a variant of the loop), reported as name */
static void sample_variant(db_ctx *c, const char *name, sample_arg *s, db_precision prec, double gflop,
                           const char *extra)
{
    double ms, pk;
    int reps;
    db_err err = {0};
    if (measure(c, name, sample_call, s, 0, 1, 0, &ms, &reps, &pk, &err))
        report_error(name, prec, err.msg);
    else
        report(name, prec, ms, gflop, pk, 0, reps, extra);
}

static void bench_sample(db_ctx *c, const db_arch *a, const db_model *m, const db_weights *hw,
                         const db_precision *precs, int np, const double *fwd_ms, const opts *o, int want_sample,
                         int want_vae)
{
    const int L = o->latent, T = a->text.max_positions, f = 1 << (a->vae.nlevels - 1);
    const double unet_gflop = 2 * unet_macs(&a->unet, L, L, T) * 1e-9; /* one sample */
    const double vae_gflop = 2 * vae_decode_macs(&a->vae, L, L) * 1e-9;
    db_err err = {0};
    db_sd sd;
    memset(&sd, 0, sizeof sd);
    sd.ctx = c;
    sd.model = *m; /* read only: scheduler config, architecture, the tensors of CLIP and the VAE */
    sd.threads = o->threads;
    sd.keep_models = 1; /* loaded by the warm-up, kept for the timed runs */
    sample_arg s = {.sd = &sd,
                    .o = {.prompt = "a photo of a dog on the moon", .negative = "", .scheduler = "ddim",
                          .steps = 2, .guidance = 7.5, .width = L * f, .height = L * f, .n_images = 1, .batch = 1,
                          .seed = o->seed}};
    vae_arg v = {.h = L, .w = L};
    if (want_sample && unet_from_host(&sd.unet, c, a, hw, &err)) {
        for (int i = 0; i < np; i++) {
            if (want_sample)
                report_error("sample_ddim_cfg", precs[i], err.msg);
            if (want_vae)
                report_error("vae_decode", precs[i], err.msg);
        }
        return;
    }
    for (int i = 0; i < np; i++) {
        double ms, pk;
        int reps;
        char extra[64];
        db_ctx_clear_error(c);
        db_ctx_set_precision(c, precs[i]);
        if (want_sample) {
            /* warm-up: a 2-step run loads the text encoder and the VAE and
             * builds every plan; then one timed run of as many steps as
             * --sample-budget allows by the forward's time (all of them
             * unless the device is slow) */
            s.o.steps = 2;
            double per_step = fwd_ms[i] > 0 ? 1.15e-3 * fwd_ms[i] : 0;
            int steps = o->steps;
            if (per_step > 0 && o->sample_budget > 0 && steps * per_step > o->sample_budget)
                steps = (int)(o->sample_budget / per_step);
            steps = steps < 2 ? 2 : steps;
            if (timed_call(c, sample_call, &s, &err) < 0) {
                report_error("sample_ddim_cfg", precs[i], err.msg);
            } else {
                s.o.steps = steps;
                if (measure(c, "sample_ddim_cfg", sample_call, &s, 0, 1, 0, &ms, &reps, &pk, &err)) {
                    report_error("sample_ddim_cfg", precs[i], err.msg);
                } else {
                    snprintf(extra, sizeof extra, "steps=%d%s", steps, steps < o->steps ? " shortened=1" : "");
                    report("sample_ddim_cfg", precs[i], ms, steps * 2 * unet_gflop + vae_gflop, pk, 0, reps, extra);
                    /* the timed run replays the step graph the warm-up
                     * recorded (db_sd.step, since session 20: db-prior's
                     * samples after its first, db-sample's batches after
                     * its first); the same run with the step made afresh,
                     * its first step op by op and its graph recorded at
                     * the second (every call until session 20) */
                    db_sd_drop_step(&sd);
                    const double gf = steps * 2 * unet_gflop + vae_gflop;
                    sample_variant(c, "sample_ddim_cfg_fresh", &s, precs[i], gf, extra);
                    /* the same run with the scheduler stepping on the host
                     * between the UNet's calls (txt2img.h host_step: the
                     * loop before session 26, where the host waits for
                     * every step and the GPU for every graph launch) */
                    s.o.host_step = 1;
                    sample_variant(c, "sample_ddim_cfg_hoststep", &s, precs[i], gf, extra);
                    s.o.host_step = 0;
                    /* the same run with every step launched op by op (db-sample --no-graph) */
                    s.o.no_graph = 1;
                    sample_variant(c, "sample_ddim_cfg_nograph", &s, precs[i], gf, extra);
                    s.o.no_graph = 0;
                }
            }
            db_err_clear(&err);
        }
        if (want_vae) {
            db_ctx_clear_error(c);
            if (!sd.vae && db_vae_create(&sd.vae, c, m, &err)) {
                report_error("vae_decode", precs[i], err.msg);
                db_err_clear(&err);
                continue;
            }
            v.v = sd.vae;
            if (!v.img)
                v.img = dev_noise(c, (size_t)a->vae.out_channels * L * f * L * f, 5);
            if (!v.z)
                v.z = dev_noise(c, (size_t)a->vae.latent_channels * L * L, 6);
            if (!v.img || !v.z)
                db_err_set(&err, DB_ENOMEM, "out of device memory for the image");
            if (err.code || measure(c, "vae_decode", vae_call, &v, 1, o->reps, o->budget, &ms, &reps, &pk, &err))
                report_error("vae_decode", precs[i], err.msg);
            else
                report("vae_decode", precs[i], ms, vae_gflop, pk, 0, reps, NULL);
            db_err_clear(&err);
        }
    }
    db_ctx_free(c, v.img), db_ctx_free(c, v.z);
    db_sd_drop_step(&sd); /* its graph replays into the UNet's buffers */
    if (sd.clip)
        db_clip_free(sd.clip);
    if (sd.tok)
        db_tokenizer_free(sd.tok);
    if (sd.vae)
        db_vae_free(sd.vae);
    db_unet_free(sd.unet);
    db_ctx_set_precision(c, DB_PREC_F32);
}

/* ---- main ---------------------------------------------------------------------------------------- */

static int has(const char *list, const char *word)
{
    const size_t n = strlen(word);
    for (const char *p = list; p && *p;) {
        const char *e = strchr(p, ',');
        const size_t k = e ? (size_t)(e - p) : strlen(p);
        if (k == n && !strncmp(p, word, n))
            return 1;
        p = e ? e + 1 : NULL;
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench_sd [--device cpu|cuda[:N]] [--precision fp32,bf16,fp16] [--only fwd,train,sample,vae]\n"
               "                [--tiny] [--latent L] [--steps N] [--reps N] [--budget S] [--sample-budget S]\n"
               "                [--gradient-checkpointing] [--fused-backward] [--train-text-encoder]\n"
               "                [--optimizer adamw|adamw8bit] [--save] [--plan] [--threads N] [--seed N]\n"
               "  --only also takes fused: the fused-backward step alone\n");
}

int main(int argc, char **argv)
{
    opts o = {.device = "cpu", .precisions = "fp32", .only = "fwd,train,sample,vae", .latent = 0, .steps = 50,
              .reps = 10, .budget = 4, .sample_budget = 20, .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define VAL() (v ? (i++, v) : (usage(stderr), exit(2), ""))
        if (!strcmp(k, "--device"))
            o.device = VAL();
        else if (!strcmp(k, "--precision"))
            o.precisions = VAL();
        else if (!strcmp(k, "--only"))
            o.only = VAL();
        else if (!strcmp(k, "--tiny"))
            o.tiny = 1;
        else if (!strcmp(k, "--latent"))
            o.latent = atoi(VAL());
        else if (!strcmp(k, "--steps"))
            o.steps = atoi(VAL());
        else if (!strcmp(k, "--reps"))
            o.reps = atoi(VAL());
        else if (!strcmp(k, "--budget"))
            o.budget = atof(VAL());
        else if (!strcmp(k, "--sample-budget"))
            o.sample_budget = atof(VAL());
        else if (!strcmp(k, "--gradient-checkpointing"))
            o.ckpt = 1;
        else if (!strcmp(k, "--fused-backward"))
            o.fused = 1;
        else if (!strcmp(k, "--plan"))
            o.plan = 1;
        else if (!strcmp(k, "--train-text-encoder"))
            o.text = 1;
        else if (!strcmp(k, "--optimizer")) {
            const char *w = VAL();
            if (db_optim_parse(w, &o.optimizer)) {
                fprintf(stderr, "bench_sd: --optimizer %s: unknown (adamw or adamw8bit)\n", w);
                return 2;
            }
        } else if (!strcmp(k, "--save"))
            o.save = 1;
        else if (!strcmp(k, "--threads"))
            o.threads = atoi(VAL());
        else if (!strcmp(k, "--seed"))
            o.seed = strtoull(VAL(), NULL, 10);
        else if (!strcmp(k, "--help") || !strcmp(k, "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
#undef VAL
    }
    db_precision precs[8];
    int np = 0;
    for (const char *p = o.precisions; p && *p && np < 8;) {
        char w[16];
        const char *e = strchr(p, ',');
        snprintf(w, sizeof w, "%.*s", (int)(e ? e - p : (long)strlen(p)), p);
        const int pr = db_precision_parse(w);
        if (pr < 0) {
            fprintf(stderr, "bench_sd: unknown precision '%s' (fp32, bf16, fp16)\n", w);
            return 2;
        }
        precs[np++] = (db_precision)pr;
        p = e ? e + 1 : NULL;
    }
    static const char *const known[] = {"fwd", "train", "sample", "vae", "fused"};
    for (const char *p = o.only; p && *p;) {
        const char *e = strchr(p, ',');
        int ok = 0;
        for (size_t k = 0; k < 5; k++)
            ok |= (size_t)(e ? e - p : (long)strlen(p)) == strlen(known[k]) && !strncmp(p, known[k], strlen(known[k]));
        if (!ok) {
            fprintf(stderr, "bench_sd: --only takes fwd, train, sample, vae, fused\n");
            return 2;
        }
        p = e ? e + 1 : NULL;
    }
    if (o.reps < 1 || o.steps < 1 || np == 0) {
        usage(stderr);
        return 2;
    }
    const char *arch_name = o.tiny ? "tiny" : "sd15";
    db_err err = {0};
    db_arch a;
    db_model m;
    db_ctx *c = NULL;
    db_weights hw = {0};
    const double t0 = now();
    const int want_fwd = has(o.only, "fwd"), want_train = has(o.only, "train"), want_sample = has(o.only, "sample"),
              want_vae = has(o.only, "vae");
    if (has(o.only, "fused")) { /* with train: as --fused-backward */
        o.fused = 1;
        o.fused_only = !want_train;
    }
    devname_ = strncmp(o.device, "cuda", 4) ? "cpu" : "cuda";
    if (o.plan)
        return print_plans(&o, arch_name, precs, np, want_train);
    if (db_arch_preset(&a, arch_name, &err) || db_ctx_create_device(&c, o.device, o.threads, &err)) {
        /* every figure asked for, as failed: the table says why rather than nothing */
        fprintf(stderr, "bench_sd: %s\n", err.msg);
        static const char *const names[] = {"unet_fwd_b2",      "unet_fwd_b2_graph", "train_step",
                                            "train_step_nograph", "train_step_fused",  "checkpoint_save",
                                            "sample_ddim_cfg",  "sample_ddim_cfg_nograph", "vae_decode"};
        const int want[] = {want_fwd,    want_fwd,    want_train, want_train, (want_train || o.fused_only) && o.fused,
                            want_train && o.save, want_sample, want_sample, want_vae};
        for (int k = 0; k < 9; k++)
            for (int i = 0; i < np && want[k]; i++)
                report_error(names[k], precs[i], err.msg);
        return 1;
    }
    if (!o.latent)
        o.latent = a.unet.sample_size;
    const int mult = 1 << (a.unet.nlevels - 1);
    if (o.latent <= 0 || o.latent % mult) {
        fprintf(stderr, "bench_sd: --latent must be a positive multiple of %d\n", mult);
        return 2;
    }
    /* Random weights generated once: the UNet's kept on the host for the
     * forward and the sampler (the trainer reads its own from m) */
    if (db_model_init_random(&m, &a, o.seed, DB_F32, &err) ||
        ((want_fwd || want_sample) && db_weights_load(&hw, &m, DB_COMP_UNET, &err))) {
        fprintf(stderr, "bench_sd: %s\n", err.msg);
        return 1;
    }
    printf("# bench_sd: %s (random weights), device %s, %d thread(s), latents %dx%d (images %dx%d), precision %s; "
           "UNet forward %.1f GMAC per sample; setup %.1f s\n",
           arch_name, o.device, c->threads, o.latent, o.latent, o.latent * 8, o.latent * 8, o.precisions,
           unet_macs(&a.unet, o.latent, o.latent, a.text.max_positions) * 1e-9, now() - t0);
    fflush(stdout);
    double fwd_ms[8] = {0};
    if (want_fwd) {
        const int before = nfig;
        bench_fwd(c, &a, &hw, precs, np, &o);
        for (int i = before, k = 0; i < nfig && k < np; i++, k++)
            fwd_ms[k] = figs[i].ok ? figs[i].ms : 0;
    }
    if (want_train || o.fused_only) {
        if (!want_sample && hw.data) /* no longer needed: give the trainer the room */
            db_weights_free(&hw);
        if (want_train) {
            bench_train(c, &a, &m, precs, np, &o, 0);
            bench_train(c, &a, &m, precs, np, &o, 3); /* beside it: what the packed gradients save */
            bench_train(c, &a, &m, precs, np, &o, 2);
        }
        if (o.fused)
            bench_train(c, &a, &m, precs, np, &o, 1);
    }
    if (want_sample || want_vae)
        bench_sample(c, &a, &m, &hw, precs, np, fwd_ms, &o, want_sample, want_vae);
    if (hw.data)
        db_weights_free(&hw);
    db_model_close(&m);
    db_ctx_destroy(c);

    printf("\n| figure (ours, %s, %s) | precision | ms | TFLOP/s | peak MiB | plan MiB | reps | |\n", arch_name,
           o.device);
    printf("|---|---|---:|---:|---:|---:|---:|---|\n");
    for (int i = 0; i < nfig; i++) {
        const figure *f = &figs[i];
        if (!f->ok) {
            printf("| %s | %s | error | | | | | |\n", f->name, f->prec);
            continue;
        }
        char plan[32] = "";
        if (f->plan_mib > 0)
            snprintf(plan, sizeof plan, "%.0f", f->plan_mib);
        printf("| %s | %s | %.2f | %.3g | %.0f | %s | %d | %s |\n", f->name, f->prec, f->ms, f->tflops, f->peak_mib,
               plan, f->reps, f->extra);
    }
    printf("\n# total %.1f s\n", now() - t0);
    return failures ? 1 : 0;
}
