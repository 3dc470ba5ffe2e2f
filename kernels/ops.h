/* kernels/ops.h: the one op interface the models (CLIP text encoder, SD UNet,
 * VAE) call.  fp32.  Model code never calls oneDNN, BLAS, cuDNN or CUDA itself.
 *
 * DESIGN
 *
 * Context.  Every op takes a db_ctx * first.  The ctx names the device that
 * every pointer passed with it lives on, the thread count, and owns what the
 * backend needs between calls: on the CPU the oneDNN engine and stream, a
 * cache of oneDNN primitives keyed by shape (repeated calls re-create
 * nothing), and a scratch buffer that grows to the largest temporary an op
 * has needed.  A ctx is used by one thread at a time; the ops parallelise
 * internally (OpenMP in our loops, oneDNN's OpenMP runtime in its own).
 *
 * Argument order (karpathy/llm.c): outputs, saved-for-backward, inputs,
 * weights, sizes.  Backward ops mirror their forward with d-prefixed names:
 * activation gradients first, then parameter gradients, then dout, then what
 * the forward saved, inputs, weights, sizes.  Activation gradients are
 * assigned (=); parameter gradients accumulate (+=), so micro-batches add up
 * without a copy.  A NULL parameter-gradient pointer means "frozen: skip that
 * work" (the VAE, LoRA base weights); a NULL dinp means nobody needs it.
 * The backwards with parameter gradients take `assign` last: 1 makes
 * dweight and dbias = 0 + the contribution, without reading them: exactly
 * the bits of zeroing them and then +=, for a model whose backward makes
 * each parameter's one contribution into gradients reset for it (the
 * UNet's, unet.h): the reset (a write of every gradient) and the add's read
 * of it are saved.  0 is +=.  DB_ASSIGN_PACK16 (2, the 16-bit precisions
 * only) assigns as 1, except that the weight gradient of linear, linear
 * multi and conv2d is stored packed: its n values (each one the compute
 * type's, precision below) as n compute-type bit patterns in the first 2n
 * bytes of its n-float slot, the rest of the slot untouched.  A trainer
 * whose optimizer reads them so (db_grad_ref.prec16, db_adamw.g16) saves
 * the widening pass and half of every later read of those gradients.  The
 * norms' parameter gradients and every dbias stay float32 (2 is 1 there).
 *
 * Dispatch.  Each function below is a switch on ctx->device into a backend
 * with the identical signature (kernels/cpu/dispatch.c): db_cpu_* in
 * kernels/cpu/, or on CUDA the member of the same name in the table of the
 * dlopen'd libdb_cuda.so (kernels/cuda_api.h); a member the backend leaves
 * NULL is the error "<op>: not implemented on CUDA".
 *
 * Errors.  Every op returns 0 on success and -1 on failure, with the reason in
 * ctx->err (a db_err, libcommon/core/err.h).  The error is sticky: once set,
 * later ops return -1 at once without computing, so model code may check once
 * per block and report ctx->err.msg; db_ctx_clear_error() resets it.  Ops that
 * cannot fail on the CPU still return int, because their GPU twins can.
 *
 * Layout.  Tensors are dense, row-major, fp32.  Images are NCHW and conv
 * weights OIHW, as PyTorch and the checkpoints store them; token tensors are
 * (B, T, C) with the channel contiguous, as the linear projections produce
 * them.  oneDNN may use blocked layouts inside an op (cached reorders); none
 * escapes an op.
 *
 * Shape legend
 *   B   batch                      N   rows (B*T tokens, or any flat count)
 *   C   channels / features in     OC  channels / features out
 *   H W height, width (input)      OH OW  output height, width
 *   HW  H*W                        G   groups (group norm)
 *   T   tokens (Tq queries, Tk keys/values)
 *   NH  attention heads            HS  head size; C = NH*HS in attention
 *   KH KW  kernel height, width    V   vocabulary size
 *   D   embedding width            maxT  rows of a position table
 *
 * Backward ops (training issue): on the CPU in kernels/cpu/, each in the
 * file named after its forward's with _backward added.  Ops with several
 * gradient outputs (gemm, linear, conv2d, the norms, attention, mul, concat,
 * embedding) take NULL for any of them (not needed); single-output ops need
 * theirs.  Same inputs give bit-identical gradients at any thread count
 * (the sgemm-based ones through fixed output tiles: gemm_backward.c).
 */
#ifndef DB_OPS_H
#define DB_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "libcommon/core/err.h"
#include "libcommon/core/tensor.h" /* db_device: DB_CPU, DB_CUDA */

typedef struct db_cpu db_cpu; /* CPU backend state, kernels/cpu/cpu.h */

