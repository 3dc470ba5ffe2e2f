/* Optimizer math for db-train (DESIGN §6): AdamW as torch.optim.AdamW,
 * global gradient-norm clipping as torch.nn.utils.clip_grad_norm_, and the
 * learning-rate schedules of diffusers.optimization.get_scheduler.
 *
 * AdamW, per element, for optimizer step t (1-based), all tensor math in
 * float32 with each operation rounded (no fused multiply-add), the scalars
 * computed in double (as Python floats) and rounded to float where torch
 * applies them to a float32 tensor (torch 1.13 _single_tensor_adamw, CPU
 * kernels):
 *
 *   p  = p * (float)(1 - lr*wd)                        param.mul_(1 - lr*wd)
 *   m  = m * (float)b1;  m = m + (float)(1-b1) * g     exp_avg.mul_(b1).add_(g, alpha=1-b1)
 *   v  = v * (float)b2;  v = v + (float)(1-b2) * g * g exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2)
 *   bc1 = 1 - b1^t, bc2 = 1 - b2^t, step_size = lr / bc1          (double)
 *   d  = sqrtf(v) / (float)sqrt(bc2);  d = d + (float)eps
 *   p  = p + ((float)(-step_size) * m) / d             param.addcdiv_(m, d, value=-step_size)
 *
 * Known differences from torch, all at most an ulp or so per operation:
 * torch's AVX2/AVX512 path of add_(…, alpha) uses a fused multiply-add
 * (vec::fmadd) for the vectorised body but not for the tail, and CUDA
 * contracts to FMA; this code rounds every operation separately so the
 * result does not depend on the vector width, the thread count or the
 * compiler.  (The weight decay is p*(1 - lr*wd), not p - lr*wd*p: that is
 * what torch computes, and the two round differently.) */
#ifndef DB_OPTIM_H
#define DB_OPTIM_H

#include <stddef.h>
#include <stdint.h>

/* AdamW hyper-parameters.  lr is the learning rate of this step (the
 * schedule's value, db_lr_at).  grad_coef: 0, the gradient as it is; else
 * the step reads g * (float)grad_coef, one float32 multiplication per
 * element: gradient clipping's in-place scaling (db_clip_grad_coef_ctx)
 * folded into the step, the same bits as scaling g first, without the pass
 * over the gradients (2.2 ms of a 65 ms SD1.5 step on an H200). */
struct db_adamw_coef;
typedef struct db_adamw {
    double lr, beta1, beta2, eps, weight_decay;
    double grad_coef;
    /* NULL, or the step's float32 scalars (a db_adamw_coef, adamw_coef.h, as
     * db_adamw_coefs makes them from the fields above and the step count)
     * in the ctx's memory, read when the step runs instead: a CUDA graph
     * that holds optimizer steps replays with the values its caller wrote
     * there before the launch, not the ones of its capture (the fused
     * backward's graph, train.c).  The ops then ignore the fields above and
     * the step count t. */
    const struct db_adamw_coef *coefs;
    /* Packed gradients (kernels/ops.h DB_ASSIGN_PACK16): g16_nruns tensors
     * of g whose gradient is stored packed, g16_runs[2k] .. g16_runs[2k + 1]
     * (element offsets from g, sorted, disjoint) holding its values as
     * compute-type bits (g16_prec: DB_PREC_BF16 or DB_PREC_F16) from the
     * start of its slot: element i of such a tensor is the 16-bit value
     * ((uint16_t *)(g + lo))[i - lo].  The array lives in the ctx's memory
     * (as coefs).  0 runs: every element float32.  db_opt_adamw only (the
     * 8-bit steps refuse them). */
    const uint32_t *g16_runs;
    size_t g16_nruns;
    int g16_prec;
} db_adamw;

/* diffusers train_dreambooth defaults: beta 0.9/0.999, eps 1e-8, wd 1e-2. */
db_adamw db_adamw_defaults(double lr);

/* One AdamW step over n elements: p, m (exp_avg), v (exp_avg_sq) updated in
 * place from gradient g; t is the 1-based step count after this step
 * (torch's state['step']).  m and v start at zero. */
void db_adamw_step(float *p, float *m, float *v, const float *g, size_t n, const db_adamw *hp, int64_t t);
/* The same with OpenMP threads; bit-identical to db_adamw_step (the update
 * is elementwise). */
void db_adamw_step_omp(float *p, float *m, float *v, const float *g, size_t n, const db_adamw *hp, int64_t t);

