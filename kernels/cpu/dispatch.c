/* The device-generic face of kernels/ops.h: context lifetime, argument checks,
 * the sticky error, and THE dispatch point: each op is one switch on
 * ctx->device into a backend function of identical signature (db_cpu_* here;
 * on CUDA the member of the same name in the table of libdb_cuda.so,
 * kernels/cuda_api.h, which the ctx dlopened at create).
 *
 * It lives in kernels/cpu/ only because libdb.a is built from the C files there;
 * nothing in it is CPU specific. */
#include <dlfcn.h>
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/cpu/cpu.h"
#include "kernels/cuda_api.h"
#include "libcommon/core/version.h"
#include "libcommon/sd/optim.h"

/* Bind c to GPU `index` through libdb_cuda.so: the loader of --version
 * (../lib next to the executable), the ABI check, the backend's ctx_init.
 * Fills err (DB_EUNSUPP: no library, no GPU, another ABI) and leaves what it
 * opened in c for db_ctx_destroy. */
static int cuda_open(db_ctx *c, int index, db_err *err)
{
    char why[400];
    if (!(c->cuda_lib = db_cuda_backend_open(why, sizeof why)))
        return db_err_set(err, DB_EUNSUPP, "context: cuda:%d: the CUDA backend is not available: %s", index, why);
    const db_cuda_api *(*get)(int) = (const db_cuda_api *(*)(int))dlsym(c->cuda_lib, "db_cuda_get_api");
    if (!get)
        return db_err_set(err, DB_EUNSUPP,
                          "context: cuda:%d: libdb_cuda.so has no db_cuda_get_api (a backend without ops yet?)",
                          index);
    const db_cuda_api *api = get(DB_CUDA_ABI);
    if (!api || api->abi != DB_CUDA_ABI)
        return db_err_set(err, DB_EUNSUPP,
                          "context: cuda:%d: libdb_cuda.so was built for another interface (ABI %d, need %d): "
                          "rebuild it with this tree (make cuda)",
                          index, api ? api->abi : -1, DB_CUDA_ABI);
    if (!api->ctx_init || !api->alloc || !api->free || !api->copy || !api->zero || !api->sync)
        return db_err_set(err, DB_EUNSUPP, "context: cuda:%d: libdb_cuda.so lacks its runtime functions", index);
    c->cuda_device = index;
    if (api->ctx_init(c, index, err) != 0) {
        /* no device, a driver too old, a failed handle: this machine cannot
         * run cuda:N (DB_EUNSUPP); running out of memory stays DB_ENOMEM */
        if (!err->code)
            db_err_set(err, DB_EUNSUPP, "the backend could not start");
        else if (err->code != DB_ENOMEM)
            err->code = DB_EUNSUPP;
        return db_err_prefix(err, "context: cuda:%d", index);
    }
    c->cuda_api = api; /* only now: destroy calls ctx_destroy for an initialised ctx only */
    return 0;
}

/* ---- cpu-strict (kernels/ops.h): every buffer its own mapping, closed
 * (PROT_NONE) except while an op or a copy of its ctx runs ------------------- */
struct db_strict {
    void **p;
    size_t *n;
    size_t count, cap;
};

static void strict_protect(db_ctx *c, int prot)
{
    struct db_strict *t = c->strict;
    for (size_t i = 0; i < t->count; i++)
        if (mprotect(t->p[i], t->n[i], prot) != 0) {
            /* cannot happen for our own mappings; say so rather than run on unprotected */
            fprintf(stderr, "cpu-strict: mprotect: %s\n", strerror(errno));
            abort();
        }
}

static db_ctx *strict_enter(db_ctx *c)
{
    if (c->strict && c->strict_depth++ == 0)
        strict_protect(c, PROT_READ | PROT_WRITE);
    return c;
}

static void strict_leave(db_ctx **pc)
{
    db_ctx *c = *pc;
    if (c->strict && --c->strict_depth == 0)
        strict_protect(c, PROT_NONE);
}

static void *strict_alloc(db_ctx *c, size_t bytes)
{
    struct db_strict *t = c->strict;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), n = (bytes + page - 1) / page * page + (bytes ? 0 : page);
    if (t->count == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        void **p = realloc(t->p, cap * sizeof *p);
        size_t *nn = p ? realloc(t->n, cap * sizeof *nn) : NULL;
        if (p)
            t->p = p;
        if (!nn) {
            db_err_set(&c->err, DB_ENOMEM, "out of memory (cpu-strict table)");
            return NULL;
        }
        t->n = nn, t->cap = cap;
    }
    void *q = mmap(NULL, n, c->strict_depth ? PROT_READ | PROT_WRITE : PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) {
        db_err_set(&c->err, DB_ENOMEM, "out of memory (%zu MiB)", bytes >> 20);
        return NULL;
    }
    t->p[t->count] = q, t->n[t->count++] = n;
    return q;
}

/* p inside one of c's buffers */
static int strict_owns(db_ctx *c, const void *p)
{
    const struct db_strict *t = c->strict;
    for (size_t i = 0; i < t->count; i++)
        if ((const char *)p >= (const char *)t->p[i] && (const char *)p < (const char *)t->p[i] + t->n[i])
            return 1;
    return 0;
}

static void strict_free(db_ctx *c, void *q)
{
    struct db_strict *t = c->strict;
    for (size_t i = 0; i < t->count; i++)
        if (t->p[i] == q) {
            munmap(q, t->n[i]);
            t->p[i] = t->p[--t->count], t->n[i] = t->n[t->count];
            return;
        }
    db_err_set(&c->err, DB_EUSAGE, "cpu-strict: free of %p: not a buffer of this ctx", q);
}

static void strict_destroy(db_ctx *c)
{
    struct db_strict *t = c->strict;
    if (!t)
        return;
    for (size_t i = 0; i < t->count; i++)
        munmap(t->p[i], t->n[i]);
    free(t->p);
    free(t->n);
    free(t);
    c->strict = NULL;
}

static int ctx_create(db_ctx **out, db_device device, int index, int threads, db_err *err)
{
    *out = NULL;
    if (threads < 0)
        return db_err_set(err, DB_EUSAGE, "context: thread count %d is negative", threads);
    db_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return db_err_set(err, DB_ENOMEM, "context: out of memory");
    c->device = device;
    c->threads = threads ? threads : omp_get_num_procs();
    switch (device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (device == DB_CPU_STRICT && !(c->strict = calloc(1, sizeof *c->strict))) {
            free(c);
            return db_err_set(err, DB_ENOMEM, "context: out of memory");
        }
        __builtin_cpu_init();
        c->simd = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
        if (db_cpu_init(c) != 0) {
            db_err_set(err, c->err.code, "%s", c->err.msg);
            db_ctx_destroy(c);
            return -1;
        }
        break;
    case DB_CUDA:
        if (cuda_open(c, index, err) != 0) {
            db_ctx_destroy(c);
            return -1;
        }
        break;
    default:
        free(c);
        return db_err_set(err, DB_EUNSUPP, "context: device %d has no backend in this build", (int)device);
    }
    *out = c;
    return 0;
}

