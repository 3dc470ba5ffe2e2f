/* Tensor-core attention forward (kernels/cuda/attention_tc.cu, the bf16 and
 * fp16 modes) against the CPU's fp32 attention (TAP).
 *
 * The kernel is internal to libdb_cuda.so (not in the op table), so it is
 * reached through the test hook db_cuda_test_attention_tc: host fp32 inputs
 * in, rounded to the compute type there, host fp32 out and lse back.  The
 * oracle is db_attention_forward on a CPU ctx (fp32) run on the SAME inputs
 * pre-rounded to bf16 / fp16 here, so what is measured is the kernel's own
 * error: P rounded to the compute type for P V (bf16: 8 significant bits,
 * fp16: 11), and fp32 summation order.  Bounds: out rel L2 <= 1e-2 (bf16),
 * 2e-3 (fp16); lse rel L2 <= 1e-5 (lse sums the fp32 p, so it is as accurate
 * as the fp32 kernel's; values are ~log Tk, so this is ~1e-5 absolute).
 * Shapes: HS 8/40/64/80/160, Tq/Tk off the 64-wide tiles, Tk = 77 (SD
 * cross-attention), causal (CLIP, HS 64), peaked scores that move a row's
 * reference max in later tiles (the O rescale path, also forced on every
 * increase with threshold 0); two runs give the same bits.
 *
 * The backward (db_cuda_test_attention_tc_backward, when the library has it):
 * see t_bwd.
 *
 * Without the library, its hook or a device: "1..0 # SKIP".
 * DB_CUDA_TEST_QUICK=1: the small shapes only (the CPU emulator).
 * DB_TEST_BITS=1: each output's bits hashed on a "# bits" line after its
 * check, so two runs (e.g. DB_ATTN_LDSM=0 and the default) can be shown to
 * give the same bits by diffing those lines.
 * DB_BENCH=1: also time SD1.5's shapes (cudaEvents on the ctx's stream),
 * the backward too, next to the fp32 backward at B 2, 4096 x 4096, 8 x 40. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cuda_api.h"
#include "libcommon/sd/noise.h"
#include "tests/unit/tap.h"

typedef int (*hook_fn)(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int dtype,
                       int B, int Tq, int Tk, int NH, int HS, int causal, float rescale_log2, int iters, float *ms);
typedef int (*bwd_fn)(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                      const float *lse, const float *q, const float *k, const float *v, int dtype, int B, int Tq, int Tk,
                      int NH, int HS, int causal, int iters, float *ms);
typedef int (*time_fn)(db_ctx *c, int (*fn)(db_ctx *, void *), void *arg, int warmup, int iters, float *ms);

static const db_cuda_api *api;
static hook_fn hook;
static bwd_fn bwd_hook;
static time_fn timer;
static db_ctx g; /* the GPU ctx */
static db_ctx *cpu;
static uint64_t stream_id = 1;

/* round to nearest even, as __float2bfloat16_rn / __float2half_rn */
static float round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u)
        return x;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

static float round_f16(float x)
{
    const float a = fabsf(x);
    if (a >= 65520.0f)
        return copysignf(INFINITY, x);
    if (a < 6.103515625e-05f) /* subnormal halves: multiples of 2^-24 */
        return nearbyintf(x * 16777216.0f) / 16777216.0f;
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
    memcpy(&x, &u, 4);
    return x;
}

/* n standard normals times scale, rounded to dtype (1 bf16, 2 fp16) */
static float *rnd(size_t n, float scale, int dtype)
{
    float *p = malloc(n * sizeof *p + 1);
    if (!p) {
        fprintf(stderr, "test_attention_tc: out of memory\n");
        exit(2);
    }
    db_noise_fill(p, n, 20261126, stream_id++, 0);
    for (size_t i = 0; i < n; i++)
        p[i] = dtype == 1 ? round_bf16(p[i] * scale) : round_f16(p[i] * scale);
    return p;
}

static float *nans(size_t n)
{
    float *p = malloc(n * sizeof *p + 1);
    memset(p, 0xff, n * sizeof *p);
    return p;
}

