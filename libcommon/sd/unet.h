/* The SD UNet (diffusers UNet2DConditionModel, SD1.x/SD2.x topology) forward
 * pass, sized from the architecture (never hard-coded) and computing what
 * diffusers 0.27 computes:
 *
 *   temb = linear_2(silu(linear_1(timestep_embedding(t))))          (B, E)
 *   h = conv_in(sample); skips = [h]
 *   down level i: lpb x (ResBlock, [Transformer2D]) then a stride-2 conv
 *                 (not on the last level); every output is pushed on skips
 *   mid: ResBlock, Transformer2D, ResBlock
 *   up level u:   (lpb + 1) x (ResBlock(cat(h, skips.pop())), [Transformer2D])
 *                 then nearest-2x + conv (not on the last level)
 *   out = conv_out(silu(GN(h)))
 *
 * The model is a list of steps (conv_in, ResBlock, Transformer2D, down- and
 * upsampler, output head) whose weight pointers are resolved once by CompVis
 * name; each step runs a block forward of blocks.h that saves the
 * activations its backward will need.  Activation memory is one workspace
 * owned by the UNet, laid out per (B, H, W, Tc) and mode, and kept until the
 * sizes grow or the mode changes.  Three modes:
 *   inference (keep_activations off, the default): the skips are kept, the
 *     other outputs alternate between two buffers and all blocks share one
 *     activation region;
 *   training (keep_activations on): every step keeps its output and its
 *     saved activations until the next forward;
 *   training with gradient checkpointing (keep_activations and checkpointing
 *     on; diffusers' enable_gradient_checkpointing, per block): every step
 *     keeps only its output (the next step's input, or a skip), and all
 *     blocks' activations share one region sized for the largest block.  The
 *     backward re-runs each step's forward into that region just before the
 *     step's backward: about one more forward of compute for a workspace of
 *     the outputs plus one block's activations (tiny model at 16x16: 0.16 x
 *     the plain training workspace; SD1.5 at 64x64, B=2, with the gradient
 *     workspace: 0.25 x).  The same ops on the same inputs give the same
 *     bits, so the gradients are bit-identical to the plain training mode's.
 *
 * db_unet_backward walks the steps in reverse through the blocks' backward
 * functions: the up path's concat splits its gradient between the previous
 * step and the skip's producer (which adds the two), every ResBlock adds its
 * time-embedding gradient into one (B, E) buffer that then goes through the
 * time MLP, and every Transformer2D adds its context gradient.
 *
 * Legend: B batch, C latent channels (in_channels / out_channels), H W latent
 * height and width, Tc context tokens, D context width (cross_attention_dim),
 * E time-embedding width.
 */
#ifndef DB_SD_UNET_H
#define DB_SD_UNET_H

#include <stddef.h>

#include "kernels/ops.h"
#include "libcommon/core/err.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/weights.h"

typedef struct db_unet db_unet;

/* Load m's UNet weights as fp32 and build the step list.  ctx is borrowed
 * (it must outlive the UNet); the ops run on its device, where the weights
 * and workspaces live (db_ctx_alloc), and every tensor passed to the forward
 * and backward below is a buffer of that device too. */
int db_unet_create(db_unet **out, db_ctx *ctx, const db_model *m, db_err *err);

/* The same from an architecture and weights already in memory (e.g. fresh
 * ones for a benchmark).  *w is taken over in every case (zeroed here; freed
 * with the UNet, or at once on failure). */
int db_unet_create_from(db_unet **out, db_ctx *ctx, const db_unet_arch *a, db_weights *w, db_err *err);

void db_unet_free(db_unet *u);

/* out (B, out_channels, H, W) = unet(sample, timesteps, context).sample
 * sample (B, in_channels, H, W); timesteps (B) (fractional allowed);
 * context (B, Tc, D) the text encoder's hidden states.
 * H and W must be multiples of 2^(nlevels-1) (8 for SD1.x).  out may equal
 * sample.  Errors (bad sizes, a failed op) go to err, prefixed with the
 * block's CompVis name; an op's failure also stays in ctx->err (sticky: the
 * caller clears it with db_ctx_clear_error before reusing the ctx). */
int db_unet_forward(db_unet *u, float *out, const float *sample, const float *timesteps, const float *context, int B,
                    int H, int W, int Tc, db_err *err);

/* Training: 1 = every block keeps its own saved activations after a forward
 * (what the backward reads); 0 = inference (default).  Takes effect at the
 * next forward. */
void db_unet_keep_activations(db_unet *u, int keep);
/* Sampling: the cross-attentions' k and v of context (B, Tc, D) made once
 * here, for every denoising step's inference forward with this context
 * pointer, B and Tc to read instead of making them again (~80 of a
 * forward's launches on a GPU; the same ops on the same inputs, so the
 * same bits).  The cache is declared to the ctx as weights
 * (db_ctx_declare_weights), so that in bf16 / fp16 the CUDA backend
 * converts its k and v to 16 bits once a call, not in every step's
 * attentions.  The caller calls it again whenever the context's contents
 * or the weights change (txt2img.c: every batch); context NULL turns it
 * off.  Training forwards (keep_activations) never use it.  Turning it
 * on or off, or growing it, starts the UNet's graphs over
 * (db_unet_layout_gen).  0, or -1 with err. */
