/* The CUDA backend's interface: what libdb_cuda.so (kernels/cuda/) gives
 * the C side (kernels/cpu/dispatch.c, libcommon) through one table, so the
 * tools never link the CUDA runtime and load it only for --device cuda.
 *
 *   const db_cuda_api *api = db_cuda_get_api(DB_CUDA_ABI);   (dlsym'd)
 *
 * Every op of kernels/ops.h has a member with the op's exact signature
 * (DB_OP_LIST below, one line per op, the single list both sides expand);
 * the backend sets the ones it implements and leaves the rest NULL, which
 * the dispatcher reports as "not on this device".  The optimizer ops
 * (db_opt_*) follow the list as three explicit members.  Pointers passed to an op
 * of a CUDA ctx are device pointers from the ctx's allocator.
 *
 * ABI: bump DB_CUDA_ABI whenever this struct or an op's signature changes;
 * the loader refuses a library built for another ABI. */
#ifndef DB_CUDA_API_H
#define DB_CUDA_API_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DB_CUDA_ABI 23 /* 2: opt_adamw, opt_sumsq, opt_scale; 3: db_ctx.precision, mem_stats, stream, declare_weights;
                          4: opt_sumsq_many; 5: side_begin, side_join; 6: linear_add_forward;
                          7: linear_geglu_forward; 8: transpose_add_forward; 9: graph_begin .. graph_free;
                          10: opt_adamw8bit_many; 11: host_alloc, host_free; 12: opt_clip_each;
                          13: linear_multi_forward, linear_multi_backward;
                          14: db_mem_stats.copies_built;
                          15: graph_launch returns 1 for a graph a filter registration made stale;
                          16: db_mem_stats.device_free, device_total;
                          17: the parameter-gradient backwards' assign;
                          18: conv2d_add_forward, linear_fan_forward;
                          19: layernorm_backward_add, groupnorm_backward_add;
                          20: DB_ASSIGN_PACK16, opt_sumsq_many's prec16, db_adamw's g16 runs;
                          21: attention_qkv_forward;
                          22: db_ctx.op_seq, db_mem_stats.twins_made / twins_used;
                          23: ddim_step_forward, fence, fence_wait */

/* Copy directions of db_cuda_api.copy: db_copy_kind, from kernels/ops.h
 * (db_ctx_copy takes the same). */

