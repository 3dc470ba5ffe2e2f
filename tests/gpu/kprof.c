/* A kernel tracer for the GPU runs, in place of Nsight Systems (not on the
 * lent machines: /work/.library/device/KINDS.md): a shared library that the
 * CUDA driver loads into any program when CUDA_INJECTION64_PATH names it,
 * records every kernel, copy and memset through CUPTI's activity API (GPU
 * timestamps, kernel names as cuDNN and cuBLAS give them), and at exit
 * writes kprof.h's tables to $DB_KPROF_OUT (appended) or stderr.
 *
 *   CUDA_INJECTION64_PATH=$PWD/build/lib/libdb_kprof.so DB_KPROF_OUT=prof.md \
 *       build/bench/bench_sd --device cuda --precision bf16 --only fwd,train
 *
 * Sections: a program may call db_kprof_begin(label) before its timed calls
 * and db_kprof_end(calls) after them (bench_sd does, per figure, finding
 * the functions through dlopen(RTLD_NOLOAD) of the same path); the report
 * then has a table per section, per call.  Without sections (db-train,
 * db-sample) it has one for the whole run, titled $DB_KPROF_LABEL.
 * $DB_KPROF_TOP: kernel rows per table (20).  The host's CUDA runtime and
 * driver calls are recorded too (DB_KPROF_HOST=0: not): a table of them per
 * section, and the idle table names those covering each idle stretch.
 *
 * The profile costs a little time per kernel: time with bench_sd alone, and
 * read these tables for the shares.  The state below is global because the
 * driver's entry point takes no argument; the mutex guards it against
 * CUPTI's buffer thread. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cupti.h>

#include "tests/gpu/kprof.h"

static struct {
    pthread_mutex_t mu;
    kp_prof p;
    int on;     /* tracing (the driver called InitializeInjection) */
    int at_exit; /* report() registered */
} G = {PTHREAD_MUTEX_INITIALIZER, {0}, 0, 0};

enum { BUF = 8 << 20 };

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = aligned_alloc(8, BUF);
    *size = *buf ? BUF : 0;
    *max_records = 0;
}

static const char *copy_kind(uint8_t k)
{
    switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[memcpy HtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[memcpy DtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[memcpy DtoD]";
    default: return "[memcpy other]";
    }
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid)
{
    CUpti_Activity *r = NULL;
    pthread_mutex_lock(&G.mu);
    while (valid && cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
            kp_add(&G.p, k->name, k->start, k->end);
            kp_config(&G.p, k->name, k->gridX, k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ,
                      k->registersPerThread, (long)k->staticSharedMemory + k->dynamicSharedMemory);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
            kp_add(&G.p, copy_kind(m->copyKind), m->start, m->end);
            break;
        }
        case CUPTI_ACTIVITY_KIND_RUNTIME:
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)r;
            const char *name = NULL;
            if (cuptiGetCallbackName(r->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? CUPTI_CB_DOMAIN_RUNTIME_API
                                                                            : CUPTI_CB_DOMAIN_DRIVER_API,
                                     a->cbid, &name) != CUPTI_SUCCESS || !name)
                name = "(unknown CUDA call)";
            kp_add_host(&G.p, name, a->start, a->end);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)r;
            kp_add(&G.p, "[memset]", m->start, m->end);
            break;
        }
        default:
            break;
        }
    }
    size_t dropped = 0;
    if (valid && cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS)
        G.p.lost += dropped;
    pthread_mutex_unlock(&G.mu);
    free(buf);
}

/* At exit: the tables.  Also without tracing when a program marked
 * sections (the library preloaded into a CPU run: make check's test of the
 * marks), so the sections show with no kernels. */
static void report(void)
{
    if (G.on)
        cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    pthread_mutex_lock(&G.mu);
    const char *path = getenv("DB_KPROF_OUT"), *top = getenv("DB_KPROF_TOP");
    FILE *f = path && *path ? fopen(path, "a") : NULL;
    if (path && *path && !f)
        fprintf(stderr, "kprof: %s: cannot open; the report goes to stderr\n", path);
    kp_report(&G.p, f ? f : stderr, getenv("DB_KPROF_LABEL"), top ? atoi(top) : 20);
    if (f)
        fclose(f);
    kp_free(&G.p);
    G.on = 0;
    pthread_mutex_unlock(&G.mu);
}

/* The driver calls this once, at cuInit, when CUDA_INJECTION64_PATH names
 * this library; nonzero is success. */
int InitializeInjection(void);
int InitializeInjection(void)
{
    const char *what = NULL;
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS)
        what = "cuptiActivityRegisterCallbacks";
    else if (cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS)
        what = "enabling kernel records";
    else if (cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
             cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS)
        what = "enabling copy records";
    if (what) {
        fprintf(stderr, "kprof: %s failed: no kernel profile\n", what);
        return 0;
    }
    /* the host's CUDA calls, for the idle table (DB_KPROF_HOST=0: off) */
    const char *host = getenv("DB_KPROF_HOST");
    if (!(host && !strcmp(host, "0")) && (cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME) != CUPTI_SUCCESS ||
                                          cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER) != CUPTI_SUCCESS))
        fprintf(stderr, "kprof: enabling host API records failed: the idle table names no calls\n");
    pthread_mutex_lock(&G.mu);
    G.on = 1;
    if (!G.at_exit++)
        atexit(report);
    pthread_mutex_unlock(&G.mu);
    return 1;
}

/* Sections (see the top). */
void db_kprof_begin(const char *label);
void db_kprof_end(int calls);

static uint64_t stamp(void)
{
    uint64_t t = 0;
    if (G.on && cuptiGetTimestamp(&t) != CUPTI_SUCCESS)
        t = 0;
    return t;
}

void db_kprof_begin(const char *label)
{
    const uint64_t t = stamp();
    pthread_mutex_lock(&G.mu);
    kp_begin(&G.p, label, t);
    if (!G.at_exit++)
        atexit(report);
    pthread_mutex_unlock(&G.mu);
}

void db_kprof_end(int calls)
{
    const uint64_t t = stamp();
    pthread_mutex_lock(&G.mu);
    kp_end(&G.p, t, calls);
    pthread_mutex_unlock(&G.mu);
}
