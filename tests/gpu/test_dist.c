/* The multi-GPU gradient sums (libcommon/dist: db_dist_bind, db_dist_sum_dev,
 * db_dist_sum_dev_start, db_dist_wait) on CUDA contexts, TAP from rank 0.
 *
 * Without GPUs: t1700 runs it under `mpirun -np 2` from build/emu/bin, so
 * each process's CUDA ctx is the emulator's (tests/gpu/emu), with
 * DB_NCCL_LIB naming the emulator's NCCL (tests/gpu/emu/nccl_mpi.c: nccl.h's
 * functions over MPI, which checks the id's broadcast and every sum's
 * arguments), and again with DB_NCCL=0 (the staged path through host
 * memory).  On a machine with GPUs the same program runs on real NCCL.
 *
 *   mpirun -np 2 test_dist TRANSPORT   "nccl" or "mpi-staged": the one
 *                                      db_dist_bind must choose
 *   mpirun -np 2 test_dist fail        with EMU_NCCL_FAIL=1: the first sum's
 *                                      NCCL error comes back, named
 *
 * Each check holds on every rank (its result is the ranks' worst).  The
 * sums are of two ranks' floats, so each element is one float addition,
 * a + b either way round: the expected bits are computed here.  With
 * EMU_NCCL_LOG set (nccl only), the log of the stand-in's calls is read
 * back: the counts in order, the plain sum on the ctx's stream and the begun
 * ones on another (the side stream, so they overlap the ops queued next).
 * Not run here (it would take an emulated training step, minutes): the
 * trainer's bucketing over this path, which t1510 checks on the CPU. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/dist/dist.h"

static int g_rank, g_n, g_bad;
static db_dist *g_d;

/* one check, true on every rank */
static void check(int ok, const char *fmt, const char *what)
{
    int bad = !ok;
    db_err e = {0};
    if (db_dist_max_int(g_d, &bad, &e))
        bad = 1;
    g_n++;
    if (bad)
        g_bad = 1;
    if (g_rank == 0) {
        printf("%s %d - ", bad ? "not ok" : "ok", g_n);
        printf(fmt, what);
        printf("\n");
        fflush(stdout);
    }
}

/* rank r's value of element i: floats in [-1, 1) whose sums round */
static float val(int r, size_t i)
{
    uint64_t h = (i + 1) * 0x9e3779b97f4a7c15ull ^ (uint64_t)(r + 1) * 0xc2b2ae3d27d4eb4full;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return (float)(h >> 40) * (1.0f / 8388608.0f) - 1.0f;
}

/* x's [lo, hi) on the device holds rank-sums (sum 1) or this rank's own
 * values (sum 0) */
static int holds(db_ctx *c, const float *x, size_t lo, size_t hi, int sum, int rank)
{
    size_t n = hi - lo;
    float *h = malloc(n * sizeof *h);
    int ok = h && !db_ctx_copy(c, h, x + lo, n * sizeof *h, DB_COPY_D2H) && !db_ctx_sync(c);
    for (size_t i = 0; ok && i < n; i++) {
        const float want = sum ? val(0, lo + i) + val(1, lo + i) : val(rank, lo + i);
        ok = memcmp(&h[i], &want, sizeof want) == 0;
    }
    free(h);
    return ok;
}

static float *filled(db_ctx *c, size_t n, int rank)
{
    float *h = malloc(n * sizeof *h), *x = db_ctx_alloc(c, n * sizeof *x);
    if (h && x) {
        for (size_t i = 0; i < n; i++)
            h[i] = val(rank, i);
        if (db_ctx_copy(c, x, h, n * sizeof *h, DB_COPY_H2D))
            x = NULL;
    }
    free(h);
    return x;
}

/* the stand-in's log of this rank: the counts and streams of its sums */
static int read_log(const char *prefix, int rank, size_t *count, void **stream, int max)
{
    char path[4096];
    snprintf(path, sizeof path, "%s.%d", prefix, rank);
    FILE *f = fopen(path, "r");
    int n = 0;
    if (!f)
        return -1;
    while (n < max && fscanf(f, "allreduce %zu %p\n", &count[n], &stream[n]) == 2)
        n++;
    fclose(f);
    return n;
}

