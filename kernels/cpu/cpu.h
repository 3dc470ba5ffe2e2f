/* Private to kernels/: the CPU backend behind kernels/ops.h.
 *
 * db_cpu_* functions have exactly the signatures of the db_* ops they
 * implement (the CUDA twins will be db_cuda_* with the same ones); the
 * dispatcher (dispatch.c) has already checked the sticky error and the
 * arguments when they run.
 *
 * Code layout:
 *   dispatch.c   ctx create/destroy, argument checks, the device switch
 *   context.c    oneDNN engine/stream, primitive cache, scratch, error helper
 *   gemm.c       GEMM and linear (oneDNN's sgemm, then the bias)
 *   conv.c       conv2d through cached oneDNN primitives; 1x1 as a GEMM
 *   norm.c       group norm (+SiLU), layer norm, softmax
 *   attention.c  flash-style attention: blocking, packing, online softmax
 *   eltwise.c    activations, add/mul/axpby, concat, transpose, upsample, embeddings
 *   avx512.c     the AVX-512 inner loops the files above call when ctx->simd is set
 *   *_backward.c the backward twins of gemm.c, conv.c, norm.c, attention.c, eltwise.c
 */
#ifndef DB_KERNELS_CPU_H
#define DB_KERNELS_CPU_H

#include <oneapi/dnnl/dnnl.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"

/* ---- backend state ------------------------------------------------------------ */

/* A cached primitive (or bundle) is found by a key of up to DB_CPU_KEYLEN ints:
 * key[0] an op tag, then the op's sizes; unused slots are zero. */
#define DB_CPU_KEYLEN 16

typedef struct db_cpu_cache_entry {
    int64_t key[DB_CPU_KEYLEN];
    void *val;
    void (*destroy)(void *val);
} db_cpu_cache_entry;

struct db_cpu {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    db_cpu_cache_entry *cache; /* open addressing, `cap` slots (power of two) */
    size_t cache_n, cache_cap;
    void *scratch; /* 64-byte aligned, `scratch_size` bytes */
    size_t scratch_size;
};

/* Op tags for cache keys. */
enum { DB_CPU_KEY_CONV2D = 1 };

int db_cpu_init(db_ctx *c);
void db_cpu_free(db_ctx *c);
void db_cpu_trim(db_ctx *c);

/* The cached value for key, or NULL. */
void *db_cpu_cache_get(db_ctx *c, const int64_t key[DB_CPU_KEYLEN]);
/* Takes ownership of val (destroyed with the ctx, or at once on failure). */
int db_cpu_cache_put(db_ctx *c, const int64_t key[DB_CPU_KEYLEN], void *val, void (*destroy)(void *val));

/* A 64-byte aligned buffer of at least `bytes`, owned by the ctx and valid
 * until the next call: one op's temporaries.  Ops must not nest scratch users.
 * NULL (and ctx->err set) when out of memory. */
void *db_cpu_scratch(db_ctx *c, size_t bytes);

/* Sets ctx->err from a oneDNN status; returns -1. */
int db_cpu_dnnl_fail(db_ctx *c, dnnl_status_t s, const char *what);

/* Queries per attention tile: three 16-lane vectors. */
#define DB_ATTN_QB 48

/* n rounded up to a multiple of 16 floats (one cache line, one zmm). */
#define DB_PAD16(n) (((n) + 15) & ~(size_t)15)

/* ---- ops (signatures of kernels/ops.h) ------------------------------------------ */

int db_cpu_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                        int transa, int transb, float alpha, float beta);
int db_cpu_linear_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                              const float *res, int N, int C, int OC);
/* one row of db_cpu_geglu_forward: out (C) = geglu(inp (2C)) */
void db_cpu_geglu_row(const db_ctx *c, float *out, const float *inp, int C);
int db_cpu_linear_geglu_forward(db_ctx *c, float *proj, float *out, const float *inp, const float *weight,
                                const float *bias, int N, int C, int FF);
int db_cpu_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N,
                          int C, int OC);
int db_cpu_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B,
                          int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1);
int db_cpu_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                             const float *bias, int B, int C, int HW, int G, float eps, int silu);
int db_cpu_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                             const float *bias, int N, int C, float eps);
int db_cpu_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B,
                             int Tq, int Tk, int NH, int HS, int causal);
int db_cpu_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C);
int db_cpu_silu_forward(db_ctx *c, float *out, const float *inp, size_t N);
int db_cpu_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind);
int db_cpu_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N);
int db_cpu_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C);
int db_cpu_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N);
int db_cpu_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N);
int db_cpu_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N);
int db_cpu_ddim_step_forward(db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise, size_t N,
                             const db_ddim_coef *k);
int db_cpu_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW);
int db_cpu_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2,
                                   int HW);
int db_cpu_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N);
int db_cpu_transpose_add_forward(db_ctx *c, float *out, const float *inp, const float *res, int B, int M, int N);
int db_cpu_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W);
int db_cpu_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D,
                                      int flip_sin_to_cos, float shift, float max_period);
int db_cpu_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B,
                             int T, int C, int V);

/* col (C*KH*KW, OH*OW) = the patches of x (C, H, W), zero padding: the
 * im2col of conv_backward.c, shared with the forward's small-image path. */
void db_cpu_im2col(db_ctx *c, float *col, const float *x, int C, int H, int W, int KH, int KW, int stride, int pad0,
                   int OH, int OW);
/* Row-major sgemm (dnnl_sgemm's arguments) over `batch` matrices spaced
 * sa, sb, sc floats apart, whose result does not depend on the thread
 * count: fixed output tiles, one single-threaded sgemm each
 * (gemm_backward.c). */