int db_ctx_create(db_ctx **out, db_device device, int threads, db_err *err)
{
    return ctx_create(out, device, 0, threads, err);
}

int db_device_parse(const char *device, db_device *dev, int *index)
{
    int i = 0, used = 0;
    if (!device || !strcmp(device, "cpu"))
        *dev = DB_CPU;
    else if (!strcmp(device, "cpu-strict"))
        *dev = DB_CPU_STRICT;
    else if (!strcmp(device, "cuda"))
        *dev = DB_CUDA;
    else if (sscanf(device, "cuda:%d%n", &i, &used) == 1 && device[used] == 0 && i >= 0)
        *dev = DB_CUDA;
    else
        return -1;
    *index = i;
    return 0;
}

int db_ctx_create_device(db_ctx **out, const char *device, int threads, db_err *err)
{
    *out = NULL;
    db_device dev;
    int index;
    if (db_device_parse(device, &dev, &index))
        return db_err_set(err, DB_EUSAGE, "context: unknown device '%s' (cpu, cuda or cuda:N)", device);
    return ctx_create(out, dev, index, threads, err);
}

void db_ctx_destroy(db_ctx *c)
{
    if (!c)
        return;
    db_cpu_free(c);
    strict_destroy(c);
    if (c->cuda_api && c->cuda_api->ctx_destroy)
        c->cuda_api->ctx_destroy(c);
    if (c->cuda_lib)
        dlclose(c->cuda_lib);
    free(c);
}

void db_ctx_clear_error(db_ctx *c) { db_err_clear(&c->err); }

void db_ctx_set_precision(db_ctx *c, db_precision p) { c->precision = p; }

const char *db_precision_name(db_precision p)
{
    switch (p) {
    case DB_PREC_F32:
        return "fp32";
    case DB_PREC_BF16:
        return "bf16";
    case DB_PREC_F16:
        return "fp16";
    }
    return "?";
}

int db_precision_parse(const char *s)
{
    static const struct {
        const char *name;
        db_precision p;
    } names[] = {{"fp32", DB_PREC_F32}, {"f32", DB_PREC_F32},       {"float32", DB_PREC_F32},
                 {"no", DB_PREC_F32},   {"bf16", DB_PREC_BF16},     {"bfloat16", DB_PREC_BF16},
                 {"fp16", DB_PREC_F16}, {"f16", DB_PREC_F16},       {"float16", DB_PREC_F16}};
    for (size_t i = 0; s && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(s, names[i].name))
            return (int)names[i].p;
    return -1;
}

int db_ctx_declare_weights(db_ctx *c, const float *p, size_t n)
{
    if (c->err.code)
        return -1;
    if (c->device == DB_CUDA && c->cuda_api->declare_weights)
        return c->cuda_api->declare_weights(c, p, n);
    return 0;
}

void db_ctx_mem_stats(db_ctx *c, db_mem_stats *s)
{
    memset(s, 0, sizeof *s);
    if (c->device == DB_CUDA && c->cuda_api->mem_stats)
        c->cuda_api->mem_stats(c, s);
}

void db_ctx_mem_reset_peak(db_ctx *c)
{
    if (c->device == DB_CUDA && c->cuda_api->mem_reset_peak)
        c->cuda_api->mem_reset_peak(c);
}

void db_ctx_trim(db_ctx *c)
{
    if (c->device == DB_CPU || c->device == DB_CPU_STRICT)
        db_cpu_trim(c);
    else if (c->device == DB_CUDA && c->cuda_api->ctx_trim)
        c->cuda_api->ctx_trim(c);
}

/* ---- memory ---------------------------------------------------------------------- */

void *db_ctx_alloc(db_ctx *c, size_t bytes)
{
    if (c->device == DB_CUDA)
        return c->cuda_api->alloc(c, bytes);
    if (c->strict)
        return strict_alloc(c, bytes);
    /* aligned_alloc wants a multiple of the alignment, and 0 would be NULL */
    const size_t n = (bytes + 63) & ~(size_t)63;
    void *p = n >= bytes ? aligned_alloc(64, n ? n : 64) : NULL;
    if (!p)
        db_err_set(&c->err, DB_ENOMEM, "out of memory (%zu MiB)", bytes >> 20);
    return p;
}

void db_ctx_free(db_ctx *c, void *p)
{
    if (!p)
        return;
    if (c->device == DB_CUDA)
        c->cuda_api->free(c, p);
    else if (c->strict)
        strict_free(c, p);
    else
        free(p);
}

int db_ctx_copy(db_ctx *c, void *dst, const void *src, size_t bytes, db_copy_kind kind)
{
    if (c->err.code)
        return -1;
    if (c->device == DB_CUDA)
        return c->cuda_api->copy(c, dst, src, bytes, kind);
    if (c->strict) { /* each side must be where kind says it is, as cudaMemcpy needs */
        const int dd = strict_owns(c, dst), sd = strict_owns(c, src);
        if (bytes && (dd != (kind != DB_COPY_D2H) || sd != (kind != DB_COPY_H2D)))
            return db_err_set(&c->err, DB_EUSAGE, "cpu-strict: %s copy of %zu bytes from %s memory to %s memory",
                              kind == DB_COPY_H2D ? "host-to-device" : kind == DB_COPY_D2H ? "device-to-host"
                                                                                          : "device-to-device",
                              bytes, sd ? "device" : "host", dd ? "device" : "host");
        db_ctx *g = strict_enter(c);
        if (dst != src && bytes)
            memcpy(dst, src, bytes);
        strict_leave(&g);
        return 0;
    }
    if (dst != src && bytes)
        memcpy(dst, src, bytes);
    return 0;
}

int db_ctx_zero(db_ctx *c, void *p, size_t bytes)
{
    if (c->err.code)
        return -1;
    if (c->device == DB_CUDA)
        return c->cuda_api->zero(c, p, bytes);
    db_ctx *g = strict_enter(c);
    if (bytes)
        memset(p, 0, bytes);
    strict_leave(&g);
    return 0;
}

int db_ctx_sync(db_ctx *c)
{
    if (c->err.code)
        return -1;
    return c->device == DB_CUDA ? c->cuda_api->sync(c) : 0;
}

uint64_t db_ctx_fence(db_ctx *c)
{
    if (c->err.code)
        return 0;
    return c->device == DB_CUDA ? c->cuda_api->fence(c) : 0;
}

int db_ctx_fence_wait(db_ctx *c, uint64_t f)
{
    if (c->err.code)
        return -1;
    return c->device == DB_CUDA && f ? c->cuda_api->fence_wait(c, f) : 0;
}

void *db_ctx_host_alloc(db_ctx *c, size_t bytes)
{
    return c && c->device == DB_CUDA ? c->cuda_api->host_alloc(c, bytes) : NULL;
}

void db_ctx_host_free(db_ctx *c, void *p)
{
    if (p && c && c->device == DB_CUDA)
        c->cuda_api->host_free(c, p);
}

/* ---- graphs (ops.h db_graph_capture) ----------------------------------------------- */

