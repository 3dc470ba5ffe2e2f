/* CUDA-vs-CPU parity of every op libdb_cuda.so implements (TAP).
 *
 * The CPU ops (kernels/ops.h on a CPU ctx) are the oracle.  For each op the
 * CUDA table sets: fresh random inputs (db_noise_fill, never zeros), the CPU
 * op, the same op on the GPU through api->op on device copies, and every
 * output and saved tensor (mean/rstd/lse) compared by relative L2
 * (tap_compare) with the worst element printed.  Tolerance 1e-5 for fp32
 * arithmetic; pure data movement (concat, transpose, upsample, embedding
 * lookups) must be bit-exact.  Outputs are poisoned with NaN first, so an
 * unwritten element fails; parameter gradients are pre-filled with the same
 * random values on both sides, which tests the += contract; the conv2d and
 * linear backward are run twice from the same state and must give the same
 * bits (determinism).  A NULL table member is reported "# not implemented on
 * CUDA", not a failure.
 *
 * The optimizer ops (opt_adamw, opt_sumsq, opt_scale) must be BIT-identical
 * to the CPU's libcommon/sd/optim.c, not just close: AdamW's p, m and v after
 * each of three steps (t = 1, 2, 3), the double sum of squares, the scaled
 * gradients; sizes off the 4096-element chunk and the block size included.
 * So must opt_adamw8bit: p, the uint8 codes and the block scales after each
 * of four steps.
 *
 * No CUDA toolchain here: the library is dlopen'd ($B/lib, else
 * $TOP/build/lib, else ../../lib next to this binary) and reached through
 * db_cuda_get_api.  Without the library or a device: "1..0 # SKIP".
 * Precision modes (kernels/ops.h db_precision): gemm, linear, conv2d and
 * attention, forward and backward, with the CUDA ctx in bf16 and in fp16,
 * against a reference built here from the CPU fp32 op (this file's CPU ctx
 * stays fp32): inputs rounded to the compute type with db_convert, the fp32
 * op, outputs rounded (a parameter-gradient contribution rounded before it
 * is added to the pre-filled gradient).  Each output must be within rel L2
 * 1e-2 (bf16) / 2e-3 (fp16) of that reference and within 1e-2 of the plain
 * fp32 op, and every value it holds must be representable in the compute
 * type (the round trip through it is exact: a missing output rounding shows
 * here); the += gradients are checked for that on a zero-filled run.
 *
 * DB_CUDA_TEST_QUICK=1 runs the small shapes only (no SD1.5 ones). */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cuda_api.h"
#include "libcommon/core/tensor.h"
#include "libcommon/core/tensor.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/adamw_coef.h"
#include "libcommon/sd/optim.h"
#include "tests/unit/tap.h"

#define TOL 1e-5

static const db_cuda_api *api;
static db_ctx g; /* the GPU ctx */
static db_ctx *cpu;
static uint64_t stream_id = 1; /* a fresh noise stream per tensor */
static int quick;              /* DB_CUDA_TEST_QUICK set: the small shapes only */

/* ---- buffers: every test frees what it made at its end ---------------------- */

enum { MAXBUF = 256 };
static void *hbufs[MAXBUF], *dbufs[MAXBUF];
static int nh, nd;

static void release_all(void)
{
    for (int i = 0; i < nh; i++)
        free(hbufs[i]);
    for (int i = 0; i < nd; i++)
        api->free(&g, dbufs[i]);
    nh = nd = 0;
}

static void *hkeep(void *p)
{
    if (!p || nh == MAXBUF) {
        fprintf(stderr, "test_cuda_ops: out of host buffers\n");
        exit(2);
    }
    return hbufs[nh++] = p;
}

/* n random floats (standard normal) times scale */
static float *hrand(size_t n, float scale)
{
    float *p = hkeep(malloc(n * sizeof *p + 1));
    db_noise_fill(p, n, 20261126, stream_id++, 0);
    for (size_t i = 0; i < n; i++)
        p[i] *= scale;
    return p;
}

static float *hzeros(size_t n) { return hkeep(calloc(n + 1, sizeof(float))); }

static float *hcopy(const float *src, size_t n)
{
    float *p = hkeep(malloc(n * sizeof *p + 1));
    memcpy(p, src, n * sizeof *p);
    return p;
}

static void *dalloc(size_t bytes)
{
    void *p = api->alloc(&g, bytes ? bytes : 1);
    if (!p || nd == MAXBUF) {
        fprintf(stderr, "test_cuda_ops: device alloc of %zu bytes: %s\n", bytes, g.err.msg);
        exit(2);
    }
    return dbufs[nd++] = p;
}

/* device copy of host data */
static void *dput(const void *h, size_t bytes)
{
    void *d = dalloc(bytes);
    api->copy(&g, d, h, bytes, DB_COPY_H2D);
    return d;
}
static float *dputf(const float *h, size_t n) { return dput(h, n * sizeof(float)); }

/* n floats of NaN on the device: an output the op must overwrite */
static float *dpoison(size_t n)
{
    float *h = hkeep(malloc(n * sizeof(float) + 1));
    memset(h, 0xff, n * sizeof(float));
    return dputf(h, n);
}

static float *dget(const float *d, size_t n)
{
    float *h = hkeep(malloc(n * sizeof(float) + 1));
    api->copy(&g, h, d, n * sizeof(float), DB_COPY_D2H);
    return h;
}

/* ---- checks ------------------------------------------------------------------------ */

static int cpu_ran(int rc, const char *what)
{
    if (rc != 0) {
        tap_ok(0, "%s: CPU op failed: %s", what, cpu->err.msg);
        db_ctx_clear_error(cpu);
    }
    return rc == 0;
}

static int gpu_ran(int rc, const char *what)
{
    if (rc == 0 && api->sync(&g) != 0)
        rc = -1;
    if (rc != 0) {
        tap_ok(0, "%s: CUDA op failed: %s", what, g.err.msg);
        db_err_clear(&g.err);
    }
    return rc == 0;
}

/* device tensor d against host want, n floats; tol 0 means bit-exact */
static void cmp(const char *what, const char *tensor, const float *d, const float *want, size_t n, double tol)
{
    const float *got = dget(d, n);
    tap_cmp r = tap_compare(got, want, n);
    int ok = tol == 0 ? (r.maxabs == 0 && r.rel == 0) : r.rel <= tol; /* NaN: rel is inf */
    tap_ok(ok, "%s %s: rel L2 %.2e (max |diff| %.2e)", what, tensor, r.rel, r.maxabs);
    if (!ok || r.maxabs > 0)
        tap_diag("  worst element %zu: cuda %.9g cpu %.9g", r.at, (double)got[r.at], (double)want[r.at]);
}

/* two device results must be bit-identical */
static void same_bits(const char *what, const float *d1, const float *d2, size_t n)
{
    const float *a = dget(d1, n), *b = dget(d2, n);
    tap_ok(memcmp(a, b, n * sizeof(float)) == 0, "%s: two runs give the same bits", what);
}

/* DB_CUDA_TEST_ONLY=prec: the precision modes' section alone, all of it;
 * prec:S there only the ops whose name holds S (else every op) */
static int prec_want(const char *name)
{
    const char *only = getenv("DB_CUDA_TEST_ONLY");
    return !only || strncmp(only, "prec:", 5) != 0 || strstr(name, only + 5) != NULL;
}

/* DB_CUDA_TEST_ONLY=S in the environment: only the ops whose name holds S
 * (a quick look at one kernel under the emulator) */
static int have(const void *member, const char *name)
{
    const char *only = getenv("DB_CUDA_TEST_ONLY");
    if (only && !strstr(name, only))
        return 0;
    if (!member)
        printf("# %s: not implemented on CUDA\n", name);
    return member != NULL;
}

/* ---- GEMM and linear ---------------------------------------------------------------- */

static void t_gemm(int batch, int M, int N, int K, int ta, int tb, float alpha, float beta)
{
    char what[160];
    snprintf(what, sizeof what, "gemm_forward b%d %dx%dx%d t%d%d a%g b%g", batch, M, N, K, ta, tb, (double)alpha,
             (double)beta);
    const size_t na = (size_t)batch * M * K, nb = (size_t)batch * K * N, nc = (size_t)batch * M * N;
    float *A = hrand(na, 1), *B = hrand(nb, 1), *C0 = hrand(nc, 1), *want = hcopy(C0, nc);
    if (!cpu_ran(db_gemm_forward(cpu, want, A, B, batch, M, N, K, ta, tb, alpha, beta), what)) {
        release_all();
        return;
    }
    float *dC = beta == 0 ? dpoison(nc) : dputf(C0, nc);
    if (gpu_ran(api->gemm_forward(&g, dC, dputf(A, na), dputf(B, nb), batch, M, N, K, ta, tb, alpha, beta), what))
        cmp(what, "Cm", dC, want, nc, TOL);
    release_all();
}

static void t_gemm_backward(int batch, int M, int N, int K, int ta, int tb, float alpha)
{
    char what[160];
    snprintf(what, sizeof what, "gemm_backward b%d %dx%dx%d t%d%d", batch, M, N, K, ta, tb);
    const size_t na = (size_t)batch * M * K, nb = (size_t)batch * K * N, nc = (size_t)batch * M * N;
    float *A = hrand(na, 1), *B = hrand(nb, 1), *dC = hrand(nc, 1), *dA = hzeros(na), *dB = hzeros(nb);
    if (!cpu_ran(db_gemm_backward(cpu, dA, dB, dC, A, B, batch, M, N, K, ta, tb, alpha), what)) {
        release_all();
        return;
    }
    float *gA = dpoison(na), *gB = dpoison(nb);
    if (gpu_ran(
            api->gemm_backward(&g, gA, gB, dputf(dC, nc), dputf(A, na), dputf(B, nb), batch, M, N, K, ta, tb, alpha),
            what)) {
        cmp(what, "dA", gA, dA, na, TOL);
        cmp(what, "dB", gB, dB, nb, TOL);
    }
    release_all();
}

static void t_linear(int N, int C, int OC, int with_bias)
{
    char what[160];
    snprintf(what, sizeof what, "linear_forward %dx%d->%d%s", N, C, OC, with_bias ? " +bias" : "");
    float *x = hrand((size_t)N * C, 1), *w = hrand((size_t)OC * C, 0.05f), *b = hrand(OC, 1);
    float *want = hzeros((size_t)N * OC);
    if (!cpu_ran(db_linear_forward(cpu, want, x, w, with_bias ? b : NULL, N, C, OC), what)) {
        release_all();
        return;
    }
    float *d = dpoison((size_t)N * OC);
    if (gpu_ran(api->linear_forward(&g, d, dputf(x, (size_t)N * C), dputf(w, (size_t)OC * C),
                                    with_bias ? dputf(b, OC) : NULL, N, C, OC),
                what))
        cmp(what, "out", d, want, (size_t)N * OC, TOL);
    release_all();
}

static void t_linear_backward(int N, int C, int OC, int twice)
{
    char what[160];
    snprintf(what, sizeof what, "linear_backward %dx%d->%d", N, C, OC);
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *dy = hrand(ny, 1);
    float *dw0 = hrand(nw, 1), *db0 = hrand(OC, 1); /* += onto these */
    float *dx = hzeros(nx), *dw = hcopy(dw0, nw), *db = hcopy(db0, OC);
    if (!cpu_ran(db_linear_backward(cpu, dx, dw, db, dy, x, w, N, C, OC, 0), what)) {
        release_all();
        return;
    }
    float *gx = dpoison(nx), *gw = dputf(dw0, nw), *gb = dputf(db0, OC);
    float *ddy = dputf(dy, ny), *dx_ = dputf(x, nx), *dw_ = dputf(w, nw);
    if (!gpu_ran(api->linear_backward(&g, gx, gw, gb, ddy, dx_, dw_, N, C, OC, 0), what)) {
        release_all();
        return;
    }
    cmp(what, "dinp", gx, dx, nx, TOL);
    cmp(what, "dweight (+=)", gw, dw, nw, TOL);
    cmp(what, "dbias (+=)", gb, db, OC, TOL);
    if (twice) {
        float *gx2 = dpoison(nx), *gw2 = dputf(dw0, nw), *gb2 = dputf(db0, OC);
        if (gpu_ran(api->linear_backward(&g, gx2, gw2, gb2, ddy, dx_, dw_, N, C, OC, 0), what)) {
            same_bits("linear_backward dinp", gx, gx2, nx);
            same_bits("linear_backward dweight", gw, gw2, nw);
            same_bits("linear_backward dbias", gb, gb2, OC);
        }
    }
    release_all();
}

/* ---- convolution ---------------------------------------------------------------------- */

static void t_conv(int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1, int bias)
{
    char what[160];
    snprintf(what, sizeof what, "conv2d_forward B%d %d->%d %dx%d k%dx%d s%d pad %d,%d%s", B, C, OC, H, W, KH, KW,
             stride, pad0, pad1, bias ? " +bias" : "");
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * KH * KW, ny = (size_t)B * OC * OH * OW;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *b = hrand(OC, 1), *want = hzeros(ny);
    if (!cpu_ran(db_conv2d_forward(cpu, want, x, w, bias ? b : NULL, B, C, H, W, OC, KH, KW, stride, pad0, pad1),
                 what)) {
        release_all();
        return;
    }
    float *d = dpoison(ny);
    if (gpu_ran(api->conv2d_forward(&g, d, dputf(x, nx), dputf(w, nw), bias ? dputf(b, OC) : NULL, B, C, H, W, OC, KH,
                                    KW, stride, pad0, pad1),
                what))
        cmp(what, "out", d, want, ny, TOL);
    release_all();
}

static void t_conv_backward(int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1,
                            int twice)
{
    char what[160];
    snprintf(what, sizeof what, "conv2d_backward B%d %d->%d %dx%d k%dx%d s%d pad %d,%d", B, C, OC, H, W, KH, KW, stride,
             pad0, pad1);
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * KH * KW, ny = (size_t)B * OC * OH * OW;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *dy = hrand(ny, 1);
    float *dw0 = hrand(nw, 1), *db0 = hrand(OC, 1);
    float *dx = hzeros(nx), *dw = hcopy(dw0, nw), *db = hcopy(db0, OC);
    if (!cpu_ran(db_conv2d_backward(cpu, dx, dw, db, dy, x, w, B, C, H, W, OC, KH, KW, stride, pad0, pad1, 0), what)) {
        release_all();
        return;
    }
    float *gx = dpoison(nx), *gw = dputf(dw0, nw), *gb = dputf(db0, OC);
    float *ddy = dputf(dy, ny), *dx_ = dputf(x, nx), *dw_ = dputf(w, nw);
    if (!gpu_ran(api->conv2d_backward(&g, gx, gw, gb, ddy, dx_, dw_, B, C, H, W, OC, KH, KW, stride, pad0, pad1, 0),
                 what)) {
        release_all();
        return;
    }
    cmp(what, "dinp", gx, dx, nx, TOL);
    cmp(what, "dweight (+=)", gw, dw, nw, TOL);
    cmp(what, "dbias (+=)", gb, db, OC, TOL);
    if (twice) {
        float *gx2 = dpoison(nx), *gw2 = dputf(dw0, nw), *gb2 = dputf(db0, OC);
        if (gpu_ran(api->conv2d_backward(&g, gx2, gw2, gb2, ddy, dx_, dw_, B, C, H, W, OC, KH, KW, stride, pad0, pad1, 0),
                    what)) {
            same_bits("conv2d_backward dinp", gx, gx2, nx);
            same_bits("conv2d_backward dweight", gw, gw2, nw);
            same_bits("conv2d_backward dbias", gb, gb2, OC);
        }
    }
    release_all();
}

/* ---- normalisation ------------------------------------------------------------------------- */

/* a rerun's three outputs d[i] (n[i] floats) against the first run's
 * want[i], bit for bit, each named "name[i], how" */
static void same_three(const char *what, const char *how, const char *const name[3], const float *const d[3],
                       const float *const want[3], const size_t n[3])
{
    char ctx[128];
    for (int i = 0; i < 3; i++) {
        snprintf(ctx, sizeof ctx, "%s, %s", name[i], how);
        cmp(what, ctx, d[i], want[i], n[i], 0);
    }
}

static void t_groupnorm(int B, int C, int HW, int G, int silu)
{
    char what[160];
    snprintf(what, sizeof what, "groupnorm_forward B%d C%d HW%d G%d%s", B, C, HW, G, silu ? " +silu" : "");
    const size_t n = (size_t)B * C * HW, ng = (size_t)B * G;
    float *x = hrand(n, 2), *w = hrand(C, 1), *b = hrand(C, 1);
    for (size_t i = 0; i < n; i++)
        x[i] += 3.0f; /* a mean far from 0: the two-pass statistics matter */
    float *y = hzeros(n), *mean = hzeros(ng), *rstd = hzeros(ng);
    if (!cpu_ran(db_groupnorm_forward(cpu, y, mean, rstd, x, w, b, B, C, HW, G, 1e-5f, silu), what)) {
        release_all();
        return;
    }
    float *dy = dpoison(n), *dm = dpoison(ng), *dr = dpoison(ng);
    if (gpu_ran(api->groupnorm_forward(&g, dy, dm, dr, dputf(x, n), dputf(w, C), dputf(b, C), B, C, HW, G, 1e-5f, silu),
                what)) {
        cmp(what, "out", dy, y, n, TOL);
        cmp(what, "mean", dm, mean, ng, TOL);
        cmp(what, "rstd", dr, rstd, ng, TOL);
        /* norm.cu runs a group that fits in shared memory in one block
         * (groupnorm_whole_kernel), others in pieces: both must give the
         * same bits (DB_GN_WHOLE=0 forces the pieces) */
        const float *hy = dget(dy, n), *hm = dget(dm, ng), *hr = dget(dr, ng);
        float *py = dpoison(n), *pm = dpoison(ng), *pr = dpoison(ng);
        setenv("DB_GN_WHOLE", "0", 1);
        const int rc = api->groupnorm_forward(&g, py, pm, pr, dputf(x, n), dputf(w, C), dputf(b, C), B, C, HW, G, 1e-5f,
                                              silu);
        unsetenv("DB_GN_WHOLE");
        if (gpu_ran(rc, what)) {
            cmp(what, "out, pieces vs whole groups", py, hy, n, 0);
            cmp(what, "mean, pieces vs whole groups", pm, hm, ng, 0);
            cmp(what, "rstd, pieces vs whole groups", pr, hr, ng, 0);
        }
        /* and a group split over a cluster of 1, 2 or 4 blocks
         * (DB_GN_CLUSTER: where it cannot, norm.cu runs the pieces) */
        for (int cl = 1; cl <= 4; cl *= 2) {
            char v[8], ctx[80];
            snprintf(v, sizeof v, "%d", cl);
            setenv("DB_GN_CLUSTER", v, 1);
            float *ky = dpoison(n), *km = dpoison(ng), *kr = dpoison(ng);
            const int rk = api->groupnorm_forward(&g, ky, km, kr, dputf(x, n), dputf(w, C), dputf(b, C), B, C, HW, G,
                                                  1e-5f, silu);
            unsetenv("DB_GN_CLUSTER");
            if (gpu_ran(rk, what)) {
                snprintf(ctx, sizeof ctx, "clusters of %d vs default", cl);
                same_three(what, ctx, (const char *const[]){"out", "mean", "rstd"}, (const float *const[]){ky, km, kr},
                           (const float *const[]){hy, hm, hr}, (const size_t[]){n, ng, ng});
            }
        }
    }
    /* in place (out == inp), no saved statistics */
    float *dx = dputf(x, n);
    if (gpu_ran(api->groupnorm_forward(&g, dx, NULL, NULL, dx, dputf(w, C), dputf(b, C), B, C, HW, G, 1e-5f, silu),
                what))
        cmp(what, "out (in place)", dx, y, n, TOL);
    release_all();
}

static void t_groupnorm_backward(int B, int C, int HW, int G, int silu)
{
    char what[160];
    snprintf(what, sizeof what, "groupnorm_backward B%d C%d HW%d G%d%s", B, C, HW, G, silu ? " +silu" : "");
    const size_t n = (size_t)B * C * HW, ng = (size_t)B * G;
    float *x = hrand(n, 2), *w = hrand(C, 1), *b = hrand(C, 1), *dout = hrand(n, 1);
    float *y = hzeros(n), *mean = hzeros(ng), *rstd = hzeros(ng);
    float *dw0 = hrand(C, 1), *db0 = hrand(C, 1), *dx = hzeros(n), *dw = hcopy(dw0, C), *db = hcopy(db0, C);
    if (!cpu_ran(db_groupnorm_forward(cpu, y, mean, rstd, x, w, b, B, C, HW, G, 1e-5f, silu), what) ||
        !cpu_ran(db_groupnorm_backward(cpu, dx, dw, db, dout, mean, rstd, x, w, b, B, C, HW, G, silu, 0), what)) {
        release_all();
        return;
    }
    float *gx = dpoison(n), *gw = dputf(dw0, C), *gb = dputf(db0, C);
    if (gpu_ran(api->groupnorm_backward(&g, gx, gw, gb, dputf(dout, n), dputf(mean, ng), dputf(rstd, ng), dputf(x, n),
                                        dputf(w, C), dputf(b, C), B, C, HW, G, silu, 0),
                what)) {
        cmp(what, "dinp", gx, dx, n, TOL);
        cmp(what, "dweight (+=)", gw, dw, C, TOL);
        cmp(what, "dbias (+=)", gb, db, C, TOL);
        /* the whole-group kernel (where the group fits in shared memory)
         * and the pieces' kernels (DB_GN_WHOLE=0) give the same bits */
        const float *hx = dget(gx, n), *hw = dget(gw, C), *hb = dget(gb, C);
        float *px = dpoison(n), *pw = dputf(dw0, C), *pb = dputf(db0, C);
        setenv("DB_GN_WHOLE", "0", 1);
        const int rc = api->groupnorm_backward(&g, px, pw, pb, dputf(dout, n), dputf(mean, ng), dputf(rstd, ng),
                                               dputf(x, n), dputf(w, C), dputf(b, C), B, C, HW, G, silu, 0);
        unsetenv("DB_GN_WHOLE");
        if (gpu_ran(rc, what)) {
            cmp(what, "dinp, pieces vs whole groups", px, hx, n, 0);
            cmp(what, "dweight, pieces vs whole groups", pw, hw, C, 0);
            cmp(what, "dbias, pieces vs whole groups", pb, hb, C, 0);
        }
        for (int cl = 1; cl <= 4; cl *= 2) {
            char v[8], ctx[80];
            snprintf(v, sizeof v, "%d", cl);
            setenv("DB_GN_CLUSTER", v, 1);
            float *kx = dpoison(n), *kw = dputf(dw0, C), *kb = dputf(db0, C);
            const int rk = api->groupnorm_backward(&g, kx, kw, kb, dputf(dout, n), dputf(mean, ng), dputf(rstd, ng),
                                                   dputf(x, n), dputf(w, C), dputf(b, C), B, C, HW, G, silu, 0);
            unsetenv("DB_GN_CLUSTER");
            if (gpu_ran(rk, what)) {
                snprintf(ctx, sizeof ctx, "clusters of %d vs default", cl);
                same_three(what, ctx, (const char *const[]){"dinp", "dweight", "dbias"},
                           (const float *const[]){kx, kw, kb}, (const float *const[]){hx, hw, hb},
                           (const size_t[]){n, (size_t)C, (size_t)C});
            }
        }
        /* groupnorm_backward_add == the backward then add_forward, bit for
         * bit: whole groups, pieces, clusters of 2; the addend apart, dinp
         * itself, and one off 16-byte alignment (the whole-group kernel's
         * one-by-one stores) */
        float *hadd = hrand(n + 1, 1), *ref = dpoison(n);
        float *dadd = dputf(hadd + 1, n), *dmis = dputf(hadd, n + 1) + 1;
        if (have(api->groupnorm_backward_add, what) && gpu_ran(api->add_forward(&g, ref, dadd, gx, n), what)) {
            const float *href = dget(ref, n);
            static const char *const env[3][2] = {{NULL, NULL}, {"DB_GN_WHOLE", "0"}, {"DB_GN_CLUSTER", "2"}};
            static const char *const mname[3] = {"whole groups", "pieces", "clusters of 2"};
            for (int m = 0; m < 3; m++)
                for (int k = 0; k < 3; k++) {
                    if (env[m][0])
                        setenv(env[m][0], env[m][1], 1);
                    float *o = k == 1 ? dputf(hadd + 1, n) : dpoison(n), *ow = dputf(dw0, C), *ob = dputf(db0, C);
                    const float *ad = k == 0 ? dadd : k == 1 ? o : dmis;
                    const int rk = api->groupnorm_backward_add(&g, o, ow, ob, dputf(dout, n), dputf(mean, ng),
                                                               dputf(rstd, ng), dputf(x, n), dputf(w, C), dputf(b, C),
                                                               ad, B, C, HW, G, silu, 0);
                    if (env[m][0])
                        unsetenv(env[m][0]);
                    if (gpu_ran(rk, what))
                        tap_ok(!memcmp(dget(o, n), href, n * sizeof(float)) &&
                                   !memcmp(dget(ow, C), hw, C * sizeof(float)) &&
                                   !memcmp(dget(ob, C), hb, C * sizeof(float)),
                               "%s, %s, %s: groupnorm_backward_add == groupnorm_backward then add_forward, bit for "
                               "bit",
                               what, mname[m], k == 0 ? "an addend" : k == 1 ? "dinp itself" : "a misaligned addend");
                }
        }
    }
    release_all();
}

static void t_layernorm(int N, int C)
{
    char what[160];
    snprintf(what, sizeof what, "layernorm_forward %dx%d", N, C);
    const size_t n = (size_t)N * C;
    float *x = hrand(n, 2), *w = hrand(C, 1), *b = hrand(C, 1);
    for (size_t i = 0; i < n; i++)
        x[i] -= 2.0f;
    float *y = hzeros(n), *mean = hzeros(N), *rstd = hzeros(N);
    if (!cpu_ran(db_layernorm_forward(cpu, y, mean, rstd, x, w, b, N, C, 1e-5f), what)) {
        release_all();
        return;
    }
    float *dy = dpoison(n), *dm = dpoison(N), *dr = dpoison(N);
    if (gpu_ran(api->layernorm_forward(&g, dy, dm, dr, dputf(x, n), dputf(w, C), dputf(b, C), N, C, 1e-5f), what)) {
        cmp(what, "out", dy, y, n, TOL);
        cmp(what, "mean", dm, mean, N, TOL);
        cmp(what, "rstd", dr, rstd, N, TOL);
    }
    release_all();
}

static void t_layernorm_backward(int N, int C)
{
    char what[160];
    snprintf(what, sizeof what, "layernorm_backward %dx%d", N, C);
    const size_t n = (size_t)N * C;
    float *x = hrand(n, 2), *w = hrand(C, 1), *b = hrand(C, 1), *dout = hrand(n, 1);
    float *y = hzeros(n), *mean = hzeros(N), *rstd = hzeros(N);
    float *dw0 = hrand(C, 1), *db0 = hrand(C, 1), *dx = hzeros(n), *dw = hcopy(dw0, C), *db = hcopy(db0, C);
    if (!cpu_ran(db_layernorm_forward(cpu, y, mean, rstd, x, w, b, N, C, 1e-5f), what) ||
        !cpu_ran(db_layernorm_backward(cpu, dx, dw, db, dout, mean, rstd, x, w, N, C, 0), what)) {
        release_all();
        return;
    }
    float *gx = dpoison(n), *gw = dputf(dw0, C), *gb = dputf(db0, C);
    if (gpu_ran(api->layernorm_backward(&g, gx, gw, gb, dputf(dout, n), dputf(mean, N), dputf(rstd, N), dputf(x, n),
                                        dputf(w, C), N, C, 0),
                what)) {
        cmp(what, "dinp", gx, dx, n, TOL);
        cmp(what, "dweight (+=)", gw, dw, C, TOL);
        cmp(what, "dbias (+=)", gb, db, C, TOL);
    }
    release_all();
}

