/* One DreamBooth training step as diffusers' train_dreambooth.py (v0.27)
 * computes it (DESIGN §6), with every random draw an input so the step is a
 * pure function of (weights, optimizer state, draws):
 *
 *   latents  (B, C, H, W)  clean latents, already sampled from the VAE
 *                          posterior and scaled (db_train_posterior_sample)
 *   noisy    = sqrt(acp[t]) latents + sqrt(1 - acp[t]) noise
 *   context  = text_encoder(ids).last_hidden_state     (B, T, D)
 *   pred     = unet(noisy, t, context)
 *   target   = noise (epsilon models) or sqrt(acp) noise - sqrt(1-acp) latents (v)
 *   rows [0, n_inst) are instance rows, [n_inst, B) prior (class) rows:
 *   loss_instance = mean over the instance rows of (pred - target)^2
 *                   (min-SNR-gamma: mean over rows of w_b * mean_b, w_b =
 *                   min(snr_b, gamma) / snr_b, + 1 for v-prediction, as
 *                   train_dreambooth weights it; prior rows are not weighted)
 *   loss_prior    = mean over the prior rows of (pred - target)^2
 *   loss          = loss_instance + prior_weight * loss_prior
 *
 * Gradients of loss / grad_accum accumulate over grad_accum micro-batches
 * (db_trainer_accumulate); db_trainer_apply then clips the global norm over
 * the UNet's and the text encoder's gradients (in that order, as diffusers
 * chains the parameter lists), takes one AdamW step per parameter group at
 * the schedule's learning rate (float32 AdamW, or 8-bit AdamW as
 * bitsandbytes' AdamW8bit: db_train_opts.optimizer), and zeroes the
 * gradients.
 *
 * fp16 (ctx precision DB_PREC_F16, kernels/ops.h): dynamic loss scaling as
 * torch.cuda.amp.GradScaler with the defaults accelerate gives it in
 * train_dreambooth --mixed_precision=fp16, so small gradients survive the
 * fp16 rounding of the backward's matmuls: the backward starts from
 * d (loss * scale) / d pred; apply checks the gradients (their sum of
 * squares) and, when one is not finite, skips the update (weights, moments
 * and AdamW's step count untouched, gradients zeroed) and halves the scale;
 * otherwise it multiplies the gradients by 1 / scale before clipping and
 * AdamW, and doubles the scale after growth_interval finite steps in a row
 * (unless that overflows float32).  bf16 and fp32 never scale.
 *
 * Step counters: `step` counts the steps taken, skipped or not (diffusers'
 * global_step: it picks the data, names checkpoints and ends the run);
 * `opt_step` counts the updates applied (torch's AdamW state["step"] and the
 * lr scheduler, which accelerate does not step when GradScaler skipped), and
 * feeds AdamW's bias correction and the learning rate.  They are equal
 * unless fp16 skipped a step; checkpoints keep both, so a resume continues
 * both sequences exactly.
 *
 * A frozen text encoder costs one forward per micro-batch and no backward;
 * the UNet does not compute d context then.
 *
 * Shape legend: B rows (instance + prior), C latent channels, H, W latent
 * size, T tokens per prompt (77), D the text encoder's width. */
#ifndef DB_TRAIN_H
#define DB_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"
#include "libcommon/core/err.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/optim.h"
#include "libcommon/sd/weights.h"

typedef struct db_unet db_unet;
typedef struct db_clip db_clip;
typedef struct db_sched db_sched;