/* Compute precision of the matmul-class ops ("autocast"; db-* --precision).
 *
 * DB_PREC_F32 (the default): everything in float32 as documented per op.
 * DB_PREC_BF16 / DB_PREC_F16: the matmul-class ops -- gemm, linear, conv2d
 * and attention, forward and backward -- behave as if their operands were
 * stored in the compute type, as torch.autocast runs them:
 *   - every floating input (activations, weights, bias, dout, and the
 *     forward's saved out for attention's backward) is first rounded to the
 *     compute type (round to nearest even; fp16 overflows to +-inf, so an
 *     overflow shows up as a non-finite result);
 *   - products and sums are float32 (exact products of compute-type values,
 *     float32 accumulation; attention's softmax, its scale and lse float32);
 *   - every output -- out, dinp, dA, dB, dq, dk, dv, and each parameter
 *     gradient's contribution (dweight, dbias) BEFORE it is added (+=) to
 *     the float32 gradient buffer -- is rounded to the compute type and
 *     stored as a float32 holding that value.  lse stays float32.
 * Attention is the one op that rounds intermediates, on CUDA with HS a
 * multiple of 8 (tensor cores), as flash-attention kernels do; the CPU keeps
 * them fp32.  Forward: the scores and the softmax (max, exp, sums, lse) are
 * fp32 from the compute-type q and k, and the probabilities P are rounded to
 * the compute type for P V (fp32 accumulate).  Backward: D = dO . O, the
 * recomputed scores, P, dP and dS are fp32 from the compute-type inputs; P
 * and dS / scale are rounded to the compute type as the operands of
 * dV = P^T dO, dQ = dS K and dK = dS^T Q (fp32 accumulation; the 1/sqrt(HS)
 * applied to the fp32 sums afterwards, as FlashAttention-2 does, which keeps
 * small fp16 dS out of the subnormals).  Measured against the rounded CPU
 * reference (emulator): forward ~1.5e-3 rel L2 in bf16; backward <= 3.4e-3
 * (bf16), <= 3.8e-4 (fp16).
 * Buffers stay float32 (only values change), so model code is unchanged; the
 * other ops (norms, softmax, activations, elementwise, embeddings, the
 * optimizer, the loss) run in float32 on those values in every mode, and
 * weights, gradients and optimizer moments are float32 masters.
 * The CPU emulates the compute types (same rounding, float32 kernels; no
 * speed-up, it exists as the reference); CUDA runs them on tensor cores
 * (bf16/fp16 operands, float32 accumulate).  The two agree up to float32
 * summation order, which can flip an output's last compute-type bit. */
typedef enum db_precision { DB_PREC_F32 = 0, DB_PREC_BF16 = 1, DB_PREC_F16 = 2 } db_precision;

typedef struct db_ctx {
    db_device device; /* where every pointer handed to an op lives */
    db_precision precision; /* compute precision of the matmul-class ops (DB_PREC_F32) */
    int threads;      /* worker threads the ops use */
    int simd;         /* CPU: 1 = use the AVX-512 kernels (set at create when the
                         CPU has them; a test may clear it to check the portable path) */
    db_err err;       /* first failure; sticky until db_ctx_clear_error */
    db_cpu *cpu;      /* oneDNN engine + stream, primitive cache, scratch */
    /* CUDA (device DB_CUDA): the backend's table (kernels/cuda_api.h, from the
     * dlopen'd libdb_cuda.so) and its per-ctx state (handles, stream,
     * caching allocator), owned by the backend; NULL on the CPU. */
    const struct db_cuda_api *cuda_api;
    void *cuda;
    void *cuda_lib;   /* dlopen handle */
    int cuda_device;  /* N of cuda:N */
    /* DB_CPU_STRICT: its buffers (mmap'd, PROT_NONE outside the ops) and
     * how deep in an op the ctx is; NULL / 0 otherwise */
    struct db_strict *strict;
    int strict_depth;
    /* every op the dispatcher runs on this ctx counts one (the CUDA
     * backend's 16-bit activation twins live from one op to the next) */
    unsigned long op_seq;
} db_ctx;

/* Create a context for `device` with `threads` workers (0 = every online core).
 * On the CPU this calls omp_set_num_threads(threads): the OpenMP thread count
 * is process-global, so it also governs oneDNN (OpenMP runtime) and any other
 * OpenMP code the caller's thread runs; the last ctx created wins.
 * Returns 0, or -1 with err filled (e.g. DB_EUNSUPP for a device not built). */
int db_ctx_create(db_ctx **out, db_device device, int threads, db_err *err);
/* The same for a device named as the tools spell it: "cpu", "cuda" (= cuda:0)
 * or "cuda:N".  A CUDA ctx dlopens the backend next to the executable
 * (../lib/libdb_cuda.so, as --version finds it), checks its ABI and binds
 * GPU N; a missing library, GPU or ABI match is DB_EUNSUPP with the reason. */
int db_ctx_create_device(db_ctx **out, const char *device, int threads, db_err *err);
/* The device a name means (the names db_ctx_create_device takes, NULL
 * being "cpu"): *dev and *index (0 but for cuda:N), and 0; -1 for a name
 * that is none of them (nothing set).  The tools check --device with it
 * (db_device_check) before they load anything. */
