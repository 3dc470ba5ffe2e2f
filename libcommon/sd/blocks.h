/* The building blocks of the SD models, each a forward function that saves
 * what its backward will need (karpathy/llm.c, grown to blocks):
 *
 *   db_resblock        ResnetBlock2D: GN+SiLU, conv3x3, (+ time embedding),
 *                      GN+SiLU, conv3x3, + shortcut (identity or 1x1 conv).
 *                      UNet (with time embedding) and VAE (without).
 *   db_mha             multi-head attention with q/k/v/out projections, self
 *                      or cross, optional biases and causal mask: UNet attn1 /
 *                      attn2, VAE mid attention (1 head, biases), CLIP (causal).
 *   db_tblock          diffusers BasicTransformerBlock: LN, self-attention,
 *                      LN, cross-attention, LN, GEGLU feed-forward, residuals.
 *   db_transformer2d   Transformer2DModel / CompVis SpatialTransformer: GN,
 *                      proj_in, depth x db_tblock, proj_out, + input.
 *
 * Each block has three things:
 *   a weight struct     pointers into a db_weights block plus the sizes;
 *   an acts struct      pointers to the activations the forward saves (llm.c's
 *                       "saved for backward"), carved out of caller memory by
 *                       db_X_acts_carve(acts, base, w, sizes): it returns how
 *                       many floats the block needs (base NULL: only count),
 *                       each piece 64-byte aligned when base is;
 *   a forward           (ctx, out, acts, inputs..., weights, sizes), llm.c's
 *                       argument order;
 *   a backward          the forward's mirror (see "backward" below).
 * The owner decides the memory: training keeps one acts region per block;
 * inference may give every block the same region (nothing is read after the
 * block returns).  No block allocates or frees memory when it runs.
 *
 * Equivalence used by db_transformer2d: SD1's 1x1-conv proj_in/proj_out and
 * SD2's linear ones are the same matrix product (a conv weight (C, C, 1, 1)
 * is a linear weight (C, C)); applied to tokens (B, HW, C) both variants run
 * one code path: tokens = transpose(GN(x)), linear, blocks, linear,
 * transpose back, + x.
 *
 * Legend: B batch, C channels (in), OC channels out, H W spatial, HW = H*W,
 * G norm groups, T tokens (Tq queries, Tk keys), D context width, NH heads,
 * HS head size (C = NH*HS), N = B*HW tokens, E time-embedding width.
 *
 * Numerics follow diffusers 0.27: ResnetBlock2D GroupNorm eps from the model
 * (UNet norm_eps 1e-5, VAE 1e-6); Transformer2DModel GroupNorm eps 1e-6;
 * BasicTransformerBlock LayerNorm eps 1e-5; attention scale 1/sqrt(HS);
 * GEGLU gate through exact (erf) GELU.
 */
#ifndef DB_SD_BLOCKS_H
#define DB_SD_BLOCKS_H

#include <stddef.h>

#include "kernels/ops.h"

/* ---- ResBlock ---------------------------------------------------------------- */

typedef struct db_resblock {
    int C, OC;           /* channels in, out */
    int E;               /* time-embedding width; 0: no time embedding (VAE) */
    int G;               /* norm groups */
    float eps;           /* GroupNorm eps */
    const float *norm1_w, *norm1_b; /* (C) */
    const float *conv1_w, *conv1_b; /* (OC, C, 3, 3), (OC) */
    const float *emb_w, *emb_b;     /* (OC, E), (OC); NULL when E == 0 */
    const float *norm2_w, *norm2_b; /* (OC) */
    const float *conv2_w, *conv2_b; /* (OC, OC, 3, 3), (OC) */
    const float *skip_w, *skip_b;   /* 1x1 conv (OC, C, 1, 1), (OC); NULL: identity (C == OC) */
} db_resblock;

