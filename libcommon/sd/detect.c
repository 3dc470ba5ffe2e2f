/* Architecture from a single file's tensor shapes (stable-diffusion.cpp's
 * habit), then checked against the table generated from it, so what is
 * detected is exactly what the loader and the forward code will expect.
 *
 * Read from the weights (CompVis names, prefixes left out below):
 *   UNet   input_blocks.0.0.weight (C0, in, 3, 3)        C0, in_channels
 *          time_embed.0.weight (T, C0)                   time_embed_dim
 *          out.2.weight (out, C0, 3, 3)                  out_channels
 *          input_blocks.k.0.out_layers.3 / .0.op         levels, block_out, layers_per_block
 *          input_blocks.k.1.norm / output_blocks.k.1.norm which levels attend
 *          middle_block.1...attn2.to_k.weight (C, ctx)   context_dim
 *          middle_block.1.proj_in.weight 2-D or 4-D      linear vs 1x1-conv projection
 *          middle_block.1.transformer_blocks.N           transformer depth
 *   VAE    encoder.conv_in / encoder.down.i.block.j / post_quant_conv / decoder.conv_out
 *   text   token_embedding (V, D), position_embedding (P, D), encoder.layers.N,
 *          mlp.fc1 (I, D), position_ids present or not
 * The rest follows the rules documented in arch.h. */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../io/tindex.h"
#include "arch.h"

static const char *const comp_human[DB_NCOMP] = {"UNet", "VAE", "text encoder"};

/* The entry named <prefix of comp><fmt...>, or NULL; the full name goes to
 * name (for messages). */
static const db_tentry *vget(const db_tindex *ix, int comp, char *name, size_t n, const char *fmt, va_list ap)
{
    size_t p = (size_t)snprintf(name, n, "%s", db_comp_prefix(comp));
    if (p >= n || (size_t)vsnprintf(name + p, n - p, fmt, ap) >= n - p)
        return NULL;
    long i = db_tindex_find(ix, name);
    return i < 0 ? NULL : &ix->v[i];
}

