/* SD UNet forward and backward (see unet.h): the step list built from the
 * architecture with the weight names of names.c, the workspace layouts, and
 * the loops.
 *
 * diffusers facts this follows (UNet2DConditionModel, v0.27.2):
 *   - Timesteps(block_out[0], flip_sin_to_cos, freq_shift), max period 1e4;
 *     TimestepEmbedding: linear_1, SiLU, linear_2; every ResnetBlock2D applies
 *     SiLU to temb then its time_emb_proj, added per channel after conv1.
 *   - ResnetBlock2D GroupNorm(norm_num_groups, eps=norm_eps) in down, mid and
 *     up blocks, and conv_norm_out the same; output_scale_factor 1.
 *   - Transformer2DModel: GroupNorm(norm_num_groups, eps=1e-6), heads from
 *     attention_head_dim / num_attention_heads per level (mid: the last
 *     level's, up level u: level nlevels-1-u's), head size C / heads,
 *     BasicTransformerBlock LayerNorm eps 1e-5, no q/k/v bias, GEGLU 4C.
 *   - Downsample2D: conv 3x3 stride 2 padding 1 (downsample_padding = 1).
 *   - Upsample2D: nearest 2x then conv 3x3 padding 1.
 *   - Up blocks: hidden = cat([hidden, skip], dim=1), skips popped last first.
 */
#include "unet.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blocks.h"
#include "libcommon/core/log.h"
#include "clip.h"
#include "vae.h"

/* GroupNorm eps inside Transformer2DModel (hard-coded in diffusers). */
#define TRANSFORMER_GN_EPS 1e-6f
/* LayerNorm eps of BasicTransformerBlock (diffusers default norm_eps). */
#define TRANSFORMER_LN_EPS 1e-5f
#define MAX_PERIOD 10000.0f

typedef enum step_kind { ST_CONV_IN, ST_RES, ST_ATTN, ST_DOWN, ST_UP, ST_OUT } step_kind;

typedef struct step {
    step_kind kind;
    char name[48];        /* CompVis base name, for messages */
    int lin, lout;        /* spatial level of input and output: size >> level */
    int C, OC;            /* channels in (after the concat for up ResBlocks), out */
    int in;               /* step producing the input; -1: the sample */
    int skip;             /* up ResBlocks: step whose output is concatenated after the input; else -1 */
    int is_skip;          /* the output is read again by the up path */
    /* weights */
    const float *conv_w, *conv_b; /* conv_in, downsampler, upsampler, conv_out */
    const float *gn_w, *gn_b;     /* output head GroupNorm */
    db_resblock res;
    db_transformer2d tr;          /* tr.blk: malloc'd (depth) */
    /* workspace pieces (set by layout) */
    float *out;                   /* (B, OC, HW(lout)); NULL for the output head (the caller's buffer) */
    float *cat;                   /* up ResBlocks: (B, C, HW) cat(input, skip) */
    float *up;                    /* upsampler: (B, C, HW(lout)) nearest 2x of the input: the conv's input */
    float *mean, *rstd, *hn;      /* output head: (B, G), (B, G), (B, C, HW) silu(GN(h)) */
    db_resblock_acts ra;
    db_transformer2d_acts ta;     /* ta.blk: malloc'd (depth) */
    /* gradient workspace (set by grad_layout) */
    float *dout;                  /* (B, OC, HW(lout)) d loss / d out; NULL for the output head */
    db_span gs;                   /* its weights' span (gradient units, weights.h; set by spans()) */
    int dset;                     /* backward: dout holds a gradient (else the first writer assigns) */
} step;

struct db_unet {
    db_ctx *ctx;
    db_unet_arch a;
    db_weights w;
    const float *t1_w, *t1_b; /* time_embed.0: (E, C0), (E) */
    const float *t2_w, *t2_b; /* time_embed.2: (E, E), (E) */
    step *s;
    int ns;
    /* time embedding activations */
    float *tproj;  /* (B, C0) sinusoidal embedding */
    float *e1;     /* (B, E) linear_1 output: SiLU's input */
    float *e1s;    /* (B, E) silu(e1): linear_2's input */
    float *temb;   /* (B, E) */
    float *temb_s; /* (B, E) silu(temb): what every ResBlock projects */
    float *eproj;  /* every ResBlock's projection of temb_s, (B, OC) each, in step order: made at once */
    /* workspace */
    int keep;      /* keep every block's activations (training) */
    int ckpt;      /* gradient checkpointing asked for (meaningful with keep only) */
    float *ws;
    size_t ws_cap; /* floats */
    const float *sample, *context; /* the last forward's inputs (the caller's; read by the backward) */
    int pB, pH, pW, pTc, pkeep, pckpt; /* sizes and mode of the current layout (pB 0: none) */
    double times[DB_UNET_NT];   /* seconds per block kind, last forward */
    double btimes[DB_UNET_NT];  /* the same, last backward (without recomputation) */
    double brecompute;          /* last backward: seconds re-running forwards (checkpointing) */
    /* gradient workspace (backward), laid out per (B, H, W, Tc) like ws */
    float *gws;
    size_t gws_cap;             /* floats */
    int gB, gH, gW, gTc;        /* sizes of the current gradient layout (gB 0: none) */
    float *dtemb_s, *dtemb;     /* (B, E) */
    float *de1s, *de1;          /* (B, E) */
    float *dt0, *dt1;           /* two step-input gradients, the largest (B, C, HW) any step needs */
    float *bscratch;            /* block backward scratch, the largest any step needs */
    int have_spans;             /* the steps' and the time MLP's weight spans are set */
    db_span t_gs;               /* the time MLP's */
    unsigned gen;               /* counts re-layouts of ws / gws (db_unet_layout_gen) */
    /* db_unet_cache_context: every cross-attention's k and v of kvc_ctx
     * (kvc_B, kvc_Tc), in step and block order, kvc_n floats; kvc_on 0: off */
    float *kvc;
    size_t kvc_n;
    const float *kvc_ctx;
    int kvc_B, kvc_Tc, kvc_on;
};

/* ---- building the step list ------------------------------------------------------ */

/* A UNet built from the architecture alone (db_unet_train_bytes_arch: its
 * weights have no data) only sizes workspaces; every weight pointer is this
 * one, never read.  What steps exist and their sizes come from the
 * architecture either way, so the layouts are the same as a loaded UNet's. */
static const float no_weights;

/* Fetch a weight or fail: dst = tensor of `numel` elements named fmt. */
#define GET(dst, numel, ...)                                                          \
    do {                                                                              \
        if (!w->data)                                                                 \
            (dst) = &no_weights;                                                      \
        else if (!((dst) = db_weights_get(w, err, (int64_t)(numel), __VA_ARGS__))) \
            return -1;                                                                \
    } while (0)

static int get_resblock(db_resblock *r, const db_weights *w, const db_unet_arch *a, int C, int OC, const char *base,
                        db_err *err)
{
    const int E = a->time_embed_dim;
    *r = (db_resblock){.C = C, .OC = OC, .E = E, .G = a->norm_groups, .eps = (float)a->norm_eps};
    GET(r->norm1_w, C, "%s.in_layers.0.weight", base);
    GET(r->norm1_b, C, "%s.in_layers.0.bias", base);
    GET(r->conv1_w, (int64_t)OC * C * 9, "%s.in_layers.2.weight", base);
    GET(r->conv1_b, OC, "%s.in_layers.2.bias", base);
    GET(r->emb_w, (int64_t)OC * E, "%s.emb_layers.1.weight", base);
    GET(r->emb_b, OC, "%s.emb_layers.1.bias", base);
    GET(r->norm2_w, OC, "%s.out_layers.0.weight", base);
    GET(r->norm2_b, OC, "%s.out_layers.0.bias", base);
    GET(r->conv2_w, (int64_t)OC * OC * 9, "%s.out_layers.3.weight", base);
    GET(r->conv2_b, OC, "%s.out_layers.3.bias", base);
    if (C != OC) {
        GET(r->skip_w, (int64_t)OC * C, "%s.skip_connection.weight", base);
        GET(r->skip_b, OC, "%s.skip_connection.bias", base);
    }
    return 0;
}

