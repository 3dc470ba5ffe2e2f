/* The SD1.x VAE: diffusers' AutoencoderKL (CompVis ldm autoencoder), forward
 * only (it stays frozen in training).  Sizes from db_vae_arch.
 *
 * Encoder (image -> posterior):
 *   conv_in 3x3 -> for each level i: layers_per_block ResBlocks to
 *   block_out[i], then (not on the last level) Downsample: zero-pad right and
 *   bottom by 1, 3x3 conv stride 2 ->
 *   mid: ResBlock, single-head self-attention over the H*W positions, ResBlock
 *   -> GroupNorm+SiLU -> conv_out 3x3 to 2*latent -> quant_conv 1x1
 *   = moments [mean | logvar]; logvar is clamped to [-30, 20] as
 *   DiagonalGaussianDistribution does.
 * Decoder (latents -> image):
 *   post_quant_conv 1x1 -> conv_in 3x3 -> mid -> for each level from the top:
 *   layers_per_block+1 ResBlocks, then (not on the last) Upsample: nearest 2x,
 *   3x3 conv -> GroupNorm+SiLU -> conv_out 3x3.
 * ResBlock (ResnetBlock2D, no time embedding): x + conv2(gn_silu(conv1(gn_silu(x)))),
 * the skip through a 1x1 nin_shortcut when the channel count changes.
 * Every GroupNorm has norm_groups groups and eps 1e-6 (diffusers' VAE value).
 * The attention's q/k/v/proj_out are 1x1 convs in CompVis files ([C,C,1,1])
 * and nn.Linear in diffusers ([C,C]): the same numbers, used as linears.
 *
 * The latent scaling factor (arch.vae.scaling_factor, 0.18215 for SD1.x) is
 * NOT applied here: callers multiply encoded latents by it and divide
 * latents by it before decoding, as diffusers' pipelines do.
 *
 * Images are processed one at a time (diffusers' "VAE slicing"; every layer
 * is per-image, so the result is the same as a batched run), through a
 * workspace of three activation buffers grown to the largest image seen:
 * SD1.5 decode at 512x512 needs 3 x 256 MB.
 *
 * Shape legend: B images, H W image size (multiples of f = 2^(levels-1),
 * 8 for SD), h = H/f, w = W/f latent size, Z latent channels. */
#ifndef DB_VAE_H
#define DB_VAE_H

#include "kernels/ops.h"
#include "libcommon/core/err.h"
#include "libcommon/io/model.h"

typedef struct db_vae db_vae;

/* Load the VAE of m (any layout), sizes from m->arch.vae.  ctx is borrowed
 * and must outlive the model; weights, workspace and every image / latent
 * buffer passed below live on its device (db_ctx_alloc). */
int db_vae_create(db_vae **out, db_ctx *ctx, const db_model *m, db_err *err);
void db_vae_free(db_vae *v);

/* Spatial factor f between image and latents (2^(levels-1)). */
int db_vae_factor(const db_vae *v);

/* Posterior of B images.
 *   mean, logvar  (B, Z, H/f, W/f); logvar clamped to [-30, 20]
 *                 (logvar may be NULL when only the mean is wanted)
 *   image         (B, in_channels, H, W), values in [-1, 1]
 * H and W must be multiples of f.  All in the ctx's device memory. */
int db_vae_encode(db_vae *v, float *mean, float *logvar, const float *image, int B, int H, int W, db_err *err);

/* Decode B latents (NOT scaled: callers divide by the scaling factor first).
 *   image    (B, out_channels, h*f, w*f), unclamped (about [-1, 1])
 *   latents  (B, Z, h, w) */
int db_vae_decode(db_vae *v, float *image, const float *latents, int B, int h, int w, db_err *err);

/* Release the activation workspace (it comes back on the next call). */
void db_vae_trim(db_vae *v);

/* Bytes of the workspace db_vae_decode allocates for h x w latents (one
 * image at a time; db-train --plan's validation row). */
size_t db_vae_decode_bytes_arch(const db_vae_arch *a, int h, int w);
/* Bytes of workspace allocated now (0 after db_vae_trim). */
size_t db_vae_allocated_bytes(const db_vae *v);

#endif