struct db_graph {
    db_ctx *c;
    db_graph_fn fn; /* the CPU's replay */
    void *arg;      /* the copy fn gets */
    db_precision prec; /* the ctx's at the capture: a CUDA graph keeps its kernels' types */
    void *dev;      /* the backend's graph (CUDA), or NULL */
};

int db_graph_capture(db_ctx *c, db_graph **g, db_graph_fn fn, const void *arg, size_t arg_size, db_err *err)
{
    *g = NULL;
    if (c->err.code) {
        *err = c->err;
        return -1;
    }
    db_graph *ng = calloc(1, sizeof *ng);
    void *copy = malloc(arg_size ? arg_size : 1);
    if (!ng || !copy) {
        free(ng);
        free(copy);
        return db_err_set(err, DB_ENOMEM, "graph: out of memory");
    }
    memcpy(copy, arg, arg_size);
    ng->c = c;
    ng->fn = fn;
    ng->arg = copy;
    ng->prec = c->precision;
    if (c->device == DB_CUDA) {
        /* the capture fails as a whole: whatever went wrong during it (an op
         * that waits or copies to the host, a lazily built plan, memory), the
         * caller runs fn directly, where a real error shows up again */
        int rc = c->cuda_api->graph_begin(c);
        if (rc == 0) {
            db_err ferr = {0};
            rc = fn(ng->arg, &ferr);
            ng->dev = c->cuda_api->graph_end(c);
            if (rc == 0 && !ng->dev)
                rc = -1;
            if (rc && !c->err.code) /* fn failed on its own */
                c->err = ferr;
        }
        if (rc || !ng->dev) {
            if (ng->dev)
                c->cuda_api->graph_free(c, ng->dev);
            db_err_set(err, c->err.code ? c->err.code : DB_EUNSUPP, "graph capture: %s",
                       c->err.code ? c->err.msg : "failed");
            db_ctx_clear_error(c);
            free(ng->arg);
            free(ng);
            return 1;
        }
    }
    *g = ng;
    return 0;
}

int db_graph_launch(db_graph *g, db_err *err)
{
    db_ctx *c = g->c;
    if (!g->dev) { /* the CPU: fn again, in the precision it was recorded in */
        const db_precision now = c->precision;
        c->precision = g->prec;
        const int rc = g->fn(g->arg, err);
        c->precision = now;
        return rc;
    }
    const int r = c->cuda_api->graph_launch(c, g->dev);
    if (r == 1) {
        db_err_set(err, DB_EUNSUPP, "graph: made stale by a convolution filter first used since its capture");
        return 1;
    }
    if (r) {
        *err = c->err;
        return -1;
    }
    return 0;
}

void db_graph_free(db_graph *g)
{
    if (!g)
        return;
    if (g->dev)
        g->c->cuda_api->graph_free(g->c, g->dev);
    free(g->arg);
    free(g);
}

/* Every op starts with ENTER: a failed ctx stays failed (sticky error). */
/* ... and on a cpu-strict ctx opens its buffers for the op, closing them
 * again however the op returns (the cleanup attribute). */
#define ENTER(c)                                                                \
    do {                                                                        \
        if ((c)->err.code != 0)                                                 \
            return -1;                                                          \
    } while (0);                                                                \
    __attribute__((cleanup(strict_leave), unused)) db_ctx *strict_guard_ = strict_enter(c)

/* Argument checks shared by all backends; the message names the op and the
 * condition that failed. */
#define REQUIRE(c, op, cond)                                                                   \
    do {                                                                                       \
        if (!(cond))                                                                           \
            return db_err_set(&(c)->err, DB_EUSAGE, "%s: invalid arguments: need %s", op, #cond); \
    } while (0)

static int no_backend(db_ctx *c, const char *op)
{
    return db_err_set(&c->err, DB_EUNSUPP, "%s: device %d has no implementation", op, (int)c->device);
}

/* An op on CUDA: the table's member, or an error naming the op when the
 * backend does not have it (yet). */
static int not_on_cuda(db_ctx *c, const char *op)
{
    return db_err_set(&c->err, DB_EUNSUPP, "%s: not implemented on CUDA", op);
}
#define CUDA_OP(c, name, what, ...) \
    ((c)->op_seq++, (c)->cuda_api->name ? (c)->cuda_api->name((c), __VA_ARGS__) : not_on_cuda((c), what))

int db_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                    int transa, int transb, float alpha, float beta)
{
    ENTER(c);
    REQUIRE(c, "gemm", Cm && A && B && batch > 0 && M > 0 && N > 0 && K > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_gemm_forward(c, Cm, A, B, batch, M, N, K, transa, transb, alpha, beta);
        return db_cpu_gemm_forward(c, Cm, A, B, batch, M, N, K, transa, transb, alpha, beta);
    case DB_CUDA:
        return CUDA_OP(c, gemm_forward, "gemm", Cm, A, B, batch, M, N, K, transa, transb, alpha, beta);
    default:
        return no_backend(c, "gemm");
    }
}

int db_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C,
                      int OC)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && N > 0 && C > 0 && OC > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_linear_forward(c, out, inp, weight, bias, N, C, OC);
        return db_cpu_linear_forward(c, out, inp, weight, bias, N, C, OC);
    case DB_CUDA:
        return CUDA_OP(c, linear_forward, "linear", out, inp, weight, bias, N, C, OC);
    default:
        return no_backend(c, "linear");
    }
}

int db_linear_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                          const float *res, int N, int C, int OC)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && N > 0 && C > 0 && OC > 0 && res != out);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32) /* the emulation: the two ops (it is the reference, not a speed path) */
            return db_cpu_ac_linear_forward(c, out, inp, weight, bias, N, C, OC) ||
                           (res && db_cpu_add_forward(c, out, out, res, (size_t)N * OC))
                       ? -1
                       : 0;
        return db_cpu_linear_add_forward(c, out, inp, weight, bias, res, N, C, OC);
    case DB_CUDA:
        return CUDA_OP(c, linear_add_forward, "linear", out, inp, weight, bias, res, N, C, OC);
    default:
        return no_backend(c, "linear");
    }
}

int db_linear_geglu_forward(db_ctx *c, float *proj, float *out, const float *inp, const float *weight,
                            const float *bias, int N, int C, int FF)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && N > 0 && C > 0 && FF > 0 && out != proj);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT: {
        /* proj NULL: the projection goes through scratch (the unet keeps
         * it on the CPU even in inference, so this is for the others) */
        float *p = proj ? proj : malloc((size_t)N * 2 * (size_t)FF * sizeof *p);
        if (!p)
            return db_err_set(&c->err, DB_ENOMEM, "linear: out of memory for a %dx%d projection", N, 2 * FF);
        int rc;
        if (c->precision != DB_PREC_F32) /* the emulation: the two ops */
            rc = db_cpu_ac_linear_forward(c, p, inp, weight, bias, N, C, 2 * FF) ||
                         db_cpu_geglu_forward(c, out, p, N, FF)
                     ? -1
                     : 0;
        else
            rc = db_cpu_linear_geglu_forward(c, p, out, inp, weight, bias, N, C, FF);
        if (!proj)
            free(p);
        return rc;
    }
    case DB_CUDA:
        return CUDA_OP(c, linear_geglu_forward, "linear", proj, out, inp, weight, bias, N, C, FF);
    default:
        return no_backend(c, "linear");
    }
}