static int get_mha(db_mha *m, const db_weights *w, int C, int D, int NH, const char *base, db_err *err)
{
    *m = (db_mha){.C = C, .D = D, .NH = NH};
    GET(m->q_w, (int64_t)C * C, "%s.to_q.weight", base);
    GET(m->k_w, (int64_t)C * D, "%s.to_k.weight", base);
    GET(m->v_w, (int64_t)C * D, "%s.to_v.weight", base);
    GET(m->o_w, (int64_t)C * C, "%s.to_out.0.weight", base);
    GET(m->o_b, C, "%s.to_out.0.bias", base);
    return 0;
}

/* t->blk must hold a->transformer_depth entries. */
static int get_transformer(db_transformer2d *t, const db_weights *w, const db_unet_arch *a, int C, int NH,
                           const char *base, db_err *err)
{
    db_tblock *blk = t->blk;
    *t = (db_transformer2d){.C = C, .G = a->norm_groups, .eps = TRANSFORMER_GN_EPS, .depth = a->transformer_depth,
                            .blk = blk};
    const int64_t CC = (int64_t)C * C; /* proj_in/out: (C, C, 1, 1) conv or (C, C) linear */
    GET(t->norm_w, C, "%s.norm.weight", base);
    GET(t->norm_b, C, "%s.norm.bias", base);
    GET(t->in_w, CC, "%s.proj_in.weight", base);
    GET(t->in_b, C, "%s.proj_in.bias", base);
    for (int d = 0; d < t->depth; d++) {
        db_tblock *b = &blk[d];
        char bb[96], sub[112];
        snprintf(bb, sizeof bb, "%s.transformer_blocks.%d", base, d);
        *b = (db_tblock){.C = C, .FF = 4 * C, .eps = TRANSFORMER_LN_EPS};
        GET(b->norm1_w, C, "%s.norm1.weight", bb);
        GET(b->norm1_b, C, "%s.norm1.bias", bb);
        snprintf(sub, sizeof sub, "%s.attn1", bb);
        if (get_mha(&b->attn1, w, C, C, NH, sub, err))
            return -1;
        GET(b->norm2_w, C, "%s.norm2.weight", bb);
        GET(b->norm2_b, C, "%s.norm2.bias", bb);
        snprintf(sub, sizeof sub, "%s.attn2", bb);
        if (get_mha(&b->attn2, w, C, a->context_dim, NH, sub, err))
            return -1;
        GET(b->norm3_w, C, "%s.norm3.weight", bb);
        GET(b->norm3_b, C, "%s.norm3.bias", bb);
        GET(b->ff1_w, (int64_t)2 * b->FF * C, "%s.ff.net.0.proj.weight", bb);
        GET(b->ff1_b, 2 * b->FF, "%s.ff.net.0.proj.bias", bb);
        GET(b->ff2_w, (int64_t)C * b->FF, "%s.ff.net.2.weight", bb);
        GET(b->ff2_b, C, "%s.ff.net.2.bias", bb);
    }
    GET(t->out_w, CC, "%s.proj_out.weight", base);
    GET(t->out_b, C, "%s.proj_out.bias", base);
    return 0;
}

/* conv weight (OC, C, k, k) and bias (OC) named base.weight / base.bias */
static int get_conv(step *s, const db_weights *w, int k, db_err *err)
{
    GET(s->conv_w, (int64_t)s->OC * s->C * k * k, "%s.weight", s->name);
    GET(s->conv_b, s->OC, "%s.bias", s->name);
    return 0;
}

/* The time MLP: linear_1 (E, C0), (E); linear_2 (E, E), (E). */
static int get_time_mlp(db_unet *u, db_err *err)
{
    const db_weights *w = &u->w;
    const int E = u->a.time_embed_dim, C0 = u->a.block_out[0];
    GET(u->t1_w, (int64_t)E * C0, "time_embed.0.weight");
    GET(u->t1_b, E, "time_embed.0.bias");
    GET(u->t2_w, (int64_t)E * E, "time_embed.2.weight");
    GET(u->t2_b, E, "time_embed.2.bias");
    return 0;
}

/* The output head: GroupNorm (C0), (C0), then conv_out. */
static int get_head(step *s, const db_weights *w, db_err *err)
{
    GET(s->gn_w, s->C, "out.0.weight");
    GET(s->gn_b, s->C, "out.0.bias");
    return get_conv(s, w, 3, err);
}

#undef GET

/* Append a step reading the previous step's output. */
static step *push(db_unet *u, step_kind kind, int lin, int lout, int C, int OC, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static step *push(db_unet *u, step_kind kind, int lin, int lout, int C, int OC, const char *fmt, ...)
{
    step *s = &u->s[u->ns];
    *s = (step){.kind = kind, .lin = lin, .lout = lout, .C = C, .OC = OC, .in = u->ns - 1, .skip = -1};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->name, sizeof s->name, fmt, ap);
    va_end(ap);
    u->ns++;
    return s;
}

static int add_resblock(db_unet *u, int level, int C, int OC, int skip, const char *name, db_err *err)
{
    step *s = push(u, ST_RES, level, level, C, OC, "%s", name);
    s->skip = skip;
    return get_resblock(&s->res, &u->w, &u->a, C, OC, name, err);
}

static int add_transformer(db_unet *u, int level, int C, int NH, const char *name, db_err *err)
{
    step *s = push(u, ST_ATTN, level, level, C, C, "%s", name);
    s->tr.blk = calloc((size_t)u->a.transformer_depth, sizeof *s->tr.blk);
    s->ta.blk = calloc((size_t)u->a.transformer_depth, sizeof *s->ta.blk);
    if (!s->tr.blk || !s->ta.blk)
        return db_err_set(err, DB_ENOMEM, "unet: out of memory");
    return get_transformer(&s->tr, &u->w, &u->a, C, NH, name, err);
}

static int build(db_unet *u, db_err *err)
{
    const db_unet_arch *a = &u->a;
    const int L = a->nlevels, lpb = a->layers_per_block, C0 = a->block_out[0];
    const db_weights *w = &u->w;
    char name[48];

    if (get_time_mlp(u, err))
        return -1;

    /* an upper bound of the steps: conv_in, down, mid, up, head */
    size_t cap = 1 + (size_t)L * (2 * lpb + 1) + 3 + (size_t)L * (2 * (lpb + 1) + 1) + 1;
    u->s = calloc(cap, sizeof *u->s);
    int *skips = malloc((1 + (size_t)L * (lpb + 1)) * sizeof *skips);
    int nskip = 0, rc = -1;
    if (!u->s || !skips) {
        db_err_set(err, DB_ENOMEM, "unet: out of memory");
        goto done;
    }

    step *s = push(u, ST_CONV_IN, 0, 0, a->in_channels, C0, "input_blocks.0.0");
    s->is_skip = 1;
    skips[nskip++] = u->ns - 1;
    if (get_conv(s, w, 3, err))
        goto done;

    int ch = C0, blk = 1;
    for (int i = 0; i < L; i++) {
        for (int j = 0; j < lpb; j++, blk++) {
            snprintf(name, sizeof name, "input_blocks.%d.0", blk);
            if (add_resblock(u, i, ch, a->block_out[i], -1, name, err))
                goto done;
            ch = a->block_out[i];
            if (a->cross_attn[i]) {
                snprintf(name, sizeof name, "input_blocks.%d.1", blk);
                if (add_transformer(u, i, ch, a->heads[i], name, err))
                    goto done;
            }
            u->s[u->ns - 1].is_skip = 1;
            skips[nskip++] = u->ns - 1;
        }
        if (i < L - 1) {
            s = push(u, ST_DOWN, i, i + 1, ch, ch, "input_blocks.%d.0.op", blk++);
            s->is_skip = 1;
            skips[nskip++] = u->ns - 1;
            if (get_conv(s, w, 3, err))
                goto done;
        }
    }

    if (add_resblock(u, L - 1, ch, ch, -1, "middle_block.0", err) ||
        add_transformer(u, L - 1, ch, a->heads[L - 1], "middle_block.1", err) ||
        add_resblock(u, L - 1, ch, ch, -1, "middle_block.2", err))
        goto done;

    blk = 0;
    for (int up = 0; up < L; up++) {
        const int level = L - 1 - up, cout = a->block_out[level];
        for (int j = 0; j <= lpb; j++, blk++) {
            int sk = skips[--nskip];
            snprintf(name, sizeof name, "output_blocks.%d.0", blk);
            if (add_resblock(u, level, ch + u->s[sk].OC, cout, sk, name, err))
                goto done;
            ch = cout;
            if (a->up_cross_attn[up]) {
                snprintf(name, sizeof name, "output_blocks.%d.1", blk);
                if (add_transformer(u, level, ch, a->heads[level], name, err))
                    goto done;
            }
            if (j == lpb && up < L - 1) {
                s = push(u, ST_UP, level, level - 1, ch, ch, "output_blocks.%d.%d.conv", blk,
                         a->up_cross_attn[up] ? 2 : 1);
                if (get_conv(s, w, 3, err))
                    goto done;
            }
        }
    }

    s = push(u, ST_OUT, 0, 0, C0, a->out_channels, "out.2");
    if (get_head(s, w, err))
        goto done;
    rc = 0;
done:
    free(skips);
    return rc;
}

