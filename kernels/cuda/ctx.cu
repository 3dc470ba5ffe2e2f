// Per-ctx device state (c->cuda): device, stream, cuBLAS and cuDNN handles,
// and a caching allocator; plus the table libdb_cuda.so exports.
//
// Allocator.  cudaMalloc / cudaFree synchronise the device and cost tens of
// microseconds, and a training step allocates the same temporaries every
// time, so freed blocks go to free lists by size class (4 classes per power
// of two, 256-byte granularity: at most 25% over the request) and are handed
// out again.  Every op of a ctx runs on its one stream, so a block freed by
// the host while an op that used it is still queued can be reused by the next
// op at once: the stream orders them.  Never managed memory.  trim returns
// the cached blocks to the driver.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda.h"

int db_cuda_fail(db_ctx *c, int code, const char *file, int line, const char *fmt, ...)
{
    if (c->err.code != 0) // keep the first failure
        return -1;
    c->err.code = code;
    int o = snprintf(c->err.msg, sizeof c->err.msg, "%s:%d: ", file, line);
    if (o < 0 || (size_t)o >= sizeof c->err.msg)
        o = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err.msg + o, sizeof c->err.msg - (size_t)o, fmt, ap);
    va_end(ap);
    return -1;
}

// ---- size classes --------------------------------------------------------------

// Rounds bytes up to its class size; returns the class index.
static int size_class(size_t bytes, size_t *rounded)
{
    if (bytes >= DB_CUDA_LARGE) {
        *rounded = (bytes + DB_CUDA_LARGE_GRAIN - 1) / DB_CUDA_LARGE_GRAIN * DB_CUDA_LARGE_GRAIN;
        return DB_CUDA_LARGE_CLASS;
    }
    size_t b = bytes < 256 ? 256 : (bytes + 255) & ~(size_t)255;
    int lg = 63 - __builtin_clzll((unsigned long long)b); // 2^lg <= b < 2^(lg+1)
    size_t p = (size_t)1 << lg, step = p / 4 < 256 ? 256 : p / 4;
    size_t r = (b + step - 1) / step * step;
    if (r == 2 * p) { // rounded up to the next power of two: its class 0
        lg++;
        p = r;
        step = p / 4;
    }
    *rounded = r;
    return 4 * lg + (int)((r - p) / step);
}

// ---- live table: pointer -> rounded size (linear probing, backward-shift delete)

static size_t hash_ptr(const void *p, size_t cap)
{
    uint64_t x = (uint64_t)(uintptr_t)p >> 8; // blocks are 256-aligned
    x *= 0x9e3779b97f4a7c15ull;
    return (size_t)(x >> 17) & (cap - 1);
}

// A live block's size is a multiple of 256; bit 0 of its entry marks a block
// allocated during a graph capture (LIVE_CAPTURED).
enum { LIVE_CAPTURED = 1 };

static int live_put(db_ctx *c, void *p, size_t n, int captured)
{
    db_cuda_state *st = db_cuda_st(c);
    if (2 * (st->live_count + 1) > st->live_cap) { // grow at half full
        size_t cap = st->live_cap ? 2 * st->live_cap : 1024;
        void **np = (void **)calloc(cap, sizeof *np);
        size_t *nn = (size_t *)calloc(cap, sizeof *nn);
        if (!np || !nn) {
            free(np);
            free(nn);
            return db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "allocator: out of host memory");
        }
        for (size_t i = 0; i < st->live_cap; i++) {
            if (!st->live_p[i])
                continue;
            size_t h = hash_ptr(st->live_p[i], cap);
            while (np[h])
                h = (h + 1) & (cap - 1);
            np[h] = st->live_p[i];
            nn[h] = st->live_n[i];
        }
        free(st->live_p);
        free(st->live_n);
        st->live_p = np;
        st->live_n = nn;
        st->live_cap = cap;
    }
    size_t h = hash_ptr(p, st->live_cap);
    while (st->live_p[h])
        h = (h + 1) & (st->live_cap - 1);
    st->live_p[h] = p;
    st->live_n[h] = n | (captured ? LIVE_CAPTURED : 0);
    st->live_count++;
    st->live_bytes += n;
    return 0;
}