int db_device_parse(const char *device, db_device *dev, int *index);
/* "cpu-strict" (DB_CPU_STRICT), for tests: the CPU ops, but with a GPU's
 * discipline.  Every db_ctx_alloc buffer is its own mapping that no one may
 * read or write except an op or db_ctx_copy/zero of this ctx (mprotect
 * PROT_NONE between them), and model code treats the ctx as a device (it
 * stages through host buffers as it does for CUDA).  So host code that
 * touches device memory directly, or a copy in the wrong direction, crashes
 * at once, here, as it would on a GPU, where it would be lent minutes to
 * find it.  Slow (two mprotect per buffer per op); the numbers are the CPU's. */
void db_ctx_destroy(db_ctx *c);
/* Set the compute precision (above) for the ops called after it. */
void db_ctx_set_precision(db_ctx *c, db_precision p);
/* "fp32", "bf16", "fp16"; and the parser the tools use, which also takes
 * "f32", "float32", "no" (diffusers' --mixed_precision=no), "f16",
 * "float16", "bfloat16": the precision, or -1 when unknown. */
const char *db_precision_name(db_precision p);
int db_precision_parse(const char *s);

/* p (n floats of c's device) holds model weights that ops read as
 * operands.  In a 16-bit mode the CUDA backend then keeps one 16-bit working
 * copy of the whole buffer instead of converting a weight at every op, and
 * db_opt_adamw writes it in the same pass as the fp32 update; any other
 * write into the buffer (db_ctx_copy, db_ctx_zero) makes it rebuild, and
 * db_ctx_free of p drops it.  Results are the same with or without; the CPU
 * ignores it.  0, or -1 with c->err. */
int db_ctx_declare_weights(db_ctx *c, const float *p, size_t n);

/* Device memory of a ctx, in bytes: in_use by live buffers, peak of in_use
 * since the ctx was created or db_ctx_mem_reset_peak, reserved from the
 * driver (in use + cached); copies_built: how many times a declared
 * buffer's 16-bit working copy was converted whole from its weights (first
 * use, or after a write that made it stale), since the ctx was created: a
 * pass over every weight, so it should not grow inside a training step.
 * device_free, device_total: the device's memory as its driver reports it
 * now (free to any process; reserved counts as used), for a tool's check
 * against its plan before it loads a model (0 when not known).
 * CUDA only: on the CPU all zero and tracked 0. */
typedef struct db_mem_stats {
    int tracked;
    size_t in_use, peak, reserved;
    size_t copies_built;
    size_t device_free, device_total;
    size_t twins_made, twins_used; /* CUDA: 16-bit activation twins made, and taken by the next op */
} db_mem_stats;
void db_ctx_mem_stats(db_ctx *c, db_mem_stats *s);
void db_ctx_mem_reset_peak(db_ctx *c);
void db_ctx_clear_error(db_ctx *c);
/* Release the scratch buffer and cached primitives (they come back on demand);
 * for a tool between phases, e.g. after the UNet loop and before VAE decode. */
void db_ctx_trim(db_ctx *c);

/* ---- memory of the ctx's device ------------------------------------------------
 * Every buffer an op reads or writes comes from db_ctx_alloc (model code never
 * mallocs one), so the same model code runs wherever its ctx lives.  On the
 * CPU these are aligned_alloc/free/memcpy/memset (so a CPU ctx's buffers are
 * ordinary host memory); on CUDA the backend's caching allocator and its
 * stream (copies and zeroing are ordered with the ops; D2H waits).
 * Failures return NULL / -1 with the reason in c->err (sticky, like an op). */

/* Copy directions: host memory is the caller's (malloc, stack), device
 * memory came from db_ctx_alloc. */
typedef enum db_copy_kind { DB_COPY_H2D = 0, DB_COPY_D2H, DB_COPY_D2D } db_copy_kind;

/* bytes of device memory, 64-byte aligned (CUDA: 256); 0 bytes gives a
 * valid pointer to free. */
void *db_ctx_alloc(db_ctx *c, size_t bytes);
void db_ctx_free(db_ctx *c, void *p); /* p NULL: nothing */
/* dst == src (a CPU staging buffer that is the device buffer itself) copies
 * nothing. */
int db_ctx_copy(db_ctx *c, void *dst, const void *src, size_t bytes, db_copy_kind kind);
int db_ctx_zero(db_ctx *c, void *p, size_t bytes);
/* Wait until every op queued on c has finished; reports asynchronous errors. */
int db_ctx_sync(db_ctx *c);
/* A mark in c's queue and a wait for it: db_ctx_fence_wait(c, f) returns
 * once every op queued before the db_ctx_fence call that returned f has
 * finished, so that a host loop can keep the device a step ahead of it
 * (txt2img.c's sampler: it queues step i + 1, then waits for step i).
 * CUDA: an event recorded on the ctx's stream, from a ring of
 * DB_CTX_FENCES; waiting for a fence older than that many waits for a
 * later one instead (so for at least as much).  The CPU: ops finish as
 * they are called, so both do nothing (0).  db_ctx_fence returns 0 with
 * c->err set on failure (during a graph capture too); 0 waits for nothing. */