static void report(const char *what, const char *tensor, const float *got, const float *want, size_t n, double tol)
{
    tap_cmp r = tap_compare(got, want, n);
    int ok = r.rel <= tol; /* NaN: rel is inf */
    tap_ok(ok, "%s %s: rel L2 %.2e <= %.0e (max |diff| %.2e)", what, tensor, r.rel, tol, r.maxabs);
    if (!ok)
        tap_diag("  worst element %zu: tc %.9g cpu %.9g", r.at, (double)got[r.at], (double)want[r.at]);
    if (getenv("DB_TEST_BITS")) { /* FNV-1a over the output's bytes */
        uint64_t h = 14695981039346656037ull;
        for (size_t i = 0; i < n * sizeof *got; i++)
            h = (h ^ ((const unsigned char *)got)[i]) * 1099511628211ull;
        tap_diag("bits %s %s %016llx", what, tensor, (unsigned long long)h);
    }
}

/* one shape: qmul scales q (peaked scores); rescale < 0 is the kernel's default */
static void t_tc(int dtype, int B, int Tq, int Tk, int NH, int HS, int causal, float qmul, float rescale, int twice)
{
    char what[200];
    snprintf(what, sizeof what, "attention_tc %s B%d Tq%d Tk%d %dx%d%s%s%s", dtype == 1 ? "bf16" : "fp16", B, Tq, Tk,
             NH, HS, causal ? " causal" : "", qmul != 1.0f ? " peaked" : "", rescale == 0.0f ? " rescale-always" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = rnd(nq, qmul, dtype), *k = rnd(nk, 1, dtype), *v = rnd(nk, 1, dtype);
    float *want = nans(nq), *wlse = nans(nl), *got = nans(nq), *glse = nans(nl);
    if (db_attention_forward(cpu, want, wlse, q, k, v, B, Tq, Tk, NH, HS, causal) != 0) {
        tap_ok(0, "%s: CPU op failed: %s", what, cpu->err.msg);
        db_ctx_clear_error(cpu);
    } else if (hook(&g, got, glse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, rescale, 0, NULL) != 0) {
        tap_ok(0, "%s: tensor-core op failed: %s", what, g.err.msg);
        db_err_clear(&g.err);
    } else {
        report(what, "out", got, want, nq, dtype == 1 ? 1e-2 : 2e-3);
        report(what, "lse", glse, wlse, nl, 1e-5);
        if (twice) {
            float *again = nans(nq);
            int rc = hook(&g, again, NULL, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, rescale, 0, NULL);
            tap_ok(rc == 0 && memcmp(again, got, nq * sizeof(float)) == 0, "%s: two runs give the same bits (lse NULL)",
                   what);
            if (rc != 0)
                db_err_clear(&g.err);
            free(again);
        }
    }
    free(q), free(k), free(v), free(want), free(wlse), free(got), free(glse);
}

/* unsupported arguments are refused with DB_EUNSUPP, nothing launched */
static void t_refuse(void)
{
    float x = 0;
    int rc = hook(&g, &x, NULL, &x, &x, &x, 1, 1, 1, 1, 1, 36, 0, -1, 0, NULL);
    tap_ok(rc != 0 && g.err.code == DB_EUNSUPP, "attention_tc refuses HS 36 (not a multiple of 8): %s", g.err.msg);
    db_err_clear(&g.err);
    rc = hook(&g, &x, NULL, &x, &x, &x, 1, 1, 1, 1, 1, 168, 0, -1, 0, NULL);
    tap_ok(rc != 0 && g.err.code == DB_EUNSUPP, "attention_tc refuses HS 168 (over 160): %s", g.err.msg);
    db_err_clear(&g.err);
    rc = hook(&g, &x, NULL, &x, &x, &x, 0, 1, 1, 1, 1, 40, 0, -1, 0, NULL);
    tap_ok(rc != 0 && g.err.code == DB_EUNSUPP, "attention_tc refuses dtype 0 (fp32): %s", g.err.msg);
    db_err_clear(&g.err);
}

/* The backward (attention_tc_backward.cu) against db_attention_backward on
 * the CPU, all inputs pre-rounded to dtype: q, k, v, dout, and out from the
 * CPU forward on the rounded inputs, rounded (lse fp32 from the same
 * forward).  The kernel's own error is then P and dS rounded to the compute
 * type as mma operands (dS for dQ, P for dV, dS for dK) and fp32 summation
 * order; its outputs are not rounded.  Bounds rel L2 <= 2e-2 (bf16), 4e-3
 * (fp16); twice: two runs give the same bits, and so does dk alone (dq, dv
 * NULL). */
static void t_bwd(int dtype, int B, int Tq, int Tk, int NH, int HS, int causal, int twice, float gs)
{
    char what[200];
    snprintf(what, sizeof what, "attention_tc backward %s B%d Tq%d Tk%d %dx%d%s%s", dtype == 1 ? "bf16" : "fp16", B,
             Tq, Tk, NH, HS, causal ? " causal" : "", gs != 1.0f ? " small dout" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = rnd(nq, 1, dtype), *k = rnd(nk, 1, dtype), *v = rnd(nk, 1, dtype), *dout = rnd(nq, gs, dtype);
    float *out = nans(nq), *lse = nans(nl);
    float *wq = nans(nq), *wk = nans(nk), *wv = nans(nk), *gq = nans(nq), *gk = nans(nk), *gv = nans(nk);
    if (db_attention_forward(cpu, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal) != 0) {
        tap_ok(0, "%s: CPU forward failed: %s", what, cpu->err.msg);
        db_ctx_clear_error(cpu);
        goto done;
    }
    for (size_t i = 0; i < nq; i++)
        out[i] = dtype == 1 ? round_bf16(out[i]) : round_f16(out[i]);
    if (db_attention_backward(cpu, wq, wk, wv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal) != 0) {
        tap_ok(0, "%s: CPU backward failed: %s", what, cpu->err.msg);
        db_ctx_clear_error(cpu);
    } else if (bwd_hook(&g, gq, gk, gv, dout, out, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, 0, NULL) != 0) {
        tap_ok(0, "%s: tensor-core backward failed: %s", what, g.err.msg);
        db_err_clear(&g.err);
    } else {
        const double tol = dtype == 1 ? 2e-2 : 4e-3;
        report(what, "dq", gq, wq, nq, tol);
        report(what, "dk", gk, wk, nk, tol);
        report(what, "dv", gv, wv, nk, tol);
        if (twice) {
            float *aq = nans(nq), *ak = nans(nk), *av = nans(nk);
            int rc = bwd_hook(&g, aq, ak, av, dout, out, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, 0, NULL);
            tap_ok(rc == 0 && memcmp(aq, gq, nq * sizeof(float)) == 0 && memcmp(ak, gk, nk * sizeof(float)) == 0 &&
                       memcmp(av, gv, nk * sizeof(float)) == 0,
                   "%s: two runs give the same bits", what);
            if (rc != 0)
                db_err_clear(&g.err);
            free(aq), free(ak), free(av);
            /* dK alone (dq, dv NULL: the dQ pass skipped, dV not stored) gives the same bits */
            float *ok_ = nans(nk);
            rc = bwd_hook(&g, NULL, ok_, NULL, dout, out, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, 0, NULL);
            tap_ok(rc == 0 && memcmp(ok_, gk, nk * sizeof(float)) == 0, "%s: dk alone (dq, dv NULL), same bits", what);
            if (rc != 0)
                db_err_clear(&g.err);
            free(ok_);
        }
    }
done:
    free(q), free(k), free(v), free(dout), free(out), free(lse);
    free(wq), free(wk), free(wv), free(gq), free(gk), free(gv);
}

static void t_bwd_refuse(void)
{
    float x = 0;
    int rc = bwd_hook(&g, &x, &x, &x, &x, &x, &x, &x, &x, &x, 1, 1, 1, 1, 1, 36, 0, 0, NULL);
    tap_ok(rc != 0 && g.err.code == DB_EUNSUPP, "attention_tc backward refuses HS 36: %s", g.err.msg);
    db_err_clear(&g.err);
    rc = bwd_hook(&g, &x, &x, &x, &x, &x, &x, &x, &x, &x, 0, 1, 1, 1, 1, 40, 0, 0, NULL);
    tap_ok(rc != 0 && g.err.code == DB_EUNSUPP, "attention_tc backward refuses dtype 0 (fp32): %s", g.err.msg);
    db_err_clear(&g.err);
}

/* ---- DB_BENCH=1 --------------------------------------------------------------------------- */

struct f32_args {
    float *out, *lse;
    const float *q, *k, *v;
    int B, Tq, Tk, NH, HS, causal;
};

static int f32_run(db_ctx *c, void *p)
{
    const struct f32_args *a = p;
    return api->attention_forward(c, a->out, a->lse, a->q, a->k, a->v, a->B, a->Tq, a->Tk, a->NH, a->HS, a->causal);
}

static void bench(int B, int Tq, int Tk, int NH, int HS, int causal, int with_f32)
{
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    const double flop = 4.0 * B * NH * Tq * Tk * HS * (causal ? 0.5 : 1.0);
    float *q = rnd(nq, 1, 1), *k = rnd(nk, 1, 1), *v = rnd(nk, 1, 1), *out = nans(nq), *lse = nans(nl);
    for (int dtype = 1; dtype <= 2; dtype++) {
        float ms = 0;
        if (hook(&g, out, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, -1, 20, &ms) != 0) {
            printf("# bench attention_tc: %s\n", g.err.msg);
            db_err_clear(&g.err);
            continue;
        }
        printf("# bench attention_tc %s B%d Tq%d Tk%d %dx%d%s: %.4f ms, %.1f TFLOP/s\n", dtype == 1 ? "bf16" : "fp16",
               B, Tq, Tk, NH, HS, causal ? " causal" : "", (double)ms, flop / (ms * 1e-3) / 1e12);
    }
    if (with_f32 && timer) {
        struct f32_args a = {api->alloc(&g, nq * 4), api->alloc(&g, nl * 4), api->alloc(&g, nq * 4),
                             api->alloc(&g, nk * 4), api->alloc(&g, nk * 4), B, Tq, Tk, NH, HS, causal};
        float ms = 0;
        if (a.out && a.lse && a.q && a.k && a.v && api->copy(&g, (void *)a.q, q, nq * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.k, k, nk * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.v, v, nk * 4, DB_COPY_H2D) == 0 && timer(&g, f32_run, &a, 2, 5, &ms) == 0)
            printf("# bench attention fp32 (SIMT) B%d Tq%d Tk%d %dx%d%s: %.4f ms, %.1f TFLOP/s\n", B, Tq, Tk, NH, HS,
                   causal ? " causal" : "", (double)ms, flop / (ms * 1e-3) / 1e12);
        else {
            printf("# bench attention fp32: %s\n", g.err.msg);
            db_err_clear(&g.err);
        }
        api->free(&g, a.out), api->free(&g, a.lse), api->free(&g, (void *)a.q), api->free(&g, (void *)a.k);
        api->free(&g, (void *)a.v);
    }
    free(q), free(k), free(v), free(out), free(lse);
}

struct f32_bwd_args {
    float *dq, *dk, *dv;
    const float *dout, *out, *lse, *q, *k, *v;
    int B, Tq, Tk, NH, HS, causal;
};

static int f32_bwd_run(db_ctx *c, void *p)
{
    const struct f32_bwd_args *a = p;
    return api->attention_backward(c, a->dq, a->dk, a->dv, a->dout, a->out, a->lse, a->q, a->k, a->v, a->B, a->Tq,
                                   a->Tk, a->NH, a->HS, a->causal);
}

/* the backward, counted as 2.5 forwards (10 Tq Tk HS per head: S, dP, dV, dQ,
 * dK; the S recomputation of the second pass not counted) */
static void bench_bwd(int B, int Tq, int Tk, int NH, int HS, int causal, int with_f32)
{
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    const double flop = 10.0 * B * NH * Tq * Tk * HS * (causal ? 0.5 : 1.0);
    float *q = rnd(nq, 1, 1), *k = rnd(nk, 1, 1), *v = rnd(nk, 1, 1), *dout = rnd(nq, 1, 1), *out = rnd(nq, 0.3f, 1);
    float *lse = malloc(nl * sizeof *lse), *gq = nans(nq), *gk = nans(nk), *gv = nans(nk);
    for (size_t i = 0; i < nl; i++)
        lse[i] = logf((float)Tk) + 0.5f; /* about the forward's on normal inputs */
    for (int dtype = 1; dtype <= 2; dtype++) {
        float ms = 0;
        if (bwd_hook(&g, gq, gk, gv, dout, out, lse, q, k, v, dtype, B, Tq, Tk, NH, HS, causal, 10, &ms) != 0) {
            printf("# bench attention_tc backward: %s\n", g.err.msg);
            db_err_clear(&g.err);
            continue;
        }
        printf("# bench attention_tc backward %s B%d Tq%d Tk%d %dx%d%s: %.4f ms, %.1f TFLOP/s\n",
               dtype == 1 ? "bf16" : "fp16", B, Tq, Tk, NH, HS, causal ? " causal" : "", (double)ms,
               flop / (ms * 1e-3) / 1e12);
    }
    if (with_f32 && timer && api->attention_backward) {
        struct f32_bwd_args a = {api->alloc(&g, nq * 4), api->alloc(&g, nk * 4), api->alloc(&g, nk * 4),
                                 api->alloc(&g, nq * 4), api->alloc(&g, nq * 4), api->alloc(&g, nl * 4),
                                 api->alloc(&g, nq * 4), api->alloc(&g, nk * 4), api->alloc(&g, nk * 4),
                                 B, Tq, Tk, NH, HS, causal};
        float ms = 0;
        if (a.dq && a.dk && a.dv && a.dout && a.out && a.lse && a.q && a.k && a.v &&
            api->copy(&g, (void *)a.dout, dout, nq * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.out, out, nq * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.lse, lse, nl * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.q, q, nq * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.k, k, nk * 4, DB_COPY_H2D) == 0 &&
            api->copy(&g, (void *)a.v, v, nk * 4, DB_COPY_H2D) == 0 && timer(&g, f32_bwd_run, &a, 1, 3, &ms) == 0)
            printf("# bench attention backward fp32 (SIMT) B%d Tq%d Tk%d %dx%d%s: %.4f ms, %.1f TFLOP/s\n", B, Tq, Tk,
                   NH, HS, causal ? " causal" : "", (double)ms, flop / (ms * 1e-3) / 1e12);
        else {
            printf("# bench attention backward fp32: %s\n", g.err.msg);
            db_err_clear(&g.err);
        }
        api->free(&g, a.dq), api->free(&g, a.dk), api->free(&g, a.dv), api->free(&g, (void *)a.dout);
        api->free(&g, (void *)a.out), api->free(&g, (void *)a.lse), api->free(&g, (void *)a.q);
        api->free(&g, (void *)a.k), api->free(&g, (void *)a.v);
    }
    free(q), free(k), free(v), free(dout), free(out), free(lse), free(gq), free(gk), free(gv);
}

/* ---- main --------------------------------------------------------------------------------- */

int main(void)
{
    char path[4200];
    void *lib = tap_cuda_open(path, sizeof path);
    if (!lib) {
        printf("1..0 # SKIP cannot load %s: %s\n", path, dlerror());
        return 0;
    }
    const db_cuda_api *(*get)(int) = (const db_cuda_api *(*)(int))dlsym(lib, "db_cuda_get_api");
    api = get ? get(DB_CUDA_ABI) : NULL;
    hook = (hook_fn)dlsym(lib, "db_cuda_test_attention_tc");
    timer = (time_fn)dlsym(lib, "db_cuda_time_ms");
    bwd_hook = (bwd_fn)dlsym(lib, "db_cuda_test_attention_tc_backward"); /* NULL: the backward checks are skipped */
    if (!api || !hook) {
        printf("1..0 # SKIP %s has no table for ABI %d or no db_cuda_test_attention_tc\n", path, DB_CUDA_ABI);
        return 0;
    }
    db_err err = {0, ""};
    g.device = DB_CUDA;
    g.threads = 1;
    if (api->ctx_init(&g, 0, &err) != 0) {
        printf("1..0 # SKIP no CUDA device (%s)\n", err.msg);
        return 0;
    }
    if (db_ctx_create(&cpu, DB_CPU, 0, &err) != 0) {
        printf("Bail out! CPU ctx: %s\n", err.msg);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const int quick = getenv("DB_CUDA_TEST_QUICK") != NULL;

    t_refuse();
    for (int dtype = 1; dtype <= 2; dtype++) {
        t_tc(dtype, 2, 64, 64, 2, 40, 0, 1, -1, dtype == 1); /* SD level 0 head size */
        t_tc(dtype, 2, 100, 100, 2, 64, 0, 1, -1, 0);        /* off the 64-wide tiles */
        t_tc(dtype, 2, 100, 100, 2, 80, 0, 1, -1, 0);
        t_tc(dtype, 2, 64, 64, 2, 160, 0, 1, -1, 0);
        t_tc(dtype, 2, 100, 77, 2, 40, 0, 1, -1, 0);         /* cross-attention: 77 text tokens */
        t_tc(dtype, 2, 100, 100, 2, 64, 1, 1, -1, 0);        /* causal (CLIP) */
        t_tc(dtype, 2, 70, 100, 2, 64, 1, 1, -1, 0);         /* causal, Tq < Tk */
        t_tc(dtype, 1, 192, 192, 1, 40, 1, 1, -1, 0);        /* causal: tiles whole rows see unmasked */
        t_tc(dtype, 2, 33, 17, 2, 8, 0, 1, -1, 0);           /* HS 8: one 16-wide slice, mostly padding */
        t_tc(dtype, 2, 40, 200, 2, 40, 0, 6, -1, 0);         /* peaked scores: reference max moves later */
        t_tc(dtype, 2, 40, 200, 2, 40, 0, 1, 0, 0);          /* rescale on every increase */
    }
    if (bwd_hook) {
        t_bwd_refuse();
        for (int dtype = 1; dtype <= 2; dtype++) {
            t_bwd(dtype, 2, 64, 64, 2, 40, 0, 1, 1);   /* SD level 0 head size; two runs */
            t_bwd(dtype, 2, 100, 77, 2, 40, 0, 0, 1);  /* cross-attention: Tq != Tk, 77 text tokens */
            t_bwd(dtype, 2, 70, 100, 2, 64, 1, 0, 1);  /* causal (CLIP), Tq < Tk, off the tiles */
            t_bwd(dtype, 2, 100, 70, 2, 64, 1, 0, 1);  /* causal, Tq > Tk */
            t_bwd(dtype, 1, 192, 192, 1, 40, 1, 0, 1); /* causal: tiles every pair sees unmasked */
            t_bwd(dtype, 2, 50, 90, 2, 80, 0, 0, 1);
            t_bwd(dtype, 2, 40, 70, 2, 160, 0, 0, 1);
            t_bwd(dtype, 2, 33, 17, 2, 8, 1, 0, 1);    /* HS 8: mostly padding */
            t_bwd(dtype, 1, 64, 2048, 1, 40, 0, 0, 1); /* long keys: P ~ 1 / Tk, small dS */
            t_bwd(dtype, 1, 64, 2048, 1, 40, 0, 0, 1e-2f); /* and small gradients: dS near fp16's subnormals */
        }
        if (!quick) {
            t_bwd(1, 1, 1024, 1024, 8, 40, 0, 1, 1);
            t_bwd(1, 1, 4096, 77, 8, 40, 0, 0, 1);
            t_bwd(1, 1, 1024, 1024, 8, 80, 0, 0, 1);
            t_bwd(1, 2, 256, 256, 8, 160, 0, 0, 1);
            t_bwd(2, 2, 77, 77, 12, 64, 1, 1, 1);
            t_bwd(2, 1, 1024, 1024, 8, 40, 0, 0, 1);
        }
    } else
        tap_diag("no db_cuda_test_attention_tc_backward in %s: backward checks skipped", path);
    if (!quick) {
        t_tc(1, 1, 1024, 1024, 8, 40, 0, 1, -1, 1);
        t_tc(1, 1, 4096, 77, 8, 40, 0, 1, -1, 0);
        t_tc(1, 1, 1024, 1024, 8, 80, 0, 1, -1, 0);
        t_tc(1, 2, 256, 256, 8, 160, 0, 1, -1, 0);
        t_tc(1, 2, 77, 77, 12, 64, 1, 1, -1, 0);
        t_tc(2, 1, 1024, 1024, 8, 40, 0, 1, -1, 0);
        t_tc(2, 1, 4096, 77, 8, 40, 0, 1, -1, 0);
        t_tc(2, 2, 256, 256, 8, 160, 0, 1, -1, 0);
        t_tc(2, 2, 77, 77, 12, 64, 1, 1, -1, 0);
        t_tc(1, 1, 1024, 1024, 8, 40, 0, 4, -1, 0);
    }
    if (getenv("DB_BENCH") && atoi(getenv("DB_BENCH")) == 1 && !quick) {
        bench(2, 4096, 4096, 8, 40, 0, 1); /* SD1.5 level 0 self-attention */
        bench(2, 4096, 77, 8, 40, 0, 1);   /* level 0 cross-attention */
        bench(2, 1024, 1024, 8, 80, 0, 0);
        bench(2, 256, 256, 8, 160, 0, 0);
        bench(2, 77, 77, 12, 64, 1, 0); /* CLIP text encoder */
        if (bwd_hook) {
            bench_bwd(2, 4096, 4096, 8, 40, 0, 1); /* SD1.5 level 0 self-attention, next to the fp32 backward */
            bench_bwd(2, 4096, 77, 8, 40, 0, 0);
            bench_bwd(2, 1024, 1024, 8, 80, 0, 0);
            bench_bwd(2, 256, 256, 8, 160, 0, 0);
        }
    }
    api->ctx_destroy(&g);
    db_ctx_destroy(cpu);
    return tap_done();
}
