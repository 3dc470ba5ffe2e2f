/* VAE (AutoencoderKL) encoder and decoder, forward only (see vae.h).
 * Shapes are of one image (the batch is looped over): C channels,
 * H W the current resolution, HW = H*W. */
#include "vae.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/sd/arch.h"
#include "libcommon/sd/weights.h"

#define VAE_EPS 1e-6f           /* every GroupNorm of diffusers' Encoder/Decoder */
#define LOGVAR_MIN (-30.0f)     /* DiagonalGaussianDistribution's clamp */
#define LOGVAR_MAX 20.0f

/* n floats rounded up to 16 (64 bytes) */
#define ALIGN16(n) (((size_t)(n) + 15) & ~(size_t)15)

typedef struct conv {
    float *w, *b;               /* (OC, C, K, K), (OC) */
} conv;

typedef struct norm {
    float *w, *b;               /* (C) */
} norm;

/* ResnetBlock2D without time embedding. */
typedef struct resblock {
    int cin, cout;
    norm n1;                    /* (cin) */
    conv c1;                    /* (cout, cin, 3, 3) */
    norm n2;                    /* (cout) */
    conv c2;                    /* (cout, cout, 3, 3) */
    conv sc;                    /* (cout, cin, 1, 1) nin_shortcut; w NULL when cin == cout */
} resblock;

/* Single-head self-attention over HW positions, with its GroupNorm and residual. */
typedef struct attnblock {
    int c;
    norm n;                     /* (C) */
    conv q, k, v, o;            /* (C, C) as linears (stored [C,C,1,1] or [C,C]), (C) */
} attnblock;

typedef struct midblock {
    resblock r1;
    attnblock at;
    resblock r2;
} midblock;

/* One level: encoder down.i (lpb resblocks, downsample) or decoder up.i
 * (lpb+1 resblocks, upsample); samp.w NULL on the level without one. */
typedef struct level {
    resblock *res;
    int nres;
    conv samp;                  /* (C, C, 3, 3) */
} level;

struct db_vae {
    db_ctx *ctx;                /* borrowed */
    db_vae_arch arch;
    db_weights w;               /* owned; everything below points into it */
    /* encoder */
    conv enc_in;                /* (c0, in, 3, 3) */
    level enc[DB_MAXLEVELS];    /* enc[i] at resolution H >> i */
    midblock enc_mid;
    norm enc_norm;              /* (clast) */
    conv enc_out;               /* (2Z, clast, 3, 3) */
    conv quant;                 /* (2Z, 2Z, 1, 1) */
    /* decoder */
    conv post_quant;            /* (Z, Z, 1, 1) */
    conv dec_in;                /* (clast, Z, 3, 3) */
    midblock dec_mid;
    level dec[DB_MAXLEVELS];    /* dec[u] = CompVis decoder.up.(L-1-u), at h << u */
    norm dec_norm;              /* (c0) */
    conv dec_out;               /* (out, c0, 3, 3) */
    /* workspace: three activation slots and two for the mid attention's k, v */
    float *ws;
    size_t ws_cap;              /* floats */
};

/* ---- weights ------------------------------------------------------------------ */

typedef struct binder {
    const db_weights *w;
    db_err *err;
    int failed;
} binder;