// Removes p; returns its size, or 0 when p is not a live block; *captured
// says whether it was allocated during a graph capture.
static size_t live_take(db_cuda_state *st, void *p, int *captured)
{
    if (!st->live_cap)
        return 0;
    size_t mask = st->live_cap - 1, h = hash_ptr(p, st->live_cap);
    while (st->live_p[h] && st->live_p[h] != p)
        h = (h + 1) & mask;
    if (!st->live_p[h])
        return 0;
    size_t n = st->live_n[h] & ~(size_t)LIVE_CAPTURED;
    *captured = (int)(st->live_n[h] & LIVE_CAPTURED);
    st->live_p[h] = NULL;
    st->live_count--;
    st->live_bytes -= n;
    // backward-shift the run after h so lookups never stop at the hole early
    for (size_t j = (h + 1) & mask; st->live_p[j]; j = (j + 1) & mask) {
        size_t home = hash_ptr(st->live_p[j], st->live_cap);
        // entry j may move to the hole h unless its home lies in (h, j]
        int stays = h <= j ? (home > h && home <= j) : (home > h || home <= j);
        if (stays)
            continue;
        st->live_p[h] = st->live_p[j];
        st->live_n[h] = st->live_n[j];
        st->live_p[j] = NULL;
        h = j;
    }
    return n;
}

// ---- the allocator ---------------------------------------------------------------

// The cached block of lists (the ctx's free lists or a capture's pool) to
// serve `rounded` bytes of class k: its link, or NULL.
static db_cuda_block **find_block(db_cuda_block **lists, int k, size_t rounded)
{
    db_cuda_block **from = NULL;
    if (k == DB_CUDA_LARGE_CLASS) { // best fit among the large ones, at most 1/8 over
        for (db_cuda_block **l = &lists[k]; *l; l = &(*l)->next)
            if ((*l)->bytes >= rounded && (*l)->bytes - rounded <= rounded / 8 &&
                (!from || (*l)->bytes < (*from)->bytes))
                from = l;
    } else if (lists[k]) {
        from = &lists[k];
    }
    return from;
}

static void push_block(db_cuda_block **lists, db_cuda_block *b)
{
    size_t rounded;
    int k = size_class(b->bytes, &rounded);
    b->next = lists[k];
    lists[k] = b;
}

static void release_cached(db_cuda_state *st)
{
    for (int k = 0; k < DB_CUDA_NCLASS; k++) {
        while (st->free_list[k]) {
            db_cuda_block *b = st->free_list[k];
            st->free_list[k] = b->next;
            cudaFree(b->p); // a failure here leaves nothing to undo
            free(b);
        }
    }
    st->cached_bytes = 0;
}

// During a graph capture a request is served from the capture's pool first,
// then from the cache (the block joins the pool: every op that used it was
// queued before the capture began, so the replays come after them), then
// from the driver; never by emptying the cache (cudaFree is not allowed
// while capturing).
void *db_cuda_alloc(db_ctx *c, size_t bytes)
{
    if (c->err.code != 0)
        return NULL;
    db_cuda_state *st = db_cuda_st(c);
    size_t rounded;
    int k = size_class(bytes, &rounded);
    void *p = NULL;
    db_cuda_block **from = st->capturing ? find_block(st->cap_list, k, rounded) : NULL;
    int pooled = from != NULL;
    if (!from)
        from = find_block(st->free_list, k, rounded);
    if (from) {
        db_cuda_block *b = *from;
        *from = b->next;
        p = b->p;
        rounded = b->bytes; // a large block keeps its own size
        if (!pooled)
            st->cached_bytes -= b->bytes;
        else
            st->cap_bytes -= b->bytes;
        free(b);
    } else {
        cudaError_t e = cudaMalloc(&p, rounded);
        if (e == cudaErrorMemoryAllocation && !st->capturing) { // give the cache back and try once more
            cudaGetLastError();
            cudaStreamSynchronize(st->stream);
            release_cached(st);
            e = cudaMalloc(&p, rounded);
        }
        if (e != cudaSuccess) {
            db_cuda_fail(c, e == cudaErrorMemoryAllocation ? DB_ENOMEM : DB_EIO, __FILE__, __LINE__,
                         "cudaMalloc(%zu bytes; %zu live): %s", rounded, st->live_bytes, cudaGetErrorString(e));
            return NULL;
        }
    }
    if (live_put(c, p, rounded, st->capturing) != 0) {
        cudaFree(p);
        return NULL;
    }
    if (st->capturing)
        st->cap_live++;
    if (st->live_bytes > st->peak_bytes)
        st->peak_bytes = st->live_bytes;
    return p;
}