/* ---- 8-bit AdamW (bitsandbytes' AdamW8bit) ------------------------------------------
 *
 * The moments live as one byte per element plus one float scale per block
 * of DB_Q8_BLOCK elements, as bitsandbytes' block-wise 8-bit optimizers
 * keep them (kOptimizerStatic8bit2StateBlockwise; AdamW8bit's defaults):
 *
 *   m_q, v_q         uint8 (n)            codes into the signed map (exp_avg)
 *                                         and the unsigned map (exp_avg_sq)
 *   m_absmax, v_absmax float (ceil(n / DB_Q8_BLOCK))   per-block scales
 *   moment[i] = map[q[i]] * absmax[i / DB_Q8_BLOCK]
 *
 * Block size: 256, the block of bitsandbytes' current 8-bit optimizer
 * kernels (BLOCKSIZE_2STATE; releases up to 0.44 used 2048).  The CUDA
 * kernel runs one thread block of 256 threads per quantisation block.
 * Tensors under DB_Q8_MIN_SIZE elements keep float32 moments (bnb's
 * min_8bit_size): the trainer decides per tensor, these functions always
 * quantise.  A zero-filled state (codes and scales 0) is the fresh state:
 * every code times a zero scale is zero. */
enum { DB_Q8_BLOCK = 256, DB_Q8_MIN_SIZE = 4096 };

/* bitsandbytes' create_dynamic_map(signed, max_exponent_bits 7, total_bits 8):
 * for i = 0..6, the midpoints of linspace(0.1, 1, F_i) scaled by 10^(i-6),
 * F_i = 2^i + 1 (signed: each value and its negative) or 2^(i+1) + 1
 * (unsigned), then 0 and 1, sorted: 256 ascending codes.  Signed: code[0]
 * = -0.99296875 (there is no -1), code[127] = 0, code[254] = 0.99296875,
 * code[255] = 1; unsigned: code[0] = 0, code[255] = 1, the smallest nonzero
 * 5.5e-7 (bnb's data type: more codes near zero, where most moments are).
 * Each code is computed in double and rounded once to float; bnb builds
 * them with float32 torch.linspace, so a code may differ from bnb's in its
 * last bit (~6e-8 relative), which moves no decision that matters.
 * mid[k] = (code[k] + code[k+1]) * 0.5f (float arithmetic), the decision
 * points of the nearest-code search. */
typedef struct db_q8_map {
    float code[256];
    float mid[255];
} db_q8_map;
typedef struct db_q8_maps {
    db_q8_map m; /* signed: exp_avg */
    db_q8_map v; /* unsigned: exp_avg_sq */
} db_q8_maps;
/* Fill both maps (a pure function: every call gives the same bits). */
void db_q8_maps_make(db_q8_maps *maps);
void db_q8_map_make(db_q8_map *map, int is_signed);

#ifdef __CUDACC__
#define DB_Q8_HD __host__ __device__
#else
#define DB_Q8_HD
#endif
/* The nearest code to x (a value in [-1, 1] or [0, 1] after the block
 * scale): the number of decision points below x, by a binary search of
 * comparisons only, so the CPU and the CUDA kernel (which both call this)
 * pick the same code for the same float.  A tie (x == mid[k]) goes to the
 * lower code and a NaN to code 0, as bnb's quantize_2D (a binary search
 * over the codes followed by the same midpoint test) does; bnb divides by
 * the scale with the approximate __fdividef, here the division is IEEE. */
static inline DB_Q8_HD int db_q8_nearest(const float *mid, float x)
{
    int k = 0;
    for (int step = 128; step > 0; step >>= 1)
        if (k + step <= 255 && x > mid[k + step - 1])
            k += step;
    return k;
}

/* Block-wise quantisation: absmax[b] = max |x| over block b (0 for an
 * all-zero block), q[i] = the nearest code to x[i] / absmax[b] (x[i] / 0
 * is taken as 0).  signed_fix: bnb's rule for exp_avg, a negative (or
 * -0) value whose nearest code is +0 takes the next code down, so a
 * momentum never changes sign through quantisation. */
void db_q8_quantize(uint8_t *q, float *absmax, const float *x, size_t n, const db_q8_map *map, int signed_fix);
/* x[i] = code[q[i]] * absmax[i / DB_Q8_BLOCK]. */
void db_q8_dequantize(float *x, const uint8_t *q, const float *absmax, size_t n, const db_q8_map *map);

