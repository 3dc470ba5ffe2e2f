// Internal to libdb_cuda.so: the per-ctx state (c->cuda), the error helpers
// every op uses, and the declarations the .cu files share.  C++ (nvcc) only;
// the C side sees only kernels/cuda_api.h.
//
// Errors.  Every CUDA / cuBLAS / cuDNN call is checked; a failure writes
// "file:line: call: the API's error string" into c->err (code DB_EIO for
// device failures, DB_ENOMEM for cudaErrorMemoryAllocation) and the op returns
// -1.  The libdb_err helpers live in libdb.a, which this library does not
// link, so db_cuda_fail formats c->err itself.  An op called with c->err
// already set returns -1 at once (the sticky error of kernels/ops.h).
#ifndef DB_CUDA_INTERNAL_H
#define DB_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda_api.h"

// Allocator size classes: 4 per power of two (<= 25% waste), 256 B minimum.
enum { DB_CUDA_NCLASS = 4 * 64 };

struct db_cuda_block { // a cached (free) device block
    void *p;
    size_t bytes;
    db_cuda_block *next;
};

struct db_cuda_conv_plan; // conv.cu: cuDNN descriptors and algorithms per shape

struct db_cuda_state {
    int device;
    cudaStream_t stream; // every op of the ctx runs on it, in order
    cublasHandle_t blas; // bound to stream, default math (no TF32)
    cudnnHandle_t dnn;   // bound to stream
    // caching allocator: free lists per size class; blocks are reused in
    // stream order, so a block freed after an op was queued can be handed to
    // the next op at once without a sync.
    db_cuda_block *free_list[DB_CUDA_NCLASS];
    size_t cached_bytes;
    // live blocks: open-addressing table pointer -> rounded size
    void **live_p;
    size_t *live_n;
    size_t live_cap, live_count, live_bytes;
    size_t peak_bytes; // most live_bytes since init or mem_reset_peak
    db_cuda_conv_plan *plans; // conv.cu's shape cache (a list)
    int *flag;                // one device int for kernels that report a bad input
};

static inline db_cuda_state *db_cuda_st(db_ctx *c) { return (db_cuda_state *)c->cuda; }

// Format into c->err (code, "file:line: ..."); returns -1.
int db_cuda_fail(db_ctx *c, int code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#define DB_CU(c, call)                                                                                                 \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess)                                                                                         \
            return db_cuda_fail((c), e_ == cudaErrorMemoryAllocation ? DB_ENOMEM : DB_EIO, __FILE__, __LINE__,         \
                                "%s: %s", #call, cudaGetErrorString(e_));                                              \
    } while (0)
#define DB_CUBLAS(c, call)                                                                                             \
    do {                                                                                                               \
        cublasStatus_t s_ = (call);                                                                                    \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                               \
            return db_cuda_fail((c), DB_EIO, __FILE__, __LINE__, "%s: %s", #call, cublasGetStatusString(s_));          \
    } while (0)
#define DB_CUDNN(c, call)                                                                                              \
    do {                                                                                                               \
        cudnnStatus_t s_ = (call);                                                                                     \
        if (s_ != CUDNN_STATUS_SUCCESS)                                                                                \
            return db_cuda_fail((c), DB_EIO, __FILE__, __LINE__, "%s: %s", #call, cudnnGetErrorString(s_));            \
    } while (0)
// after every kernel launch: launch-configuration errors show up here
#define DB_LAUNCHED(c) DB_CU((c), cudaGetLastError())
// first line of every op
#define DB_ENTER(c)                                                                                                    \
    do {                                                                                                               \
        if ((c)->err.code != 0)                                                                                        \
            return -1;                                                                                                 \
    } while (0)

// ctx.cu: the allocator (also the api's alloc/free); NULL with c->err set.
void *db_cuda_alloc(db_ctx *c, size_t bytes);
void db_cuda_free(db_ctx *c, void *p);
// conv.cu: release the shape cache (ctx destroy / trim)
void db_cuda_conv_plans_free(db_ctx *c);

// gemm.cu: row-major batched product on cuBLAS (kernels/ops.h db_gemm_forward's
// contract, with leading dimensions and strides spelled out).
int db_cuda_sgemm(db_ctx *c, int batch, int transa, int transb, int M, int N, int K, float alpha, const float *A,
                  int lda, long long sa, const float *B, int ldb, long long sb, float beta, float *Cm, int ldc,
                  long long sc);
// norm.cu: dst (C) += (float) sum over nchunk rows of part (nchunk, C) doubles,
// rows summed in order (the deterministic second stage of a column sum).
int db_cuda_finish_colsum(db_ctx *c, float *dst, const double *part, int nchunk, int C);

// grid size for a grid-stride loop over n items with `threads` per block
static inline unsigned db_cuda_grid(size_t n, int threads)
{
    size_t g = (n + (size_t)threads - 1) / (size_t)threads;
    return (unsigned)(g > 65535u * 16u ? 65535u * 16u : (g ? g : 1));
}

// The ops (kernels/ops.h signatures), declared once from the shared list.
#define DB_CUDA_DECLARE(name, params) extern "C" int db_cuda_##name params;
DB_OP_LIST(DB_CUDA_DECLARE)
#undef DB_CUDA_DECLARE
// optim.cu: the table's explicit optimizer members (kernels/cuda_api.h)
extern "C" int db_cuda_opt_adamw(db_ctx *c, float *p, float *m, float *v, const float *g, size_t n,
                                 const struct db_adamw *hp, int64_t t);
extern "C" int db_cuda_opt_sumsq(db_ctx *c, double *out, const float *g, size_t n);
extern "C" int db_cuda_opt_scale(db_ctx *c, float *g, float coef, size_t n);
extern "C" int db_cuda_opt_adamw8bit(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax,
                                     float *v_absmax, const float *g, size_t n, const struct db_adamw *hp,
                                     int64_t t, const struct db_q8_maps *maps);

#endif