// A block freed during a graph capture goes to the capture's pool whoever
// allocated it: the captured ops may use it up to this point of every replay.
void db_cuda_free(db_ctx *c, void *p)
{
    if (!p || !c->cuda)
        return;
    if (db_cuda_shadow_owns(c, p)) // an operand db_cuda_to16 lent from a weight's working copy
        return;
    db_cuda_shadow_drop(c, p);     // freeing declared weights frees their working copy too
    db_cuda_state *st = db_cuda_st(c);
    int captured = 0;
    size_t n = live_take(st, p, &captured);
    if (n == 0) {
        db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "free of %p: not a live block of this ctx", p);
        return;
    }
    if (st->capturing && captured)
        st->cap_live--;
    db_cuda_block *b = (db_cuda_block *)malloc(sizeof *b);
    if (!b) { // cannot cache it: give it back (cudaFree waits for the device)
        if (st->capturing) { // not allowed now: lose the block rather than the capture
            db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "allocator: out of host memory during a graph capture");
            return;
        }
        cudaFree(p);
        return;
    }
    b->p = p;
    b->bytes = n;
    if (st->capturing) {
        push_block(st->cap_list, b);
        st->cap_bytes += n;
    } else {
        push_block(st->free_list, b);
        st->cached_bytes += n;
    }
}

// ---- ctx lifetime ---------------------------------------------------------------------

static db_cuda_block *take_pool(db_cuda_state *st, size_t *bytes); // graphs, below

static void state_destroy(db_cuda_state *st)
{
    if (st->side) {
        cudaStreamSynchronize(st->side);
        cudaStreamDestroy(st->side);
    }
    if (st->ev_main)
        cudaEventDestroy(st->ev_main);
    if (st->ev_side)
        cudaEventDestroy(st->ev_side);
    for (int i = 0; i < DB_CTX_FENCES; i++)
        if (st->fence_ev[i])
            cudaEventDestroy(st->fence_ev[i]);
    if (st->stream)
        cudaStreamSynchronize(st->stream);
    release_cached(st);
    for (int i = 0; i < st->nshadow; i++)
        free(st->shadow[i].fr); // (the copies themselves are blocks: freed below)
    if (st->tfreq)
        cudaFree(st->tfreq);
    if (st->tickets)
        cudaFree(st->tickets);
    size_t pooled = 0; // a capture left open (its ctx destroyed mid-capture)
    for (db_cuda_block *b = take_pool(st, &pooled), *nx; b; b = nx) {
        nx = b->next;
        cudaFree(b->p);
        free(b);
    }
    for (size_t i = 0; i < st->live_cap; i++)
        if (st->live_p[i])
            cudaFree(st->live_p[i]);
    free(st->live_p);
    free(st->live_n);
    if (st->dnn)
        cudnnDestroy(st->dnn);
    if (st->blas)
        cublasDestroy(st->blas);
    if (st->stream)
        cudaStreamDestroy(st->stream);
    free(st);
}

static void api_ctx_destroy(db_ctx *c)
{
    if (!c || !c->cuda)
        return;
    db_cuda_conv_plans_free(c);
    db_cuda_lt_plans_free(c);
    db_cuda_state *st = db_cuda_st(c);
    c->cuda = NULL;
    state_destroy(st); // flag is a live block: freed with the rest
}

static int state_init(db_ctx *c, db_cuda_state *st, int device_index)
{
    int ndev = 0;
    DB_CU(c, cudaGetDeviceCount(&ndev));
    if (device_index < 0 || device_index >= ndev)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "cuda:%d: %d device(s) present", device_index, ndev);
    DB_CU(c, cudaSetDevice(device_index));
    DB_CU(c, cudaDeviceGetAttribute(&st->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index));
    DB_CU(c, cudaDeviceGetAttribute(&st->nsm, cudaDevAttrMultiProcessorCount, device_index));
    DB_CU(c, cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking));
    DB_CUBLAS(c, cublasCreate(&st->blas));
    DB_CUBLAS(c, cublasSetStream(st->blas, st->stream));
    // default math: true fp32 products (no TF32), so results match the CPU
    DB_CUBLAS(c, cublasSetMathMode(st->blas, CUBLAS_DEFAULT_MATH));
    DB_CUDNN(c, cudnnCreate(&st->dnn));
    DB_CUDNN(c, cudnnSetStream(st->dnn, st->stream));
    return 0;
}

