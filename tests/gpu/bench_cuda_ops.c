/* GPU micro-benchmark of the main forward ops at SD1.5 shapes (and the conv
 * and linear backward): milliseconds per call from cudaEvents on the ctx's
 * stream (db_cuda_time_ms in libdb_cuda.so, outside the op table: this C
 * program has no CUDA toolchain), median of REPS repeats of ITERS calls after
 * a warm-up, and the rate in TFLOP/s (GB/s for the memory-bound ones).
 * Inputs are random (never zeros); each op is timed on its own buffers.
 *
 *   usage: bench_cuda_ops            (library found as test_cuda_ops finds it)
 *   BENCH_OPS_ONLY=bf16 bench_cuda_ops: the bf16 table alone (fp32 likewise)
 * Prints a markdown table on stdout; exit 0, or 0 with a note when there is
 * no library or device. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cuda_api.h"
#include "libcommon/sd/noise.h"
#include "tests/unit/tap.h"

enum { WARMUP = 3, ITERS = 10, REPS = 5 };

static const db_cuda_api *api;
typedef int (*time_fn)(db_ctx *c, int (*fn)(db_ctx *, void *), void *arg, int warmup, int iters, float *ms);
static time_fn timer;

/* one benchmark case: the op and its device buffers */
typedef struct bcase {
    int kind; /* which op: the K_ values below */
    int i[12];
    float *p[8];
} bcase;

enum {
    K_CONV,
    K_CONV_BWD,
    K_GEMM,
    K_LINEAR,
    K_LINEAR_BWD,
    K_ATTN,
    K_GROUPNORM,
    K_GROUPNORM_BWD,
    K_LAYERNORM,
    K_CONV_ADD,      /* conv2d_add_forward, the addend per channel (i[10]) or whole */
    K_CONV_THEN_ADD, /* the same as two ops: conv2d_forward, then add_channel_forward or add_forward */
};

static int run_case(db_ctx *c, void *arg)
{
    bcase *b = arg;
    const int *i = b->i;
    float **p = b->p;
    switch (b->kind) {
    case K_CONV:
        return api->conv2d_forward(c, p[0], p[1], p[2], p[3], i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8],
                                   i[9]);
    case K_CONV_BWD:
        return api->conv2d_backward(c, p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], i[2], i[3], i[4], i[5], i[6],
                                    i[7], i[8], i[9], i[10]);
    case K_GEMM:
        return api->gemm_forward(c, p[0], p[1], p[2], i[0], i[1], i[2], i[3], i[4], i[5], 1.0f, 0.0f);
    case K_LINEAR:
        return api->linear_forward(c, p[0], p[1], p[2], p[3], i[0], i[1], i[2]);
    case K_LINEAR_BWD:
        return api->linear_backward(c, p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], i[2], i[3]);
    case K_ATTN:
        return api->attention_forward(c, p[0], p[1], p[2], p[3], p[4], i[0], i[1], i[2], i[3], i[4], i[5]);
    case K_GROUPNORM:
        return api->groupnorm_forward(c, p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], i[2], i[3], 1e-5f, 1);
    case K_GROUPNORM_BWD: /* dinp, dweight, dbias; dout, mean, rstd, x; weight and bias one buffer */
        return api->groupnorm_backward(c, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[7] + i[1], i[0], i[1],
                                       i[2], i[3], 1, 0);
    case K_LAYERNORM:
        return api->layernorm_forward(c, p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], 1e-5f);
    case K_CONV_ADD:
        return api->conv2d_add_forward(c, p[0], p[1], p[2], p[3], p[4], i[10], i[0], i[1], i[2], i[3], i[4], i[5],
                                       i[6], i[7], i[8], i[9]);
    case K_CONV_THEN_ADD:
        if (api->conv2d_forward(c, p[0], p[1], p[2], p[3], i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8],
                                i[9]))
            return -1;
        return i[10] ? api->add_channel_forward(c, p[0], p[0], p[4], i[0], i[4], i[2] * i[3])
                     : api->add_forward(c, p[0], p[0], p[4], (size_t)i[0] * i[4] * i[2] * i[3]);
    }
    return -1;
}

