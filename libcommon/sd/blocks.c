/* Forward passes of the SD building blocks (see blocks.h).  Every function
 * here only calls kernels/ops.h; a failed op leaves its reason in c->err
 * (sticky), so each block checks once at its end. */
#include "blocks.h"

#include <stdint.h>

/* ---- carving activation memory ------------------------------------------------- */

typedef struct carver {
    float *base; /* NULL: only count */
    size_t used; /* floats so far */
} carver;

/* n floats, rounded up to 16 (64 bytes) so every piece stays aligned. */
static float *take(carver *k, size_t n)
{
    float *p = k->base ? k->base + k->used : NULL;
    k->used += (n + 15) & ~(size_t)15;
    return p;
}

/* ---- ResBlock -------------------------------------------------------------------- */

size_t db_resblock_acts_carve(db_resblock_acts *a, float *base, const db_resblock *w, int B, int HW)
{
    carver k = {base, 0};
    const size_t b = (size_t)B, hw = (size_t)HW;
    a->mean1 = take(&k, b * w->G);
    a->rstd1 = take(&k, b * w->G);
    a->h1 = take(&k, b * w->C * hw);
    a->eproj = w->E ? take(&k, b * w->OC) : NULL;
    a->h2 = take(&k, b * w->OC * hw);
    a->mean2 = take(&k, b * w->G);
    a->rstd2 = take(&k, b * w->G);
    a->h3 = take(&k, b * w->OC * hw);
    return k.used;
}

int db_resblock_forward(db_ctx *c, float *out, const db_resblock_acts *a, const float *inp, const float *emb,
                        const db_resblock *w, int B, int H, int W)
{
    const int HW = H * W, C = w->C, OC = w->OC;
    /* h1 (B, C, HW) = silu(norm1(inp)) */
    db_groupnorm_forward(c, a->h1, a->mean1, a->rstd1, inp, w->norm1_w, w->norm1_b, B, C, HW, w->G, w->eps, 1);
    /* h2 (B, OC, HW) = conv1(h1) (+ emb_layers(emb) per channel, in the conv's own output pass) */
    if (w->E) {
        if (emb) /* (else the caller made it) */
            db_linear_forward(c, a->eproj, emb, w->emb_w, w->emb_b, B, w->E, OC); /* (B, OC) */
        db_conv2d_add_forward(c, a->h2, a->h1, w->conv1_w, w->conv1_b, a->eproj, 1, B, C, H, W, OC, 3, 3, 1, 1, 1);
    } else {
        db_conv2d_forward(c, a->h2, a->h1, w->conv1_w, w->conv1_b, B, C, H, W, OC, 3, 3, 1, 1, 1);
    }
    /* h3 (B, OC, HW) = silu(norm2(h2)) */
    db_groupnorm_forward(c, a->h3, a->mean2, a->rstd2, a->h2, w->norm2_w, w->norm2_b, B, OC, HW, w->G, w->eps, 1);
    /* out = shortcut(inp) + conv2(h3), as diffusers' ResnetBlock2D sums
     * conv_shortcut(input) (a 1x1 conv with its bias, rounded as one op)
     * and the block's output: the shortcut first, into out, then conv2 with
     * its sum onto it; without a shortcut conv2 onto inp itself */
    if (w->skip_w)
        db_conv2d_forward(c, out, inp, w->skip_w, w->skip_b, B, C, H, W, OC, 1, 1, 1, 0, 0);
    db_conv2d_add_forward(c, out, a->h3, w->conv2_w, w->conv2_b, w->skip_w ? out : inp, 0, B, OC, H, W, OC, 3, 3, 1,
                          1, 1);
    return c->err.code ? -1 : 0;
}

/* ---- multi-head attention ----------------------------------------------------------- */

size_t db_mha_acts_carve(db_mha_acts *a, float *base, const db_mha *w, int B, int Tq, int Tk)
{
    carver k = {base, 0};
    const size_t b = (size_t)B, C = (size_t)w->C;
    a->q = take(&k, b * Tq * C);
    a->k = take(&k, b * Tk * C);
    a->v = take(&k, b * Tk * C);
    a->o = take(&k, b * Tq * C);
    a->lse = take(&k, b * w->NH * Tq);
    a->noq = 0;
    return k.used;
}

