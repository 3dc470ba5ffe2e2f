/* SD1.x-family architecture: what a UNet, VAE and CLIP text encoder look like,
 * from diffusers config.json files or detected from single-file tensor shapes,
 * and the one table of every tensor (CompVis name <-> diffusers name, shapes,
 * init kind) generated from it.  Sizes are never hard-coded elsewhere.
 *
 * Internal tensor names are the CompVis single-file names (with their
 * "model.diffusion_model." / "first_stage_model." /
 * "cond_stage_model.transformer." prefixes); diffusers names are relative to
 * the component folder (unet/, vae/, text_encoder/).
 *
 * The name correspondence is the one of diffusers'
 * scripts/convert_diffusers_to_original_stable_diffusion.py (v0.27), checked
 * row for row against real SD1.5 in tests/unit/test_arch.c.
 *
 * Files: arch.c (presets, configs, component names), names.c (the tensor
 * table), detect.c (architecture from a single file's shapes).
 */
#ifndef DB_ARCH_H
#define DB_ARCH_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

#define DB_MAXLEVELS 8

typedef enum db_component { DB_COMP_UNET = 0, DB_COMP_VAE, DB_COMP_TEXT, DB_NCOMP } db_component;
/* Bit masks of components, for functions that take a set of them. */
#define DB_COMP_BIT(c) (1u << (c))
#define DB_COMP_ALL ((1u << DB_NCOMP) - 1)

/* "unet", "vae", "text_encoder" (NULL when out of range) */
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
    int heads[DB_MAXLEVELS];           /* attention heads per level (diffusers' attention_head_dim for SD1);
                                          the mid block uses heads[nlevels-1], up level u heads[nlevels-1-u] */
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
 * its current values).  A non-NULL component starts from the defaults of the
 * diffusers/transformers class (UNet2DConditionModel, AutoencoderKL,
 * CLIPTextConfig), as loading it in Python would; has_position_ids is set to 1
 * (transformers < 4.31 stores the buffer; loaders correct it from the files).
 * Unsupported options are refused with a message naming the key. */
int db_arch_from_config(db_arch *a, const json_t *unet, const json_t *vae, const json_t *text, db_err *err);
/* diffusers-style config.json object for one component (new reference). */
json_t *db_arch_to_config(const db_arch *a, int comp);

/* Internal consistency: positive sizes, group norms dividing channels, heads
 * dividing widths, at most DB_MAXLEVELS levels. */
int db_arch_validate(const db_arch *a, db_err *err);
/* The same for the components in `comps` (DB_COMP_BIT mask). */
int db_arch_validate_comps(const db_arch *a, unsigned comps, db_err *err);
/* 1 when the components in `comps` (DB_COMP_BIT mask) are equal; otherwise 0
 * and the first difference ("unet.block_out[1]: 640 vs 320") in why. */
int db_arch_equal(const db_arch *a, const db_arch *b, unsigned comps, char *why, size_t n);

/* Every tensor of the architecture, in a stable order. */
typedef enum { DB_INIT_ZERO, DB_INIT_ONE, DB_INIT_LINEAR_W, DB_INIT_LINEAR_B, DB_INIT_CONV_W,
               DB_INIT_CONV_B, DB_INIT_EMBED, DB_INIT_POSITION_IDS,
               DB_INIT_NORMAL /* N(0, init_std): CLIP's projections (transformers' _init_weights) */
} db_init_kind;

typedef struct db_tname {
    int comp;
    char compvis[160];    /* full CompVis name */
    char diffusers[160];  /* name inside the component's folder */
    int ndim;
    int64_t shape[4];     /* CompVis shape */
    int diff_ndim;
    int64_t diff_shape[4];/* diffusers shape (differs only for VAE mid attention) */
    int init;             /* db_init_kind */
    int64_t fan_in;       /* for PyTorch-like default init (weights and their biases) */
    float init_std;       /* DB_INIT_EMBED and DB_INIT_NORMAL: standard deviation */
} db_tname;

/* Fills a malloc'd array (caller frees).  Order: UNet, VAE, text encoder;
 * within each, the order of the forward pass. */
int db_arch_names(const db_arch *a, db_tname **out, size_t *n, db_err *err);

/* Detect the architecture from CompVis-named tensors (a single file) and
 * check it: every tensor of the regenerated table must exist with its shape.
 * Names the table does not know are not an error (the loader decides what to
 * ignore); a component with no tensors at all is.
 *
 * What the weights do not say follows documented rules:
 *   UNet heads: 8 per level when context_dim != 1024 (SD1.x), else
 *               channels/64 (SD2.x: head dim 64);
 *   text heads: hidden/64 when hidden >= 64 and divisible by 64, else hidden/8;
 *   norm groups 32, norm eps 1e-5 (UNet, text), quick_gelu, sin/cos flipped,
 *   freq shift 0, scaling factor 0.18215, sample sizes 64 (UNet) / 512 (VAE). */
struct db_tindex;
int db_arch_detect(db_arch *a, const struct db_tindex *ix, db_err *err);
/* The same for a subset of components (DB_COMP_BIT mask); the others of *a
 * are left as they are. */
int db_arch_detect_comps(db_arch *a, const struct db_tindex *ix, unsigned comps, db_err *err);
/* Check that ix holds every tensor of the architecture's components in
 * `comps` under its CompVis name with its shape (VAE mid attention: either
 * [C, C, 1, 1] or [C, C]); the first problem goes to err. */
int db_arch_check_tensors(const db_arch *a, const struct db_tindex *ix, unsigned comps, db_err *err);

/* Older diffusers VAE attention names (query/key/value/proj_attn) to current
 * ones (to_q/to_k/to_v/to_out.0); returns NULL when `name` is not legacy
 * (or buf is too small).  Result is written to buf. */
const char *db_vae_legacy_name(const char *name, char *buf, size_t n);

#endif
