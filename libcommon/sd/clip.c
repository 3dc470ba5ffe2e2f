/* CLIP text encoder forward (see clip.h).  Shape legend there. */
#include "clip.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* n floats rounded up to 16 (64 bytes) */
#define ALIGN16(n) (((size_t)(n) + 15) & ~(size_t)15)

/* ---- parameters ------------------------------------------------------------- */

int db_clip_params_bind(db_clip_params *p, const db_weights *w, const db_text_arch *a, db_err *err)
{
    memset(p, 0, sizeof *p);
    const int64_t D = a->hidden, I = a->intermediate;
    p->layers = calloc((size_t)a->layers, sizeof *p->layers);
    if (!p->layers)
        return db_err_set(err, DB_ENOMEM, "text encoder: out of memory");
    p->nlayers = a->layers;
#define GET(dst, n, ...)                                     \
    do {                                                     \
        if (!((dst) = db_weights_get(w, err, (n), __VA_ARGS__))) \
            goto fail;                                       \
    } while (0)
    GET(p->wte, (int64_t)a->vocab_size * D, "text_model.embeddings.token_embedding.weight");
    GET(p->wpe, (int64_t)a->max_positions * D, "text_model.embeddings.position_embedding.weight");
    for (int l = 0; l < a->layers; l++) {
        db_clip_layer *y = &p->layers[l];
        const char *b = "text_model.encoder.layers";
        GET(y->ln1_w, D, "%s.%d.layer_norm1.weight", b, l);
        GET(y->ln1_b, D, "%s.%d.layer_norm1.bias", b, l);
        GET(y->q_w, D * D, "%s.%d.self_attn.q_proj.weight", b, l);
        GET(y->q_b, D, "%s.%d.self_attn.q_proj.bias", b, l);
        GET(y->k_w, D * D, "%s.%d.self_attn.k_proj.weight", b, l);
        GET(y->k_b, D, "%s.%d.self_attn.k_proj.bias", b, l);
        GET(y->v_w, D * D, "%s.%d.self_attn.v_proj.weight", b, l);
        GET(y->v_b, D, "%s.%d.self_attn.v_proj.bias", b, l);
        GET(y->o_w, D * D, "%s.%d.self_attn.out_proj.weight", b, l);
        GET(y->o_b, D, "%s.%d.self_attn.out_proj.bias", b, l);
        GET(y->ln2_w, D, "%s.%d.layer_norm2.weight", b, l);
        GET(y->ln2_b, D, "%s.%d.layer_norm2.bias", b, l);
        GET(y->fc1_w, I * D, "%s.%d.mlp.fc1.weight", b, l);
        GET(y->fc1_b, I, "%s.%d.mlp.fc1.bias", b, l);
        GET(y->fc2_w, D * I, "%s.%d.mlp.fc2.weight", b, l);
        GET(y->fc2_b, D, "%s.%d.mlp.fc2.bias", b, l);
    }
    GET(p->lnf_w, D, "text_model.final_layer_norm.weight");
    GET(p->lnf_b, D, "text_model.final_layer_norm.bias");
#undef GET
    return 0;
fail:
    db_err_prefix(err, "text encoder");
    db_clip_params_free(p);
    return -1;
}

void db_clip_params_free(db_clip_params *p)
{
    free(p->layers);
    memset(p, 0, sizeof *p);
}

/* ---- model ------------------------------------------------------------------ */

int db_clip_create(db_clip **out, db_ctx *ctx, const db_model *m, db_err *err)
{
    *out = NULL;
    if (db_arch_validate_comps(&m->arch, DB_COMP_BIT(DB_COMP_TEXT), err))
        return db_err_prefix(err, "text encoder");
    db_clip *c = calloc(1, sizeof *c);
    if (!c)
        return db_err_set(err, DB_ENOMEM, "text encoder: out of memory");
    c->ctx = ctx;
    c->arch = m->arch.text;
    if (db_weights_load_ctx(&c->w, ctx, m, DB_COMP_TEXT, err) || db_clip_params_bind(&c->p, &c->w, &c->arch, err)) {
        db_clip_free(c);
        return -1;
    }
    *out = c;
    return 0;
}

