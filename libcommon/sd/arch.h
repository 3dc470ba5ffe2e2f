/* SD1.x-family architecture: what a UNet, VAE and CLIP text encoder look like,
 * from diffusers config.json files or detected from single-file tensor shapes,
 * and the one table of every tensor (CompVis name <-> diffusers name, shapes,
 * init kind) generated from it.  Sizes are never hard-coded elsewhere.
 *
 * Internal tensor names are the CompVis single-file names (with their
 * "model.diffusion_model." / "first_stage_model." /
 * "cond_stage_model.transformer." prefixes); diffusers names are relative to
 * the component folder (unet/, vae/, text_encoder/).
 */
#ifndef DB_ARCH_H
#define DB_ARCH_H

#include <jansson.h>
#include <stdint.h>

#include "../core/err.h"

#define DB_MAXLEVELS 8

typedef enum db_component { DB_COMP_UNET = 0, DB_COMP_VAE, DB_COMP_TEXT, DB_NCOMP } db_component;

/* "unet", "vae", "text_encoder" */
const char *db_comp_name(int comp);
/* "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer." */
const char *db_comp_prefix(int comp);
/* Component of a CompVis name by prefix, or -1. */
int db_comp_of_compvis(const char *name);

typedef struct db_unet_arch {
    int in_channels, out_channels;
    int nlevels;                       /* len(block_out_channels) */
    int block_out[DB_MAXLEVELS];       /* 320 640 1280 1280 */
    int cross_attn[DB_MAXLEVELS];      /* down level i has transformers (CrossAttnDownBlock2D) */
    int up_cross_attn[DB_MAXLEVELS];   /* up level i (in up order) has transformers */
    int heads[DB_MAXLEVELS];           /* attention heads per level (diffusers' attention_head_dim for SD1) */
    int layers_per_block;
    int transformer_depth;             /* transformer_layers_per_block */
    int context_dim;                   /* cross_attention_dim */
    int use_linear_projection;         /* proj_in/out linear (SD2) vs 1x1 conv (SD1) */
    int norm_groups;
    double norm_eps;
    int sample_size;
    int flip_sin_to_cos, freq_shift;
    int time_embed_dim;                /* 4 * block_out[0] */
} db_unet_arch;

typedef struct db_vae_arch {
    int in_channels, out_channels, latent_channels;
    int nlevels;
    int block_out[DB_MAXLEVELS];       /* 128 256 512 512 */
    int layers_per_block;
    int norm_groups;
    int sample_size;
    double scaling_factor;             /* 0.18215 for SD1.x */
} db_vae_arch;

typedef struct db_text_arch {
    int vocab_size, max_positions, hidden, intermediate, layers, heads;
    int quick_gelu;                    /* hidden_act: quick_gelu (1) or gelu (0) */
    double eps;
    int has_position_ids;              /* the position_ids buffer is stored */
} db_text_arch;

typedef struct db_arch {
    db_unet_arch unet;
    db_vae_arch vae;
    db_text_arch text;
} db_arch;

/* Presets: "sd15" (real SD1.5 sizes) and "tiny" (the tiny-dev test model). */
int db_arch_preset(db_arch *a, const char *name, db_err *err);
/* From diffusers config.json objects (any may be NULL: that component keeps
 * its current values).  Unsupported options are refused with a message. */
int db_arch_from_config(db_arch *a, const json_t *unet, const json_t *vae, const json_t *text, db_err *err);
/* diffusers-style config.json object for one component (new reference). */
json_t *db_arch_to_config(const db_arch *a, int comp);

/* Every tensor of the architecture, in a stable order. */
typedef enum { DB_INIT_ZERO, DB_INIT_ONE, DB_INIT_LINEAR_W, DB_INIT_LINEAR_B, DB_INIT_CONV_W,
               DB_INIT_CONV_B, DB_INIT_EMBED, DB_INIT_POSITION_IDS } db_init_kind;

typedef struct db_tname {
    int comp;
    char compvis[160];    /* full CompVis name */
    char diffusers[160];  /* name inside the component's folder */
    int ndim;
    int64_t shape[4];     /* CompVis shape */
    int diff_ndim;
    int64_t diff_shape[4];/* diffusers shape (differs only for VAE mid attention) */
    int init;             /* db_init_kind */
    int64_t fan_in;       /* for PyTorch-like default init */
} db_tname;

/* Fills a malloc'd array (caller frees). */
int db_arch_names(const db_arch *a, db_tname **out, size_t *n, db_err *err);

/* Detect the architecture from CompVis-named tensors (a single file) and
 * check it for consistency; `names`/`shapes` describe n tensors. */
struct db_tindex;
int db_arch_detect(db_arch *a, const struct db_tindex *ix, db_err *err);

/* Older diffusers VAE attention names (query/key/value/proj_attn) to current
 * ones (to_q/to_k/to_v/to_out.0); returns NULL when `name` is not legacy.
 * Result is written to buf. */
const char *db_vae_legacy_name(const char *name, char *buf, size_t n);

#endif