typedef struct db_resblock_acts {
    float *mean1, *rstd1; /* (B, G) norm1 statistics */
    float *h1;            /* (B, C, HW)  silu(norm1(x)): conv1's input */
    float *eproj;         /* (B, OC)     emb_layers(silu(temb)); NULL when E == 0 */
    float *h2;            /* (B, OC, HW) conv1(h1) + eproj: norm2's input */
    float *mean2, *rstd2; /* (B, G) norm2 statistics */
    float *h3;            /* (B, OC, HW) silu(norm2(h2)): conv2's input (dropout 0) */
} db_resblock_acts;

size_t db_resblock_acts_carve(db_resblock_acts *a, float *base, const db_resblock *w, int B, int HW);

/* out (B, OC, H, W) = shortcut(inp) + conv2(h3).
 * inp (B, C, H, W); emb (B, E) the time embedding after SiLU (diffusers
 * applies the nonlinearity to temb inside every block; the UNet computes it
 * once), NULL when E == 0 -- or when the caller has made a->eproj itself
 * (the UNet makes every block's at once: db_linear_fan_forward).  out must
 * not overlap inp or the acts. */
int db_resblock_forward(db_ctx *c, float *out, const db_resblock_acts *a, const float *inp, const float *emb,
                        const db_resblock *w, int B, int H, int W);

/* ---- multi-head attention ---------------------------------------------------- */

typedef struct db_mha {
    int C;      /* query width = inner width (NH * HS) = output width */
    int D;      /* key/value source width (C for self-attention, context width for cross) */
    int NH;     /* heads; HS = C / NH */
    const float *q_w, *q_b; /* (C, C), (C) or NULL */
    const float *k_w, *k_b; /* (C, D), (C) or NULL */
    const float *v_w, *v_b; /* (C, D), (C) or NULL */
    const float *o_w, *o_b; /* (C, C), (C) or NULL */
} db_mha;

typedef struct db_mha_acts {
    float *q;   /* (B, Tq, C) */
    float *k;   /* (B, Tk, C) */
    float *v;   /* (B, Tk, C) */
    float *o;   /* (B, Tq, C)  attention output (heads side by side): o-projection input */
    float *lse; /* (B, NH, Tq) log-sum-exp of each query's scaled scores */
    int noq;    /* 1: no backward reads q, k, v (inference: db_tblock_acts_carve's keep_proj 0),
                 * so self-attention need not write them (db_attention_qkv_forward) */
} db_mha_acts;

size_t db_mha_acts_carve(db_mha_acts *a, float *base, const db_mha *w, int B, int Tq, int Tk);

/* out (B, Tq, C) = o_proj(attention(q_proj(x), k_proj(kv), v_proj(kv))) + res.
 * x (B, Tq, C); kv (B, Tk, D) (kv == x, Tk == Tq, D == C for self-attention);
 * res (B, Tq, C) the residual, added in the projection's pass
 * (db_linear_add_forward), or NULL.  out must not overlap x, kv, res or the
 * acts. */
int db_mha_forward(db_ctx *c, float *out, const db_mha_acts *a, const float *x, const float *kv, const float *res,
                   const db_mha *w, int B, int Tq, int Tk, int causal);
/* The k and v projections of a cross-attention's input kv (B, Tk, D) into
 * k and v (B, Tk, C) each: the very op db_mha_forward makes of them, so
 * the same bits. */
int db_mha_kv_forward(db_ctx *c, float *k, float *v, const float *kv, const db_mha *w, int B, int Tk);
/* db_mha_forward of a cross-attention whose k and v (B, Tk, C) are made
 * already (db_mha_kv_forward): the same output bits; a->k and a->v are not
 * written (where k, v are not theirs, no backward may read them). */
int db_mha_forward_kv(db_ctx *c, float *out, const db_mha_acts *a, const float *x, const float *k, const float *v,
                      const float *res, const db_mha *w, int B, int Tq, int Tk, int causal);

/* ---- BasicTransformerBlock ---------------------------------------------------- */