void db_clip_trim(db_clip *c)
{
    db_ctx_free(c->ctx, c->a.mem);
    memset(&c->a, 0, sizeof c->a);
    db_ctx_free(c->ctx, c->g.mem);
    memset(&c->g, 0, sizeof c->g);
    c->B = c->T = 0;
}

void db_clip_free(db_clip *c)
{
    if (!c)
        return;
    db_clip_trim(c);
    db_clip_params_free(&c->p);
    db_weights_free(&c->w);
    free(c);
}

/* Carve the activations for N tokens out of one allocation (each buffer
 * 64-byte aligned).  Called with base NULL to measure. */
static size_t acts_layout(db_clip_acts *a, float *base, size_t N, const db_text_arch *t)
{
    const size_t L = (size_t)t->layers, D = (size_t)t->hidden, I = (size_t)t->intermediate, NH = (size_t)t->heads;
    size_t off = 0;
#define TAKE(ptr, n)                                   \
    do {                                               \
        (ptr) = base ? (void *)(base + off) : NULL;    \
        off += ALIGN16(n);                        \
    } while (0)
    TAKE(a->ids, N); /* int32, same size as a float */
    TAKE(a->hidden, (L + 1) * N * D);
    TAKE(a->ln1, L * N * D);
    TAKE(a->ln1_mean, L * N);
    TAKE(a->ln1_rstd, L * N);
    TAKE(a->q, L * N * D);
    TAKE(a->k, L * N * D);
    TAKE(a->v, L * N * D);
    TAKE(a->att, L * N * D);
    TAKE(a->att_lse, L * N * NH);
    TAKE(a->res_mid, L * N * D);
    TAKE(a->ln2, L * N * D);
    TAKE(a->ln2_mean, L * N);
    TAKE(a->ln2_rstd, L * N);
    TAKE(a->fc1, L * N * I);
    TAKE(a->act, L * N * I);
    TAKE(a->lnf, N * D);
    TAKE(a->lnf_mean, N);
    TAKE(a->lnf_rstd, N);
    TAKE(a->lnp_mean, N);
    TAKE(a->lnp_rstd, N);
#undef TAKE
    return off;
}

static int acts_reserve(db_clip *c, size_t N, db_err *err)
{
    if (c->a.mem && c->a.cap >= N)
        return 0;
    db_clip_trim(c);
    size_t n = acts_layout(&c->a, NULL, N, &c->arch);
    float *mem = db_ctx_alloc(c->ctx, n * sizeof(float));
    if (!mem)
        return db_err_set(err, DB_ENOMEM, "text encoder: out of memory for activations of %zu tokens", N);
    acts_layout(&c->a, mem, N, &c->arch);
    c->a.mem = mem;
    c->a.cap = N;
    return 0;
}

/* Report a failed op: the ctx's sticky error (which names the op), with
 * where in the model it happened. */
