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
    /* h2 (B, OC, HW) = conv1(h1) (+ emb_layers(emb) per channel) */
    db_conv2d_forward(c, a->h2, a->h1, w->conv1_w, w->conv1_b, B, C, H, W, OC, 3, 3, 1, 1, 1);
    if (w->E) {
        db_linear_forward(c, a->eproj, emb, w->emb_w, w->emb_b, B, w->E, OC); /* (B, OC) */
        db_add_channel_forward(c, a->h2, a->h2, a->eproj, B, OC, HW);
    }
    /* h3 (B, OC, HW) = silu(norm2(h2)) */
    db_groupnorm_forward(c, a->h3, a->mean2, a->rstd2, a->h2, w->norm2_w, w->norm2_b, B, OC, HW, w->G, w->eps, 1);
    /* out = conv2(h3) + shortcut(inp) */
    db_conv2d_forward(c, out, a->h3, w->conv2_w, w->conv2_b, B, OC, H, W, OC, 3, 3, 1, 1, 1);
    if (w->skip_w) {
        /* 1x1 conv accumulated in place: out[b] (OC, HW) += skip_w (OC, C) @ inp[b] (C, HW), + skip_b */
        for (int b = 0; b < B; b++) {
            float *ob = out + (size_t)b * OC * HW;
            db_gemm_forward(c, ob, w->skip_w, inp + (size_t)b * C * HW, 1, OC, HW, C, 0, 0, 1.0f, 1.0f);
            if (w->skip_b)
                db_add_channel_forward(c, ob, ob, w->skip_b, 1, OC, HW);
        }
    } else {
        db_add_forward(c, out, out, inp, (size_t)B * OC * HW);
    }
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
    return k.used;
}

int db_mha_forward(db_ctx *c, float *out, const db_mha_acts *a, const float *x, const float *kv, const db_mha *w,
                   int B, int Tq, int Tk, int causal)
{
    const int C = w->C;
    db_linear_forward(c, a->q, x, w->q_w, w->q_b, B * Tq, C, C);         /* (B, Tq, C) */
    db_linear_forward(c, a->k, kv, w->k_w, w->k_b, B * Tk, w->D, C);     /* (B, Tk, C) */
    db_linear_forward(c, a->v, kv, w->v_w, w->v_b, B * Tk, w->D, C);     /* (B, Tk, C) */
    db_attention_forward(c, a->o, a->lse, a->q, a->k, a->v, B, Tq, Tk, w->NH, C / w->NH, causal);
    db_linear_forward(c, out, a->o, w->o_w, w->o_b, B * Tq, C, C);       /* (B, Tq, C) */
    return c->err.code ? -1 : 0;
}

/* ---- BasicTransformerBlock -------------------------------------------------------------- */

size_t db_tblock_acts_carve(db_tblock_acts *a, float *base, const db_tblock *w, int B, int T, int Tc)
{
    carver k = {base, 0};
    const size_t N = (size_t)B * T, C = (size_t)w->C;
    a->mean1 = take(&k, N);
    a->rstd1 = take(&k, N);
    a->a1 = take(&k, N * C);
    k.used += db_mha_acts_carve(&a->at1, k.base ? k.base + k.used : NULL, &w->attn1, B, T, T);
    a->x1 = take(&k, N * C);
    a->mean2 = take(&k, N);
    a->rstd2 = take(&k, N);
    a->a2 = take(&k, N * C);
    k.used += db_mha_acts_carve(&a->at2, k.base ? k.base + k.used : NULL, &w->attn2, B, T, Tc);
    a->x2 = take(&k, N * C);
    a->mean3 = take(&k, N);
    a->rstd3 = take(&k, N);
    a->a3 = take(&k, N * C);
    a->f1 = take(&k, N * 2 * (size_t)w->FF);
    a->g = take(&k, N * (size_t)w->FF);
    return k.used;
}

int db_tblock_forward(db_ctx *c, float *out, const db_tblock_acts *a, const float *x, const float *ctx,
                      const db_tblock *w, int B, int T, int Tc)
{
    const int N = B * T, C = w->C;
    const size_t NC = (size_t)N * C;
    /* x1 = x + attn1(norm1(x)) */
    db_layernorm_forward(c, a->a1, a->mean1, a->rstd1, x, w->norm1_w, w->norm1_b, N, C, w->eps);
    db_mha_forward(c, a->x1, &a->at1, a->a1, a->a1, &w->attn1, B, T, T, 0);
    db_add_forward(c, a->x1, a->x1, x, NC);
    /* x2 = x1 + attn2(norm2(x1), ctx) */
    db_layernorm_forward(c, a->a2, a->mean2, a->rstd2, a->x1, w->norm2_w, w->norm2_b, N, C, w->eps);
    db_mha_forward(c, a->x2, &a->at2, a->a2, ctx, &w->attn2, B, T, Tc, 0);
    db_add_forward(c, a->x2, a->x2, a->x1, NC);
    /* out = x2 + ff2(geglu(ff1(norm3(x2)))) */
    db_layernorm_forward(c, a->a3, a->mean3, a->rstd3, a->x2, w->norm3_w, w->norm3_b, N, C, w->eps);
    db_linear_forward(c, a->f1, a->a3, w->ff1_w, w->ff1_b, N, C, 2 * w->FF); /* (N, 2FF) */
    db_geglu_forward(c, a->g, a->f1, N, w->FF);                               /* (N, FF) */
    db_linear_forward(c, out, a->g, w->ff2_w, w->ff2_b, N, w->FF, C);        /* (N, C) */
    db_add_forward(c, out, out, a->x2, NC);
    return c->err.code ? -1 : 0;
}

/* ---- Transformer2D ------------------------------------------------------------------------ */

size_t db_transformer2d_acts_carve(db_transformer2d_acts *a, float *base, const db_transformer2d *w, int B, int HW,
                                   int Tc)
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
        k.used += db_tblock_acts_carve(ba, k.base ? k.base + k.used : NULL, &w->blk[d], B, HW, Tc);
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
    db_transpose_forward(c, out, a->y, B, HW, C);                     /* (B, HW, C) -> (B, C, HW) */
    db_add_forward(c, out, out, x, NC);
    return c->err.code ? -1 : 0;
}