static float *drand(db_ctx *c, size_t n, uint64_t stream)
{
    float *h = malloc(n * sizeof *h);
    float *d = api->alloc(c, n * sizeof *d);
    if (!h || !d) {
        fprintf(stderr, "bench_cuda_ops: out of memory (%zu floats): %s\n", n, c->err.msg);
        exit(2);
    }
    db_noise_fill(h, n, 7, stream, 0);
    api->copy(c, d, h, n * sizeof *d, DB_COPY_H2D);
    free(h);
    return d;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* times fn(arg); flops > 0: report TFLOP/s, else bytes: GB/s */
static void bench_fn(db_ctx *c, const char *name, int (*fn)(db_ctx *, void *), void *arg, double flops, double bytes)
{
    float t[REPS];
    for (int r = 0; r < REPS; r++) {
        if (timer(c, fn, arg, r == 0 ? WARMUP : 0, ITERS, &t[r]) != 0) {
            printf("| %s | error: %s | | |\n", name, c->err.msg);
            c->err.code = 0;
            c->err.msg[0] = 0;
            return;
        }
    }
    qsort(t, REPS, sizeof t[0], cmp_float);
    const double ms = t[REPS / 2];
    if (flops > 0)
        printf("| %s | %.3f | %.1f GFLOP/s | %.2f TFLOP/s |\n", name, ms, flops / ms * 1e-6, flops / ms * 1e-9);
    else
        printf("| %s | %.3f | %.1f GB/s | |\n", name, ms, bytes / ms * 1e-6);
    fflush(stdout);
}

static void bench(db_ctx *c, const char *name, bcase *b, double flops, double bytes)
{
    bench_fn(c, name, run_case, b, flops, bytes);
}

/* A ResBlock's convolution with its sum (3x3, stride 1, padded): the fused
 * op beside the two ops it replaces, on the same buffers; per_channel the
 * time embedding (conv1), else the shortcut onto out itself (conv2) */
static void conv_add_case(db_ctx *c, int B, int C, int H, int W, int OC, int per_channel)
{
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * 9, ny = (size_t)B * OC * H * W;
    float *x = drand(c, nx, 1), *w = drand(c, nw, 2), *bias = drand(c, OC, 3), *y = drand(c, ny, 4);
    /* the addend: (B, OC) per channel; else the fused op's is out itself
     * and the two ops' a tensor of its own (what the ResBlock passed before) */
    float *add = per_channel ? drand(c, (size_t)B * OC, 5) : drand(c, ny, 5);
    for (int two = 0; two < 2; two++) {
        bcase b = {two ? K_CONV_THEN_ADD : K_CONV_ADD,
                   {B, C, H, W, OC, 3, 3, 1, 1, 1, per_channel},
                   {y, x, w, bias, per_channel || two ? add : y}};
        char name[160];
        snprintf(name, sizeof name, "%s B%d %d->%d %dx%d %s", two ? "conv2d then add" : "conv2d_add_forward", B, C, OC,
                 H, W, per_channel ? "+ per channel" : "onto out");
        bench(c, name, &b, 2.0 * B * OC * H * W * (double)C * 9, 0);
    }
    float *all[] = {x, w, bias, y, add};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        api->free(c, all[i]);
}

/* SD1.5's 22 ResBlock time projections of silu(temb) (2 x 1280): one
 * linear_fan_forward against 22 linear_forward calls (what a forward did
 * before, 3 launches each) */
enum { FAN_N = 22 };
typedef struct fan_bench {
    float *out[FAN_N];
    const float *w[FAN_N], *b[FAN_N];
    int oc[FAN_N];
    const float *x;
    int loop;
} fan_bench;

static int run_fan(db_ctx *c, void *arg)
{
    fan_bench *f = arg;
    if (!f->loop)
        return api->linear_fan_forward(c, f->out, f->x, f->w, f->b, f->oc, FAN_N, 2, 1280);
    for (int i = 0; i < FAN_N; i++)
        if (api->linear_forward(c, f->out[i], f->x, f->w[i], f->b[i], 2, 1280, f->oc[i]))
            return -1;
    return 0;
}

static void fan_case(db_ctx *c)
{
    /* the widths in step order: down 320 320 640 640 1280 1280 1280 1280,
     * mid 1280 1280, up 1280 x6, 640 x3, 320 x3 */
    static const int oc[FAN_N] = {320,  320,  640,  640,  1280, 1280, 1280, 1280, 1280, 1280, 1280,
                                  1280, 1280, 1280, 1280, 1280, 640,  640,  640,  320,  320,  320};
    fan_bench f = {.x = drand(c, 2 * 1280, 1)};
    double flops = 0;
    for (int i = 0; i < FAN_N; i++) {
        f.out[i] = drand(c, (size_t)2 * oc[i], 10 + i);
        f.w[i] = drand(c, (size_t)oc[i] * 1280, 40 + i);
        f.b[i] = drand(c, oc[i], 70 + i);
        f.oc[i] = oc[i];
        flops += 2.0 * 2 * 1280 * oc[i];
    }
    for (f.loop = 0; f.loop < 2; f.loop++)
        bench_fn(c, f.loop ? "time projections: 22 x linear_forward 2x1280" : "time projections: linear_fan_forward 22",
                 run_fan, &f, flops, 0);
    for (int i = 0; i < FAN_N; i++) {
        api->free(c, f.out[i]);
        api->free(c, (float *)f.w[i]);
        api->free(c, (float *)f.b[i]);
    }
    api->free(c, (float *)f.x);
}

/* bwd 0 the forward, 1 the backward (+= into the parameter gradients), 2
 * the backward with ops.h assign (what the UNet's backward does in db-train) */
static void conv_case(db_ctx *c, int B, int C, int H, int W, int OC, int k, int stride, int pad0, int pad1, int bwd)
{
    const int OH = (H + pad0 + pad1 - k) / stride + 1, OW = (W + pad0 + pad1 - k) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * k * k, ny = (size_t)B * OC * OH * OW;
    bcase b = {bwd ? K_CONV_BWD : K_CONV, {B, C, H, W, OC, k, k, stride, pad0, pad1, bwd == 2}, {0}};
    float *x = drand(c, nx, 1), *w = drand(c, nw, 2), *bias = drand(c, OC, 3), *y = drand(c, ny, 4);
    float *dx = drand(c, nx, 5), *dw = drand(c, nw, 6), *db = drand(c, OC, 7);
    if (bwd) {
        float *q[8] = {dx, dw, db, y, x, w};
        memcpy(b.p, q, sizeof q);
    } else {
        float *q[8] = {y, x, w, bias};
        memcpy(b.p, q, sizeof q);
    }
    char name[160];
    snprintf(name, sizeof name, "conv2d_%s B%d %d->%d %dx%d k%d s%d%s", bwd ? "backward" : "forward", B, C, OC, H, W,
             k, stride, bwd == 2 ? " (assign)" : "");
    const double flops = 2.0 * B * OC * OH * OW * (double)C * k * k * (bwd ? 2 : 1);
    bench(c, name, &b, flops, 0);
    float *all[] = {x, w, bias, y, dx, dw, db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        api->free(c, all[i]);
}

static void gemm_case(db_ctx *c, int batch, int M, int N, int K, int ta, int tb)
{
    bcase b = {K_GEMM, {batch, M, N, K, ta, tb}, {0}};
    b.p[0] = drand(c, (size_t)batch * M * N, 1);
    b.p[1] = drand(c, (size_t)batch * M * K, 2);
    b.p[2] = drand(c, (size_t)batch * K * N, 3);
    char name[160];
    snprintf(name, sizeof name, "gemm_forward b%d %dx%dx%d t%d%d", batch, M, N, K, ta, tb);
    bench(c, name, &b, 2.0 * batch * M * (double)N * K, 0);
    for (int i = 0; i < 3; i++)
        api->free(c, b.p[i]);
}

/* bwd as conv_case's */
static void linear_case(db_ctx *c, int N, int C, int OC, int bwd)
{
    bcase b = {bwd ? K_LINEAR_BWD : K_LINEAR, {N, C, OC, bwd == 2}, {0}};
    float *x = drand(c, (size_t)N * C, 1), *w = drand(c, (size_t)OC * C, 2), *bias = drand(c, OC, 3);
    float *y = drand(c, (size_t)N * OC, 4), *dx = drand(c, (size_t)N * C, 5), *dw = drand(c, (size_t)OC * C, 6);
    float *db = drand(c, OC, 7);
    if (bwd) {
        float *q[8] = {dx, dw, db, y, x, w};
        memcpy(b.p, q, sizeof q);
    } else {
        float *q[8] = {y, x, w, bias};
        memcpy(b.p, q, sizeof q);
    }
    char name[160];
    snprintf(name, sizeof name, "linear_%s %dx%d->%d%s", bwd ? "backward" : "forward", N, C, OC,
             bwd == 2 ? " (assign)" : "");
    bench(c, name, &b, 2.0 * N * (double)C * OC * (bwd ? 2 : 1), 0);
    float *all[] = {x, w, bias, y, dx, dw, db};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        api->free(c, all[i]);
}

static void attn_case(db_ctx *c, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    const size_t C = (size_t)NH * HS;
    bcase b = {K_ATTN, {B, Tq, Tk, NH, HS, causal}, {0}};
    b.p[0] = drand(c, (size_t)B * Tq * C, 1);
    b.p[1] = drand(c, (size_t)B * NH * Tq, 2);
    b.p[2] = drand(c, (size_t)B * Tq * C, 3);
    b.p[3] = drand(c, (size_t)B * Tk * C, 4);
    b.p[4] = drand(c, (size_t)B * Tk * C, 5);
    char name[160];
    snprintf(name, sizeof name, "attention_forward B%d Tq%d Tk%d %dx%d%s", B, Tq, Tk, NH, HS, causal ? " causal" : "");
    /* QK^T and PV: 4 B NH Tq Tk HS (causal: about half, counted in full) */
    bench(c, name, &b, 4.0 * B * NH * (double)Tq * Tk * HS, 0);
    for (int i = 0; i < 5; i++)
        api->free(c, b.p[i]);
}

static void groupnorm_case(db_ctx *c, int B, int C, int HW, int G)
{
    const size_t n = (size_t)B * C * HW;
    bcase b = {K_GROUPNORM, {B, C, HW, G}, {0}};
    b.p[0] = drand(c, n, 1);
    b.p[1] = drand(c, (size_t)B * G, 2);
    b.p[2] = drand(c, (size_t)B * G, 3);
    b.p[3] = drand(c, n, 4);
    b.p[4] = drand(c, C, 5);
    b.p[5] = drand(c, C, 6);
    bcase bb = {K_GROUPNORM_BWD, {B, C, HW, G}, {0}};
    bb.p[0] = drand(c, n, 7);
    bb.p[1] = drand(c, C, 8);
    bb.p[2] = drand(c, C, 9);
    bb.p[3] = drand(c, n, 10);
    bb.p[4] = b.p[1];
    bb.p[5] = b.p[2];
    bb.p[6] = b.p[3];
    bb.p[7] = drand(c, 2 * (size_t)C, 11);
    char name[160];
    /* the rate as one read and a write (what a group in shared memory
     * costs, norm.cu groupnorm_whole_kernel; the backward: two reads and a
     * write); the pieces' kernels read the input twice, the second time
     * mostly from L2 at the UNet's sizes.  Then the same with a block a
     * group (DB_GN_CLUSTER=1, where norm.cu would split a group over a
     * cluster), in clusters of 4 (where a block's stretch fits; else the
     * pieces) and in pieces (DB_GN_WHOLE=0), to compare. */
    static const char *const env[4] = {NULL, "DB_GN_CLUSTER", "DB_GN_CLUSTER", "DB_GN_WHOLE"},
                             *const val[4] = {NULL, "1", "4", "0"};
    for (int back = 0; back < 2; back++)
        for (int v = 0; v < 4; v++) {
            char how[40] = "";
            if (env[v])
                snprintf(how, sizeof how, " (%s=%s)", env[v], val[v]);
            snprintf(name, sizeof name, "groupnorm_%s+silu B%d C%d HW%d G%d%s", back ? "backward" : "forward", B, C,
                     HW, G, how);
            if (env[v])
                setenv(env[v], val[v], 1);
            bench(c, name, back ? &bb : &b, 0, (back ? 3.0 : 2.0) * n * sizeof(float));
            if (env[v])
                unsetenv(env[v]);
        }
    for (int i = 0; i < 6; i++)
        api->free(c, b.p[i]);
    api->free(c, bb.p[0]);
    api->free(c, bb.p[1]);
    api->free(c, bb.p[2]);
    api->free(c, bb.p[3]);
    api->free(c, bb.p[7]);
}

/* the Transformer block's layer norm: N rows of C (a warp per row, norm.cu) */
static void layernorm_case(db_ctx *c, int N, int C)
{
    const size_t n = (size_t)N * C;
    bcase b = {K_LAYERNORM, {N, C}, {0}};
    b.p[0] = drand(c, n, 1);
    b.p[1] = drand(c, (size_t)N, 2);
    b.p[2] = drand(c, (size_t)N, 3);
    b.p[3] = drand(c, n, 4);
    b.p[4] = drand(c, C, 5);
    b.p[5] = drand(c, C, 6);
    char name[160];
    snprintf(name, sizeof name, "layernorm_forward %dx%d", N, C);
    bench(c, name, &b, 0, 2.0 * n * sizeof(float)); /* a read (the re-reads hit L1) and a write */
    for (int i = 0; i < 6; i++)
        api->free(c, b.p[i]);
}

int main(void)
{
    char path[4200];
    void *lib = tap_cuda_open(path, sizeof path);
    if (!lib) {
        printf("# bench_cuda_ops: cannot load %s: %s\n", path, dlerror());
        return 0;
    }
    const db_cuda_api *(*get)(int) = (const db_cuda_api *(*)(int))dlsym(lib, "db_cuda_get_api");
    timer = (time_fn)dlsym(lib, "db_cuda_time_ms");
    api = get ? get(DB_CUDA_ABI) : NULL;
    if (!api || !timer) {
        printf("# bench_cuda_ops: %s lacks db_cuda_get_api(%d) or db_cuda_time_ms\n", path, DB_CUDA_ABI);
        return 0;
    }
    db_ctx g = {.device = DB_CUDA, .threads = 1};
    db_err err = {0, ""};
    if (api->ctx_init(&g, 0, &err) != 0) {
        printf("# bench_cuda_ops: no CUDA device (%s)\n", err.msg);
        return 0;
    }
    /* every case in fp32, then the matmul-class ones in bf16 (tensor
     * cores; kernels/ops.h db_precision): the table's ratio of the two is
     * the speed-up the precision mode buys per op */
    const char *only = getenv("BENCH_OPS_ONLY");
    for (int pass = 0; pass < 2; pass++) {
        if (only && strcmp(only, pass ? "bf16" : "fp32") != 0)
            continue;
        g.precision = pass ? DB_PREC_BF16 : DB_PREC_F32;
        printf("%s| op (%s) | ms | rate | |\n|---|---|---|---|\n", pass ? "\n" : "", pass ? "bf16" : "fp32");
        if (api->conv2d_forward) {
            conv_case(&g, 2, 320, 64, 64, 320, 3, 1, 1, 1, 0);
            conv_case(&g, 2, 640, 32, 32, 640, 3, 1, 1, 1, 0);
            conv_case(&g, 2, 1280, 16, 16, 1280, 3, 1, 1, 1, 0);
            conv_case(&g, 2, 1280, 8, 8, 1280, 3, 1, 1, 1, 0);
            conv_case(&g, 1, 128, 512, 512, 128, 3, 1, 1, 1, 0); /* VAE decoder top */
        }
        if (api->conv2d_add_forward) { /* a ResBlock's conv1 + time embedding, conv2 onto its shortcut */
            conv_add_case(&g, 2, 320, 64, 64, 320, 1);
            conv_add_case(&g, 2, 320, 64, 64, 320, 0);
            conv_add_case(&g, 2, 1280, 16, 16, 1280, 1);
        }
        if (api->linear_fan_forward)
            fan_case(&g);
        if (api->conv2d_backward) {
            conv_case(&g, 2, 320, 64, 64, 320, 3, 1, 1, 1, 1);
            /* the 16x16 level's: 14.7 M filter gradients, written (assign)
             * instead of read and added to */
            conv_case(&g, 2, 1280, 16, 16, 1280, 3, 1, 1, 1, 1);
            conv_case(&g, 2, 1280, 16, 16, 1280, 3, 1, 1, 1, 2);
        }
        if (api->gemm_forward) {
            gemm_case(&g, 1, 4096, 4096, 4096, 0, 0);
            gemm_case(&g, 16, 4096, 4096, 40, 0, 1); /* attention scores as a batched GEMM */
        }
        if (api->linear_forward) {
            linear_case(&g, 8192, 320, 1280, 0);
            linear_case(&g, 8192, 1280, 320, 0);
        }
        if (api->linear_backward) {
            linear_case(&g, 8192, 320, 1280, 1);
            linear_case(&g, 512, 1280, 10240, 1); /* the 16x16 level's GEGLU projection */
            linear_case(&g, 512, 1280, 10240, 2);
        }
        if (api->attention_forward) {
            attn_case(&g, 2, 4096, 4096, 8, 40, 0);
            attn_case(&g, 2, 4096, 77, 8, 40, 0);
            attn_case(&g, 2, 1024, 1024, 8, 80, 0);
            attn_case(&g, 2, 77, 77, 12, 64, 1);
        }
        if (api->groupnorm_forward && !pass) { /* not a matmul-class op: fp32 in every mode */
            groupnorm_case(&g, 2, 320, 4096, 32);
            groupnorm_case(&g, 2, 1280, 256, 32); /* the UNet's 16x16 level */
            groupnorm_case(&g, 2, 960, 4096, 32);  /* a concatenated skip at 64x64: 480 KB a group */
            groupnorm_case(&g, 1, 128, 512 * 512, 32); /* the VAE decoder's last level: 134 MB, past L2 */
        }
        if (api->layernorm_forward && !pass) { /* SD1.5's three transformer levels at batch 2 */
            layernorm_case(&g, 8192, 320);
            layernorm_case(&g, 2048, 640);
            layernorm_case(&g, 512, 1280);
        }
    }
    g.precision = DB_PREC_F32;
    api->ctx_destroy(&g);
    return 0;
}