/* X(name, (parameters)) for every op, in ops.h's order. */
#define DB_OP_LIST(X) \
    X(gemm_forward, (db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K, int transa, int transb, float alpha, float beta)) \
    X(linear_forward, (db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C, int OC)) \
    X(linear_add_forward, (db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, const float *res, int N, int C, int OC)) \
    X(linear_geglu_forward, (db_ctx *c, float *proj, float *out, const float *inp, const float *weight, const float *bias, int N, int C, int FF)) \
    X(linear_multi_forward, (db_ctx *c, float *const *out, const float *inp, const float *const *weight, const float *const *bias, int n, int N, int C, int OC)) \
    X(linear_fan_forward, (db_ctx *c, float *const *out, const float *inp, const float *const *weight, const float *const *bias, const int *OC, int n, int N, int C)) \
    X(conv2d_forward, (db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)) \
    X(conv2d_add_forward, (db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, const float *add, int per_channel, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)) \
    X(groupnorm_forward, (db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight, const float *bias, int B, int C, int HW, int G, float eps, int silu)) \
    X(layernorm_forward, (db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight, const float *bias, int N, int C, float eps)) \
    X(attention_forward, (db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk, int NH, int HS, int causal)) \
    X(attention_qkv_forward, (db_ctx *c, float *q, float *k, float *v, float *out, float *lse, const float *x, const float *wq, const float *wk, const float *wv, int B, int T, int C, int NH, int causal)) \
    X(softmax_forward, (db_ctx *c, float *out, const float *inp, int N, int C)) \
    X(silu_forward, (db_ctx *c, float *out, const float *inp, size_t N)) \
    X(gelu_forward, (db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind)) \
    X(quick_gelu_forward, (db_ctx *c, float *out, const float *inp, size_t N)) \
    X(geglu_forward, (db_ctx *c, float *out, const float *inp, int N, int C)) \
    X(add_forward, (db_ctx *c, float *out, const float *a, const float *b, size_t N)) \
    X(mul_forward, (db_ctx *c, float *out, const float *a, const float *b, size_t N)) \
    X(axpby_forward, (db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N)) \
    X(ddim_step_forward, (db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise, size_t N, const db_ddim_coef *k)) \
    X(add_channel_forward, (db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW)) \
    X(concat_channels_forward, (db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2, int HW)) \
    X(transpose_forward, (db_ctx *c, float *out, const float *inp, int B, int M, int N)) \
    X(transpose_add_forward, (db_ctx *c, float *out, const float *inp, const float *res, int B, int M, int N)) \
    X(upsample_nearest2x_forward, (db_ctx *c, float *out, const float *inp, int B, int C, int H, int W)) \
    X(timestep_embedding_forward, (db_ctx *c, float *out, const float *timesteps, int B, int D, int flip_sin_to_cos, float shift, float max_period)) \
    X(embedding_forward, (db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B, int T, int C, int V)) \
    X(gemm_backward, (db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B, int batch, int M, int N, int K, int transa, int transb, float alpha)) \
    X(linear_backward, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp, const float *weight, int N, int C, int OC, int assign)) \
    X(linear_multi_backward, (db_ctx *c, float *dinp, float *const *dweight, float *const *dbias, const float *const *dout, const float *inp, const float *const *weight, int n, int N, int C, int OC, int accumulate, int assign)) \
    X(conv2d_backward, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp, const float *weight, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1, int assign)) \
    X(groupnorm_backward, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean, const float *rstd, const float *inp, const float *weight, const float *bias, int B, int C, int HW, int G, int silu, int assign)) \
    X(groupnorm_backward_add, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean, const float *rstd, const float *inp, const float *weight, const float *bias, const float *add, int B, int C, int HW, int G, int silu, int assign)) \
    X(layernorm_backward, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean, const float *rstd, const float *inp, const float *weight, int N, int C, int assign)) \
    X(layernorm_backward_add, (db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean, const float *rstd, const float *inp, const float *weight, const float *add, int N, int C, int assign)) \
    X(attention_backward, (db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk, int NH, int HS, int causal)) \
    X(softmax_backward, (db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C)) \
    X(silu_backward, (db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)) \
    X(gelu_backward, (db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N, db_gelu_kind kind)) \
    X(quick_gelu_backward, (db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)) \
    X(geglu_backward, (db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C)) \
    X(mul_backward, (db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b, size_t N)) \
    X(add_channel_backward, (db_ctx *c, float *dvec, const float *dout, int B, int C, int HW)) \
    X(concat_channels_backward, (db_ctx *c, float *da, float *db, const float *dout, int B, int C1, int C2, int HW)) \
    X(upsample_nearest2x_backward, (db_ctx *c, float *dinp, const float *dout, int B, int C, int H, int W)) \
    X(embedding_backward, (db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B, int T, int C, int V))