/* The n outputs apart from each other and from inp (db_linear_multi_forward) */
static int multi_apart(float *const *out, const float *inp, int n, size_t each, size_t nin)
{
    for (int i = 0; i < n; i++) {
        if (!out[i] || (out[i] < inp + nin && inp < out[i] + each))
            return 0;
        for (int j = 0; j < i; j++)
            if (out[i] < out[j] + each && out[j] < out[i] + each)
                return 0;
    }
    return 1;
}

int db_linear_multi_forward(db_ctx *c, float *const *out, const float *inp, const float *const *weight,
                            const float *const *bias, int n, int N, int C, int OC)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && n >= 1 && n <= DB_LINEAR_MULTI_MAX && N > 0 && C > 0 && OC > 0);
    for (int i = 0; i < n; i++)
        REQUIRE(c, "linear", weight[i]);
    REQUIRE(c, "linear", multi_apart(out, inp, n, (size_t)N * OC, (size_t)N * C));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT: /* the definition: one linear after the other */
        for (int i = 0; i < n; i++)
            if (db_linear_forward(c, out[i], inp, weight[i], bias ? bias[i] : NULL, N, C, OC))
                return -1;
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, linear_multi_forward, "linear", out, inp, weight, bias, n, N, C, OC);
    default:
        return no_backend(c, "linear");
    }
}

/* The n outputs of widths OC[i] apart from each other and from inp (db_linear_fan_forward) */
static int fan_apart(float *const *out, const float *inp, const int *OC, int n, int N, size_t nin)
{
    for (int i = 0; i < n; i++) {
        const size_t ei = (size_t)N * OC[i];
        if (!out[i] || (out[i] < inp + nin && inp < out[i] + ei))
            return 0;
        for (int j = 0; j < i; j++)
            if (out[i] < out[j] + (size_t)N * OC[j] && out[j] < out[i] + ei)
                return 0;
    }
    return 1;
}

int db_linear_fan_forward(db_ctx *c, float *const *out, const float *inp, const float *const *weight,
                          const float *const *bias, const int *OC, int n, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && OC && n >= 1 && n <= DB_LINEAR_FAN_MAX && N > 0 && C > 0);
    for (int i = 0; i < n; i++)
        REQUIRE(c, "linear", weight[i] && OC[i] > 0);
    REQUIRE(c, "linear", fan_apart(out, inp, OC, n, N, (size_t)N * C));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT: /* the definition: one linear after the other */
        for (int i = 0; i < n; i++)
            if (db_linear_forward(c, out[i], inp, weight[i], bias ? bias[i] : NULL, N, C, OC[i]))
                return -1;
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, linear_fan_forward, "linear", out, inp, weight, bias, OC, n, N, C);
    default:
        return no_backend(c, "linear");
    }
}

int db_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C,
                      int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    ENTER(c);
    REQUIRE(c, "conv2d", out && inp && weight && B > 0 && C > 0 && H > 0 && W > 0 && OC > 0 && KH > 0 && KW > 0);
    REQUIRE(c, "conv2d", stride > 0 && pad0 >= 0 && pad1 >= 0 && H + pad0 + pad1 >= KH && W + pad0 + pad1 >= KW);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_conv2d_forward(c, out, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
        return db_cpu_conv2d_forward(c, out, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    case DB_CUDA:
        return CUDA_OP(c, conv2d_forward, "conv2d", out, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    default:
        return no_backend(c, "conv2d");
    }
}

/* The CPU's: the two ops, the convolution into scratch of its own when add
 * is out (the sum then reads out's old contents). */
static int cpu_conv2d_add(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                          const float *add, int per_channel, int B, int C, int H, int W, int OC, int KH, int KW,
                          int stride, int pad0, int pad1)
{
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const size_t n = (size_t)B * OC * OH * OW;
    float *t = add == out ? malloc(n * sizeof *t) : out;
    if (!t)
        return db_err_set(&c->err, DB_ENOMEM, "conv2d: out of memory (%zu bytes)", n * sizeof *t);
    int r = c->precision != DB_PREC_F32
                ? db_cpu_ac_conv2d_forward(c, t, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1)
                : db_cpu_conv2d_forward(c, t, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    if (r == 0)
        r = per_channel ? db_cpu_add_channel_forward(c, out, t, add, B, OC, OH * OW)
                        : db_cpu_add_forward(c, out, t, add, n);
    if (t != out)
        free(t);
    return r;
}

int db_conv2d_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                          const float *add, int per_channel, int B, int C, int H, int W, int OC, int KH, int KW,
                          int stride, int pad0, int pad1)
{
    ENTER(c);
    REQUIRE(c, "conv2d", out && inp && weight && B > 0 && C > 0 && H > 0 && W > 0 && OC > 0 && KH > 0 && KW > 0);
    REQUIRE(c, "conv2d", stride > 0 && pad0 >= 0 && pad1 >= 0 && H + pad0 + pad1 >= KH && W + pad0 + pad1 >= KW);
    REQUIRE(c, "conv2d", add && (!per_channel || add != out));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return cpu_conv2d_add(c, out, inp, weight, bias, add, per_channel, B, C, H, W, OC, KH, KW, stride, pad0,
                              pad1);
    case DB_CUDA:
        return CUDA_OP(c, conv2d_add_forward, "conv2d", out, inp, weight, bias, add, per_channel, B, C, H, W, OC, KH,
                       KW, stride, pad0, pad1);
    default:
        return no_backend(c, "conv2d");
    }
}

int db_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int B, int C, int HW, int G, float eps, int silu)
{
    ENTER(c);
    REQUIRE(c, "groupnorm", out && inp && weight && bias && B > 0 && C > 0 && HW > 0 && G > 0 && C % G == 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_groupnorm_forward(c, out, mean, rstd, inp, weight, bias, B, C, HW, G, eps, silu);
    case DB_CUDA:
        return CUDA_OP(c, groupnorm_forward, "groupnorm", out, mean, rstd, inp, weight, bias, B, C, HW, G, eps, silu);
    default:
        return no_backend(c, "groupnorm");
    }
}

int db_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int N, int C, float eps)
{
    ENTER(c);
    REQUIRE(c, "layernorm", out && inp && weight && bias && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_layernorm_forward(c, out, mean, rstd, inp, weight, bias, N, C, eps);
    case DB_CUDA:
        return CUDA_OP(c, layernorm_forward, "layernorm", out, mean, rstd, inp, weight, bias, N, C, eps);
    default:
        return no_backend(c, "layernorm");
    }
}