int db_mha_forward(db_ctx *c, float *out, const db_mha_acts *a, const float *x, const float *kv, const float *res,
                   const db_mha *w, int B, int Tq, int Tk, int causal)
{
    const int C = w->C;
    /* the projections of one input in one op (its 16-bit copy made once);
     * without biases (SD's) with the attention too, whose 16-bit operands
     * they then are as they come (q, k, v written only for a backward) */
    if (kv == x && !w->q_b && !w->k_b && !w->v_b) {
        db_attention_qkv_forward(c, a->noq ? NULL : a->q, a->noq ? NULL : a->k, a->noq ? NULL : a->v, a->o, a->lse,
                                 x, w->q_w, w->k_w, w->v_w, B, Tq, C, w->NH, causal);
        db_linear_add_forward(c, out, a->o, w->o_w, w->o_b, res, B * Tq, C, C); /* (B, Tq, C) */
        return c->err.code ? -1 : 0;
    }
    if (kv != x) { /* cross-attention: k and v from kv, then the rest */
        db_mha_kv_forward(c, a->k, a->v, kv, w, B, Tk);
        return db_mha_forward_kv(c, out, a, x, a->k, a->v, res, w, B, Tq, Tk, causal);
    }
    float *const qkv[3] = {a->q, a->k, a->v};
    const float *const wt[3] = {w->q_w, w->k_w, w->v_w}, *const bs[3] = {w->q_b, w->k_b, w->v_b};
    db_linear_multi_forward(c, qkv, x, wt, bs, 3, B * Tq, C, C); /* (B, T, C) each */
    db_attention_forward(c, a->o, a->lse, a->q, a->k, a->v, B, Tq, Tk, w->NH, C / w->NH, causal);
    db_linear_add_forward(c, out, a->o, w->o_w, w->o_b, res, B * Tq, C, C); /* (B, Tq, C) */
    return c->err.code ? -1 : 0;
}

int db_mha_kv_forward(db_ctx *c, float *k, float *v, const float *kv, const db_mha *w, int B, int Tk)
{
    float *const kvo[2] = {k, v};
    const float *const wt[2] = {w->k_w, w->v_w}, *const bs[2] = {w->k_b, w->v_b};
    db_linear_multi_forward(c, kvo, kv, wt, bs, 2, B * Tk, w->D, w->C); /* (B, Tk, C) each */
    return c->err.code ? -1 : 0;
}

int db_mha_forward_kv(db_ctx *c, float *out, const db_mha_acts *a, const float *x, const float *k, const float *v,
                      const float *res, const db_mha *w, int B, int Tq, int Tk, int causal)
{
    const int C = w->C;
    db_linear_forward(c, a->q, x, w->q_w, w->q_b, B * Tq, C, C); /* (B, Tq, C) */
    db_attention_forward(c, a->o, a->lse, a->q, k, v, B, Tq, Tk, w->NH, C / w->NH, causal);
    db_linear_add_forward(c, out, a->o, w->o_w, w->o_b, res, B * Tq, C, C); /* (B, Tq, C) */
    return c->err.code ? -1 : 0;
}

/* ---- BasicTransformerBlock -------------------------------------------------------------- */

size_t db_tblock_acts_carve(db_tblock_acts *a, float *base, const db_tblock *w, int B, int T, int Tc, int keep_proj)
{
    carver k = {base, 0};
    const size_t N = (size_t)B * T, C = (size_t)w->C;
    a->mean1 = take(&k, N);
    a->rstd1 = take(&k, N);
    a->a1 = take(&k, N * C);
    k.used += db_mha_acts_carve(&a->at1, k.base ? k.base + k.used : NULL, &w->attn1, B, T, T);
    a->at1.noq = !keep_proj; /* (self-attention's q, k, v: only a backward reads them) */
    a->x1 = take(&k, N * C);
    a->mean2 = take(&k, N);
    a->rstd2 = take(&k, N);
    a->a2 = take(&k, N * C);
    k.used += db_mha_acts_carve(&a->at2, k.base ? k.base + k.used : NULL, &w->attn2, B, T, Tc);
    a->x2 = take(&k, N * C);
    a->mean3 = take(&k, N);
    a->rstd3 = take(&k, N);
    a->a3 = take(&k, N * C);
    a->f1 = keep_proj ? take(&k, N * 2 * (size_t)w->FF) : NULL;
    a->k2c = a->v2c = NULL;
    a->g = take(&k, N * (size_t)w->FF);
    return k.used;
}