static int op_failed(db_clip *c, db_err *err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int op_failed(db_clip *c, db_err *err, const char *fmt, ...)
{
    char where[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(where, sizeof where, fmt, ap);
    va_end(ap);
    return db_err_set(err, c->ctx->err.code ? c->ctx->err.code : DB_EUSAGE, "text encoder: %s: %s", where,
                      c->ctx->err.msg);
}

/* One pre-LN encoder layer (CLIPEncoderLayer), saving its activations.
 * out (N, D) = hidden[l+1]; inp (N, D) = hidden[l]. */
static int layer_forward(db_clip *c, int l, float *out, const float *inp, int B, int T)
{
    db_ctx *x = c->ctx;
    const db_text_arch *t = &c->arch;
    const db_clip_layer *y = &c->p.layers[l];
    db_clip_acts *a = &c->a;
    const int N = B * T, D = t->hidden, I = t->intermediate, NH = t->heads;
    const size_t ND = (size_t)N * D, NI = (size_t)N * I;
    float *ln1 = a->ln1 + l * ND, *q = a->q + l * ND, *k = a->k + l * ND, *v = a->v + l * ND;
    float *att = a->att + l * ND, *res = a->res_mid + l * ND, *ln2 = a->ln2 + l * ND;
    float *fc1 = a->fc1 + l * NI, *act = a->act + l * NI;
    const float eps = (float)t->eps;

    /* attention half: res (N, D) = inp + out_proj(attn(ln1(inp))) */
    db_layernorm_forward(x, ln1, a->ln1_mean + (size_t)l * N, a->ln1_rstd + (size_t)l * N, inp, y->ln1_w, y->ln1_b,
                         N, D, eps);
    float *const qkv[3] = {q, k, v};
    const float *const qkv_w[3] = {y->q_w, y->k_w, y->v_w}, *const qkv_b[3] = {y->q_b, y->k_b, y->v_b};
    db_linear_multi_forward(x, qkv, ln1, qkv_w, qkv_b, 3, N, D, D);
    db_attention_forward(x, att, a->att_lse + (size_t)l * N * NH, q, k, v, B, T, T, NH, D / NH, 1);
    db_linear_add_forward(x, res, att, y->o_w, y->o_b, inp, N, D, D);

    /* MLP half: out (N, D) = res + fc2(act(fc1(ln2(res)))) */
    db_layernorm_forward(x, ln2, a->ln2_mean + (size_t)l * N, a->ln2_rstd + (size_t)l * N, res, y->ln2_w, y->ln2_b,
                         N, D, eps);
    db_linear_forward(x, fc1, ln2, y->fc1_w, y->fc1_b, N, D, I);
    if (t->quick_gelu)
        db_quick_gelu_forward(x, act, fc1, NI);
    else
        db_gelu_forward(x, act, fc1, NI, DB_GELU_ERF);
    return db_linear_add_forward(x, out, act, y->fc2_w, y->fc2_b, res, N, I, D);
}

int db_clip_forward(db_clip *c, float *last, float *penultimate_ln, float *pooled, const int32_t *ids, int B, int T,
                    db_err *err)
{
    const db_text_arch *t = &c->arch;
    const int D = t->hidden, L = t->layers;
    if (B <= 0 || T <= 0 || T > t->max_positions || !ids)
        return db_err_set(err, DB_EUSAGE, "text encoder: bad input: %d sequences of %d tokens (at most %d)", B, T,
                          t->max_positions);
    const size_t N = (size_t)B * T, ND = N * D;
    for (size_t i = 0; i < N; i++)
        if (ids[i] < 0 || ids[i] >= t->vocab_size)
            return db_err_set(err, DB_EUSAGE, "text encoder: token id %d at position %zu outside [0, %d)", ids[i],
                              i, t->vocab_size);
    if (acts_reserve(c, N, err))
        return -1;
    c->B = c->T = 0; /* the saved activations are invalid until we finish */
    db_ctx *x = c->ctx;
    db_clip_acts *a = &c->a;
    /* the ids are the caller's host array (checked above; the pooler reads
     * them too); the embedding op reads the device copy */
    if (db_ctx_copy(x, a->ids, ids, N * sizeof *ids, DB_COPY_H2D))
        return op_failed(c, err, "token ids");

    /* hidden[0] (N, D) = wte[ids] + wpe[0..T-1] */
    if (db_embedding_forward(x, a->hidden, a->ids, c->p.wte, c->p.wpe, B, T, D, t->vocab_size))
        return op_failed(c, err, "embeddings");
    for (int l = 0; l < L; l++)
        if (layer_forward(c, l, a->hidden + (size_t)(l + 1) * ND, a->hidden + (size_t)l * ND, B, T))
            return op_failed(c, err, "layer %d", l);

    /* final_layer_norm of the last and, when asked, the penultimate state */
    const float eps = (float)t->eps;
    db_layernorm_forward(x, a->lnf, a->lnf_mean, a->lnf_rstd, a->hidden + (size_t)L * ND, c->p.lnf_w, c->p.lnf_b,
                         (int)N, D, eps);
    if (last)
        db_axpby_forward(x, last, a->lnf, NULL, 1.0f, 0.0f, ND);
    if (penultimate_ln)
        db_layernorm_forward(x, penultimate_ln, a->lnp_mean, a->lnp_rstd, a->hidden + (size_t)(L - 1) * ND,
                             c->p.lnf_w, c->p.lnf_b, (int)N, D, eps);
    /* pooler_output: the row of the first maximal id (EOS) of each sequence */
    for (int b = 0; pooled && b < B; b++) {
        const int32_t *r = ids + (size_t)b * T;
        int e = 0;
        for (int i = 1; i < T; i++)
            if (r[i] > r[e])
                e = i;
        db_axpby_forward(x, pooled + (size_t)b * D, a->lnf + ((size_t)b * T + e) * D, NULL, 1.0f, 0.0f, (size_t)D);
    }
    if (x->err.code)
        return op_failed(c, err, "final layer norm");
    c->B = B;
    c->T = T;
    return 0;
}

const float *db_clip_hidden(const db_clip *c, int k)
{
    if (!c->B || k < 0 || k > c->arch.layers)
        return NULL;
    return c->a.hidden + (size_t)k * c->B * c->T * c->arch.hidden;
}

int db_clip_hidden_ln(db_clip *c, float *out, int k, db_err *err)
{
    const float *h = db_clip_hidden(c, k);
    if (!h)
        return db_err_set(err, DB_EUSAGE, "text encoder: no hidden state %d (layers %d%s)", k, c->arch.layers,
                          c->B ? "" : ", no forward yet");
    const int N = c->B * c->T;
    if (db_layernorm_forward(c->ctx, out, NULL, NULL, h, c->p.lnf_w, c->p.lnf_b, N, c->arch.hidden,
                             (float)c->arch.eps))
        return op_failed(c, err, "final layer norm");
    return 0;
}

/* ---- backward --------------------------------------------------------------- */

/* Floats of the backward's workspace for N tokens: 7 (N, D) and 2 (N, I). */
static size_t grads_floats(const db_text_arch *t, size_t N)
{
    return 6 * ALIGN16(N * (size_t)t->hidden) + 2 * ALIGN16(N * (size_t)t->intermediate);
}

size_t db_clip_workspace_bytes(const db_text_arch *t, size_t N, int backward)
{
    db_clip_acts a;
    return (acts_layout(&a, NULL, N, t) + (backward ? grads_floats(t, N) : 0)) * sizeof(float);
}

static int grads_reserve(db_clip *c, size_t N, db_err *err)
{
    db_clip_grads_ws *g = &c->g;
    if (g->mem && g->cap >= N)
        return 0;
    db_ctx_free(c->ctx, g->mem);
    memset(g, 0, sizeof *g);
    const size_t ND = ALIGN16(N * (size_t)c->arch.hidden), NI = ALIGN16(N * (size_t)c->arch.intermediate);
    float *mem = db_ctx_alloc(c->ctx, grads_floats(&c->arch, N) * sizeof(float));
    if (!mem)
        return db_err_set(err, DB_ENOMEM, "text encoder: out of memory for the gradients of %zu tokens", N);
    float *p = mem;
    g->dres = p, p += ND;
    g->dln = p, p += ND;
    g->dq = p, p += ND;
    g->dk = p, p += ND;
    g->dv = p, p += ND;
    g->datt = p, p += ND;
    g->dI = p, p += NI;
    g->dI2 = p;
    g->mem = mem;
    g->cap = N;
    return 0;
}

/* Backward of layer l: on entry g->dres = d hidden[l+1], on return
 * d hidden[l].  gl: the layer's gradients (+=). */
static int layer_backward(db_clip *c, int l, const db_clip_layer *gl, int B, int T)
{
    db_ctx *x = c->ctx;
    const db_text_arch *t = &c->arch;
    const db_clip_layer *y = &c->p.layers[l];
    const db_clip_acts *a = &c->a;
    db_clip_grads_ws *g = &c->g;
    const int N = B * T, D = t->hidden, I = t->intermediate, NH = t->heads;
    const size_t ND = (size_t)N * D, NI = (size_t)N * I;
    const float *inp = a->hidden + l * ND, *ln1 = a->ln1 + l * ND, *q = a->q + l * ND, *k = a->k + l * ND;
    const float *v = a->v + l * ND, *att = a->att + l * ND, *res = a->res_mid + l * ND, *ln2 = a->ln2 + l * ND;
    const float *fc1 = a->fc1 + l * NI, *act = a->act + l * NI;

    /* MLP half: out = res + fc2(act(fc1(ln2(res)))); dres carries d out */
    db_linear_backward(x, g->dI, gl->fc2_w, gl->fc2_b, g->dres, act, y->fc2_w, N, I, D, 0);     /* dI (N, I) d act */
    if (t->quick_gelu)
        db_quick_gelu_backward(x, g->dI2, g->dI, fc1, NI);                                   /* dI2 d fc1 */
    else
        db_gelu_backward(x, g->dI2, g->dI, fc1, NI, DB_GELU_ERF);
    db_linear_backward(x, g->dln, gl->fc1_w, gl->fc1_b, g->dI2, ln2, y->fc1_w, N, D, I, 0);     /* (N, D) d ln2 */
    db_layernorm_backward_add(x, g->dres, gl->ln2_w, gl->ln2_b, g->dln, a->ln2_mean + (size_t)l * N,
                              a->ln2_rstd + (size_t)l * N, res, y->ln2_w, g->dres, N, D, 0); /* d res += */

    /* attention half: res = inp + out_proj(attn(q, k, v)), q/k/v = proj(ln1(inp)) */
    db_linear_backward(x, g->datt, gl->o_w, gl->o_b, g->dres, att, y->o_w, N, D, D, 0);
    db_attention_backward(x, g->dq, g->dk, g->dv, g->datt, att, a->att_lse + (size_t)l * N * NH, q, k, v, B, T, T,
                          NH, D / NH, 1);
    float *const dqkv_w[3] = {gl->q_w, gl->k_w, gl->v_w}, *const dqkv_b[3] = {gl->q_b, gl->k_b, gl->v_b};
    const float *const dqkv[3] = {g->dq, g->dk, g->dv};
    const float *const qkv_w[3] = {y->q_w, y->k_w, y->v_w};
    db_linear_multi_backward(x, g->dln, dqkv_w, dqkv_b, dqkv, ln1, qkv_w, 3, N, D, D, 0, 0);     /* d ln1 */
    return db_layernorm_backward_add(x, g->dres, gl->ln1_w, gl->ln1_b, g->dln, a->ln1_mean + (size_t)l * N,
                                     a->ln1_rstd + (size_t)l * N, inp, y->ln1_w, g->dres, N, D, 0); /* d inp += */
}

/* Gradient pointers of a unit: weight pointer p of the unit whose weights
 * start at wbase has its gradient at gbase + (p - wbase). */
static float *gmap(const float *p, const float *wbase, float *gbase) { return gbase + (p - wbase); }

static db_clip_layer layer_map(const db_clip_layer *y, const float *wb, float *gb)
{
    return (db_clip_layer){gmap(y->ln1_w, wb, gb), gmap(y->ln1_b, wb, gb), gmap(y->q_w, wb, gb),
                           gmap(y->q_b, wb, gb),   gmap(y->k_w, wb, gb),   gmap(y->k_b, wb, gb),
                           gmap(y->v_w, wb, gb),   gmap(y->v_b, wb, gb),   gmap(y->o_w, wb, gb),
                           gmap(y->o_b, wb, gb),   gmap(y->ln2_w, wb, gb), gmap(y->ln2_b, wb, gb),
                           gmap(y->fc1_w, wb, gb), gmap(y->fc1_b, wb, gb), gmap(y->fc2_w, wb, gb),
                           gmap(y->fc2_b, wb, gb)};
}

/* Unit `key`'s span and where its gradients go (wb, gb for gmap): the
 * sink's window (zeroed) or the caller's buffer. */
static int unit_begin(db_clip *c, db_weights *grads, const db_grad_sink *sink, const char *key, db_span *sp,
                      const float **wb, float **gb, db_err *err)
{
    if (!sink) {
        *sp = (db_span){.lo = 0, .hi = c->w.numel};
        *wb = c->w.data, *gb = grads->data;
        return 0;
    }
    if (db_weights_span(&c->w, key, sp, err))
        return db_err_prefix(err, "text encoder");
    if (!sink->window) {
        *wb = c->w.data, *gb = grads->data;
        return 0;
    }
    if (sink->window_n < sp->hi - sp->lo)
        return db_err_set(err, DB_EUSAGE, "text encoder: backward: a gradient window of %zu floats for %s's %zu",
                          sink->window_n, key, sp->hi - sp->lo);
    *wb = c->w.data + sp->lo, *gb = sink->window;
    return db_ctx_zero(c->ctx, sink->window, (sp->hi - sp->lo) * sizeof(float))
               ? db_err_set(err, c->ctx->err.code, "text encoder: %s", c->ctx->err.msg)
               : 0;
}

static int unit_end(db_clip *c, const db_grad_sink *sink, const char *key, db_span sp, const float *wb, float *gb,
                    db_err *err)
{
    if (!sink || !sink->ready)
        return 0;
    if (sink->ready(sink->user, gmap(c->w.data + sp.lo, wb, gb), sp.lo, sp.hi, err))
        return db_err_prefix(err, "text encoder: %s", key);
    return 0;
}

int db_clip_backward(db_clip *c, db_weights *grads, const float *dlast, db_err *err)
{
    return db_clip_backward_to(c, grads, NULL, dlast, err);
}

int db_clip_backward_to(db_clip *c, db_weights *grads, const db_grad_sink *sink, const float *dlast, db_err *err)
{
    const db_text_arch *t = &c->arch;
    if (!c->B)
        return db_err_set(err, DB_EUSAGE, "text encoder: backward needs a forward first");
    if (!dlast || (!(sink && sink->window) && (!grads || grads->numel != c->w.numel || grads->n != c->w.n)))
        return db_err_set(err, DB_EUSAGE, "text encoder: backward: gradients not laid out like the weights");
    const int B = c->B, T = c->T, D = t->hidden, L = t->layers;
    const size_t N = (size_t)B * T;
    if (grads_reserve(c, N, err))
        return -1;
    db_ctx *x = c->ctx;
    db_clip_acts *a = &c->a;
    const db_clip_params *p = &c->p;
    db_span sp;
    const float *wb;
    float *gb;
    char key[64];

    if (unit_begin(c, grads, sink, "text_model.final_layer_norm", &sp, &wb, &gb, err))
        return -1;
    db_layernorm_backward(x, c->g.dres, gmap(p->lnf_w, wb, gb), gmap(p->lnf_b, wb, gb), dlast, a->lnf_mean,
                          a->lnf_rstd, a->hidden + (size_t)L * N * D, p->lnf_w, (int)N, D, 0);
    if (x->err.code)
        return op_failed(c, err, "final layer norm backward");
    if (unit_end(c, sink, "text_model.final_layer_norm", sp, wb, gb, err))
        return -1;
    for (int l = L - 1; l >= 0; l--) {
        snprintf(key, sizeof key, "text_model.encoder.layers.%d", l);
        if (unit_begin(c, grads, sink, key, &sp, &wb, &gb, err))
            return -1;
        const db_clip_layer gl = layer_map(&p->layers[l], wb, gb);
        if (layer_backward(c, l, &gl, B, T))
            return op_failed(c, err, "layer %d backward", l);
        if (unit_end(c, sink, key, sp, wb, gb, err))
            return -1;
    }
    if (unit_begin(c, grads, sink, "text_model.embeddings", &sp, &wb, &gb, err))
        return -1;
    if (db_embedding_backward(x, gmap(p->wte, wb, gb), gmap(p->wpe, wb, gb), c->g.dres, a->ids, B, T, D,
                              t->vocab_size))
        return op_failed(c, err, "embeddings backward");
    return unit_end(c, sink, "text_model.embeddings", sp, wb, gb, err);
}