int db_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B,
                         int Tq, int Tk, int NH, int HS, int causal)
{
    ENTER(c);
    REQUIRE(c, "attention", out && q && k && v && B > 0 && Tq > 0 && Tk > 0 && NH > 0 && HS > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_attention_forward(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
        return db_cpu_attention_forward(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    case DB_CUDA:
        return CUDA_OP(c, attention_forward, "attention", out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    default:
        return no_backend(c, "attention");
    }
}

int db_attention_qkv_forward(db_ctx *c, float *q, float *k, float *v, float *out, float *lse, const float *x,
                             const float *wq, const float *wk, const float *wv, int B, int T, int C, int NH,
                             int causal)
{
    ENTER(c);
    REQUIRE(c, "attention", out && x && wq && wk && wv && ((q && k && v) || (!q && !k && !v)) && B > 0 && T > 0 &&
                                C > 0 && NH > 0 && C % NH == 0);
    if (c->device == DB_CUDA)
        return CUDA_OP(c, attention_qkv_forward, "attention", q, k, v, out, lse, x, wq, wk, wv, B, T, C, NH, causal);
    /* the definition: the projections (into scratch when not kept), then the attention */
    const size_t n = (size_t)B * T * C;
    float *t = q ? NULL : malloc(3 * n * sizeof *t);
    if (!q && !t)
        return db_err_set(&c->err, DB_ENOMEM, "attention: out of memory for %zu floats", 3 * n);
    float *const qkv[3] = {q ? q : t, q ? k : t + n, q ? v : t + 2 * n};
    const float *const w[3] = {wq, wk, wv};
    int r = db_linear_multi_forward(c, qkv, x, w, NULL, 3, B * T, C, C);
    if (r == 0)
        r = db_attention_forward(c, out, lse, qkv[0], qkv[1], qkv[2], B, T, T, NH, C / NH, causal);
    free(t);
    return r;
}

int db_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "softmax", out && inp && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_softmax_forward(c, out, inp, N, C);
    case DB_CUDA:
        return CUDA_OP(c, softmax_forward, "softmax", out, inp, N, C);
    default:
        return no_backend(c, "softmax");
    }
}

int db_silu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "silu", out && inp);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_silu_forward(c, out, inp, N);
    case DB_CUDA:
        return CUDA_OP(c, silu_forward, "silu", out, inp, N);
    default:
        return no_backend(c, "silu");
    }
}

int db_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind)
{
    ENTER(c);
    REQUIRE(c, "gelu", out && inp && (kind == DB_GELU_ERF || kind == DB_GELU_TANH));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_gelu_forward(c, out, inp, N, kind);
    case DB_CUDA:
        return CUDA_OP(c, gelu_forward, "gelu", out, inp, N, kind);
    default:
        return no_backend(c, "gelu");
    }
}

int db_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "quick_gelu", out && inp);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_quick_gelu_forward(c, out, inp, N);
    case DB_CUDA:
        return CUDA_OP(c, quick_gelu_forward, "quick_gelu", out, inp, N);
    default:
        return no_backend(c, "quick_gelu");
    }
}

int db_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "geglu", out && inp && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_geglu_forward(c, out, inp, N, C);
    case DB_CUDA:
        return CUDA_OP(c, geglu_forward, "geglu", out, inp, N, C);
    default:
        return no_backend(c, "geglu");
    }
}

int db_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    ENTER(c);
    REQUIRE(c, "add", out && a && b);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_add_forward(c, out, a, b, N);
    case DB_CUDA:
        return CUDA_OP(c, add_forward, "add", out, a, b, N);
    default:
        return no_backend(c, "add");
    }
}

int db_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    ENTER(c);
    REQUIRE(c, "mul", out && a && b);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_mul_forward(c, out, a, b, N);
    case DB_CUDA:
        return CUDA_OP(c, mul_forward, "mul", out, a, b, N);
    default:
        return no_backend(c, "mul");
    }
}

int db_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N)
{
    ENTER(c);
    REQUIRE(c, "axpby", out && x && (y || beta == 0.0f));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_axpby_forward(c, out, x, y, alpha, beta, N);
    case DB_CUDA:
        return CUDA_OP(c, axpby_forward, "axpby", out, x, y, alpha, beta, N);
    default:
        return no_backend(c, "axpby");
    }
}

int db_ddim_step_forward(db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise, size_t N,
                         const db_ddim_coef *k)
{
    ENTER(c);
    REQUIRE(c, "ddim_step", x && mo && k && (noise || !k->noise_on) && k->pred >= 0 && k->pred <= 2);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_ddim_step_forward(c, x, pred_x0, mo, noise, N, k);
    case DB_CUDA:
        return CUDA_OP(c, ddim_step_forward, "ddim_step", x, pred_x0, mo, noise, N, k);
    default:
        return no_backend(c, "ddim_step");
    }
}

int db_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW)
{
    ENTER(c);
    REQUIRE(c, "add_channel", out && inp && vec && B > 0 && C > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_add_channel_forward(c, out, inp, vec, B, C, HW);
    case DB_CUDA:
        return CUDA_OP(c, add_channel_forward, "add_channel", out, inp, vec, B, C, HW);
    default:
        return no_backend(c, "add_channel");
    }
}

int db_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2, int HW)
{
    ENTER(c);
    REQUIRE(c, "concat_channels", out && a && b && B > 0 && C1 > 0 && C2 > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_concat_channels_forward(c, out, a, b, B, C1, C2, HW);
    case DB_CUDA:
        return CUDA_OP(c, concat_channels_forward, "concat_channels", out, a, b, B, C1, C2, HW);
    default:
        return no_backend(c, "concat_channels");
    }
}

int db_transpose_add_forward(db_ctx *c, float *out, const float *inp, const float *res, int B, int M, int N)
{
    ENTER(c);
    REQUIRE(c, "transpose", out && inp && out != inp && res != out && B > 0 && M > 0 && N > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_transpose_add_forward(c, out, inp, res, B, M, N);
    case DB_CUDA:
        return CUDA_OP(c, transpose_add_forward, "transpose", out, inp, res, B, M, N);
    default:
        return no_backend(c, "transpose");
    }
}

int db_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N)
{
    ENTER(c);
    REQUIRE(c, "transpose", out && inp && out != inp && B > 0 && M > 0 && N > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_transpose_forward(c, out, inp, B, M, N);
    case DB_CUDA:
        return CUDA_OP(c, transpose_forward, "transpose", out, inp, B, M, N);
    default:
        return no_backend(c, "transpose");
    }
}

int db_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W)
{
    ENTER(c);
    REQUIRE(c, "upsample_nearest2x", out && inp && out != inp && B > 0 && C > 0 && H > 0 && W > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_upsample_nearest2x_forward(c, out, inp, B, C, H, W);
    case DB_CUDA:
        return CUDA_OP(c, upsample_nearest2x_forward, "upsample_nearest2x", out, inp, B, C, H, W);
    default:
        return no_backend(c, "upsample_nearest2x");
    }
}

int db_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D, int flip_sin_to_cos,
                                  float shift, float max_period)
{
    ENTER(c);
    REQUIRE(c, "timestep_embedding", out && timesteps && B > 0 && D >= 2 && max_period > 0 && D / 2 - shift != 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_timestep_embedding_forward(c, out, timesteps, B, D, flip_sin_to_cos, shift, max_period);
    case DB_CUDA:
        return CUDA_OP(c, timestep_embedding_forward, "timestep_embedding", out, timesteps, B, D, flip_sin_to_cos,
                       shift, max_period);
    default:
        return no_backend(c, "timestep_embedding");
    }
}