int db_unet_cache_context(db_unet *u, const float *context, int B, int Tc, db_err *err);

/* Gradient checkpointing (the trainer's --gradient-checkpointing): 1 = a
 * training forward keeps only each step's output and the time embedding,
 * and the backward recomputes each block's activations (see the top of this
 * file); 0 = off (default).  Only meaningful with keep_activations on (an
 * inference forward ignores it).  Takes effect at the next forward: a
 * backward follows the mode of the forward it differentiates.  Changing
 * mode re-allocates the workspace to the new mode's size. */
void db_unet_checkpointing(db_unet *u, int on);

/* Backward of the last forward, which must have been made with
 * keep_activations on; its sample and context must still hold what they held
 * (so that forward's out must not have been its sample).
 *   dsample (B, in_channels, H, W) = d loss / d sample, or NULL (not needed);
 *   dcontext (B, Tc, D) = d loss / d context, or NULL (text-encoder training);
 *   grads: same layout as the UNet weights (db_weights_like of
 *          db_unet_weights(u)), accumulated (+=); NULL: frozen UNet (only
 *          dsample / dcontext are computed);
 *   dout (B, out_channels, H, W) = d loss / d out.
 * The gradient workspace is allocated once per (B, H, W, Tc), like the
 * forward's.  Errors as for the forward. */
int db_unet_backward(db_unet *u, float *dsample, float *dcontext, db_weights *grads, const float *dout,
                     db_err *err);
/* The same with a gradient sink (weights.h): the weights' gradients go to
 * sink->window unit by unit (grads may then be NULL) or into grads, and
 * sink->ready hears of each unit as its backward ends (the steps in reverse,
 * the time MLP last).  sink NULL: db_unet_backward.  assign 1: grads are
 * written (=), not added to: what they held is neither read nor needed
 * reset (a trainer's first micro-batch; the same bits as zeroing them first
 * and accumulating: ops.h `assign`).  Every UNet weight gets exactly one
 * contribution from a backward, which is what makes that sound (the
 * tensors' alignment padding is not written: it keeps the zeros
 * db_weights_like made); a sink's window is zeroed and then written so. */
int db_unet_backward_to(db_unet *u, float *dsample, float *dcontext, db_weights *grads, const db_grad_sink *sink,
                        int assign, const float *dout, db_err *err);

/* Memory plans (trainer --plan).  Nothing is allocated; 0 on overflow.
 * Workspace bytes a forward of these sizes needs in the current mode. */
size_t db_unet_workspace_bytes(const db_unet *u, int B, int H, int W, int Tc);
/* Bytes a forward + backward of these sizes needs in the current mode: the
 * forward workspace plus the gradient workspace (step-output gradients, the
 * blocks' backward scratch).  Not counted: the weights, the caller's
 * gradient buffer (as large as the weights) and optimizer state, the
 * caller's tensors, and the ops' own scratch in the ctx (backend temporaries,
 * e.g. oneDNN's).  With keep_activations off: the forward workspace only. */
size_t db_unet_train_bytes(const db_unet *u, int B, int H, int W, int Tc);
/* The same from an architecture alone, no weights loaded (e.g. SD1.5 sizes
 * on a small machine), with keep_activations on and checkpointing as given;
 * 0 also for an invalid architecture. */
size_t db_unet_train_bytes_arch(const db_unet_arch *a, int B, int H, int W, int Tc, int checkpointing);
/* Device memory of one DreamBooth training step on a CUDA ctx (db-train
 * --plan --device cuda; bench_sd prints it next to its measured peak), from
 * the architecture alone: what db_trainer_create and a step put on the
 * device.  B rows of H x W latents and T tokens; train_text,
 * checkpointing and fused (fused_backward) as db_train_opts; prec the ctx's compute precision;
 * graphs: the UNet's forward and backward replay as graphs (train.h
 * no_graph 0, one process), which keep their temporaries in pools of their
 * own (one more transient allowance: conversion scratch + cuDNN workspace).
 * Nothing is allocated; returns the total (0 for an invalid architecture). */
typedef struct db_train_device_plan {
    size_t weights;     /* UNet + text encoder, fp32 (the trainer loads both) */
    size_t grads;       /* fp32 gradients of what is trained (fused: the largest unit's window) */
    size_t moments;     /* AdamW m and v, fp32 */
    size_t unet_act;    /* UNet forward + gradient workspaces (db_unet_train_bytes_arch) */
    size_t text_act;    /* text encoder workspace (db_clip_workspace_bytes) */
    size_t batch;       /* the trainer's latent, timestep and context buffers */
    size_t convert;     /* bf16/fp16: the largest op's operands in the compute type (0 for fp32) */
    size_t conv_ws;     /* cuDNN workspace allowance: the largest conv's im2col buffer */
    size_t shadow;      /* bf16/fp16: the weights' 16-bit working copy (db_ctx_declare_weights) */
    size_t rounding;    /* the caching allocator's size classes (at most 25 % of a request;
                           2 MiB grains from 256 MiB up) */
    size_t graphs;      /* the graphs' own pools of temporaries (0 without graphs) */
    size_t validation;  /* validation samples (db_unet_validation_device_plan; 0 without) */
    size_t total;
} db_train_device_plan;
size_t db_unet_train_device_plan(const db_arch *a, int B, int H, int W, int T, int train_text, int checkpointing,
                                 int fused, int graphs, db_precision prec, db_train_device_plan *p);