/* ---- workspace layout ---------------------------------------------------------------- */

typedef struct carver {
    float *base; /* NULL: only count */
    size_t used; /* floats */
} carver;

static float *take(carver *k, size_t n)
{
    float *p = k->base ? k->base + k->used : NULL;
    k->used += (n + 15) & ~(size_t)15; /* 64-byte pieces */
    return p;
}

static size_t hw_at(int H, int W, int level) { return (size_t)(H >> level) * (size_t)(W >> level); }

static size_t out_numel(const step *s, int B, int H, int W)
{
    return s->kind == ST_OUT ? 0 : (size_t)B * s->OC * hw_at(H, W, s->lout);
}

/* Carve (or count, base NULL) the step's saved activations; keep_proj:
 * db_tblock_acts_carve's (room for what only a backward reads). */
static size_t step_acts(step *s, float *base, const db_unet_arch *a, int B, int H, int W, int Tc, int keep_proj)
{
    carver k = {base, 0};
    const size_t hw_in = hw_at(H, W, s->lin), hw_out = hw_at(H, W, s->lout);
    switch (s->kind) {
    case ST_RES:
        s->cat = s->skip >= 0 ? take(&k, (size_t)B * s->C * hw_in) : NULL;
        k.used += db_resblock_acts_carve(&s->ra, k.base ? k.base + k.used : NULL, &s->res, B, (int)hw_in);
        break;
    case ST_ATTN:
        k.used += db_transformer2d_acts_carve(&s->ta, k.base ? k.base + k.used : NULL, &s->tr, B, (int)hw_in, Tc,
                                              keep_proj);
        break;
    case ST_UP:
        s->up = take(&k, (size_t)B * s->C * hw_out);
        break;
    case ST_OUT:
        s->mean = take(&k, (size_t)B * a->norm_groups);
        s->rstd = take(&k, (size_t)B * a->norm_groups);
        s->hn = take(&k, (size_t)B * s->C * hw_in);
        break;
    default:
        break;
    }
    return k.used;
}

/* Lay the workspace out for these sizes at base (NULL: only count);
 * returns the floats needed.
 *   keep:       [time embedding][per step: output, activations]...
 *   keep, ckpt: [time embedding][per step: output]...[shared activations]
 *               every output is some step's input (or a skip), which is what
 *               a step's forward needs to be re-run from; the activations
 *               live only while one step's backward runs, so the region is
 *               the largest step's (gradient checkpointing per block, as
 *               diffusers' enable_gradient_checkpointing).
 *   !keep:      [time embedding][skip outputs][stream 0][stream 1][shared activations]
 *               other outputs alternate between the two streams (never the
 *               step's own input), all steps' activations share one region. */
static size_t layout(db_unet *u, float *base, int B, int H, int W, int Tc, int keep, int ckpt)
{
    carver k = {base, 0};
    const size_t E = (size_t)u->a.time_embed_dim;
    u->tproj = take(&k, (size_t)B * u->a.block_out[0]);
    u->e1 = take(&k, B * E);
    u->e1s = take(&k, B * E);
    u->temb = take(&k, B * E);
    u->temb_s = take(&k, B * E);
    /* the ResBlocks' time projections, made together at the forward's start
     * (db_unet_forward): here, apart from the activations, which steps
     * share (inference, checkpointing) and a recompute rewrites */
    size_t nproj = 0;
    for (int i = 0; i < u->ns; i++)
        if (u->s[i].kind == ST_RES && u->s[i].res.E)
            nproj += ((size_t)B * u->s[i].res.OC + 15) & ~(size_t)15;
    u->eproj = take(&k, nproj);

    const int share = !keep || ckpt; /* all steps' activations in one region */
    /* inference keeps no GEGLU projection (the op's proj NULL: on a GPU
     * in 16-bit precision it then never reaches memory in float32), but on
     * the CPU, where the op would put it through scratch of its own */
    const int kp = keep || u->ctx->device == DB_CPU;
    size_t smax = 0, amax = 0;       /* largest streamed output, largest step's activations */
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        size_t n = out_numel(s, B, H, W), m = step_acts(s, NULL, &u->a, B, H, W, Tc, kp);
        if (!s->is_skip && n > smax)
            smax = n;
        if (m > amax)
            amax = m;
    }
    float *stream[2] = {NULL, NULL}, *shared = NULL;
    if (!keep) {
        stream[0] = take(&k, smax);
        stream[1] = take(&k, smax);
        shared = take(&k, amax);
    }
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        const float *in = s->in >= 0 ? u->s[s->in].out : NULL;
        if (s->kind == ST_OUT)
            s->out = NULL;
        else if (keep || s->is_skip)
            s->out = take(&k, out_numel(s, B, H, W));
        else
            s->out = in && in == stream[0] ? stream[1] : stream[0];
        if (!share) {
            size_t m = step_acts(s, NULL, &u->a, B, H, W, Tc, kp);
            step_acts(s, take(&k, m), &u->a, B, H, W, Tc, kp);
        }
    }
    if (keep && ckpt) /* after the outputs: carved once all of them are placed */
        shared = take(&k, amax);
    for (int i = 0; share && i < u->ns; i++)
        step_acts(&u->s[i], shared, &u->a, B, H, W, Tc, kp);
    /* (the acts' own eproj slot, carved by db_resblock_acts_carve, goes unused) */
    for (int i = 0, o = 0; i < u->ns; i++)
        if (u->s[i].kind == ST_RES && u->s[i].res.E) {
            u->s[i].ra.eproj = u->eproj ? u->eproj + o : NULL;
            o += (B * u->s[i].res.OC + 15) & ~15;
        }
    return k.used;
}

/* Checkpointing is a way of keeping activations: off for inference. */
static int ckpt_mode(const db_unet *u) { return u->keep && u->ckpt; }

static int plan(db_unet *u, int B, int H, int W, int Tc, db_err *err)
{
    const int ckpt = ckpt_mode(u);
    if (u->pB == B && u->pH == H && u->pW == W && u->pTc == Tc && u->pkeep == u->keep && u->pckpt == ckpt)
        return 0;
    size_t n = layout(u, NULL, B, H, W, Tc, u->keep, ckpt);
    /* The workspace only grows with the sizes, but a change of mode
     * re-allocates it to fit: turning checkpointing on gives memory back. */
    if (n > u->ws_cap || (u->pB && (u->pkeep != u->keep || u->pckpt != ckpt) && n != u->ws_cap)) {
        db_ctx_free(u->ctx, u->ws);
        u->ws = NULL;
        u->ws_cap = 0;
        u->pB = 0;
        if (n > SIZE_MAX / sizeof(float) - 64 || !(u->ws = db_ctx_alloc(u->ctx, n * sizeof(float))))
            return db_err_set(err, DB_ENOMEM, "unet: out of memory for a %zu MiB workspace (B=%d, %dx%d)",
                              n * sizeof(float) >> 20, B, H, W);
        u->ws_cap = n;
    }
    layout(u, u->ws, B, H, W, Tc, u->keep, ckpt);
    u->pB = B, u->pH = H, u->pW = W, u->pTc = Tc, u->pkeep = u->keep, u->pckpt = ckpt;
    u->gen++;
    return 0;
}