int db_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B,
                         int T, int C, int V)
{
    ENTER(c);
    REQUIRE(c, "embedding", out && tokens && wte && B > 0 && T > 0 && C > 0 && V > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_embedding_forward(c, out, tokens, wte, wpe, B, T, C, V);
    case DB_CUDA:
        return CUDA_OP(c, embedding_forward, "embedding", out, tokens, wte, wpe, B, T, C, V);
    default:
        return no_backend(c, "embedding");
    }
}

/* ---- backward ------------------------------------------------------------------ */

int db_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B, int batch,
                     int M, int N, int K, int transa, int transb, float alpha)
{
    ENTER(c);
    REQUIRE(c, "gemm backward", dCm && (!dA || B) && (!dB || A) && batch > 0 && M > 0 && N > 0 && K > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_gemm_backward(c, dA, dB, dCm, A, B, batch, M, N, K, transa, transb, alpha);
        return db_cpu_gemm_backward(c, dA, dB, dCm, A, B, batch, M, N, K, transa, transb, alpha);
    case DB_CUDA:
        return CUDA_OP(c, gemm_backward, "gemm backward", dA, dB, dCm, A, B, batch, M, N, K, transa, transb, alpha);
    default:
        return no_backend(c, "gemm backward");
    }
}

/* The CPU's assign (ops.h): the parameter gradients reset, then the ops'
 * += as always (the same bits by definition; the CPU's time is elsewhere). */
static void cpu_reset(int assign, float *dweight, size_t nw, float *dbias, size_t nb)
{
    if (assign && dweight)
        memset(dweight, 0, nw * sizeof *dweight);
    if (assign && dbias)
        memset(dbias, 0, nb * sizeof *dbias);
}

/* DB_ASSIGN_PACK16 (ops.h): the 16-bit precisions only */
#define REQUIRE_ASSIGN(c, op, assign)                                                                  \
    REQUIRE(c, op, (assign) >= 0 && (assign) <= DB_ASSIGN_PACK16 &&                                  \
                       ((assign) != DB_ASSIGN_PACK16 || (c)->precision != DB_PREC_F32))

/* The CPU's DB_ASSIGN_PACK16: g's n floats (each a value of the compute
 * type, as the autocast ops leave a gradient assigned into zeros) rewritten
 * as their bit patterns in its first 2n bytes.  In place, in order: value
 * i's two bytes end at or before float i's first, so none is overwritten
 * before it is read. */
static int cpu_pack16(db_ctx *c, int r, int assign, float *g, size_t n)
{
    if (r != 0 || assign != DB_ASSIGN_PACK16 || !g)
        return r;
    uint16_t *o = (uint16_t *)(void *)g;
    const int f16 = c->precision == DB_PREC_F16;
    for (size_t i = 0; i < n; i++) {
        const float v = g[i];
        o[i] = f16 ? db_f32_to_f16(v) : db_f32_to_bf16(v);
    }
    return 0;
}

int db_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                       const float *weight, int N, int C, int OC, int assign)
{
    ENTER(c);
    REQUIRE(c, "linear backward", dout && (!dinp || weight) && (!dweight || inp) && N > 0 && C > 0 && OC > 0);
    REQUIRE_ASSIGN(c, "linear backward", assign);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        cpu_reset(assign, dweight, (size_t)OC * C, dbias, (size_t)OC);
        if (c->precision != DB_PREC_F32)
            return cpu_pack16(c, db_cpu_ac_linear_backward(c, dinp, dweight, dbias, dout, inp, weight, N, C, OC),
                              assign, dweight, (size_t)OC * C);
        return db_cpu_linear_backward(c, dinp, dweight, dbias, dout, inp, weight, N, C, OC);
    case DB_CUDA:
        return CUDA_OP(c, linear_backward, "linear backward", dinp, dweight, dbias, dout, inp, weight, N, C, OC,
                       assign);
    default:
        return no_backend(c, "linear backward");
    }
}

int db_linear_multi_backward(db_ctx *c, float *dinp, float *const *dweight, float *const *dbias,
                             const float *const *dout, const float *inp, const float *const *weight, int n, int N,
                             int C, int OC, int accumulate, int assign)
{
    ENTER(c);
    REQUIRE(c, "linear backward", dout && n >= 1 && n <= DB_LINEAR_MULTI_MAX && N > 0 && C > 0 && OC > 0);
    for (int i = 0; i < n; i++)
        REQUIRE(c, "linear backward",
                dout[i] && (!dinp || (weight && weight[i])) && (!dweight || !dweight[i] || inp));
    REQUIRE_ASSIGN(c, "linear backward", assign);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT: { /* the definition: each linear's backward, its dinp added */
        const size_t nx = (size_t)N * C;
        float *d = dinp && (accumulate || n > 1) ? malloc(nx * sizeof *d) : NULL;
        if (dinp && (accumulate || n > 1) && !d)
            return db_err_set(&c->err, DB_ENOMEM, "linear backward: out of memory for %zu floats", nx);
        int r = 0;
        for (int i = 0; i < n && r == 0; i++) {
            float *di = !dinp ? NULL : i == 0 && !accumulate ? dinp : d;
            r = db_linear_backward(c, di, dweight ? dweight[i] : NULL, dbias ? dbias[i] : NULL, dout[i], inp,
                                   weight ? weight[i] : NULL, N, C, OC, assign);
            if (r == 0 && di == d && d)
                r = db_add_forward(c, dinp, dinp, d, nx);
        }
        free(d);
        return r;
    }
    case DB_CUDA:
        return CUDA_OP(c, linear_multi_backward, "linear backward", dinp, dweight, dbias, dout, inp, weight, n, N, C,
                       OC, accumulate, assign);
    default:
        return no_backend(c, "linear backward");
    }
}

int db_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                       const float *weight, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0,
                       int pad1, int assign)
{
    ENTER(c);
    REQUIRE(c, "conv2d backward", dout && (!dinp || weight) && (!dweight || inp) && B > 0 && C > 0 && H > 0 &&
                                      W > 0 && OC > 0 && KH > 0 && KW > 0);
    REQUIRE(c, "conv2d backward",
            stride > 0 && pad0 >= 0 && pad1 >= 0 && H + pad0 + pad1 >= KH && W + pad0 + pad1 >= KW);
    REQUIRE_ASSIGN(c, "conv2d backward", assign);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        cpu_reset(assign, dweight, (size_t)OC * C * KH * KW, dbias, (size_t)OC);
        if (c->precision != DB_PREC_F32)
            return cpu_pack16(c,
                              db_cpu_ac_conv2d_backward(c, dinp, dweight, dbias, dout, inp, weight, B, C, H, W, OC,
                                                        KH, KW, stride, pad0, pad1),
                              assign, dweight, (size_t)OC * C * KH * KW);
        return db_cpu_conv2d_backward(c, dinp, dweight, dbias, dout, inp, weight, B, C, H, W, OC, KH, KW, stride,
                                      pad0, pad1);
    case DB_CUDA:
        return CUDA_OP(c, conv2d_backward, "conv2d backward", dinp, dweight, dbias, dout, inp, weight, B, C, H, W, OC,
                       KH, KW, stride, pad0, pad1, assign);
    default:
        return no_backend(c, "conv2d backward");
    }
}