/* Adds to a plan made by db_unet_train_device_plan (same a, H, W, graphs,
 * prec) what validation samples cost on the device (db-train
 * --validation-prompt): the VAE's fp32 weights, their 16-bit copy in the
 * 16-bit modes, and its decode workspace for H x W latents, all kept from
 * the first validation on; while sampling, the sampler's buffers and the
 * decoded image, and with graphs the denoising step's pool (bounded like
 * the training graphs': conversion scratch + cuDNN workspace).  The UNet
 * and the text encoder sample through the trainer's workspaces (batch 2,
 * no kept activations: no larger).  Returns the new total (0: a bad arch). */
size_t db_unet_validation_device_plan(const db_arch *a, int H, int W, int graphs, db_precision prec,
                                      db_train_device_plan *p);
/* The same on the CPU: the VAE's weights, its decode workspace, the
 * sampler's buffers and the image (0: a bad arch). */
size_t db_unet_validation_host_bytes(const db_arch *a, int H, int W);

/* Bytes of the forward and gradient workspaces allocated now. */
size_t db_unet_allocated_bytes(const db_unet *u);
/* Changes whenever the UNet lays its activation or gradient buffers out
 * anew (another batch size, image size, context length, checkpointing or
 * training mode): a graph recorded over them is stale from then on. */
unsigned db_unet_layout_gen(const db_unet *u);

/* A graph (kernels/ops.h db_graph) of one kind of UNet call (a forward, a
 * backward, a denoising step), zero-initialised by its owner.
 * db_unet_graph_run runs fn(copy of arg): the first call with an arg
 * directly, the next call with the same arg (byte for byte: the buffers and
 * sizes fn is given) records it, and later ones replay the record, while
 * arg, the UNet's buffers (db_unet_layout_gen) and the ctx's compute
 * precision stay; a change of any starts over.  Clear arg with memset before setting its fields (padding is
 * compared too).  fn must obey db_graph_capture's rules.  When a capture is
 * not possible the slot warns on log once and calls fn directly from then
 * on; so it does for an arg over DB_UNET_GRAPH_ARG bytes.
 * 0, or -1 with err.  db_unet_graph_free before the buffers fn uses. */
enum { DB_UNET_GRAPH_ARG = 128 };
typedef struct db_unet_graph {
    db_graph *g;
    unsigned char arg[DB_UNET_GRAPH_ARG]; /* the arg of the last direct call */
    size_t arg_size;
    unsigned gen;                         /* and the UNet's layout then */
    int prec;                             /* and the ctx's precision */
    int warm;                             /* arg, arg_size and gen are set */
    int off;                              /* direct calls only (no_graph, or a capture failed) */
} db_unet_graph;
struct db_log;
int db_unet_graph_run(db_unet_graph *s, db_unet *u, db_graph_fn fn, const void *arg, size_t arg_size,
                      const struct db_log *log, db_err *err);
/* The same on ctx c for work whose buffers' layout count is *gen (read
 * again after a capture): db_unet_graph_run is it on the UNet's ctx and
 * db_unet_layout_gen; a graph launch that reports its graph stale (ops.h
 * db_graph_launch 1) makes the call run directly, and the next record. */
int db_unet_graph_run_on(db_unet_graph *s, db_ctx *c, const unsigned *gen, db_graph_fn fn, const void *arg,
                         size_t arg_size, const struct db_log *log, db_err *err);
void db_unet_graph_free(db_unet_graph *s);

/* Wall seconds the last forward spent per kind of block (CPU ops are
 * synchronous; a GPU backend would have to synchronise to fill this). */
enum { DB_UNET_T_EMBED = 0, /* time embedding, conv_in, output head */
       DB_UNET_T_RES,       /* ResBlocks (with the up path's concats) */
       DB_UNET_T_ATTN,      /* Transformer2D blocks */
       DB_UNET_T_SAMPLE,    /* down- and upsamplers */
       DB_UNET_NT };
void db_unet_last_times(const db_unet *u, double t[DB_UNET_NT]);
/* The same for the last backward; *recompute (may be NULL) gets the
 * seconds spent re-running block forwards under checkpointing. */
void db_unet_last_backward_times(const db_unet *u, double t[DB_UNET_NT], double *recompute);

const db_unet_arch *db_unet_arch_of(const db_unet *u);
/* The fp32 weights (one allocation in the architecture table's order). */
const db_weights *db_unet_weights(const db_unet *u);

#endif