int db_tblock_forward(db_ctx *c, float *out, const db_tblock_acts *a, const float *x, const float *ctx,
                      const db_tblock *w, int B, int T, int Tc)
{
    const int N = B * T, C = w->C;
    /* x1 = x + attn1(norm1(x)) */
    db_layernorm_forward(c, a->a1, a->mean1, a->rstd1, x, w->norm1_w, w->norm1_b, N, C, w->eps);
    db_mha_forward(c, a->x1, &a->at1, a->a1, a->a1, x, &w->attn1, B, T, T, 0);
    /* x2 = x1 + attn2(norm2(x1), ctx): the context's k and v first (or the
     * sampler's cached ones), so that the norm, q's projection, the
     * attention and its output projection run back to back -- on CUDA each
     * hands the next its output's 16-bit form (kernels/cuda/cuda.h twins) */
    const float *k2 = a->k2c, *v2 = a->v2c;
    if (!k2) {
        db_mha_kv_forward(c, a->at2.k, a->at2.v, ctx, &w->attn2, B, Tc);
        k2 = a->at2.k, v2 = a->at2.v;
    }
    db_layernorm_forward(c, a->a2, a->mean2, a->rstd2, a->x1, w->norm2_w, w->norm2_b, N, C, w->eps);
    db_mha_forward_kv(c, a->x2, &a->at2, a->a2, k2, v2, a->x1, &w->attn2, B, T, Tc, 0);
    /* out = x2 + ff2(geglu(ff1(norm3(x2)))) */
    db_layernorm_forward(c, a->a3, a->mean3, a->rstd3, a->x2, w->norm3_w, w->norm3_b, N, C, w->eps);
    db_linear_geglu_forward(c, a->f1, a->g, a->a3, w->ff1_w, w->ff1_b, N, C, w->FF); /* (N, 2FF), (N, FF) */
    db_linear_add_forward(c, out, a->g, w->ff2_w, w->ff2_b, a->x2, N, w->FF, C); /* (N, C) */
    return c->err.code ? -1 : 0;
}

/* ---- Transformer2D ------------------------------------------------------------------------ */

size_t db_transformer2d_acts_carve(db_transformer2d_acts *a, float *base, const db_transformer2d *w, int B, int HW,
                                   int Tc, int keep_proj)
{
    carver k = {base, 0};
    const size_t NC = (size_t)B * HW * w->C;
    a->mean = take(&k, (size_t)B * w->G);
    a->rstd = take(&k, (size_t)B * w->G);
    a->hn = take(&k, NC);
    a->tok = take(&k, NC);
    a->x0 = take(&k, NC);
    a->bout = take(&k, (size_t)w->depth * NC);
    for (int d = 0; d < w->depth; d++) {
        db_tblock_acts scratch, *ba = a->blk ? &a->blk[d] : &scratch;
        k.used += db_tblock_acts_carve(ba, k.base ? k.base + k.used : NULL, &w->blk[d], B, HW, Tc, keep_proj);
    }
    a->y = take(&k, NC);
    return k.used;
}

int db_transformer2d_forward(db_ctx *c, float *out, const db_transformer2d_acts *a, const float *x, const float *ctx,
                             const db_transformer2d *w, int B, int H, int W, int Tc)
{
    const int HW = H * W, C = w->C, N = B * HW;
    const size_t NC = (size_t)N * C;
    db_groupnorm_forward(c, a->hn, a->mean, a->rstd, x, w->norm_w, w->norm_b, B, C, HW, w->G, w->eps, 0);
    db_transpose_forward(c, a->tok, a->hn, B, C, HW);                /* (B, C, HW) -> (B, HW, C) */
    db_linear_forward(c, a->x0, a->tok, w->in_w, w->in_b, N, C, C);   /* (N, C) */
    const float *h = a->x0;
    for (int d = 0; d < w->depth; d++) {
        float *o = a->bout + (size_t)d * NC;
        db_tblock_forward(c, o, &a->blk[d], h, ctx, &w->blk[d], B, HW, Tc);
        h = o;
    }
    db_linear_forward(c, a->y, h, w->out_w, w->out_b, N, C, C);      /* (N, C) */
    db_transpose_add_forward(c, out, a->y, x, B, HW, C);              /* (B, HW, C) -> (B, C, HW), + x */
    return c->err.code ? -1 : 0;
}