static int api_ctx_init(db_ctx *c, int device_index, db_err *err)
{
    db_cuda_state *st = (db_cuda_state *)calloc(1, sizeof *st);
    if (!st) {
        err->code = DB_ENOMEM;
        snprintf(err->msg, sizeof err->msg, "cuda: out of host memory");
        return -1;
    }
    st->device = device_index;
    const char *tw = getenv("DB_CUDA_TWINS"); // "0": no activation twins (a test's A/B)
    st->twins_off = tw && !strcmp(tw, "0");
    c->cuda = st;
    c->cuda_device = device_index;
    c->err.code = 0;
    c->err.msg[0] = 0;
    if (state_init(c, st, device_index) == 0) {
        st->flag = (int *)db_cuda_alloc(c, sizeof(int));
        if (st->flag)
            return 0;
    }
    *err = c->err;
    c->err.code = 0;
    c->err.msg[0] = 0;
    c->cuda = NULL;
    state_destroy(st);
    return -1;
}

static void api_ctx_trim(db_ctx *c)
{
    if (!c->cuda)
        return;
    db_cuda_state *st = db_cuda_st(c);
    db_cuda_twin_drop(c);
    cudaStreamSynchronize(st->stream);
    release_cached(st);
    db_cuda_conv_plans_free(c);
    // (the cublasLt plans stay: a live graph's matmuls use their workspace)
}

static int api_copy(db_ctx *c, void *dst, const void *src, size_t bytes, db_copy_kind kind)
{
    DB_ENTER(c);
    if (bytes == 0)
        return 0;
    db_cuda_state *st = db_cuda_st(c);
    cudaMemcpyKind k = kind == DB_COPY_H2D   ? cudaMemcpyHostToDevice
                       : kind == DB_COPY_D2H ? cudaMemcpyDeviceToHost
                                             : cudaMemcpyDeviceToDevice;
    db_cuda_twin_drop(c); // (a write the twin would not see)
    if (st->capturing && kind != DB_COPY_D2D) // a graph replays device work only
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "%s copy of %zu bytes during a graph capture",
                            kind == DB_COPY_H2D ? "host-to-device" : "device-to-host", bytes);
    if (kind != DB_COPY_D2H)
        db_cuda_shadow_touch(c, dst, bytes);
    DB_CU(c, cudaMemcpyAsync(dst, src, bytes, k, st->stream));
    if (kind == DB_COPY_D2H) // the caller reads dst next
        DB_CU(c, cudaStreamSynchronize(st->stream));
    return 0;
}

static int api_zero(db_ctx *c, void *p, size_t bytes)
{
    DB_ENTER(c);
    db_cuda_twin_drop(c); // (a write the twin would not see)
    if (bytes == 0)
        return 0;
    db_cuda_shadow_touch(c, p, bytes);
    DB_CU(c, cudaMemsetAsync(p, 0, bytes, db_cuda_st(c)->stream));
    return 0;
}

static int api_declare_weights(db_ctx *c, const float *p, size_t n) { return db_cuda_declare_weights(c, p, n); }

static int api_sync(db_ctx *c)
{
    DB_ENTER(c);
    DB_CU(c, cudaStreamSynchronize(db_cuda_st(c)->stream));
    DB_CU(c, cudaGetLastError());
    return 0;
}

// ---- timing (for tests/gpu/bench_cuda_ops.c; outside the op table) -------------------

// Runs fn(c, arg) `warmup` times, then `iters` times between two cudaEvents on
// the ctx's stream; *ms = the mean milliseconds per call.  Events on the
// ctx's own stream: the benchmark cannot see the stream (it is a C program
// without the CUDA toolchain), and events on the default stream would not
// order with a non-blocking one.
extern "C" __attribute__((visibility("default"))) int db_cuda_time_ms(db_ctx *c, int (*fn)(db_ctx *, void *), void *arg,
                                                                      int warmup, int iters, float *ms)
{
    DB_ENTER(c);
    db_cuda_state *st = db_cuda_st(c);
    cudaEvent_t e0 = NULL, e1 = NULL;
    int rc = -1;
    float t = 0.0f;
    for (int i = 0; i < warmup; i++)
        if (fn(c, arg) != 0)
            return -1;
    if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "cudaEventCreate: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    if (cudaEventRecord(e0, st->stream) != cudaSuccess)
        goto fail;
    for (int i = 0; i < iters; i++)
        if (fn(c, arg) != 0)
            goto done;
    if (cudaEventRecord(e1, st->stream) != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess ||
        cudaEventElapsedTime(&t, e0, e1) != cudaSuccess)
        goto fail;
    *ms = iters > 0 ? t / (float)iters : 0.0f;
    rc = 0;
    goto done;
fail:
    db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "timing events: %s", cudaGetErrorString(cudaGetLastError()));