typedef struct db_cuda_api {
    int abi;                    /* DB_CUDA_ABI of the library */
    /* device state of a ctx: handles, stream, caching allocator (c->cuda);
     * device_index from --device cuda:N */
    int (*ctx_init)(db_ctx *c, int device_index, db_err *err);
    void (*ctx_destroy)(db_ctx *c);
    void (*ctx_trim)(db_ctx *c);        /* return cached blocks to the driver */
    /* memory of a ctx: 256-byte aligned device blocks; NULL with c->err set */
    void *(*alloc)(db_ctx *c, size_t bytes);
    void (*free)(db_ctx *c, void *p);
    int (*copy)(db_ctx *c, void *dst, const void *src, size_t bytes, db_copy_kind kind);
    int (*zero)(db_ctx *c, void *p, size_t bytes);
    int (*sync)(db_ctx *c);            /* wait for the ctx's stream; reports async errors */
#define DB_CUDA_API_MEMBER(name, params) int(*name) params;
    DB_OP_LIST(DB_CUDA_API_MEMBER)
#undef DB_CUDA_API_MEMBER
    /* The optimizer ops of kernels/ops.h (db_opt_*), spelled out rather than
     * in DB_OP_LIST: they do not follow its NAME_forward / NAME_backward naming and
     * their oracle is libcommon/sd/optim.c, which they match bit for bit.
     * p, m, v, g are device pointers; opt_sumsq's out is a HOST double (the
     * call waits for the stream), as on the CPU. */
    int (*opt_adamw)(db_ctx *c, float *p, float *m, float *v, const float *g, size_t n, const struct db_adamw *hp,
                     int64_t t);
    int (*opt_sumsq)(db_ctx *c, double *out, const float *g, size_t n);
    int (*opt_scale)(db_ctx *c, float *g, float coef, size_t n);
    /* allocator statistics (kernels/ops.h db_mem_stats; tracked = 1) and
     * resetting the peak to what is in use now */
    void (*mem_stats)(db_ctx *c, db_mem_stats *s);
    void (*mem_reset_peak)(db_ctx *c);
    /* the ctx's cudaStream_t (as void *), for libraries that queue work
     * with the ops (NCCL collectives, libcommon/dist) */
    void *(*stream)(db_ctx *c);
    /* p (n floats) holds weights: a 16-bit mode may keep a working copy
     * (kernels/ops.h db_ctx_declare_weights) */
    int (*declare_weights)(db_ctx *c, const float *p, size_t n);
    /* db_opt_adamw8bit: 8-bit AdamW, bit-identical to libcommon/sd/optim.c's
     * db_adamw8bit_step; maps is HOST memory (passed to the kernel by value) */
    int (*opt_adamw8bit)(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                         const float *g, size_t n, const struct db_adamw *hp, int64_t t,
                         const struct db_q8_maps *maps);
    /* db_opt_sumsq_many: k sums of squares, one wait; out and the g / n
     * arrays are HOST memory (the g[i] device pointers) */
    int (*opt_sumsq_many)(db_ctx *c, double *out, const float *const *g, const size_t *n, const int *prec16,
                          size_t k);
    /* A second stream for work that overlaps the ctx's ops (libcommon/dist's
     * NCCL all-reduces during the backward): side_begin returns it (a
     * cudaStream_t as void *, NULL with c->err set on failure) after making
     * it wait for everything queued on the ctx's stream so far; side_join
     * makes the ctx's stream wait for everything queued on it since. */
    void *(*side_begin)(db_ctx *c);
    int (*side_join)(db_ctx *c);
    /* CUDA graphs (kernels/ops.h db_graph_capture): graph_begin starts
     * capturing the ctx's stream (the ops queued until graph_end are
     * recorded, not run; the allocator serves them from a pool the graph
     * will own); graph_end stops and returns the instantiated graph, or NULL
     * with c->err set when the capture failed or a block allocated during it
     * is still live (the pool then goes back to the cache: nothing ran).
     * graph_launch queues one replay on the ctx's stream (after bringing
     * any stale 16-bit working copy of declared weights up to date, in
     * place: the replay reads them where the capture found them), or
     * returns 1 and queues nothing when a convolution filter was registered
     * in a working copy since the capture (the copy's layout and the fused
     * AdamW's filter table the graph baked in changed); graph_free waits
     * for the stream and returns the graph's pool to the cache. */
    int (*graph_begin)(db_ctx *c);
    void *(*graph_end)(db_ctx *c);
    int (*graph_launch)(db_ctx *c, void *graph);
    void (*graph_free)(db_ctx *c, void *graph);
    /* db_opt_adamw8bit_many: jobs and maps are HOST memory */
    int (*opt_adamw8bit_many)(db_ctx *c, const db_q8_job *jobs, size_t njobs, const struct db_adamw *hp, int64_t t,
                              const struct db_q8_maps *maps);
    /* db_ctx_host_alloc / db_ctx_host_free: page-locked host memory
     * (cudaHostAlloc, portable), which copies off the device reach at the
     * bus's speed.  Callable from any thread; host_alloc returns NULL when
     * the driver refuses, without touching c (no error is set). */
    void *(*host_alloc)(db_ctx *c, size_t bytes);
    void (*host_free)(db_ctx *c, void *p);
    /* db_opt_clip_each: norms a DEVICE array, the g / n arrays HOST memory
     * (the g[i] device pointers); queued, no wait */
    int (*opt_clip_each)(db_ctx *c, float *norms, float *const *g, const size_t *n, size_t k, float max_norm);
    /* db_ctx_fence / db_ctx_fence_wait: an event recorded on the ctx's
     * stream (0 with c->err set on failure), and a host wait for one */
    uint64_t (*fence)(db_ctx *c);
    int (*fence_wait)(db_ctx *c, uint64_t f);
} db_cuda_api;

/* Exported by libdb_cuda.so: the table, or NULL when the library was built
 * for another ABI. */
const db_cuda_api *db_cuda_get_api(int abi);

#ifdef __cplusplus
}
#endif

#endif