typedef struct db_tblock {
    int C;      /* width */
    int FF;     /* feed-forward inner width (4C); the GEGLU projection gives 2 FF */
    float eps;  /* LayerNorm eps */
    const float *norm1_w, *norm1_b; /* (C) */
    db_mha attn1;                   /* self-attention, no q/k/v bias */
    const float *norm2_w, *norm2_b; /* (C) */
    db_mha attn2;                   /* cross-attention to the context (D wide) */
    const float *norm3_w, *norm3_b; /* (C) */
    const float *ff1_w, *ff1_b;     /* GEGLU projection (2 FF, C), (2 FF) */
    const float *ff2_w, *ff2_b;     /* (C, FF), (C) */
} db_tblock;

typedef struct db_tblock_acts {
    float *mean1, *rstd1; /* (N) */
    float *a1;            /* (N, C)   norm1(x) */
    db_mha_acts at1;      /* self-attention (Tq = Tk = HW) */
    float *x1;            /* (N, C)   x + attn1: norm2's input */
    float *mean2, *rstd2; /* (N) */
    float *a2;            /* (N, C)   norm2(x1) */
    db_mha_acts at2;      /* cross-attention (Tk = context tokens) */
    float *x2;            /* (N, C)   x1 + attn2: norm3's input */
    float *mean3, *rstd3; /* (N) */
    float *a3;            /* (N, C)   norm3(x2) */
    float *f1;            /* (N, 2FF) GEGLU projection: GEGLU's input (NULL: not kept) */
    /* the cross-attention's k and v of this forward's context, made ahead
     * (db_mha_kv_forward; the UNet's db_unet_cache_context), or NULL: made
     * by the forward into at2.  Set by the owner after the carve, for
     * inference only (the backward reads at2's). */
    const float *k2c, *v2c;
    float *g;             /* (N, FF)  hidden * gelu(gate): ff2's input */
} db_tblock_acts;

/* T tokens per image, Tc context tokens.  keep_proj 0 (inference: no
 * backward reads it): no room for f1, which the forward then never writes
 * (db_linear_geglu_forward's proj NULL). */
size_t db_tblock_acts_carve(db_tblock_acts *a, float *base, const db_tblock *w, int B, int T, int Tc, int keep_proj);

/* out (B, T, C) = x3, where x1 = x + attn1(norm1 x), x2 = x1 + attn2(norm2 x1, ctx),
 * x3 = x2 + ff(norm3 x2).  x (B, T, C); ctx (B, Tc, D).  out must not overlap
 * x or the acts. */
int db_tblock_forward(db_ctx *c, float *out, const db_tblock_acts *a, const float *x, const float *ctx,
                      const db_tblock *w, int B, int T, int Tc);

/* ---- Transformer2D (SpatialTransformer) ---------------------------------------- */

typedef struct db_transformer2d {
    int C;      /* channels = inner width (SD1/SD2: heads * head size == C) */
    int G;      /* GroupNorm groups */
    float eps;  /* GroupNorm eps (1e-6) */
    int depth;  /* transformer blocks */
    const float *norm_w, *norm_b;   /* (C) */
    const float *in_w, *in_b;       /* proj_in: (C, C) or (C, C, 1, 1), (C) */
    db_tblock *blk;                 /* (depth), owned by whoever fills this struct */
    const float *out_w, *out_b;     /* proj_out: (C, C) or (C, C, 1, 1), (C) */
} db_transformer2d;

typedef struct db_transformer2d_acts {
    float *mean, *rstd;   /* (B, G) */
    float *hn;            /* (B, C, HW) norm(x) */
    float *tok;           /* (B, HW, C) transpose(hn): proj_in's input */
    float *x0;            /* (B, HW, C) proj_in(tok): the first block's input */
    db_tblock_acts *blk;  /* (depth) caller-provided array, filled by the carve */
    float *bout;          /* (depth, B, HW, C) each block's output (the last is proj_out's input) */
    float *y;             /* (B, HW, C) proj_out(...): scratch, not needed by backward */
} db_transformer2d_acts;

/* a->blk must point to w->depth entries (or be NULL when base is NULL).
 * keep_proj: db_tblock_acts_carve's. */