/* ---- public ------------------------------------------------------------------------------ */

int db_unet_create_from(db_unet **out, db_ctx *ctx, const db_unet_arch *a, db_weights *w, db_err *err)
{
    *out = NULL;
    db_unet *u = calloc(1, sizeof *u);
    if (!u) {
        db_weights_free(w);
        return db_err_set(err, DB_ENOMEM, "unet: out of memory");
    }
    if (db_weights_to(w, ctx, err)) { /* host weights (a test's, a LoRA merge) onto ctx's device */
        db_weights_free(w);
        free(u);
        return -1;
    }
    u->w = *w;
    memset(w, 0, sizeof *w);
    u->ctx = ctx;
    u->a = *a;
    db_arch full;
    memset(&full, 0, sizeof full);
    full.unet = *a;
    if (db_arch_validate_comps(&full, DB_COMP_BIT(DB_COMP_UNET), err) || build(u, err)) {
        db_unet_free(u); /* the messages name the UNet already */
        return -1;
    }
    *out = u;
    return 0;
}

int db_unet_create(db_unet **out, db_ctx *ctx, const db_model *m, db_err *err)
{
    db_weights w;
    *out = NULL;
    if (db_weights_load_ctx(&w, ctx, m, DB_COMP_UNET, err))
        return -1;
    return db_unet_create_from(out, ctx, &m->arch.unet, &w, err);
}

void db_unet_free(db_unet *u)
{
    if (!u)
        return;
    for (int i = 0; u->s && i < u->ns; i++) {
        free(u->s[i].tr.blk);
        free(u->s[i].ta.blk);
    }
    free(u->s);
    db_ctx_free(u->ctx, u->ws);
    db_ctx_free(u->ctx, u->gws);
    db_ctx_free(u->ctx, u->kvc);
    db_weights_free(&u->w);
    free(u);
}

/* Each cross-attention's k and v slots in the cache kv for (B, Tc), in
 * step and block order, one walk for the three uses: *used (NULL: not
 * asked) = the floats they need; set: the blocks' k2c / v2c pointed at
 * their slots (kv NULL: at none); context: each slot's k and v made from it
 * (db_mha_kv_forward; -1 on a failure, the ctx's error says it). */
static int kvc_walk(db_unet *u, float *kv, int B, int Tc, int set, const float *context, size_t *used)
{
    size_t off = 0;
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        if (s->kind != ST_ATTN)
            continue;
        for (int d = 0; d < s->tr.depth; d++) {
            const db_mha *w = &s->tr.blk[d].attn2;
            const size_t n = (size_t)B * Tc * w->C;
            if (set && s->ta.blk) {
                s->ta.blk[d].k2c = kv ? kv + off : NULL;
                s->ta.blk[d].v2c = kv ? kv + off + n : NULL;
            }
            if (context && db_mha_kv_forward(u->ctx, kv + off, kv + off + n, context, w, B, Tc))
                return -1;
            off += 2 * n;
        }
    }
    if (used)
        *used = off;
    return 0;
}

int db_unet_cache_context(db_unet *u, const float *context, int B, int Tc, db_err *err)
{
    db_ctx *c = u->ctx;
    if (!context) {
        if (u->kvc_on)
            u->gen++;
        u->kvc_on = 0;
        return 0;
    }
    if (B < 1 || Tc < 1)
        return db_err_set(err, DB_EUSAGE, "unet: context cache: bad sizes B=%d Tc=%d", B, Tc);
    size_t n;
    kvc_walk(u, NULL, B, Tc, 0, NULL, &n);
    if (n > u->kvc_n) {
        db_ctx_free(c, u->kvc);
        u->kvc_on = 0, u->kvc_n = 0;
        if (!(u->kvc = db_ctx_alloc(c, n * sizeof(float))))
            return db_err_set(err, DB_ENOMEM, "unet: out of memory for a %zu KiB context cache", n * sizeof(float) >> 10);
        u->kvc_n = n;
        u->gen++; /* a graph that read the old cache must not replay */
        /* read only as operands, like weights: in a 16-bit mode the CUDA
         * backend then keeps its 16-bit copy, made once a cache, where each
         * step's attentions would convert k and v again (ops.h) */
        if (db_ctx_declare_weights(c, u->kvc, n))
            return db_err_set(err, c->err.code, "unet: context cache: %s", c->err.msg);
    }
    /* the zero marks that copy stale (the projections' writes are not
     * tracked); the next step's first use, or a graph's launch, makes it
     * again from what the walk writes */
    if (db_ctx_zero(c, u->kvc, n * sizeof(float)) || kvc_walk(u, u->kvc, B, Tc, 0, context, NULL))
        return db_err_set(err, c->err.code, "unet: context cache: %s", c->err.msg);
    if (!u->kvc_on)
        u->gen++; /* graphs recorded making k and v themselves are fine, but count it a change */
    u->kvc_on = 1, u->kvc_ctx = context, u->kvc_B = B, u->kvc_Tc = Tc;
    return 0;
}

void db_unet_keep_activations(db_unet *u, int keep) { u->keep = keep != 0; }
void db_unet_checkpointing(db_unet *u, int on) { u->ckpt = on != 0; }

const db_unet_arch *db_unet_arch_of(const db_unet *u) { return &u->a; }
void db_unet_last_backward_times(const db_unet *u, double t[DB_UNET_NT], double *recompute)
{
    memcpy(t, u->btimes, sizeof u->btimes);
    if (recompute)
        *recompute = u->brecompute;
}

