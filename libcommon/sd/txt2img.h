/* Text to image with classifier-free guidance, as diffusers'
 * StableDiffusionPipeline computes it, plus A1111's prompt emphasis and long
 * prompts.  The three networks are used one after another and each is freed
 * before the next is loaded, so SD1.5 in fp32 fits a few GB:
 *
 *   prompts --tokenizer+CLIP--> embeddings --UNet x steps--> latents --VAE--> images
 *
 * Prompt encoding (db_sd_encode_prompt): the prompt is parsed for emphasis
 * (libcommon/sd/prompt.h), tokenised fragment by fragment, and cut into
 * chunks of 75 tokens (at a BREAK, or back at the last comma when one lies
 * within the last 20 tokens, as A1111 does); each chunk is BOS + tokens + EOS
 * padded with EOS to 77, encoded separately, its hidden states multiplied by
 * the token weights and rescaled to the chunk's original mean; the chunks are
 * concatenated along the token axis (T = 77 k).  A prompt without emphasis
 * and within 75 tokens gives exactly diffusers' embedding.  The negative
 * prompt is padded to the same number of chunks with encodings of an empty
 * chunk. */
#ifndef DB_TXT2IMG_H
#define DB_TXT2IMG_H

#include <stdint.h>

#include "../core/err.h"
#include "../core/log.h"
#include "../io/model.h"
#include "kernels/ops.h"

typedef struct db_tokenizer db_tokenizer;
typedef struct db_clip db_clip;
typedef struct db_unet db_unet;
typedef struct db_vae db_vae;

typedef struct db_sd {
    db_ctx *ctx;
    db_model model;
    int threads;
    /* keep_models = 1: the networks stay loaded between db_txt2img calls
     * (db-prior calls it once per sample); 0: each is freed as soon as its
     * stage ends, for the lowest peak memory (db-sample). */
    int keep_models;
    /* borrowed = 1: tok, clip and unet belong to the caller (db-train's
     * validation samples use the networks being trained); db_txt2img never
     * frees them, on success or failure, and db_sd_close is not called
     * (the caller frees the VAE it leaves behind, with db_vae_free). */
    int borrowed;
    db_tokenizer *tok;
    db_clip *clip;
    db_unet *unet;
    db_vae *vae;
    /* The denoising step's buffers and its recorded graph (txt2img.c),
     * kept between db_txt2img calls when keep_models is set and the
     * networks are not borrowed, while the batch, size, guidance and
     * prompt length stay: a run of many calls (db-prior: one a sample)
     * records the step's graph once, where each call recorded it again at
     * its second step (its first ran op by op).  db_sd_close frees it; a
     * caller that frees the networks itself calls db_sd_drop_step first. */
    struct db_sd_step *step;
} db_sd;

int db_sd_open(db_sd *sd, const char *path, const db_model_opts *mo, int threads, db_err *err);
/* The same on a device named as --device takes it ("cpu", "cuda", "cuda:N"). */
int db_sd_open_device(db_sd *sd, const char *path, const db_model_opts *mo, const char *device, int threads,
                      db_err *err);
void db_sd_close(db_sd *sd);
/* Free the kept denoising step (above), if any. */
void db_sd_drop_step(db_sd *sd);

/* Embedding of one prompt: *emb (T, D) malloc'd, *T = 77 * chunks.
 * clip_skip 1 = last layer (diffusers), 2 = penultimate + final norm (A1111). */
int db_sd_encode_prompt(db_tokenizer *tok, db_clip *clip, const char *prompt, int clip_skip, float **emb, int *T,
                        db_err *err);

typedef struct db_txt2img_opts {
    const char *prompt, *negative; /* negative may be NULL: "" */
    const char *scheduler;         /* "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddpm" */
    int steps;
    double guidance;               /* <= 1: no classifier-free guidance */
    double eta;                    /* DDIM only */
    int width, height;             /* pixels, multiples of 8 */
    int n_images;                  /* images in all */
    int batch;                     /* images per UNet call */
    uint64_t seed;
    int first_index;               /* image i of the run uses noise stream first_index + i */
    int clip_skip;
    const float *init_latents;     /* (n_images, 4, h, w) instead of seeded noise, or NULL */
    int no_graph;                  /* 1: run every denoising step directly; 0: from the
                                      second step on, replay the step's device work as one
                                      graph (kernels/ops.h db_graph_capture; CUDA graphs on
                                      a GPU, the same calls on the CPU) */
    int host_step;                 /* 1: the scheduler's step on the host between the UNet's
                                      calls, as every scheduler but DDIM without noise steps;
                                      0: DDIM with eta 0 steps on the ctx's device
                                      (db_ddim_step_forward: the same bits), the host queuing
                                      step after step (a GPU then never waits for it) */
    const db_log *log;             /* progress on stderr, or NULL */
    int progress;
} db_txt2img_opts;

typedef struct db_txt2img_out {
    float *latents;   /* (n, 4, h, w) final latents, unscaled as the sampler leaves them */
    float *images;    /* (n, 3, H, W) in [-1, 1], or NULL when decode == 0 */
    float *step_latents; /* (steps, n, 4, h, w) when trace was asked, else NULL */
    float *prompt_embeds, *negative_embeds; /* (T, D) each */
    int T, D;
} db_txt2img_out;

/* Run the whole pipeline.  decode 0 skips the VAE (latents only). */
int db_txt2img(db_sd *sd, const db_txt2img_opts *o, int decode, int trace, db_txt2img_out *out, db_err *err);
void db_txt2img_out_free(db_txt2img_out *out);

#endif