enum { DB_CTX_FENCES = 4 };
uint64_t db_ctx_fence(db_ctx *c);
int db_ctx_fence_wait(db_ctx *c, uint64_t f);
/* Host memory that device-to-host copies of c fill fastest: on CUDA,
 * page-locked (pinned) memory, which the copy engine writes directly (a
 * copy into pageable memory goes through the driver's staging buffers and
 * page faults: ~1.5 GB/s measured on an H200 against the bus's tens).
 * NULL where the device has none to give (the CPU devices) or the driver
 * refuses; c's error is left alone either way, so callers fall back to
 * malloc.  Callable from any thread (pinning gigabytes takes seconds: a
 * caller may do it in the background).  Free with db_ctx_host_free. */
void *db_ctx_host_alloc(db_ctx *c, size_t bytes); /* c NULL (host buffers): NULL */
void db_ctx_host_free(db_ctx *c, void *p); /* p NULL: nothing */

/* ---- graphs: a piece of device work recorded once and replayed -------------
 * A sampling loop runs the same UNet call on the same buffers at every step;
 * on a GPU most of a step's host time goes into launching its ~1000 kernels
 * one by one.  db_graph_capture records the device work of fn(arg, err) on c
 * without running it, and db_graph_launch queues the whole of it at once:
 *   CUDA: a CUDA graph (stream capture).  The blocks fn allocates come from
 *         a pool the graph owns until db_graph_free (its replays write into
 *         them), so memory grows by what fn uses at its peak.
 *   CPU:  nothing is recorded; db_graph_launch calls fn(arg, err) again (the
 *         ops run as they are called, so there is nothing to save), which
 *         keeps one code path for callers and tests it on every device.
 * Either way a replay computes in the compute precision of the capture, not
 * the ctx's at the launch.
 * fn must be replayable: every buffer it reads or writes outside its own
 * temporaries stays at the same address with the inputs refreshed in place
 * before each launch (db_ctx_copy H2D into them), it copies nothing between
 * host and device and never waits (db_ctx_sync, D2H copies, host reads of
 * results), it frees what it allocates, and what it captures must not
 * depend on host values that change between launches (scalars are baked in).
 * Call fn once directly first (a warm-up): state built lazily at an op's
 * first call (cuDNN plans and their search, 16-bit weight copies) must exist
 * before the capture, or the capture fails.  Weights fn reads must not change
 * while the graph lives.
 * The graph keeps its own copy of arg's arg_size bytes, taken at the capture,
 * and fn always gets that copy: values the caller changes in its arg later
 * do not reach the replays on any device, as a CUDA graph keeps the
 * arguments its kernels were launched with (a change of shape needs a new
 * graph).  Pointers in arg are copied as pointers.
 * Returns 0 with *g set; 1 when the device could not capture this work (the
 * reason in err, c left without an error: the caller runs fn directly
 * instead); -1 when c had already failed.  Graphs are freed before their
 * ctx. */
typedef struct db_graph db_graph;
typedef int (*db_graph_fn)(void *arg, db_err *err);
int db_graph_capture(db_ctx *c, db_graph **g, db_graph_fn fn, const void *arg, size_t arg_size, db_err *err);
/* Queue one replay (CUDA: no wait; CPU: fn runs now).  0; 1 when the
 * graph no longer fits the device's state (CUDA: a convolution filter was
 * first used on declared weights since the capture, which changes their
 * working copy's layout): nothing was queued, err says why, c has no error,
 * and the caller frees the graph and runs fn directly (then may capture
 * again); or -1 with err. */
int db_graph_launch(db_graph *g, db_err *err);
void db_graph_free(db_graph *g); /* NULL: nothing */

/* ---- GEMM and linear ------------------------------------------------------ */

/* Row-major batched GEMM: for each of `batch` matrices,
 *   Cm = alpha * op(A) @ op(B) + beta * Cm
 * Cm (batch, M, N); A (batch, M, K), or (batch, K, M) when transa;
 * B (batch, K, N), or (batch, N, K) when transb.  Matrices are contiguous and
 * packed back to back.  beta == 0 ignores Cm's old contents (NaN included). */
int db_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                    int transa, int transb, float alpha, float beta);

/* nn.Linear: out = inp @ weight^T + bias.
 * out (N, OC); inp (N, C); weight (OC, C) as checkpoints store it;
 * bias (OC) or NULL. */
int db_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C,
                      int OC);
/* The same plus a residual: out = linear(inp) + res, exactly
 * db_linear_forward then db_add_forward (the same bits in every precision:
 * the residual joins after the linear's output rounding), with the bias,
 * rounding and residual in one pass over out (the transformer's attention
 * and feed-forward outputs).  res (N, OC) must not overlap out; NULL: none. */
int db_linear_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                          const float *res, int N, int C, int OC);
/* The feed-forward's projection and GEGLU at once: proj (N, 2FF) =
 * linear(inp) with weight (2FF, C), then out (N, FF) = geglu(proj), exactly
 * db_linear_forward then db_geglu_forward (the same bits in every
 * precision), with the GEGLU made in the linear's own pass over proj, which
 * is then not read a second time.  proj is kept (the backward reads it);
 * proj NULL (inference: nothing will read it): out alone is written, the
 * same bits (on CUDA in 16-bit precision the projection then never reaches
 * memory in float32; elsewhere it goes through scratch).  out must not
 * overlap proj or inp. */