size_t db_transformer2d_acts_carve(db_transformer2d_acts *a, float *base, const db_transformer2d *w, int B, int HW,
                                   int Tc, int keep_proj);

/* out (B, C, H, W) = x + transpose(proj_out(blocks(proj_in(transpose(norm(x)))))).
 * x (B, C, H, W); ctx (B, Tc, D).  out must not overlap x or the acts. */
int db_transformer2d_forward(db_ctx *c, float *out, const db_transformer2d_acts *a, const float *x, const float *ctx,
                             const db_transformer2d *w, int B, int H, int W, int Tc);

/* ---- backward ------------------------------------------------------------------------ */
/* Each block's backward mirrors its forward (llm.c): activation gradients
 * first (assigned, =), then the parameter gradients, dout, the saved
 * activations, the forward's inputs, weights and sizes, and last a scratch
 * region of db_X_backward_scratch(...) floats (caller memory, 64-byte
 * aligned; nothing is read from it after the call).
 *
 * Parameter gradients live in a buffer with the weights' layout (llm.c:
 * gradients share the parameters' size table): the gradient of the weight at
 * w + i is at g + i.  They accumulate (+=); g == NULL (or a NULL map) is a
 * frozen block: only the input gradients are computed.  fresh 1: the
 * gradients of the block's weights are reset for this backward, which makes
 * each weight's one contribution, so its ops assign it (ops.h `assign`: the
 * bits of += into zeros, the gradients neither reset nor read).
 * The blocks must be run after their forward with the same acts and inputs. */
typedef struct db_gradmap {
    const float *w; /* start of the weight buffer (db_weights.data) */
    float *g;       /* start of the gradient buffer of the same layout; NULL: frozen */
    int fresh;      /* 1: assigned (=) where they would be added, as above; DB_ASSIGN_PACK16
                     * (ops.h): the same, the linear and convolution weights' packed */
} db_gradmap;

/* dinp (B, C, H, W) =; demb (B, E) += (every ResBlock reads the same
 * embedding), may be NULL; dout (B, OC, H, W).  dinp must not overlap dout. */
size_t db_resblock_backward_scratch(const db_resblock *w, int B, int HW);
int db_resblock_backward(db_ctx *c, float *dinp, float *demb, const db_gradmap *g, const float *dout,
                         const db_resblock_acts *a, const float *inp, const float *emb, const db_resblock *w, int B,
                         int H, int W, float *scratch);

/* dx (B, Tq, C) =; dkv (B, Tk, D) += or NULL (not needed).  Self-attention
 * (kv == x): dkv must be NULL and the k/v gradients are added into dx. */
size_t db_mha_backward_scratch(const db_mha *w, int B, int Tq, int Tk);
int db_mha_backward(db_ctx *c, float *dx, float *dkv, const db_gradmap *g, const float *dout, const db_mha_acts *a,
                    const float *x, const float *kv, const db_mha *w, int B, int Tq, int Tk, int causal,
                    float *scratch);

/* dx (B, T, C) =; dctx (B, Tc, D) += or NULL; dout (B, T, C). */
size_t db_tblock_backward_scratch(const db_tblock *w, int B, int T, int Tc);
int db_tblock_backward(db_ctx *c, float *dx, float *dctx, const db_gradmap *g, const float *dout,
                       const db_tblock_acts *a, const float *x, const float *ctx, const db_tblock *w, int B, int T,
                       int Tc, float *scratch);

/* dx (B, C, H, W) =; dctx (B, Tc, D) += or NULL; dout (B, C, H, W). */
size_t db_transformer2d_backward_scratch(const db_transformer2d *w, int B, int HW, int Tc);
int db_transformer2d_backward(db_ctx *c, float *dx, float *dctx, const db_gradmap *g, const float *dout,
                              const db_transformer2d_acts *a, const float *x, const float *ctx,
                              const db_transformer2d *w, int B, int H, int W, int Tc, float *scratch);

#endif