done:
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    return rc;
}

static void api_mem_stats(db_ctx *c, db_mem_stats *s)
{
    db_cuda_state *st = db_cuda_st(c);
    s->tracked = 1;
    s->in_use = st->live_bytes;
    s->peak = st->peak_bytes;
    s->reserved = st->live_bytes + st->cached_bytes + st->cap_bytes + st->graph_bytes;
    s->copies_built = st->shadow_builds;
    s->twins_made = st->twins_made;
    s->twins_used = st->twins_used;
    size_t f = 0, t = 0;
    if (cudaMemGetInfo(&f, &t) == cudaSuccess)
        s->device_free = f, s->device_total = t;
    else
        cudaGetLastError(); // (only a figure: no error for the ctx)
}

static void api_mem_reset_peak(db_ctx *c) { db_cuda_st(c)->peak_bytes = db_cuda_st(c)->live_bytes; }

static void *api_stream(db_ctx *c)
{
    db_cuda_twin_drop(c); // the caller may queue writes of its own on it
    return (void *)db_cuda_st(c)->stream;
}

static void api_free(db_ctx *c, void *p)
{
    db_cuda_twin_drop(c);
    db_cuda_free(c, p);
}

// Pinned host memory (ops.h db_ctx_host_alloc), from any thread: the
// current device is per thread, so a thread of the caller's own (a
// checkpoint stage pinning in the background) selects the ctx's first,
// lest the driver make a context on device 0 for it.  A refusal clears
// that thread's last error and sets nothing in c.
static void *api_host_alloc(db_ctx *c, size_t bytes)
{
    void *p = NULL;
    if (cudaSetDevice(db_cuda_st(c)->device) != cudaSuccess ||
        cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocPortable) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return p;
}

static void api_host_free(db_ctx *c, void *p)
{
    (void)c;
    if (p)
        (void)cudaFreeHost(p);
}

// The side stream, after everything queued on the ctx's stream so far: work
// queued on it (an NCCL all-reduce of gradients already computed) overlaps
// the ops queued next.  NULL with c->err set on failure.
static void *api_side_begin(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    db_cuda_twin_drop(c);
    if (!st->side) {
        cudaError_t e = cudaStreamCreateWithFlags(&st->side, cudaStreamNonBlocking);
        if (e == cudaSuccess)
            e = cudaEventCreateWithFlags(&st->ev_main, cudaEventDisableTiming);
        if (e == cudaSuccess)
            e = cudaEventCreateWithFlags(&st->ev_side, cudaEventDisableTiming);
        if (e != cudaSuccess) {
            db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "side stream: %s", cudaGetErrorString(e));
            return NULL;
        }
    }
    cudaError_t e = cudaEventRecord(st->ev_main, st->stream);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(st->side, st->ev_main, 0);
    if (e != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "side stream: %s", cudaGetErrorString(e));
        return NULL;
    }
    return (void *)st->side;
}

// The ctx's stream waits for everything queued on the side stream.
static int api_side_join(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (!st->side)
        return 0;
    DB_CU(c, cudaEventRecord(st->ev_side, st->side));
    DB_CU(c, cudaStreamWaitEvent(st->stream, st->ev_side, 0));
    return 0;
}

// ops.h db_ctx_fence: the next slot of the ring recorded on the stream
// (a slot reused holds a later point, which a wait for the older fence
// then waits for: at least as much).  Not during a capture, where the
// record would be a node of the graph.
static uint64_t api_fence(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (st->capturing) {
        db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "fence: during a graph capture");
        return 0;
    }
    const int i = (int)(st->nfence % DB_CTX_FENCES);
    cudaError_t e = st->fence_ev[i] ? cudaSuccess : cudaEventCreateWithFlags(&st->fence_ev[i], cudaEventDisableTiming);
    if (e == cudaSuccess)
        e = cudaEventRecord(st->fence_ev[i], st->stream);
    if (e != cudaSuccess) {
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "fence: %s", cudaGetErrorString(e));
        return 0;
    }
    return ++st->nfence;
}