/* ---- backward ------------------------------------------------------------------------------ */

/* The gradient slot of weight p (NULL: frozen, or no such weight). */
static float *gp(const db_gradmap *g, const float *p)
{
    return g && g->g && p ? g->g + (p - g->w) : NULL;
}

/* The ops' assign for the map's gradients (db_gradmap fresh: 0, 1 or
 * DB_ASSIGN_PACK16, passed on as it is). */
static int ga(const db_gradmap *g) { return g ? g->fresh : 0; }

static size_t max2(size_t a, size_t b) { return a > b ? a : b; }

size_t db_resblock_backward_scratch(const db_resblock *w, int B, int HW)
{
    carver k = {NULL, 0};
    const size_t b = (size_t)B, big = b * (size_t)(w->C > w->OC ? w->C : w->OC) * (size_t)HW;
    take(&k, big);            /* t1 */
    take(&k, big);            /* t2 */
    take(&k, b * w->OC);      /* deproj */
    return k.used;
}

int db_resblock_backward(db_ctx *c, float *dinp, float *demb, const db_gradmap *g, const float *dout,
                         const db_resblock_acts *a, const float *inp, const float *emb, const db_resblock *w, int B,
                         int H, int W, float *scratch)
{
    const int HW = H * W, C = w->C, OC = w->OC;
    carver k = {scratch, 0};
    const size_t big = (size_t)B * (size_t)(C > OC ? C : OC) * (size_t)HW;
    float *t1 = take(&k, big), *t2 = take(&k, big);
    float *deproj = take(&k, (size_t)B * OC);
    /* dh3 (B, OC, HW) through conv2; dh2 through silu(norm2) */
    db_conv2d_backward(c, t1, gp(g, w->conv2_w), gp(g, w->conv2_b), dout, a->h3, w->conv2_w, B, OC, H, W, OC, 3, 3,
                       1, 1, 1, ga(g));
    db_groupnorm_backward(c, t2, gp(g, w->norm2_w), gp(g, w->norm2_b), t1, a->mean2, a->rstd2, a->h2, w->norm2_w,
                          w->norm2_b, B, OC, HW, w->G, 1, ga(g));
    if (w->E) { /* h2 += eproj per channel: deproj (B, OC) = sum over HW */
        db_add_channel_backward(c, deproj, t2, B, OC, HW);
        /* demb += the projection's input gradient (the multi backward's
         * accumulate: the linear backward and the add, one widening) */
        float *const dw = gp(g, w->emb_w), *const db = gp(g, w->emb_b);
        const float *const dp = deproj, *const wt = w->emb_w;
        db_linear_multi_backward(c, demb, &dw, &db, &dp, emb, &wt, 1, B, w->E, OC, 1, ga(g));
    }
    /* dh1 (B, C, HW) through conv1; dinp through silu(norm1) */
    db_conv2d_backward(c, t1, gp(g, w->conv1_w), gp(g, w->conv1_b), t2, a->h1, w->conv1_w, B, C, H, W, OC, 3, 3, 1,
                       1, 1, ga(g));
    /* + the shortcut's gradient (the 1x1 conv's, or dout), joined by the
     * norm's backward: groupnorm_backward_add */
    if (w->skip_w)
        db_conv2d_backward(c, t2, gp(g, w->skip_w), gp(g, w->skip_b), dout, inp, w->skip_w, B, C, H, W, OC, 1, 1, 1,
                           0, 0, ga(g));
    db_groupnorm_backward_add(c, dinp, gp(g, w->norm1_w), gp(g, w->norm1_b), t1, a->mean1, a->rstd1, inp, w->norm1_w,
                              w->norm1_b, w->skip_w ? t2 : dout, B, C, HW, w->G, 1, ga(g));
    return c->err.code ? -1 : 0;
}