typedef struct db_train_opts {
    int train_text;             /* 1: the text encoder is trained too */
    int gradient_checkpointing; /* 1: the UNet recomputes block activations in the backward */
    double prior_weight;        /* lambda (1.0) */
    double snr_gamma;           /* min-SNR-gamma weighting; 0: off */
    double max_grad_norm;       /* <= 0: no clipping (1.0) */
    int grad_accum;             /* micro-batches per optimizer step (>= 1) */
    db_adamw unet_hp, text_hp;  /* betas, eps, weight decay (lr comes from the schedules) */
    db_lr_schedule unet_lr, text_lr;
    db_optim_kind optimizer;    /* DB_OPTIM_ADAMW (the default) or DB_OPTIM_ADAMW8BIT (db_q8_state) */
    /* Fused backward (kohya's --fused_backward_pass): each unit of the
     * backward (a UNet block, a text-encoder layer; weights.h) is clipped
     * and stepped by the optimizer as soon as its gradients are final, in
     * one window the size of the largest unit instead of gradient buffers
     * as large as the weights (SD1.5: 3.3 GiB less, 3.7 GiB with the text
     * encoder).  The global norm is not known before the first update, so
     * clipping is per tensor (clip_per_tensor, kohya's rule); the reported
     * grad_norm is still the global norm.  One micro-batch per step
     * (grad_accum 1), and no fp16 (a step cannot be skipped after it has
     * begun); several processes sum each unit's gradients (reduce_f32)
     * before its update.  With max_grad_norm <= 0 the weights are
     * bit-identical to the plain step's. */
    int fused_backward;
    /* Clip each gradient tensor to max_grad_norm by its own norm instead of
     * all of them by the global norm (what the fused backward does; here so
     * a plain step can do the same, e.g. to compare). */
    int clip_per_tensor;
    /* Data parallel: `world` processes each accumulate grad_accum
     * micro-batches of one step; every gradient is scaled by
     * 1 / (grad_accum * world), and db_trainer_apply first calls reduce on
     * each gradient buffer (UNet, then text encoder) and on the loss sums
     * (4 doubles), which must sum them over the processes in place.
     * world 1 and reduce NULL: one process (the default).  reduce_f32
     * gets buffers of the trainer's ctx device (libcommon/dist's
     * db_dist_sum_dev: NCCL or staged MPI on CUDA), reduce_f64 host ones. */
    int world;
    int (*reduce_f32)(void *user, float *x, size_t n, db_err *err);
    int (*reduce_f64)(void *user, double *x, size_t n, db_err *err);
    void *reduce_user;
    /* Optional, bucketed and overlapped (both or neither): in the step's
     * last micro-batch the backward begins the sum of each unit's gradients
     * (weights.h) as soon as they are final, reduce_f32_start(x, n), so the
     * sums run while the rest of the backward computes (NCCL on a side
     * stream: db_dist_sum_dev_start); db_trainer_apply then calls
     * reduce_wait before it reads a gradient.  Each element is summed over
     * the same processes either way.  A micro-batch after the sums began is
     * refused (they would miss it). */
    int (*reduce_f32_start)(void *user, float *x, size_t n, db_err *err);
    int (*reduce_wait)(void *user, db_err *err);
    /* fp16 loss scaling: the initial scale (0: GradScaler's 65536) and the
     * finite steps before it doubles (0: 2000); a test may force overflow
     * with a huge initial scale.  Growth 2 and backoff 0.5 are fixed. */
    double loss_scale_init;
    int64_t loss_scale_interval;
    /* 1: every UNet forward and backward runs op by op.  0 (the default):
     * from the second micro-batch of the same size on, each replays as a
     * graph (unet.h db_unet_graph: CUDA graphs on a GPU, the same calls on
     * the CPU); the backward not with the bucketed sums (their sink calls
     * the host), nor with fused_backward over several processes (its units'
     * sums are host calls); a fused backward on one process replays with
     * its optimizer steps inside (their scalars read from device memory,
     * optim.h coefs).  A graph keeps its temporaries in a pool of its own
     * (unet.h plan).  Same numbers either way. */
    int no_graph;
    /* 1: the UNet's weight gradients stay float32.  0 (the default): where
     * nothing else reads them -- bf16 precision, one process, one
     * micro-batch a step, global clipping, no fused backward (AdamW or
     * 8-bit AdamW) -- every linear and convolution weight's gradient is stored
     * packed in bf16 (kernels/ops.h DB_ASSIGN_PACK16; it is a bf16 value in
     * this precision either way), which the clip's norms and AdamW read as
     * such: the same numbers, without the pass that widens each gradient
     * to float32 and with half of every later read. */
    int no_grad16;
    const struct db_log *log; /* warnings (a graph that could not be made), or NULL */
} db_train_opts;

/* diffusers' defaults: prior weight 1, clip 1.0, no min-SNR, one
 * micro-batch, AdamW 0.9/0.999/1e-8/1e-2, constant lr (both groups). */
db_train_opts db_train_opts_defaults(double lr, int64_t steps);

typedef struct db_train_batch {
    int B, n_inst;              /* rows; the first n_inst are instance rows */
    int C, H, W, T;
    const float *latents;       /* (B, C, H, W) */
    const float *noise;         /* (B, C, H, W) */
    const int64_t *timesteps;   /* (B) in [0, num_train_timesteps) */
    const int32_t *ids;         /* (B, T) token ids of each row's prompt */
} db_train_batch;

typedef struct db_train_stats {
    int64_t step;               /* optimizer steps done after this call */
    double loss, loss_instance, loss_prior; /* of the micro-batch (accumulate) or the mean over the step's (apply) */
    double grad_norm;           /* global norm before clipping (apply) */
    double lr, lr_text;         /* learning rates used by the step (apply) */
    double loss_scale;          /* fp16: the scale this step's gradients carried; 0 otherwise */
    int skipped;                /* apply: 1 when fp16 found a non-finite gradient and skipped the update */
} db_train_stats;

typedef struct db_trainer db_trainer;

/* Load the UNet and the text encoder of m onto ctx (borrowed) with
 * gradient and optimizer buffers for what is trained, all on ctx's device
 * (the batches stay host memory: the trainer copies what the device needs).
 * m must stay open only for the call. */
int db_trainer_create(db_trainer **out, db_ctx *ctx, const db_model *m, const db_train_opts *o, db_err *err);
void db_trainer_free(db_trainer *t);

/* Forward and backward of one micro-batch; gradients accumulate.  A
 * non-finite loss is refused (DB_ENUMERIC).  It is summed after the
 * backward is queued (d loss / d pred is made on the device, so the
 * backward follows the forward with no wait for the host), so the
 * refusal drops the step's gradients so far: the next accumulate begins
 * the step again.  With fused_backward the units' updates made in the
 * backward stay, as with a non-finite gradient (the weights are then not
 * to be saved).  s may be NULL. */
