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

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda_api.h"

// Allocator size classes: 4 per power of two (<= 25% waste), 256 B minimum;
// blocks of DB_CUDA_LARGE bytes or more (weights, gradients, moments,
// workspaces: a few GiB each for SD1.5, where a quarter would be ~1 GiB)
// are sized to 2 MiB and kept in one extra list, reused best-fit by a
// request at most 1/8 smaller.
enum { DB_CUDA_NCLASS = 4 * 64 + 1, DB_CUDA_LARGE_CLASS = 4 * 64 };
#define DB_CUDA_LARGE ((size_t)256 << 20)
#define DB_CUDA_LARGE_GRAIN ((size_t)2 << 20)

struct db_cuda_block { // a cached (free) device block
    void *p;
    size_t bytes;
    db_cuda_block *next;
};

struct db_cuda_conv_plan; // conv.cu: cuDNN descriptors and algorithms per shape
struct db_cuda_lt_plan;   // gemm.cu: cublasLt descriptors and algorithm per biased linear shape

// A weight buffer the model declared (db_ctx_declare_weights) and its
// 16-bit working copy for the autocast modes (autocast.cu): built whole on
// first use in a 16-bit mode, kept current by the fused AdamW (optim.cu), and
// marked stale by any other write into the buffer (copy, zero, other
// optimizers) or a change of compute type.
// A convolution filter inside a declared buffer whose working copy holds it
// in cuDNN's NHWC filter layout (OC, KH, KW, C) instead of the master's
// (OC, C, KH, KW): conv.cu's 16-bit convolutions run channels-last.
struct db_cuda_filter_range {
    size_t off; // floats from the buffer's start
    int OC, C, KHW;
};
struct db_cuda_shadow {
    const float *p; // the fp32 master weights (n floats)
    size_t n;
    void *s;        // n 16-bit values of type prec, or NULL (not built)
    int prec;       // DB_PREC_BF16 / DB_PREC_F16 of s
    int valid;      // s equals round(p) now (the filter ranges transposed)
    db_cuda_filter_range *fr; // registered filters (db_cuda_filter16), host memory
    int nfr, cap_fr;
    db_cuda_filter_range *fr_dev; // fr sorted by off, on the device (the fused AdamW's); a block
    int nfr_dev;                  // the nfr it was built for
};
enum { DB_CUDA_NSHADOW = 16 };
enum { DB_CUDA_NTWIN = 4 };
struct db_cuda_gn_plan {
    int key[6]; // kernel (0 forward, 1 backward), B, C, HW, G, and 1 once filled
    int cl, xcap;
    size_t smem;
};
enum { DB_CUDA_NGN_PLAN = 32 };