int main(int argc, char **argv)
{
    db_dist d;
    db_err err = {0};
    g_d = &d;
    if (db_dist_init(&d, &argc, &argv, &err)) {
        printf("1..0 # SKIP no MPI job: %s\n", err.msg);
        return 0;
    }
    g_rank = d.rank;
    const char *mode = argc > 1 ? argv[1] : "nccl";
    if (d.world != 2) {
        if (d.rank == 0)
            printf("1..0 # SKIP run it under mpirun -np 2 (this job has %d process(es))\n", d.world);
        db_dist_finish(&d);
        return 0;
    }
    db_ctx *c = NULL;
    int none = db_ctx_create(&c, DB_CUDA, 1, &err) != 0, anyone = none;
    db_err e0 = {0};
    if (db_dist_max_int(&d, &anyone, &e0))
        anyone = 1;
    if (anyone) {
        if (d.rank == 0)
            printf("1..0 # SKIP no CUDA ctx: %s\n", none ? err.msg : "not on every rank");
        if (c)
            db_ctx_destroy(c);
        db_dist_finish(&d);
        return 0;
    }
    const int bound = db_dist_bind(&d, c, &err) == 0;
    check(bound, "db_dist_bind: %s", bound ? "bound" : err.msg);
    const char *tr = db_dist_transport(&d, c);
    char what[2048];
    snprintf(what, sizeof what, "the transport is %s (got %s)", strcmp(mode, "fail") ? mode : "nccl", tr);
    check(!strcmp(tr, strcmp(mode, "fail") ? mode : "nccl"), "%s", what);

    const size_t n1 = 1000003; /* off every power of two */
    float *x = filled(c, n1, d.rank);
    if (!strcmp(mode, "fail")) {
        /* EMU_NCCL_FAIL=1: the first sum fails; the error names it */
        db_err e = {0};
        const int r = x ? db_dist_sum_dev(&d, c, x, n1, &e) : 0;
        snprintf(what, sizeof what, "a failed sum is an error naming it: %s", e.msg);
        check(x && r == -1 && e.code == DB_EIO && strstr(e.msg, "ncclAllReduce of 1000003 floats: internal error"),
              "%s", what);
    } else {
        db_err e = {0};
        check(x && db_dist_sum_dev(&d, c, x, n1, &e) == 0 && holds(c, x, 0, n1, 1, d.rank),
              "%s", "db_dist_sum_dev: 1000003 floats, every element the two ranks' float sum");

        /* bucketed: sums begun on slices, work queued between them, one wait;
         * a slice never begun keeps this rank's values */
        const size_t cut[] = {0, 1, 70001, 200000, 250000, 300000};
        float *g = filled(c, 300000, d.rank), *y = db_ctx_alloc(c, 4096 * sizeof *y);
        float *z = filled(c, 4096, d.rank);
        int ok = g && y && z;
        for (int k = 0; ok && k < 5; k++) {
            if (k == 3)
                continue; /* [200000, 250000): not summed */
            ok = db_dist_sum_dev_start(&d, c, g + cut[k], cut[k + 1] - cut[k], &e) == 0;
            if (ok && k == 1) /* the ctx's stream goes on meanwhile */
                ok = db_axpby_forward(c, y, z, z, 1.0f, 1.0f, 4096) == 0;
        }
        ok = ok && db_dist_wait(&d, c, &e) == 0;
        int sums = ok && holds(c, g, 0, 200000, 1, d.rank) && holds(c, g, 250000, 300000, 1, d.rank);
        check(sums, "%s", "db_dist_sum_dev_start on 4 slices (1, 70000, 129999, 50000 floats), db_dist_wait: summed");
        check(ok && holds(c, g, 200000, 250000, 0, d.rank), "%s", "... the slice not begun keeps this rank's values");
        float hy[4096];
        int yok = ok && !db_ctx_copy(c, hy, y, sizeof hy, DB_COPY_D2H) && !db_ctx_sync(c);
        for (int i = 0; yok && i < 4096; i++)
            yok = hy[i] == val(d.rank, (size_t)i) + val(d.rank, (size_t)i);
        check(yok, "%s", "... and an op queued on the ctx's stream between them ran");
        check(db_dist_wait(&d, c, &e) == 0, "%s", "db_dist_wait with nothing begun: nothing to do");

        const char *log = getenv("EMU_NCCL_LOG");
        if (!strcmp(mode, "nccl") && log && *log) {
            size_t cnt[16];
            void *st[16];
            const int m = read_log(log, d.rank, cnt, st, 16);
            const size_t want[] = {1000003, 1, 70000, 129999, 50000};
            int lok = m == 5;
            for (int k = 0; lok && k < 5; k++)
                lok = cnt[k] == want[k];
            check(lok, "%s", "NCCL was asked for the 5 sums, their counts in order");
            check(lok && st[1] == st[2] && st[2] == st[3] && st[3] == st[4] && st[1] != st[0], "%s",
                  "... the begun ones on one stream, not the plain sum's (the ctx's): the side stream");
        }
        db_ctx_free(c, g);
        db_ctx_free(c, y);
        db_ctx_free(c, z);
    }
    db_ctx_free(c, x);
    db_ctx_destroy(c);
    db_dist_finish(&d);
    if (d.rank == 0)
        printf("1..%d\n", g_n);
    return g_bad;
}