/* layernorm_backward_add == layernorm_backward then add_forward on the
 * device, bit for bit (the addend apart, and dinp itself), and near the CPU */
static void t_layernorm_backward_add(int N, int C)
{
    char what[160];
    snprintf(what, sizeof what, "layernorm_backward_add %dx%d", N, C);
    const size_t n = (size_t)N * C;
    float *x = hrand(n, 2), *w = hrand(C, 1), *b = hrand(C, 1), *dout = hrand(n, 1), *add = hrand(n, 1);
    float *y = hzeros(n), *mean = hzeros(N), *rstd = hzeros(N), *dx = hzeros(n);
    if (!cpu_ran(db_layernorm_forward(cpu, y, mean, rstd, x, w, b, N, C, 1e-5f), what) ||
        !cpu_ran(db_layernorm_backward_add(cpu, dx, NULL, NULL, dout, mean, rstd, x, w, add, N, C, 0), what)) {
        release_all();
        return;
    }
    float *ddout = dputf(dout, n), *dmean = dputf(mean, N), *drstd = dputf(rstd, N), *dxx = dputf(x, n);
    float *dw = dputf(w, C), *dadd = dputf(add, n), *t = dpoison(n), *ref = dpoison(n), *got = dpoison(n);
    float *self = dputf(add, n), *gw1 = dputf(b, C), *gw2 = dputf(b, C), *gb1 = dputf(w, C), *gb2 = dputf(w, C);
    if (gpu_ran(api->layernorm_backward(&g, t, gw1, gb1, ddout, dmean, drstd, dxx, dw, N, C, 0), what) &&
        gpu_ran(api->add_forward(&g, ref, dadd, t, n), what) &&
        gpu_ran(api->layernorm_backward_add(&g, got, gw2, gb2, ddout, dmean, drstd, dxx, dw, dadd, N, C, 0), what) &&
        gpu_ran(api->layernorm_backward_add(&g, self, NULL, NULL, ddout, dmean, drstd, dxx, dw, self, N, C, 0),
                what)) {
        const float *hr = dget(ref, n), *hg = dget(got, n), *hs = dget(self, n);
        tap_ok(!memcmp(hr, hg, n * sizeof(float)) && !memcmp(hr, hs, n * sizeof(float)),
               "%s: dinp bit-identical to layernorm_backward then add_forward on the device (addend apart, dinp "
               "itself)", what);
        tap_ok(!memcmp(dget(gw1, C), dget(gw2, C), C * sizeof(float)) &&
                   !memcmp(dget(gb1, C), dget(gb2, C), C * sizeof(float)),
               "%s: dweight, dbias (+=) bit-identical to layernorm_backward's", what);
        cmp(what, "dinp", got, dx, n, TOL);
    }
    release_all();
}

static void t_softmax(int N, int C)
{
    char what[160];
    snprintf(what, sizeof what, "softmax_forward %dx%d", N, C);
    const size_t n = (size_t)N * C;
    float *x = hrand(n, 3), *y = hzeros(n);
    if (!cpu_ran(db_softmax_forward(cpu, y, x, N, C), what)) {
        release_all();
        return;
    }
    float *d = dpoison(n);
    if (gpu_ran(api->softmax_forward(&g, d, dputf(x, n), N, C), what))
        cmp(what, "out", d, y, n, TOL);
    release_all();
}

static void t_softmax_backward(int N, int C)
{
    char what[160];
    snprintf(what, sizeof what, "softmax_backward %dx%d", N, C);
    const size_t n = (size_t)N * C;
    float *x = hrand(n, 3), *y = hzeros(n), *dout = hrand(n, 1), *dx = hzeros(n);
    if (!cpu_ran(db_softmax_forward(cpu, y, x, N, C), what) ||
        !cpu_ran(db_softmax_backward(cpu, dx, dout, y, N, C), what)) {
        release_all();
        return;
    }
    float *d = dpoison(n);
    if (gpu_ran(api->softmax_backward(&g, d, dputf(dout, n), dputf(y, n), N, C), what))
        cmp(what, "dinp", d, dx, n, TOL);
    release_all();
}

/* ---- attention -------------------------------------------------------------------------------- */