int db_linear_geglu_forward(db_ctx *c, float *proj, float *out, const float *inp, const float *weight,
                            const float *bias, int N, int C, int FF);
/* Several linears of one input (an attention's q, k and v projections):
 * out[i] = linear(inp, weight[i], bias[i]) for i < n, exactly n
 * db_linear_forward calls (the same bits in every precision), with inp read
 * once -- on CUDA its 16-bit copy made once instead of n times.  out[i]
 * (N, OC) each, apart from each other and from inp; weight[i] (OC, C);
 * bias[i] or bias NULL: none.  The arrays are host memory; 1 <= n <=
 * DB_LINEAR_MULTI_MAX. */
enum { DB_LINEAR_MULTI_MAX = 4 };
int db_linear_multi_forward(db_ctx *c, float *const *out, const float *inp, const float *const *weight,
                            const float *const *bias, int n, int N, int C, int OC);
/* n linears of one input, each of its own width: out[i] (N, OC[i]) =
 * db_linear_forward(inp, weight[i] (OC[i], C), bias[i]) -- a UNet's
 * ResBlock time-embedding projections, all of them from one silu(temb).
 * The CPU makes the n linears (its bits); on CUDA a few rows (N <= 8) take
 * one launch for all n -- the linear's contract (in 16-bit precision the
 * rounded operands, float32 sums, the rounded bias, one rounding) with its
 * float32 sums in an order of their own -- where n linears were 3n
 * launches of a few microseconds each.  out[i] apart from each other and
 * from inp; bias NULL or bias[i] NULL: none.  The arrays are host memory;
 * 1 <= n <= DB_LINEAR_FAN_MAX. */
enum { DB_LINEAR_FAN_MAX = 64 };
int db_linear_fan_forward(db_ctx *c, float *const *out, const float *inp, const float *const *weight,
                          const float *const *bias, const int *OC, int n, int N, int C);

/* ---- convolution ------------------------------------------------------------ */

/* nn.Conv2d (dilation 1, groups 1) through oneDNN.
 * out (B, OC, OH, OW); inp (B, C, H, W); weight (OC, C, KH, KW); bias (OC) or NULL.
 * pad0 pads top and left, pad1 bottom and right: symmetric `padding=p` is
 * pad0 = pad1 = p; the VAE's downsampler (F.pad(x, (0,1,0,1)) then a padding-0
 * conv) is pad0 = 0, pad1 = 1.
 * OH = (H + pad0 + pad1 - KH) / stride + 1, OW likewise. */
int db_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C,
                      int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1);
/* The same plus an addend: out = conv2d(inp) + add, exactly db_conv2d_forward
 * then db_add_forward(out, out, add) -- add (B, OC, OH, OW) -- or, with
 * per_channel, db_add_channel_forward(out, out, add, ...) -- add (B, OC),
 * each sample's vector over its planes (a ResBlock's time embedding): the
 * same bits in every precision (the addend joins after the convolution's
 * output rounding).  On CUDA in 16-bit precision the addend is added in the
 * pass that widens the convolution's output (no pass of its own).  The full
 * addend may be out itself (out += conv2d(inp): a ResBlock's second
 * convolution onto its shortcut); otherwise add must not overlap out. */
int db_conv2d_add_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                          const float *add, int per_channel, int B, int C, int H, int W, int OC, int KH, int KW,
                          int stride, int pad0, int pad1);

/* ---- normalisation ---------------------------------------------------------- */

/* nn.GroupNorm, optionally followed by SiLU in the same pass (ResBlocks).
 * out (B, C, HW); mean, rstd (B, G) saved for backward, or NULL;
 * inp (B, C, HW); weight, bias (C); C % G == 0.  Variance is biased (/n).
 * out may equal inp. */
int db_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int B, int C, int HW, int G, float eps, int silu);

/* nn.LayerNorm over the last dim.
 * out (N, C); mean, rstd (N) or NULL; inp (N, C); weight, bias (C).
 * out may equal inp. */
int db_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int N, int C, float eps);

/* ---- attention -------------------------------------------------------------- */

/* Scaled dot-product attention, softmax(q k^T / sqrt(HS)) v, per head.
 * out (B, Tq, NH*HS); lse (B, NH, Tq) the natural-log sum of exp of each
 * query's scaled scores, saved for backward, or NULL;
 * q (B, Tq, NH*HS); k, v (B, Tk, NH*HS): the layout the q/k/v projections
 * produce (head h is columns h*HS .. h*HS+HS-1).  Self-attention: Tk == Tq;
 * cross-attention: k, v from the text context (Tk = 77).
 * causal: query i sees keys j <= i (CLIP's mask; top-left aligned).
 * Flash-style: tiles over query blocks with an online softmax, so no full
 * (Tq, Tk) score matrix is ever stored. */
int db_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B,
                         int Tq, int Tk, int NH, int HS, int causal);