size_t db_mha_backward_scratch(const db_mha *w, int B, int Tq, int Tk)
{
    carver k = {NULL, 0};
    const size_t b = (size_t)B, C = (size_t)w->C;
    take(&k, b * Tq * C);                 /* do */
    take(&k, b * Tq * C);                 /* dq */
    take(&k, b * Tk * C);                 /* dk */
    take(&k, b * Tk * C);                 /* dv */
    /* not carved by db_mha_backward: the fp32 CUDA db_linear_multi_backward's
     * temporary (one projection's input gradient), counted here for the
     * device plan */
    take(&k, b * Tk * max2(C, (size_t)w->D));
    return k.used;
}

int db_mha_backward(db_ctx *c, float *dx, float *dkv, const db_gradmap *g, const float *dout, const db_mha_acts *a,
                    const float *x, const float *kv, const db_mha *w, int B, int Tq, int Tk, int causal,
                    float *scratch)
{
    const int C = w->C, D = w->D, self = kv == x;
    const size_t b = (size_t)B;
    carver k = {scratch, 0};
    float *d_o = take(&k, b * Tq * C), *dq = take(&k, b * Tq * C);
    float *dk = take(&k, b * Tk * C), *dv = take(&k, b * Tk * C);
    db_linear_backward(c, d_o, gp(g, w->o_w), gp(g, w->o_b), dout, a->o, w->o_w, B * Tq, C, C, ga(g));
    db_attention_backward(c, dq, dk, dv, d_o, a->o, a->lse, a->q, a->k, a->v, B, Tq, Tk, w->NH, C / w->NH, causal);
    /* the input's gradient summed in the projections' order: dx = d(q) +
     * d(k) + d(v) for self-attention; the context's += d(k) + d(v) */
    if (self) {
        float *const dw[3] = {gp(g, w->q_w), gp(g, w->k_w), gp(g, w->v_w)};
        float *const dbs[3] = {gp(g, w->q_b), gp(g, w->k_b), gp(g, w->v_b)};
        const float *const dy[3] = {dq, dk, dv}, *const wt[3] = {w->q_w, w->k_w, w->v_w};
        db_linear_multi_backward(c, dx, dw, dbs, dy, x, wt, 3, B * Tq, C, C, 0, ga(g));
    } else {
        float *const dw[2] = {gp(g, w->k_w), gp(g, w->v_w)}, *const dbs[2] = {gp(g, w->k_b), gp(g, w->v_b)};
        const float *const dy[2] = {dk, dv}, *const wt[2] = {w->k_w, w->v_w};
        db_linear_backward(c, dx, gp(g, w->q_w), gp(g, w->q_b), dq, x, w->q_w, B * Tq, C, C, ga(g));
        db_linear_multi_backward(c, dkv, dw, dbs, dy, kv, wt, 2, B * Tk, D, C, 1, ga(g));
    }
    return c->err.code ? -1 : 0;
}

size_t db_tblock_backward_scratch(const db_tblock *w, int B, int T, int Tc)
{
    carver k = {NULL, 0};
    const size_t N = (size_t)B * T, C = (size_t)w->C, FF = (size_t)w->FF;
    take(&k, N * C);      /* dx2 */
    take(&k, N * C);      /* dx1 */
    take(&k, N * C);      /* da */
    take(&k, N * FF);     /* dg */
    take(&k, N * 2 * FF); /* df1 */
    take(&k, max2(db_mha_backward_scratch(&w->attn1, B, T, T), db_mha_backward_scratch(&w->attn2, B, T, Tc)));
    return k.used;
}

