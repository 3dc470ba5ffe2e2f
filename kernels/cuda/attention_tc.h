// Attention forward on tensor cores for the bf16 / fp16 precision modes
// (kernels/cuda/attention_tc.cu).  Internal to libdb_cuda.so (C++ only); the
// op table does not reach it yet: db_cuda_attention_forward is to dispatch
// here when c->precision is DB_PREC_BF16 or DB_PREC_F16.
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
// P V product (the one intermediate this kernel rounds); out is NOT rounded
// to the compute type (the caller's job).  Deterministic (no atomics).
// Returns 0, or -1 with c->err set (DB_EUNSUPP for a dtype or HS outside
// the above).
extern "C" int db_cuda_attention_tc_forward(db_ctx *c, float *out, float *lse, const void *q, const void *k,
                                            const void *v, int dtype, int B, int Tq, int Tk, int NH, int HS,
                                            int causal);

#endif