void db_unet_last_times(const db_unet *u, double t[DB_UNET_NT]) { memcpy(t, u->times, sizeof u->times); }
const db_weights *db_unet_weights(const db_unet *u) { return &u->w; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Which timing bucket a step counts in. */
static int time_kind(step_kind k)
{
    switch (k) {
    case ST_RES: return DB_UNET_T_RES;
    case ST_ATTN: return DB_UNET_T_ATTN;
    case ST_DOWN:
    case ST_UP: return DB_UNET_T_SAMPLE;
    default: return DB_UNET_T_EMBED;
    }
}

/* ctx->err as this UNet's error for the named part. */
static int op_failed(db_unet *u, const char *part, db_err *err)
{
    return db_err_set(err, u->ctx->err.code, "unet: %s: %s", part, u->ctx->err.msg);
}

/* Step s's forward from the inputs of the last forward (u->sample,
 * u->context, the kept outputs and time embedding): its output into s->out
 * (the output head: into out) and its saved activations into s's acts.
 * recompute: the backward's re-run under checkpointing, which only needs the
 * activations; a ResBlock or Transformer2D rewrites its kept output (the
 * same ops on the same inputs give the same bits), the convolutions whose
 * outputs nothing reads again are skipped. */
static void run_step(db_unet *u, step *s, float *out, int B, int H, int W, int Tc, int recompute)
{
    db_ctx *c = u->ctx;
    const db_unet_arch *a = &u->a;
    const float *in = s->in >= 0 ? u->s[s->in].out : u->sample;
    const int h = H >> s->lin, wd = W >> s->lin, hw = h * wd;
    switch (s->kind) {
    case ST_CONV_IN: /* (B, in_channels, H, W) -> (B, C0, H, W); saves nothing */
        if (!recompute)
            db_conv2d_forward(c, s->out, in, s->conv_w, s->conv_b, B, s->C, h, wd, s->OC, 3, 3, 1, 1, 1);
        break;
    case ST_RES:
        if (s->skip >= 0) { /* cat(h (B, C - Cs, hw), skip (B, Cs, hw)) */
            const int cs = u->s[s->skip].OC;
            db_concat_channels_forward(c, s->cat, in, u->s[s->skip].out, B, s->C - cs, cs, hw);
            in = s->cat;
        }
        db_resblock_forward(c, s->out, &s->ra, in, NULL, &s->res, B, h, wd); /* (its eproj made: time_proj) */
        break;
    case ST_ATTN:
        db_transformer2d_forward(c, s->out, &s->ta, in, u->context, &s->tr, B, h, wd, Tc);
        break;
    case ST_DOWN: /* (B, C, h, w) -> (B, C, h/2, w/2); saves nothing */
        if (!recompute)
            db_conv2d_forward(c, s->out, in, s->conv_w, s->conv_b, B, s->C, h, wd, s->OC, 3, 3, 2, 1, 1);
        break;
    case ST_UP: /* (B, C, h, w) -> (B, C, 2h, 2w); saves up, the conv's input */
        db_upsample_nearest2x_forward(c, s->up, in, B, s->C, h, wd);
        if (!recompute)
            db_conv2d_forward(c, s->out, s->up, s->conv_w, s->conv_b, B, s->C, 2 * h, 2 * wd, s->OC, 3, 3, 1, 1,
                              1);
        break;
    case ST_OUT: /* conv_out(silu(GN(h))): (B, C0, H, W) -> (B, out_channels, H, W); saves the GN */
        db_groupnorm_forward(c, s->hn, s->mean, s->rstd, in, s->gn_w, s->gn_b, B, s->C, hw, a->norm_groups,
                             (float)a->norm_eps, 1);
        if (!recompute)
            db_conv2d_forward(c, out, s->hn, s->conv_w, s->conv_b, B, s->C, h, wd, s->OC, 3, 3, 1, 1, 1);
        break;
    }
}

/* Every ResBlock's emb_layers(temb_s) into its ra.eproj, in one op (on a
 * GPU one launch for SD1.5's 22 projections, where each block's own linear
 * was three tiny ones), DB_LINEAR_FAN_MAX at a time. */
static void time_proj(db_unet *u, int B)
{
    float *out[DB_LINEAR_FAN_MAX];
    const float *wt[DB_LINEAR_FAN_MAX], *bs[DB_LINEAR_FAN_MAX];
    int oc[DB_LINEAR_FAN_MAX], n = 0;
    for (int i = 0; i <= u->ns; i++) {
        const step *s = i < u->ns ? &u->s[i] : NULL;
        if (s && s->kind == ST_RES && s->res.E) {
            out[n] = s->ra.eproj, wt[n] = s->res.emb_w, bs[n] = s->res.emb_b, oc[n] = s->res.OC;
            n++;
        }
        if (n && (n == DB_LINEAR_FAN_MAX || !s)) {
            db_linear_fan_forward(u->ctx, out, u->temb_s, wt, bs, oc, n, B, u->a.time_embed_dim);
            n = 0;
        }
    }
}

int db_unet_forward(db_unet *u, float *out, const float *sample, const float *timesteps, const float *context, int B,
                    int H, int W, int Tc, db_err *err)
{
    db_ctx *c = u->ctx;
    const db_unet_arch *a = &u->a;
    const int L = a->nlevels, mult = 1 << (L - 1), E = a->time_embed_dim, C0 = a->block_out[0];
    if (!out || !sample || !timesteps || !context)
        return db_err_set(err, DB_EUSAGE, "unet: NULL tensor");
    if (B < 1 || H < 1 || W < 1 || Tc < 1)
        return db_err_set(err, DB_EUSAGE, "unet: bad sizes B=%d H=%d W=%d Tc=%d", B, H, W, Tc);
    if (H % mult || W % mult)
        return db_err_set(err, DB_EUNSUPP, "unet: latent size %dx%d is not a multiple of %d", H, W, mult);
    if ((int64_t)B * H * W > INT32_MAX / 16) /* token counts B*H*W are passed to the ops as int */
        return db_err_set(err, DB_EUNSUPP, "unet: B=%d at %dx%d is too large for one forward", B, H, W);
    if (c->err.code)
        return db_err_set(err, c->err.code, "unet: the context has a pending error: %s", c->err.msg);
    if (plan(u, B, H, W, Tc, err))
        return -1;
    /* the context cache's k and v where it holds this context (inference);
     * elsewhere each cross-attention makes its own */
    const int kvc = u->kvc_on && !u->keep && context == u->kvc_ctx && B == u->kvc_B && Tc == u->kvc_Tc;
    kvc_walk(u, kvc ? u->kvc : NULL, B, Tc, 1, NULL, NULL);
    memset(u->times, 0, sizeof u->times);
    u->sample = sample;
    u->context = context;
    double t0 = now();

    /* temb_s (B, E) = silu(linear_2(silu(linear_1(sinusoid(t))))) */
    db_timestep_embedding_forward(c, u->tproj, timesteps, B, C0, a->flip_sin_to_cos, (float)a->freq_shift,
                                  MAX_PERIOD);
    db_linear_forward(c, u->e1, u->tproj, u->t1_w, u->t1_b, B, C0, E);
    db_silu_forward(c, u->e1s, u->e1, (size_t)B * E);
    db_linear_forward(c, u->temb, u->e1s, u->t2_w, u->t2_b, B, E, E);
    db_silu_forward(c, u->temb_s, u->temb, (size_t)B * E);
    time_proj(u, B);
    if (c->err.code)
        return op_failed(u, "time_embed", err);
    double t1 = now();
    u->times[DB_UNET_T_EMBED] += t1 - t0;

    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        run_step(u, s, out, B, H, W, Tc, 0);
        if (c->err.code)
            return op_failed(u, s->name, err);
        t0 = t1;
        t1 = now();
        u->times[time_kind(s->kind)] += t1 - t0;
    }
    return 0;
}

/* ---- backward ------------------------------------------------------------------------------ */

/* Lay the gradient workspace out at base (NULL: only count); returns floats.
 *   [dtemb_s, dtemb, de1s, de1][skip outputs' dout][stream 0][stream 1][dt0][dt1][block scratch]
 * A skip output's gradient comes from two consumers (its up ResBlock, then
 * the next step), so it has its own buffer; any other step's dout is
 * written by step i + 1 and read by step i only, so it lives in stream
 * i % 2 (the step it gives to, i - 1, uses the other stream). */
static size_t grad_layout(db_unet *u, float *base, int B, int H, int W, int Tc)
{
    carver k = {base, 0};
    const size_t E = (size_t)u->a.time_embed_dim;
    u->dtemb_s = take(&k, B * E);
    u->dtemb = take(&k, B * E);
    u->de1s = take(&k, B * E);
    u->de1 = take(&k, B * E);
    size_t tmax = 0, smax = 0, omax = 0;
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        const size_t no = out_numel(s, B, H, W);
        s->dout = s->is_skip ? take(&k, no) : NULL;
        if (!s->is_skip && no > omax)
            omax = no;
    }
    float *stream[2];
    stream[0] = take(&k, omax);
    stream[1] = take(&k, omax);
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        if (!s->is_skip && s->kind != ST_OUT)
            s->dout = stream[i & 1];
        const size_t hw_in = hw_at(H, W, s->lin), hw_out = hw_at(H, W, s->lout);
        size_t t = (size_t)B * s->C * (hw_in > hw_out ? hw_in : hw_out), m = 0;
        if (s->kind == ST_RES)
            m = db_resblock_backward_scratch(&s->res, B, (int)hw_in);
        else if (s->kind == ST_ATTN)
            m = db_transformer2d_backward_scratch(&s->tr, B, (int)hw_in, Tc);
        if (t > tmax)
            tmax = t;
        if (m > smax)
            smax = m;
    }
    u->dt0 = take(&k, tmax);
    u->dt1 = take(&k, tmax);
    u->bscratch = take(&k, smax);
    return k.used;
}

static int grad_plan(db_unet *u, int B, int H, int W, int Tc, db_err *err)
{
    if (u->gB == B && u->gH == H && u->gW == W && u->gTc == Tc)
        return 0;
    size_t n = grad_layout(u, NULL, B, H, W, Tc);
    if (n > u->gws_cap) {
        db_ctx_free(u->ctx, u->gws);
        u->gws = NULL;
        u->gws_cap = 0;
        u->gB = 0;
        if (n > SIZE_MAX / sizeof(float) - 64 || !(u->gws = db_ctx_alloc(u->ctx, n * sizeof(float))))
            return db_err_set(err, DB_ENOMEM, "unet: out of memory for a %zu MiB gradient workspace (B=%d, %dx%d)",
                              n * sizeof(float) >> 20, B, H, W);
        u->gws_cap = n;
    }
    grad_layout(u, u->gws, B, H, W, Tc);
    u->gB = B, u->gH = H, u->gW = W, u->gTc = Tc;
    u->gen++;
    return 0;
}