static void t_attention(int B, int Tq, int Tk, int NH, int HS, int causal)
{
    char what[160];
    snprintf(what, sizeof what, "attention_forward B%d Tq%d Tk%d %dx%d%s", B, Tq, Tk, NH, HS, causal ? " causal" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = hrand(nq, 1), *k = hrand(nk, 1), *v = hrand(nk, 1), *out = hzeros(nq), *lse = hzeros(nl);
    if (!cpu_ran(db_attention_forward(cpu, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal), what)) {
        release_all();
        return;
    }
    float *dout = dpoison(nq), *dlse = dpoison(nl);
    if (gpu_ran(
            api->attention_forward(&g, dout, dlse, dputf(q, nq), dputf(k, nk), dputf(v, nk), B, Tq, Tk, NH, HS, causal),
            what)) {
        cmp(what, "out", dout, out, nq, TOL);
        cmp(what, "lse", dlse, lse, nl, TOL);
    }
    release_all();
}

static void t_attention_backward(int B, int Tq, int Tk, int NH, int HS, int causal)
{
    char what[160];
    snprintf(what, sizeof what, "attention_backward B%d Tq%d Tk%d %dx%d%s", B, Tq, Tk, NH, HS, causal ? " causal" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = hrand(nq, 1), *k = hrand(nk, 1), *v = hrand(nk, 1), *out = hzeros(nq), *lse = hzeros(nl);
    float *dout = hrand(nq, 1), *dq = hzeros(nq), *dk = hzeros(nk), *dv = hzeros(nk);
    if (!cpu_ran(db_attention_forward(cpu, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal), what) ||
        !cpu_ran(db_attention_backward(cpu, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal), what)) {
        release_all();
        return;
    }
    float *gq = dpoison(nq), *gk = dpoison(nk), *gv = dpoison(nk);
    float *ddout = dputf(dout, nq), *dout_ = dputf(out, nq), *dlse = dputf(lse, nl), *dq_ = dputf(q, nq),
          *dk_ = dputf(k, nk), *dv_ = dputf(v, nk);
    if (gpu_ran(api->attention_backward(&g, gq, gk, gv, ddout, dout_, dlse, dq_, dk_, dv_, B, Tq, Tk, NH, HS, causal),
                what)) {
        cmp(what, "dq", gq, dq, nq, TOL);
        cmp(what, "dk", gk, dk, nk, TOL);
        cmp(what, "dv", gv, dv, nk, TOL);
        /* recomputed probabilities, no atomics: the same bits every run */
        float *gq2 = dpoison(nq), *gk2 = dpoison(nk), *gv2 = dpoison(nk);
        if (gpu_ran(api->attention_backward(&g, gq2, gk2, gv2, ddout, dout_, dlse, dq_, dk_, dv_, B, Tq, Tk, NH, HS,
                                            causal),
                    what)) {
            same_bits("attention_backward dq", gq, gq2, nq);
            same_bits("attention_backward dk", gk, gk2, nk);
            same_bits("attention_backward dv", gv, gv2, nk);
        }
    }
    release_all();
}

/* ---- precision modes (bf16 / fp16 autocast) ---------------------------------------------------- */

static const char *prec_name(db_precision p) { return p == DB_PREC_BF16 ? "bf16" : "fp16"; }

/* x rounded in place to the compute type, as a float (db_convert there and
 * back: round to nearest even, fp16 overflow to inf) */
static void hround(float *x, size_t n, db_precision p)
{
    const db_dtype dt = p == DB_PREC_BF16 ? DB_BF16 : DB_F16;
    uint16_t *t = malloc(n * sizeof *t + 2);
    db_err e = {0, ""};
    if (!t || db_convert(t, dt, x, DB_F32, n, &e) != 0 || db_convert(x, DB_F32, t, dt, n, &e) != 0) {
        fprintf(stderr, "test_cuda_ops: db_convert: %s\n", e.msg);
        exit(2);
    }
    free(t);
}

static float *hrounded(const float *x, size_t n, db_precision p)
{
    float *r = hcopy(x, n);
    hround(r, n, p);
    return r;
}

/* A 16-bit-mode output d (device, n floats): within the mode's tolerance of
 * ref (the CPU fp32 op on rounded inputs, rounded), within 1e-2 of f32 (the
 * plain fp32 op; NULL: not checked), and with representable set, every value
 * exactly a value of the compute type. */
static void cmp_prec(const char *what, const char *tensor, const float *d, const float *ref, const float *f32, size_t n,
                     db_precision p, int representable)
{
    const float *got = dget(d, n);
    const double tol = p == DB_PREC_BF16 ? 1e-2 : 2e-3;
    tap_cmp r = tap_compare(got, ref, n);
    int ok = r.rel <= tol;
    /* how many values are the reference's exactly: only float32 summation
     * order separates the two, so nearly all should be (information: a
     * missing input rounding would show as a low share) */
    size_t same = 0;
    for (size_t i = 0; i < n; i++)
        same += got[i] == ref[i];
    tap_ok(ok, "%s %s: rel L2 %.2e vs the rounded reference (max |diff| %.2e, %.1f%% exact)", what, tensor, r.rel,
           r.maxabs, n ? 100.0 * (double)same / (double)n : 100.0);
    if (!ok || r.maxabs > 0)
        tap_diag("  worst element %zu: cuda %.9g reference %.9g", r.at, (double)got[r.at], (double)ref[r.at]);
    if (f32) {
        r = tap_compare(got, f32, n);
        ok = r.rel <= 1e-2;
        tap_ok(ok, "%s %s: rel L2 %.2e vs fp32 (max |diff| %.2e)", what, tensor, r.rel, r.maxabs);
        if (!ok)
            tap_diag("  worst element %zu: cuda %.9g fp32 %.9g", r.at, (double)got[r.at], (double)f32[r.at]);
    }
    if (representable) {
        float *rt = hrounded(got, n, p);
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < n; i++)
            if (memcmp(&rt[i], &got[i], sizeof(float)) != 0 && !(isnan(rt[i]) && isnan(got[i])) && bad++ == 0)
                first = i;
        tap_ok(bad == 0, "%s %s: every value a %s (%zu of %zu not)", what, tensor, prec_name(p), bad, n);
        if (bad)
            tap_diag("  element %zu: %.9g, as %s %.9g", first, (double)got[first], prec_name(p), (double)rt[first]);
    }
}

/* "what tensor" in a static buffer (one use at a time) */
static const char *tag(const char *what, const char *tensor)
{
    static char buf[200];
    snprintf(buf, sizeof buf, "%s %s", what, tensor);
    return buf;
}

/* run a CUDA op in precision p (the ctx back to fp32 after) */
#define IN_PREC(p, call) (g.precision = (p), prec_rc = (call), g.precision = DB_PREC_F32, prec_rc)
static int prec_rc; /* IN_PREC's result */

static void tp_gemm(db_precision p, int batch, int M, int N, int K, int ta, int tb, float alpha, float beta)
{
    char what[160];
    snprintf(what, sizeof what, "%s gemm_forward b%d %dx%dx%d t%d%d a%g b%g", prec_name(p), batch, M, N, K, ta, tb,
             (double)alpha, (double)beta);
    const size_t na = (size_t)batch * M * K, nb = (size_t)batch * K * N, nc = (size_t)batch * M * N;
    float *A = hrand(na, 1), *B = hrand(nb, 1), *C0 = hrand(nc, 1), *f32 = hcopy(C0, nc), *ref = hrounded(C0, nc, p);
    if (!cpu_ran(db_gemm_forward(cpu, f32, A, B, batch, M, N, K, ta, tb, alpha, beta), what) ||
        !cpu_ran(db_gemm_forward(cpu, ref, hrounded(A, na, p), hrounded(B, nb, p), batch, M, N, K, ta, tb, alpha, beta),
                 what)) {
        release_all();
        return;
    }
    hround(ref, nc, p);
    float *dC = beta == 0 ? dpoison(nc) : dputf(C0, nc);
    if (gpu_ran(IN_PREC(p, api->gemm_forward(&g, dC, dputf(A, na), dputf(B, nb), batch, M, N, K, ta, tb, alpha, beta)),
                what))
        cmp_prec(what, "Cm", dC, ref, f32, nc, p, 1);
    release_all();
}

static void tp_gemm_backward(db_precision p, int batch, int M, int N, int K, int ta, int tb, float alpha)
{
    char what[160];
    snprintf(what, sizeof what, "%s gemm_backward b%d %dx%dx%d t%d%d", prec_name(p), batch, M, N, K, ta, tb);
    const size_t na = (size_t)batch * M * K, nb = (size_t)batch * K * N, nc = (size_t)batch * M * N;
    float *A = hrand(na, 1), *B = hrand(nb, 1), *dC = hrand(nc, 1);
    float *fA = hzeros(na), *fB = hzeros(nb), *rA = hzeros(na), *rB = hzeros(nb);
    if (!cpu_ran(db_gemm_backward(cpu, fA, fB, dC, A, B, batch, M, N, K, ta, tb, alpha), what) ||
        !cpu_ran(db_gemm_backward(cpu, rA, rB, hrounded(dC, nc, p), hrounded(A, na, p), hrounded(B, nb, p), batch, M, N,
                                  K, ta, tb, alpha),
                 what)) {
        release_all();
        return;
    }
    hround(rA, na, p);
    hround(rB, nb, p);
    float *gA = dpoison(na), *gB = dpoison(nb);
    if (gpu_ran(IN_PREC(p, api->gemm_backward(&g, gA, gB, dputf(dC, nc), dputf(A, na), dputf(B, nb), batch, M, N, K,
                                              ta, tb, alpha)),
                what)) {
        cmp_prec(what, "dA", gA, rA, fA, na, p, 1);
        cmp_prec(what, "dB", gB, rB, fB, nb, p, 1);
    }
    release_all();
}

static void tp_linear(db_precision p, int N, int C, int OC, int with_bias)
{
    char what[160];
    snprintf(what, sizeof what, "%s linear_forward %dx%d->%d%s", prec_name(p), N, C, OC, with_bias ? " +bias" : "");
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *b = hrand(OC, 1), *f32 = hzeros(ny), *ref = hzeros(ny);
    if (!cpu_ran(db_linear_forward(cpu, f32, x, w, with_bias ? b : NULL, N, C, OC), what) ||
        !cpu_ran(db_linear_forward(cpu, ref, hrounded(x, nx, p), hrounded(w, nw, p),
                                   with_bias ? hrounded(b, OC, p) : NULL, N, C, OC),
                 what)) {
        release_all();
        return;
    }
    hround(ref, ny, p);
    float *d = dpoison(ny);
    if (gpu_ran(IN_PREC(p, api->linear_forward(&g, d, dputf(x, nx), dputf(w, nw), with_bias ? dputf(b, OC) : NULL, N,
                                               C, OC)),
                what))
        cmp_prec(what, "out", d, ref, f32, ny, p, 1);
    release_all();
}

/* dst = base + contribution, elementwise in float (the GPU's +=) */
static float *hplus(const float *base, const float *contrib, size_t n)
{
    float *r = hcopy(base, n);
    for (size_t i = 0; i < n; i++)
        r[i] += contrib[i];
    return r;
}

static void tp_linear_backward(db_precision p, int N, int C, int OC)
{
    char what[160];
    snprintf(what, sizeof what, "%s linear_backward %dx%d->%d", prec_name(p), N, C, OC);
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *dy = hrand(ny, 1), *dw0 = hrand(nw, 1), *db0 = hrand(OC, 1);
    float *fx = hzeros(nx), *fw = hcopy(dw0, nw), *fb = hcopy(db0, OC); /* plain fp32 */
    float *rx = hzeros(nx), *cw = hzeros(nw), *cb = hzeros(OC);         /* rounded: contributions */
    if (!cpu_ran(db_linear_backward(cpu, fx, fw, fb, dy, x, w, N, C, OC, 0), what) ||
        !cpu_ran(db_linear_backward(cpu, rx, cw, cb, hrounded(dy, ny, p), hrounded(x, nx, p), hrounded(w, nw, p), N, C,
                                    OC, 0),
                 what)) {
        release_all();
        return;
    }
    hround(rx, nx, p);
    hround(cw, nw, p);
    hround(cb, OC, p);
    float *ddy = dputf(dy, ny), *dx_ = dputf(x, nx), *dw_ = dputf(w, nw);
    float *gx = dpoison(nx), *gw = dputf(dw0, nw), *gb = dputf(db0, OC);
    if (gpu_ran(IN_PREC(p, api->linear_backward(&g, gx, gw, gb, ddy, dx_, dw_, N, C, OC, 0)), what)) {
        cmp_prec(what, "dinp", gx, rx, fx, nx, p, 1);
        cmp_prec(what, "dweight (+=)", gw, hplus(dw0, cw, nw), fw, nw, p, 0);
        cmp_prec(what, "dbias (+=)", gb, hplus(db0, cb, OC), fb, OC, p, 0);
    }
    /* from zeros the buffers hold the contributions: rounded before the += */
    float *zw = dputf(hzeros(nw), nw), *zb = dputf(hzeros(OC), OC);
    if (gpu_ran(IN_PREC(p, api->linear_backward(&g, NULL, zw, zb, ddy, dx_, dw_, N, C, OC, 0)), what)) {
        cmp_prec(what, "dweight contribution", zw, cw, NULL, nw, p, 1);
        cmp_prec(what, "dbias contribution", zb, cb, NULL, OC, p, 1);
    }
    /* deterministic in the 16-bit modes too: the first run again, same bits */
    float *gx2 = dpoison(nx), *gw2 = dputf(dw0, nw), *gb2 = dputf(db0, OC);
    if (gpu_ran(IN_PREC(p, api->linear_backward(&g, gx2, gw2, gb2, ddy, dx_, dw_, N, C, OC, 0)), what)) {
        same_bits(tag(what, "dinp"), gx, gx2, nx);
        same_bits(tag(what, "dweight"), gw, gw2, nw);
        same_bits(tag(what, "dbias"), gb, gb2, OC);
    }
    release_all();
}

static void tp_conv(db_precision p, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1,
                    int bias)
{
    char what[160];
    snprintf(what, sizeof what, "%s conv2d_forward B%d %d->%d %dx%d k%dx%d s%d pad %d,%d%s", prec_name(p), B, C, OC, H,
             W, KH, KW, stride, pad0, pad1, bias ? " +bias" : "");
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * KH * KW, ny = (size_t)B * OC * OH * OW;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *b = hrand(OC, 1), *f32 = hzeros(ny), *ref = hzeros(ny);
    if (!cpu_ran(db_conv2d_forward(cpu, f32, x, w, bias ? b : NULL, B, C, H, W, OC, KH, KW, stride, pad0, pad1),
                 what) ||
        !cpu_ran(db_conv2d_forward(cpu, ref, hrounded(x, nx, p), hrounded(w, nw, p), bias ? hrounded(b, OC, p) : NULL,
                                   B, C, H, W, OC, KH, KW, stride, pad0, pad1),
                 what)) {
        release_all();
        return;
    }
    hround(ref, ny, p);
    float *d = dpoison(ny);
    if (gpu_ran(IN_PREC(p, api->conv2d_forward(&g, d, dputf(x, nx), dputf(w, nw), bias ? dputf(b, OC) : NULL, B, C, H,
                                               W, OC, KH, KW, stride, pad0, pad1)),
                what))
        cmp_prec(what, "out", d, ref, f32, ny, p, 1);
    release_all();
}

static void tp_conv_backward(db_precision p, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0,
                             int pad1)
{
    char what[160];
    snprintf(what, sizeof what, "%s conv2d_backward B%d %d->%d %dx%d k%dx%d s%d pad %d,%d", prec_name(p), B, C, OC, H,
             W, KH, KW, stride, pad0, pad1);
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * KH * KW, ny = (size_t)B * OC * OH * OW;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *dy = hrand(ny, 1), *dw0 = hrand(nw, 1), *db0 = hrand(OC, 1);
    float *fx = hzeros(nx), *fw = hcopy(dw0, nw), *fb = hcopy(db0, OC);
    float *rx = hzeros(nx), *cw = hzeros(nw), *cb = hzeros(OC);
    if (!cpu_ran(db_conv2d_backward(cpu, fx, fw, fb, dy, x, w, B, C, H, W, OC, KH, KW, stride, pad0, pad1, 0), what) ||
        !cpu_ran(db_conv2d_backward(cpu, rx, cw, cb, hrounded(dy, ny, p), hrounded(x, nx, p), hrounded(w, nw, p), B, C,
                                    H, W, OC, KH, KW, stride, pad0, pad1, 0),
                 what)) {
        release_all();
        return;
    }
    hround(rx, nx, p);
    hround(cw, nw, p);
    hround(cb, OC, p);
    float *ddy = dputf(dy, ny), *dx_ = dputf(x, nx), *dw_ = dputf(w, nw);
    float *gx = dpoison(nx), *gw = dputf(dw0, nw), *gb = dputf(db0, OC);
    if (gpu_ran(IN_PREC(p, api->conv2d_backward(&g, gx, gw, gb, ddy, dx_, dw_, B, C, H, W, OC, KH, KW, stride, pad0,
                                                pad1, 0)),
                what)) {
        cmp_prec(what, "dinp", gx, rx, fx, nx, p, 1);
        cmp_prec(what, "dweight (+=)", gw, hplus(dw0, cw, nw), fw, nw, p, 0);
        cmp_prec(what, "dbias (+=)", gb, hplus(db0, cb, OC), fb, OC, p, 0);
    }
    float *zw = dputf(hzeros(nw), nw), *zb = dputf(hzeros(OC), OC);
    if (gpu_ran(IN_PREC(p, api->conv2d_backward(&g, NULL, zw, zb, ddy, dx_, dw_, B, C, H, W, OC, KH, KW, stride, pad0,
                                                pad1, 0)),
                what)) {
        cmp_prec(what, "dweight contribution", zw, cw, NULL, nw, p, 1);
        cmp_prec(what, "dbias contribution", zb, cb, NULL, OC, p, 1);
    }
    float *gx2 = dpoison(nx), *gw2 = dputf(dw0, nw), *gb2 = dputf(db0, OC);
    if (gpu_ran(IN_PREC(p, api->conv2d_backward(&g, gx2, gw2, gb2, ddy, dx_, dw_, B, C, H, W, OC, KH, KW, stride, pad0,
                                                pad1, 0)),
                what)) {
        same_bits(tag(what, "dinp"), gx, gx2, nx);
        same_bits(tag(what, "dweight"), gw, gw2, nw);
        same_bits(tag(what, "dbias"), gb, gb2, OC);
    }
    release_all();
}

static void tp_attention(db_precision p, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    char what[160];
    snprintf(what, sizeof what, "%s attention_forward B%d Tq%d Tk%d %dx%d%s", prec_name(p), B, Tq, Tk, NH, HS,
             causal ? " causal" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = hrand(nq, 1), *k = hrand(nk, 1), *v = hrand(nk, 1);
    float *f32 = hzeros(nq), *flse = hzeros(nl), *ref = hzeros(nq), *rlse = hzeros(nl);
    if (!cpu_ran(db_attention_forward(cpu, f32, flse, q, k, v, B, Tq, Tk, NH, HS, causal), what) ||
        !cpu_ran(db_attention_forward(cpu, ref, rlse, hrounded(q, nq, p), hrounded(k, nk, p), hrounded(v, nk, p), B, Tq,
                                      Tk, NH, HS, causal),
                 what)) {
        release_all();
        return;
    }
    hround(ref, nq, p);
    float *dout = dpoison(nq), *dlse = dpoison(nl);
    if (gpu_ran(IN_PREC(p, api->attention_forward(&g, dout, dlse, dputf(q, nq), dputf(k, nk), dputf(v, nk), B, Tq, Tk,
                                                  NH, HS, causal)),
                what)) {
        cmp_prec(what, "out", dout, ref, f32, nq, p, 1);
        cmp(what, "lse (fp32, of the rounded inputs)", dlse, rlse, nl, TOL);
    }
    release_all();
}

static void tp_attention_backward(db_precision p, int B, int Tq, int Tk, int NH, int HS, int causal)
{
    char what[160];
    snprintf(what, sizeof what, "%s attention_backward B%d Tq%d Tk%d %dx%d%s", prec_name(p), B, Tq, Tk, NH, HS,
             causal ? " causal" : "");
    const size_t C = (size_t)NH * HS, nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, nl = (size_t)B * NH * Tq;
    float *q = hrand(nq, 1), *k = hrand(nk, 1), *v = hrand(nk, 1), *dout = hrand(nq, 1);
    float *rq = hrounded(q, nq, p), *rk = hrounded(k, nk, p), *rv = hrounded(v, nk, p);
    /* plain fp32: forward and backward */
    float *fo = hzeros(nq), *fl = hzeros(nl), *fq = hzeros(nq), *fk = hzeros(nk), *fv = hzeros(nk);
    /* the forward on rounded inputs gives out (not yet rounded: the backward
     * must round it) and lse; the reference backward sees everything rounded */
    float *ro = hzeros(nq), *rl = hzeros(nl), *dq = hzeros(nq), *dk = hzeros(nk), *dv = hzeros(nk);
    if (!cpu_ran(db_attention_forward(cpu, fo, fl, q, k, v, B, Tq, Tk, NH, HS, causal), what) ||
        !cpu_ran(db_attention_backward(cpu, fq, fk, fv, dout, fo, fl, q, k, v, B, Tq, Tk, NH, HS, causal), what) ||
        !cpu_ran(db_attention_forward(cpu, ro, rl, rq, rk, rv, B, Tq, Tk, NH, HS, causal), what) ||
        !cpu_ran(db_attention_backward(cpu, dq, dk, dv, hrounded(dout, nq, p), hrounded(ro, nq, p), rl, rq, rk, rv, B,
                                       Tq, Tk, NH, HS, causal),
                 what)) {
        release_all();
        return;
    }
    hround(dq, nq, p);
    hround(dk, nk, p);
    hround(dv, nk, p);
    float *gq = dpoison(nq), *gk = dpoison(nk), *gv = dpoison(nk);
    if (gpu_ran(IN_PREC(p, api->attention_backward(&g, gq, gk, gv, dputf(dout, nq), dputf(ro, nq), dputf(rl, nl),
                                                   dputf(q, nq), dputf(k, nk), dputf(v, nk), B, Tq, Tk, NH, HS,
                                                   causal)),
                what)) {
        cmp_prec(what, "dq", gq, dq, fq, nq, p, 1);
        cmp_prec(what, "dk", gk, dk, fk, nk, p, 1);
        cmp_prec(what, "dv", gv, dv, fv, nk, p, 1);
    }
    release_all();
}

/* ---- activations and elementwise ------------------------------------------------------------- */

typedef enum { A_SILU, A_GELU_ERF, A_GELU_TANH, A_QUICK } act;
static const char *act_name[] = {"silu", "gelu(erf)", "gelu(tanh)", "quick_gelu"};

static int act_cpu(act a, float *out, const float *x, size_t n)
{
    switch (a) {
    case A_SILU:
        return db_silu_forward(cpu, out, x, n);
    case A_GELU_ERF:
        return db_gelu_forward(cpu, out, x, n, DB_GELU_ERF);
    case A_GELU_TANH:
        return db_gelu_forward(cpu, out, x, n, DB_GELU_TANH);
    default:
        return db_quick_gelu_forward(cpu, out, x, n);
    }
}

static int act_gpu(act a, float *out, const float *x, size_t n)
{
    switch (a) {
    case A_SILU:
        return api->silu_forward(&g, out, x, n);
    case A_GELU_ERF:
        return api->gelu_forward(&g, out, x, n, DB_GELU_ERF);
    case A_GELU_TANH:
        return api->gelu_forward(&g, out, x, n, DB_GELU_TANH);
    default:
        return api->quick_gelu_forward(&g, out, x, n);
    }
}

static int act_cpu_bwd(act a, float *dx, const float *dy, const float *x, size_t n)
{
    switch (a) {
    case A_SILU:
        return db_silu_backward(cpu, dx, dy, x, n);
    case A_GELU_ERF:
        return db_gelu_backward(cpu, dx, dy, x, n, DB_GELU_ERF);
    case A_GELU_TANH:
        return db_gelu_backward(cpu, dx, dy, x, n, DB_GELU_TANH);
    default:
        return db_quick_gelu_backward(cpu, dx, dy, x, n);
    }
}

static int act_gpu_bwd(act a, float *dx, const float *dy, const float *x, size_t n)
{
    switch (a) {
    case A_SILU:
        return api->silu_backward(&g, dx, dy, x, n);
    case A_GELU_ERF:
        return api->gelu_backward(&g, dx, dy, x, n, DB_GELU_ERF);
    case A_GELU_TANH:
        return api->gelu_backward(&g, dx, dy, x, n, DB_GELU_TANH);
    default:
        return api->quick_gelu_backward(&g, dx, dy, x, n);
    }
}

static void t_act(act a, size_t n)
{
    const void *fwd = a == A_SILU    ? (const void *)api->silu_forward
                      : a == A_QUICK ? (const void *)api->quick_gelu_forward
                                     : (const void *)api->gelu_forward;
    const void *bwd = a == A_SILU    ? (const void *)api->silu_backward
                      : a == A_QUICK ? (const void *)api->quick_gelu_backward
                                     : (const void *)api->gelu_backward;
    char what[160];
    float *x = hrand(n, 3), *dy = hrand(n, 1), *y = hzeros(n), *dx = hzeros(n);
    snprintf(what, sizeof what, "%s_forward N%zu", act_name[a], n);
    if (have(fwd, what) && cpu_ran(act_cpu(a, y, x, n), what)) {
        float *d = dpoison(n);
        if (gpu_ran(act_gpu(a, d, dputf(x, n), n), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "%s_backward N%zu", act_name[a], n);
    if (have(bwd, what) && cpu_ran(act_cpu_bwd(a, dx, dy, x, n), what)) {
        float *d = dpoison(n);
        if (gpu_ran(act_gpu_bwd(a, d, dputf(dy, n), dputf(x, n), n), what))
            cmp(what, "dinp", d, dx, n, TOL);
    }
    release_all();
}

static void t_geglu(int N, int C)
{
    char what[160];
    const size_t ni = (size_t)N * 2 * C, no = (size_t)N * C;
    float *x = hrand(ni, 2), *y = hzeros(no), *dy = hrand(no, 1), *dx = hzeros(ni);
    snprintf(what, sizeof what, "geglu_forward %dx%d", N, C);
    if (have(api->geglu_forward, what) && cpu_ran(db_geglu_forward(cpu, y, x, N, C), what)) {
        float *d = dpoison(no);
        if (gpu_ran(api->geglu_forward(&g, d, dputf(x, ni), N, C), what))
            cmp(what, "out", d, y, no, TOL);
    }
    snprintf(what, sizeof what, "geglu_backward %dx%d", N, C);
    if (have(api->geglu_backward, what) && cpu_ran(db_geglu_backward(cpu, dx, dy, x, N, C), what)) {
        float *d = dpoison(ni);
        if (gpu_ran(api->geglu_backward(&g, d, dputf(dy, no), dputf(x, ni), N, C), what))
            cmp(what, "dinp", d, dx, ni, TOL);
    }
    release_all();
}

static void t_binary(size_t n)
{
    char what[160];
    float *a = hrand(n, 1), *b = hrand(n, 1), *y = hzeros(n);
    float *da = dputf(a, n), *db = dputf(b, n);
    snprintf(what, sizeof what, "add_forward N%zu", n);
    if (have(api->add_forward, what) && cpu_ran(db_add_forward(cpu, y, a, b, n), what)) {
        float *d = dpoison(n);
        if (gpu_ran(api->add_forward(&g, d, da, db, n), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "mul_forward N%zu", n);
    if (have(api->mul_forward, what) && cpu_ran(db_mul_forward(cpu, y, a, b, n), what)) {
        float *d = dpoison(n);
        if (gpu_ran(api->mul_forward(&g, d, da, db, n), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "axpby_forward N%zu", n);
    if (have(api->axpby_forward, what) && cpu_ran(db_axpby_forward(cpu, y, a, b, 0.3f, -1.7f, n), what)) {
        float *d = dpoison(n);
        if (gpu_ran(api->axpby_forward(&g, d, da, db, 0.3f, -1.7f, n), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "axpby_forward N%zu beta 0, y NULL, in place", n);
    if (have(api->axpby_forward, what) && cpu_ran(db_axpby_forward(cpu, y, a, NULL, 1.25f, 0.0f, n), what)) {
        float *d = dputf(a, n);
        if (gpu_ran(api->axpby_forward(&g, d, d, NULL, 1.25f, 0.0f, n), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "mul_backward N%zu", n);
    float *dy = hrand(n, 1), *ga = hzeros(n), *gb = hzeros(n);
    if (have(api->mul_backward, what) && cpu_ran(db_mul_backward(cpu, ga, gb, dy, a, b, n), what)) {
        float *d1 = dpoison(n), *d2 = dpoison(n), *d3 = dpoison(n), *ddy = dputf(dy, n);
        if (gpu_ran(api->mul_backward(&g, d1, d2, ddy, da, db, n), what)) {
            cmp(what, "da", d1, ga, n, TOL);
            cmp(what, "db", d2, gb, n, TOL);
        }
        if (gpu_ran(api->mul_backward(&g, NULL, d3, ddy, da, db, n), what))
            cmp(what, "db (da NULL)", d3, gb, n, TOL);
    }
    release_all();
}

static void t_add_channel(int B, int C, int HW)
{
    char what[160];
    const size_t n = (size_t)B * C * HW, nv = (size_t)B * C;
    float *x = hrand(n, 1), *v = hrand(nv, 1), *y = hzeros(n), *dy = hrand(n, 1), *dv = hzeros(nv);
    snprintf(what, sizeof what, "add_channel_forward B%d C%d HW%d", B, C, HW);
    if (have(api->add_channel_forward, what) && cpu_ran(db_add_channel_forward(cpu, y, x, v, B, C, HW), what)) {
        float *d = dpoison(n);
        if (gpu_ran(api->add_channel_forward(&g, d, dputf(x, n), dputf(v, nv), B, C, HW), what))
            cmp(what, "out", d, y, n, TOL);
    }
    snprintf(what, sizeof what, "add_channel_backward B%d C%d HW%d", B, C, HW);
    if (have(api->add_channel_backward, what) && cpu_ran(db_add_channel_backward(cpu, dv, dy, B, C, HW), what)) {
        float *d = dpoison(nv);
        if (gpu_ran(api->add_channel_backward(&g, d, dputf(dy, n), B, C, HW), what))
            cmp(what, "dvec", d, dv, nv, TOL);
    }
    release_all();
}

static void t_concat(int B, int C1, int C2, int HW)
{
    char what[160];
    const size_t na = (size_t)B * C1 * HW, nb = (size_t)B * C2 * HW, no = na + nb;
    float *a = hrand(na, 1), *b = hrand(nb, 1), *y = hzeros(no), *dy = hrand(no, 1), *ga = hzeros(na), *gb = hzeros(nb);
    snprintf(what, sizeof what, "concat_channels_forward B%d %d+%d HW%d", B, C1, C2, HW);
    if (have(api->concat_channels_forward, what) &&
        cpu_ran(db_concat_channels_forward(cpu, y, a, b, B, C1, C2, HW), what)) {
        float *d = dpoison(no);
        if (gpu_ran(api->concat_channels_forward(&g, d, dputf(a, na), dputf(b, nb), B, C1, C2, HW), what))
            cmp(what, "out", d, y, no, 0);
    }
    snprintf(what, sizeof what, "concat_channels_backward B%d %d+%d HW%d", B, C1, C2, HW);
    if (have(api->concat_channels_backward, what) &&
        cpu_ran(db_concat_channels_backward(cpu, ga, gb, dy, B, C1, C2, HW), what)) {
        float *d1 = dpoison(na), *d2 = dpoison(nb);
        if (gpu_ran(api->concat_channels_backward(&g, d1, d2, dputf(dy, no), B, C1, C2, HW), what)) {
            cmp(what, "da", d1, ga, na, 0);
            cmp(what, "db", d2, gb, nb, 0);
        }
    }
    release_all();
}

static void t_transpose(int B, int M, int N)
{
    char what[160];
    snprintf(what, sizeof what, "transpose_forward B%d %dx%d", B, M, N);
    if (!have(api->transpose_forward, what))
        return;
    const size_t n = (size_t)B * M * N;
    float *x = hrand(n, 1), *y = hzeros(n);
    if (cpu_ran(db_transpose_forward(cpu, y, x, B, M, N), what)) {
        float *d = dpoison(n);
        if (gpu_ran(api->transpose_forward(&g, d, dputf(x, n), B, M, N), what))
            cmp(what, "out", d, y, n, 0);
    }
    release_all();
}

static void t_upsample(int B, int C, int H, int W)
{
    char what[160];
    const size_t ni = (size_t)B * C * H * W, no = 4 * ni;
    float *x = hrand(ni, 1), *y = hzeros(no), *dy = hrand(no, 1), *dx = hzeros(ni);
    snprintf(what, sizeof what, "upsample_nearest2x_forward B%d C%d %dx%d", B, C, H, W);
    if (have(api->upsample_nearest2x_forward, what) &&
        cpu_ran(db_upsample_nearest2x_forward(cpu, y, x, B, C, H, W), what)) {
        float *d = dpoison(no);
        if (gpu_ran(api->upsample_nearest2x_forward(&g, d, dputf(x, ni), B, C, H, W), what))
            cmp(what, "out", d, y, no, 0);
    }
    snprintf(what, sizeof what, "upsample_nearest2x_backward B%d C%d %dx%d", B, C, H, W);
    if (have(api->upsample_nearest2x_backward, what) &&
        cpu_ran(db_upsample_nearest2x_backward(cpu, dx, dy, B, C, H, W), what)) {
        float *d = dpoison(ni);
        if (gpu_ran(api->upsample_nearest2x_backward(&g, d, dputf(dy, no), B, C, H, W), what))
            cmp(what, "dinp", d, dx, ni, 0);
    }
    release_all();
}

static void t_timestep(int B, int D, int flip, float shift, float max_period)
{
    char what[160];
    snprintf(what, sizeof what, "timestep_embedding_forward B%d D%d flip %d shift %g", B, D, flip, (double)shift);
    if (!have(api->timestep_embedding_forward, what))
        return;
    float *t = hrand(B, 1), *y = hzeros((size_t)B * D);
    for (int i = 0; i < B; i++)
        t[i] = fabsf(t[i]) * 300.0f; /* fractional steps up to ~1000 */
    t[0] = 999.0f;
    if (cpu_ran(db_timestep_embedding_forward(cpu, y, t, B, D, flip, shift, max_period), what)) {
        float *d = dpoison((size_t)B * D);
        if (gpu_ran(api->timestep_embedding_forward(&g, d, dputf(t, B), B, D, flip, shift, max_period), what))
            cmp(what, "out", d, y, (size_t)B * D, TOL);
    }
    release_all();
}

static void t_embedding(int B, int T, int C, int V, int maxT, int with_wpe)
{
    char what[160];
    const size_t nt = (size_t)B * T, no = nt * C, nwte = (size_t)V * C, nwpe = (size_t)maxT * C;
    int32_t *tok = hkeep(malloc(nt * sizeof *tok));
    float *r = hrand(nt, 1);
    for (size_t i = 0; i < nt; i++) /* V small against B*T: repeated ids */
        tok[i] = (int32_t)((uint32_t)(fabsf(r[i]) * 1000.0f) % (uint32_t)V);
    float *wte = hrand(nwte, 1), *wpe = hrand(nwpe, 1), *y = hzeros(no), *dy = hrand(no, 1);
    float *dwte0 = hrand(nwte, 1), *dwpe0 = hrand(nwpe, 1), *dwte = hcopy(dwte0, nwte), *dwpe = hcopy(dwpe0, nwpe);
    int32_t *dtok = dput(tok, nt * sizeof *tok);
    snprintf(what, sizeof what, "embedding_forward B%d T%d C%d V%d%s", B, T, C, V, with_wpe ? " +wpe" : "");
    if (have(api->embedding_forward, what) &&
        cpu_ran(db_embedding_forward(cpu, y, tok, wte, with_wpe ? wpe : NULL, B, T, C, V), what)) {
        float *d = dpoison(no);
        if (gpu_ran(
                api->embedding_forward(&g, d, dtok, dputf(wte, nwte), with_wpe ? dputf(wpe, nwpe) : NULL, B, T, C, V),
                what))
            cmp(what, "out", d, y, no, 0);
        /* an id outside [0, V) is an error, not a wild read */
        int32_t bad = V;
        int32_t *dbad = dput(tok, nt * sizeof *tok);
        api->copy(&g, dbad + nt / 2, &bad, sizeof bad, DB_COPY_H2D);
        int rc = api->embedding_forward(&g, d, dbad, dputf(wte, nwte), NULL, B, T, C, V);
        tap_ok(rc == -1 && g.err.code != 0, "%s: token %d rejected (%s)", what, (int)bad, g.err.msg);
        db_err_clear(&g.err);
    }
    snprintf(what, sizeof what, "embedding_backward B%d T%d C%d V%d%s", B, T, C, V, with_wpe ? " +wpe" : "");
    if (have(api->embedding_backward, what) &&
        cpu_ran(db_embedding_backward(cpu, dwte, with_wpe ? dwpe : NULL, dy, tok, B, T, C, V), what)) {
        float *gte = dputf(dwte0, nwte), *gpe = dputf(dwpe0, nwpe);
        if (gpu_ran(api->embedding_backward(&g, gte, with_wpe ? gpe : NULL, dputf(dy, no), dtok, B, T, C, V), what)) {
            /* same additions in the same order as the CPU: bit-exact */
            cmp(what, "dwte (+=)", gte, dwte, nwte, 0);
            if (with_wpe)
                cmp(what, "dwpe (+=)", gpe, dwpe, nwpe, 0);
        }
    }
    release_all();
}


/* ---- optimizer: bit-identical to libcommon/sd/optim.c ------------------------------- */

/* device tensor d must hold exactly the bits of want (n floats) */
static void cmp_bits(const char *what, const char *tensor, const float *d, const float *want, size_t n)
{
    const float *got = dget(d, n);
    size_t bad = n; /* the first differing element, or n */
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            bad = i;
            break;
        }
    tap_ok(bad == n, "%s %s: bit-identical to the CPU", what, tensor);
    if (bad != n)
        tap_diag("  first difference at %zu: cuda %.9g cpu %.9g", bad, (double)got[bad], (double)want[bad]);
}

/* linear_add_forward (the linear and the residual in one pass) against the
 * GPU's own linear_forward then add_forward: the same bits in fp32 and both
 * 16-bit types (the same GEMM; the epilogue makes the same adds and
 * roundings in the same order), with and without a bias */
static void t_linear_add(db_precision p, int N, int C, int OC, int with_bias)
{
    char what[160];
    snprintf(what, sizeof what, "%s linear_add_forward %dx%d->%d%s", p == DB_PREC_F32 ? "fp32" : prec_name(p), N, C,
             OC, with_bias ? " +bias" : "");
    if (!api->linear_add_forward) { /* (called where DB_CUDA_TEST_ONLY lets the precision section run) */
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = dputf(hrand(nx, 1), nx), *w = dputf(hrand(nw, 0.05f), nw), *b = dputf(hrand(OC, 1), OC);
    float *r = dputf(hrand(ny, 1), ny), *two = dpoison(ny), *one = dpoison(ny);
    if (gpu_ran(IN_PREC(p, api->linear_forward(&g, two, x, w, with_bias ? b : NULL, N, C, OC)), what) &&
        gpu_ran(IN_PREC(p, api->add_forward(&g, two, two, r, ny)), what) &&
        gpu_ran(IN_PREC(p, api->linear_add_forward(&g, one, x, w, with_bias ? b : NULL, r, N, C, OC)), what)) {
        const float *a = dget(one, ny), *b2 = dget(two, ny);
        tap_ok(!memcmp(a, b2, ny * sizeof *a), "%s: bit-identical to linear_forward then add_forward on the device",
               what);
    }
    release_all();
}

/* linear_fan_forward (linears of one input, each its own width: the UNet's
 * time projections) against the CPU's linear per output: in fp32 within
 * TOL, in 16 bits within the mode's tolerance of the rounded reference,
 * every value a compute-type value and at least 95 % of them exactly the
 * reference's (only float32 summation order separates them: a bias added
 * unrounded, or the output left unrounded, fails it); two runs the same
 * bits.  N <= 8 takes the one-launch kernel, more rows the n linears. */
static void t_linear_fan(db_precision p, int N, int C, int with_bias)
{
    enum { FN = 3 };
    static const int oc[FN] = {24, 8, 33};
    char what[160];
    snprintf(what, sizeof what, "%s linear_fan_forward %d rows, %d in, widths 24 8 33%s",
             p == DB_PREC_F32 ? "fp32" : prec_name(p), N, C, with_bias ? " +bias" : "");
    if (!api->linear_fan_forward) { /* (the callers' gate: prec_want) */
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C;
    float *x = hrand(nx, 1), *w[FN], *b[FN], *dw[FN], *db[FN], *d1[FN], *d2[FN];
    for (int i = 0; i < FN; i++) {
        w[i] = hrand((size_t)oc[i] * C, 0.05f), b[i] = hrand(oc[i], 1);
        dw[i] = dputf(w[i], (size_t)oc[i] * C), db[i] = dputf(b[i], oc[i]);
        d1[i] = dpoison((size_t)N * oc[i]), d2[i] = dpoison((size_t)N * oc[i]);
    }
    float *dx = dputf(x, nx);
    const float *const *cw = (const float *const *)dw, *const *cb = with_bias ? (const float *const *)db : NULL;
    if (!gpu_ran(IN_PREC(p, api->linear_fan_forward(&g, d1, dx, cw, cb, oc, FN, N, C)), what) ||
        !gpu_ran(IN_PREC(p, api->linear_fan_forward(&g, d2, dx, cw, cb, oc, FN, N, C)), what)) {
        release_all();
        return;
    }
    for (int i = 0; i < FN; i++) {
        const size_t ny = (size_t)N * oc[i];
        char tensor[16];
        snprintf(tensor, sizeof tensor, "out[%d]", i);
        float *f32 = hzeros(ny), *ref = hzeros(ny);
        const float *bi = with_bias ? b[i] : NULL;
        if (!cpu_ran(db_linear_forward(cpu, f32, x, w[i], bi, N, C, oc[i]), what))
            break;
        if (p == DB_PREC_F32) {
            cmp(what, tensor, d1[i], f32, ny, TOL);
            continue;
        }
        if (!cpu_ran(db_linear_forward(cpu, ref, hrounded(x, nx, p), hrounded(w[i], (size_t)oc[i] * C, p),
                                       bi ? hrounded(bi, oc[i], p) : NULL, N, C, oc[i]), what))
            break;
        hround(ref, ny, p);
        cmp_prec(what, tensor, d1[i], ref, f32, ny, p, 1);
        const float *got = dget(d1[i], ny);
        size_t same = 0;
        for (size_t j = 0; j < ny; j++)
            same += got[j] == ref[j];
        tap_ok(same * 100 >= ny * 95, "%s %s: %zu of %zu values exactly the rounded reference's (95 %% needed)", what,
               tensor, same, ny);
    }
    for (int i = 0; i < FN; i++)
        same_bits(what, d1[i], d2[i], (size_t)N * oc[i]);
    release_all();
}

/* conv2d_add_forward (a ResBlock's convolutions with the time embedding or
 * the shortcut joined in the conv's widening pass) against the device's own
 * conv2d_forward then add_forward / add_channel_forward: the same bits in
 * fp32 and both 16-bit types, with the full addend in a buffer of its own
 * and as out itself (out += conv), and per channel; a plane of <= 16 takes
 * the small-plane widening kernel, a larger one the tiled one */
static void t_conv_add(db_precision p, int B, int C, int H, int W, int OC, int K, int pad, int with_bias)
{
    char what[160];
    snprintf(what, sizeof what, "%s conv2d_add_forward B%d %d->%d %dx%d k%d%s", p == DB_PREC_F32 ? "fp32" :
             prec_name(p), B, C, OC, H, W, K, with_bias ? " +bias" : "");
    if (!api->conv2d_add_forward) { /* (the callers' gate: prec_want) */
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const int OH = H + 2 * pad - K + 1, OW = W + 2 * pad - K + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * K * K, ny = (size_t)B * OC * OH * OW;
    float *x = dputf(hrand(nx, 1), nx), *w = dputf(hrand(nw, 0.1f), nw);
    float *b = with_bias ? dputf(hrand(OC, 1), OC) : NULL;
    float *hr = hrand(ny, 1);
    hr[0] = -0.0f; /* (a signed zero among the addends) */
    float *r = dputf(hr, ny), *ch = dputf(hrand((size_t)B * OC, 1), (size_t)B * OC);
    for (int mode = 0; mode < 3; mode++) { /* 0: add apart, 1: add is out, 2: per channel */
        static const char *const mname[3] = {"an addend", "out += conv", "per channel"};
        float *two = dpoison(ny), *one = mode == 1 ? dputf(hr, ny) : dpoison(ny);
        int ok = gpu_ran(IN_PREC(p, api->conv2d_forward(&g, two, x, w, b, B, C, H, W, OC, K, K, 1, pad, pad)), what);
        if (ok)
            ok = gpu_ran(IN_PREC(p, mode == 2 ? api->add_channel_forward(&g, two, two, ch, B, OC, OH * OW)
                                              : api->add_forward(&g, two, two, r, ny)), what);
        if (ok)
            ok = gpu_ran(IN_PREC(p, api->conv2d_add_forward(&g, one, x, w, b, mode == 0 ? r : mode == 1 ? one : ch,
                                                            mode == 2, B, C, H, W, OC, K, K, 1, pad, pad)), what);
        if (ok) {
            const float *a = dget(one, ny), *b2 = dget(two, ny);
            tap_ok(!memcmp(a, b2, ny * sizeof *a), "%s, %s: bit-identical to conv2d_forward then the add on the device",
                   what, mname[mode]);
        }
    }
    release_all();
}

/* linear_multi_forward / _backward (the projections of one input; its
 * 16-bit copy made once) against the device's own n linear_forward calls,
 * and n linear_backward calls with the input gradients added in order by
 * add_forward (or added to the old dinp): the same bits in fp32 and both
 * 16-bit types, dweight and dbias accumulated from non-zero buffers */
/* attention_qkv_forward against the device's linear_multi_forward then
 * attention_forward: out, lse and (when kept) q, k, v bit-identical; with
 * q, k, v not kept, out and lse the same; and the CPU op close (the CPU's
 * definition is the same two ops). */
static void t_attention_qkv(db_precision p, int B, int T, int C, int NH, int causal)
{
    char what[160];
    snprintf(what, sizeof what, "%s attention_qkv_forward B%d T%d C%d NH%d%s", p == DB_PREC_F32 ? "fp32" : prec_name(p),
             B, T, C, NH, causal ? " causal" : "");
    if (!api->attention_qkv_forward) { /* (prec_want chose it: have() would test DB_CUDA_TEST_ONLY again) */
        tap_ok(0, "%s: not implemented on CUDA", what);
        return;
    }
    const size_t n = (size_t)B * T * C, nl = (size_t)B * NH * T;
    float *hx = hrand(n, 1), *hw[3];
    for (int i = 0; i < 3; i++)
        hw[i] = hrand((size_t)C * C, 0.2f);
    float *x = dputf(hx, n), *w[3] = {dputf(hw[0], (size_t)C * C), dputf(hw[1], (size_t)C * C),
                                      dputf(hw[2], (size_t)C * C)};
    float *q = dpoison(n), *k = dpoison(n), *v = dpoison(n), *o = dpoison(n), *l = dpoison(nl);
    float *q2 = dpoison(n), *k2 = dpoison(n), *v2 = dpoison(n), *o2 = dpoison(n), *l2 = dpoison(nl);
    float *o3 = dpoison(n), *l3 = dpoison(nl);
    float *const qkv2[3] = {q2, k2, v2};
    const float *const cw[3] = {w[0], w[1], w[2]};
    if (gpu_ran(IN_PREC(p, api->attention_qkv_forward(&g, q, k, v, o, l, x, w[0], w[1], w[2], B, T, C, NH, causal)),
                what) &&
        gpu_ran(IN_PREC(p, api->linear_multi_forward(&g, qkv2, x, cw, NULL, 3, B * T, C, C)), what) &&
        gpu_ran(IN_PREC(p, api->attention_forward(&g, o2, l2, q2, k2, v2, B, T, T, NH, C / NH, causal)), what) &&
        gpu_ran(IN_PREC(p, api->attention_qkv_forward(&g, NULL, NULL, NULL, o3, l3, x, w[0], w[1], w[2], B, T, C, NH,
                                                      causal)),
                what)) {
        const int same = !memcmp(dget(q, n), dget(q2, n), n * 4) && !memcmp(dget(k, n), dget(k2, n), n * 4) &&
                         !memcmp(dget(v, n), dget(v2, n), n * 4) && !memcmp(dget(o, n), dget(o2, n), n * 4) &&
                         !memcmp(dget(l, nl), dget(l2, nl), nl * 4);
        tap_ok(same, "%s: q, k, v, out, lse bit-identical to linear_multi_forward then attention_forward", what);
        tap_ok(!memcmp(dget(o3, n), dget(o2, n), n * 4) && !memcmp(dget(l3, nl), dget(l2, nl), nl * 4),
               "%s: q, k, v not kept: out, lse the same bits", what);
        float *ho = hzeros(n), *hl = hzeros(nl);
        g.precision = DB_PREC_F32;
        cpu->precision = p;
        const int cr = db_attention_qkv_forward(cpu, NULL, NULL, NULL, ho, hl, hx, hw[0], hw[1], hw[2], B, T, C, NH,
                                                causal);
        cpu->precision = DB_PREC_F32;
        if (cpu_ran(cr, what))
            cmp(what, "out vs the CPU", o, ho, n, p == DB_PREC_F32 ? 1e-5 : 2e-2);
    }
    release_all();
}

/* ---- activation twins (kernels/cuda/cuda.h db_cuda_twin_*) ---------------------------
 * A producer (layer norm, the plain transpose, linear_geglu's GEGLU) writes
 * its output's 16-bit rounding as it writes the output, and the next op's
 * conversion of exactly that output takes it.  The ops here go through the
 * dispatcher (db_* on g, which counts each op in g.op_seq) and are checked
 * against the same ops called straight through the table (op_seq not
 * counted: every twin is stale at once, so each op converts its input
 * itself): the same bits, with mem_stats' twins_used telling which path
 * ran.  Then what must end a twin: an op writing the output, a copy or a
 * zero into it, a different range, a change of compute type, a graph's
 * capture (a replay remakes it inside, from the replay's input). */
static size_t twins_used(void)
{
    db_mem_stats m;
    memset(&m, 0, sizeof m);
    api->mem_stats(&g, &m);
    return m.twins_used;
}

/* d (n floats, device) and e the same bits; tap line with used (twins
 * taken over the run) against want_used */
static void twin_check(const char *what, const char *how, const float *d, const float *e, size_t n, size_t used,
                       size_t want_used)
{
    const int same = !memcmp(dget(d, n), dget(e, n), n * sizeof(float));
    tap_ok(same && used == want_used, "%s %s: the same bits as without twins, %zu twin(s) taken (want %zu)", what,
           how, used, want_used);
}

static void t_twins(db_precision p, int N, int C, int OC)
{
    char what[160];
    snprintf(what, sizeof what, "%s twins %dx%d->%d", prec_name(p), N, C, OC);
    if (!api->layernorm_forward || !api->linear_forward || !api->mem_stats) {
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C, ny = (size_t)N * OC;
    const float eps = 1e-5f;
    float *x = dputf(hrand(nx, 1), nx), *x2 = dputf(hrand(nx, 1), nx), *lw = dputf(hrand(C, 1), C),
          *lb = dputf(hrand(C, 1), C), *w = dputf(hrand((size_t)OC * C, 0.1f), (size_t)OC * C),
          *b = dputf(hrand(OC, 1), OC);
    float *a = dpoison(nx), *a2 = dpoison(nx), *y = dpoison(ny), *y2 = dpoison(ny);
    db_ctx_clear_error(&g);
    g.precision = p;
    size_t u0 = twins_used();
    /* layer norm, then a linear of its output */
    db_layernorm_forward(&g, a, NULL, NULL, x, lw, lb, N, C, eps);
    db_linear_forward(&g, y, a, w, b, N, C, OC);
    const size_t u1 = twins_used();
    api->layernorm_forward(&g, a2, NULL, NULL, x, lw, lb, N, C, eps);
    api->linear_forward(&g, y2, a2, w, b, N, C, OC);
    if (gpu_ran(api->sync(&g), what)) {
        twin_check(what, "layernorm then linear", y, y2, ny, u1 - u0, 1);
        twin_check(what, "layernorm's own output", a, a2, nx, twins_used() - u1, 0);
    }
    /* layer norm, then the three projections of one input */
    if (api->linear_multi_forward) {
        float *q[3] = {dpoison(ny), dpoison(ny), dpoison(ny)}, *q2[3] = {dpoison(ny), dpoison(ny), dpoison(ny)};
        const float *const ws[3] = {w, w, w}, *const bs[3] = {b, NULL, b};
        u0 = twins_used();
        db_layernorm_forward(&g, a, NULL, NULL, x2, lw, lb, N, C, eps);
        db_linear_multi_forward(&g, q, a, ws, bs, 3, N, C, OC);
        const size_t used = twins_used() - u0;
        api->layernorm_forward(&g, a2, NULL, NULL, x2, lw, lb, N, C, eps);
        api->linear_multi_forward(&g, q2, a2, ws, bs, 3, N, C, OC);
        if (gpu_ran(api->sync(&g), what))
            for (int i = 0; i < 3; i++)
                twin_check(what, i == 0 ? "layernorm then linear_multi (q)" : i == 1 ? "(k)" : "(v)", q[i], q2[i],
                           ny, used, 1);
    }
    /* layer norm, then self-attention's projections and the attention */
    if (api->attention_qkv_forward && C % 8 == 0) {
        const int B = 1, NH = C / 40 ? C / 40 : 1;
        float *wv[3] = {dputf(hrand((size_t)C * C, 0.2f), (size_t)C * C), dputf(hrand((size_t)C * C, 0.2f), (size_t)C * C),
                        dputf(hrand((size_t)C * C, 0.2f), (size_t)C * C)};
        float *o = dpoison(nx), *o2 = dpoison(nx);
        u0 = twins_used();
        db_layernorm_forward(&g, a, NULL, NULL, x, lw, lb, N, C, eps);
        db_attention_qkv_forward(&g, NULL, NULL, NULL, o, NULL, a, wv[0], wv[1], wv[2], B, N, C, NH, 0);
        const size_t used = twins_used() - u0;
        api->layernorm_forward(&g, a2, NULL, NULL, x, lw, lb, N, C, eps);
        api->attention_qkv_forward(&g, NULL, NULL, NULL, o2, NULL, a2, wv[0], wv[1], wv[2], B, N, C, NH, 0);
        if (gpu_ran(api->sync(&g), what))
            twin_check(what, "layernorm then attention_qkv", o, o2, nx, used, 1);
    }
    /* cross-attention: a bias-free linear's q (its 16-bit product is the
     * twin), the attention (its output's 16 bits stored with it, by the
     * mma.sync kernel only: DB_ATTN_MMA=0 makes none), the output projection */
    if (api->attention_forward && api->linear_add_forward && C % 8 == 0 && C / (C / 40 ? C / 40 : 1) <= 160) {
        const int NH = C / 40 ? C / 40 : 1, Tk = 7;
        const size_t nk = (size_t)Tk * C;
        float *wq = dputf(hrand((size_t)C * C, 0.1f), (size_t)C * C), *k = dputf(hrand(nk, 1), nk),
              *v = dputf(hrand(nk, 1), nk), *bo = dputf(hrand(C, 1), C), *q = dpoison(nx), *q2 = dpoison(nx), *o = dpoison(nx), *o2 = dpoison(nx),
              *z = dpoison(nx), *z2 = dpoison(nx);
        const char *was = getenv("DB_ATTN_MMA");
        char *saved = was ? strdup(was) : NULL; /* (t1700 runs this program with DB_ATTN_MMA=0 too) */
        for (int mma = 1; mma >= 0; mma--) {
            setenv("DB_ATTN_MMA", mma ? "1" : "0", 1);
            u0 = twins_used();
            db_linear_forward(&g, q, a2, wq, NULL, N, C, C);
            db_attention_forward(&g, o, NULL, q, k, v, 1, N, Tk, NH, C / NH, 0);
            db_linear_add_forward(&g, z, o, wq, bo, x, N, C, C);
            const size_t used = twins_used() - u0;
            api->linear_forward(&g, q2, a2, wq, NULL, N, C, C);
            api->attention_forward(&g, o2, NULL, q2, k, v, 1, N, Tk, NH, C / NH, 0);
            api->linear_add_forward(&g, z2, o2, wq, bo, x, N, C, C);
            if (saved)
                setenv("DB_ATTN_MMA", saved, 1);
            else
                unsetenv("DB_ATTN_MMA");
            if (gpu_ran(api->sync(&g), what))
                twin_check(what, mma ? "linear (q), attention, linear_add" : "the same with DB_ATTN_MMA=0", z, z2, nx,
                           used, mma ? 2 : 1);
        }
        free(saved);
    }
    /* the plain transpose (the transformer's tokens), then a linear */
    if (api->transpose_forward) {
        u0 = twins_used();
        db_transpose_forward(&g, a, x, 1, C, N); /* x read as (C, N): a (N, C) */
        db_linear_forward(&g, y, a, w, b, N, C, OC);
        const size_t used = twins_used() - u0;
        api->transpose_forward(&g, a2, x, 1, C, N);
        api->linear_forward(&g, y2, a2, w, b, N, C, OC);
        if (gpu_ran(api->sync(&g), what))
            twin_check(what, "transpose then linear", y, y2, ny, used, 1);
    }
    /* the GEGLU of linear_geglu (its input a layer norm's twin), then the second linear */
    if (api->linear_geglu_forward && api->linear_add_forward) {
        const int FF = OC;
        float *wf = dputf(hrand((size_t)2 * FF * C, 0.1f), (size_t)2 * FF * C), *bf = dputf(hrand(2 * FF, 1), 2 * FF);
        float *w2 = dputf(hrand((size_t)C * FF, 0.1f), (size_t)C * FF), *gg = dpoison(ny), *gg2 = dpoison(ny);
        float *z = dpoison(nx), *z2 = dpoison(nx);
        u0 = twins_used();
        db_layernorm_forward(&g, a, NULL, NULL, x, lw, lb, N, C, eps);
        db_linear_geglu_forward(&g, NULL, gg, a, wf, bf, N, C, FF);
        db_linear_add_forward(&g, z, gg, w2, NULL, x, N, FF, C);
        const size_t used = twins_used() - u0;
        api->layernorm_forward(&g, a2, NULL, NULL, x, lw, lb, N, C, eps);
        api->linear_geglu_forward(&g, NULL, gg2, a2, wf, bf, N, C, FF);
        api->linear_add_forward(&g, z2, gg2, w2, NULL, x, N, FF, C);
        if (gpu_ran(api->sync(&g), what))
            twin_check(what, "layernorm, linear_geglu, linear_add", z, z2, nx, used, 2);
    }
    /* what ends a twin: each case against the table's calls, no twin taken */
    for (int k = 0; k < 5; k++) {
        static const char *const how[5] = {"an op writing the output between", "a copy into the output between",
                                           "a zero of the output between", "a linear of the first rows only",
                                           "the compute type changed between"};
        const int rows = k == 3 ? N / 2 : N;
        u0 = twins_used();
        db_layernorm_forward(&g, a, NULL, NULL, x, lw, lb, N, C, eps);
        if (k == 0)
            db_add_forward(&g, a, a, x2, nx);
        else if (k == 1)
            api->copy(&g, a, x2, nx * sizeof(float), DB_COPY_D2D);
        else if (k == 2)
            api->zero(&g, a, nx * sizeof(float));
        if (k == 4)
            g.precision = p == DB_PREC_BF16 ? DB_PREC_F16 : DB_PREC_BF16;
        db_linear_forward(&g, y, a, w, b, rows, C, OC);
        const size_t used = twins_used() - u0;
        api->layernorm_forward(&g, a2, NULL, NULL, x, lw, lb, N, C, eps);
        if (k == 0)
            api->add_forward(&g, a2, a2, x2, nx);
        else if (k == 1)
            api->copy(&g, a2, x2, nx * sizeof(float), DB_COPY_D2D);
        else if (k == 2)
            api->zero(&g, a2, nx * sizeof(float));
        api->linear_forward(&g, y2, a2, w, b, rows, C, OC);
        g.precision = p;
        if (gpu_ran(api->sync(&g), what))
            twin_check(what, how[k], y, y2, (size_t)rows * OC, used, 0);
    }
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* The backward's producers: geglu_backward's dinp into the first linear's
 * backward, layernorm_backward_add's dinp into a linear's backward, a
 * linear backward's dinp (one product, widened) into the attention
 * backward; and a linear_multi backward (dinp the sum of n products) makes
 * none.  Every output of the consumer the same bits as the table's calls. */
static void t_twins_backward(db_precision p, int N, int C, int FF)
{
    char what[160];
    snprintf(what, sizeof what, "%s twins backward %dx%d ff %d", prec_name(p), N, C, FF);
    if (!api->geglu_backward || !api->linear_backward || !api->layernorm_backward_add || !api->mem_stats) {
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C, nf = (size_t)N * FF, n2 = 2 * nf;
    float *proj = dputf(hrand(n2, 1), n2), *dg = dputf(hrand(nf, 1), nf), *a3 = dputf(hrand(nx, 1), nx),
          *w1 = dputf(hrand((size_t)2 * FF * C, 0.1f), (size_t)2 * FF * C), *x = dputf(hrand(nx, 1), nx),
          *dy = dputf(hrand(nx, 1), nx), *wc = dputf(hrand((size_t)C * C, 0.1f), (size_t)C * C),
          *lw = dputf(hrand(C, 1), C), *mean = dpoison(N), *rstd = dpoison(N), *lnout = dpoison(nx);
    float *df[2] = {dpoison(n2), dpoison(n2)}, *da[2] = {dpoison(nx), dpoison(nx)},
          *dw[2] = {dpoison((size_t)2 * FF * C), dpoison((size_t)2 * FF * C)}, *db[2] = {dpoison(2 * FF), dpoison(2 * FF)};
    db_ctx_clear_error(&g);
    g.precision = p;
    /* geglu_backward, then the first linear's backward (its dout) */
    size_t u0 = twins_used();
    db_geglu_backward(&g, df[0], dg, proj, N, FF);
    db_linear_backward(&g, da[0], dw[0], db[0], df[0], a3, w1, N, C, 2 * FF, 1);
    size_t used = twins_used() - u0;
    api->geglu_backward(&g, df[1], dg, proj, N, FF);
    api->linear_backward(&g, da[1], dw[1], db[1], df[1], a3, w1, N, C, 2 * FF, 1);
    if (gpu_ran(api->sync(&g), what)) {
        twin_check(what, "geglu_backward then linear_backward: dinp", da[0], da[1], nx, used, 1);
        twin_check(what, "... dweight", dw[0], dw[1], (size_t)2 * FF * C, used, 1);
        twin_check(what, "... dbias", db[0], db[1], (size_t)2 * FF, used, 1);
    }
    /* layernorm_backward_add, then a linear's backward of its dinp */
    float *dx[2] = {dpoison(nx), dpoison(nx)}, *dl[2] = {dpoison(nx), dpoison(nx)},
          *dwc[2] = {dpoison((size_t)C * C), dpoison((size_t)C * C)};
    api->layernorm_forward(&g, lnout, mean, rstd, x, lw, lw, N, C, 1e-5f);
    u0 = twins_used();
    db_layernorm_backward_add(&g, dx[0], NULL, NULL, dy, mean, rstd, x, lw, a3, N, C, 1);
    db_linear_backward(&g, dl[0], dwc[0], NULL, dx[0], x, wc, N, C, C, 1);
    used = twins_used() - u0;
    api->layernorm_backward_add(&g, dx[1], NULL, NULL, dy, mean, rstd, x, lw, a3, N, C, 1);
    api->linear_backward(&g, dl[1], dwc[1], NULL, dx[1], x, wc, N, C, C, 1);
    if (gpu_ran(api->sync(&g), what)) {
        twin_check(what, "layernorm_backward_add then linear_backward: dinp", dl[0], dl[1], nx, used, 1);
        twin_check(what, "... dweight", dwc[0], dwc[1], (size_t)C * C, used, 1);
    }
    /* a linear's backward (one product into dinp), then the attention's backward of it */
    if (api->attention_backward && C % 8 == 0 && C / (C / 40 ? C / 40 : 1) <= 160) {
        const int NH = C / 40 ? C / 40 : 1, HS = C / NH;
        float *q = dputf(hrand(nx, 1), nx), *k = dputf(hrand(nx, 1), nx), *v = dputf(hrand(nx, 1), nx),
              *o = dpoison(nx), *lse = dpoison((size_t)NH * N);
        float *dq[2] = {dpoison(nx), dpoison(nx)}, *dk[2] = {dpoison(nx), dpoison(nx)},
              *dv[2] = {dpoison(nx), dpoison(nx)};
        api->attention_forward(&g, o, lse, q, k, v, 1, N, N, NH, HS, 0);
        g.op_seq += 2; /* (the table's calls count no op: o's twin from this setup stale) */
        u0 = twins_used();
        db_linear_backward(&g, dl[0], dwc[0], NULL, dy, o, wc, N, C, C, 1);
        db_attention_backward(&g, dq[0], dk[0], dv[0], dl[0], o, lse, q, k, v, 1, N, N, NH, HS, 0);
        used = twins_used() - u0;
        api->linear_backward(&g, dl[1], dwc[1], NULL, dy, o, wc, N, C, C, 1);
        api->attention_backward(&g, dq[1], dk[1], dv[1], dl[1], o, lse, q, k, v, 1, N, N, NH, HS, 0);
        if (gpu_ran(api->sync(&g), what)) {
            twin_check(what, "linear_backward then attention_backward: dq", dq[0], dq[1], nx, used, 1);
            twin_check(what, "... dk", dk[0], dk[1], nx, used, 1);
            twin_check(what, "... dv", dv[0], dv[1], nx, used, 1);
        }
    }
    /* linear_multi_backward: dinp a sum of products, no twin of it */
    if (api->linear_multi_backward) {
        float *const dws[2] = {dwc[0], NULL}, *const dbs[2] = {NULL, NULL};
        const float *const dys[2] = {dy, dx[0]}, *const ws[2] = {wc, wc};
        u0 = twins_used();
        db_linear_multi_backward(&g, dl[0], dws, dbs, dys, x, ws, 2, N, C, C, 0, 1);
        db_linear_backward(&g, dl[1], dwc[1], NULL, dl[0], x, wc, N, C, C, 1);
        used = twins_used() - u0;
        float *ref = dpoison(nx);
        api->linear_backward(&g, ref, dwc[0], NULL, dl[0], x, wc, N, C, C, 1);
        if (gpu_ran(api->sync(&g), what))
            twin_check(what, "linear_multi_backward then linear_backward", dl[1], ref, nx, used, 0);
    }
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* the pair inside a graph: the twin made and taken in every replay (from
 * that replay's input); one made before the capture is not taken inside */
typedef struct {
    float *a, *y;
    const float *x, *lw, *lb, *w, *b;
    int N, C, OC;
} twinwork;
static int twinwork_run(void *arg, db_err *err)
{
    const twinwork *t = arg;
    (void)err;
    db_layernorm_forward(&g, t->a, NULL, NULL, t->x, t->lw, t->lb, t->N, t->C, 1e-5f);
    return db_linear_forward(&g, t->y, t->a, t->w, t->b, t->N, t->C, t->OC);
}
static int twinwork_tail(void *arg, db_err *err)
{
    const twinwork *t = arg;
    (void)err;
    return db_linear_forward(&g, t->y, t->a, t->w, t->b, t->N, t->C, t->OC);
}

static void t_twins_graph(db_precision p)
{
    char what[160];
    snprintf(what, sizeof what, "%s twins in a graph", prec_name(p));
    if (!api->graph_begin || !api->layernorm_forward || !api->linear_forward || !api->mem_stats) {
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    enum { N = 37, C = 320, OC = 24 };
    const size_t nx = (size_t)N * C, ny = (size_t)N * OC;
    float *hx[2] = {hrand(nx, 1), hrand(nx, 1)};
    twinwork t = {dpoison(nx), dpoison(ny), dputf(hx[0], nx), dputf(hrand(C, 1), C), dputf(hrand(C, 1), C),
                  dputf(hrand((size_t)OC * C, 0.1f), (size_t)OC * C), dputf(hrand(OC, 1), OC), N, C, OC};
    float *a2 = dpoison(nx), *y2 = dpoison(ny);
    db_ctx_clear_error(&g);
    g.precision = p;
    db_err err = {0};
    db_graph *gr = NULL;
    const size_t u0 = twins_used();
    const int cap = db_graph_capture(&g, &gr, twinwork_run, &t, sizeof t, &err);
    const size_t used = twins_used() - u0;
    if (tap_ok(cap == 0 && gr, "%s: captured%s%s", what, cap ? ": " : "", cap ? err.msg : "")) {
        tap_ok(used == 1, "%s: the capture took the twin (%zu)", what, used);
        for (int rep = 0; rep < 2; rep++) {
            api->copy(&g, (void *)t.x, hx[rep], nx * sizeof(float), DB_COPY_H2D);
            api->layernorm_forward(&g, a2, NULL, NULL, t.x, t.lw, t.lb, N, C, 1e-5f);
            api->linear_forward(&g, y2, a2, t.w, t.b, N, C, OC);
            db_err_clear(&err);
            if (tap_ok(db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0, "%s: launch %d%s%s", what, rep,
                       err.code ? ": " : "", err.msg))
                twin_check(what, rep ? "replay (x1)" : "replay (x0)", t.y, y2, ny, twins_used() - u0, 1);
        }
    }
    db_graph_free(gr);
    gr = NULL;
    /* a layer norm before the capture, its linear inside: no twin crosses */
    const size_t u1 = twins_used();
    db_layernorm_forward(&g, t.a, NULL, NULL, t.x, t.lw, t.lb, N, C, 1e-5f);
    const int cap2 = db_graph_capture(&g, &gr, twinwork_tail, &t, sizeof t, &err);
    if (tap_ok(cap2 == 0 && gr, "%s: tail captured%s%s", what, cap2 ? ": " : "", cap2 ? err.msg : "")) {
        api->copy(&g, (void *)t.x, hx[1], nx * sizeof(float), DB_COPY_H2D);
        api->layernorm_forward(&g, t.a, NULL, NULL, t.x, t.lw, t.lb, N, C, 1e-5f);
        api->layernorm_forward(&g, a2, NULL, NULL, t.x, t.lw, t.lb, N, C, 1e-5f);
        api->linear_forward(&g, y2, a2, t.w, t.b, N, C, OC);
        if (tap_ok(db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0, "%s: tail launch", what))
            twin_check(what, "a twin from before the capture", t.y, y2, ny, twins_used() - u1, 0);
    }
    db_graph_free(gr);
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* DB_CUDA_TWINS=0 when the ctx is made: no twin made */
/* The sampler's context cache (libcommon/sd/unet.c db_unet_cache_context)
 * as the ops see it: k and v made by a linear_multi into a buffer declared
 * as weights, after a zero that makes its 16-bit copy stale; q by a linear
 * just before the attention (a twin).  The attention's output must be the
 * bits of the same ops on an undeclared buffer, directly and in a graph's
 * replay, for a first context and for a second one made the same way (a
 * copy not made stale would give the first's) */
typedef struct kvcwork {
    float *out, *lse, *q, *x, *wq, *k, *v;
    int B, T, Tk, C, NH;
} kvcwork;

static int kvcwork_run(void *arg, db_err *err)
{
    const kvcwork *w = (const kvcwork *)arg;
    db_linear_forward(&g, w->q, w->x, w->wq, NULL, w->B * w->T, w->C, w->C);
    db_attention_forward(&g, w->out, w->lse, w->q, w->k, w->v, w->B, w->T, w->Tk, w->NH, w->C / w->NH, 0);
    if (g.err.code)
        *err = g.err;
    return g.err.code ? -1 : 0;
}

static void t_kv_cache(db_precision p)
{
    char what[160];
    snprintf(what, sizeof what, "%s context cache as weights (k, v lent to the attention)", prec_name(p));
    if (!api->declare_weights || !api->attention_forward || !api->linear_multi_forward || !api->graph_begin) {
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    enum { B = 2, T = 64, Tk = 7, D = 24, C = 80, NH = 2 };
    const size_t nq = (size_t)B * T * C, nkv = (size_t)B * Tk * C, nctx = (size_t)B * Tk * D;
    float *wk = dputf(hrand((size_t)C * D, 0.2f), (size_t)C * D), *wv = dputf(hrand((size_t)C * D, 0.2f), (size_t)C * D);
    float *ctx[2] = {dputf(hrand(nctx, 1), nctx), dputf(hrand(nctx, 1), nctx)};
    float *cache = dpoison(2 * nkv), *plain = dpoison(2 * nkv);
    kvcwork w = {dpoison(nq), dpoison((size_t)B * NH * T), dpoison(nq), dputf(hrand(nq, 1), nq),
                 dputf(hrand((size_t)C * C, 0.1f), (size_t)C * C), cache, cache + nkv, B, T, Tk, C, NH};
    kvcwork r = w;
    r.out = dpoison(nq), r.lse = dpoison((size_t)B * NH * T), r.q = dpoison(nq), r.k = plain, r.v = plain + nkv;
    db_ctx_clear_error(&g);
    g.precision = p;
    db_err err = {0};
    db_graph *gr = NULL;
    int ok = api->declare_weights(&g, cache, 2 * nkv) == 0;
    for (int i = 0; ok && i < 2; i++) {
        const float *const wt[2] = {wk, wv}, *const bs[2] = {NULL, NULL};
        float *const kc[2] = {cache, cache + nkv}, *const kp[2] = {plain, plain + nkv};
        /* the cache made as unet.c makes it, and the same without a declaration */
        ok = db_ctx_zero(&g, cache, 2 * nkv * sizeof(float)) == 0 &&
             db_linear_multi_forward(&g, kc, ctx[i], wt, bs, 2, B * Tk, D, C) == 0 &&
             db_linear_multi_forward(&g, kp, ctx[i], wt, bs, 2, B * Tk, D, C) == 0 && kvcwork_run(&r, &err) == 0;
        if (ok && i == 0) { /* directly, then recorded */
            ok = kvcwork_run(&w, &err) == 0 && api->sync(&g) == 0;
            if (ok) {
                char t[200];
                snprintf(t, sizeof t, "%s: direct", what);
                cmp(t, "out", w.out, dget(r.out, nq), nq, 0);
            }
            ok = ok && db_graph_capture(&g, &gr, kvcwork_run, &w, sizeof w, &err) == 0 && gr;
        }
        ok = ok && db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0;
        if (ok) {
            char t[200];
            snprintf(t, sizeof t, "%s: a replay, context %d", what, i);
            cmp(t, "out", w.out, dget(r.out, nq), nq, 0);
        }
    }
    tap_ok(ok, "%s: ran%s%s", what, ok ? "" : ": ", ok ? "" : (g.err.code ? g.err.msg : err.msg));
    db_graph_free(gr);
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all(); /* (the cache's free drops its declaration and copy) */
}

static void t_twins_off(void)
{
    const char *what = "DB_CUDA_TWINS=0";
    enum { N = 9, C = 64, OC = 8 };
    db_ctx h = {.device = DB_CUDA, .threads = 1, .cuda_api = api};
    db_err err = {0, ""};
    setenv("DB_CUDA_TWINS", "0", 1);
    const int rc = api->ctx_init(&h, 0, &err);
    unsetenv("DB_CUDA_TWINS");
    if (!tap_ok(rc == 0, "%s: a second ctx%s%s", what, rc ? ": " : "", err.msg))
        return;
    float *hx = hrand((size_t)N * C, 1), *hv = hrand(C, 1), *hw = hrand((size_t)OC * C, 0.1f);
    float *x = api->alloc(&h, sizeof(float) * N * C), *a = api->alloc(&h, sizeof(float) * N * C),
          *v = api->alloc(&h, sizeof(float) * C), *w = api->alloc(&h, sizeof(float) * OC * C),
          *y = api->alloc(&h, sizeof(float) * N * OC);
    api->copy(&h, x, hx, sizeof(float) * N * C, DB_COPY_H2D);
    api->copy(&h, v, hv, sizeof(float) * C, DB_COPY_H2D);
    api->copy(&h, w, hw, sizeof(float) * OC * C, DB_COPY_H2D);
    h.precision = DB_PREC_BF16;
    db_layernorm_forward(&h, a, NULL, NULL, x, v, v, N, C, 1e-5f);
    db_linear_forward(&h, y, a, w, NULL, N, C, OC);
    db_mem_stats m;
    memset(&m, 0, sizeof m);
    api->mem_stats(&h, &m);
    tap_ok(api->sync(&h) == 0 && m.twins_made == 0 && m.twins_used == 0, "%s: %zu made, %zu taken (want 0, 0)%s%s",
           what, m.twins_made, m.twins_used, h.err.code ? ": " : "", h.err.msg);
    api->ctx_destroy(&h);
    release_all();
}

static void t_linear_multi(db_precision p, int n, int N, int C, int OC, int with_bias, int accumulate)
{
    char what[160];
    snprintf(what, sizeof what, "%s linear_multi %d x %dx%d->%d%s%s", p == DB_PREC_F32 ? "fp32" : prec_name(p), n, N,
             C, OC, with_bias ? " +bias" : "", accumulate ? " dinp +=" : "");
    if (!api->linear_multi_forward || !api->linear_multi_backward) { /* (the callers' gate: prec_want) */
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
    float *x = dputf(hrand(nx, 1), nx), *w[DB_LINEAR_MULTI_MAX], *b[DB_LINEAR_MULTI_MAX], *dy[DB_LINEAR_MULTI_MAX];
    float *o1[DB_LINEAR_MULTI_MAX], *o2[DB_LINEAR_MULTI_MAX];
    float *gw1[DB_LINEAR_MULTI_MAX], *gw2[DB_LINEAR_MULTI_MAX], *gb1[DB_LINEAR_MULTI_MAX], *gb2[DB_LINEAR_MULTI_MAX];
    for (int i = 0; i < n; i++) {
        float *hw = hrand(nw, 1), *hb = hrand(OC, 1);
        w[i] = dputf(hrand(nw, 0.05f), nw), b[i] = dputf(hrand(OC, 1), OC), dy[i] = dputf(hrand(ny, 1), ny);
        o1[i] = dpoison(ny), o2[i] = dpoison(ny);
        gw1[i] = dputf(hw, nw), gw2[i] = dputf(hw, nw), gb1[i] = dputf(hb, OC), gb2[i] = dputf(hb, OC);
    }
    float *hx0 = hrand(nx, 1), *dx1 = dputf(hx0, nx), *dx2 = dputf(hx0, nx), *dt = dpoison(nx);
    /* no biases as the UNet passes them (an array of NULLs) where C is odd, else a NULL array */
    static const float *const nulls[DB_LINEAR_MULTI_MAX];
    const float *const *cw = (const float *const *)w,
                       *const *cb = with_bias ? (const float *const *)b : C % 2 ? nulls : NULL;
    int ok = gpu_ran(IN_PREC(p, api->linear_multi_forward(&g, o1, x, cw, cb, n, N, C, OC)), what);
    for (int i = 0; i < n && ok; i++)
        ok = gpu_ran(IN_PREC(p, api->linear_forward(&g, o2[i], x, w[i], with_bias ? b[i] : NULL, N, C, OC)), what);
    if (ok) {
        int same = 1;
        for (int i = 0; i < n; i++)
            same = same && !memcmp(dget(o1[i], ny), dget(o2[i], ny), ny * sizeof(float));
        tap_ok(same, "%s: outputs bit-identical to %d linear_forward calls on the device", what, n);
    }
    ok = gpu_ran(IN_PREC(p, api->linear_multi_backward(&g, dx1, gw1, with_bias ? gb1 : NULL,
                                                        (const float *const *)dy, x, cw, n, N, C, OC, accumulate, 0)),
                 what);
    for (int i = 0; i < n && ok; i++) {
        float *di = i == 0 && !accumulate ? dx2 : dt;
        ok = gpu_ran(IN_PREC(p, api->linear_backward(&g, di, gw2[i], with_bias ? gb2[i] : NULL, dy[i], x, w[i], N, C,
                                                      OC, 0)),
                     what) &&
             (di == dx2 || gpu_ran(api->add_forward(&g, dx2, dx2, dt, nx), what));
    }
    if (ok) {
        int same = !memcmp(dget(dx1, nx), dget(dx2, nx), nx * sizeof(float));
        tap_ok(same, "%s: dinp bit-identical to %d linear_backward calls and the adds on the device", what, n);
        same = 1;
        for (int i = 0; i < n; i++)
            same = same && !memcmp(dget(gw1[i], nw), dget(gw2[i], nw), nw * sizeof(float)) &&
                   !memcmp(dget(gb1[i], OC), dget(gb2[i], OC), OC * sizeof(float));
        tap_ok(same, "%s: dweight, dbias (+=) bit-identical to the %d calls'", what, n);
    }
    release_all();
}

/* ops.h assign, per precision: the parameter gradients written over NaN
 * give the bits of += into zeros (the same call's other outputs too), for
 * every op that takes it; the trainer's UNet backward relies on it. */
static void assign_check(const char *what, int n, const float *const *a, const float *const *z,
                         const size_t *len)
{
    int same = 1;
    for (int i = 0; i < n; i++)
        if (a[i])
            same = same && !memcmp(dget(a[i], len[i]), dget(z[i], len[i]), len[i] * sizeof(float));
    tap_ok(same, "%s: assign over NaN: the bits of += into zeros", what);
}

/* DB_ASSIGN_PACK16 (ops.h): the weight gradients w[i] (len[i] slots of a
 * buffer that was all 0xff bytes) hold the compute-type bits of z[i] (the
 * same op's += into zeros) in their first 2 len[i] bytes and the rest of
 * the slot untouched; the other outputs a[i] (dinp, dbias) are z[i]'s bits */
static void pack_check(const char *what, db_precision p, int nw, const float *const *w, const float *const *zw,
                       const size_t *wlen, int na, const float *const *a, const float *const *z, const size_t *alen)
{
    int same = 1, tail = 1;
    for (int i = 0; i < nw; i++) {
        const float *h = dget(w[i], wlen[i]), *r = dget(zw[i], wlen[i]);
        const uint16_t *u = (const uint16_t *)(const void *)h;
        for (size_t k = 0; k < wlen[i]; k++)
            same = same && u[k] == (p == DB_PREC_F16 ? db_f32_to_f16(r[k]) : db_f32_to_bf16(r[k]));
        for (size_t k = wlen[i]; k < 2 * wlen[i]; k++)
            tail = tail && u[k] == 0xffff;
    }
    for (int i = 0; i < na; i++)
        if (a[i])
            same = same && !memcmp(dget(a[i], alen[i]), dget(z[i], alen[i]), alen[i] * sizeof(float));
    tap_ok(same && tail, "%s: DB_ASSIGN_PACK16 over 0xff bytes: each weight gradient's %s bits of += into zeros "
           "packed (%s), the rest of its slot untouched (%s), the other outputs assigned",
           what, prec_name(p), same ? "same" : "DIFFERENT", tail ? "yes" : "NO");
}

static void t_assign(db_precision p)
{
    const char *pn = p == DB_PREC_F32 ? "fp32" : prec_name(p);
    char what[160];
    { /* linear 300x70->45 +bias (more than one bias chunk of rows) */
        const int N = 300, C = 70, OC = 45;
        const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
        snprintf(what, sizeof what, "%s linear_backward %dx%d->%d", pn, N, C, OC);
        float *x = dputf(hrand(nx, 1), nx), *w = dputf(hrand(nw, 0.05f), nw), *dy = dputf(hrand(ny, 1), ny);
        float *zw = dputf(hzeros(nw), nw), *zb = dputf(hzeros(OC), OC), *aw = dpoison(nw), *ab = dpoison(OC);
        float *zx = dpoison(nx), *ax = dpoison(nx);
        if (gpu_ran(IN_PREC(p, api->linear_backward(&g, zx, zw, zb, dy, x, w, N, C, OC, 0)), what) &&
            gpu_ran(IN_PREC(p, api->linear_backward(&g, ax, aw, ab, dy, x, w, N, C, OC, 1)), what))
            assign_check(what, 3, (const float *const[]){ax, aw, ab}, (const float *const[]){zx, zw, zb},
                         (const size_t[]){nx, nw, (size_t)OC});
        float *pw = dpoison(nw), *pb = dpoison(OC), *px = dpoison(nx);
        if (p != DB_PREC_F32 &&
            gpu_ran(IN_PREC(p, api->linear_backward(&g, px, pw, pb, dy, x, w, N, C, OC, DB_ASSIGN_PACK16)), what))
            pack_check(what, p, 1, (const float *const[]){pw}, (const float *const[]){zw}, (const size_t[]){nw}, 2,
                       (const float *const[]){px, pb}, (const float *const[]){zx, zb}, (const size_t[]){nx, (size_t)OC});
        release_all();
    }
    { /* linear_multi, 3 x 37x24->24 +bias */
        const int n = 3, N = 37, C = 24, OC = 24;
        const size_t nx = (size_t)N * C, nw = (size_t)OC * C, ny = (size_t)N * OC;
        snprintf(what, sizeof what, "%s linear_multi_backward %d x %dx%d->%d", pn, n, N, C, OC);
        float *x = dputf(hrand(nx, 1), nx), *w[3], *dy[3], *zw[3], *zb[3], *aw[3], *ab[3];
        for (int i = 0; i < n; i++) {
            w[i] = dputf(hrand(nw, 0.05f), nw), dy[i] = dputf(hrand(ny, 1), ny);
            zw[i] = dputf(hzeros(nw), nw), zb[i] = dputf(hzeros(OC), OC), aw[i] = dpoison(nw), ab[i] = dpoison(OC);
        }
        float *zx = dpoison(nx), *ax = dpoison(nx);
        const float *const *cw = (const float *const *)w, *const *cdy = (const float *const *)dy;
        if (gpu_ran(IN_PREC(p, api->linear_multi_backward(&g, zx, zw, zb, cdy, x, cw, n, N, C, OC, 0, 0)), what) &&
            gpu_ran(IN_PREC(p, api->linear_multi_backward(&g, ax, aw, ab, cdy, x, cw, n, N, C, OC, 0, 1)), what))
            assign_check(what, 7, (const float *const[]){ax, aw[0], ab[0], aw[1], ab[1], aw[2], ab[2]},
                         (const float *const[]){zx, zw[0], zb[0], zw[1], zb[1], zw[2], zb[2]},
                         (const size_t[]){nx, nw, (size_t)OC, nw, (size_t)OC, nw, (size_t)OC});
        float *pw[3] = {dpoison(nw), dpoison(nw), dpoison(nw)}, *pb[3] = {dpoison(OC), dpoison(OC), dpoison(OC)};
        float *px = dpoison(nx);
        if (p != DB_PREC_F32 &&
            gpu_ran(IN_PREC(p, api->linear_multi_backward(&g, px, pw, pb, cdy, x, cw, n, N, C, OC, 0,
                                                          DB_ASSIGN_PACK16)),
                    what))
            pack_check(what, p, 3, (const float *const[]){pw[0], pw[1], pw[2]},
                       (const float *const[]){zw[0], zw[1], zw[2]}, (const size_t[]){nw, nw, nw}, 4,
                       (const float *const[]){px, pb[0], pb[1], pb[2]}, (const float *const[]){zx, zb[0], zb[1], zb[2]},
                       (const size_t[]){nx, (size_t)OC, (size_t)OC, (size_t)OC});
        release_all();
    }
    /* conv: B, C, H, W, OC, K, stride, pad (3x3: the channels-last filter
     * gradient's small-plane widening; 1x1; a downsampler) */
    const int cs[][8] = {{2, 3, 9, 7, 5, 3, 1, 1}, {2, 8, 6, 6, 5, 1, 1, 0}, {1, 4, 10, 12, 6, 3, 2, 1}};
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++) {
        const int *s = cs[k], B = s[0], C = s[1], H = s[2], W = s[3], OC = s[4], K = s[5], st = s[6], pd = s[7];
        const int OH = (H + 2 * pd - K) / st + 1, OW = (W + 2 * pd - K) / st + 1;
        const size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * K * K, ny = (size_t)B * OC * OH * OW;
        snprintf(what, sizeof what, "%s conv2d_backward B%d %d->%d %dx%d k%d s%d", pn, B, C, OC, H, W, K, st);
        float *x = dputf(hrand(nx, 1), nx), *w = dputf(hrand(nw, 0.05f), nw), *dy = dputf(hrand(ny, 1), ny);
        float *zw = dputf(hzeros(nw), nw), *zb = dputf(hzeros(OC), OC), *aw = dpoison(nw), *ab = dpoison(OC);
        float *zx = dpoison(nx), *ax = dpoison(nx);
        if (gpu_ran(IN_PREC(p, api->conv2d_backward(&g, zx, zw, zb, dy, x, w, B, C, H, W, OC, K, K, st, pd, pd, 0)),
                    what) &&
            gpu_ran(IN_PREC(p, api->conv2d_backward(&g, ax, aw, ab, dy, x, w, B, C, H, W, OC, K, K, st, pd, pd, 1)),
                    what))
            assign_check(what, 3, (const float *const[]){ax, aw, ab}, (const float *const[]){zx, zw, zb},
                         (const size_t[]){nx, nw, (size_t)OC});
        float *pw = dpoison(nw), *pb = dpoison(OC), *px = dpoison(nx);
        if (p != DB_PREC_F32 &&
            gpu_ran(IN_PREC(p, api->conv2d_backward(&g, px, pw, pb, dy, x, w, B, C, H, W, OC, K, K, st, pd, pd,
                                                    DB_ASSIGN_PACK16)),
                    what))
            pack_check(what, p, 1, (const float *const[]){pw}, (const float *const[]){zw}, (const size_t[]){nw}, 2,
                       (const float *const[]){px, pb}, (const float *const[]){zx, zb}, (const size_t[]){nx, (size_t)OC});
        /* the filter gradient alone (no dinp: the widening not joined with the data gradient's) */
        float *qw = dpoison(nw), *qb = dpoison(OC);
        if (p != DB_PREC_F32 &&
            gpu_ran(IN_PREC(p, api->conv2d_backward(&g, NULL, qw, qb, dy, x, w, B, C, H, W, OC, K, K, st, pd, pd,
                                                    DB_ASSIGN_PACK16)),
                    what))
            pack_check(what, p, 1, (const float *const[]){qw}, (const float *const[]){zw}, (const size_t[]){nw}, 1,
                       (const float *const[]){qb}, (const float *const[]){zb}, (const size_t[]){(size_t)OC});
        release_all();
    }
    if (p != DB_PREC_F32) /* the norms have no 16-bit mode */
        return;
    { /* group norm + SiLU, and layer norm */
        const int B = 2, C = 8, HW = 15, G = 4, N = 33, LC = 150;
        const size_t n = (size_t)B * C * HW, ng = (size_t)B * G, nl = (size_t)N * LC;
        snprintf(what, sizeof what, "fp32 groupnorm_backward B%d C%d HW%d G%d +silu", B, C, HW, G);
        float *hx = hrand(n, 2), *hw = hrand(C, 1), *hb = hrand(C, 1), *hy = hzeros(n);
        float *hm = hzeros(ng), *hr = hzeros(ng);
        if (cpu_ran(db_groupnorm_forward(cpu, hy, hm, hr, hx, hw, hb, B, C, HW, G, 1e-5f, 1), what)) {
            float *x = dputf(hx, n), *w = dputf(hw, C), *b = dputf(hb, C), *m = dputf(hm, ng), *r = dputf(hr, ng);
            float *dy = dputf(hrand(n, 1), n), *zx = dpoison(n), *ax = dpoison(n);
            float *zw = dputf(hzeros(C), C), *zb = dputf(hzeros(C), C), *aw = dpoison(C), *ab = dpoison(C);
            if (gpu_ran(api->groupnorm_backward(&g, zx, zw, zb, dy, m, r, x, w, b, B, C, HW, G, 1, 0), what) &&
                gpu_ran(api->groupnorm_backward(&g, ax, aw, ab, dy, m, r, x, w, b, B, C, HW, G, 1, 1), what))
                assign_check(what, 3, (const float *const[]){ax, aw, ab}, (const float *const[]){zx, zw, zb},
                             (const size_t[]){n, (size_t)C, (size_t)C});
        }
        release_all();
        snprintf(what, sizeof what, "fp32 layernorm_backward %dx%d", N, LC);
        float *lx = hrand(nl, 1), *lw = hrand(LC, 1), *lb = hrand(LC, 1), *ly = hzeros(nl);
        float *lm = hzeros(N), *lr = hzeros(N);
        if (cpu_ran(db_layernorm_forward(cpu, ly, lm, lr, lx, lw, lb, N, LC, 1e-5f), what)) {
            float *x = dputf(lx, nl), *w = dputf(lw, LC), *m = dputf(lm, N), *r = dputf(lr, N);
            float *dy = dputf(hrand(nl, 1), nl), *zx = dpoison(nl), *ax = dpoison(nl);
            float *zw = dputf(hzeros(LC), LC), *zb = dputf(hzeros(LC), LC), *aw = dpoison(LC), *ab = dpoison(LC);
            if (gpu_ran(api->layernorm_backward(&g, zx, zw, zb, dy, m, r, x, w, N, LC, 0), what) &&
                gpu_ran(api->layernorm_backward(&g, ax, aw, ab, dy, m, r, x, w, N, LC, 1), what))
                assign_check(what, 3, (const float *const[]){ax, aw, ab}, (const float *const[]){zx, zw, zb},
                             (const size_t[]){nl, (size_t)LC, (size_t)LC});
        }
        release_all();
    }
}

/* linear_geglu_forward against the device's linear_forward then
 * geglu_forward: the same projection and output bits */
static void t_linear_geglu(db_precision p, int N, int C, int FF, int with_bias)
{
    char what[160];
    snprintf(what, sizeof what, "%s linear_geglu_forward %dx%d->2x%d%s", p == DB_PREC_F32 ? "fp32" : prec_name(p), N,
             C, FF, with_bias ? " +bias" : "");
    if (!api->linear_geglu_forward) { /* (called where DB_CUDA_TEST_ONLY lets the precision section run) */
        printf("# %s: not implemented on CUDA\n", what);
        return;
    }
    const size_t nx = (size_t)N * C, nw = (size_t)2 * FF * C, np = (size_t)N * 2 * FF, no = (size_t)N * FF;
    float *x = dputf(hrand(nx, 1), nx), *w = dputf(hrand(nw, 0.2f), nw), *b = dputf(hrand(2 * FF, 1), 2 * FF);
    float *p2 = dpoison(np), *o2 = dpoison(no), *p1 = dpoison(np), *o1 = dpoison(no);
    if (gpu_ran(IN_PREC(p, api->linear_forward(&g, p2, x, w, with_bias ? b : NULL, N, C, 2 * FF)), what) &&
        gpu_ran(IN_PREC(p, api->geglu_forward(&g, o2, p2, N, FF)), what) &&
        gpu_ran(IN_PREC(p, api->linear_geglu_forward(&g, p1, o1, x, w, with_bias ? b : NULL, N, C, FF)), what)) {
        const float *a = dget(p1, np), *a2 = dget(p2, np), *c1 = dget(o1, no), *c2 = dget(o2, no);
        tap_ok(!memcmp(a, a2, np * sizeof *a) && !memcmp(c1, c2, no * sizeof *c1),
               "%s: projection and output bit-identical to linear_forward then geglu_forward on the device", what);
        /* proj NULL (inference): the output alone, the same bits (16-bit
         * with a bias: the projection stays in cublasLt's 16-bit sums) */
        float *o3 = dpoison(no);
        if (gpu_ran(IN_PREC(p, api->linear_geglu_forward(&g, NULL, o3, x, w, with_bias ? b : NULL, N, C, FF)), what)) {
            const float *c3 = dget(o3, no);
            tap_ok(!memcmp(c3, c2, no * sizeof *c3), "%s: without keeping the projection, the same output", what);
        }
    }
    release_all();
}

/* transpose_add_forward against the device's transpose_forward then add_forward */
static void t_transpose_add(int B, int M, int N)
{
    char what[160];
    snprintf(what, sizeof what, "transpose_add_forward B%d %dx%d", B, M, N);
    if (!have((const void *)api->transpose_add_forward, what))
        return;
    const size_t n = (size_t)B * M * N;
    float *x = dputf(hrand(n, 1), n), *r = dputf(hrand(n, 1), n), *two = dpoison(n), *one = dpoison(n);
    if (gpu_ran(api->transpose_forward(&g, two, x, B, M, N), what) &&
        gpu_ran(api->add_forward(&g, two, two, r, n), what) &&
        gpu_ran(api->transpose_add_forward(&g, one, x, r, B, M, N), what)) {
        const float *a = dget(one, n), *b = dget(two, n);
        tap_ok(!memcmp(a, b, n * sizeof *a), "%s: bit-identical to transpose_forward then add_forward on the device",
               what);
    }
    release_all();
}

/* One AdamW step (t) with gradient gr on the declared buffer dw (moments dm,
 * dv), whole or in two spans cut at cut (< nw), and on the undeclared du
 * (dm2, dv2) whole: 1 when every call ran */
static int adamw_both(const char *step, float *dw, float *dm, float *dv, float *du, float *dm2, float *dv2,
                      const float *gr, size_t nw, size_t cut, const db_adamw *hp, int t)
{
    return gpu_ran(api->opt_adamw(&g, dw, dm, dv, gr, cut, hp, t), step) &&
           (cut >= nw || gpu_ran(api->opt_adamw(&g, dw + cut, dm + cut, dv + cut, gr + cut, nw - cut, hp, t), step)) &&
           gpu_ran(api->opt_adamw(&g, du, dm2, dv2, gr, nw, hp, t), step);
}

/* A 3x3 conv (pad 1) of kx (B, C, S, S) in precision p with the filter at
 * fw and with the one at fu (O output channels): the same bits; 0 when a
 * call failed */
static int conv_both(const char *step, db_precision p, const float *kx, const float *fw, const float *fu, int B,
                     int C, int S, int O)
{
    const size_t ny = (size_t)B * O * S * S;
    float *y1 = dpoison(ny), *y2 = dpoison(ny);
    if (!gpu_ran(IN_PREC(p, api->conv2d_forward(&g, y1, kx, fw, NULL, B, C, S, S, O, 3, 3, 1, 1, 1)), step) ||
        !gpu_ran(IN_PREC(p, api->conv2d_forward(&g, y2, kx, fu, NULL, B, C, S, S, O, 3, 3, 1, 1, 1)), step))
        return 0;
    same_bits(step, y1, y2, ny);
    return 1;
}

/* Declared weights (db_ctx_declare_weights): a 16-bit working copy must
 * never change a result.  The same linear runs on a declared weight buffer
 * and on an undeclared copy of it, after each event that must keep the
 * working copy current (first use, the fused AdamW) or make it rebuild (a
 * copy into the buffer, the other compute type).  A 3x3 filter after the
 * linear's weight is kept channels-last in the copy (conv.cu): a conv
 * forward and its data gradient run on it too at each stage, and a conv
 * on a second filter, before the linear's weight.  The second AdamW runs
 * in two spans split inside the first filter.  The 8-bit AdamW of one
 * tensor makes the copy stale; opt_adamw8bit_many's steps write it (plain
 * tensors and both filters, 8-bit and fp32 moments, bf16 and fp16), and
 * the ops after them find it current: no whole rebuild (mem_stats). */
static void t_shadow(void)
{
    const char *what = "declared weights";
    if (!have((const void *)api->declare_weights, what) || !have((const void *)api->opt_adamw, what))
        return;
    const int N = 9, C = 24, OC = 10;
    /* the conv: B 2, 5 -> 6 channels, 7x7, 3x3, pad 1; its filter at fo1 */
    const int KB = 2, KC = 5, KO = 6, KS = 7;
    /* the filter 16 floats aligned, as our weight buffers keep every tensor
     * (a misaligned one is converted to scratch: autocast.cu) */
    const size_t nf = (size_t)KO * KC * 9, nkx = (size_t)KB * KC * KS * KS,
                 nky = (size_t)KB * KO * KS * KS;
    /* a second filter (5 -> 3 channels, the same input) at fo2, registered
     * after the first though it lies before it: the fused AdamW finds each
     * element's filter in a table sorted by offset */
    const int KO2 = 3;
    const size_t fo2 = 16, nf2 = (size_t)KO2 * KC * 9;
    const size_t lin = ((fo2 + nf2 + 15) / 16) * 16; /* the linear's weight after it */
    const size_t fo1 = ((lin + (size_t)OC * C + 7 + 15) / 16) * 16;
    const size_t nx = (size_t)N * C, nw = fo1 + nf + 5, ny = (size_t)N * OC; /* + 7: a sub-range */
    float *w = hrand(nw, 0.05f), *x = hrand(nx, 1);
    float *kx = dputf(hrand(nkx, 1), nkx), *kdy = dputf(hrand(nky, 1), nky);
    float *dw = dputf(w, nw), *du = dputf(w, nw), *dx = dputf(x, nx);
    float *dm = dputf(hzeros(nw), nw), *dv = dputf(hzeros(nw), nw), *dm2 = dputf(hzeros(nw), nw),
          *dv2 = dputf(hzeros(nw), nw);
    if (!gpu_ran(api->declare_weights(&g, dw, nw), what)) {
        release_all();
        return;
    }
    const db_adamw hp = db_adamw_defaults(1e-2);
    const char *stage[] = {"first use",
                           "after the fused AdamW",
                           "after a second AdamW",
                           "after a copy into the buffer",
                           "in the other compute type",
                           "in fp32",
                           "after an 8-bit AdamW step (bf16)",
                           "after an 8-bit step of opt_adamw8bit_many (bf16)",
                           "after an 8-bit step of opt_adamw8bit_many (fp16)"};
    db_q8_maps maps;
    db_q8_maps_make(&maps);
    const size_t nb = (nw + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    uint8_t *q1 = dput(hzeros(nw), nw), *q2 = dput(hzeros(nw), nw), *q3 = dput(hzeros(nw), nw),
            *q4 = dput(hzeros(nw), nw);
    float *a1 = dputf(hzeros(nb), nb), *a2 = dputf(hzeros(nb), nb), *a3 = dputf(hzeros(nb), nb),
          *a4 = dputf(hzeros(nb), nb);
    /* opt_adamw8bit_many's tensors: fp32 moments, the second filter, the
     * linear's weight and what lies around it, the first filter (fp32
     * moments), the tail; its steps write the copy in the same pass */
    const size_t jlo[] = {0, fo2, fo2 + nf2, fo1, fo1 + nf}, jhi[] = {fo2, fo2 + nf2, fo1, fo1 + nf, nw};
    const int jq8[] = {0, 1, 1, 0, 1};
    enum { NJ = 5 };
    uint8_t *q5 = dput(hzeros(nw), nw), *q6 = dput(hzeros(nw), nw), *q7 = dput(hzeros(nw), nw),
            *q8 = dput(hzeros(nw), nw);
    float *a5 = dputf(hzeros(nb + NJ), nb + NJ), *a6 = dputf(hzeros(nb + NJ), nb + NJ),
          *a7 = dputf(hzeros(nb + NJ), nb + NJ), *a8 = dputf(hzeros(nb + NJ), nb + NJ);
    const int nstage = api->opt_adamw8bit_many ? 9 : api->opt_adamw8bit ? 7 : 6;
    db_mem_stats ms0;
    memset(&ms0, 0, sizeof ms0);
    for (int k = 0; k < nstage; k++) {
        if (k >= 7) { /* the copy current in this stage's type first (fp16: rebuilt), then the step */
            float *y0 = dpoison(ny);
            if (!gpu_ran(IN_PREC(k == 8 ? DB_PREC_F16 : DB_PREC_BF16,
                                 api->linear_forward(&g, y0, dx, dw + lin + 7, NULL, N, C, OC)),
                         what))
                break;
            float *gr = dputf(hrand(nw, 0.05f), nw);
            db_q8_job j1[NJ], j2[NJ];
            size_t boff = 0;
            for (int i = 0; i < NJ; i++) {
                const size_t o = jlo[i], n = jhi[i] - jlo[i];
                j1[i] = (db_q8_job){dw + o, gr + o, n, jq8[i], q5 + o, q6 + o, a5 + boff, a6 + boff, dm + o, dv + o, 0};
                j2[i] = (db_q8_job){du + o, gr + o, n, jq8[i], q7 + o, q8 + o, a7 + boff, a8 + boff, dm2 + o, dv2 + o, 0};
                boff += (n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
            }
            api->mem_stats(&g, &ms0);
            if (!gpu_ran(api->opt_adamw8bit_many(&g, j1, NJ, &hp, k - 6, &maps), what) ||
                !gpu_ran(api->opt_adamw8bit_many(&g, j2, NJ, &hp, k - 6, &maps), what))
                break;
        }
        if (k == 6) { /* the 8-bit step is not fused with the working copy: it must go stale */
            float *y0 = dpoison(ny); /* the copy was last built in fp16: current in bf16 first */
            if (!gpu_ran(IN_PREC(DB_PREC_BF16, api->linear_forward(&g, y0, dx, dw + lin + 7, NULL, N, C, OC)), what))
                break;
            float *gr = dputf(hrand(nw, 0.05f), nw);
            if (!gpu_ran(api->opt_adamw8bit(&g, dw, q1, q2, a1, a2, gr, nw, &hp, 1, &maps), what) ||
                !gpu_ran(api->opt_adamw8bit(&g, du, q3, q4, a3, a4, gr, nw, &hp, 1, &maps), what))
                break;
        }
        char step[200];
        snprintf(step, sizeof step, "%s: linear on declared vs undeclared weights, %s", what, stage[k]);
        if (k == 1 || k == 2) { /* the same update on both; the second in two spans, split inside a filter */
            float *gr = dputf(hrand(nw, 0.05f), nw);
            if (!adamw_both(step, dw, dm, dv, du, dm2, dv2, gr, nw, k == 2 ? fo1 + nf / 2 + 3 : nw, &hp, k))
                break;
        }
        if (k == 3) {
            float *nwv = hrand(nw, 0.05f);
            api->copy(&g, dw, nwv, nw * sizeof(float), DB_COPY_H2D);
            api->copy(&g, du, nwv, nw * sizeof(float), DB_COPY_H2D);
        }
        const db_precision p = k == 5 ? DB_PREC_F32 : k == 4 || k == 8 ? DB_PREC_F16 : DB_PREC_BF16;
        float *y1 = dpoison(ny), *y2 = dpoison(ny);
        if (!gpu_ran(IN_PREC(p, api->linear_forward(&g, y1, dx, dw + lin + 7, NULL, N, C, OC)), step) ||
            !gpu_ran(IN_PREC(p, api->linear_forward(&g, y2, dx, du + lin + 7, NULL, N, C, OC)), step))
            break;
        same_bits(step, y1, y2, ny);
        snprintf(step, sizeof step, "%s: conv (3x3 filter) on declared vs undeclared weights, %s", what, stage[k]);
        float *c1 = dpoison(nky), *c2 = dpoison(nky), *g1 = dpoison(nkx), *g2 = dpoison(nkx);
        if (!gpu_ran(IN_PREC(p, api->conv2d_forward(&g, c1, kx, dw + fo1, NULL, KB, KC, KS, KS, KO, 3, 3, 1, 1, 1)),
                     step) ||
            !gpu_ran(IN_PREC(p, api->conv2d_forward(&g, c2, kx, du + fo1, NULL, KB, KC, KS, KS, KO, 3, 3, 1, 1, 1)),
                     step) ||
            !gpu_ran(IN_PREC(p, api->conv2d_backward(&g, g1, NULL, NULL, kdy, kx, dw + fo1, KB, KC, KS, KS, KO, 3, 3,
                                                     1, 1, 1, 0)),
                     step) ||
            !gpu_ran(IN_PREC(p, api->conv2d_backward(&g, g2, NULL, NULL, kdy, kx, du + fo1, KB, KC, KS, KS, KO, 3, 3,
                                                     1, 1, 1, 0)),
                     step))
            break;
        same_bits(step, c1, c2, nky);
        snprintf(step, sizeof step, "%s: conv data gradient on declared vs undeclared weights, %s", what, stage[k]);
        same_bits(step, g1, g2, nkx);
        snprintf(step, sizeof step, "%s: conv (the second 3x3 filter) on declared vs undeclared weights, %s", what,
                 stage[k]);
        if (!conv_both(step, p, kx, dw + fo2, du + fo2, KB, KC, KS, KO2))
            break;
        if (k >= 7) { /* written by the step, not rebuilt after it */
            db_mem_stats ms1;
            api->mem_stats(&g, &ms1);
            tap_ok(ms1.copies_built == ms0.copies_built,
                   "%s: %s: the working copy written by the step (%zu whole rebuilds after it)", what, stage[k],
                   ms1.copies_built - ms0.copies_built);
        }
    }
    release_all();
}

/* The fused AdamW's staged filter copies (optim.cu adamw_stage_plan): a 3x3
 * filter of 200 input channels (rows of 1800 elements: a 4096-element chunk
 * lies on at most 4) in a declared buffer, off the chunks' alignment, so the
 * chunks wholly inside it write the copy through shared memory and the two
 * across its ends element by element; the AdamW runs whole, then in two
 * spans cut inside the filter (chunks of one and of four rows), then in
 * fp16.  After each, a conv on the declared buffer (its working copy) and
 * on an undeclared copy of it (converted per call) give the same bits. */
static void t_shadow_staged(void)
{
    const char *what = "opt_adamw: staged filter copies, conv on declared vs undeclared weights";
    if (!have((const void *)api->declare_weights, what) || !have((const void *)api->opt_adamw, what))
        return;
    /* 299 channels: the second chunk's last row holds 7 floats, one
     * channel's taps (a run of width 1: adamw_div's d 1); 9000 plain floats
     * after the filter: whole chunks that meet no filter (the plain path) */
    const int KB = 1, KC = 299, KO = 6, KS = 5;
    const size_t fo = 112, nf = (size_t)KO * KC * 9, nw = fo + nf + 9000, nx = (size_t)KB * KC * KS * KS,
                 ny = (size_t)KB * KO * KS * KS;
    float *w = hrand(nw, 0.05f);
    float *dw = dputf(w, nw), *du = dputf(w, nw), *kx = dputf(hrand(nx, 1), nx);
    float *dm = dputf(hzeros(nw), nw), *dv = dputf(hzeros(nw), nw), *dm2 = dputf(hzeros(nw), nw),
          *dv2 = dputf(hzeros(nw), nw);
    if (!gpu_ran(api->declare_weights(&g, dw, nw), what)) {
        release_all();
        return;
    }
    const db_adamw hp = db_adamw_defaults(1e-2);
    const char *stage[] = {"first use", "after the AdamW", "after the AdamW in two spans", "fp16, after the AdamW"};
    for (int k = 0; k < 4; k++) {
        char step[240];
        snprintf(step, sizeof step, "%s, %s", what, stage[k]);
        const db_precision prec = k == 3 ? DB_PREC_F16 : DB_PREC_BF16;
        if (k == 3) { /* the copy rebuilt in fp16 first: the AdamW then writes fp16 */
            float *y0 = dpoison(ny);
            if (!gpu_ran(IN_PREC(prec, api->conv2d_forward(&g, y0, kx, dw + fo, NULL, KB, KC, KS, KS, KO, 3, 3, 1, 1,
                                                           1)),
                         step))
                break;
        }
        if (k > 0) {
            float *gr = dputf(hrand(nw, 0.05f), nw);
            if (!adamw_both(step, dw, dm, dv, du, dm2, dv2, gr, nw, k == 2 ? fo + 5003 : nw, &hp, k))
                break;
        }
        if (!conv_both(step, prec, kx, dw + fo, du + fo, KB, KC, KS, KO))
            break;
        /* plain weights after the filter (10 x 300 of the 9000, in the two
         * chunks that meet no filter) through a linear: their copies written
         * at their own places */
        {
            enum { LN = 4, LC = 300, LO = 10 };
            float *lx = dputf(hrand((size_t)LN * LC, 1), (size_t)LN * LC), *l1 = dpoison((size_t)LN * LO),
                  *l2 = dpoison((size_t)LN * LO);
            const size_t lo = fo + nf + 4200; /* [20458, 23458): chunks from 16384 and 20480 */
            if (!gpu_ran(IN_PREC(prec, api->linear_forward(&g, l1, lx, dw + lo, NULL, LN, LC, LO)), step) ||
                !gpu_ran(IN_PREC(prec, api->linear_forward(&g, l2, lx, du + lo, NULL, LN, LC, LO)), step))
                break;
            same_bits(step, l1, l2, (size_t)LN * LO);
        }
    }
    release_all();
}

/* The allocator's large blocks (kernels/cuda/cuda.h DB_CUDA_LARGE): sized to
 * 2 MiB rather than a quarter-power-of-two class, and a freed one serves a
 * request up to 1/8 smaller. */
static void t_alloc_large(void)
{
    const char *what = "allocator, large blocks";
    if (!have((const void *)api->mem_stats, what))
        return;
    const size_t MiB = (size_t)1 << 20;
    db_mem_stats s0, s1, s2, s3;
    api->mem_stats(&g, &s0);
    void *a = api->alloc(&g, 300 * MiB + 1);
    api->mem_stats(&g, &s1);
    tap_ok(a && s1.in_use - s0.in_use == 302 * MiB, "%s: 300 MiB + 1 byte takes %zu MiB (2 MiB grains: 302)", what,
           (s1.in_use - s0.in_use) / MiB);
    api->free(&g, a);
    void *b = api->alloc(&g, 280 * MiB);
    api->mem_stats(&g, &s2);
    tap_ok(b == a && s2.reserved == s1.reserved,
           "%s: a freed 302 MiB block serves 280 MiB (within 1/8) without a new allocation", what);
    api->free(&g, b);
    void *c = api->alloc(&g, 200 * MiB); /* a small class: not from the large list */
    void *d = api->alloc(&g, 260 * MiB); /* large, but 302 is more than 1/8 over */
    api->mem_stats(&g, &s3);
    tap_ok(d != a && s3.reserved > s2.reserved, "%s: 260 MiB does not take the 302 MiB block (over 1/8 larger)",
           what);
    api->free(&g, c);
    api->free(&g, d);
    if (api->ctx_trim)
        api->ctx_trim(&g);
}

/* three AdamW steps (t = 1, 2, 3) from m = v = 0, a fresh gradient each
 * step; coef: the folded clip coefficient (optim.h grad_coef), 0 none */
static void t_adamw(size_t n, double lr, double wd, double coef)
{
    char what[160];
    snprintf(what, sizeof what, "opt_adamw N%zu lr %g wd %g grad_coef %g", n, lr, wd, coef);
    if (!have((const void *)api->opt_adamw, what))
        return;
    db_adamw hp = db_adamw_defaults(lr);
    hp.weight_decay = wd;
    hp.grad_coef = coef;
    float *p = hrand(n, 1), *m = hzeros(n), *v = hzeros(n);
    float *dp = dputf(p, n), *dm = dputf(m, n), *dv = dputf(v, n);
    for (int64_t t = 1; t <= 3; t++) {
        char step[200];
        snprintf(step, sizeof step, "%s t%lld", what, (long long)t);
        float *gr = hrand(n, 0.05f);
        if (!cpu_ran(db_opt_adamw(cpu, p, m, v, gr, n, &hp, t), step))
            break;
        if (!gpu_ran(api->opt_adamw(&g, dp, dm, dv, dputf(gr, n), n, &hp, t), step))
            break;
        cmp_bits(step, "p", dp, p, n);
        cmp_bits(step, "m", dm, m, n);
        cmp_bits(step, "v", dv, v, n);
    }
    release_all();
}

static void t_sumsq(size_t n, float scale)
{
    char what[160];
    snprintf(what, sizeof what, "opt_sumsq N%zu scale %g", n, (double)scale);
    if (!have((const void *)api->opt_sumsq, what))
        return;
    float *x = hrand(n, scale);
    double want = -1.0, got = -2.0;
    if (cpu_ran(db_opt_sumsq(cpu, &want, x, n), what) && gpu_ran(api->opt_sumsq(&g, &got, dputf(x, n), n), what)) {
        tap_ok(memcmp(&got, &want, sizeof got) == 0, "%s: bit-identical to the CPU", what);
        if (memcmp(&got, &want, sizeof got) != 0)
            tap_diag("  cuda %.17g cpu %.17g", got, want);
    }
    release_all();
}

/* k tensors of the given sizes in one call: each sum bit-identical to the
 * CPU's single-tensor one (and so to opt_sumsq's) */
static void t_sumsq_many(const size_t *sizes, size_t k)
{
    char what[160];
    snprintf(what, sizeof what, "opt_sumsq_many of %zu tensors (%zu .. %zu elements)", k, sizes[0], sizes[k - 1]);
    if (!have((const void *)api->opt_sumsq_many, what))
        return;
    const float *dg[16];
    float *hg[16];
    double want[16], got[16];
    for (size_t i = 0; i < k && i < 16; i++) {
        hg[i] = hrand(sizes[i], i % 2 ? 0.01f : 3.0f);
        dg[i] = dputf(hg[i], sizes[i]);
        if (!cpu_ran(db_opt_sumsq(cpu, &want[i], hg[i], sizes[i]), what)) {
            release_all();
            return;
        }
        got[i] = -1.0;
    }
    if (gpu_ran(api->opt_sumsq_many(&g, got, dg, sizes, NULL, k), what)) {
        size_t bad = 0;
        for (size_t i = 0; i < k; i++)
            if (memcmp(&got[i], &want[i], sizeof got[i])) {
                bad++;
                tap_diag("  tensor %zu (%zu elements): cuda %.17g cpu %.17g", i, sizes[i], got[i], want[i]);
            }
        tap_ok(bad == 0, "%s: each bit-identical to the CPU (%zu differ)", what, bad);
    }
    release_all();
}

/* n floats rounded to the compute type of p (bf16 / fp16): into val (the
 * float32 values) and pk (n floats whose first 2n bytes hold their bits, the
 * rest 0xff) */
static void packed_pair(db_precision p, size_t n, float scale, float **val, float **pk)
{
    float *v = hrand(n, scale), *k = hkeep(malloc(n * sizeof(float) + 1));
    memset(k, 0xff, n * sizeof(float));
    uint16_t *u = (uint16_t *)(void *)k;
    for (size_t i = 0; i < n; i++) {
        u[i] = p == DB_PREC_F16 ? db_f32_to_f16(v[i]) : db_f32_to_bf16(v[i]);
        v[i] = p == DB_PREC_F16 ? db_f16_to_f32(u[i]) : db_bf16_to_f32(u[i]);
    }
    *val = v, *pk = k;
}

/* opt_sumsq_many over packed tensors (DB_ASSIGN_PACK16) mixed with float32
 * ones: the device's bits are the CPU's, and those are the float32 values'
 * (so packing changes no norm) */
static void t_sumsq_packed(db_precision p)
{
    char what[160];
    snprintf(what, sizeof what, "opt_sumsq_many, %s packed tensors among float32 ones", prec_name(p));
    if (!have((const void *)api->opt_sumsq_many, what))
        return;
    static const size_t sizes[] = {1, 4095, 4097, 40 * 4096 + 3, 7, 33 * 4096, 0, 1000};
    enum { K = sizeof sizes / sizeof *sizes };
    const float *hp[K], *hv[K], *dg[K];
    int prec[K];
    double want[K], flt[K], got[K];
    for (size_t i = 0; i < K; i++) {
        float *v, *k;
        packed_pair(p, sizes[i], i % 3 ? 0.01f : 3.0f, &v, &k);
        prec[i] = i % 2 == 0 ? (int)p : 0; /* every other one packed */
        hv[i] = v, hp[i] = prec[i] ? k : v;
        dg[i] = dputf(hp[i], sizes[i]);
        got[i] = -1.0;
    }
    if (!cpu_ran(db_opt_sumsq_many(cpu, want, hp, sizes, prec, K), what) ||
        !cpu_ran(db_opt_sumsq_many(cpu, flt, hv, sizes, NULL, K), what) ||
        !gpu_ran(api->opt_sumsq_many(&g, got, dg, sizes, prec, K), what)) {
        release_all();
        return;
    }
    tap_ok(!memcmp(want, flt, sizeof want), "%s: the CPU's sums are the float32 values' bit for bit", what);
    tap_ok(!memcmp(got, want, sizeof got), "%s: the device's are the CPU's bit for bit", what);
    release_all();
}

/* opt_adamw with packed tensors (db_adamw.g16_runs): three steps, the
 * device's p, m, v bit-identical to the CPU's, and those to a step on the
 * float32 values.  Runs inside one 4096-element chunk, across chunk edges,
 * back to back, one ending at n; float32 stretches between them. */
static void t_adamw_packed(db_precision p)
{
    char what[160];
    snprintf(what, sizeof what, "opt_adamw, %s packed gradients", prec_name(p));
    if (!have((const void *)api->opt_adamw, what))
        return;
    const size_t n = 5 * 4096 + 301;
    static const uint32_t runs[] = {10, 300, 300, 301, 1000, 9000, 9001, 12288, 12300, 5 * 4096 + 301};
    const size_t nruns = sizeof runs / sizeof runs[0] / 2;
    uint32_t *druns = api->alloc(&g, sizeof runs);
    if (!druns || api->copy(&g, druns, runs, sizeof runs, DB_COPY_H2D) != 0) {
        tap_ok(0, "%s: the runs on the device", what);
        return;
    }
    db_adamw hp = db_adamw_defaults(1e-3), hf = hp;
    hp.g16_nruns = nruns, hp.g16_prec = (int)p;
    float *p0 = hrand(n, 1), *p1 = hcopy(p0, n), *m0 = hzeros(n), *m1 = hzeros(n), *v0 = hzeros(n), *v1 = hzeros(n);
    float *dp = dputf(p0, n), *dm = dputf(m0, n), *dv = dputf(v0, n);
    int ok = 1;
    for (int64_t t = 1; t <= 3 && ok; t++) {
        float *val, *pk;
        packed_pair(p, n, 0.05f, &val, &pk);
        /* the step's gradient buffer: each run's values packed from its start, float32 elsewhere */
        float *buf = hcopy(val, n);
        for (size_t r = 0; r < nruns; r++) {
            uint16_t *u = (uint16_t *)(void *)(buf + runs[2 * r]);
            const uint16_t *src = (const uint16_t *)(const void *)pk;
            for (uint32_t i = runs[2 * r]; i < runs[2 * r + 1]; i++)
                u[i - runs[2 * r]] = src[i];
        }
        hp.g16_runs = runs; /* the CPU's memory is its ctx's */
        ok = cpu_ran(db_opt_adamw(cpu, p0, m0, v0, buf, n, &hp, t), what) &&
             cpu_ran(db_opt_adamw(cpu, p1, m1, v1, val, n, &hf, t), what);
        hp.g16_runs = druns;
        ok = ok && gpu_ran(api->opt_adamw(&g, dp, dm, dv, dputf(buf, n), n, &hp, t), what);
    }
    if (ok) {
        tap_ok(!memcmp(p0, p1, n * sizeof(float)) && !memcmp(m0, m1, n * sizeof(float)) &&
                   !memcmp(v0, v1, n * sizeof(float)),
               "%s: the CPU's steps are those on the float32 values, bit for bit", what);
        cmp_bits(what, "p", dp, p0, n);
        cmp_bits(what, "m", dm, m0, n);
        cmp_bits(what, "v", dv, v0, n);
    }
    api->free(&g, druns);
    release_all();
}

/* opt_clip_each (the fused backward's per-tensor clip, no wait): norms and
 * clipped gradients bit-identical to the CPU op, over tensors that scale
 * (norm above the maximum), that do not, one with a NaN (every element NaN
 * after), an empty one, and ones of several chunk-launch blocks */
static void t_clip_each(void)
{
    const char *what = "opt_clip_each";
    if (!have((const void *)api->opt_clip_each, what))
        return;
    enum { K = 9 };
    const size_t sizes[K] = {1, 4095, 0, 4097, 262149, 5000, 131072, 77, 300000};
    const float scales[K] = {3.0f, 0.0001f, 1.0f, 0.05f, 0.01f, 2.0f, 0.00001f, 1.0f, 0.5f};
    float *hg[K], *dg[K], *dn = dpoison(K), hn[K];
    for (size_t i = 0; i < K; i++) {
        hg[i] = hrand(sizes[i] ? sizes[i] : 1, scales[i]);
        dg[i] = dputf(hg[i], sizes[i] ? sizes[i] : 1);
    }
    hg[7][40] = NAN;
    dg[7] = dputf(hg[7], sizes[7]);
    if (!cpu_ran(db_opt_clip_each(cpu, hn, hg, sizes, K, 1.0f), what) ||
        !gpu_ran(api->opt_clip_each(&g, dn, dg, sizes, K, 1.0f), what)) {
        release_all();
        return;
    }
    const float *gn = dget(dn, K);
    size_t bad = 0, scaled = 0;
    for (size_t i = 0; i < K; i++) {
        const int same = memcmp(&gn[i], &hn[i], sizeof(float)) == 0 || (isnan(gn[i]) && isnan(hn[i]));
        bad += !same;
        scaled += hn[i] > 1.0f;
        if (!same)
            tap_diag("  tensor %zu: norm cuda %.9g cpu %.9g", i, (double)gn[i], (double)hn[i]);
    }
    tap_ok(bad == 0 && scaled >= 3 && isnan(hn[7]), "%s: %d norms bit-identical to the CPU (%zu differ; %zu clipped)",
           what, K, bad, scaled);
    for (size_t i = 0; i < K; i++) {
        if (!sizes[i])
            continue;
        char t[64];
        snprintf(t, sizeof t, "tensor %zu (%zu elements, norm %.3g)", i, sizes[i], (double)hn[i]);
        if (i == 7) {
            const float *got = dget(dg[i], sizes[i]);
            size_t nan = 0;
            for (size_t j = 0; j < sizes[i]; j++)
                nan += isnan(got[j]) != 0;
            tap_ok(nan == sizes[i], "%s %s: every element NaN (%zu of %zu)", what, t, nan, sizes[i]);
        } else
            cmp_bits(what, t, dg[i], hg[i], sizes[i]);
    }
    release_all();
}

/* the side stream: begin orders it after the ctx's queued work, join the
 * ctx's stream after it; a sum queued between them (here a copy on the
 * ctx's stream after the join) sees its inputs and is seen */
/* One DDIM step (ddim_step_forward): the CPU op's bits (kernels/ddim_step.h's
 * element, explicit roundings on the device), for each prediction type,
 * with clipping and with noise, x0 written or not */
static void t_ddim_step(size_t n)
{
    static const db_ddim_coef ks[] = {
        {0.5995f, 0.8004f, 0.6312f, 0.7756f, 0.0f, 1.0f, 0, 0, 0},      /* epsilon */
        {0.0683f, 0.9977f, 0.2116f, 0.9774f, 0.0f, 1.0f, 1, 0, 0},      /* v */
        {0.9137f, 0.4063f, 0.9512f, 0.2921f, 0.0f, 1.0f, 2, 0, 0},      /* the sample */
        {0.0683f, 0.9977f, 0.2116f, 0.9631f, 0.0f, 1.0f, 0, 1, 0},      /* epsilon, clipped to [-1, 1] */
        {0.5995f, 0.8004f, 0.6312f, 0.7191f, 0.2905f, 1.0f, 0, 0, 1}, /* eta's noise */
    };
    float *x = hrand(n, 2), *mo = hrand(n, 2), *nz = hrand(n, 1);
    float *dm = dputf(mo, n), *dn = dputf(nz, n);
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
        char what[160];
        snprintf(what, sizeof what, "ddim_step_forward N%zu pred %d clip %d noise %d", n, ks[i].pred, ks[i].clip_on,
                 ks[i].noise_on);
        float *y = hcopy(x, n), *x0 = hzeros(n);
        if (!have((const void *)api->ddim_step_forward, what) ||
            !cpu_ran(db_ddim_step_forward(cpu, y, x0, mo, nz, n, &ks[i]), what))
            continue;
        float *dx = dputf(x, n), *dx0 = dpoison(n), *dx2 = dputf(x, n);
        if (gpu_ran(api->ddim_step_forward(&g, dx, dx0, dm, ks[i].noise_on ? dn : NULL, n, &ks[i]), what)) {
            cmp(what, "x", dx, y, n, 0);
            cmp(what, "pred_x0", dx0, x0, n, 0);
        }
        if (gpu_ran(api->ddim_step_forward(&g, dx2, NULL, dm, ks[i].noise_on ? dn : NULL, n, &ks[i]), what))
            cmp(what, "x (no pred_x0)", dx2, y, n, 0);
    }
    release_all();
}

/* Fences (fence / fence_wait): counted from 1, a wait for each (an old one
 * past the ring too), a copy queued before one is done after the wait; a
 * fence during a capture and a wait for one never made are refused */
static void t_fence(void)
{
    const char *what = "fences (fence / fence_wait)";
    if (!have((const void *)api->fence, what) || !have((const void *)api->fence_wait, what))
        return;
    db_ctx_clear_error(&g);
    float h[4] = {1, 2, 3, 4}, back[4] = {0};
    float *d = dalloc(sizeof h);
    int ok = d && api->copy(&g, d, h, sizeof h, DB_COPY_H2D) == 0;
    uint64_t f[DB_CTX_FENCES + 2];
    for (int i = 0; ok && i < DB_CTX_FENCES + 2; i++)
        ok = (f[i] = api->fence(&g)) == (i ? f[i - 1] + 1 : f[0]) && f[i] != 0;
    for (int i = DB_CTX_FENCES + 1; ok && i >= 0; i--)
        ok = api->fence_wait(&g, f[i]) == 0;
    tap_ok(ok && g.err.code == 0, "%s: %d in a row, each waited for%s%s", what, DB_CTX_FENCES + 2,
           g.err.code ? ": " : "", g.err.msg);
    db_ctx_clear_error(&g);
    const uint64_t last = api->fence(&g);
    const int bad = api->fence_wait(&g, last + 1);
    tap_ok(bad != 0 && g.err.code == DB_EUSAGE, "%s: a wait for a fence not made is refused: %s", what, g.err.msg);
    db_ctx_clear_error(&g);
    if (api->graph_begin(&g) == 0) {
        const uint64_t in = api->fence(&g);
        const int code = g.err.code;
        db_ctx_clear_error(&g);
        void *gr = api->graph_end(&g);
        if (gr)
            api->graph_free(&g, gr);
        db_ctx_clear_error(&g);
        tap_ok(in == 0 && code == DB_EUSAGE, "%s: none during a graph capture", what);
    }
    ok = api->copy(&g, back, d, sizeof back, DB_COPY_D2H) == 0 && !memcmp(back, h, sizeof h);
    tap_ok(ok, "%s: the ctx works after", what);
    db_ctx_clear_error(&g);
    release_all();
}

static void t_side_stream(void)
{
    const char *what = "side stream (side_begin / side_join)";
    if (!have((const void *)api->side_begin, what) || !have((const void *)api->side_join, what))
        return;
    float h[4] = {1, 2, 3, 4}, back[4] = {0};
    float *d = dputf(h, 4);
    db_ctx_clear_error(&g);
    (void)api->side_begin(&g);
    const int e1 = g.err.code;
    const int rc = api->side_join(&g);
    (void)api->side_begin(&g); /* again: the stream and events are made once */
    const int rc2 = api->side_join(&g);
    const int cp = api->copy(&g, back, d, sizeof back, DB_COPY_D2H);
    tap_ok(e1 == 0 && rc == 0 && rc2 == 0 && cp == 0 && !memcmp(back, h, sizeof h), "%s: begin, join, twice%s%s",
           what, g.err.code ? ": " : "", g.err.msg);
    release_all();
}

/* Pinned host memory (host_alloc / host_free; the checkpoint stage's): a
 * copy off the device lands there, in another thread's allocation too (the
 * stage pins in a thread of its own), and the ctx keeps no error */
typedef struct pinned_arg {
    size_t bytes;
    void *p;
} pinned_arg;

static void *pinned_main(void *arg)
{
    pinned_arg *a = (pinned_arg *)arg;
    a->p = api->host_alloc(&g, a->bytes);
    return NULL;
}

static void t_host_alloc(void)
{
    const char *what = "pinned host memory (host_alloc / host_free)";
    if (!have((const void *)api->host_alloc, what) || !have((const void *)api->host_free, what))
        return;
    enum { N = 1 << 16 };
    float *h = (float *)malloc(N * sizeof *h);
    for (int i = 0; i < N; i++)
        h[i] = (float)i * 0.5f - 7.0f;
    float *d = dputf(h, N);
    db_ctx_clear_error(&g);
    pinned_arg a = {N * sizeof(float), NULL};
    pthread_t th;
    const int made = pthread_create(&th, NULL, pinned_main, &a) == 0;
    if (made)
        pthread_join(th, NULL);
    const int cp = a.p ? api->copy(&g, a.p, d, N * sizeof(float), DB_COPY_D2H) : -1;
    tap_ok(made && a.p && cp == 0 && !memcmp(a.p, h, N * sizeof(float)) && g.err.code == 0,
           "%s: allocated in another thread, a device-to-host copy lands in it%s%s", what, g.err.code ? ": " : "",
           g.err.msg);
    api->host_free(&g, a.p);
    free(h);
    release_all();
}

/* ---- CUDA graphs (graph_begin .. graph_free; kernels/ops.h db_graph_capture) ---- */

/* A UNet-like piece of work on fixed buffers: conv (bias) -> group norm +
 * SiLU -> self-attention -> linear (bias) -> axpby with the input's first
 * rows, with temporaries allocated and freed inside as the model code does.
 * mode 1: also waits for the stream; 2: leaves a temporary live; 3: copies
 * to the host; 4: fails by itself (no op failed). */
typedef struct gwork {
    float *x, *w, *b, *gw, *gb, *lw, *lb, *out, *host;
    int mode;
    void **tmp;   /* [6]: the temporaries of the last call */
    void **leak;  /* mode 2's live block */
} gwork;
enum { GB = 2, GC = 8, GH = 6, GW = 6, GT = GH * GW, GOC = 5, GN = GB * GT };

static int gwork_run(void *arg, db_err *err)
{
    gwork *q = arg;
    db_ctx *c = &g;
    const size_t n = (size_t)GB * GC * GT;
    float *y = api->alloc(c, n * sizeof(float)), *h = api->alloc(c, n * sizeof(float)),
          *mean = api->alloc(c, GB * 4 * sizeof(float)), *rstd = api->alloc(c, GB * 4 * sizeof(float)),
          *att = api->alloc(c, n * sizeof(float)), *lse = api->alloc(c, (size_t)GB * GT * sizeof(float));
    void *tmp[6] = {y, h, mean, rstd, att, lse};
    memcpy(q->tmp, tmp, sizeof tmp);
    int rc = !y || !h || !mean || !rstd || !att || !lse ||
             api->conv2d_forward(c, y, q->x, q->w, q->b, GB, GC, GH, GW, GC, 3, 3, 1, 1, 1) ||
             api->groupnorm_forward(c, h, mean, rstd, y, q->gw, q->gb, GB, GC, GT, 4, 1e-5f, 1) ||
             /* h read as (B, T, 1 head of 8): channels-first memory, any layout will do for the check */
             api->attention_forward(c, att, lse, h, h, h, GB, GT, GT, 1, GC, 0) ||
             api->linear_forward(c, q->out, att, q->lw, q->lb, GN, GC, GOC) ||
             api->axpby_forward(c, q->out, q->out, q->x, 0.5f, -2.0f, (size_t)GN * GOC) ||
             (q->mode == 1 && api->sync(c)) ||
             (q->mode == 3 && api->copy(c, q->host, q->out, 4 * sizeof(float), DB_COPY_D2H)) ||
             q->mode == 4; /* a host-side failure of fn's own, no ctx error */
    if (q->mode == 2 && !rc)
        *q->leak = api->alloc(c, 1000);
    for (int i = 0; i < 6; i++)
        api->free(c, tmp[i]);
    if (rc)
        db_err_set(err, g.err.code ? g.err.code : DB_EIO, "gwork: %s", g.err.code ? g.err.msg : "mode 4");
    return rc ? -1 : 0;
}

/* device floats d bit-identical to want, the same work run directly */
static void cmp_direct(const char *what, const char *tensor, const float *d, const float *want, size_t n)
{
    const float *got = dget(d, n);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += memcmp(&got[i], &want[i], sizeof *got) != 0;
    tap_ok(bad == 0, "%s %s: bit-identical to the direct run (%zu of %zu differ)", what, tensor, bad, n);
}

/* Six blocks of these sizes allocated now: how many are among the six
 * pointers of `among` (freed again before returning). */
static size_t blocks_among(const size_t sizes[6], void *const among[6])
{
    void *now[6];
    size_t k = 0;
    for (int i = 0; i < 6; i++)
        now[i] = api->alloc(&g, sizes[i]);
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++)
            k += now[i] && now[i] == among[j];
    for (int i = 0; i < 6; i++)
        api->free(&g, now[i]);
    return k;
}

/* The timestep embedding in a graph: its frequency table is uploaded at the
 * op's first call and kept, so a replay reads it where it is.  (The first
 * H200 run's graphs held an upload from a host buffer freed after the
 * capture: every replay read freed memory, 7e-3 off after 10 steps.)  A
 * table first needed inside a capture fails the capture cleanly instead. */
typedef struct tswork {
    float *out;
    const float *t;
    int B, D;
    float shift;
} tswork;

static int tswork_run(void *arg, db_err *err)
{
    const tswork *w = arg;
    if (api->timestep_embedding_forward(&g, w->out, w->t, w->B, w->D, 1, w->shift, 10000.0f))
        return db_err_set(err, g.err.code, "tswork: %s", g.err.msg);
    return 0;
}

static void t_graph_timestep(void)
{
    const char *what = "graph: timestep embedding";
    if (!have((const void *)api->graph_begin, what) || !have(api->timestep_embedding_forward, what))
        return;
    enum { B = 4, D = 320 };
    float t1[B] = {999, 981, 500.5f, 1}, t2[B] = {21, 1, 0, 760}, *y1 = hzeros(B * D), *y2 = hzeros(B * D);
    if (!cpu_ran(db_timestep_embedding_forward(cpu, y1, t1, B, D, 1, 0.0f, 10000.0f), what) ||
        !cpu_ran(db_timestep_embedding_forward(cpu, y2, t2, B, D, 1, 0.0f, 10000.0f), what)) {
        release_all();
        return;
    }
    tswork w = {dpoison(B * D), dputf(t1, B), B, D, 0.0f};
    db_err err = {0};
    db_ctx_clear_error(&g);
    db_graph *gr = NULL;
    /* a table this ctx has not made yet (shift 0.25): the capture fails, the ctx stays usable */
    tswork fresh = w;
    fresh.shift = 0.25f;
    const int cap0 = db_graph_capture(&g, &gr, tswork_run, &fresh, sizeof fresh, &err);
    tap_ok(cap0 == 1 && !gr && g.err.code == 0, "%s: a new table inside a capture fails the capture (%d: %s)", what,
           cap0, err.msg);
    db_graph_free(gr);
    gr = NULL;
    if (gpu_ran(tswork_run(&w, &err), what)) /* the warm-up */
        cmp(what, "direct", w.out, y1, (size_t)B * D, TOL);
    const int cap = db_graph_capture(&g, &gr, tswork_run, &w, sizeof w, &err);
    if (tap_ok(cap == 0 && gr, "%s: captured%s%s", what, cap ? ": " : "", cap ? err.msg : "")) {
        for (int rep = 0; rep < 2; rep++) {
            api->copy(&g, (void *)w.t, rep ? t1 : t2, sizeof t1, DB_COPY_H2D);
            db_err_clear(&err);
            if (tap_ok(db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0, "%s: launch %d%s%s", what, rep,
                       err.code ? ": " : "", err.msg))
                cmp(what, rep ? "replay (t1)" : "replay (t2)", w.out, rep ? y1 : y2, (size_t)B * D, TOL);
        }
    }
    db_graph_free(gr);
    release_all();
}

static void t_graph(db_precision prec)
{
    char what[160];
    snprintf(what, sizeof what, "graph %s", db_precision_name(prec));
    if (!have((const void *)api->graph_begin, what))
        return;
    g.precision = prec;
    const size_t nx = (size_t)GB * GC * GT, no = (size_t)GN * GOC;
    gwork q = {0};
    void *tmp[6] = {0}, *leak = NULL;
    q.tmp = tmp;
    q.leak = &leak;
    float *x1 = hrand(nx, 1), *x2 = hrand(nx, 1);
    q.x = dputf(x1, nx);
    q.w = dputf(hrand((size_t)GC * GC * 9, 0.2f), (size_t)GC * GC * 9);
    q.b = dputf(hrand(GC, 0.1f), GC);
    q.gw = dputf(hrand(GC, 1), GC);
    q.gb = dputf(hrand(GC, 0.1f), GC);
    q.lw = dputf(hrand((size_t)GOC * GC, 0.3f), (size_t)GOC * GC);
    q.lb = dputf(hrand(GOC, 0.1f), GOC);
    q.out = dalloc(no * sizeof(float));
    q.host = hzeros(no);
    db_err err = {0};
    db_ctx_clear_error(&g);
    /* eager, both inputs (also the warm-up the contract asks for) */
    if (!gpu_ran(gwork_run(&q, &err), what))
        goto done;
    float *want1 = hcopy(dget(q.out, no), no);
    api->copy(&g, q.x, x2, nx * sizeof(float), DB_COPY_H2D);
    if (!gpu_ran(gwork_run(&q, &err), what))
        goto done;
    float *want2 = hcopy(dget(q.out, no), no);
    for (size_t i = 0; i < no; i++)
        q.host[i] = -7.0f;
    api->copy(&g, q.out, q.host, no * sizeof(float), DB_COPY_H2D);
    api->sync(&g);
    db_mem_stats m0;
    api->mem_stats(&g, &m0);

    db_graph *gr = NULL;
    const int cap = db_graph_capture(&g, &gr, gwork_run, &q, sizeof q, &err);
    tap_ok(cap == 0 && gr && g.err.code == 0, "%s: captured%s%s", what, cap ? ": " : "", cap ? err.msg : "");
    if (cap != 0)
        goto done;
    void *captured[6];
    memcpy(captured, tmp, sizeof captured);
    const float *untouched = dget(q.out, no);
    size_t ran = 0;
    for (size_t i = 0; i < no; i++)
        ran += untouched[i] != -7.0f;
    tap_ok(ran == 0, "%s: the capture ran nothing (%zu outputs written)", what, ran);
    /* the pool is the graph's: the same sizes allocated now get other blocks */
    const size_t sizes[6] = {nx * 4, nx * 4, GB * 16, GB * 16, nx * 4, (size_t)GB * GT * 4};
    const size_t shared = blocks_among(sizes, captured);
    tap_ok(shared == 0, "%s: blocks the graph uses are not handed out while it lives (%zu were)", what, shared);
    /* replays read the inputs as they are at launch */
    int ok = 1;
    for (int rep = 0; rep < 3 && ok; rep++) {
        const int two = rep != 1;
        api->copy(&g, q.x, two ? x2 : x1, nx * sizeof(float), DB_COPY_H2D);
        ok = db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0;
        if (!ok)
            tap_ok(0, "%s: launch: %s", what, err.msg);
        else
            cmp_direct(what, two ? "replay (input 2)" : "replay (input 1)", q.out, two ? want2 : want1, no);
    }
    db_mem_stats m1;
    api->mem_stats(&g, &m1);
    db_graph_free(gr);
    db_mem_stats m2;
    api->mem_stats(&g, &m2);
    tap_ok(m1.in_use == m0.in_use && m2.in_use == m0.in_use && m1.reserved >= m0.reserved &&
               m2.reserved == m1.reserved,
           "%s: in use %zu -> %zu -> %zu, reserved %zu -> %zu -> %zu (the pool back in the cache)", what,
           m0.in_use, m1.in_use, m2.in_use, m0.reserved, m1.reserved, m2.reserved);
    const size_t reused = blocks_among(sizes, captured);
    tap_ok(reused > 0, "%s: after graph_free its blocks are handed out again (%zu)", what, reused);

    /* work a graph cannot hold: refused as a whole, the ctx usable after */
    static const char *const why[] = {"", "a stream wait", "a block left live", "a device-to-host copy",
                                      "fn's own failure"};
    for (int mode = 1; mode <= 4; mode++) {
        q.mode = mode;
        leak = NULL;
        gr = NULL;
        db_err e2 = {0};
        const int r = db_graph_capture(&g, &gr, gwork_run, &q, sizeof q, &e2);
        if (leak)
            api->free(&g, leak);
        q.mode = 0;
        api->copy(&g, q.x, x1, nx * sizeof(float), DB_COPY_H2D);
        const int after = gwork_run(&q, &err) == 0 && api->sync(&g) == 0;
        tap_ok(r == 1 && !gr && g.err.code == 0 && after && e2.msg[0],
               "%s: %s refuses the capture (%d: %s), eager ops run after", what, why[mode], r, e2.msg);
        if (after)
            cmp_direct(what, "direct run after a refused capture", q.out, want1, no);
        db_graph_free(gr);
    }
done:
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* A graph over declared weights (bf16: their 16-bit working copy) replays
 * with the weights as they are at launch: a copy into them after the
 * capture (which marks the working copy stale) must reach the replay. */
typedef struct lwork {
    float *out, *x, *w, *b;
} lwork;
enum { LN = 9, LC = 24, LOC = 7 };

static int lwork_run(void *arg, db_err *err)
{
    lwork *q = arg;
    if (api->linear_forward(&g, q->out, q->x, q->w, q->b, LN, LC, LOC))
        return db_err_set(err, g.err.code, "lwork: %s", g.err.msg);
    return 0;
}

static void t_graph_weights(void)
{
    const char *what = "graph bf16, declared weights changed after the capture";
    if (!have((const void *)api->graph_begin, what))
        return;
    g.precision = DB_PREC_BF16;
    lwork q;
    q.x = dputf(hrand((size_t)LN * LC, 1), (size_t)LN * LC);
    q.w = dputf(hrand((size_t)LOC * LC, 0.3f), (size_t)LOC * LC);
    q.b = dputf(hrand(LOC, 0.1f), LOC);
    q.out = dalloc((size_t)LN * LOC * sizeof(float));
    const float *w2 = hrand((size_t)LOC * LC, 0.3f);
    db_err err = {0};
    db_graph *gr = NULL;
    db_ctx_clear_error(&g);
    int ok = api->declare_weights(&g, q.w, (size_t)LOC * LC) == 0 && lwork_run(&q, &err) == 0 &&
             db_graph_capture(&g, &gr, lwork_run, &q, sizeof q, &err) == 0;
    /* new weights, then a replay; then the same op run directly */
    ok = ok && api->copy(&g, q.w, w2, (size_t)LOC * LC * sizeof(float), DB_COPY_H2D) == 0 &&
         db_graph_launch(gr, &err) == 0 && api->sync(&g) == 0;
    float *replayed = ok ? hcopy(dget(q.out, (size_t)LN * LOC), (size_t)LN * LOC) : NULL;
    ok = ok && lwork_run(&q, &err) == 0 && api->sync(&g) == 0;
    if (tap_ok(ok, "%s: ran%s%s", what, ok ? "" : ": ", ok ? "" : err.msg))
        cmp_direct(what, "replay", q.out, replayed, (size_t)LN * LOC);
    db_graph_free(gr);
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

static void t_scale(size_t n, float coef)
{
    char what[160];
    snprintf(what, sizeof what, "opt_scale N%zu coef %g", n, (double)coef);
    if (!have((const void *)api->opt_scale, what))
        return;
    float *x = hrand(n, 1);
    float *d = dputf(x, n);
    if (cpu_ran(db_opt_scale(cpu, x, coef, n), what) && gpu_ran(api->opt_scale(&g, d, coef, n), what)) {
        if (isnan(coef)) { /* NaN payloads differ between CPU and GPU: every element NaN is the contract */
            const float *got = dget(d, n);
            size_t nan = 0;
            for (size_t i = 0; i < n; i++)
                nan += isnan(got[i]) != 0;
            tap_ok(nan == n, "%s: every element NaN (%zu of %zu)", what, nan, n);
        } else
            cmp_bits(what, "g", d, x, n);
    }
    release_all();
}

/* device bytes d must equal want (n bytes) */
static void cmp_bytes(const char *what, const char *tensor, const uint8_t *d, const uint8_t *want, size_t n)
{
    uint8_t *got = hkeep(malloc(n + 1));
    api->copy(&g, got, d, n, DB_COPY_D2H);
    size_t bad = n;
    for (size_t i = 0; i < n && bad == n; i++)
        if (got[i] != want[i])
            bad = i;
    tap_ok(bad == n, "%s %s: bit-identical to the CPU", what, tensor);
    if (bad != n)
        tap_diag("  first difference at %zu: cuda %u cpu %u", bad, got[bad], want[bad]);
}

/* The 8-bit moments on the device (n codes each, nb scales each) against the CPU's, bit for bit */
static void cmp_q8(const char *step, const uint8_t *dmq, const uint8_t *mq, const uint8_t *dvq, const uint8_t *vq,
                   size_t n, const float *dma, const float *ma, const float *dva, const float *va, size_t nb)
{
    cmp_bytes(step, "m codes", dmq, mq, n);
    cmp_bytes(step, "v codes", dvq, vq, n);
    cmp_bits(step, "m absmax", dma, ma, nb);
    cmp_bits(step, "v absmax", dva, va, nb);
}

/* 8-bit AdamW (opt_adamw8bit): four steps from the zero state, a fresh
 * gradient each step (every other step scaled by `spread` per block, so the
 * blocks' scales differ by orders of magnitude); p, both code arrays and both
 * scale arrays bit-identical after every step. */
static void t_adamw8bit(size_t n, double lr, double wd, float spread, double coef)
{
    char what[160];
    snprintf(what, sizeof what, "opt_adamw8bit N%zu lr %g wd %g spread %g grad_coef %g", n, lr, wd, (double)spread,
             coef);
    if (!have((const void *)api->opt_adamw8bit, what))
        return;
    db_adamw hp = db_adamw_defaults(lr);
    hp.weight_decay = wd;
    hp.grad_coef = coef;
    db_q8_maps maps;
    db_q8_maps_make(&maps);
    const size_t nb = (n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    float *p = hrand(n, 1), *ma = hzeros(nb), *va = hzeros(nb);
    uint8_t *mq = hkeep(calloc(n + 1, 1)), *vq = hkeep(calloc(n + 1, 1));
    float *dp = dputf(p, n), *dma = dputf(ma, nb), *dva = dputf(va, nb);
    uint8_t *dmq = dput(mq, n), *dvq = dput(vq, n);
    for (int64_t t = 1; t <= 4; t++) {
        char step[200];
        snprintf(step, sizeof step, "%s t%lld", what, (long long)t);
        float *gr = hrand(n, 0.05f);
        if (t % 2 == 0)
            for (size_t i = 0; i < n; i++)
                gr[i] = gr[i] * powf(spread, (float)(i / DB_Q8_BLOCK % 5));
        if (!cpu_ran(db_opt_adamw8bit(cpu, p, mq, vq, ma, va, gr, n, &hp, t, &maps), step))
            break;
        if (!gpu_ran(api->opt_adamw8bit(&g, dp, dmq, dvq, dma, dva, dputf(gr, n), n, &hp, t, &maps), step))
            break;
        cmp_bits(step, "p", dp, p, n);
        cmp_q8(step, dmq, mq, dvq, vq, n, dma, ma, dva, va, nb);
    }
    release_all();
}

/* opt_adamw8bit_many: tensors of both kinds (8-bit moments, fp32 moments
 * for small tensors), sizes off the 256-element blocks, two empty, more
 * than one launch's Q8_PARAM_JOBS = 16 (optim.cu), laid out apart in their
 * buffers; three steps, every array bit-identical to the CPU's per-tensor
 * ops.  packed: every third job's gradient packed in bf16 (db_q8_job
 * prec16), of both kinds. */
static void t_adamw8bit_many(int packed)
{
    const char *what = packed ? "opt_adamw8bit_many, bf16 packed gradients" : "opt_adamw8bit_many";
    if (!have((const void *)api->opt_adamw8bit_many, what))
        return;
    static const size_t ns[] = {4097, 320, 0,   256 * 3, 1,   5000, 77, 256 * 20 + 13, 33, 256, 700,
                                1,    2,   257, 512,     300, 0,    9,  256 * 2,       100};
    static const int q8s[] = {1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0};
    enum { NJ = sizeof ns / sizeof ns[0] };
    db_adamw hp = db_adamw_defaults(1e-3);
    hp.weight_decay = 1e-2;
    db_q8_maps maps;
    db_q8_maps_make(&maps);
    size_t tot = 0, nb = 0;
    for (int i = 0; i < NJ; i++)
        tot += ns[i] + 7, nb += (ns[i] + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK + 1; /* gaps between tensors */
    float *p = hrand(tot, 1), *m32 = hzeros(tot), *v32 = hzeros(tot), *ma = hzeros(nb), *va = hzeros(nb);
    uint8_t *mq = hkeep(calloc(tot + 1, 1)), *vq = hkeep(calloc(tot + 1, 1));
    float *dp = dputf(p, tot), *dm32 = dputf(m32, tot), *dv32 = dputf(v32, tot), *dma = dputf(ma, nb),
          *dva = dputf(va, nb);
    uint8_t *dmq = dput(mq, tot), *dvq = dput(vq, tot);
    db_q8_job hj[NJ], dj[NJ];
    int ok = 1;
    for (int64_t t = 1; t <= 3 && ok; t++) {
        float *gr = hrand(tot, 0.05f);
        size_t off = 0;
        for (int i = 0; packed && i < NJ; off += ns[i] + 7, i++) /* the packed ones' bits from their start */
            if (i % 3 == 1)
                for (size_t e = 0; e < ns[i]; e++)
                    ((uint16_t *)(void *)(gr + off))[e] = db_f32_to_bf16(gr[off + e]);
        float *dg = dputf(gr, tot);
        size_t boff = 0;
        off = 0;
        for (int i = 0; i < NJ; i++) {
            const int pk = packed && i % 3 == 1 ? DB_PREC_BF16 : 0;
            hj[i] = (db_q8_job){p + off, gr + off, ns[i], q8s[i], mq + off, vq + off, ma + boff, va + boff,
                                m32 + off, v32 + off, pk};
            dj[i] = (db_q8_job){dp + off, dg + off, ns[i], q8s[i], dmq + off, dvq + off, dma + boff, dva + boff,
                                dm32 + off, dv32 + off, pk};
            off += ns[i] + 7, boff += (ns[i] + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK + 1;
        }
        char step[96];
        snprintf(step, sizeof step, "%s (%d tensors of both kinds, two empty) t%lld", what, NJ, (long long)t);
        ok = cpu_ran(db_opt_adamw8bit_many(cpu, hj, NJ, &hp, t, &maps), step) &&
             gpu_ran(api->opt_adamw8bit_many(&g, dj, NJ, &hp, t, &maps), step);
        if (ok) {
            cmp_bits(step, "p (gaps untouched)", dp, p, tot);
            cmp_bits(step, "fp32 m", dm32, m32, tot);
            cmp_bits(step, "fp32 v", dv32, v32, tot);
            cmp_q8(step, dmq, mq, dvq, vq, tot, dma, ma, dva, va, nb);
        }
    }
    release_all();
}

/* Optimizer steps inside a graph (the fused backward's, libcommon/sd/
 * train.c): their scalars come from device memory (optim.h coefs), so a
 * replay steps with the values written before its launch, not those of its
 * capture.  Three steps, each with another lr and step count: a direct run,
 * the capture's launch, a replay; opt_adamw over declared weights and one
 * 8-bit job of opt_adamw8bit_many over others, in bf16 (both keep the
 * weights' working copies in the same pass, so no rebuild between steps).
 * p, m, v and p, the codes and scales bit-identical to the CPU's steps
 * given the scalars by hp and t, and a linear on the declared weights
 * equal to one on a plain copy of the CPU's. */
typedef struct owork {
    float *p, *m, *v, *g;
    float *p8, *g8, *ma, *va;
    uint8_t *mq, *vq;
    const db_q8_maps *maps;
    db_adamw hp; /* coefs set */
} owork;
enum { ON = 700, ON8 = 600 };

static int owork_run(void *arg, db_err *err)
{
    owork *q = arg;
    const db_q8_job j = {q->p8, q->g8, ON8, 1, q->mq, q->vq, q->ma, q->va, NULL, NULL, 0};
    if (api->opt_adamw(&g, q->p, q->m, q->v, q->g, ON, &q->hp, 0) ||
        api->opt_adamw8bit_many(&g, &j, 1, &q->hp, 0, q->maps))
        return db_err_set(err, g.err.code, "owork: %s", g.err.msg);
    return 0;
}

static void t_graph_optim(void)
{
    const char *what = "graph bf16, AdamW steps with their scalars in device memory";
    if (!have((const void *)api->graph_begin, what) || !have((const void *)api->opt_adamw8bit_many, what))
        return;
    g.precision = DB_PREC_BF16;
    db_q8_maps maps;
    db_q8_maps_make(&maps);
    const size_t nb8 = (ON8 + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    float *p = hrand(ON, 0.3f), *m = hzeros(ON), *v = hzeros(ON), *p8 = hrand(ON8, 0.3f), *ma = hzeros(nb8),
          *va = hzeros(nb8);
    uint8_t *mq = hkeep(calloc(ON8 + 1, 1)), *vq = hkeep(calloc(ON8 + 1, 1));
    owork q;
    memset(&q, 0, sizeof q);
    q.p = dputf(p, ON), q.m = dputf(m, ON), q.v = dputf(v, ON), q.g = dalloc(ON * sizeof(float));
    q.p8 = dputf(p8, ON8), q.g8 = dalloc(ON8 * sizeof(float)), q.ma = dputf(ma, nb8), q.va = dputf(va, nb8);
    q.mq = dput(mq, ON8), q.vq = dput(vq, ON8);
    q.maps = &maps;
    db_adamw_coef *dco = dalloc(sizeof *dco);
    q.hp = db_adamw_defaults(1e-2);
    q.hp.coefs = dco;
    float *x = dputf(hrand((size_t)LN * LC, 1), (size_t)LN * LC), *y0 = dalloc((size_t)LN * LOC * sizeof(float));
    db_err err = {0};
    db_graph *gr = NULL;
    db_ctx_clear_error(&g);
    /* the working copies built by a first use, then kept by the steps */
    int ok = api->declare_weights(&g, q.p, ON) == 0 && api->declare_weights(&g, q.p8, ON8) == 0 &&
             api->linear_forward(&g, y0, x, q.p, NULL, LN, LC, LOC) == 0 &&
             api->linear_forward(&g, y0, x, q.p8, NULL, LN, LC, LOC) == 0;
    db_mem_stats ms0, ms1;
    api->mem_stats(&g, &ms0);
    static const char *how[] = {"", "direct", "the capture's launch", "a replay"};
    for (int t = 1; t <= 3 && ok; t++) {
        char step[200];
        snprintf(step, sizeof step, "%s, step %d (%s)", what, t, how[t]);
        db_adamw ht = db_adamw_defaults(1e-2 * t); /* another lr each step */
        const db_adamw_coef co = db_adamw_coefs(&ht, t);
        float *gr32 = hrand(ON, 0.05f), *gr8 = hrand(ON8, 0.05f);
        ok = api->copy(&g, dco, &co, sizeof co, DB_COPY_H2D) == 0 &&
             api->copy(&g, q.g, gr32, ON * sizeof(float), DB_COPY_H2D) == 0 &&
             api->copy(&g, q.g8, gr8, ON8 * sizeof(float), DB_COPY_H2D) == 0;
        ok = ok && cpu_ran(db_opt_adamw(cpu, p, m, v, gr32, ON, &ht, t), step) &&
             cpu_ran(db_opt_adamw8bit(cpu, p8, mq, vq, ma, va, gr8, ON8, &ht, t, &maps), step);
        if (ok && t == 1)
            ok = owork_run(&q, &err) == 0;
        else if (ok && t == 2)
            ok = db_graph_capture(&g, &gr, owork_run, &q, sizeof q, &err) == 0 && db_graph_launch(gr, &err) == 0;
        else if (ok)
            ok = db_graph_launch(gr, &err) == 0;
        ok = ok && api->sync(&g) == 0;
        if (!tap_ok(ok, "%s: ran%s%s", step, ok ? "" : ": ", ok ? "" : err.msg[0] ? err.msg : g.err.msg))
            break;
        cmp_bits(step, "p", q.p, p, ON);
        cmp_bits(step, "m", q.m, m, ON);
        cmp_bits(step, "v", q.v, v, ON);
        cmp_bits(step, "p (8-bit)", q.p8, p8, ON8);
        cmp_q8(step, q.mq, mq, q.vq, vq, ON8, q.ma, ma, q.va, va, nb8);
        float *y1 = dalloc((size_t)LN * LOC * sizeof(float)), *y2 = dalloc((size_t)LN * LOC * sizeof(float));
        ok = api->linear_forward(&g, y1, x, q.p, NULL, LN, LC, LOC) == 0 &&
             api->linear_forward(&g, y2, x, dputf(p, ON), NULL, LN, LC, LOC) == 0;
        char st2[320];
        snprintf(st2, sizeof st2, "%s: linear on the declared weights vs a plain copy", step);
        if (tap_ok(ok, "%s: ran", st2))
            same_bits(st2, y1, y2, (size_t)LN * LOC);
        ok = ok && api->linear_forward(&g, y1, x, q.p8, NULL, LN, LC, LOC) == 0 &&
             api->linear_forward(&g, y2, x, dputf(p8, ON8), NULL, LN, LC, LOC) == 0;
        snprintf(st2, sizeof st2, "%s: linear on the declared 8-bit-stepped weights vs a plain copy", step);
        if (tap_ok(ok, "%s: ran", st2))
            same_bits(st2, y1, y2, (size_t)LN * LOC);
    }
    api->mem_stats(&g, &ms1);
    tap_ok(ok && ms1.copies_built == ms0.copies_built, "%s: no working copy rebuilt over the three steps (%zu)", what,
           ms1.copies_built - ms0.copies_built);
    db_graph_free(gr);
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* A graph made stale by a filter registration (ABI 15): opt_adamw over
 * declared weights holding two 3x3 filters is captured while a conv has
 * used only the first; a conv on the second then registers it (its place in
 * the working copy turns channels-last, and the filter table the capture
 * baked in misses it), so the launch must queue nothing and return 1,
 * where a replay would step the weights and write the second filter's copy
 * at its old places.  After the direct step and a new capture, the
 * declared weights equal an undeclared copy stepped alike, and convs on
 * both filters give its bits. */
typedef struct fwork {
    float *p, *m, *v, *g;
    size_t n;
    db_adamw hp;
} fwork;

static int fwork_run(void *arg, db_err *err)
{
    fwork *q = arg;
    if (api->opt_adamw(&g, q->p, q->m, q->v, q->g, q->n, &q->hp, 1))
        return db_err_set(err, g.err.code, "fwork: %s", g.err.msg);
    return 0;
}

static void t_graph_filters(void)
{
    const char *what = "graph bf16, a filter first used after the capture";
    if (!have((const void *)api->graph_begin, what) || !have((const void *)api->declare_weights, what))
        return;
    enum { KB = 2, KC = 5, KS = 7, KO = 6 };
    const size_t nf = (size_t)KO * KC * 9, fo1 = 16, fo2 = fo1 + (nf + 15) / 16 * 16, nw = fo2 + nf + 9;
    float *hw = hrand(nw, 0.3f), *gr = dputf(hrand(nw, 0.05f), nw);
    fwork q = {dputf(hw, nw), dputf(hzeros(nw), nw), dputf(hzeros(nw), nw), gr, nw, db_adamw_defaults(1e-2)};
    float *du = dputf(hw, nw), *dm2 = dputf(hzeros(nw), nw), *dv2 = dputf(hzeros(nw), nw);
    const float *kx = dputf(hrand((size_t)KB * KC * KS * KS, 1), (size_t)KB * KC * KS * KS);
    db_err err = {0};
    db_graph *gr1 = NULL, *gr2 = NULL;
    db_ctx_clear_error(&g);
    char step[200];
    snprintf(step, sizeof step, "%s: the first filter used, a direct step", what);
    int ok = gpu_ran(api->declare_weights(&g, q.p, nw), what) &&
             conv_both(step, DB_PREC_BF16, kx, q.p + fo1, du + fo1, KB, KC, KS, KO) &&
             (g.precision = DB_PREC_BF16, fwork_run(&q, &err) == 0) &&
             gpu_ran(api->opt_adamw(&g, du, dm2, dv2, gr, nw, &q.hp, 1), step);
    /* captured with the first filter's table, and replayed once */
    g.precision = DB_PREC_BF16;
    int r = ok ? db_graph_capture(&g, &gr1, fwork_run, &q, sizeof q, &err) : -1;
    ok = r == 0 && db_graph_launch(gr1, &err) == 0 && gpu_ran(api->opt_adamw(&g, du, dm2, dv2, gr, nw, &q.hp, 1), step);
    tap_ok(ok, "%s: captured and replayed%s%s", what, ok ? "" : ": ", ok ? "" : err.msg[0] ? err.msg : g.err.msg);
    snprintf(step, sizeof step, "%s: the second filter first used", what);
    ok = ok && conv_both(step, DB_PREC_BF16, kx, q.p + fo2, du + fo2, KB, KC, KS, KO);
    if (ok) {
        g.precision = DB_PREC_BF16;
        db_err_clear(&err);
        r = db_graph_launch(gr1, &err);
        tap_ok(r == 1 && g.err.code == 0 && api->sync(&g) == 0, "%s: the launch refused (%d: %s), the ctx without error",
               what, r, err.msg);
        snprintf(step, sizeof step, "%s: the weights after the refused launch vs an undeclared copy", what);
        same_bits(step, q.p, du, nw);
    }
    /* directly (the table rebuilt), then a new capture and its replay */
    g.precision = DB_PREC_BF16;
    db_err_clear(&err);
    ok = ok && fwork_run(&q, &err) == 0 && gpu_ran(api->opt_adamw(&g, du, dm2, dv2, gr, nw, &q.hp, 1), what) &&
         db_graph_capture(&g, &gr2, fwork_run, &q, sizeof q, &err) == 0 && db_graph_launch(gr2, &err) == 0 &&
         gpu_ran(api->opt_adamw(&g, du, dm2, dv2, gr, nw, &q.hp, 1), what) && api->sync(&g) == 0;
    tap_ok(ok, "%s: a direct step, a new capture and its replay%s%s", what, ok ? "" : ": ",
           ok ? "" : err.msg[0] ? err.msg : g.err.msg);
    if (ok) {
        snprintf(step, sizeof step, "%s: the weights after the new graph's replay vs an undeclared copy", what);
        same_bits(step, q.p, du, nw);
        snprintf(step, sizeof step, "%s: conv on the first filter's copy after the new graph", what);
        conv_both(step, DB_PREC_BF16, kx, q.p + fo1, du + fo1, KB, KC, KS, KO);
        snprintf(step, sizeof step, "%s: conv on the second filter's copy after the new graph", what);
        conv_both(step, DB_PREC_BF16, kx, q.p + fo2, du + fo2, KB, KC, KS, KO);
    }
    db_graph_free(gr1);
    db_graph_free(gr2);
    g.precision = DB_PREC_F32;
    db_ctx_clear_error(&g);
    release_all();
}

/* ---- main ------------------------------------------------------------------------------------- */

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
    if (!api) {
        printf("1..0 # SKIP %s has no table for ABI %d\n", path, DB_CUDA_ABI);
        return 0;
    }
    g.cuda_api = api; /* for db_graph_capture (kernels/cpu/dispatch.c) */
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
    quick = getenv("DB_CUDA_TEST_QUICK") != NULL;

    /* GEMM, linear */
    if (have(api->gemm_forward, "gemm_forward"))
        for (int t = 0; t < 4; t++) {
            t_gemm(3, 17, 23, 31, t & 1, t >> 1, 0.7f, 0.0f);
            t_gemm(2, 33, 9, 65, t & 1, t >> 1, 1.0f, 0.5f);
        }
    if (api->gemm_forward) {
        if (!quick)
            t_gemm(16, 4096, 77, 40, 0, 1, 0.158f, 0.0f); /* cross-attention scores */
        if (!quick)
            t_gemm(1, 8192, 320, 320, 0, 1, 1.0f, 0.0f);
    }
    if (have(api->gemm_backward, "gemm_backward")) {
        for (int t = 0; t < 4; t++)
            t_gemm_backward(3, 17, 23, 31, t & 1, t >> 1, 0.7f);
        if (!quick)
            t_gemm_backward(16, 1024, 77, 40, 0, 1, 0.158f);
    }
    if (have(api->linear_forward, "linear_forward")) {
        t_linear(7, 13, 11, 1);
        t_linear(7, 13, 11, 0);
        if (!quick)
            t_linear(8192, 320, 1280, 1);
        if (!quick)
            t_linear(154, 768, 3072, 1);
    }
    if (have(api->linear_backward, "linear_backward")) {
        t_linear_backward(7, 13, 11, 0);
        t_linear_backward(300, 70, 45, 0); /* more than one bias chunk of rows */
        if (!quick)
            t_linear_backward(8192, 320, 1280, 1);
    }

    /* convolution */
    if (have(api->conv2d_forward, "conv2d_forward")) {
        t_conv(2, 3, 9, 7, 5, 3, 3, 1, 1, 1, 1);
        t_conv(2, 3, 9, 7, 5, 3, 3, 1, 1, 1, 0);
        t_conv(1, 4, 10, 12, 6, 3, 3, 2, 0, 1, 1); /* VAE downsampler padding */
        t_conv(2, 8, 6, 6, 5, 1, 1, 1, 0, 0, 1);
        t_conv(1, 6, 11, 11, 4, 3, 3, 2, 1, 1, 1);
        if (!quick)
            t_conv(2, 320, 64, 64, 320, 3, 3, 1, 1, 1, 1); /* SD1.5's first level */
        if (!quick)
            t_conv(2, 4, 64, 64, 320, 3, 3, 1, 1, 1, 1); /* conv_in */
        if (!quick)
            t_conv(1, 128, 128, 128, 128, 3, 3, 2, 0, 1, 1);
    }
    if (have(api->conv2d_backward, "conv2d_backward")) {
        t_conv_backward(2, 3, 9, 7, 5, 3, 3, 1, 1, 1, 0);
        t_conv_backward(1, 4, 10, 12, 6, 3, 3, 2, 0, 1, 0);
        t_conv_backward(2, 8, 6, 6, 5, 1, 1, 1, 0, 0, 0);
        t_conv_backward(1, 6, 11, 11, 4, 3, 3, 2, 1, 1, 0);
        if (!quick)
            t_conv_backward(2, 320, 64, 64, 320, 3, 3, 1, 1, 1, 1);
    }

    /* normalisation */
    if (have(api->groupnorm_forward, "groupnorm_forward")) {
        t_groupnorm(2, 12, 10, 4, 0);
        t_groupnorm(2, 12, 10, 4, 1);
        /* two uneven pieces per channel (1028 + 1022): norm.cu's gn_pieces */
        t_groupnorm(1, 8, 2050, 4, 1);
        /* one group of 600 channels: 600 pieces, more than norm.cu's
         * gn_stage holds, so the statistics are summed where they lie */
        t_groupnorm(1, 600, 16, 1, 1);
        /* HW % 4 == 0: groupnorm_whole_kernel's four-wide loads, channels
         * of 12 floats (a float4 never straddles two), and of 6 (they do) */
        t_groupnorm(2, 8, 12, 4, 1);
        t_groupnorm(2, 8, 6, 4, 1);
        t_groupnorm(1, 3, 5, 1, 0); /* 15 floats: the piece sums after an odd count */
        /* one group of 16 pieces: a cluster of 4 blocks, each a channel of
         * 4100 (past the backward's four-loads loop), the later ones
         * starting past the group's first channel */
        t_groupnorm(1, 4, 4100, 1, 1);
        if (!quick)
            t_groupnorm(2, 320, 4096, 32, 1);
        if (!quick) /* the VAE's 512x512 level, a quarter of it: 8 pieces per channel */
            t_groupnorm(1, 128, 65536, 32, 1);
        if (!quick)
            t_groupnorm(1, 1280, 64, 32, 0);
    }
    if (have(api->groupnorm_backward, "groupnorm_backward")) {
        t_groupnorm_backward(2, 12, 10, 4, 0);
        t_groupnorm_backward(2, 12, 10, 4, 1);
        t_groupnorm_backward(1, 8, 2050, 4, 1);
        t_groupnorm_backward(2, 8, 2050, 2, 0);
        t_groupnorm_backward(1, 600, 16, 1, 1); /* past gn_stage's room, as above */
        t_groupnorm_backward(2, 8, 6, 4, 1);    /* a piece count that is not a multiple of 4 */
        t_groupnorm_backward(1, 3, 5, 1, 0);    /* an odd group: the piece sums after it */
        t_groupnorm_backward(1, 4, 4100, 1, 1); /* a cluster of 4, a channel a block (as above) */
        if (!quick)
            t_groupnorm_backward(2, 320, 4096, 32, 1);
    }
    if (have(api->layernorm_forward, "layernorm_forward")) {
        t_layernorm(5, 37);
        /* the widths norm.cu keeps in registers (layernorm_forward_regs_kernel),
         * with rows past a block's 8 */
        t_layernorm(9, 320);
        t_layernorm(3, 640);
        t_layernorm(2, 768);
        t_layernorm(2, 1280);
        /* 640 and 1280 take 2 and 4 warps a row (4 and 2 rows a block):
         * blocks whose last rows are past N */
        t_layernorm(7, 640);
        t_layernorm(5, 1280);
        if (!quick)
            t_layernorm(154, 768);
        if (!quick)
            t_layernorm(8192, 320);
    }
    if (have(api->layernorm_backward, "layernorm_backward")) {
        t_layernorm_backward(5, 37);
        t_layernorm_backward(300, 70);
        t_layernorm_backward(9, 320); /* the widths held in registers, as the forward */
        t_layernorm_backward(3, 640);
        t_layernorm_backward(2, 768);
        t_layernorm_backward(2, 1280);
        t_layernorm_backward(7, 640);
        t_layernorm_backward(5, 1280);
        if (!quick)
            t_layernorm_backward(8192, 320);
    }
    if (have(api->layernorm_backward_add, "layernorm_backward_add")) {
        t_layernorm_backward_add(5, 37);
        t_layernorm_backward_add(300, 70);
        t_layernorm_backward_add(9, 320); /* the register-held widths: RW 1, 2, 4 */
        t_layernorm_backward_add(3, 640);
        t_layernorm_backward_add(5, 1280);
    }
    if (have(api->softmax_forward, "softmax_forward")) {
        t_softmax(9, 17);
        if (!quick)
            t_softmax(1024, 4096);
    }
    if (have(api->softmax_backward, "softmax_backward")) {
        t_softmax_backward(9, 17);
        if (!quick)
            t_softmax_backward(1024, 4096);
    }

    /* attention */
    if (have(api->attention_forward, "attention_forward")) {
        t_attention(2, 19, 19, 3, 8, 0);
        t_attention(2, 19, 19, 3, 8, 1);
        t_attention(1, 33, 7, 2, 40, 0);
        t_attention(1, 50, 50, 2, 37, 1);
        t_attention(1, 40, 70, 2, 160, 0);
        t_attention(1, 70, 40, 1, 64, 1); /* causal with Tq > Tk */
        t_attention(2, 23, 31, 2, 168, 1); /* over 160: the cuBLAS path */
        t_attention(1, 64, 64, 1, 512, 0); /* the VAE's mid-block attention */
        if (!quick) /* a 768x768 image's VAE attention: three score chunks, the last partial */
            t_attention(1, 9216, 9216, 1, 512, 0);
        if (!quick)
            t_attention(2, 77, 77, 12, 64, 1); /* CLIP */
        if (!quick)
            t_attention(2, 4096, 77, 8, 40, 0); /* SD1.5 cross-attention */
        if (!quick)
            t_attention(2, 4096, 4096, 8, 40, 0); /* SD1.5 self-attention */
    }
    if (have(api->attention_backward, "attention_backward")) {
        t_attention_backward(2, 19, 19, 3, 8, 0);
        t_attention_backward(2, 19, 19, 3, 8, 1);
        t_attention_backward(1, 33, 7, 2, 40, 0);
        if (!quick)
            t_attention_backward(2, 77, 77, 12, 64, 1);
        if (!quick)
            t_attention_backward(1, 1024, 77, 8, 40, 0);
        if (!quick)
            t_attention_backward(1, 1024, 1024, 8, 40, 0);
    }

    t_shadow_staged(); /* (here: DB_CUDA_TEST_ONLY=staged runs it alone) */
    /* the per-op sections above only; DB_CUDA_TEST_ONLY=prec or prec:S: the
     * precision modes' section below too (prec_want; and nothing after it) */
    const char *only = getenv("DB_CUDA_TEST_ONLY");
    if (only && strcmp(only, "prec") != 0 && strncmp(only, "prec:", 5) != 0)
        goto later; /* another S: the later checks whose name holds it (graph, declared weights...) */
    t_linear_add(DB_PREC_F32, 7, 13, 11, 1);
    t_linear_add(DB_PREC_F32, 9, 16, 5, 0);
    t_linear_geglu(DB_PREC_F32, 7, 13, 6, 1);
    t_linear_geglu(DB_PREC_F32, 5, 8, 9, 0);
    if (prec_want("attention_qkv"))
        t_attention_qkv(DB_PREC_F32, 2, 37, 80, 2, 0);
    if (prec_want("linear_multi")) {
        t_linear_multi(DB_PREC_F32, 3, 37, 24, 24, 0, 0);
        t_linear_multi(DB_PREC_F32, 2, 19, 40, 24, 1, 1);
    }
    t_transpose_add(2, 45, 70);
    if (prec_want("linear_fan")) {
        t_linear_fan(DB_PREC_F32, 2, 40, 1);
        t_linear_fan(DB_PREC_F32, 9, 40, 0); /* more rows than the kernel's: n linears */
    }
    if (prec_want("conv2d_add")) {
        t_conv_add(DB_PREC_F32, 2, 5, 9, 7, 6, 3, 1, 1);
        t_conv_add(DB_PREC_F32, 2, 6, 3, 4, 5, 1, 0, 0);
    }
    if (prec_want("kv_cache"))
        for (int k = 0; k < 2; k++)
            t_kv_cache(k ? DB_PREC_F16 : DB_PREC_BF16);
    if (prec_want("twins") && api->mem_stats)
        t_twins_off();
    if (prec_want("assign"))
        for (int pi = 0; pi < 3; pi++)
            t_assign(pi == 0 ? DB_PREC_F32 : pi == 1 ? DB_PREC_BF16 : DB_PREC_F16);

    /* precision modes: the matmul-class ops in bf16 and fp16 */
    for (int pi = 0; pi < 2; pi++) {
        const db_precision p = pi == 0 ? DB_PREC_BF16 : DB_PREC_F16;
        if (api->gemm_forward && prec_want("gemm_forward")) {
            for (int t = 0; t < 4; t++)
                tp_gemm(p, 2, 9, 7, 13, t & 1, t >> 1, 0.7f, 0.0f);
            tp_gemm(p, 1, 17, 23, 31, 0, 1, 1.0f, 0.5f); /* Cm an input too */
            if (!quick)
                tp_gemm(p, 16, 4096, 77, 40, 0, 1, 0.158f, 0.0f);
        }
        if (api->gemm_backward && prec_want("gemm_backward")) {
            for (int t = 0; t < 4; t++)
                tp_gemm_backward(p, 2, 9, 7, 13, t & 1, t >> 1, 0.7f);
            if (!quick)
                tp_gemm_backward(p, 16, 1024, 77, 40, 0, 1, 0.158f);
        }
        if (api->linear_forward && prec_want("linear_forward")) {
            tp_linear(p, 7, 13, 11, 1);
            tp_linear(p, 7, 13, 11, 0);
            t_linear_add(p, 7, 13, 11, 1);
            t_linear_add(p, 9, 16, 5, 0);
            t_linear_geglu(p, 7, 13, 6, 1);
            t_linear_geglu(p, 5, 8, 9, 0);
            if (!quick)
                tp_linear(p, 8192, 320, 1280, 1);
        }
        if (prec_want("twins")) {
            t_twins(p, 45, 320, 24);  /* 320 (a warp a row), more rows than a block's 8 */
            t_twins(p, 21, 640, 40);  /* 640 (two warps a row) */
            t_twins(p, 13, 36, 11);   /* any width: counts off 4 */
            t_twins_backward(p, 45, 320, 24);
            t_twins_backward(p, 13, 36, 11);
            t_twins_graph(p);
        }
        if (prec_want("attention_qkv")) {
            t_attention_qkv(p, 2, 37, 80, 2, 0); /* HS 40 (SD's): the projections straight into the attention */
            t_attention_qkv(p, 1, 20, 64, 1, 1); /* HS 64, causal */
            t_attention_qkv(p, 2, 9, 12, 3, 0);  /* HS 4: the two ops */
        }
        if (api->linear_multi_forward && prec_want("linear_multi")) {
            t_linear_multi(p, 3, 37, 24, 24, 0, 0); /* self-attention's q, k, v (SD: no biases) */
            t_linear_multi(p, 3, 37, 24, 24, 1, 0); /* CLIP's (biases) */
            t_linear_multi(p, 2, 19, 40, 24, 0, 1); /* cross-attention's k, v into the context's gradient */
            t_linear_multi(p, 2, 7, 13, 11, 1, 1);  /* counts off 4: the 16-bit copies' one-by-one tails */
            t_linear_multi(p, 3, 7, 13, 11, 0, 0);  /* and the widening's, off its 8-byte alignment */
            if (!quick)
                t_linear_multi(p, 3, 8192, 320, 320, 0, 0);
        }
        if (api->linear_backward && prec_want("linear_backward")) {
            tp_linear_backward(p, 7, 13, 11);
            tp_linear_backward(p, 300, 70, 45); /* more than one bias chunk of rows */
            if (!quick)
                tp_linear_backward(p, 8192, 320, 1280);
        }
        if (api->conv2d_forward && prec_want("conv2d_forward")) {
            tp_conv(p, 2, 3, 9, 7, 5, 3, 3, 1, 1, 1, 1);
            tp_conv(p, 1, 4, 10, 12, 6, 3, 3, 2, 0, 1, 0); /* VAE downsampler padding */
            tp_conv(p, 2, 8, 6, 6, 5, 1, 1, 1, 0, 0, 1);
            /* tiles 13 x 2: the input's copy and the bias fill by one launch */
            tp_conv(p, 2, 40, 20, 20, 36, 3, 3, 1, 1, 1, 1);
            if (!quick)
                tp_conv(p, 2, 320, 64, 64, 320, 3, 3, 1, 1, 1, 1);
        }
        if (api->linear_forward && prec_want("linear_fan")) {
            t_linear_fan(p, 2, 40, 1);
            t_linear_fan(p, 8, 40, 0);
            t_linear_fan(p, 9, 40, 1); /* n linears */
            if (!quick)
                t_linear_fan(p, 2, 1280, 1); /* SD1.5's time projections' width */
        }
        if (api->conv2d_forward && prec_want("conv2d_add")) {
            t_conv_add(p, 2, 5, 9, 7, 6, 3, 1, 1);   /* 63 a plane: the tiled widening */
            t_conv_add(p, 3, 6, 3, 4, 5, 3, 1, 0);   /* 12: the small-plane one */
            t_conv_add(p, 2, 6, 3, 4, 5, 1, 0, 1);   /* a 1x1 (a shortcut's shape) */
            if (!quick)
                t_conv_add(p, 2, 320, 64, 64, 320, 3, 1, 1);
        }
        if (api->conv2d_backward && prec_want("conv2d_backward")) {
            tp_conv_backward(p, 2, 3, 9, 7, 5, 3, 3, 1, 1, 1);
            tp_conv_backward(p, 1, 4, 10, 12, 6, 3, 3, 2, 0, 1);
            /* dout's and inp's copies (36 and 40 channels) by one launch */
            tp_conv_backward(p, 2, 40, 20, 20, 36, 3, 3, 1, 1, 1);
            if (!quick)
                tp_conv_backward(p, 2, 320, 64, 64, 320, 3, 3, 1, 1, 1);
        }
        if (api->attention_forward && prec_want("attention_forward")) {
            tp_attention(p, 2, 19, 19, 3, 8, 0);
            tp_attention(p, 1, 33, 7, 2, 40, 1);
            tp_attention(p, 1, 40, 40, 1, 512, 0); /* the VAE's: rounded fp32 copies, cuBLAS */
            if (!quick)
                tp_attention(p, 2, 4096, 77, 8, 40, 0);
        }
        if (api->attention_backward && prec_want("attention_backward")) {
            tp_attention_backward(p, 2, 19, 19, 3, 8, 1);
            tp_attention_backward(p, 1, 33, 7, 2, 40, 0);
            /* 16 query tiles and one key block: the dK/dV pass split in two
             * and summed by dkv_reduce_kernel, which rounds the sums */
            tp_attention_backward(p, 1, 1024, 16, 1, 8, 0);
            if (!quick)
                tp_attention_backward(p, 1, 1024, 1024, 8, 40, 0);
        }
    }

    if (only)
        goto done;
later:
    /* activations, elementwise, layout, embeddings */
    for (int a = 0; a < 4; a++) {
        t_act((act)a, 1001);
        if (!quick)
            t_act((act)a, (size_t)2 * 320 * 64 * 64);
    }
    t_geglu(13, 7);
    if (!quick)
        t_geglu(8192, 1280);
    t_binary(1001);
    t_ddim_step(1001);
    if (!quick)
        t_binary((size_t)2 * 320 * 64 * 64);
    t_add_channel(2, 3, 5);
    if (!quick)
        t_add_channel(2, 320, 4096);
    t_concat(2, 3, 5, 7);
    if (!quick)
        t_concat(2, 640, 320, 1024);
    t_transpose(2, 5, 7);
    if (!quick)
        t_transpose(2, 320, 4096);
    t_transpose(3, 33, 65);
    t_upsample(1, 2, 3, 5);
    if (!quick)
        t_upsample(2, 640, 32, 32);
    t_timestep(4, 320, 1, 0.0f, 10000.0f);
    t_timestep(3, 7, 0, 1.0f, 10000.0f);
    t_embedding(2, 9, 5, 4, 12, 1);
    if (!quick)
        t_embedding(2, 77, 768, 50, 77, 1);
    if (!quick)
        t_embedding(3, 77, 768, 49408, 77, 0);

    /* optimizer: sizes below, at and past one 4096-element chunk, not multiples
     * of the 256-thread block, and (sumsq) past one 32-chunk block */
    static const size_t opt_n[] = {1, 1001, 4096, 4097, 3 * 4096 + 77};
    for (size_t k = 0; k < sizeof opt_n / sizeof opt_n[0]; k++) {
        t_adamw(opt_n[k], 1e-3, 1e-2, 0.0);
        t_sumsq(opt_n[k], 1.0f);
        t_scale(opt_n[k], 0.37f);
    }
    t_adamw(1001, 5e-6, 0.0, 0.0); /* the DreamBooth lr, no decay */
    t_adamw(1001, 5e-6, 1e-2, 0.3172); /* the clip coefficient folded in */
    t_adamw(1001, 0.5, 0.3, 0.0);  /* large steps: bigger updates, subnormal-free */
    t_shadow();
    t_alloc_large();
    t_sumsq(0, 1.0f);
    t_sumsq(33 * 4096 + 1000, 1e-3f);
    t_sumsq(70 * 4096, 30.0f);
    {
        /* empty, one element, chunk edges, several warps' worth of chunks, unsorted */
        static const size_t many[] = {0, 1, 4095, 4096, 4097, 40 * 4096 + 3, 7, 33 * 4096};
        t_sumsq_many(many, sizeof many / sizeof *many);
        t_clip_each();
        t_sumsq_packed(DB_PREC_BF16);
        t_sumsq_packed(DB_PREC_F16);
        t_adamw_packed(DB_PREC_BF16);
        t_adamw_packed(DB_PREC_F16);
    }
    t_side_stream();
    t_fence();
    t_host_alloc();
    t_graph(DB_PREC_F32);
    t_graph(DB_PREC_BF16);
    t_graph_timestep();
    t_graph_weights();
    t_graph_optim();
    t_graph_filters();
    t_scale(1001, 1.0f);
    t_scale(1001, NAN);
    if (!quick) {
        t_adamw((size_t)2 * 320 * 64 * 64 + 3, 1e-3, 1e-2, 0.0);
        t_sumsq((size_t)12345679, 0.02f);
        t_scale((size_t)12345679, 0.999f);
    }
    /* 8-bit AdamW: one element, one partial block, whole blocks, a partial
     * last block past the 4096-element min_8bit_size; blocks scaled apart */
    static const size_t q8_n[] = {1, 255, 256, 3 * 256, 4097};
    for (size_t k = 0; k < sizeof q8_n / sizeof q8_n[0]; k++)
        t_adamw8bit(q8_n[k], 1e-3, 1e-2, 0.1f, 0.0);
    t_adamw8bit(1001, 5e-6, 0.0, 1e-3f, 0.0);
    t_adamw8bit(1001, 5e-6, 1e-2, 1e-3f, 0.4172); /* the clip coefficient folded in */
    t_adamw8bit_many(0);
    t_adamw8bit_many(1);
    if (!quick)
        t_adamw8bit((size_t)320 * 320 * 9 + 5, 1e-3, 1e-2, 0.01f, 0.0);

done:
    api->ctx_destroy(&g);
    db_ctx_destroy(cpu);
    return tap_done();
}