struct db_cuda_state {
    int device;
    int smem_optin;      // the most shared memory a block may opt in to (bytes)
    int nsm;             // multiprocessors
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
    db_cuda_shadow shadow[DB_CUDA_NSHADOW]; // declared weight buffers
    int nshadow;
    size_t shadow_builds; // working copies converted whole (db_mem_stats.copies_built)
    db_cuda_conv_plan *plans; // conv.cu's shape cache (a list)
    int *flag;                // one device int for kernels that report a bad input
    // the side stream (collectives that overlap the ops: api side_begin /
    // side_join) and the two events that order it against stream; created
    // at the first side_begin
    cudaStream_t side;
    cudaEvent_t ev_main, ev_side;
    // ops.h db_ctx_fence: a ring of events (made at the first fence) and
    // how many fences were recorded (fence f is in slot (f - 1) % N)
    cudaEvent_t fence_ev[DB_CTX_FENCES];
    uint64_t nfence;
    // graph capture (ctx.cu graph_begin .. graph_end): while capturing, the
    // allocator serves and takes back blocks through cap_list, the pool the
    // graph will own (its replays write into those blocks, so no one else
    // may get them while it lives); cap_live counts blocks allocated during
    // the capture and not yet freed; graph_bytes is what live graphs hold
    int capturing;
    db_cuda_block *cap_list[DB_CUDA_NCLASS];
    size_t cap_live, cap_bytes, graph_bytes;
    // counts filter registrations (autocast.cu db_cuda_filter16): a graph
    // captured before the last one baked a filter table and working-copy
    // layout that no longer hold (the fused AdamW's fr_dev), so graph_launch
    // refuses it (returns 1: the caller captures again)
    unsigned filters_gen;
    // eltwise.cu's timestep-embedding frequencies (computed on the host with
    // the C library's expf, as the CPU does), uploaded once per (half,
    // shift, max_period) outside any capture and kept: an upload inside a
    // captured op would be a graph node reading a freed host buffer at
    // every replay (the first H200 run's graphs did exactly that).  Plain
    // cudaMalloc, outside the allocator's counts; freed with the state.
    float *tfreq;
    int tfreq_half;
    float tfreq_shift, tfreq_maxp;
    // norm.cu's whole-group plans (gw_choose: cluster size, shared memory)
    // per kernel and shape, so that the occupancy query behind a cluster
    // is asked once per shape, not at every group norm (the eager UNet
    // forward took 11 ms longer with it asked each time, H200 call 7)
    db_cuda_gn_plan gn_plan[DB_CUDA_NGN_PLAN];
    int ngn_plan; // entries filled; past DB_CUDA_NGN_PLAN they are reused in turn
    // gemm.cu's 16-bit linears with a bias through cublasLt (the bias added
    // and the sum rounded in its epilogue): a plan per shape (a list), the
    // handle and a workspace made with the first plan, outside any capture
    // (plain cudaMalloc, outside the allocator's counts; freed with the plans)
    db_cuda_lt_plan *lt_plans;
    cublasLtHandle_t lt;
    void *lt_ws;
    // DB_CUDA_TICKETS device counters, zero between launches: a two-stage
    // column sum's first-stage blocks take a ticket as they finish, and the
    // last of a column tile does the second stage itself (db_cuda_colsum_*
    // below) instead of a launch of its own; made at the first use outside
    // a capture (plain cudaMalloc, freed with the state)
    unsigned *tickets;
    // Activations' 16-bit twins (db_cuda_twin_* below): a producer's
    // output p (n floats) rounded to the compute type, s, made in the
    // producer's own pass; the next op's db_cuda_to16 of exactly [p, p + n)
    // takes s instead of converting p again.  twin_seq: c->op_seq of the
    // producing op (its twins serve op twin_seq + 1 only); ntwin of them
    // (an attention backward's dq, dk, dv).
    const float *twin_p[DB_CUDA_NTWIN];
    size_t twin_n[DB_CUDA_NTWIN];
    void *twin_s[DB_CUDA_NTWIN];
    int ntwin, twin_prec; // (all of one op, so of one seq and type)
    unsigned long twin_seq;
    int twins_off;                 // DB_CUDA_TWINS=0 at ctx init: producers make none (a test's A/B)
    size_t twins_made, twins_used; // db_mem_stats
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
// A kernel asking for more than the default 48 KB of dynamic shared memory
// must opt in first (the attention kernels' tiles); 0, or -1 with c->err set
template <typename K> static inline int db_cuda_smem_optin(db_ctx *c, K kern, size_t smem)
{
    if (smem > 48 * 1024)
        DB_CU(c, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    return 0;
}
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
// gemm.cu: release the cublasLt plans, handle and workspace (ctx destroy / trim)
void db_cuda_lt_plans_free(db_ctx *c);

// gemm.cu: row-major batched product on cuBLAS (kernels/ops.h db_gemm_forward's
// contract, with leading dimensions and strides spelled out).
int db_cuda_sgemm(db_ctx *c, int batch, int transa, int transb, int M, int N, int K, float alpha, const float *A,
                  int lda, long long sa, const float *B, int ldb, long long sb, float beta, float *Cm, int ldc,
                  long long sc);
// How a float32 result v reaches dst: DB_PUT_SET dst = v; DB_PUT_ADD dst +=
// v; DB_PUT_FRESH dst = 0 + v, the bits dst += v gives on a zeroed dst (a -0
// made +0) without reading it: a parameter gradient's first contribution
// (ops.h `assign`), the same bits as the reset and the add it replaces.
enum { DB_PUT_SET = 0, DB_PUT_ADD = 1, DB_PUT_FRESH = 2, DB_PUT_PACK16 = 3 };
// DB_PUT_PACK16 (DB_ASSIGN_PACK16's weight gradients, ops.h): dst is the
// 16-bit array at the float pointer's address, element i = the bits of 0 +
// v (v a compute-type value, so exact: DB_PUT_FRESH's bits, packed); only
// the widenings that write weight gradients take it (autocast.cu put16)
// the put mode of a parameter gradient: assigned (ops.h assign) or added
static inline int db_cuda_put_param(int assign) { return assign ? DB_PUT_FRESH : DB_PUT_ADD; }
// n floats of device memory at p zeroed on the ctx's stream (the fp32 ops'
// assign: the reset, then their += as before); 0, or -1 with c->err set
static inline int db_cuda_zero_f32(db_ctx *c, float *p, size_t n)
{
    DB_CU(c, cudaMemsetAsync(p, 0, n * sizeof(float), db_cuda_st(c)->stream));
    return 0;
}

// The same second stage inside the first stage's kernel (call 9: 282
// finishing launches a training step, 3.4 us each, most of it launch and
// ramp for a few columns): a colsum job says what the second stage sums
// and where it puts it; the first-stage kernel, after writing its partials, calls
// db_cuda_colsum_last (every thread of the block), and the block that
// arrives last among the nblocks of its column tile gets 1 and finishes
// the tile's columns with db_cuda_colsum_finish: the same sums in the same
// order, so the same bits.  tickets: db_cuda_tickets's (NULL: no ticket,
// and db_cuda_colsum_done launches the second stage after it).
struct db_colsum_job {
    float *dst;
    const double *part;
    int nchunk, C, r16, put;
};
enum { DB_CUDA_TICKETS = 1024 };
// norm.cu: the job's second stage where its first did not finish it: with
// tickets (the first-stage kernel was given them) nothing, else a launch of
// its own: jb.dst (C) += (float) sum over nchunk rows of jb.part (nchunk, C)
// doubles, rows summed in order (the deterministic second stage of a column
// sum); r16 1 / 2: the float sum rounded to bf16 / fp16 before it is added
// (the 16-bit modes' bias gradients).  put: DB_PUT_ADD, or DB_PUT_FRESH (a
// parameter gradient's first contribution).  A job with dst NULL or C 0 is
// no work.
int db_cuda_colsum_done(db_ctx *c, const unsigned *tickets, db_colsum_job jb);
// c's tickets, made at the first call outside a capture; NULL inside one
// before that, or when they could not be made (the caller falls back);
// NULL always with DB_COLSUM_TICKETS=0 in the environment (t1700 runs the
// fallback so)
unsigned *db_cuda_tickets(db_ctx *c);
// Rows per chunk of a two-stage column sum over N rows (the bias and layer
// norm parameter gradients): 32, doubled while the chunks would pass the
// grid's y limit.  From the shape alone, so the bits do not depend on the card.
static inline int db_cuda_part_rows(int N)
{
    int rows = 32;
    while ((N + rows - 1) / rows > 65535)
        rows *= 2;
    return rows;
}

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
extern "C" int db_cuda_opt_sumsq_many(db_ctx *c, double *out, const float *const *g, const size_t *n,
                                      const int *prec16, size_t k);
extern "C" int db_cuda_opt_scale(db_ctx *c, float *g, float coef, size_t n);
extern "C" int db_cuda_opt_clip_each(db_ctx *c, float *norms, float *const *g, const size_t *n, size_t k,
                                     float max_norm);
extern "C" int db_cuda_opt_adamw8bit(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax,
                                     float *v_absmax, const float *g, size_t n, const struct db_adamw *hp,
                                     int64_t t, const struct db_q8_maps *maps);
extern "C" int db_cuda_opt_adamw8bit_many(db_ctx *c, const db_q8_job *jobs, size_t njobs,
                                          const struct db_adamw *hp, int64_t t, const struct db_q8_maps *maps);

// ---- autocast (kernels/ops.h db_precision): the matmul-class ops in bf16 / fp16
//
// The ops keep float32 buffers at the API; in a compute mode they round
// their inputs to the compute type (into allocator scratch), run the
// library on 16-bit operands with float32 accumulation (tensor cores), and
// round every output to the compute type (parameter-gradient contributions
// before they are added).  autocast.cu has the conversion kernels.

// 1 when c->precision asks for a 16-bit compute type (any other value: fp32)
static inline int db_cuda_prec16(const db_ctx *c)
{
    return c->precision == DB_PREC_BF16 || c->precision == DB_PREC_F16;
}
// nn.GELU (erf form) of one value: eltwise.cu's activations and gemm.cu's
// fused GEGLU epilogue evaluate the same expression
__device__ __forceinline__ float db_cuda_gelu_erf1(float x)
{
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
// x rounded to nearest even in fp16 (f16 != 0; overflow gives +-inf) or bf16,
// as a float
__device__ __forceinline__ float db_cuda_round16(float x, int f16)
{
    return f16 ? __half2float(__float2half_rn(x)) : __bfloat162float(__float2bfloat16_rn(x));
}
// p[i] = v rounded to nearest even in fp16 (f16 != 0) or bf16, p an array
// of that type (an activation twin's store: the bits db_cuda_to16 makes)
__device__ __forceinline__ void db_cuda_store16(void *p, size_t i, float v, int f16)
{
    if (f16)
        ((__half *)p)[i] = __float2half_rn(v);
    else
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}
// an operand element as float (the 16-bit kernels' loads; float itself for the fp32 ones)
__device__ __forceinline__ float db_cuda_f32(float x) { return x; }
__device__ __forceinline__ float db_cuda_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float db_cuda_f32(__half x) { return __half2float(x); }
// *d given v by put (DB_PUT_*, above); d is read only for DB_PUT_ADD
__device__ __forceinline__ void db_cuda_put(float *d, float v, int put)
{
    *d = put == DB_PUT_ADD ? *d + v : put == DB_PUT_FRESH ? __fadd_rn(0.0f, v) : v;
}
// (db_colsum_job, above)
// 1 in the block that took the last of ticket's nblocks (every thread of
// every block calls it once, after writing its partials): that block sees
// all of them, and ticket is zero again for the next launch
__device__ __forceinline__ int db_cuda_colsum_last(unsigned *ticket, unsigned nblocks)
{
    __shared__ int last;
    __threadfence(); // this thread's partials visible to the whole device
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        last = atomicAdd(ticket, 1u) == nblocks - 1;
        if (last)
            *ticket = 0; // (every other block has taken its ticket)
    }
    __syncthreads();
    if (last)
        __threadfence();
    return last;
}
// the job's columns [j0, j1) by the block's threads (one a column), each the
// sum of its nchunk partials in order from 0, put into dst: finish_colsum's
// arithmetic (the partials read past L1: other blocks wrote them)
__device__ __forceinline__ void db_cuda_colsum_finish(const db_colsum_job &jb, int j0, int j1)
{
    const int nt = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    for (int j = j0 + t; j < j1; j += nt) {
        double s = 0;
        int r = 0;
        for (; r + 8 <= jb.nchunk; r += 8) { // eight loads in flight, the sums in order
            double v[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                v[k] = __ldcg(jb.part + (size_t)(r + k) * jb.C + j);
#pragma unroll
            for (int k = 0; k < 8; k++)
                s += v[k];
        }
        for (; r < jb.nchunk; r++)
            s += __ldcg(jb.part + (size_t)r * jb.C + j);
        db_cuda_put(jb.dst + j, jb.r16 ? db_cuda_round16(__fadd_rn(0.0f, (float)s), jb.r16 == 2) : (float)s, jb.put);
    }
}

// attention_backward.cu: D (B, NH, Tq) = dO . O per query and head, summed in
// fp32 (both attention backwards' first pass); T float, __nv_bfloat16 or
// __half.  0, or -1 with c->err set.
template <typename T>
int db_cuda_attn_d(db_ctx *c, float *D, const T *dout, const T *out, int B, int Tq, int NH, int HS);
// n elements of the compute type: fresh scratch holding src rounded
// (free with db_cuda_free); NULL with c->err set.
void *db_cuda_to16(db_ctx *c, const float *src, size_t n);
// k (<= DB_CUDA_TO16_MANY) of them at once: dst[i] = db_cuda_to16(c, src[i],
// n[i]), the same bits, with the tensors that are not weights converted by
// one launch (an op's operands: attention's q, k, v); 0, or -1 with c->err
// set and every dst[i] NULL (nothing to free)
enum { DB_CUDA_TO16_MANY = 12 };
int db_cuda_to16_many(db_ctx *c, void **dst, const float *const *src, const size_t *n, int k);
// and back: dst[i] (float, n floats each) = src (compute type): k tensors
// packed one after another in src, widened by one launch (the same bits as
// k db_cuda_from16 calls with DB_PUT_SET); 0, or -1 with c->err set
int db_cuda_from16_many(db_ctx *c, float *const *dst, const void *src, size_t n, int k);
// One widening of db_cuda_widen: dst (n floats) = the first of m sources of
// the compute type (src, src + stride, ... elements) by put (DB_PUT_*), then
// += each further one in order: the bits of m db_cuda_from16 calls (put,
// then DB_PUT_ADD).  dst NULL or n 0: no work.
struct db_cuda_widen_job {
    float *dst;
    const void *src;
    size_t n;
    int m;
    size_t stride;
    int put;
};
// k (<= DB_CUDA_TO16_MANY) widenings whose dsts do not overlap, by one
// launch (an op's products: a linear backward's dinp and dweight); 0, or -1
// with c->err set
int db_cuda_widen(db_ctx *c, const db_cuda_widen_job *jobs, int k);
// every built 16-bit working copy made current for c's compute type, in
// place (before a graph replay); 0, or -1 with c->err set
int db_cuda_shadows_refresh(db_ctx *c);
// dst (float) = src (compute type, n), or by put (DB_PUT_*: 1 +=)
int db_cuda_from16(db_ctx *c, float *dst, const void *src, size_t n, int put);
// Channels-last conversions (conv.cu's 16-bit convolutions): fresh scratch
// (B, HW, C) in the compute type = round(src (B, C, HW)); NULL with c->err set
void *db_cuda_to16_nhwc(db_ctx *c, const float *src, int B, int C, int HW);
// One conversion of db_cuda_to16_nhwc_jobs: dst (B, HW, C) = round(src (B,
// C, HW)), dst set there (fresh scratch, free with db_cuda_free)
struct db_cuda_nhwc_job {
    void *dst;
    const float *src;
    int B, C, HW;
};
// A fill: y (n values of the compute type, db_cuda_alloc'd; (., OHW, OC)
// when nhwc, else (., OC, OHW)) = round(bias) of each value's channel (a
// 16-bit convolution's beta-1 addend)
struct db_cuda_fill_job {
    void *y;
    const float *bias;
    size_t n;
    int OC, OHW, nhwc;
};
// k (<= 2) channels-last conversions (the bits of db_cuda_to16_nhwc each)
// and the fill (NULL: none) by one launch where every plane has more than
// 16 values; else a launch each.  0, or -1 with c->err set and every
// jobs[i].dst NULL
int db_cuda_to16_nhwc_jobs(db_ctx *c, db_cuda_nhwc_job *jobs, int k, const db_cuda_fill_job *fill);
// One widening of db_cuda_from16_nchw_jobs: dst (B, C, HW) = src (B, HW,
// C) compute type, by put (DB_PUT_*)
struct db_cuda_nchw_job {
    float *dst;
    const void *src;
    int B, C, HW, put;
};
// k (<= 2) of them whose dsts do not overlap (a convolution backward's
// dinp and filter gradient), by one launch when k is 2 (else a launch
// each); the bits of db_cuda_from16_nchw each.  0, or -1 with c->err set
int db_cuda_from16_nchw_jobs(db_ctx *c, const db_cuda_nchw_job *jobs, int k);
// dst (B, C, HW) float = src (B, HW, C) compute type, or by put (DB_PUT_*: 1 +=)
int db_cuda_from16_nchw(db_ctx *c, float *dst, const void *src, int B, int C, int HW, int put);
// The same plus an addend after the widening (conv2d_add_forward): dst =
// (float) src + add, add (B, C, HW) -- it may be dst itself -- or, with
// per_channel, (B, C) broadcast over the plane
int db_cuda_from16_nchw_add(db_ctx *c, float *dst, const void *src, int B, int C, int HW, const float *add,
                            int per_channel);
// A filter w (OC, C, KHW) in the compute type and NHWC filter layout
// (OC, KHW, C): inside a declared buffer, its place in the working copy
// (registered at the first call, so every later rebuild writes it
// transposed); else fresh scratch.  Free with db_cuda_free either way.
void *db_cuda_filter16(db_ctx *c, const float *w, int OC, int C, int KHW);
// The registered filters of w sorted by offset, in device memory (built when
// filters were registered since the last call): the fused AdamW writes
// their copies transposed as it goes.  *n their count; NULL with n 0 when
// none, or with c->err set when the table could not be made.
const db_cuda_filter_range *db_cuda_shadow_filters(db_ctx *c, db_cuda_shadow *w, int *n);
// dst = round(src), or by put (DB_PUT_*: 1 +=); dst may be src
int db_cuda_round(db_ctx *c, float *dst, const float *src, size_t n, int put);
// the same, rounding to fp16 when f16 and to bf16 otherwise, whatever the ctx's mode
int db_cuda_round_as(db_ctx *c, float *dst, const float *src, size_t n, int f16, int put);
// fresh float scratch holding src rounded (free with db_cuda_free); NULL with c->err set
float *db_cuda_rounded_copy(db_ctx *c, const float *src, size_t n);
// Activation twins (db_cuda_state.twin_*).  A producer (layer norm, the
// token transpose, the GEGLU epilogue: outputs that only a linear reads
// next) asks db_cuda_twin_alloc for room for n values of the compute type
// (NULL: no twin wanted -- fp32, twins off -- or c->err set), writes
// round(out) there in the pass that writes out, and hands it over with
// db_cuda_twin_put after its launch (up to DB_CUDA_NTWIN an op: more are
// freed).  A producer that has the 16-bit form already (a product stored
// in the compute type and widened) hands that on.  db_cuda_to16 / db_cuda_to16_many of
// exactly [p, p + n) in the next op (c->op_seq one past the producer's,
// the dispatcher counting every op) in the same compute type take it, so
// the consumer frees it as its own scratch.  Anything else between -- an
// op, a copy, a zero, a free, a graph's begin, end or launch, the stream
// lent out -- leaves it stale, and it is freed at the next twin_alloc,
// twin_drop or lookup.  The bits equal the conversion's (round to nearest
// even of the same float), so a consumer cannot tell the difference.
void *db_cuda_twin_alloc(db_ctx *c, size_t n);
void db_cuda_twin_put(db_ctx *c, const float *p, size_t n, void *s);
// after a producer's launch: its error (s freed; -1 with c->err naming
// what), or s handed over as p's twin (db_cuda_twin_put) and 0
int db_cuda_twin_launched(db_ctx *c, const float *p, size_t n, void *s, const char *what);
void db_cuda_twin_drop(db_ctx *c);
// Weight shadows (db_cuda_shadow above).  db_cuda_to16 of a range inside a
// declared buffer returns (a pointer into) its working copy instead of
// scratch, and db_cuda_free of such a pointer does nothing, so the ops need
// not know which operand is a weight.
int db_cuda_declare_weights(db_ctx *c, const float *p, size_t n);
// the declared buffer holding [p, p + bytes), or NULL
db_cuda_shadow *db_cuda_shadow_find(db_ctx *c, const void *p, size_t bytes);
// a write into [p, p + bytes) other than the fused AdamW's: stale copies
void db_cuda_shadow_touch(db_ctx *c, const void *p, size_t bytes);
// p inside a working copy (db_cuda_free leaves it alone)
int db_cuda_shadow_owns(db_ctx *c, const void *p);
// drop the declared buffer p (its working copy freed); 1 if p was one
int db_cuda_shadow_drop(db_ctx *c, const void *p);
// gemm.cu: db_cuda_sgemm's product on operands already in the compute type
// (cublasGemmEx, float32 accumulate): C float32 (the caller rounds it), or
// of the compute type when c16 (cuBLAS's store rounds it).
int db_cuda_gemm16(db_ctx *c, int batch, int transa, int transb, int M, int N, int K, float alpha, const void *A,
                   int lda, long long sa, const void *B, int ldb, long long sb, float beta, void *Cm, int c16, int ldc,
                   long long sc);

#endif