/* One 8-bit AdamW step over n elements, per block of DB_Q8_BLOCK:
 * dequantise m and v with the block's old scales; update p, m, v with
 * exactly db_adamw_step's float32 operations (the same weight decay, bias
 * correction and operation order: p's update uses the unquantised new
 * moments, as bnb's kernel does); the block's new scales are the max |m|
 * and max |v| of the updated moments; requantise (db_q8_quantize's rules).
 * t is the 1-based step count after this step.  The caller refuses
 * non-finite gradients (the trainer does, by the gradient norm); with one
 * the result is deterministic but meaningless. */
void db_adamw8bit_step(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax, const float *g,
                       size_t n, const db_adamw *hp, int64_t t, const db_q8_maps *maps);
/* The same with OpenMP threads over blocks; bit-identical (a block is the
 * unit of work and its max is order-free). */
void db_adamw8bit_step_omp(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                           const float *g, size_t n, const db_adamw *hp, int64_t t, const db_q8_maps *maps);
/* The same with a packed gradient (kernels/ops.h DB_ASSIGN_PACK16: n bits
 * of prec16, DB_PREC_BF16 / DB_PREC_F16): the bits of the float32 values'
 * step. */
void db_adamw8bit_step16_omp(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                             const uint16_t *g, int prec16, size_t n, const db_adamw *hp, int64_t t,
                             const db_q8_maps *maps);

/* The trainer's optimizers (db-train --optimizer). */
typedef enum db_optim_kind {
    DB_OPTIM_ADAMW,     /* float32 moments: 8 bytes per parameter */
    DB_OPTIM_ADAMW8BIT, /* 8-bit moments for tensors of DB_Q8_MIN_SIZE elements or more */
} db_optim_kind;
/* "adamw" / "adamw8bit" <-> kind; parse returns -1 when unknown. */
int db_optim_parse(const char *name, db_optim_kind *out);
const char *db_optim_name(db_optim_kind kind);
/* Bytes of the optimizer state of one n-element tensor: 8n for AdamW (and
 * for 8-bit AdamW under DB_Q8_MIN_SIZE elements), else 2n codes and two
 * float scales per DB_Q8_BLOCK. */
size_t db_optim_state_bytes(db_optim_kind kind, size_t n);

/* One gradient tensor for clipping.  prec16 0: n floats; DB_PREC_BF16 /
 * DB_PREC_F16: packed (kernels/ops.h DB_ASSIGN_PACK16), its n values as
 * compute-type bits in the first 2n bytes at g.  The sums of squares read
 * packed tensors (the same bits as their float32 values give); scaling one
 * in place is refused (db_scale_refs_ctx, the per-tensor clip), and the
 * host-only db_clip_grad_norm takes float32 ones only. */
typedef struct db_grad_ref {
    float *g;
    size_t n;
    int prec16;
} db_grad_ref;

/* torch 1.13 clip_grad_norm_(params, max_norm) with norm_type 2:
 *   norm_i     = ||g_i||_2 as a float32 (per tensor)
 *   total_norm = ||(norm_0, norm_1, ...)||_2 as a float32
 *   clip_coef  = (float)max_norm / (total_norm + 1e-6f), clamped to <= 1
 *   every g_i *= clip_coef
 * Returns total_norm (the float32 value, widened).  Each sum of squares is
 * accumulated in double over fixed 4096-element chunks, the chunk partials
 * and then the tensors added in index order, so the result is the same for
 * any thread count; torch reduces in float32 in a thread-dependent tree, so
 * its norms can differ from these in the last bits (ours are the more
 * accurate).  Multiplying by a coefficient of exactly 1 (under the max)
 * leaves the gradients untouched, as in torch.  Non-finite gradients give a
 * non-finite norm and coefficient, as torch does with
 * error_if_nonfinite=False. */
double db_clip_grad_norm(const db_grad_ref *grads, size_t ngrads, double max_norm);
/* The same on the device of c (grads are its buffers): the sums of squares
 * through db_opt_sumsq, the scaling through db_opt_scale (kernels/ops.h), so
 * the gradients stay where they are and the arithmetic is this function's.
 * 0 with *norm set, or -1 with the reason in c->err. */
struct db_ctx;
int db_clip_grad_norm_ctx(struct db_ctx *c, double *norm, const db_grad_ref *grads, size_t ngrads, double max_norm);
/* The same measure without the scaling: *norm, and *coef to hand the
 * AdamW step as its grad_coef (0 when the gradients stay as they are:
 * under the maximum; a coefficient that is 0 or NaN, from a non-finite
 * norm, is applied here instead).  0, or -1 with the reason in c->err. */
int db_clip_grad_coef_ctx(struct db_ctx *c, double *norm, float *coef, const db_grad_ref *grads, size_t ngrads,
                          double max_norm);
