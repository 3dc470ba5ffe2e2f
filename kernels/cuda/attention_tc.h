// Attention forward and backward on tensor cores for the bf16 / fp16
// precision modes (kernels/cuda/attention_tc.cu, attention_tc_backward.cu).
// Internal to libdb_cuda.so (C++ only): db_cuda_attention_forward and
// db_cuda_attention_backward dispatch here when c->precision is DB_PREC_BF16
// or DB_PREC_F16 and HS is a multiple of 8 up to 160.
#ifndef DB_CUDA_ATTENTION_TC_H
#define DB_CUDA_ATTENTION_TC_H

#include "kernels/cuda/cuda.h"

// out (B, Tq, NH*HS) fp32 and lse (B, NH, Tq) fp32 (natural log, as
// db_attention_forward; or NULL), from q (B, Tq, NH*HS) and k, v
// (B, Tk, NH*HS) device buffers already in the compute type: dtype 1 =
// DB_PREC_BF16 (__nv_bfloat16), 2 = DB_PREC_F16 (__half).  HS a multiple of
// 8 in 8..160, any Tq, Tk >= 1; causal: query i sees keys j <= i (top-left);
// q, k, v 16-byte aligned (read in 16-byte pieces).
// Softmax in fp32; the probabilities are rounded to the compute type for the
// P V product (the one intermediate this kernel rounds); out is rounded to
// the compute type (kept fp32) when round_out, as the 16-bit ops' outputs
// are: the mma.sync kernel rounds each value as it stores it, the WMMA one
// is followed by a rounding pass (same bits either way).  Deterministic (no
// atomics).
// Returns 0, or -1 with c->err set (DB_EUNSUPP for a dtype or HS outside
// the above).
extern "C" int db_cuda_attention_tc_forward(db_ctx *c, float *out, float *lse, const void *q, const void *k,
                                            const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS,
                                            int causal, int round_out);
// The same with round_out, and out's 16 bits stored as the mma.sync
// kernel stores out, handed over as out's activation twin (cuda.h) for the
// output projection next; the WMMA kernel (DB_ATTN_MMA=0) makes none.
int db_cuda_attention_tc_forward_twin(db_ctx *c, float *out, float *lse, const void *q, const void *k, const void *v,
                                      int dtype, int B, int Tq, int Tk, int NH, int HS, int causal);

// Whether the mma.sync kernels run (attention_mma.cu, and up to
// MMA_BWD_HS_MAX attention_mma_backward.cu): yes unless the environment has
// DB_ATTN_MMA=0, which selects the WMMA kernels for both directions.
// Read at each call (a switch for benchmarks and tests).
bool db_cuda_attn_mma(void);
// Whether the mma.sync kernels copy their streamed tiles in with cp.async
// while they compute on the previous one (attention_mma.cu,
// attention_mma_backward.cu): yes unless DB_ATTN_CPASYNC=0, which loads
// each tile, then uses it.  Read at each call.
bool db_cuda_attn_cpasync(void);
// Whether the mma.sync kernels take their tensor-core operands from shared
// memory by ldmatrix (kernels/cuda/mma.h ldsm4; attention_mma_common.h):
// yes unless DB_ATTN_LDSM=0, which loads them 32 and 16 bits a lane as
// before (2026-11-27: the same words, so the same bits).  Read at each call.
bool db_cuda_attn_ldsm(void);
// Row tiles of 16 queries a warp in the mma.sync forward (attention_mma.cu:
// 1): 0 (its choice) unless the environment has DB_ATTN_MR=1 or
// DB_ATTN_MR=2, which force that number (2 where the head size allows).
// Read at each call.
int db_cuda_attn_mr(void);

// The same forward through mma.sync with S and P in registers
// (attention_mma.cu; db_cuda_attention_tc_forward runs it, after checking
// the arguments, unless DB_ATTN_MMA=0 selects the WMMA kernel); rescale:
// the reference-max threshold in log2 units (attention_tc.cu's RESCALE_LOG2);
// rnd: out rounded to the compute type as it is stored, and then out16
// (NULL: none) given its 16 bits.
int db_cuda_attention_mma_forward(db_ctx *c, float *out, void *out16, float *lse, const void *q, const void *k,
                                  const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS, int causal,
                                  float rescale, int rnd);

// dq (B, Tq, NH*HS), dk, dv (B, Tk, NH*HS) fp32 (= assigned; any may be
// NULL), from dout, out, q (B, Tq, NH*HS) and k, v (B, Tk, NH*HS) device
// buffers already in the compute type (dtype as above) and the forward's lse
// (B, NH, Tq) fp32 (natural log).  HS a multiple of 8 in 8..160, Tk >= 1, any
// Tq; causal as the forward; q, k, v, dout 16-byte aligned.  D = dO . O, S,
// dP and the softmax in fp32; P and dS are rounded to the compute type where
// they are tensor-core operands (dS for dQ = dS K; P for dV = P^T dO, dS for
// dK = dS^T Q; dS as dS / scale, the 1 / sqrt(HS) applied to the fp32 dQ and
// dK); the outputs are fp32 sums, NOT rounded (the caller's job).
// Deterministic (two passes, no atomics).  Returns 0, or -1 with c->err set
// (DB_EUNSUPP for a dtype or HS outside the above).
// The backward's two passes through mma.sync with S, dP, P, dS in registers
// (attention_mma_backward.cu), for HS up to MMA_BWD_HS_MAX: the kernels
// only, called by db_cuda_attention_tc_backward (unless DB_ATTN_MMA=0) with
// its D = dO . O, scale = 1 / sqrt(HS), qscale = score_scale_log2(HS) and
// its split of the dK/dV pass (nsplit blocks in z, qtiles query tiles
// each, partial sums at dk, dv + z part).  dq or dk, dv may be NULL (that
// pass is not run).  rnd: every value written rounded to the compute type
// (kept fp32; the caller passes it for whole sums only, not partials).
// 0, or -1 with c->err set.
enum { MMA_BWD_HS_MAX = 80 };
int db_cuda_attention_mma_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *D, const void *dout,
                                   const float *lse, const void *q, const void *k, const void *v, int dtype, int B,
                                   int Tq, int Tk, int NH, int HS, int causal, float scale, float qscale, int qtiles,
                                   int nsplit, size_t part, int rnd);

// round_out: dq, dk, dv rounded to the compute type (kept fp32), as the
// 16-bit ops' outputs are, by the kernels that write them (the mma.sync
// passes, the split dK/dV's sum) or, after the WMMA ones, by a pass.
extern "C" int db_cuda_attention_tc_backward(db_ctx *c, float *dq, float *dk, float *dv, const void *dout,
                                             const void *out, const float *lse, const void *q, const void *k,
                                             const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS,
                                             int causal, int round_out);

#endif