static int api_fence_wait(db_ctx *c, uint64_t f)
{
    db_cuda_state *st = db_cuda_st(c);
    if (f == 0 || f > st->nfence)
        return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "fence_wait: no fence %llu (%llu recorded)",
                            (unsigned long long)f, (unsigned long long)st->nfence);
    DB_CU(c, cudaEventSynchronize(st->fence_ev[(f - 1) % DB_CTX_FENCES]));
    return 0;
}

// ---- CUDA graphs (kernels/ops.h db_graph_capture) --------------------------------

// An instantiated graph and the pool of blocks its replays write into.
struct db_cuda_graph {
    cudaGraphExec_t exec;
    db_cuda_block *pool; // one list; back to the cache at graph_free
    size_t pool_bytes;
    unsigned filters_gen; // db_cuda_state's at the capture
};

// The capture's pool as one list (cap_list emptied).
static db_cuda_block *take_pool(db_cuda_state *st, size_t *bytes)
{
    db_cuda_block *all = NULL;
    for (int k = 0; k < DB_CUDA_NCLASS; k++)
        while (st->cap_list[k]) {
            db_cuda_block *b = st->cap_list[k];
            st->cap_list[k] = b->next;
            b->next = all;
            all = b;
        }
    *bytes = st->cap_bytes;
    st->cap_bytes = 0;
    return all;
}

static void pool_to_cache(db_cuda_state *st, db_cuda_block *pool, size_t bytes)
{
    while (pool) {
        db_cuda_block *b = pool;
        pool = b->next;
        push_block(st->free_list, b);
    }
    st->cached_bytes += bytes;
}

// Relaxed capture mode: cudaMalloc stays allowed (the pool grows during the
// capture); everything that would wait for the device fails the capture.
static int api_graph_begin(db_ctx *c)
{
    DB_ENTER(c);
    db_cuda_state *st = db_cuda_st(c);
    if (st->capturing)
        return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "graph capture: already capturing");
    // stale 16-bit weight copies rebuilt now, outside the graph: a rebuild
    // recorded in it would run at every replay (graph_launch refreshes them)
    if (db_cuda_shadows_refresh(c))
        return -1;
    db_cuda_twin_drop(c); // (made outside the graph: a replay would not remake it)
    DB_CU(c, cudaStreamBeginCapture(st->stream, cudaStreamCaptureModeRelaxed));
    st->capturing = 1;
    st->cap_live = 0;
    return 0;
}

// Ends the capture in every case (also with c->err set by an op during it).
static void *api_graph_end(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (!st->capturing) {
        db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "graph capture: not capturing");
        return NULL;
    }
    db_cuda_twin_drop(c); // a twin no op took: back to the capture's pool first
    st->capturing = 0;
    // blocks of this capture still live (refused below) become plain live
    // blocks: a later capture must not count their frees as its own
    for (size_t i = 0; i < st->live_cap; i++)
        st->live_n[i] &= ~(size_t)LIVE_CAPTURED;
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    cudaError_t e = cudaStreamEndCapture(st->stream, &g);
    size_t bytes = 0;
    db_cuda_block *pool = take_pool(st, &bytes);
    db_cuda_graph *dg = NULL;
    if (e != cudaSuccess)
        db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "graph capture: %s", cudaGetErrorString(e));
    else if (st->cap_live)
        db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                     "graph capture: %zu block(s) allocated during the capture are still live", st->cap_live);
    else if (c->err.code == 0 && (e = cudaGraphInstantiate(&x, g, 0)) != cudaSuccess)
        db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "graph instantiate: %s", cudaGetErrorString(e));
    else if (c->err.code == 0 && !(dg = (db_cuda_graph *)malloc(sizeof *dg)))
        db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "graph: out of host memory");
    if (g)
        cudaGraphDestroy(g);
    cudaGetLastError(); // a failed capture leaves its error as the last one
    if (!dg) {          // nothing was run: the pool is free memory again
        if (x)
            cudaGraphExecDestroy(x);
        pool_to_cache(st, pool, bytes);
        return NULL;
    }
    dg->exec = x;
    dg->pool = pool;
    dg->pool_bytes = bytes;
    dg->filters_gen = st->filters_gen;
    st->graph_bytes += bytes;
    return dg;
}