/* Self-attention's projections and the attention in one op: q, k, v (B, T,
 * C) = x (B, T, C) times wq, wk, wv (C, C) transposed (no bias), then out
 * (B, T, C) and lse as db_attention_forward(q, k, v, B, T, T, NH, C / NH,
 * causal): exactly db_linear_multi_forward then db_attention_forward, in
 * every precision.  q, k, v: all three given (kept for a backward), or all
 * NULL (inference).  On CUDA in 16-bit precision, where the attention runs
 * on tensor cores (C / NH a multiple of 8, at most 160), the projections'
 * 16-bit products are the attention's operands as they are: the
 * attention's conversion pass is saved, and the widening into q, k, v too
 * when they are NULL. */
int db_attention_qkv_forward(db_ctx *c, float *q, float *k, float *v, float *out, float *lse, const float *x,
                             const float *wq, const float *wk, const float *wv, int B, int T, int C, int NH,
                             int causal);

/* Row softmax.  out (N, C); inp (N, C); out may equal inp. */
int db_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C);

/* ---- activations (elementwise over N elements; out may equal inp) ---------- */

typedef enum db_gelu_kind {
    DB_GELU_ERF = 0, /* 0.5 x (1 + erf(x / sqrt 2)): nn.GELU(), F.gelu (UNet GEGLU) */
    DB_GELU_TANH = 1 /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): approximate="tanh" */
} db_gelu_kind;

int db_silu_forward(db_ctx *c, float *out, const float *inp, size_t N);
int db_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind);
/* x * sigmoid(1.702 x): CLIP's "quick_gelu". */
int db_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N);
/* diffusers GEGLU after its projection: hidden, gate = inp.chunk(2, -1);
 * out = hidden * gelu_erf(gate).  out (N, C); inp (N, 2C); no overlap. */
int db_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C);

/* ---- elementwise arithmetic and layout ------------------------------------- */
/* (add, mul, axpby and add_channel may write in place: out == an input;
 * concat, transpose and upsample need out apart from their inputs.) */

/* out = a + b; out, a, b (N). */
int db_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N);
/* out = a * b; out, a, b (N). */
int db_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N);
/* out = alpha * x + beta * y; out, x, y (N).  y may be NULL when beta == 0
 * (a scale).  Classifier-free guidance, scheduler updates. */
int db_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N);
/* One DDIM step (diffusers' DDIMScheduler.step, libcommon/sd/sched.c, for
 * one timestep whose scalars db_sched_ddim_coef makes): x (N) is replaced
 * by the sample after the step, given the model output mo (N); noise (N)
 * standard normals when k->noise_on, else ignored (may be NULL); pred_x0
 * (N) the predicted clean sample, or NULL.  The float operations of
 * sched.c's host loop in its order (kernels/ddim_step.h, shared with it),
 * so the same bits on every device: the sampler keeps its latents on the
 * device with it (txt2img.c).  mo, noise and pred_x0 must not overlap x;
 * k is host memory on every device. */
typedef struct db_ddim_coef {
    float sa, sb;    /* sqrt(alpha_prod_t), sqrt(1 - alpha_prod_t) */
    float sap, dirc; /* sqrt(alpha_prod_t_prev), sqrt(1 - alpha_prod_t_prev - std^2) */
    float std;       /* eta sqrt(variance): the noise's factor */
    float cr;        /* clip_sample_range (used when clip_on) */
    int pred;        /* what mo predicts: 0 epsilon, 1 v, 2 the sample (sched.h db_pred) */
    int clip_on;     /* clip the predicted x0 to [-cr, cr] */
    int noise_on;    /* eta > 0: add std * noise */
} db_ddim_coef;
int db_ddim_step_forward(db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise, size_t N,
                         const db_ddim_coef *k);
/* out = inp + vec broadcast over HW: a ResBlock adding its time embedding.
 * out, inp (B, C, HW); vec (B, C). */
int db_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW);
/* torch.cat([a, b], dim=1).  out (B, C1+C2, HW); a (B, C1, HW); b (B, C2, HW). */
int db_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2, int HW);
/* Batched 2-D transpose, e.g. (B, C, HW) <-> (B, HW, C) around a transformer.
 * out (B, N, M); inp (B, M, N).  out must not overlap inp. */
int db_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N);
/* The same plus a residual in the same pass: out = transpose(inp) + res,
 * res (B, N, M) (the Transformer2D's output back to (B, C, HW) plus its
 * input); exactly db_transpose_forward then db_add_forward.  res must not
 * overlap out. */
int db_transpose_add_forward(db_ctx *c, float *out, const float *inp, const float *res, int B, int M, int N);
/* F.interpolate(scale_factor=2, mode="nearest").  out (B, C, 2H, 2W); inp (B, C, H, W). */
int db_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W);

/* ---- embeddings --------------------------------------------------------------- */

/* diffusers get_timestep_embedding, in float32 exactly as it computes:
 *   half = D/2; exponent[i] = -log(max_period) * i / (half - shift)
 *   freq = exp(exponent); arg[b, i] = t[b] * freq[i]
 *   out = [sin(arg), cos(arg)], or [cos(arg), sin(arg)] when flip_sin_to_cos;
 *   an odd D gets a zero last column.
 * out (B, D); timesteps (B) (float: schedulers may give fractional steps).
 * SD1.x: flip_sin_to_cos 1, shift (downscale_freq_shift) 0, max_period 10000. */