int db_cpu_sgemm_fixed(db_ctx *c, int batch, char transa, char transb, int M, int N, int K, float alpha,
                       const float *A, int lda, size_t sa, const float *B, int ldb, size_t sb, float beta, float *Cm,
                       int ldc, size_t sc);

/* backward (gemm_backward.c, conv_backward.c, norm_backward.c,
 * attention_backward.c, eltwise_backward.c) */
int db_cpu_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B, int batch,
                         int M, int N, int K, int transa, int transb, float alpha);
int db_cpu_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, int N, int C, int OC);
int db_cpu_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, int B, int C, int H, int W, int OC, int KH, int KW, int stride,
                           int pad0, int pad1);
/* add (NULL: none): dinp = add + the input gradient (add may be dinp) */
int db_cpu_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *bias, const float *add, int B, int C, int HW, int G, int silu);
/* add (NULL: none): dinp = add + the input gradient (add may be dinp) */
int db_cpu_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *add, int N, int C);
int db_cpu_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                              const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk,
                              int NH, int HS, int causal);
int db_cpu_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C);
int db_cpu_silu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N);
int db_cpu_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N, db_gelu_kind kind);
int db_cpu_quick_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N);
int db_cpu_geglu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C);
int db_cpu_mul_backward(db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b, size_t N);
int db_cpu_add_channel_backward(db_ctx *c, float *dvec, const float *dout, int B, int C, int HW);
int db_cpu_concat_channels_backward(db_ctx *c, float *da, float *db, const float *dout, int B, int C1, int C2,
                                    int HW);
int db_cpu_upsample_nearest2x_backward(db_ctx *c, float *dinp, const float *dout, int B, int C, int H, int W);
int db_cpu_embedding_backward(db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B,
                              int T, int C, int V);

/* ---- AVX-512 inner loops (avx512.c; call only when ctx->simd) ------------------ */

/* Activations over n elements; out may equal inp. */
void db_avx512_silu(float *out, const float *inp, size_t n);
void db_avx512_gelu_erf(float *out, const float *inp, size_t n);
void db_avx512_gelu_tanh(float *out, const float *inp, size_t n);
void db_avx512_quick_gelu(float *out, const float *inp, size_t n);
/* out[i] = hidden[i] * gelu_erf(gate[i]) */
void db_avx512_geglu(float *out, const float *hidden, const float *gate, size_t n);

/* Sum of x (n), and sum of (x - mean)^2, accumulated in fp32 lanes and
 * combined in double. */
double db_avx512_sum(const float *x, size_t n);
double db_avx512_sumsq_dev(const float *x, size_t n, float mean);
/* out = x * a + b, then SiLU when silu (group norm's per-channel apply). */
void db_avx512_scale_shift(float *out, const float *x, size_t n, float a, float b, int silu);
/* out = (x - mean) * rstd * w + b (layer norm's row apply). */
void db_avx512_norm_affine(float *out, const float *x, const float *w, const float *b, size_t n, float mean,
                           float rstd);
/* One row of softmax; out may equal x. */
void db_avx512_softmax_row(float *out, const float *x, size_t n);

/* Attention tile kernels (layouts in attention.c): DB_ATTN_QB queries per
 * tile, held in the SIMD lanes.
 * St (round8(nk), QB) = K @ Qt (HS, QB), K packed in groups of 8 keys (HS, 8). */
void db_avx512_attn_qk(float *St, const float *Kp, const float *Qt, int HS, int nk);
/* Online-softmax step over the score tile St (nk, QB), in place to
 * probabilities: updates the running max m and sum l (QB each) and writes
 * the factor corr (QB) the output accumulator must be scaled by.  causal:
 * key j0 + j is visible to query i0 + r only when j0 + j <= i0 + r. */
void db_avx512_attn_softmax(float *St, int nk, float *m, float *l, float *corr, int causal, int i0, int j0);
/* Ot (HS8, QB) = Ot * corr + V^T @ P, P (nk, QB); V packed in chunks of 8
 * head dims, each (keys, 8), chunk d/8 at Vp + (d/8) * ldv. */
void db_avx512_attn_pv(float *Ot, const float *corr, const float *P, const float *Vp, size_t ldv, int HS8, int nk);

/* ---- autocast emulation (autocast.c) ----------------------------------------------
 * What the dispatcher calls instead of the matmul-class db_cpu_* ops when
 * ctx->precision is not DB_PREC_F32 (the rule: kernels/ops.h above
 * db_precision).  Same signatures as the ops. */
/* x[i] = x[i] rounded to p and back (db_f32_to_bf16/_f16 then to f32); F32: nothing. */
void db_cpu_round_prec(float *x, size_t n, db_precision p);
/* dst[i] = src[i] rounded to p (a copy when F32); dst may equal src. */
void db_cpu_round_prec_copy(float *dst, const float *src, size_t n, db_precision p);
int db_cpu_ac_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                           int transa, int transb, float alpha, float beta);
int db_cpu_ac_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N,
                             int C, int OC);
int db_cpu_ac_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B,
                             int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1);
int db_cpu_ac_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v,
                                int B, int Tq, int Tk, int NH, int HS, int causal);
int db_cpu_ac_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B,
                            int batch, int M, int N, int K, int transa, int transb, float alpha);
int db_cpu_ac_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int C, int OC);
int db_cpu_ac_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int B, int C, int H, int W, int OC, int KH, int KW,
                              int stride, int pad0, int pad1);
int db_cpu_ac_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                                 const float *lse, const float *q, const float *k, const float *v, int B, int Tq,
                                 int Tk, int NH, int HS, int causal);

#endif