/* The tensor named by fmt with `numel` elements, or NULL (first error kept). */
static float *get(binder *b, int64_t numel, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static float *get(binder *b, int64_t numel, const char *fmt, ...)
{
    if (b->failed)
        return NULL;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    float *p = db_weights_get(b->w, b->err, numel, "%s", name);
    if (!p)
        b->failed = 1;
    return p;
}

static void bind_conv(binder *b, conv *c, int oc, int ic, int k, const char *base)
{
    c->w = get(b, (int64_t)oc * ic * k * k, "%s.weight", base);
    c->b = get(b, oc, "%s.bias", base);
}

static void bind_norm(binder *b, norm *n, int ch, const char *base)
{
    n->w = get(b, ch, "%s.weight", base);
    n->b = get(b, ch, "%s.bias", base);
}

static void bind_res(binder *b, resblock *r, int cin, int cout, const char *base)
{
    char s[200];
    r->cin = cin;
    r->cout = cout;
    snprintf(s, sizeof s, "%s.norm1", base);
    bind_norm(b, &r->n1, cin, s);
    snprintf(s, sizeof s, "%s.conv1", base);
    bind_conv(b, &r->c1, cout, cin, 3, s);
    snprintf(s, sizeof s, "%s.norm2", base);
    bind_norm(b, &r->n2, cout, s);
    snprintf(s, sizeof s, "%s.conv2", base);
    bind_conv(b, &r->c2, cout, cout, 3, s);
    if (cin != cout) {
        snprintf(s, sizeof s, "%s.nin_shortcut", base);
        bind_conv(b, &r->sc, cout, cin, 1, s);
    }
}

static void bind_mid(binder *b, midblock *m, int ch, const char *coder)
{
    char s[200];
    snprintf(s, sizeof s, "%s.mid.block_1", coder);
    bind_res(b, &m->r1, ch, ch, s);
    m->at.c = ch;
    snprintf(s, sizeof s, "%s.mid.attn_1.norm", coder);
    bind_norm(b, &m->at.n, ch, s);
    snprintf(s, sizeof s, "%s.mid.attn_1.q", coder);
    bind_conv(b, &m->at.q, ch, ch, 1, s);
    snprintf(s, sizeof s, "%s.mid.attn_1.k", coder);
    bind_conv(b, &m->at.k, ch, ch, 1, s);
    snprintf(s, sizeof s, "%s.mid.attn_1.v", coder);
    bind_conv(b, &m->at.v, ch, ch, 1, s);
    snprintf(s, sizeof s, "%s.mid.attn_1.proj_out", coder);
    bind_conv(b, &m->at.o, ch, ch, 1, s);
    snprintf(s, sizeof s, "%s.mid.block_2", coder);
    bind_res(b, &m->r2, ch, ch, s);
}

static int bind_all(db_vae *v, db_err *err)
{
    const db_vae_arch *a = &v->arch;
    const int L = a->nlevels, lpb = a->layers_per_block, Z = a->latent_channels;
    const int c0 = a->block_out[0], clast = a->block_out[L - 1];
    binder b = {&v->w, err, 0};
    char s[200];

    bind_conv(&b, &v->enc_in, c0, a->in_channels, 3, "encoder.conv_in");
    int ch = c0;
    for (int i = 0; i < L; i++) {
        level *lv = &v->enc[i];
        if (!(lv->res = calloc((size_t)lpb, sizeof *lv->res)))
            return db_err_set(err, DB_ENOMEM, "vae: out of memory");
        lv->nres = lpb;
        for (int j = 0; j < lpb; j++) {
            snprintf(s, sizeof s, "encoder.down.%d.block.%d", i, j);
            bind_res(&b, &lv->res[j], ch, a->block_out[i], s);
            ch = a->block_out[i];
        }
        if (i < L - 1) {
            snprintf(s, sizeof s, "encoder.down.%d.downsample.conv", i);
            bind_conv(&b, &lv->samp, ch, ch, 3, s);
        }
    }
    bind_mid(&b, &v->enc_mid, ch, "encoder");
    bind_norm(&b, &v->enc_norm, ch, "encoder.norm_out");
    bind_conv(&b, &v->enc_out, 2 * Z, ch, 3, "encoder.conv_out");
    bind_conv(&b, &v->quant, 2 * Z, 2 * Z, 1, "quant_conv");

    bind_conv(&b, &v->post_quant, Z, Z, 1, "post_quant_conv");
    bind_conv(&b, &v->dec_in, clast, Z, 3, "decoder.conv_in");
    ch = clast;
    bind_mid(&b, &v->dec_mid, ch, "decoder");
    for (int u = 0; u < L; u++) {
        const int lvl = L - 1 - u; /* CompVis numbers decoder levels from the top */
        level *lv = &v->dec[u];
        if (!(lv->res = calloc((size_t)lpb + 1, sizeof *lv->res)))
            return db_err_set(err, DB_ENOMEM, "vae: out of memory");
        lv->nres = lpb + 1;
        for (int j = 0; j <= lpb; j++) {
            snprintf(s, sizeof s, "decoder.up.%d.block.%d", lvl, j);
            bind_res(&b, &lv->res[j], ch, a->block_out[lvl], s);
            ch = a->block_out[lvl];
        }
        if (lvl > 0) {
            snprintf(s, sizeof s, "decoder.up.%d.upsample.conv", lvl);
            bind_conv(&b, &lv->samp, ch, ch, 3, s);
        }
    }
    bind_norm(&b, &v->dec_norm, ch, "decoder.norm_out");
    bind_conv(&b, &v->dec_out, a->out_channels, ch, 3, "decoder.conv_out");
    return b.failed ? db_err_prefix(err, "vae") : 0;
}

int db_vae_create(db_vae **out, db_ctx *ctx, const db_model *m, db_err *err)
{
    *out = NULL;
    if (db_arch_validate_comps(&m->arch, DB_COMP_BIT(DB_COMP_VAE), err))
        return db_err_prefix(err, "vae");
    db_vae *v = calloc(1, sizeof *v);
    if (!v)
        return db_err_set(err, DB_ENOMEM, "vae: out of memory");
    v->ctx = ctx;
    v->arch = m->arch.vae;
    if (db_weights_load_ctx(&v->w, ctx, m, DB_COMP_VAE, err) || bind_all(v, err)) {
        db_vae_free(v);
        return -1;
    }
    *out = v;
    return 0;
}

void db_vae_trim(db_vae *v)
{
    db_ctx_free(v->ctx, v->ws);
    v->ws = NULL;
    v->ws_cap = 0;
}

void db_vae_free(db_vae *v)
{
    if (!v)
        return;
    db_vae_trim(v);
    for (int i = 0; i < DB_MAXLEVELS; i++) {
        free(v->enc[i].res);
        free(v->dec[i].res);
    }
    db_weights_free(&v->w);
    free(v);
}

int db_vae_factor(const db_vae *v) { return 1 << (v->arch.nlevels - 1); }

size_t db_vae_allocated_bytes(const db_vae *v) { return v->ws_cap * sizeof(float); }

/* ---- workspace ---------------------------------------------------------------- */

typedef struct slots {
    float *s[3];                /* (S) each: the running activation and two temporaries */
    float *k, *v;               /* (M) each: the mid attention's keys and values */
} slots;

/* Carve slots of S and M floats out of the workspace, growing it. */
static int ws_slots(db_vae *v, slots *sl, size_t S, size_t M, db_err *err)
{
    S = ALIGN16(S);
    M = ALIGN16(M);
    size_t need = 3 * S + 2 * M;
    if (need > v->ws_cap) {
        db_vae_trim(v);
        if (!(v->ws = db_ctx_alloc(v->ctx, need * sizeof(float))))
            return db_err_set(err, DB_ENOMEM, "vae: out of memory for a %zu MB workspace",
                              need * sizeof(float) >> 20);
        v->ws_cap = need;
    }
    for (int i = 0; i < 3; i++)
        sl->s[i] = v->ws + (size_t)i * S;
    sl->k = v->ws + 3 * S;
    sl->v = sl->k + M;
    return 0;
}

static size_t zmax(size_t a, size_t b) { return a > b ? a : b; }

/* ---- blocks (one image; each returns the ctx's sticky status) ------------------ */

/* ResBlock in place: x (cin, H, W) in, (cout, H, W) out; t1, t2 scratch
 * of max(cin, cout) * HW each. */
static int res_forward(db_vae *v, const resblock *r, float *x, float *t1, float *t2, int H, int W)
{
    db_ctx *c = v->ctx;
    const int G = v->arch.norm_groups, HW = H * W;
    db_groupnorm_forward(c, t1, NULL, NULL, x, r->n1.w, r->n1.b, 1, r->cin, HW, G, VAE_EPS, 1);
    db_conv2d_forward(c, t2, t1, r->c1.w, r->c1.b, 1, r->cin, H, W, r->cout, 3, 3, 1, 1, 1);
    db_groupnorm_forward(c, t1, NULL, NULL, t2, r->n2.w, r->n2.b, 1, r->cout, HW, G, VAE_EPS, 1);
    db_conv2d_forward(c, t2, t1, r->c2.w, r->c2.b, 1, r->cout, H, W, r->cout, 3, 3, 1, 1, 1);
    if (r->sc.w) { /* x (cout, HW) = nin_shortcut(x) + h */
        db_conv2d_forward(c, t1, x, r->sc.w, r->sc.b, 1, r->cin, H, W, r->cout, 1, 1, 1, 0, 0);
        return db_add_forward(c, x, t1, t2, (size_t)r->cout * HW);
    }
    return db_add_forward(c, x, x, t2, (size_t)r->cout * HW);
}

/* Mid attention in place: x (C, HW) += proj(attn(q, k, v)) of group_norm(x)
 * as HW tokens of width C, one head of size C (scale C^-0.5).
 * t1, t2 (C*HW) scratch; kb, vb (C*HW) the keys and values. */
static int attn_forward(db_vae *v, const attnblock *a, float *x, float *t1, float *t2, float *kb, float *vb, int HW)
{
    db_ctx *c = v->ctx;
    const int C = a->c;
    db_groupnorm_forward(c, t1, NULL, NULL, x, a->n.w, a->n.b, 1, C, HW, v->arch.norm_groups, VAE_EPS, 0);
    db_transpose_forward(c, t2, t1, 1, C, HW);                 /* (HW, C) */
    db_linear_forward(c, t1, t2, a->q.w, a->q.b, HW, C, C);    /* q (HW, C) */
    db_linear_forward(c, kb, t2, a->k.w, a->k.b, HW, C, C);
    db_linear_forward(c, vb, t2, a->v.w, a->v.b, HW, C, C);
    db_attention_forward(c, t2, NULL, t1, kb, vb, 1, HW, HW, 1, C, 0);
    db_linear_forward(c, t1, t2, a->o.w, a->o.b, HW, C, C);    /* (HW, C) */
    db_transpose_forward(c, t2, t1, 1, HW, C);                 /* (C, HW) */
    return db_add_forward(c, x, x, t2, (size_t)C * HW);
}

static int mid_forward(db_vae *v, const midblock *m, slots *sl, int H, int W)
{
    res_forward(v, &m->r1, sl->s[0], sl->s[1], sl->s[2], H, W);
    attn_forward(v, &m->at, sl->s[0], sl->s[1], sl->s[2], sl->k, sl->v, H * W);
    return res_forward(v, &m->r2, sl->s[0], sl->s[1], sl->s[2], H, W);
}

static void swap01(slots *sl)
{
    float *t = sl->s[0];
    sl->s[0] = sl->s[1];
    sl->s[1] = t;
}

static int op_failed(db_vae *v, db_err *err, const char *what)
{
    return db_err_set(err, v->ctx->err.code ? v->ctx->err.code : DB_EUSAGE, "vae %s: %s", what, v->ctx->err.msg);
}

/* ---- encoder ------------------------------------------------------------------ */

/* moments (2Z, H/f, W/f) of one image (in_channels, H, W); returns where
 * they are (a workspace slot). */
static float *encode_one(db_vae *v, slots *sl, const float *image, int H, int W)
{
    db_ctx *c = v->ctx;
    const db_vae_arch *a = &v->arch;
    const int L = a->nlevels, Z = a->latent_channels;
    int ch = a->block_out[0];
    db_conv2d_forward(c, sl->s[0], image, v->enc_in.w, v->enc_in.b, 1, a->in_channels, H, W, ch, 3, 3, 1, 1, 1);
    for (int i = 0; i < L; i++) {
        const level *lv = &v->enc[i];
        for (int j = 0; j < lv->nres; j++)
            res_forward(v, &lv->res[j], sl->s[0], sl->s[1], sl->s[2], H, W);
        ch = a->block_out[i];
        if (lv->samp.w) { /* F.pad(x, (0, 1, 0, 1)), 3x3 stride 2 */
            db_conv2d_forward(c, sl->s[1], sl->s[0], lv->samp.w, lv->samp.b, 1, ch, H, W, ch, 3, 3, 2, 0, 1);
            swap01(sl);
            H /= 2;
            W /= 2;
        }
    }
    mid_forward(v, &v->enc_mid, sl, H, W);
    db_groupnorm_forward(c, sl->s[1], NULL, NULL, sl->s[0], v->enc_norm.w, v->enc_norm.b, 1, ch, H * W,
                         a->norm_groups, VAE_EPS, 1);
    db_conv2d_forward(c, sl->s[2], sl->s[1], v->enc_out.w, v->enc_out.b, 1, ch, H, W, 2 * Z, 3, 3, 1, 1, 1);
    db_conv2d_forward(c, sl->s[1], sl->s[2], v->quant.w, v->quant.b, 1, 2 * Z, H, W, 2 * Z, 1, 1, 1, 0, 0);
    return sl->s[1];
}

/* Activation floats an encode of one H x W image needs per slot (S) and for
 * the attention's k and v (M). */
static void encode_sizes(const db_vae_arch *a, int H, int W, size_t *S, size_t *M)
{
    const int L = a->nlevels;
    size_t s = (size_t)a->block_out[0] * H * W, hw = 0;
    int cin = a->block_out[0];
    for (int i = 0; i < L; i++) {
        hw = (size_t)(H >> i) * (size_t)(W >> i);
        s = zmax(s, (size_t)zmax((size_t)cin, (size_t)a->block_out[i]) * hw);
        cin = a->block_out[i];
    }
    s = zmax(s, (size_t)2 * a->latent_channels * hw);
    *S = s;
    *M = (size_t)a->block_out[L - 1] * hw;
}

/* torch.clamp(logvar, -30, 20) of one image's (Z, h, w) logvar.  No op in
 * ops.h does a clamp, so a host loop: in place on the CPU (the ctx's memory
 * is host memory), elsewhere through a host copy of the small latent-sized
 * tensor (D2H, clamp, H2D). */
static int clamp_logvar(db_vae *v, float *lv, size_t n, db_err *err)
{
    db_ctx *c = v->ctx;
    float *h = c->device == DB_CPU ? lv : malloc(n * sizeof *h);
    if (!h)
        return db_err_set(err, DB_ENOMEM, "vae encode: out of memory");
    int rc = db_ctx_copy(c, h, lv, n * sizeof *h, DB_COPY_D2H);
    for (size_t i = 0; !rc && i < n; i++)
        h[i] = h[i] < LOGVAR_MIN ? LOGVAR_MIN : h[i] > LOGVAR_MAX ? LOGVAR_MAX : h[i];
    if (!rc)
        rc = db_ctx_copy(c, lv, h, n * sizeof *h, DB_COPY_H2D);
    if (h != lv)
        free(h);
    return rc ? op_failed(v, err, "encode") : 0;
}

int db_vae_encode(db_vae *v, float *mean, float *logvar, const float *image, int B, int H, int W, db_err *err)
{
    const db_vae_arch *a = &v->arch;
    const int f = db_vae_factor(v), Z = a->latent_channels;
    if (B <= 0 || H <= 0 || W <= 0 || H % f || W % f || !mean || !image)
        return db_err_set(err, DB_EUSAGE, "vae encode: %d images of %dx%d: sizes must be positive multiples of %d", B,
                          W, H, f);
    size_t S, M;
    encode_sizes(a, H, W, &S, &M);
    slots sl;
    if (ws_slots(v, &sl, S, M, err))
        return -1;
    db_ctx *c = v->ctx;
    const size_t in = (size_t)a->in_channels * H * W, zhw = (size_t)Z * (H / f) * (W / f);
    for (int b = 0; b < B; b++) {
        slots t = sl; /* the blocks swap slots around */
        const float *mom = encode_one(v, &t, image + b * in, H, W);
        /* moments = [mean | logvar], each (Z, h, w) */
        db_axpby_forward(c, mean + b * zhw, mom, NULL, 1.0f, 0.0f, zhw);
        if (logvar)
            db_axpby_forward(c, logvar + b * zhw, mom + zhw, NULL, 1.0f, 0.0f, zhw);
        if (c->err.code)
            return op_failed(v, err, "encode");
        if (logvar && clamp_logvar(v, logvar + b * zhw, zhw, err))
            return -1;
    }
    return 0;
}

/* ---- decoder ------------------------------------------------------------------ */

/* image (out_channels, h*f, w*f) of one latent (Z, h, w). */
static int decode_one(db_vae *v, slots *sl, float *image, const float *lat, int H, int W)
{
    db_ctx *c = v->ctx;
    const db_vae_arch *a = &v->arch;
    const int L = a->nlevels, Z = a->latent_channels;
    int ch = a->block_out[L - 1];
    db_conv2d_forward(c, sl->s[1], lat, v->post_quant.w, v->post_quant.b, 1, Z, H, W, Z, 1, 1, 1, 0, 0);
    db_conv2d_forward(c, sl->s[0], sl->s[1], v->dec_in.w, v->dec_in.b, 1, Z, H, W, ch, 3, 3, 1, 1, 1);
    mid_forward(v, &v->dec_mid, sl, H, W);
    for (int u = 0; u < L; u++) {
        const level *lv = &v->dec[u];
        for (int j = 0; j < lv->nres; j++)
            res_forward(v, &lv->res[j], sl->s[0], sl->s[1], sl->s[2], H, W);
        ch = a->block_out[L - 1 - u];
        if (lv->samp.w) { /* nearest 2x, 3x3 conv */
            db_upsample_nearest2x_forward(c, sl->s[1], sl->s[0], 1, ch, H, W);
            H *= 2;
            W *= 2;
            db_conv2d_forward(c, sl->s[0], sl->s[1], lv->samp.w, lv->samp.b, 1, ch, H, W, ch, 3, 3, 1, 1, 1);
        }
    }
    db_groupnorm_forward(c, sl->s[1], NULL, NULL, sl->s[0], v->dec_norm.w, v->dec_norm.b, 1, ch, H * W,
                         a->norm_groups, VAE_EPS, 1);
    return db_conv2d_forward(c, image, sl->s[1], v->dec_out.w, v->dec_out.b, 1, ch, H, W, a->out_channels, 3, 3, 1,
                             1, 1);
}

static void decode_sizes(const db_vae_arch *a, int h, int w, size_t *S, size_t *M)
{
    const int L = a->nlevels;
    const size_t hw0 = (size_t)h * w;
    int cin = a->block_out[L - 1];
    size_t s = zmax((size_t)a->latent_channels, (size_t)cin) * hw0;
    for (int u = 0; u < L; u++) {
        const int lvl = L - 1 - u;
        const size_t hw = hw0 << (2 * u);
        s = zmax(s, zmax((size_t)cin, (size_t)a->block_out[lvl]) * hw);
        cin = a->block_out[lvl];
        if (lvl > 0)
            s = zmax(s, (size_t)cin * hw * 4);
    }
    *S = s;
    *M = (size_t)a->block_out[L - 1] * hw0;
}

size_t db_vae_decode_bytes_arch(const db_vae_arch *a, int h, int w)
{
    if (a->nlevels < 1 || h <= 0 || w <= 0)
        return 0;
    size_t S, M;
    decode_sizes(a, h, w, &S, &M);
    return (3 * ALIGN16(S) + 2 * ALIGN16(M)) * sizeof(float); /* ws_slots' carving */
}

int db_vae_decode(db_vae *v, float *image, const float *latents, int B, int h, int w, db_err *err)
{
    const db_vae_arch *a = &v->arch;
    const int f = db_vae_factor(v);
    if (B <= 0 || h <= 0 || w <= 0 || !image || !latents)
        return db_err_set(err, DB_EUSAGE, "vae decode: bad sizes: %d latents of %dx%d", B, w, h);
    size_t S, M;
    decode_sizes(a, h, w, &S, &M);
    slots sl;
    if (ws_slots(v, &sl, S, M, err))
        return -1;
    const size_t zhw = (size_t)a->latent_channels * h * w, out = (size_t)a->out_channels * h * f * w * f;
    for (int b = 0; b < B; b++) {
        slots t = sl;
        if (decode_one(v, &t, image + b * out, latents + b * zhw, h, w))
            return op_failed(v, err, "decode");
    }
    return 0;
}