int db_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D, int flip_sin_to_cos,
                                  float shift, float max_period);

/* CLIP embeddings: out[b, t] = wte[tokens[b, t]] + wpe[t].
 * out (B, T, C); tokens (B, T) (each in [0, V): an id outside is an error);
 * wte (V, C); wpe (maxT, C) with T <= maxT, or NULL for no position term. */
int db_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B,
                         int T, int C, int V);

/* ---- backward --------------------------------------------------------------------- */

/* dA (batch, M, K) or its transpose, dB likewise, in A's and B's stored layouts;
 * both assigned (=): A and B are activations (weights go through linear);
 * either may be NULL. */
int db_gemm_backward(db_ctx *c, float *dA, float *dB, const float *dCm, const float *A, const float *B, int batch,
                     int M, int N, int K, int transa, int transb, float alpha);
/* assign: 0, 1 or DB_ASSIGN_PACK16 (above) */
enum { DB_ASSIGN_PACK16 = 2 };
/* dinp (N, C) =; dweight (OC, C), dbias (OC) += (= when assign); dout (N, OC). */
int db_linear_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                       const float *weight, int N, int C, int OC, int assign);
/* db_linear_multi_forward's backward: d_i = the dinp of
 * db_linear_backward(dout[i], weight[i]), and dinp (N, C) = d_0 + d_1 + ...
 * summed in float32 in order i = 0, 1, .. (dinp = d_0, or dinp + d_0 when
 * accumulate; then dinp = dinp + d_i): exactly n db_linear_backward calls
 * and n - 1 (n when accumulate) db_add_forward ones, without the d_i in
 * memory.  dweight[i] (OC, C), dbias[i] (OC) += (= when assign) as
 * db_linear_backward (the arrays or entries may be NULL); dinp may be NULL.
 * dout[i] (N, OC). */
int db_linear_multi_backward(db_ctx *c, float *dinp, float *const *dweight, float *const *dbias,
                             const float *const *dout, const float *inp, const float *const *weight, int n, int N,
                             int C, int OC, int accumulate, int assign);
/* dinp (B, C, H, W) =; dweight (OC, C, KH, KW), dbias (OC) += (= when
 * assign); dout (B, OC, OH, OW). */
int db_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                       const float *weight, int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0,
                       int pad1, int assign);
/* dinp (B, C, HW) =; dweight, dbias (C) += (= when assign); mean, rstd (B, G)
 * from the forward; bias is needed to recompute the pre-SiLU value when silu
 * is set. */
int db_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean,
                          const float *rstd, const float *inp, const float *weight, const float *bias, int B, int C,
                          int HW, int G, int silu, int assign);
/* The same with a residual's gradient joined: dinp = add + the group
 * norm's input gradient, exactly db_groupnorm_backward then
 * db_add_forward(dinp, add, dinp) in every precision (a ResBlock's dinp =
 * its shortcut's gradient + norm1's backward).  add (B, C, HW) may be dinp
 * itself, else must not overlap it; dinp is required. */
int db_groupnorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *bias, const float *add, int B, int C, int HW, int G, int silu,
                              int assign);
/* dinp (N, C) =; dweight, dbias (C) += (= when assign); mean, rstd (N). */
int db_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *mean,
                          const float *rstd, const float *inp, const float *weight, int N, int C, int assign);
/* The same with the residual's gradient joined: dinp = add + the layer
 * norm's input gradient, exactly db_layernorm_backward then
 * db_add_forward(dinp, add, dinp) in every precision (a pre-norm block's
 * dx = dout + norm backward, without the pass or the scratch between).  add
 * (N, C) may be dinp itself, else must not overlap it; dinp is required. */
int db_layernorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *mean, const float *rstd, const float *inp, const float *weight,
                              const float *add, int N, int C, int assign);
/* dq (B, Tq, NH*HS), dk, dv (B, Tk, NH*HS) =; out and lse from the forward. */
int db_attention_backward(db_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *out,
                          const float *lse, const float *q, const float *k, const float *v, int B, int Tq, int Tk,
                          int NH, int HS, int causal);
/* dinp (N, C) =; out (N, C) from the forward. */
int db_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C);
int db_silu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N);
int db_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N, db_gelu_kind kind);
int db_quick_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N);
/* dinp (N, 2C) =; dout (N, C). */
int db_geglu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C);
/* da = dout * b, db = dout * a; either may be NULL. */
int db_mul_backward(db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b, size_t N);
/* dvec (B, C) = sum over HW of dout (the input's gradient is dout itself). */
int db_add_channel_backward(db_ctx *c, float *dvec, const float *dout, int B, int C, int HW);
/* Splits dout (B, C1+C2, HW) into da (B, C1, HW) and db (B, C2, HW); either may be NULL. */
int db_concat_channels_backward(db_ctx *c, float *da, float *db, const float *dout, int B, int C1, int C2, int HW);
/* dinp (B, C, H, W) = sum of each 2x2 block of dout (B, C, 2H, 2W). */
int db_upsample_nearest2x_backward(db_ctx *c, float *dinp, const float *dout, int B, int C, int H, int W);
/* dwte (V, C) +=, dwpe (maxT, C) += (either may be NULL); dout (B, T, C). */
int db_embedding_backward(db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B, int T,
                          int C, int V);