int db_trainer_accumulate(db_trainer *t, const db_train_batch *b, db_train_stats *s, db_err *err);

/* The losses of a micro-batch with the current weights, without gradients
 * (evaluation; nothing accumulates). */
int db_trainer_eval(db_trainer *t, const db_train_batch *b, db_train_stats *s, db_err *err);

/* Clip, AdamW, zero the gradients, step + 1 (fused backward: the updates
 * were made by accumulate; this counts the step and fills s).  Refused (weights untouched)
 * when no micro-batch was accumulated, or when the gradient norm is not
 * finite outside fp16; in fp16 that is a skipped step (above), s->skipped
 * set and s->grad_norm the non-finite norm of the scaled gradients. */
int db_trainer_apply(db_trainer *t, db_train_stats *s, db_err *err);

/* L2 norm of each accumulated gradient tensor, the UNet's in its table
 * order then the text encoder's (when trained): out[0 .. min(n, count)).
 * Returns the count of gradient tensors.  Fused backward: the norms (float32,
 * before clipping) of the last step's gradients, recorded as it went. */
size_t db_trainer_grad_norms(const db_trainer *t, double *out, size_t n);
/* How many of the UNet's gradient tensors the last backward stored packed
 * in bf16 (db_train_opts no_grad16); 0 when it packed none. */
size_t db_trainer_packed_grads(const db_trainer *t);

/* The 8-bit AdamW state of one trained group (DB_OPTIM_ADAMW8BIT), tensor
 * by tensor in its weights' table order: tensors of DB_Q8_MIN_SIZE elements
 * or more keep codes and block scales (optim.h), smaller ones float32
 * moments, as bitsandbytes' min_8bit_size does.  The buffers live where the
 * weights do (ctx NULL: host memory, as db_weights). */
typedef struct db_q8_tensor {
    size_t n;          /* elements */
    size_t woff;       /* element offset of the tensor in the weights' data */
    int q8;            /* 1: codes at off, scales at boff; 0: float32 moments at off */
    size_t off, boff;
} db_q8_tensor;
typedef struct db_q8_state {
    db_ctx *ctx;
    size_t nt;         /* tensors (the weights' ix.n) */
    db_q8_tensor *t;
    size_t ncodes, nblocks, nsmall;
    uint8_t *m_q, *v_q;            /* (ncodes) */
    float *m_absmax, *v_absmax;    /* (nblocks) */
    float *m32, *v32;              /* (nsmall) */
} db_q8_state;
/* bytes of a group's 8-bit state */
size_t db_q8_state_bytes(const db_q8_state *q);

/* The state a checkpoint holds: the trained weights and moments (NULL when
 * that group is frozen) and the step count.  With DB_OPTIM_ADAMW8BIT the
 * moments are unet_q8 / text_q8 and unet_m ... text_v are NULL. */
typedef struct db_train_state {
    db_weights *unet, *unet_m, *unet_v;
    db_weights *text, *text_m, *text_v;  /* NULL when the text encoder is frozen */
    db_weights *text_frozen;             /* the frozen text encoder's weights, else NULL */
    db_optim_kind optimizer;
    db_q8_state *unet_q8, *text_q8;      /* DB_OPTIM_ADAMW8BIT (text_q8 NULL when frozen) */
    int64_t step;                        /* steps taken */
    int64_t opt_step;                    /* updates applied (AdamW, lr); step minus the skipped ones */
    double loss_scale;                   /* fp16 loss scaling: the scale; 0 when not scaling */
    int64_t growth_tracker;              /* finite steps in a row since the scale last changed */
} db_train_state;
void db_trainer_state(db_trainer *t, db_train_state *st);
/* Set the step count, and the update count with it (resume; the weights and
 * moments are loaded through the pointers of db_trainer_state). */
void db_trainer_set_step(db_trainer *t, int64_t step);
/* Then, for a checkpoint that recorded them: the update count, and the loss
 * scaler (loss_scale <= 0: keep the initial one, e.g. an fp32 run resumed in
 * fp16; ignored when this run does not scale).  Refused when opt_step is
 * outside [0, step] or growth_tracker negative. */
int db_trainer_set_amp(db_trainer *t, int64_t opt_step, double loss_scale, int64_t growth_tracker, db_err *err);

db_unet *db_trainer_unet(db_trainer *t);
db_clip *db_trainer_clip(db_trainer *t);
const db_sched *db_trainer_sched(const db_trainer *t);
int db_trainer_num_timesteps(const db_trainer *t);

/* Clean latents from a stored posterior, as DiagonalGaussianDistribution
 * .sample() * scaling_factor, in float32 with torch's rounding order:
 *   out = (mean + exp(0.5 * clamp(logvar, -30, 20)) * eps) * sf      (n,) */
void db_train_posterior_sample(float *out, const float *mean, const float *logvar, const float *eps, size_t n,
                               float sf);

#endif