static const db_tentry *get(const db_tindex *ix, int comp, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static const db_tentry *get(const db_tindex *ix, int comp, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    const db_tentry *e = vget(ix, comp, name, sizeof name, fmt, ap);
    va_end(ap);
    return e;
}

/* Like get, but the tensor must exist with ndim dims (any of 2 and 4 when
 * ndim is 0). */
static const db_tentry *need(const db_tindex *ix, int comp, int ndim, db_err *err, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static const db_tentry *need(const db_tindex *ix, int comp, int ndim, db_err *err, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    const db_tentry *e = vget(ix, comp, name, sizeof name, fmt, ap);
    va_end(ap);
    if (!e) {
        db_err_set(err, DB_EFORMAT, "missing tensor '%s'", name);
        return NULL;
    }
    if (ndim ? e->ndim != ndim : e->ndim != 2 && e->ndim != 4) {
        char s[96];
        db_err_set(err, DB_EFORMAT, "tensor '%s': shape %s, expected %s dimensions", name,
                   db_shape_str(s, sizeof s, e->ndim, e->shape), ndim == 2 ? "2" : ndim == 4 ? "4" : "2 or 4");
        return NULL;
    }
    return e;
}

/* A dimension as an int; out-of-range sizes become -1 so validation refuses
 * them instead of wrapping. */
static int dim(const db_tentry *e, int k)
{
    return e->shape[k] > 0 && e->shape[k] <= INT_MAX / 16 ? (int)e->shape[k] : -1;
}

static int has_prefix(const db_tindex *ix, const char *prefix)
{
    size_t n = strlen(prefix);
    for (size_t i = 0; i < ix->n; i++)
        if (!strncmp(ix->v[i].name, prefix, n))
            return 1;
    return 0;
}

static int detect_unet(db_unet_arch *u, const db_tindex *ix, db_err *err)
{
    const int C = DB_COMP_UNET;
    const db_tentry *e;
    memset(u, 0, sizeof *u);
    if (!(e = need(ix, C, 4, err, "input_blocks.0.0.weight")))
        return -1;
    u->in_channels = dim(e, 1);
    if (!(e = need(ix, C, 2, err, "time_embed.0.weight")))
        return -1;
    u->time_embed_dim = dim(e, 0);
    if (!(e = need(ix, C, 4, err, "out.2.weight")))
        return -1;
    u->out_channels = dim(e, 0);

    /* input blocks: runs of ResBlocks, each run closed by a downsampler */
    int blk = 1, nres = 0, L = 0, lpb = -1;
    for (;; blk++) {
        /* a ResBlock's output conv (C, C, 3, 3) gives the level's width: it
         * does not depend on the previous level, so a wrong in_layers shape
         * is reported as itself by the check */
        if ((e = get(ix, C, "input_blocks.%d.0.out_layers.3.weight", blk)) && e->ndim == 4) {
            if (L == DB_MAXLEVELS)
                return db_err_set(err, DB_EUNSUPP, "UNet has more than %d levels", DB_MAXLEVELS);
            if (nres++ == 0) {
                u->block_out[L] = dim(e, 0);
                u->cross_attn[L] = get(ix, C, "input_blocks.%d.1.norm.weight", blk) != NULL;
            }
        } else if (get(ix, C, "input_blocks.%d.0.op.weight", blk)) {
            if (nres == 0)
                break; /* a downsampler with no ResBlock before it: let the check name it */
            if (lpb < 0)
                lpb = nres;
            L++;
            nres = 0;
        } else {
            break;
        }
    }
    if (nres > 0) {
        if (lpb < 0)
            lpb = nres;
        L++;
    }
    if (L == 0)
        return db_err_set(err, DB_EFORMAT, "missing tensor '%sinput_blocks.1.0.out_layers.3.weight'",
                          db_comp_prefix(C));
    u->nlevels = L;
    u->layers_per_block = lpb;

    /* the mid block always attends (UNetMidBlock2DCrossAttn): read the
     * transformer's sizes there */
    if (!(e = need(ix, C, 2, err, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")))
        return -1;
    u->context_dim = dim(e, 1);
    if (!(e = need(ix, C, 0, err, "middle_block.1.proj_in.weight")))
        return -1;
    u->use_linear_projection = e->ndim == 2;
    while (get(ix, C, "middle_block.1.transformer_blocks.%d.norm1.weight", u->transformer_depth))
        u->transformer_depth++;
    for (int up = 0; up < L; up++)
        u->up_cross_attn[up] = get(ix, C, "output_blocks.%d.1.norm.weight", up * (lpb + 1)) != NULL;

    /* not in the weights: SD1.x has 8 heads everywhere; SD2.x (OpenCLIP-H
     * context, 1024) has 64-wide heads */
    for (int i = 0; i < L; i++)
        u->heads[i] = u->context_dim == 1024 ? u->block_out[i] / 64 : 8;
    u->norm_groups = 32;
    u->norm_eps = 1e-5;
    u->sample_size = 64;
    u->flip_sin_to_cos = 1;
    u->freq_shift = 0;
    return 0;
}

static int detect_vae(db_vae_arch *v, const db_tindex *ix, db_err *err)
{
    const int C = DB_COMP_VAE;
    const db_tentry *e;
    memset(v, 0, sizeof *v);
    if (!(e = need(ix, C, 4, err, "encoder.conv_in.weight")))
        return -1;
    v->in_channels = dim(e, 1);
    if (!(e = need(ix, C, 4, err, "decoder.conv_out.weight")))
        return -1;
    v->out_channels = dim(e, 0);
    if (!(e = need(ix, C, 4, err, "post_quant_conv.weight")))
        return -1;
    v->latent_channels = dim(e, 0);
    while ((e = get(ix, C, "encoder.down.%d.block.0.conv1.weight", v->nlevels)) && e->ndim == 4) {
        if (v->nlevels == DB_MAXLEVELS)
            return db_err_set(err, DB_EUNSUPP, "VAE has more than %d levels", DB_MAXLEVELS);
        v->block_out[v->nlevels++] = dim(e, 0);
    }
    if (v->nlevels == 0)
        return db_err_set(err, DB_EFORMAT, "missing tensor '%sencoder.down.0.block.0.conv1.weight'", db_comp_prefix(C));
    while (get(ix, C, "encoder.down.0.block.%d.conv1.weight", v->layers_per_block))
        v->layers_per_block++;
    v->norm_groups = 32;
    v->sample_size = 512;
    v->scaling_factor = 0.18215;
    return 0;
}

static int detect_text(db_text_arch *t, const db_tindex *ix, db_err *err)
{
    const int C = DB_COMP_TEXT;
    const db_tentry *e;
    memset(t, 0, sizeof *t);
    if (!(e = need(ix, C, 2, err, "text_model.embeddings.token_embedding.weight")))
        return -1;
    t->vocab_size = dim(e, 0);
    t->hidden = dim(e, 1);
    if (!(e = need(ix, C, 2, err, "text_model.embeddings.position_embedding.weight")))
        return -1;
    t->max_positions = dim(e, 0);
    if (!(e = need(ix, C, 2, err, "text_model.encoder.layers.0.mlp.fc1.weight")))
        return -1;
    t->intermediate = dim(e, 0);
    while (get(ix, C, "text_model.encoder.layers.%d.self_attn.q_proj.weight", t->layers))
        t->layers++;
    t->has_position_ids = get(ix, C, "text_model.embeddings.position_ids") != NULL;
    /* not in the weights: CLIP's heads are 64 wide (ViT-L/14: 768/64 = 12);
     * dev-sized models use 8 heads */
    t->heads = t->hidden >= 64 && t->hidden % 64 == 0 ? t->hidden / 64 : t->hidden / 8;
    if (t->heads < 1)
        t->heads = 1;
    t->quick_gelu = 1;
    t->eps = 1e-5;
    return 0;
}

/* The components of `a` in comps, the others from a valid preset, so the
 * table can be generated for a subset. */
static void only(db_arch *dst, const db_arch *a, unsigned comps)
{
    db_err ignore;
    db_arch_preset(dst, "tiny", &ignore);
    if (comps & DB_COMP_BIT(DB_COMP_UNET))
        dst->unet = a->unet;
    if (comps & DB_COMP_BIT(DB_COMP_VAE))
        dst->vae = a->vae;
    if (comps & DB_COMP_BIT(DB_COMP_TEXT))
        dst->text = a->text;
}

static int check(const db_arch *arch, const db_tindex *ix, unsigned comps, const char *what, db_err *err)
{
    db_arch a;
    only(&a, arch, comps);
    db_tname *names;
    size_t n;
    if (db_arch_names(&a, &names, &n, err))
        return -1;
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const db_tname *t = &names[i];
        if (!(comps & DB_COMP_BIT(t->comp)))
            continue;
        long k = db_tindex_find(ix, t->compvis);
        if (k < 0) {
            rc = db_err_set(err, DB_EFORMAT, "missing tensor '%s' (the %s needs it)", t->compvis, what);
            break;
        }
        const db_tentry *e = &ix->v[k];
        /* VAE mid attention: 1x1 convs, or linears in files written from
         * newer diffusers layouts */
        if (db_shape_equal(e->ndim, e->shape, t->ndim, t->shape) ||
            db_shape_equal(e->ndim, e->shape, t->diff_ndim, t->diff_shape))
            continue;
        char have[96], want[96];
        rc = db_err_set(err, DB_EFORMAT, "tensor '%s': shape %s but the %s needs %s", t->compvis,
                        db_shape_str(have, sizeof have, e->ndim, e->shape), what,
                        db_shape_str(want, sizeof want, t->ndim, t->shape));
    }
    free(names);
    return rc;
}

int db_arch_check_tensors(const db_arch *a, const db_tindex *ix, unsigned comps, db_err *err)
{
    return check(a, ix, comps, "architecture", err);
}

int db_arch_detect_comps(db_arch *a, const db_tindex *ix, unsigned comps, db_err *err)
{
    db_arch d = *a;
    for (int c = 0; c < DB_NCOMP; c++) {
        if (!(comps & DB_COMP_BIT(c)))
            continue;
        if (!has_prefix(ix, db_comp_prefix(c)))
            return db_err_set(err, DB_EFORMAT, "no %s tensors ('%s*') in the checkpoint", comp_human[c],
                              db_comp_prefix(c));
        int rc = c == DB_COMP_UNET ? detect_unet(&d.unet, ix, err)
                 : c == DB_COMP_VAE ? detect_vae(&d.vae, ix, err)
                                    : detect_text(&d.text, ix, err);
        if (rc)
            return db_err_prefix(err, "detecting the %s", comp_human[c]);
    }
    if (db_arch_validate_comps(&d, comps, err))
        return db_err_prefix(err, "detected architecture");
    if (check(&d, ix, comps, "detected architecture", err))
        return -1;
    *a = d;
    return 0;
}

int db_arch_detect(db_arch *a, const db_tindex *ix, db_err *err)
{
    return db_arch_detect_comps(a, ix, DB_COMP_ALL, err);
}