/* ss[k] = the sum of squares of grads[k] (db_sum_squares' bits) for every
 * k, with one wait for c's device.  0, or -1 with the reason in c->err. */
int db_sumsq_refs_ctx(struct db_ctx *c, double *ss, const db_grad_ref *grads, size_t ngrads);
/* g *= coef for every tensor of grads (db_opt_scale's bits), one op per run
 * of tensors that lie back to back in memory: a model's gradient buffer
 * takes one or two launches instead of one per tensor (~720 for SD1.5 with
 * its text encoder).  0, or -1 with the reason in c->err. */
int db_scale_refs_ctx(struct db_ctx *c, const db_grad_ref *grads, size_t ngrads, float coef);
/* Each tensor clipped by its own norm (kohya's rule for a fused backward:
 * clip_grad_norm_ called on every tensor alone): norms[k] = ||g_k|| as a
 * float32, g_k *= its own coefficient; *ss += the sum of norms[k]^2 (the
 * terms of the global norm).  The sums of squares take one wait for the
 * device (db_opt_sumsq_many).  0, or -1 with the reason in c->err. */
int db_clip_grad_norm_each_ctx(struct db_ctx *c, double *norms, double *ss, const db_grad_ref *grads, size_t ngrads,
                               double max_norm);
/* The pieces, for the CPU backend of those ops: db_clip_grad_norm's sum of
 * squares of one tensor (double, fixed 4096-element chunks: any thread count
 * gives the same bits), and g[i] = g[i] * coef. */
double db_sum_squares(const float *g, size_t n);
/* The same of n packed values (bits of prec16, DB_PREC_BF16 / DB_PREC_F16):
 * the bits db_sum_squares gives for their float32 values. */
double db_sum_squares16(const uint16_t *g, size_t n, int prec16);
void db_scale(float *g, float coef, size_t n);
/* clip_grad_norm_ of one tensor from its sum of squares ss: *norm = its
 * float32 norm, and the coefficient to scale it by, or 1 when it does not
 * scale (torch's clamp: below 1 or NaN scales).  Every per-tensor clip
 * (db_clip_grad_norm_each_ctx, db_opt_clip_each on the CPU; optim.cu's
 * clip_coef_kernel step by step) makes these bits. */
float db_clip_one_coef(double ss, float max_norm, float *norm);

/* Learning-rate schedules: lr(step) = base_lr * lambda(step) as torch's
 * LambdaLR with diffusers' lambdas (diffusers/optimization.py). */
typedef enum db_lr_kind {
    DB_LR_CONSTANT,             /* 1 (ignores warmup, as diffusers)         */
    DB_LR_CONSTANT_WITH_WARMUP, /* s/W during warmup, then 1                */
    DB_LR_LINEAR,               /* warmup, then (T-s)/(T-W) down to 0        */
    DB_LR_COSINE,               /* warmup, then 0.5(1+cos(2 pi c p)), c=0.5  */
    DB_LR_COSINE_WITH_RESTARTS, /* warmup, then 0.5(1+cos(pi((c p) mod 1)))  */
    DB_LR_POLYNOMIAL,           /* warmup, then (lr-lr_end)(1-p)^power+lr_end */
} db_lr_kind;

typedef struct db_lr_schedule {
    db_lr_kind kind;
    double base_lr;
    int64_t warmup_steps;   /* num_warmup_steps */
    int64_t training_steps; /* num_training_steps */
    double num_cycles;      /* cosine: 0.5, cosine_with_restarts: 1 (diffusers defaults) */
    double lr_end, power;   /* polynomial: 1e-7, 1.0 */
} db_lr_schedule;

/* A schedule with diffusers' defaults for num_cycles, lr_end and power.
 * diffusers' train_dreambooth multiplies warmup and training steps by the
 * number of processes before calling get_scheduler; callers do the same. */
db_lr_schedule db_lr_schedule_make(db_lr_kind kind, double base_lr, int64_t warmup_steps, int64_t training_steps);
/* Name <-> kind ("constant", "constant_with_warmup", "linear", "cosine",
 * "cosine_with_restarts", "polynomial"); parse returns -1 when unknown. */
int db_lr_kind_parse(const char *name, db_lr_kind *out);
const char *db_lr_kind_name(db_lr_kind kind);
/* The learning rate used by optimizer step `step` (0-based: the value the
 * LambdaLR holds before that step's scheduler.step()).  A polynomial
 * schedule with base_lr <= lr_end (a ValueError in diffusers) yields NaN. */
double db_lr_at(const db_lr_schedule *s, int64_t step);

#endif