static int api_graph_launch(db_ctx *c, void *graph)
{
    DB_ENTER(c);
    db_cuda_twin_drop(c);
    // a filter registered since the capture moved its place in a working
    // copy (channels-last) and grew the table the fused AdamW read then: a
    // replay would write that filter's copy at its old places
    if (((db_cuda_graph *)graph)->filters_gen != db_cuda_st(c)->filters_gen)
        return 1;
    if (db_cuda_shadows_refresh(c))
        return -1;
    DB_CU(c, cudaGraphLaunch(((db_cuda_graph *)graph)->exec, db_cuda_st(c)->stream));
    return 0;
}

static void api_graph_free(db_ctx *c, void *graph)
{
    db_cuda_graph *dg = (db_cuda_graph *)graph;
    if (!dg || !c->cuda)
        return;
    db_cuda_state *st = db_cuda_st(c);
    cudaStreamSynchronize(st->stream); // a replay may still be running
    cudaGraphExecDestroy(dg->exec);
    st->graph_bytes -= dg->pool_bytes;
    pool_to_cache(st, dg->pool, dg->pool_bytes);
    free(dg);
}

// ---- the exported table ----------------------------------------------------------

static db_cuda_api make_api(void)
{
    db_cuda_api a;
    memset(&a, 0, sizeof a);
    a.abi = DB_CUDA_ABI;
    a.ctx_init = api_ctx_init;
    a.ctx_destroy = api_ctx_destroy;
    a.ctx_trim = api_ctx_trim;
    a.alloc = db_cuda_alloc;
    a.free = api_free;
    a.copy = api_copy;
    a.zero = api_zero;
    a.sync = api_sync;
    a.mem_stats = api_mem_stats;
    a.mem_reset_peak = api_mem_reset_peak;
    a.stream = api_stream;
    a.host_alloc = api_host_alloc;
    a.host_free = api_host_free;
    a.side_begin = api_side_begin;
    a.side_join = api_side_join;
    a.fence = api_fence;
    a.fence_wait = api_fence_wait;
    a.graph_begin = api_graph_begin;
    a.graph_end = api_graph_end;
    a.graph_launch = api_graph_launch;
    a.graph_free = api_graph_free;
    a.declare_weights = api_declare_weights;
#define SET(name) a.name = db_cuda_##name
    SET(gemm_forward);
    SET(linear_forward);
    SET(linear_add_forward);
    SET(linear_geglu_forward);
    SET(linear_multi_forward);
    SET(linear_fan_forward);
    SET(conv2d_forward);
    SET(conv2d_add_forward);
    SET(groupnorm_forward);
    SET(layernorm_forward);
    SET(attention_forward);
    SET(attention_qkv_forward);
    SET(softmax_forward);
    SET(silu_forward);
    SET(gelu_forward);
    SET(quick_gelu_forward);
    SET(geglu_forward);
    SET(add_forward);
    SET(mul_forward);
    SET(axpby_forward);
    SET(ddim_step_forward);
    SET(add_channel_forward);
    SET(concat_channels_forward);
    SET(transpose_forward);
    SET(transpose_add_forward);
    SET(upsample_nearest2x_forward);
    SET(timestep_embedding_forward);
    SET(embedding_forward);
    SET(gemm_backward);
    SET(linear_backward);
    SET(linear_multi_backward);
    SET(conv2d_backward);
    SET(groupnorm_backward);
    SET(groupnorm_backward_add);
    SET(layernorm_backward);
    SET(layernorm_backward_add);
    SET(attention_backward);
    SET(softmax_backward);
    SET(silu_backward);
    SET(gelu_backward);
    SET(quick_gelu_backward);
    SET(geglu_backward);
    SET(mul_backward);
    SET(add_channel_backward);
    SET(concat_channels_backward);
    SET(upsample_nearest2x_backward);
    SET(embedding_backward);
    SET(opt_adamw);
    SET(opt_sumsq);
    SET(opt_scale);
    SET(opt_adamw8bit);
    SET(opt_sumsq_many);
    SET(opt_adamw8bit_many);
    SET(opt_clip_each);
#undef SET
    return a;
}

// Built once at load time (a constant afterwards: no mutable global state).
static const db_cuda_api api_table = make_api();

extern "C" __attribute__((visibility("default"))) const db_cuda_api *db_cuda_get_api(int abi)
{
    return abi == DB_CUDA_ABI ? &api_table : NULL;
}