/* The gradient slot of weight p in g (NULL: frozen). */
static float *gp(const db_gradmap *g, const float *p)
{
    return g->g && p ? g->g + (p - g->w) : NULL;
}

/* Where a consumer writes step i's output gradient: into the step's dout
 * itself when it is the first (no copy), else into scratch t, which give
 * then adds. */
static float *dest(const db_unet *u, int i, float *t)
{
    return u->s[i].dset ? t : u->s[i].dout;
}

/* Step i's output gradient gets d (n floats, from dest): assigned by the
 * first consumer (d is the step's dout then), added by the second (skip
 * outputs). */
static void give(db_unet *u, int i, const float *d, size_t n)
{
    step *s = &u->s[i];
    if (d == s->dout) {
        s->dset = 1;
    } else if (s->dset) {
        db_add_forward(u->ctx, s->dout, s->dout, d, n);
    } else {
        db_ctx_copy(u->ctx, s->dout, d, n * sizeof *d, DB_COPY_D2D);
        s->dset = 1;
    }
}

/* The weight span of every step and of the time MLP, once (a gradient sink's units). */
static int spans(db_unet *u, db_err *err)
{
    if (u->have_spans)
        return 0;
    char key[48];
    for (int i = 0; i < u->ns; i++) {
        step *s = &u->s[i];
        const size_t l = db_grad_unit_key(DB_COMP_UNET, s->name);
        snprintf(key, sizeof key, "%.*s", (int)l, s->name);
        if (db_weights_span(&u->w, key, &s->gs, err))
            return db_err_prefix(err, "unet");
    }
    if (db_weights_span(&u->w, "time_embed", &u->t_gs, err))
        return db_err_prefix(err, "unet");
    u->have_spans = 1;
    return 0;
}

/* The gradient map of the weights in span sp: the sink's window, or the
 * whole buffer.  Every weight of a unit gets one contribution from its
 * step's ops (test_unet_backward checks it), so the ops write it (their
 * assign) into a window, and into the buffer when assign.  A window is
 * zeroed first only where the span holds alignment padding (sp.padded;
 * SD1.5: conv_out's 4-float bias): the ops never write it, it held another
 * unit's gradients, and the unit's optimizer step reads the whole span (a
 * buffer's padding stays the zeros it was made with). */
static db_gradmap unit_map(db_unet *u, float *gbuf, const db_grad_sink *sink, db_span sp, int assign)
{
    if (sink && sink->window) {
        if (sp.padded)
            db_ctx_zero(u->ctx, sink->window, (sp.hi - sp.lo) * sizeof(float));
        return (db_gradmap){u->w.data + sp.lo, sink->window, 1};
    }
    return (db_gradmap){u->w.data, gbuf, assign};
}

/* A unit's gradients are final: tell the sink. */
static int unit_ready(db_unet *u, const db_gradmap *g, const db_grad_sink *sink, db_span sp, const char *name,
                      db_err *err)
{
    if (!sink || !sink->ready)
        return 0;
    if (sink->ready(sink->user, g->g + (u->w.data + sp.lo - g->w), sp.lo, sp.hi, err))
        return db_err_prefix(err, "unet: %s", name);
    return 0;
}

int db_unet_backward(db_unet *u, float *dsample, float *dcontext, db_weights *grads, const float *dout,
                     db_err *err)
{
    return db_unet_backward_to(u, dsample, dcontext, grads, NULL, 0, dout, err);
}

int db_unet_backward_to(db_unet *u, float *dsample, float *dcontext, db_weights *grads, const db_grad_sink *sink,
                        int assign, const float *dout, db_err *err)
{
    db_ctx *c = u->ctx;
    const db_unet_arch *a = &u->a;
    const int B = u->pB, H = u->pH, W = u->pW, Tc = u->pTc, E = a->time_embed_dim, C0 = a->block_out[0];
    if (!dout)
        return db_err_set(err, DB_EUSAGE, "unet: backward: NULL dout");
    if (!B || !u->pkeep)
        return db_err_set(err, DB_EUSAGE, "unet: backward needs a forward made with keep_activations on");
    const int win = sink && sink->window;
    if (!win && grads && (grads->numel != u->w.numel || !grads->data))
        return db_err_set(err, DB_EUSAGE, "unet: backward: gradients of %zu elements for %zu weights", grads->numel,
                          u->w.numel);
    if (c->err.code)
        return db_err_set(err, c->err.code, "unet: the context has a pending error: %s", c->err.msg);
    if (sink && spans(u, err))
        return -1;
    if (win) {
        size_t need = u->t_gs.hi - u->t_gs.lo;
        for (int i = 0; i < u->ns; i++)
            need = u->s[i].gs.hi - u->s[i].gs.lo > need ? u->s[i].gs.hi - u->s[i].gs.lo : need;
        if (sink->window_n < need)
            return db_err_set(err, DB_EUSAGE, "unet: backward: a gradient window of %zu floats for units of up to "
                              "%zu", sink->window_n, need);
    }
    if (grad_plan(u, B, H, W, Tc, err))
        return -1;
    const int trained = grads || win;
    float *gbuf = grads && !win ? grads->data : NULL;
    db_gradmap gm = {u->w.data, gbuf, assign};
    const db_gradmap *g = &gm;
    const float *context = u->context;
    float *demb = trained ? u->dtemb_s : NULL; /* frozen: the time MLP needs no gradient */
    db_ctx_zero(c, u->dtemb_s, (size_t)B * E * sizeof(float));
    if (dcontext)
        db_ctx_zero(c, dcontext, (size_t)B * Tc * a->context_dim * sizeof(float));
    for (int i = 0; i < u->ns; i++)
        u->s[i].dset = 0;
    memset(u->btimes, 0, sizeof u->btimes);
    u->brecompute = 0;

    for (int i = u->ns - 1; i >= 0; i--) {
        double t0 = now();
        step *s = &u->s[i];
        const float *in = s->in >= 0 ? u->s[s->in].out : u->sample;
        const float *d = s->kind == ST_OUT ? dout : s->dout;
        const int h = H >> s->lin, wd = W >> s->lin, hw = h * wd;
        const size_t nin = (size_t)B * s->C * hw;
        if (s->kind != ST_OUT && !s->dset) /* cannot happen: every output is read */
            return db_err_set(err, DB_EUSAGE, "unet: backward: %s got no gradient", s->name);
        if (u->pckpt) { /* the step's activations, from its kept input, into the shared region */
            run_step(u, s, NULL, B, H, W, Tc, 1);
            if (c->err.code)
                return op_failed(u, s->name, err);
            const double t1 = now();
            u->brecompute += t1 - t0;
            t0 = t1;
        }
        if (trained)
            gm = unit_map(u, gbuf, sink, s->gs, assign);
        switch (s->kind) {
        case ST_CONV_IN:
            db_conv2d_backward(c, dsample, gp(g, s->conv_w), gp(g, s->conv_b), d, in, s->conv_w, B, s->C, h, wd,
                               s->OC, 3, 3, 1, 1, 1, gm.fresh);
            break;
        case ST_RES:
            if (s->skip >= 0) {
                const int cs = u->s[s->skip].OC;
                db_resblock_backward(c, u->dt0, demb, g, d, &s->ra, s->cat, u->temb_s, &s->res, B, h, wd,
                                     u->bscratch);
                /* the block's scratch is free again: it may hold the skip's part */
                float *di = dest(u, s->in, u->dt1), *dk = dest(u, s->skip, u->bscratch);
                db_concat_channels_backward(c, di, dk, u->dt0, B, s->C - cs, cs, hw);
                give(u, s->in, di, (size_t)B * (s->C - cs) * hw);
                give(u, s->skip, dk, (size_t)B * cs * hw);
            } else {
                float *di = dest(u, s->in, u->dt0);
                db_resblock_backward(c, di, demb, g, d, &s->ra, in, u->temb_s, &s->res, B, h, wd, u->bscratch);
                give(u, s->in, di, nin);
            }
            break;
        case ST_ATTN: {
            float *di = dest(u, s->in, u->dt0);
            db_transformer2d_backward(c, di, dcontext, g, d, &s->ta, in, context, &s->tr, B, h, wd, Tc,
                                      u->bscratch);
            give(u, s->in, di, nin);
            break;
        }
        case ST_DOWN: {
            float *di = dest(u, s->in, u->dt0);
            db_conv2d_backward(c, di, gp(g, s->conv_w), gp(g, s->conv_b), d, in, s->conv_w, B, s->C, h, wd,
                               s->OC, 3, 3, 2, 1, 1, gm.fresh);
            give(u, s->in, di, nin);
            break;
        }
        case ST_UP: { /* d up (B, C, 2h, 2w), then sum each 2x2 block */
            float *di = dest(u, s->in, u->dt0);
            db_conv2d_backward(c, u->dt1, gp(g, s->conv_w), gp(g, s->conv_b), d, s->up, s->conv_w, B, s->C, 2 * h,
                               2 * wd, s->OC, 3, 3, 1, 1, 1, gm.fresh);
            db_upsample_nearest2x_backward(c, di, u->dt1, B, s->C, h, wd);
            give(u, s->in, di, nin);
            break;
        }
        case ST_OUT: {
            float *di = dest(u, s->in, u->dt0);
            db_conv2d_backward(c, u->dt1, gp(g, s->conv_w), gp(g, s->conv_b), d, s->hn, s->conv_w, B, s->C, h, wd,
                               s->OC, 3, 3, 1, 1, 1, gm.fresh);
            db_groupnorm_backward(c, di, gp(g, s->gn_w), gp(g, s->gn_b), u->dt1, s->mean, s->rstd, in, s->gn_w,
                                  s->gn_b, B, s->C, hw, a->norm_groups, 1, gm.fresh);
            give(u, s->in, di, nin);
            break;
        }
        }
        if (c->err.code)
            return op_failed(u, s->name, err);
        if (trained && unit_ready(u, g, sink, s->gs, s->name, err))
            return -1;
        u->btimes[time_kind(s->kind)] += now() - t0;
    }

    /* the time embedding MLP: temb_s = silu(linear_2(silu(linear_1(tproj)))) */
    if (trained) {
        gm = unit_map(u, gbuf, sink, u->t_gs, assign);
        db_silu_backward(c, u->dtemb, u->dtemb_s, u->temb, (size_t)B * E);
        db_linear_backward(c, u->de1s, gp(g, u->t2_w), gp(g, u->t2_b), u->dtemb, u->e1s, u->t2_w, B, E, E, gm.fresh);
        db_silu_backward(c, u->de1, u->de1s, u->e1, (size_t)B * E);
        db_linear_backward(c, NULL, gp(g, u->t1_w), gp(g, u->t1_b), u->de1, u->tproj, u->t1_w, B, C0, E, gm.fresh);
        if (c->err.code)
            return op_failed(u, "time_embed", err);
        if (unit_ready(u, g, sink, u->t_gs, "time_embed", err))
            return -1;
    }
    return 0;
}