/* (add, axpby and transpose are their own backward; the timestep embedding has
 * no parameters and no input gradient.) */

/* ---- optimizer ------------------------------------------------------------------
 * The trainer's steps over whole parameter / gradient buffers, kept on the
 * device (they touch every weight each step).  Not db_NAME_forward ops, so
 * they are explicit members of kernels/cuda_api.h's table (ABI 2: opt_adamw,
 * opt_sumsq, opt_scale) rather than DB_OP_LIST entries.  The CPU runs
 * libcommon/sd/optim.c's math; the CUDA kernels (kernels/cuda/optim.cu)
 * reproduce it bit for bit. */

struct db_adamw; /* libcommon/sd/optim.h */

/* db_adamw_step over n elements: p, m, v updated in place from g; t is the
 * 1-based step count after this step.  hp's g16 runs (optim.h) name the
 * tensors of g stored packed (DB_ASSIGN_PACK16), read as such. */
int db_opt_adamw(db_ctx *c, float *p, float *m, float *v, const float *g, size_t n, const struct db_adamw *hp,
                 int64_t t);
/* *out (host) = sum of g[i]^2 in double, in db_clip_grad_norm's fixed
 * chunked order (the same for any thread count). */
int db_opt_sumsq(db_ctx *c, double *out, const float *g, size_t n);
/* out[i] (host) = db_opt_sumsq of g[i] (n[i] floats) for i < k: the same
 * bits, with one wait for the device instead of k (the clip's norms of
 * hundreds of tensors).  g and n are host arrays of the k tensors; prec16
 * (host, or NULL: all float32) says which are packed (DB_ASSIGN_PACK16:
 * DB_PREC_BF16 / DB_PREC_F16, their n[i] values as 16-bit bits at g[i]),
 * summed as their float32 values would be. */
int db_opt_sumsq_many(db_ctx *c, double *out, const float *const *g, const size_t *n, const int *prec16, size_t k);
/* g[i] = g[i] * coef (the clip; a NaN coef poisons every element, as torch). */
int db_opt_scale(db_ctx *c, float *g, float coef, size_t n);
/* Each of k tensors clipped by its own norm (torch's clip_grad_norm_ on one
 * tensor, kohya's rule for a fused backward) with no wait for the device:
 * g[i] (n[i] floats; g and n host arrays) has norm nk = (float)sqrt(its
 * db_opt_sumsq), norms[i] (k floats in c's memory, read back whenever the
 * caller likes) = nk, and g[i] *= max_norm / (nk + 1e-6f) (float32) when
 * that is below 1 or NaN.  The bits of libcommon/sd/optim.h
 * db_clip_grad_norm_each_ctx, which waits for the norms instead. */
int db_opt_clip_each(db_ctx *c, float *norms, float *const *g, const size_t *n, size_t k, float max_norm);
/* db_adamw8bit_step over n elements (8-bit AdamW, bitsandbytes' block-wise
 * states): p updated in place from g; m_q, v_q (n codes) and m_absmax,
 * v_absmax (ceil(n / DB_Q8_BLOCK) scales) are the quantised moments, zero
 * at the start; maps (HOST memory, from db_q8_maps_make) the code books.
 * Explicit member opt_adamw8bit of the CUDA table. */
struct db_q8_maps; /* libcommon/sd/optim.h */
int db_opt_adamw8bit(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                     const float *g, size_t n, const struct db_adamw *hp, int64_t t, const struct db_q8_maps *maps);
/* One tensor of db_opt_adamw8bit_many: its weights p, gradient g (n
 * elements, device), and either 8-bit moments (q8 1: m_q, v_q, m_absmax,
 * v_absmax as db_opt_adamw8bit) or float32 ones (q8 0: m32, v32, as
 * db_opt_adamw; bitsandbytes keeps small tensors' moments in fp32). */
typedef struct db_q8_job {
    float *p;
    const float *g;
    size_t n;
    int q8;
    uint8_t *m_q, *v_q;
    float *m_absmax, *v_absmax;
    float *m32, *v32;
    int prec16; /* 0: g is n floats; DB_PREC_BF16 / DB_PREC_F16: packed (DB_ASSIGN_PACK16) */
} db_q8_job;
/* Every job's step, each bit-identical to its db_opt_adamw8bit or
 * db_opt_adamw call, in one launch on CUDA instead of one per tensor (an
 * 8-bit SD1.5 step: ~700).  jobs is a HOST array (of device pointers); a
 * job's packed gradient (prec16) is read as such, the same bits.  A
 * fp32 job does not write the weights' 16-bit working copy as db_opt_adamw
 * does: the copy goes stale and is rebuilt at its next use, as with 8-bit. */
int db_opt_adamw8bit_many(db_ctx *c, const db_q8_job *jobs, size_t njobs, const struct db_adamw *hp, int64_t t,
                          const struct db_q8_maps *maps);

#endif