int db_tblock_backward(db_ctx *c, float *dx, float *dctx, const db_gradmap *g, const float *dout,
                       const db_tblock_acts *a, const float *x, const float *ctx, const db_tblock *w, int B, int T,
                       int Tc, float *scratch)
{
    const int N = B * T, C = w->C, FF = w->FF;
    const size_t NC = (size_t)N * C;
    carver k = {scratch, 0};
    float *dx2 = take(&k, NC), *dx1 = take(&k, NC), *da = take(&k, NC);
    float *dg = take(&k, (size_t)N * FF), *df1 = take(&k, (size_t)N * 2 * FF);
    float *ms = k.base + k.used;
    /* out = x2 + ff(norm3 x2) */
    db_linear_backward(c, dg, gp(g, w->ff2_w), gp(g, w->ff2_b), dout, a->g, w->ff2_w, N, FF, C, ga(g));
    db_geglu_backward(c, df1, dg, a->f1, N, FF);
    db_linear_backward(c, da, gp(g, w->ff1_w), gp(g, w->ff1_b), df1, a->a3, w->ff1_w, N, C, 2 * FF, ga(g));
    /* dx2 = dout + the norm's input gradient (one op: layernorm_backward_add) */
    db_layernorm_backward_add(c, dx2, gp(g, w->norm3_w), gp(g, w->norm3_b), da, a->mean3, a->rstd3, a->x2,
                              w->norm3_w, dout, N, C, ga(g));
    /* x2 = x1 + attn2(norm2 x1, ctx) */
    db_mha_backward(c, da, dctx, g, dx2, &a->at2, a->a2, ctx, &w->attn2, B, T, Tc, 0, ms);
    db_layernorm_backward_add(c, dx1, gp(g, w->norm2_w), gp(g, w->norm2_b), da, a->mean2, a->rstd2, a->x1,
                              w->norm2_w, dx2, N, C, ga(g));
    /* x1 = x + attn1(norm1 x) */
    db_mha_backward(c, da, NULL, g, dx1, &a->at1, a->a1, a->a1, &w->attn1, B, T, T, 0, ms);
    db_layernorm_backward_add(c, dx, gp(g, w->norm1_w), gp(g, w->norm1_b), da, a->mean1, a->rstd1, x, w->norm1_w,
                              dx1, N, C, ga(g));
    return c->err.code ? -1 : 0;
}

size_t db_transformer2d_backward_scratch(const db_transformer2d *w, int B, int HW, int Tc)
{
    carver k = {NULL, 0};
    const size_t NC = (size_t)B * HW * w->C;
    take(&k, NC); /* dh ping */
    take(&k, NC); /* dh pong */
    size_t m = NC;
    for (int d = 0; d < w->depth; d++)
        m = max2(m, db_tblock_backward_scratch(&w->blk[d], B, HW, Tc));
    take(&k, m);
    return k.used;
}

int db_transformer2d_backward(db_ctx *c, float *dx, float *dctx, const db_gradmap *g, const float *dout,
                              const db_transformer2d_acts *a, const float *x, const float *ctx,
                              const db_transformer2d *w, int B, int H, int W, int Tc, float *scratch)
{
    const int HW = H * W, C = w->C, N = B * HW;
    const size_t NC = (size_t)N * C;
    carver k = {scratch, 0};
    float *d0 = take(&k, NC), *d1 = take(&k, NC), *ms = k.base + k.used;
    /* out = x + transpose(y): dy (B, HW, C) */
    db_transpose_forward(c, d0, dout, B, C, HW);
    const float *last = w->depth ? a->bout + (size_t)(w->depth - 1) * NC : a->x0;
    db_linear_backward(c, d1, gp(g, w->out_w), gp(g, w->out_b), d0, last, w->out_w, N, C, C, ga(g));
    float *dh = d1, *other = d0;
    for (int d = w->depth - 1; d >= 0; d--) {
        const float *in = d ? a->bout + (size_t)(d - 1) * NC : a->x0;
        db_tblock_backward(c, other, dctx, g, dh, &a->blk[d], in, ctx, &w->blk[d], B, HW, Tc, ms);
        float *t = dh;
        dh = other;
        other = t;
    }
    /* dtok (B, HW, C) -> dhn (B, C, HW) -> dx */
    db_linear_backward(c, other, gp(g, w->in_w), gp(g, w->in_b), dh, a->tok, w->in_w, N, C, C, ga(g));
    db_transpose_forward(c, dh, other, B, HW, C);
    db_groupnorm_backward_add(c, dx, gp(g, w->norm_w), gp(g, w->norm_b), dh, a->mean, a->rstd, x, w->norm_w,
                              w->norm_b, dout, B, C, HW, w->G, 0, ga(g)); /* dx = dout + the norm's */
    return c->err.code ? -1 : 0;
}