/* The group norm backward, plain (add NULL) or with the addend joined;
 * arguments checked by the callers. */
static int groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *bias, const float *add, int B, int C, int HW, int G, int silu, int assign)
{
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        cpu_reset(assign, dweight, (size_t)C, dbias, (size_t)C);
        return db_cpu_groupnorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, bias, add, B, C, HW,
                                         G, silu);
    case DB_CUDA:
        return add ? CUDA_OP(c, groupnorm_backward_add, "groupnorm backward", dinp, dweight, dbias, dout, mean, rstd,
                             inp, weight, bias, add, B, C, HW, G, silu, assign)
                   : CUDA_OP(c, groupnorm_backward, "groupnorm backward", dinp, dweight, dbias, dout, mean, rstd, inp,
                             weight, bias, B, C, HW, G, silu, assign);
    default:
        return no_backend(c, "groupnorm backward");
    }
}

int db_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean,
                          const float *rstd, const float *inp, const float *weight, const float *bias, int B, int C,
                          int HW, int G, int silu, int assign)
{
    ENTER(c);
    REQUIRE(c, "groupnorm backward", dout && mean && rstd && inp && weight && bias && B > 0 && C > 0 && HW > 0 &&
                                         G > 0 && C % G == 0);
    return groupnorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, bias, NULL, B, C, HW, G, silu,
                              assign);
}

int db_groupnorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *bias, const float *add, int B, int C, int HW, int G, int silu, int assign)
{
    ENTER(c);
    REQUIRE(c, "groupnorm backward", dinp && add && dout && mean && rstd && inp && weight && bias && B > 0 && C > 0 &&
                                         HW > 0 && G > 0 && C % G == 0);
    return groupnorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, bias, add, B, C, HW, G, silu,
                              assign);
}

/* The layer norm backward, plain (add NULL) or with the addend joined;
 * arguments checked by the callers. */
static int layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *add, int N, int C, int assign)
{
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        cpu_reset(assign, dweight, (size_t)C, dbias, (size_t)C);
        return db_cpu_layernorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, add, N, C);
    case DB_CUDA:
        return add ? CUDA_OP(c, layernorm_backward_add, "layernorm backward", dinp, dweight, dbias, dout, mean, rstd,
                             inp, weight, add, N, C, assign)
                   : CUDA_OP(c, layernorm_backward, "layernorm backward", dinp, dweight, dbias, dout, mean, rstd, inp,
                             weight, N, C, assign);
    default:
        return no_backend(c, "layernorm backward");
    }
}

int db_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean,
                          const float *rstd, const float *inp, const float *weight, int N, int C, int assign)
{
    ENTER(c);
    REQUIRE(c, "layernorm backward", dout && mean && rstd && inp && weight && N > 0 && C > 0);
    return layernorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, NULL, N, C, assign);
}

int db_layernorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *add, int N, int C, int assign)
{
    ENTER(c);
    REQUIRE(c, "layernorm backward", dinp && add && dout && mean && rstd && inp && weight && N > 0 && C > 0);
    return layernorm_backward(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, add, N, C, assign);
}

int db_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                          const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk,
                          int NH, int HS, int causal)
{
    ENTER(c);
    REQUIRE(c, "attention backward", dout && out && lse && q && k && v && B > 0 && Tq > 0 && Tk > 0 && NH > 0 &&
                                         HS > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        if (c->precision != DB_PREC_F32)
            return db_cpu_ac_attention_backward(c, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
        return db_cpu_attention_backward(c, dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    case DB_CUDA:
        return CUDA_OP(c, attention_backward, "attention backward", dq, dk, dv, dout, out, lse, q, k, v, B, Tq, Tk,
                       NH, HS, causal);
    default:
        return no_backend(c, "attention backward");
    }
}

int db_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "softmax backward", dinp && dout && out && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_softmax_backward(c, dinp, dout, out, N, C);
    case DB_CUDA:
        return CUDA_OP(c, softmax_backward, "softmax backward", dinp, dout, out, N, C);
    default:
        return no_backend(c, "softmax backward");
    }
}

int db_silu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "silu backward", dinp && dout && inp);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_silu_backward(c, dinp, dout, inp, N);
    case DB_CUDA:
        return CUDA_OP(c, silu_backward, "silu backward", dinp, dout, inp, N);
    default:
        return no_backend(c, "silu backward");
    }
}

int db_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N, db_gelu_kind kind)
{
    ENTER(c);
    REQUIRE(c, "gelu backward", dinp && dout && inp && (kind == DB_GELU_ERF || kind == DB_GELU_TANH));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_gelu_backward(c, dinp, dout, inp, N, kind);
    case DB_CUDA:
        return CUDA_OP(c, gelu_backward, "gelu backward", dinp, dout, inp, N, kind);
    default:
        return no_backend(c, "gelu backward");
    }
}

int db_quick_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "quick_gelu backward", dinp && dout && inp);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_quick_gelu_backward(c, dinp, dout, inp, N);
    case DB_CUDA:
        return CUDA_OP(c, quick_gelu_backward, "quick_gelu backward", dinp, dout, inp, N);
    default:
        return no_backend(c, "quick_gelu backward");
    }
}

int db_geglu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "geglu backward", dinp && dout && inp && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_geglu_backward(c, dinp, dout, inp, N, C);
    case DB_CUDA:
        return CUDA_OP(c, geglu_backward, "geglu backward", dinp, dout, inp, N, C);
    default:
        return no_backend(c, "geglu backward");
    }
}

int db_mul_backward(db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b, size_t N)
{
    ENTER(c);
    REQUIRE(c, "mul backward", dout && (!da || b) && (!db || a));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_mul_backward(c, da, db, dout, a, b, N);
    case DB_CUDA:
        return CUDA_OP(c, mul_backward, "mul backward", da, db, dout, a, b, N);
    default:
        return no_backend(c, "mul backward");
    }
}

int db_add_channel_backward(db_ctx *c, float *dvec, const float *dout, int B, int C, int HW)
{
    ENTER(c);
    REQUIRE(c, "add_channel backward", dvec && dout && B > 0 && C > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_add_channel_backward(c, dvec, dout, B, C, HW);
    case DB_CUDA:
        return CUDA_OP(c, add_channel_backward, "add_channel backward", dvec, dout, B, C, HW);
    default:
        return no_backend(c, "add_channel backward");
    }
}