/* ---- memory accounting ------------------------------------------------------------------- */

/* Floats of the forward workspace (and, with grads, of the gradient
 * workspace) at these sizes in u's current mode.  The layouts only write
 * pointers into u; they count on a copy of the steps. */
static size_t count_floats(const db_unet *u, int B, int H, int W, int Tc, int grads)
{
    db_unet tmp = *u;
    tmp.s = malloc((size_t)u->ns * sizeof *u->s);
    if (!tmp.s)
        return 0;
    memcpy(tmp.s, u->s, (size_t)u->ns * sizeof *u->s);
    for (int i = 0; i < tmp.ns; i++)
        tmp.s[i].ta.blk = NULL; /* shared with u: counting must not touch them */
    size_t n = layout(&tmp, NULL, B, H, W, Tc, u->keep, ckpt_mode(u));
    if (grads)
        n += grad_layout(&tmp, NULL, B, H, W, Tc);
    free(tmp.s);
    return n;
}

static size_t floats_to_bytes(size_t n) { return n > SIZE_MAX / sizeof(float) ? 0 : n * sizeof(float); }

size_t db_unet_workspace_bytes(const db_unet *u, int B, int H, int W, int Tc)
{
    return floats_to_bytes(count_floats(u, B, H, W, Tc, 0));
}

size_t db_unet_train_bytes(const db_unet *u, int B, int H, int W, int Tc)
{
    return floats_to_bytes(count_floats(u, B, H, W, Tc, u->keep));
}

size_t db_unet_train_bytes_arch(const db_unet_arch *a, int B, int H, int W, int Tc, int checkpointing)
{
    /* the step list of a UNet without weights: sizes only (see no_weights) */
    db_unet *u = calloc(1, sizeof *u);
    db_err err = {0};
    size_t n = 0;
    if (!u)
        return 0;
    u->a = *a;
    db_arch full;
    memset(&full, 0, sizeof full);
    full.unet = *a;
    if (db_arch_validate_comps(&full, DB_COMP_BIT(DB_COMP_UNET), &err) == 0 && build(u, &err) == 0) {
        u->keep = 1;
        u->ckpt = checkpointing != 0;
        n = db_unet_train_bytes(u, B, H, W, Tc);
    }
    db_unet_free(u);
    return n;
}

unsigned db_unet_layout_gen(const db_unet *u) { return u->gen; }

/* ---- graphs of UNet calls ---------------------------------------------------------------- */

void db_unet_graph_free(db_unet_graph *s)
{
    db_graph_free(s->g);
    s->g = NULL;
    s->warm = 0;
}

int db_unet_graph_run(db_unet_graph *s, db_unet *u, db_graph_fn fn, const void *arg, size_t arg_size,
                      const db_log *log, db_err *err)
{
    return db_unet_graph_run_on(s, u->ctx, &u->gen, fn, arg, arg_size, log, err);
}

int db_unet_graph_run_on(db_unet_graph *s, db_ctx *c, const unsigned *gen, db_graph_fn fn, const void *arg,
                         size_t arg_size, const db_log *log, db_err *err)
{
    if (!s->off && arg_size > sizeof s->arg) {
        db_warn(log, "UNet calls without a graph: an argument of %zu bytes", arg_size);
        s->off = 1;
    }
    if (s->off)
        return fn((void *)arg, err);
    const int same = s->warm && s->arg_size == arg_size && !memcmp(s->arg, arg, arg_size) && s->gen == *gen &&
                     s->prec == (int)c->precision;
    if (!same)
        db_unet_graph_free(s);
    if (same && !s->g) { /* warmed up on these buffers and sizes: record */
        const int r = db_graph_capture(c, &s->g, fn, arg, arg_size, err);
        if (r < 0)
            return -1;
        if (r > 0 || s->gen != *gen) { /* not capturable (or the capture moved the buffers) */
            db_warn(log, "UNet calls without a graph: %s", r > 0 ? err->msg : "the buffers moved");
            db_err_clear(err);
            db_unet_graph_free(s);
            s->off = 1;
            return fn((void *)arg, err);
        }
        if (c->device == DB_CUDA)
            db_debug(log, "UNet call recorded as a CUDA graph (%zu-byte arguments), replayed from now on", arg_size);
    }
    if (s->g) {
        const int r = db_graph_launch(s->g, err);
        if (r <= 0)
            return r;
        /* stale (ops.h): directly now, recorded again at the next call */
        db_debug(log, "UNet graph dropped: %s", err->msg);
        db_err_clear(err);
        db_unet_graph_free(s);
    }
    /* a first call with these buffers and sizes: directly (it builds what
     * ops build at a first call), remembering them and the layout it leaves */
    if (fn((void *)arg, err))
        return -1;
    memcpy(s->arg, arg, arg_size);
    s->arg_size = arg_size;
    s->gen = *gen;
    s->prec = (int)c->precision;
    s->warm = 1;
    return 0;
}

size_t db_unet_allocated_bytes(const db_unet *u) { return floats_to_bytes(u->ws_cap + u->gws_cap); }

/* ---- device-memory plan of a training step ------------------------------------ */

/* The CUDA caching allocator's size of a request (kernels/cuda/ctx.cu's
 * size_class, restated because libdb.a does not link the backend): 256-byte
 * granules, then 4 classes per power of two, so at most 25 % over. */
static size_t cuda_rounded(size_t bytes)
{
    if (bytes >= (size_t)256 << 20) /* kernels/cuda/cuda.h DB_CUDA_LARGE: 2 MiB grains */
        return (bytes + ((size_t)2 << 20) - 1) / ((size_t)2 << 20) * ((size_t)2 << 20);
    size_t b = bytes < 256 ? 256 : (bytes + 255) & ~(size_t)255;
    int lg = 63 - __builtin_clzll((unsigned long long)b);
    size_t p = (size_t)1 << lg, granule = p / 4 < 256 ? 256 : p / 4;
    return (b + granule - 1) / granule * granule;
}

/* fp32 parameters of component comp (position ids are not loaded). */
static size_t arch_params(const db_tname *t, size_t n, int comp)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (t[i].comp != comp || t[i].init == DB_INIT_POSITION_IDS)
            continue;
        size_t e = 1;
        for (int d = 0; d < t[i].ndim; d++)
            e *= (size_t)t[i].shape[d];
        k += e;
    }
    return k;
}

/* db_grad_window_floats of the table's component comp, in bytes (0 when out of memory) */
static size_t arch_window(const db_tname *t, size_t n, int comp)
{
    const char **names = malloc((n ? n : 1) * sizeof *names);
    size_t *numels = malloc((n ? n : 1) * sizeof *numels), k = 0, r = 0;
    if (names && numels) {
        for (size_t i = 0; i < n; i++) {
            if (t[i].comp != comp || t[i].init == DB_INIT_POSITION_IDS)
                continue;
            names[k] = t[i].compvis;
            numels[k++] = (size_t)db_shape_numel(t[i].ndim, t[i].shape);
        }
        r = db_grad_window_floats(comp, names, numels, k) * 4;
    }
    free(names);
    free(numels);
    return r;
}

size_t db_unet_train_device_plan(const db_arch *a, int B, int H, int W, int T, int train_text, int checkpointing,
                                 int fused, int graphs, db_precision prec, db_train_device_plan *p)
{
    memset(p, 0, sizeof *p);
    db_tname *t = NULL;
    size_t nt = 0;
    db_err err = {0};
    if (B <= 0 || H <= 0 || W <= 0 || T <= 0 || db_arch_names(a, &t, &nt, &err))
        return 0;
    const size_t pu = arch_params(t, nt, DB_COMP_UNET) * 4, pt = arch_params(t, nt, DB_COMP_TEXT) * 4;
    const size_t wu = arch_window(t, nt, DB_COMP_UNET), wt = train_text ? arch_window(t, nt, DB_COMP_TEXT) : 0;
    free(t);
    const db_unet_arch *u = &a->unet;
    p->unet_act = db_unet_train_bytes_arch(u, B, H, W, T, checkpointing);
    if (!p->unet_act || (fused && !wu))
        return 0;
    const size_t gt = train_text ? pt : 0;
    p->weights = pu + pt;
    p->moments = 2 * (pu + gt);
    /* fused backward: one window the size of the largest unit instead of
     * gradient buffers (the trainer's allocations below follow) */
    p->grads = fused ? (wu > wt ? wu : wt) : pu + gt;
    p->text_act = db_clip_workspace_bytes(&a->text, (size_t)B * T, train_text);
    /* train.c's reserve(): noisy, pred, dpred, timesteps (latent-sized), and
     * the context and its gradient */
    const size_t lat = (size_t)B * u->in_channels * H * W * 4, ctx = (size_t)B * T * a->text.hidden * 4;
    p->batch = 4 * lat + 2 * ctx;
    /* The largest matmul-class op, per level: the Transformer's GEGLU
     * projection (N x C) -> (N x 8C) at a level with attention, else the
     * widest ResBlock conv (the up path's conv1 reads the concatenation,
     * at most 2C + C channels).  Its operands (input, weight, output) in
     * the compute type, twice: a backward converts dout and writes dinp as
     * well.  cuDNN's workspace: that conv's im2col buffer, fp32. */
    size_t op = 0, im2col = 0;
    for (int l = 0; l < u->nlevels; l++) {
        const size_t hw = (size_t)(H >> l) * (size_t)(W >> l), N = (size_t)B * hw, C = (size_t)u->block_out[l];
        const size_t cin = 3 * C;
        if (u->cross_attn[l] || u->up_cross_attn[u->nlevels - 1 - l]) {
            const size_t geglu = N * C + 8 * C * C + N * 8 * C;
            op = geglu > op ? geglu : op;
        }
        const size_t conv = N * cin + C * cin * 9 + N * C;
        op = conv > op ? conv : op;
        const size_t col = N * cin * 9 * 4;
        im2col = col > im2col ? col : im2col;
    }
    p->convert = prec == DB_PREC_F32 ? 0 : 2 * op * 2;
    p->shadow = prec == DB_PREC_F32 ? 0 : (pu + pt) / 2;
    p->conv_ws = im2col;
    /* the allocations as the allocator sizes them: one each for the
     * weights, gradients and moments of a component, the two UNet
     * workspaces and the text encoder's (rounded as one: close enough), the
     * batch buffers; the transients (conversion, workspace) at the bound */
    size_t raw = 0, rounded = 0;
    const size_t gu_a = fused ? p->grads : pu, gt_a = fused ? 0 : gt;
    const size_t allocs[] = {pu, pt, gu_a, pu, pu, gt_a, gt, gt, p->unet_act, p->text_act, lat, lat, lat, lat, ctx, ctx};
    for (size_t i = 0; i < sizeof allocs / sizeof allocs[0]; i++)
        if (allocs[i])
            raw += allocs[i], rounded += cuda_rounded(allocs[i]);
    p->rounding = rounded - raw + (p->convert + p->conv_ws) / 4;
    /* a graph owns the blocks its capture used: the forward's and the
     * backward's temporaries are held at once instead of one after the other
     * (the fused step's too: its backward replays as a graph, train.c) */
    p->graphs = graphs ? p->convert + p->conv_ws : 0;
    p->total = p->weights + p->grads + p->moments + p->unet_act + p->text_act + p->batch + p->convert + p->conv_ws +
               p->shadow + p->rounding + p->graphs;
    return p->total;
}

/* What validation samples hold, in bytes: the VAE's fp32 weights, its
 * decode workspace for H x W latents, and txt2img's buffers (a handful of
 * latent-sized ones: latents, noise, the guidance pair, scheduler state)
 * with the decoded image.  0, or -1 for a bad arch. */
static int validation_parts(const db_arch *a, int H, int W, size_t *vae, size_t *ws, size_t *bufs)
{
    db_tname *t = NULL;
    size_t nt = 0;
    db_err err = {0};
    if (H <= 0 || W <= 0 || db_arch_names(a, &t, &nt, &err))
        return -1;
    *vae = arch_params(t, nt, DB_COMP_VAE) * 4;
    free(t);
    *ws = db_vae_decode_bytes_arch(&a->vae, H, W);
    if (!*vae || !*ws)
        return -1;
    const size_t f = (size_t)1 << (a->vae.nlevels - 1);
    *bufs = 4 * ((size_t)a->unet.in_channels * H * W * 8 + (size_t)a->vae.out_channels * H * W * f * f);
    return 0;
}

size_t db_unet_validation_host_bytes(const db_arch *a, int H, int W)
{
    size_t vae, ws, bufs;
    return validation_parts(a, H, W, &vae, &ws, &bufs) ? 0 : vae + ws + bufs;
}

size_t db_unet_validation_device_plan(const db_arch *a, int H, int W, int graphs, db_precision prec,
                                      db_train_device_plan *p)
{
    size_t vae, ws, bufs;
    if (validation_parts(a, H, W, &vae, &ws, &bufs))
        return 0;
    const size_t v = cuda_rounded(vae) + (prec == DB_PREC_F32 ? 0 : vae / 2) + cuda_rounded(ws) + bufs +
                     (graphs ? p->convert + p->conv_ws : 0);
    p->total += v - p->validation;
    p->validation = v;
    return p->total;
}