int db_concat_channels_backward(db_ctx *c, float *da, float *db, const float *dout, int B, int C1, int C2, int HW)
{
    ENTER(c);
    REQUIRE(c, "concat_channels backward", dout && B > 0 && C1 > 0 && C2 > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_concat_channels_backward(c, da, db, dout, B, C1, C2, HW);
    case DB_CUDA:
        return CUDA_OP(c, concat_channels_backward, "concat_channels backward", da, db, dout, B, C1, C2, HW);
    default:
        return no_backend(c, "concat_channels backward");
    }
}

int db_upsample_nearest2x_backward(db_ctx *c, float *dinp, const float *dout, int B, int C, int H, int W)
{
    ENTER(c);
    REQUIRE(c, "upsample_nearest2x backward", dinp && dout && dinp != dout && B > 0 && C > 0 && H > 0 && W > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_upsample_nearest2x_backward(c, dinp, dout, B, C, H, W);
    case DB_CUDA:
        return CUDA_OP(c, upsample_nearest2x_backward, "upsample_nearest2x backward", dinp, dout, B, C, H, W);
    default:
        return no_backend(c, "upsample_nearest2x backward");
    }
}

int db_embedding_backward(db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B, int T,
                          int C, int V)
{
    ENTER(c);
    REQUIRE(c, "embedding backward", dout && tokens && B > 0 && T > 0 && C > 0 && V > 0);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        return db_cpu_embedding_backward(c, dwte, dwpe, dout, tokens, B, T, C, V);
    case DB_CUDA:
        return CUDA_OP(c, embedding_backward, "embedding backward", dwte, dwpe, dout, tokens, B, T, C, V);
    default:
        return no_backend(c, "embedding backward");
    }
}

/* ---- optimizer (explicit members of the CUDA table, after DB_OP_LIST) ----------------------------------- */

int db_opt_adamw(db_ctx *c, float *p, float *m, float *v, const float *g, size_t n, const struct db_adamw *hp,
                 int64_t t)
{
    ENTER(c);
    REQUIRE(c, "adamw", p && m && v && g && hp);
    REQUIRE(c, "adamw", !hp->g16_nruns || (hp->g16_runs && (hp->g16_prec == DB_PREC_BF16 || hp->g16_prec == DB_PREC_F16)));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        db_adamw_step_omp(p, m, v, g, n, hp, t);
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_adamw, "adamw", p, m, v, g, n, hp, t);
    default:
        return no_backend(c, "adamw");
    }
}

int db_opt_sumsq(db_ctx *c, double *out, const float *g, size_t n)
{
    ENTER(c);
    REQUIRE(c, "sumsq", out && (g || !n));
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        *out = db_sum_squares(g, n);
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_sumsq, "sumsq", out, g, n);
    default:
        return no_backend(c, "sumsq");
    }
}

int db_opt_sumsq_many(db_ctx *c, double *out, const float *const *g, const size_t *n, const int *prec16, size_t k)
{
    ENTER(c);
    REQUIRE(c, "sumsq", (out && g && n) || !k);
    for (size_t i = 0; prec16 && i < k; i++)
        REQUIRE(c, "sumsq", prec16[i] == 0 || prec16[i] == DB_PREC_BF16 || prec16[i] == DB_PREC_F16);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        for (size_t i = 0; i < k; i++)
            out[i] = prec16 && prec16[i] ? db_sum_squares16((const uint16_t *)(const void *)g[i], n[i], prec16[i])
                                         : db_sum_squares(g[i], n[i]);
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_sumsq_many, "sumsq", out, g, n, prec16, k);
    default:
        return no_backend(c, "sumsq");
    }
}

int db_opt_scale(db_ctx *c, float *g, float coef, size_t n)
{
    ENTER(c);
    REQUIRE(c, "scale", g || !n);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        db_scale(g, coef, n);
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_scale, "scale", g, coef, n);
    default:
        return no_backend(c, "scale");
    }
}

int db_opt_clip_each(db_ctx *c, float *norms, float *const *g, const size_t *n, size_t k, float max_norm)
{
    ENTER(c);
    REQUIRE(c, "clip", (norms && g && n) || !k);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        for (size_t i = 0; i < k; i++) {
            const float coef = db_clip_one_coef(db_sum_squares(g[i], n[i]), max_norm, &norms[i]);
            if (coef != 1.0f)
                db_scale(g[i], coef, n[i]);
        }
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_clip_each, "clip", norms, g, n, k, max_norm);
    default:
        return no_backend(c, "clip");
    }
}

int db_opt_adamw8bit_many(db_ctx *c, const db_q8_job *jobs, size_t njobs, const struct db_adamw *hp, int64_t t,
                          const struct db_q8_maps *maps)
{
    ENTER(c);
    REQUIRE(c, "adamw8bit_many", (jobs || !njobs) && hp && maps && !hp->g16_nruns);
    if (c->device == DB_CUDA)
        return CUDA_OP(c, opt_adamw8bit_many, "adamw8bit_many", jobs, njobs, hp, t, maps);
    for (size_t i = 0; i < njobs; i++)
        REQUIRE(c, "adamw8bit_many", jobs[i].prec16 == 0 || jobs[i].prec16 == DB_PREC_BF16 ||
                                         jobs[i].prec16 == DB_PREC_F16);
    /* the CPU: one op per job (a packed one: the whole tensor one run) */
    for (size_t i = 0; i < njobs; i++) {
        const db_q8_job *j = &jobs[i];
        if (j->prec16 && j->n > UINT32_MAX)
            return db_err_set(&c->err, DB_EUSAGE, "adamw8bit_many: a packed tensor of %zu elements", j->n);
        const uint32_t run[2] = {0, (uint32_t)j->n};
        db_adamw h = *hp;
        h.g16_runs = j->prec16 ? run : NULL, h.g16_nruns = j->prec16 ? 1 : 0, h.g16_prec = j->prec16;
        if (j->q8 && j->prec16)
            db_adamw8bit_step16_omp(j->p, j->m_q, j->v_q, j->m_absmax, j->v_absmax, (const uint16_t *)(const void *)j->g,
                                    j->prec16, j->n, hp, t, maps);
        else if (j->q8 ? db_opt_adamw8bit(c, j->p, j->m_q, j->v_q, j->m_absmax, j->v_absmax, j->g, j->n, hp, t, maps)
                       : db_opt_adamw(c, j->p, j->m32, j->v32, j->g, j->n, &h, t))
            return -1;
    }
    return 0;
}

int db_opt_adamw8bit(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                     const float *g, size_t n, const struct db_adamw *hp, int64_t t, const struct db_q8_maps *maps)
{
    ENTER(c);
    REQUIRE(c, "adamw8bit", ((p && m_q && v_q && m_absmax && v_absmax && g) || !n) && hp && maps && !hp->g16_nruns);
    switch (c->device) {
    case DB_CPU:
    case DB_CPU_STRICT:
        db_adamw8bit_step_omp(p, m_q, v_q, m_absmax, v_absmax, g, n, hp, t, maps);
        return 0;
    case DB_CUDA:
        return CUDA_OP(c, opt_adamw8bit, "adamw8bit", p, m_q, v_q, m_absmax, v_absmax, g, n, hp, t, maps);
    default:
        return no_backend(c, "adamw8bit");
    }
}
