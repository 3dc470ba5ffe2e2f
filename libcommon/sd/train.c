/* One DreamBooth training step (see train.h). */
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adamw_coef.h"
#include "clip.h"
#include "sched.h"
#include "unet.h"

struct db_trainer {
    db_ctx *ctx;
    db_unet *unet;
    db_clip *clip;
    db_sched *sched;
    db_train_opts o;
    db_pred pred;
    int ntrain;                  /* num_train_timesteps */
    db_weights gu, mu, vu;       /* UNet gradients and AdamW moments */
    db_weights gt, mt, vt;       /* text encoder's (train_text only) */
    db_q8_state qu, qt;          /* 8-bit AdamW moments instead of mu, vu / mt, vt (DB_OPTIM_ADAMW8BIT) */
    db_q8_maps maps;             /* its code books */
    db_grad_ref *refs;           /* every gradient tensor, UNet first (clipping) */
    size_t nrefs;
    /* Packed weight gradients (train.h no_grad16): the UNet tensors whose
     * gradient the backward packs in bf16 (g16_packs; g16_runs, ctx memory:
     * each one's [first, end) element in gu, by offset; none when the
     * trainer may not pack), and whether gu holds the last backward's so */
    uint32_t *g16_runs;
    size_t g16_nruns;
    int packed;
    int64_t step;                /* steps taken (global_step; train.h) */
    int64_t opt_step;            /* updates applied: AdamW's count, the lr schedule's position */
    /* fp16 loss scaling (GradScaler): on when the ctx computed in fp16 at
     * create.  The scale is a float32 as torch keeps it (a power of two
     * unless the caller's initial one is not). */
    int scaling;
    float scale;
    int64_t growth_tracker, growth_interval;
    int micro;                   /* micro-batches accumulated since the last step */
    /* fused backward (train.h): the gradient window, a sink per trained
     * component, the step's sums of squared per-tensor norms, and each
     * tensor's norm (UNet then text encoder, for db_trainer_grad_norms) */
    float *window;
    size_t window_n;
    struct fused_group {
        db_trainer *t;
        db_weights *w, *m, *v;   /* weights and fp32 moments (m, v NULL with 8-bit) */
        db_q8_state *q;          /* 8-bit moments or NULL */
        db_adamw hp;             /* coefs only: this step's scalars in fcoef_dev (micro writes them) */
        double *norms;           /* into fnorms: this component's tensors */
    } fg[2];
    double fss;
    double *fnorms;
    int summing;                 /* the step's bucketed gradient sums have begun (reduce_f32_start) */
    float **fgp;                 /* scratch of one unit: its tensors' gradients */
    size_t *fgn;                 /* and sizes */
    /* The step's per-tensor norms stay on the device until the backward is
     * done (db_opt_clip_each: no wait per unit), then come back at once:
     * fnorm_dev[j] is the norm of the j-th tensor clipped this step,
     * forder[j] its index in fnorms, funit[j] 1 when it began a unit; fcount
     * of them so far; fnorm_h the host copy. */
    float *fnorm_dev, *fnorm_h;
    size_t *forder, fcount, fcap;
    unsigned char *funit;
    /* The UNet's backward replays as a graph in the fused step too (one
     * process): the steps inside it read their AdamW scalars from fcoef_dev
     * (one per group, written before each backward: optim.h coefs), the
     * sinks it was captured with stay here, and a replay runs none of
     * fused_ready's host code, so fcount_unet keeps the count of the last
     * UNet backward that did (the same units every step). */
    db_adamw_coef *fcoef_dev;
    db_grad_sink fsink[2];
    size_t fcount_unet;
    double sum_loss, sum_inst, sum_prior;
    db_unet_graph gfwd, gbwd;    /* the UNet forward's and backward's graphs (unet.h) */
    /* the frozen text encoder's last output in context: the token ids and
     * precision it was computed for (DreamBooth's prompts repeat every step) */
    int32_t *ctx_ids;
    size_t ctx_nids;
    int ctx_prec, ctx_valid;
    /* buffers of the largest micro-batch seen, on the ctx's device */
    size_t cap_lat, cap_ctx;
    float *noisy, *pred_buf, *dpred, *target; /* (B, C, H, W) each */
    float *tsf;                  /* (B) timesteps as floats */
    float *context, *dcontext;   /* (B, T, D) each */
    /* Host staging of the latent-sized tensors the host code (the scheduler's
     * add_noise and velocity, the loss) reads or writes: on the CPU these
     * are the device buffers above (no copy, no extra memory), elsewhere
     * one host block (stage) holding four of the same size, copied to and
     * from them: pinned where the device allows (stage_pinned), so that a
     * copy up returns at once instead of waiting for the work queued
     * before it (the step's inputs go up while the last step's AdamW
     * runs).  A copy up may still be reading the block when it returns:
     * every micro-batch waits for its pred's copy down before it returns,
     * after which the next may write the block again. */
    float *noisy_h, *pred_h, *target_h, *tsf_h;
    float *stage;
    int stage_pinned;
};

/* The host staging freed (a pinned block once no copy up reads it). */
static void unstage(db_trainer *t)
{
    if (t->stage) {
        if (t->stage_pinned) {
            (void)db_ctx_sync(t->ctx); /* no copy up still reads it */
            db_ctx_host_free(t->ctx, t->stage);
        } else
            free(t->stage);
    }
    t->stage = NULL, t->stage_pinned = 0;
    t->noisy_h = t->pred_h = t->target_h = t->tsf_h = NULL;
}

/* The host staging of four buffers of n floats (the device buffers
 * themselves on the CPU); 0, or -1 out of memory. */
static int stage(db_trainer *t, size_t n)
{
    unstage(t);
    if (t->ctx->device == DB_CPU) {
        t->noisy_h = t->noisy, t->pred_h = t->pred_buf, t->target_h = t->target, t->tsf_h = t->tsf;
        return 0;
    }
    const size_t bytes = 4 * n * sizeof(float);
    t->stage = db_ctx_host_alloc(t->ctx, bytes); /* NULL off CUDA, or refused: plain memory */
    t->stage_pinned = t->stage != NULL;
    if (!t->stage && !(t->stage = malloc(bytes)))
        return -1;
    t->noisy_h = t->stage, t->pred_h = t->stage + n, t->target_h = t->stage + 2 * n, t->tsf_h = t->stage + 3 * n;
    return 0;
}

db_train_opts db_train_opts_defaults(double lr, int64_t steps)
{
    db_train_opts o;
    memset(&o, 0, sizeof o);
    o.prior_weight = 1.0;
    o.max_grad_norm = 1.0;
    o.grad_accum = 1;
    o.unet_hp = db_adamw_defaults(lr);
    o.text_hp = db_adamw_defaults(lr);
    o.unet_lr = db_lr_schedule_make(DB_LR_CONSTANT, lr, 0, steps);
    o.text_lr = o.unet_lr;
    o.world = 1;
    return o;
}

void db_train_posterior_sample(float *out, const float *mean, const float *logvar, const float *eps, size_t n,
                               float sf)
{
    for (size_t i = 0; i < n; i++) {
        float lv = logvar[i];
        lv = lv < -30.0f ? -30.0f : lv > 20.0f ? 20.0f : lv; /* DiagonalGaussianDistribution's clamp */
        const float sd = expf(0.5f * lv);
        const float se = sd * eps[i];
        const float x = mean[i] + se;
        out[i] = x * sf;
    }
}

/* Append one gradient ref per tensor of g (in the table's order). */
static int add_refs(db_trainer *t, db_weights *g, db_err *err)
{
    db_grad_ref *r = realloc(t->refs, (t->nrefs + g->n) * sizeof *r);
    if (!r)
        return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
    t->refs = r;
    for (size_t i = 0; i < g->ix.n; i++) {
        const db_tentry *e = &g->ix.v[i];
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++)
            n *= (size_t)e->shape[d];
        r[t->nrefs++] = (db_grad_ref){g->data + e->offset, n, 0};
    }
    return 0;
}

/* The UNet's weight gradients packed in bf16 when nothing needs them in
 * float32 (train.h no_grad16): every tensor of rank 2 or more (the linear
 * and convolution weights, whose bf16 ops pack them: DB_ASSIGN_PACK16).
 * Called after the UNet's refs were added (refs 0 .. n-1 its tensors).
 * The table is made whatever the precision: each backward packs when the
 * ctx computes in bf16 then (the caller may set it after the create). */
static int g16_packs(const db_tentry *e) { return e->ndim >= 2; }

static int g16_init(db_trainer *t, const db_train_opts *o, db_err *err)
{
    const db_weights *wu = db_unet_weights(t->unet);
    if (o->no_grad16 || o->fused_backward || o->world > 1 || o->grad_accum > 1 || o->clip_per_tensor ||
        wu->numel > UINT32_MAX)
        return 0;
    const size_t nt = wu->ix.n;
    uint32_t *runs = malloc((2 * nt + 1) * sizeof *runs);
    if (!runs)
        return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < nt; i++) {
        const db_tentry *e = &wu->ix.v[i];
        if (!g16_packs(e))
            continue;
        runs[2 * k] = (uint32_t)e->offset, runs[2 * k + 1] = (uint32_t)(e->offset + t->refs[i].n);
        k++;
    }
    /* by offset (the optimizer's kernels search them) */
    for (size_t i = 1; i < k; i++)
        for (size_t j = i; j > 0 && runs[2 * (j - 1)] > runs[2 * j]; j--) {
            const uint32_t a = runs[2 * j], b = runs[2 * j + 1];
            runs[2 * j] = runs[2 * (j - 1)], runs[2 * j + 1] = runs[2 * (j - 1) + 1];
            runs[2 * (j - 1)] = a, runs[2 * (j - 1) + 1] = b;
        }
    if (k) {
        t->g16_runs = db_ctx_alloc(t->ctx, 2 * k * sizeof *runs);
        if (!t->g16_runs || db_ctx_copy(t->ctx, t->g16_runs, runs, 2 * k * sizeof *runs, DB_COPY_H2D)) {
            free(runs);
            return db_err_set(err, t->ctx->err.code ? t->ctx->err.code : DB_ENOMEM, "trainer: %s",
                              t->ctx->err.code ? t->ctx->err.msg : "out of memory");
        }
    }
    t->g16_nruns = k;
    free(runs);
    return 0;
}

/* ---- 8-bit AdamW state ---------------------------------------------------------- */

static void *q8_alloc(db_ctx *c, size_t bytes)
{
    if (!c) /* host weights: host state */
        return calloc(bytes ? bytes : 1, 1);
    void *p = db_ctx_alloc(c, bytes ? bytes : 1);
    if (p && db_ctx_zero(c, p, bytes)) {
        db_ctx_free(c, p);
        return NULL;
    }
    return p;
}

static void q8_release(db_ctx *c, void *p)
{
    if (c)
        db_ctx_free(c, p);
    else
        free(p);
}

static void q8_free(db_q8_state *q)
{
    void *bufs[] = {q->m_q, q->v_q, q->m_absmax, q->v_absmax, q->m32, q->v32};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        q8_release(q->ctx, bufs[i]);
    free(q->t);
    memset(q, 0, sizeof *q);
}

size_t db_q8_state_bytes(const db_q8_state *q)
{
    return 2 * (q->ncodes + (q->nblocks + q->nsmall) * sizeof(float));
}

/* The zero (fresh) state for weights w: per tensor, codes and scales from
 * DB_Q8_MIN_SIZE elements on, float32 moments below. */
static int q8_init(db_q8_state *q, const db_weights *w, db_err *err)
{
    memset(q, 0, sizeof *q);
    q->ctx = w->ctx;
    q->nt = w->ix.n;
    if (!(q->t = calloc(q->nt ? q->nt : 1, sizeof *q->t)))
        return db_err_set(err, DB_ENOMEM, "out of memory");
    for (size_t k = 0; k < q->nt; k++) {
        const db_tentry *e = &w->ix.v[k];
        db_q8_tensor *t = &q->t[k];
        t->n = (size_t)db_shape_numel(e->ndim, e->shape);
        t->woff = e->offset;
        t->q8 = t->n >= DB_Q8_MIN_SIZE;
        if (t->q8) {
            t->off = q->ncodes, t->boff = q->nblocks;
            q->ncodes += t->n;
            q->nblocks += (t->n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
        } else {
            t->off = q->nsmall;
            q->nsmall += t->n;
        }
    }
    q->m_q = q8_alloc(q->ctx, q->ncodes);
    q->v_q = q8_alloc(q->ctx, q->ncodes);
    q->m_absmax = q8_alloc(q->ctx, q->nblocks * sizeof(float));
    q->v_absmax = q8_alloc(q->ctx, q->nblocks * sizeof(float));
    q->m32 = q8_alloc(q->ctx, q->nsmall * sizeof(float));
    q->v32 = q8_alloc(q->ctx, q->nsmall * sizeof(float));
    if (!q->m_q || !q->v_q || !q->m_absmax || !q->v_absmax || !q->m32 || !q->v32) {
        const size_t bytes = db_q8_state_bytes(q);
        q8_free(q);
        return db_err_set(err, DB_ENOMEM, "out of memory for %zu bytes of 8-bit optimizer state", bytes);
    }
    return 0;
}

/* One 8-bit AdamW step of weights w from gradients g (w's layout), tensor
 * by tensor: the per-tensor blocks are bnb's (a block never spans two
 * tensors), the small tensors take float32 AdamW. */
/* packed: g holds the tensors g16_packs names packed in bf16 */
static int q8_step(db_ctx *c, db_q8_state *q, db_weights *w, float *g, const db_adamw *hp, int64_t k,
                   const db_q8_maps *maps, size_t lo, size_t hi, int packed)
{
    /* g holds the gradients of weights [lo, hi): every tensor's step in one
     * op (one launch on a GPU instead of one per tensor) */
    db_q8_job *jobs = malloc((q->nt ? q->nt : 1) * sizeof *jobs);
    if (!jobs)
        return db_err_set(&c->err, DB_ENOMEM, "8-bit AdamW: out of memory");
    size_t nj = 0;
    for (size_t i = 0; i < q->nt; i++) {
        const db_q8_tensor *t = &q->t[i];
        if (t->woff < lo || t->woff >= hi)
            continue;
        db_q8_job *j = &jobs[nj++];
        memset(j, 0, sizeof *j);
        j->p = w->data + t->woff, j->g = g + (t->woff - lo), j->n = t->n, j->q8 = t->q8;
        j->prec16 = packed && g16_packs(&w->ix.v[i]) ? DB_PREC_BF16 : 0;
        if (t->q8)
            j->m_q = q->m_q + t->off, j->v_q = q->v_q + t->off, j->m_absmax = q->m_absmax + t->boff,
            j->v_absmax = q->v_absmax + t->boff;
        else
            j->m32 = q->m32 + t->off, j->v32 = q->v32 + t->off;
    }
    const int rc = db_opt_adamw8bit_many(c, jobs, nj, hp, k, maps);
    free(jobs);
    return rc;
}

/* ---- clipping and the fused backward ------------------------------------------------- */

/* The sink's callback: a unit's gradients g (weights [lo, hi) of the
 * group) are final.  Sum them over the processes, clip tensor by tensor,
 * step the optimizer over the unit. */
static int fused_ready(void *user, float *g, size_t lo, size_t hi, db_err *err)
{
    struct fused_group *fg = user;
    db_trainer *t = fg->t;
    db_ctx *c = t->ctx;
    if (t->o.world > 1 && t->o.reduce_f32(t->o.reduce_user, g, hi - lo, err))
        return db_err_prefix(err, "gradient reduction");
    const db_weights *w = fg->w;
    const double max = t->o.max_grad_norm > 0 ? t->o.max_grad_norm : INFINITY;
    const size_t first = t->fcount, base = (size_t)(fg->norms - t->fnorms);
    size_t nr = 0;
    for (size_t i = 0; i < w->ix.n; i++) {
        const db_tentry *e = &w->ix.v[i];
        const size_t off = (size_t)e->offset;
        if (off < lo || off >= hi)
            continue;
        if (first + nr == t->fcap)
            return db_err_set(err, DB_EUSAGE, "fused backward: more tensors clipped in a step than are trained (%zu)",
                              t->fcap);
        t->fgp[nr] = g + (off - lo);
        t->fgn[nr] = (size_t)db_shape_numel(e->ndim, e->shape);
        t->forder[first + nr] = base + i;
        t->funit[first + nr] = nr == 0;
        nr++;
    }
    /* clipped where they lie, their norms read back after the backward
     * (fused_norms): the update below follows without a wait */
    if (db_opt_clip_each(c, t->fnorm_dev + first, t->fgp, t->fgn, nr, (float)max))
        return db_err_set(err, c->err.code, "gradient clipping: %s", c->err.msg);
    t->fcount += nr;
    /* lr and step count are in the scalars fg->hp.coefs points at (written
     * in micro before the backward, read when the step runs): the ops
     * ignore the count passed, 0 here (a step reading it would divide by
     * 1 - beta^0 = 0 and fail the tests) */
    if (fg->q ? q8_step(c, fg->q, fg->w, g, &fg->hp, 0, &t->maps, lo, hi, 0)
              : db_opt_adamw(c, w->data + lo, fg->m->data + lo, fg->v->data + lo, g, hi - lo, &fg->hp, 0))
        return db_err_set(err, c->err.code, "optimizer step: %s", c->err.msg);
    return 0;
}

/* After a fused backward: the step's per-tensor norms back from the device
 * in one copy, into fnorms; fss = the sum of their squares, unit by unit in
 * the order they were clipped (each unit's sum from 0, then added: the
 * association the per-unit waits had); a non-finite one is divergence. */
static int fused_norms(db_trainer *t, db_err *err)
{
    db_ctx *c = t->ctx;
    const size_t n = t->fcount;
    if (n && db_ctx_copy(c, t->fnorm_h, t->fnorm_dev, n * sizeof(float), DB_COPY_D2H))
        return db_err_set(err, c->err.code, "gradient norms: %s", c->err.msg);
    const db_weights *wu = t->fg[0].w, *wt = t->fg[1].w;
    double unit = 0;
    for (size_t j = 0; j < n; j++) {
        const size_t i = t->forder[j];
        const float nk = t->fnorm_h[j];
        if (!isfinite(nk))
            return db_err_set(err, DB_ENUMERIC, "the gradient of %s is not finite at step %lld: training diverged "
                              "(the fused backward had updated the weights with it)",
                              i < wu->ix.n ? wu->ix.v[i].name : wt->ix.v[i - wu->ix.n].name, (long long)t->step + 1);
        t->fnorms[i] = (double)nk;
        if (t->funit[j] && j > 0)
            t->fss += unit, unit = 0;
        unit += (double)nk * (double)nk;
    }
    if (n)
        t->fss += unit;
    return 0;
}

/* The sink's callback in the last micro-batch of a step with bucketed sums:
 * begin summing the unit's gradients over the processes. */
static int bucket_ready(void *user, float *g, size_t lo, size_t hi, db_err *err)
{
    db_trainer *t = user;
    if (t->o.reduce_f32_start(t->o.reduce_user, g, hi - lo, err))
        return db_err_prefix(err, "gradient reduction");
    return 0;
}

/* The fused backward's window and groups (after the moments exist). */
static int fused_init(db_trainer *t, db_err *err)
{
    if (t->o.grad_accum != 1)
        return db_err_set(err, DB_EUSAGE, "the fused backward steps the optimizer inside the backward of each "
                          "micro-batch: it needs one micro-batch per step (gradient accumulation %d)",
                          t->o.grad_accum);
    if (t->scaling)
        return db_err_set(err, DB_EUSAGE, "the fused backward cannot skip a step after an fp16 overflow (the "
                          "update has begun by then): use bf16 or fp32");
    const int q8 = t->o.optimizer == DB_OPTIM_ADAMW8BIT;
    db_weights *wu = (db_weights *)db_unet_weights(t->unet), *wt = &t->clip->w;
    size_t n = db_weights_window_floats(wu), nt = wu->ix.n + (t->o.train_text ? wt->ix.n : 0);
    if (t->o.train_text) {
        const size_t n2 = db_weights_window_floats(wt);
        n = n2 > n ? n2 : n;
    }
    const size_t most = wu->ix.n > wt->ix.n ? wu->ix.n : wt->ix.n;
    t->fnorms = calloc(nt ? nt : 1, sizeof *t->fnorms);
    t->fgp = calloc(most ? most : 1, sizeof *t->fgp);
    t->fgn = calloc(most ? most : 1, sizeof *t->fgn);
    t->fnorm_h = calloc(nt ? nt : 1, sizeof *t->fnorm_h);
    t->forder = calloc(nt ? nt : 1, sizeof *t->forder);
    t->funit = calloc(nt ? nt : 1, 1);
    t->fnorm_dev = db_ctx_alloc(t->ctx, (nt ? nt : 1) * sizeof(float));
    t->fcap = nt;
    t->window = n ? db_ctx_alloc(t->ctx, n * sizeof(float)) : NULL;
    t->window_n = n;
    t->fcoef_dev = db_ctx_alloc(t->ctx, 2 * sizeof *t->fcoef_dev);
    if (!t->window || !t->fnorms || !t->fgp || !t->fgn || !t->fnorm_h || !t->forder || !t->funit || !t->fnorm_dev ||
        !t->fcoef_dev)
        return db_err_set(err, DB_ENOMEM, "out of memory for the fused backward's window of %zu floats", n);
    t->fg[0] = (struct fused_group){t, wu, q8 ? NULL : &t->mu, q8 ? NULL : &t->vu, q8 ? &t->qu : NULL,
                                    (db_adamw){0}, t->fnorms};
    t->fg[1] = (struct fused_group){t, wt, q8 ? NULL : &t->mt, q8 ? NULL : &t->vt, q8 ? &t->qt : NULL,
                                    (db_adamw){0}, t->fnorms + wu->ix.n};
    for (int i = 0; i < 2; i++) {
        t->fg[i].hp.coefs = t->fcoef_dev + i;
        t->fsink[i] = (db_grad_sink){t->window, t->window_n, fused_ready, &t->fg[i]};
    }
    return 0;
}

int db_trainer_create(db_trainer **out, db_ctx *ctx, const db_model *m, const db_train_opts *o, db_err *err)
{
    *out = NULL;
    if (o->grad_accum < 1 || o->world < 1 || (o->world > 1 && (!o->reduce_f32 || !o->reduce_f64)))
        return db_err_set(err, DB_EUSAGE, "trainer: gradient accumulation and processes must be at least 1 (got "
                          "%d, %d), and several processes need a reduction", o->grad_accum, o->world);
    db_trainer *t = calloc(1, sizeof *t);
    if (!t)
        return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
    t->ctx = ctx;
    t->o = *o;
    /* no graphs for a fused step over several processes: its sums (MPI or
     * NCCL on the host's call) run inside the units' callbacks */
    t->gfwd.off = t->gbwd.off = o->no_graph || (o->fused_backward && o->world > 1);
    /* GradScaler(init_scale=2**16, growth_factor=2, backoff_factor=0.5,
     * growth_interval=2000): accelerate's defaults for fp16 */
    t->scaling = ctx->precision == DB_PREC_F16;
    t->scale = o->loss_scale_init > 0 ? (float)o->loss_scale_init : 65536.0f;
    t->growth_interval = o->loss_scale_interval > 0 ? o->loss_scale_interval : 2000;
    if (!(o->loss_scale_init >= 0) || !isfinite(t->scale) || o->loss_scale_interval < 0) {
        free(t);
        return db_err_set(err, DB_EUSAGE, "trainer: the initial loss scale must be a positive float32 (got %g) and "
                          "the growth interval positive (got %lld)", o->loss_scale_init,
                          (long long)o->loss_scale_interval);
    }
    if (db_sched_create(&t->sched, "ddpm", m->scheduler, err) || db_unet_create(&t->unet, ctx, m, err) ||
        db_clip_create(&t->clip, ctx, m, err))
        goto fail;
    t->pred = db_sched_prediction(t->sched);
    t->ntrain = db_sched_num_train_timesteps(t->sched);
    if (t->pred == DB_PRED_SAMPLE) {
        db_err_set(err, DB_EUNSUPP, "trainer: models predicting the sample are not supported (epsilon or v only)");
        goto fail;
    }
    db_unet_keep_activations(t->unet, 1);
    db_unet_checkpointing(t->unet, o->gradient_checkpointing);
    const db_weights *wu = db_unet_weights(t->unet);
    const int q8 = o->optimizer == DB_OPTIM_ADAMW8BIT;
    if (o->optimizer != DB_OPTIM_ADAMW && !q8) {
        db_err_set(err, DB_EUSAGE, "unknown optimizer %d", (int)o->optimizer);
        goto fail;
    }
    if (q8)
        db_q8_maps_make(&t->maps);
    /* gradient buffers as large as the weights, or the fused backward's window */
    const int fused = o->fused_backward;
    if ((!fused && (db_weights_like(&t->gu, wu, err) || add_refs(t, &t->gu, err) || g16_init(t, o, err))) ||
        (q8 ? q8_init(&t->qu, wu, err) : db_weights_like(&t->mu, wu, err) || db_weights_like(&t->vu, wu, err)))
        goto fail;
    if (o->train_text) {
        const db_weights *wt = &t->clip->w;
        if ((!fused && (db_weights_like(&t->gt, wt, err) || add_refs(t, &t->gt, err))) ||
            (q8 ? q8_init(&t->qt, wt, err) : db_weights_like(&t->mt, wt, err) || db_weights_like(&t->vt, wt, err)))
            goto fail;
    }
    if (fused && fused_init(t, err))
        goto fail;
    *out = t;
    return 0;
fail:
    db_err_prefix(err, "trainer");
    db_trainer_free(t);
    return -1;
}

void db_trainer_free(db_trainer *t)
{
    if (!t)
        return;
    db_unet_graph_free(&t->gfwd); /* before the buffers they replay into */
    db_unet_graph_free(&t->gbwd);
    db_unet_free(t->unet);
    db_clip_free(t->clip);
    db_sched_free(t->sched);
    db_weights *all[] = {&t->gu, &t->mu, &t->vu, &t->gt, &t->mt, &t->vt};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]->data)
            db_weights_free(all[i]);
    q8_free(&t->qu);
    q8_free(&t->qt);
    free(t->refs);
    db_ctx_free(t->ctx, t->g16_runs);
    free(t->ctx_ids);
    free(t->fnorms);
    free(t->fgp);
    free(t->fgn);
    free(t->fnorm_h);
    free(t->forder);
    free(t->funit);
    db_ctx_free(t->ctx, t->fnorm_dev);
    db_ctx_free(t->ctx, t->fcoef_dev);
    db_ctx_free(t->ctx, t->window);
    unstage(t);
    db_ctx_free(t->ctx, t->noisy);
    db_ctx_free(t->ctx, t->pred_buf);
    db_ctx_free(t->ctx, t->dpred);
    db_ctx_free(t->ctx, t->target);
    db_ctx_free(t->ctx, t->tsf);
    db_ctx_free(t->ctx, t->context);
    db_ctx_free(t->ctx, t->dcontext);
    free(t);
}

static int reserve(db_trainer *t, size_t nlat, size_t nctx, int B, db_err *err)
{
    if (nlat > t->cap_lat || (size_t)B > t->cap_lat) {
        size_t n = nlat > (size_t)B ? nlat : (size_t)B;
        db_ctx *c = t->ctx;
        unstage(t);
        db_ctx_free(c, t->noisy), db_ctx_free(c, t->pred_buf), db_ctx_free(c, t->dpred), db_ctx_free(c, t->tsf);
        db_ctx_free(c, t->target);
        t->noisy = db_ctx_alloc(c, n * sizeof(float));
        t->pred_buf = db_ctx_alloc(c, n * sizeof(float));
        t->dpred = db_ctx_alloc(c, n * sizeof(float));
        t->target = db_ctx_alloc(c, n * sizeof(float));
        t->tsf = db_ctx_alloc(c, n * sizeof(float));
        t->cap_lat = n;
        if (!t->noisy || !t->pred_buf || !t->dpred || !t->target || !t->tsf || stage(t, n)) {
            t->cap_lat = 0;
            return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
        }
    }
    if (nctx > t->cap_ctx) {
        t->ctx_valid = 0;
        db_ctx_free(t->ctx, t->context), db_ctx_free(t->ctx, t->dcontext);
        t->context = db_ctx_alloc(t->ctx, nctx * sizeof(float));
        t->dcontext = db_ctx_alloc(t->ctx, nctx * sizeof(float));
        t->cap_ctx = nctx;
        if (!t->context || !t->dcontext) {
            t->cap_ctx = 0;
            return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
        }
    }
    return 0;
}

/* The UNet calls of a micro-batch, as db_unet_graph replays them: the
 * buffers and sizes only (everything per step is in the buffers). */
typedef struct unet_fwd {
    db_unet *u;
    float *out, *x, *ts, *ctx;
    int B, H, W, T;
} unet_fwd;

static int unet_fwd_run(void *arg, db_err *err)
{
    const unet_fwd *f = arg;
    return db_unet_forward(f->u, f->out, f->x, f->ts, f->ctx, f->B, f->H, f->W, f->T, err);
}

typedef struct unet_bwd {
    db_unet *u;
    float *dcontext;
    db_weights *grads;
    const float *dout;
    db_trainer *fused; /* the fused step's: its UNet sink, fcount from 0 */
    int assign;        /* grads written, not added to (unet_assigns) */
} unet_bwd;

/* One micro-batch a step: the UNet's backward writes its gradients (=, the
 * bits of += into zeros: unet.h), so they are never reset between steps.
 * With more the first could too, but then the backward's graph would differ
 * between the step's micro-batches and be recorded again every time.  (A
 * caller's second micro-batch before the step adds, as always.) */
static int unet_assigns(const db_trainer *t) { return t->o.grad_accum <= 1; }

static int unet_bwd_run(void *arg, db_err *err)
{
    const unet_bwd *k = arg;
    if (!k->fused)
        return db_unet_backward_to(k->u, NULL, k->dcontext, k->grads, NULL, k->assign, k->dout, err);
    /* every run of the host code counts the units' tensors from the first
     * (a capture that fails runs it once more, directly) */
    k->fused->fcount = 0;
    return db_unet_backward_to(k->u, NULL, k->dcontext, NULL, &k->fused->fsink[0], 0, k->dout, err);
}

/* Row r's min-SNR weight (--snr-gamma; 1 without it and for prior rows),
 * diffusers' train_dreambooth.py: min(snr, gamma) / snr, + 1 for
 * v-prediction. */
static double row_snr_weight(const db_trainer *t, const db_train_batch *b, int r)
{
    if (r >= b->n_inst || t->o.snr_gamma <= 0)
        return 1;
    const float *acp = db_sched_alphas_cumprod(t->sched);
    const double a = acp[b->timesteps[r]], snr = a / (1 - a);
    return (snr < t->o.snr_gamma ? snr : t->o.snr_gamma) / snr + (t->pred == DB_PRED_V ? 1 : 0);
}

/* Row r's weight in the loss: loss = sum over rows of coef_r sum e^2. */
static double row_coef(const db_trainer *t, const db_train_batch *b, int r)
{
    const int ni = b->n_inst, np = b->B - ni;
    const double per = (double)b->C * b->H * b->W;
    if (r >= ni)
        return t->o.prior_weight / ((double)np * per);
    return row_snr_weight(t, b, r) / ((double)ni * per);
}

/* The micro-batch's loss, on the host from pred (copied down: the wait for
 * the work queued so far) and the target, double sums in element order;
 * li and lp the instance and prior terms.  NaN with err set when the copy
 * fails or the loss is not finite. */
static double host_loss(db_trainer *t, const db_train_batch *b, double *li_out, double *lp_out, db_err *err)
{
    db_ctx *c = t->ctx;
    const int B = b->B, ni = b->n_inst, np = B - ni;
    const size_t per = (size_t)b->C * b->H * b->W;
    if (db_ctx_copy(c, t->pred_h, t->pred_buf, per * (size_t)B * sizeof(float), DB_COPY_D2H)) {
        db_err_set(err, c->err.code, "trainer: %s", c->err.msg);
        return NAN;
    }
    double li = 0, lp = 0;
    for (int r = 0; r < B; r++) {
        const float *p = t->pred_h + r * per, *d = t->target_h + r * per;
        double sq = 0;
        for (size_t i = 0; i < per; i++) {
            const float e = p[i] - d[i];
            sq += (double)e * e;
        }
        if (r < ni)
            li += row_snr_weight(t, b, r) * sq / per;
        else
            lp += sq / per;
    }
    li = ni ? li / ni : 0;
    lp = np ? lp / np : 0;
    const double loss = li + t->o.prior_weight * lp;
    *li_out = li, *lp_out = lp;
    if (!isfinite(loss)) {
        db_err_set(err, DB_ENUMERIC, "trainer: the loss is %g (instance %g, prior %g): training diverged", loss, li,
                   lp);
        return NAN;
    }
    return loss;
}

/* Forward and loss of one micro-batch; with backward also the gradients. */
static int micro(db_trainer *t, const db_train_batch *b, db_train_stats *s, int backward, db_err *err)
{
    if (backward && t->summing)
        return db_err_set(err, DB_EUSAGE, "trainer: a micro-batch after the step's gradient sums began");
    if (backward && t->o.fused_backward && t->micro)
        return db_err_set(err, DB_EUSAGE, "trainer: fused backward: a second micro-batch before the step");
    const int B = b->B, ni = b->n_inst;
    if (B <= 0 || ni < 0 || ni > B || b->C <= 0 || b->H <= 0 || b->W <= 0 || b->T <= 0 || !b->latents ||
        !b->noise || !b->timesteps || !b->ids)
        return db_err_set(err, DB_EUSAGE, "trainer: bad batch (%d rows, %d instance)", B, ni);
    const size_t per = (size_t)b->C * b->H * b->W, n = per * (size_t)B;
    const int D = t->clip->arch.hidden;
    const size_t nctx = (size_t)B * b->T * D;
    if (reserve(t, n, nctx, B, err))
        return -1;
    for (int r = 0; r < B; r++) {
        if (b->timesteps[r] < 0 || b->timesteps[r] >= t->ntrain)
            return db_err_set(err, DB_EUSAGE, "trainer: timestep %lld outside [0, %d)", (long long)b->timesteps[r],
                              t->ntrain);
        t->tsf_h[r] = (float)b->timesteps[r];
        if (db_sched_add_noise(t->sched, t->noisy_h + r * per, b->latents + r * per, b->noise + r * per, per,
                               b->timesteps[r], err))
            return -1;
    }
    /* the target: the noise, or the velocity */
    for (int r = 0; r < B; r++) {
        if (t->pred == DB_PRED_V) {
            if (db_sched_velocity(t->sched, t->target_h + r * per, b->latents + r * per, b->noise + r * per, per,
                                  b->timesteps[r], err))
                return -1;
        } else
            memcpy(t->target_h + r * per, b->noise + r * per, per * sizeof(float));
    }
    /* the UNet's inputs and the target onto the device (no copy on the CPU) */
    db_ctx *c = t->ctx;
    if (db_ctx_copy(c, t->tsf, t->tsf_h, (size_t)B * sizeof(float), DB_COPY_H2D) ||
        db_ctx_copy(c, t->noisy, t->noisy_h, n * sizeof(float), DB_COPY_H2D) ||
        db_ctx_copy(c, t->target, t->target_h, n * sizeof(float), DB_COPY_H2D))
        return db_err_set(err, c->err.code, "trainer: %s", c->err.msg);
    /* the text encoder: trained, it runs every micro-batch (its activations
     * are kept for the backward); frozen, its output depends on the ids
     * alone, so the same prompts as last time (DreamBooth's instance and
     * class prompts, every step) reuse it: diffusers' pre-computed text
     * embeddings, without the option */
    const size_t nids = (size_t)B * b->T;
    if (t->o.train_text || !t->ctx_valid || t->ctx_nids != nids || t->ctx_prec != (int)c->precision ||
        memcmp(t->ctx_ids, b->ids, nids * sizeof *b->ids)) {
        t->ctx_valid = 0;
        if (db_clip_forward(t->clip, t->context, NULL, NULL, b->ids, B, b->T, err))
            return -1;
        int32_t *keep = t->o.train_text ? NULL : realloc(t->ctx_ids, nids * sizeof *keep);
        if (keep) { /* (no room to remember: computed again next time) */
            memcpy(keep, b->ids, nids * sizeof *keep);
            t->ctx_ids = keep, t->ctx_nids = nids, t->ctx_prec = (int)c->precision, t->ctx_valid = 1;
        }
    }
    unet_fwd f;
    memset(&f, 0, sizeof f); /* compared byte for byte */
    f.u = t->unet, f.out = t->pred_buf, f.x = t->noisy, f.ts = t->tsf, f.ctx = t->context;
    f.B = B, f.H = b->H, f.W = b->W, f.T = b->T;
    if (db_unet_graph_run(&t->gfwd, t->unet, unet_fwd_run, &f, sizeof f, t->o.log, err))
        return -1;

    if (!backward) {
        double li, lp;
        const double loss = host_loss(t, b, &li, &lp, err);
        if (isnan(loss))
            return -1;
        if (s) {
            memset(s, 0, sizeof *s);
            s->step = t->step;
            s->loss = loss, s->loss_instance = li, s->loss_prior = lp;
        }
        return 0;
    }
    /* d loss / d pred on the device, so that the backward follows the
     * forward with no wait for the host (the loss is summed on the host
     * after): e = pred - target, then each row's e times its factor, the
     * float operations of the host loop this replaces (1 pred + -1 target
     * is pred - target; alpha e is e g).  fp16: the seed is d (loss *
     * loss_scale) / d pred, as scaler.scale(loss).backward(). */
    const double scale = (t->scaling ? (double)t->scale : 1.0) / ((double)t->o.grad_accum * t->o.world);
    if (db_axpby_forward(c, t->dpred, t->pred_buf, t->target, 1.0f, -1.0f, n))
        return db_err_set(err, c->err.code, "trainer: loss gradient: %s", c->err.msg);
    for (int r = 0; r < B; r++) {
        const float g = (float)(2.0 * row_coef(t, b, r) * scale);
        if (db_axpby_forward(c, t->dpred + r * per, t->dpred + r * per, NULL, g, 0.0f, per))
            return db_err_set(err, c->err.code, "trainer: loss gradient: %s", c->err.msg);
    }
    /* backward: UNet, then the text encoder through d context; fused: the
     * optimizer steps each unit as its gradients are done */
    const int fused = t->o.fused_backward;
    db_grad_sink su = {0}, st = {0};
    const int bucketed = !fused && t->o.world > 1 && t->o.reduce_f32_start && t->o.reduce_wait &&
                         t->micro + 1 == t->o.grad_accum;
    if (bucketed) {
        su = st = (db_grad_sink){NULL, 0, bucket_ready, t};
        t->summing = 1;
    }
    if (fused) {
        t->fss = 0;
        t->fcount = 0;
        /* this step's AdamW scalars where the units' steps read them (the
         * graph's replays included), from the host's formula as always */
        db_adamw_coef co[2];
        const int64_t k = t->opt_step + 1;
        for (int i = 0; i < 2; i++) {
            db_adamw h = i ? t->o.text_hp : t->o.unet_hp;
            h.lr = db_lr_at(i ? &t->o.text_lr : &t->o.unet_lr, t->opt_step);
            h.coefs = NULL;
            co[i] = db_adamw_coefs(&h, k);
        }
        if (db_ctx_copy(c, t->fcoef_dev, co, sizeof co, DB_COPY_H2D))
            return db_err_set(err, c->err.code, "trainer: %s", c->err.msg);
        st = t->fsink[1];
    }
    /* the UNet's gradients written, not added to; its weights' packed in
     * bf16 where g16_init found that nothing needs them in float32 */
    int assign = unet_assigns(t) && !t->micro;
    if (!fused && !bucketed) {
        t->packed = assign && t->g16_nruns && c->precision == DB_PREC_BF16;
        assign = t->packed ? DB_ASSIGN_PACK16 : assign;
        const db_weights *wu = db_unet_weights(t->unet);
        for (size_t i = 0; i < wu->ix.n; i++) /* the clip's refs (the UNet's first) say so */
            t->refs[i].prec16 = t->packed && g16_packs(&wu->ix.v[i]) ? DB_PREC_BF16 : 0;
    }
    if (bucketed) { /* the sinks call back into the host mid-backward: no graph */
        if (db_unet_backward_to(t->unet, NULL, t->o.train_text ? t->dcontext : NULL, &t->gu, &su, assign, t->dpred,
                                err))
            return db_err_prefix(err, "trainer");
    } else {
        unet_bwd k;
        memset(&k, 0, sizeof k);
        k.u = t->unet, k.dcontext = t->o.train_text ? t->dcontext : NULL, k.grads = fused ? NULL : &t->gu,
        k.dout = t->dpred, k.fused = fused ? t : NULL, k.assign = assign;
        if (db_unet_graph_run(&t->gbwd, t->unet, unet_bwd_run, &k, sizeof k, t->o.log, err))
            return db_err_prefix(err, "trainer");
        if (fused) { /* a replay ran no host code: the units were those of the last run that did */
            if (t->fcount == 0)
                t->fcount = t->fcount_unet;
            else
                t->fcount_unet = t->fcount;
        }
    }
    const int sink = fused || bucketed;
    if (t->o.train_text &&
        db_clip_backward_to(t->clip, fused ? NULL : &t->gt, sink ? &st : NULL, t->dcontext, err))
        return db_err_prefix(err, "trainer");
    /* the loss, now that the backward is queued: a non-finite one is found
     * here, after the backward, so the step's gradients so far are dropped
     * and it begins again at the next micro-batch (train.h); the fused
     * step's updates were part of the backward and stay, as with a
     * non-finite gradient */
    double li, lp;
    const double loss = host_loss(t, b, &li, &lp, err);
    if (isnan(loss)) {
        if (!fused) {
            db_ctx_zero(c, t->gu.data, t->gu.numel * sizeof(float));
            if (t->o.train_text)
                db_ctx_zero(c, t->gt.data, t->gt.numel * sizeof(float));
        }
        t->micro = 0, t->summing = 0;
        t->sum_loss = t->sum_inst = t->sum_prior = 0;
        return -1;
    }
    if (fused && fused_norms(t, err))
        return db_err_prefix(err, "trainer");
    t->micro++;
    t->sum_loss += loss, t->sum_inst += li, t->sum_prior += lp;
    if (s) {
        memset(s, 0, sizeof *s);
        s->step = t->step;
        s->loss = loss, s->loss_instance = li, s->loss_prior = lp;
        s->loss_scale = t->scaling ? t->scale : 0.0;
    }
    return 0;
}

int db_trainer_accumulate(db_trainer *t, const db_train_batch *b, db_train_stats *s, db_err *err)
{
    return micro(t, b, s, 1, err);
}

int db_trainer_eval(db_trainer *t, const db_train_batch *b, db_train_stats *s, db_err *err)
{
    return micro(t, b, s, 0, err);
}

/* A step is over (applied or skipped): its stats into s (may be NULL), and
 * the micro-batch sums start again. */
static void close_step(db_trainer *t, db_train_stats *s, double norm, double lr, double lr_text, float used_scale,
                       int skipped)
{
    if (s) {
        memset(s, 0, sizeof *s);
        s->step = t->step;
        s->loss = t->sum_loss / t->micro;
        s->loss_instance = t->sum_inst / t->micro;
        s->loss_prior = t->sum_prior / t->micro;
        s->grad_norm = norm;
        s->lr = lr;
        s->lr_text = lr_text;
        s->loss_scale = used_scale;
        s->skipped = skipped;
    }
    t->micro = 0;
    t->sum_loss = t->sum_inst = t->sum_prior = 0;
}

/* fp16 found a non-finite gradient: no update (weights, moments, AdamW's
 * count and the lr schedule stay), the gradients are dropped, the step is
 * taken, and the scale backs off by half (GradScaler.update). */
static int skip_step(db_trainer *t, db_train_stats *s, double norm, float used_scale, db_err *err)
{
    db_ctx *c = t->ctx;
    db_ctx_zero(c, t->gu.data, t->gu.numel * sizeof(float));
    if (t->o.train_text)
        db_ctx_zero(c, t->gt.data, t->gt.numel * sizeof(float));
    if (c->err.code)
        return db_err_set(err, c->err.code, "trainer: skipped step: %s", c->err.msg);
    t->step++;
    t->scale *= 0.5f;
    t->growth_tracker = 0;
    /* the learning rates where the schedule stays */
    close_step(t, s, norm, db_lr_at(&t->o.unet_lr, t->opt_step),
               t->o.train_text ? db_lr_at(&t->o.text_lr, t->opt_step) : 0, used_scale, 1);
    return 0;
}

/* An update was applied: count it, grow the fp16 scale, report. */
static int finish_step(db_trainer *t, db_train_stats *s, double norm, double lr, double lr_text, float used_scale)
{
    t->opt_step++;
    t->step++;
    if (t->scaling && ++t->growth_tracker >= t->growth_interval) {
        /* torch's _amp_update_scale_: grow only to a finite scale */
        const float grown = t->scale * 2.0f;
        if (isfinite(grown))
            t->scale = grown;
        t->growth_tracker = 0;
    }
    close_step(t, s, norm, lr, lr_text, used_scale, 0);
    return 0;
}

int db_trainer_apply(db_trainer *t, db_train_stats *s, db_err *err)
{
    if (!t->micro)
        return db_err_set(err, DB_EUSAGE, "trainer: an optimizer step without gradients");
    const int fused = t->o.fused_backward;
    if (t->o.world > 1) {
        /* sum the gradients (fused: summed already; bucketed: begun in the
         * backward, waited for here) and the loss sums over the processes */
        const int whole = !fused && !t->summing;
        const int waited = t->summing ? t->o.reduce_wait(t->o.reduce_user, err) : 0;
        t->summing = 0;
        double sums[4] = {t->sum_loss, t->sum_inst, t->sum_prior, (double)t->micro};
        if (waited || (whole && t->o.reduce_f32(t->o.reduce_user, t->gu.data, t->gu.numel, err)) ||
            (whole && t->o.train_text && t->o.reduce_f32(t->o.reduce_user, t->gt.data, t->gt.numel, err)) ||
            t->o.reduce_f64(t->o.reduce_user, sums, 4, err))
            return db_err_prefix(err, "trainer: gradient reduction");
        t->sum_loss = sums[0], t->sum_inst = sums[1], t->sum_prior = sums[2];
        t->micro = (int)sums[3];
    }
    db_ctx *c = t->ctx;
    double norm;
    float coef = 0.0f; /* global clipping's coefficient, applied by the AdamW steps (optim.h grad_coef) */
    if (fused) /* the updates are made: count the step */
        return finish_step(t, s, (double)(float)sqrt(t->fss), db_lr_at(&t->o.unet_lr, t->opt_step),
                           t->o.train_text ? db_lr_at(&t->o.text_lr, t->opt_step) : 0, 0.0f);
    const float used_scale = t->scaling ? t->scale : 0.0f;
    if (t->scaling) {
        /* GradScaler.unscale_: any non-finite gradient skips the step; the
         * clip's sums of squares (double) are finite exactly when every
         * element is */
        double ss = 0, *q = malloc(t->nrefs * sizeof *q);
        if (!q)
            return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
        if (db_sumsq_refs_ctx(c, q, t->refs, t->nrefs)) {
            free(q);
            return db_err_set(err, c->err.code, "trainer: gradient check: %s", c->err.msg);
        }
        for (size_t i = 0; i < t->nrefs; i++)
            ss += q[i];
        free(q);
        if (!isfinite(ss))
            return skip_step(t, s, sqrt(ss), used_scale, err);
        /* grads * (1 / scale) before clipping, as torch: the reciprocal in
         * double, rounded to float32 */
        const float inv = (float)(1.0 / (double)t->scale);
        if (db_scale_refs_ctx(c, t->refs, t->nrefs, inv))
            return db_err_set(err, c->err.code, "trainer: gradient unscale: %s", c->err.msg);
    }
    /* without clipping the norm is still measured (reported and checked):
     * an infinite maximum makes the coefficient 1, which leaves g as is */
    const double max = t->o.max_grad_norm > 0 ? t->o.max_grad_norm : INFINITY;
    if (t->o.clip_per_tensor) {
        double ss = 0, *nk = malloc(t->nrefs * sizeof *nk);
        if (!nk)
            return db_err_set(err, DB_ENOMEM, "trainer: out of memory");
        const int rc = db_clip_grad_norm_each_ctx(c, nk, &ss, t->refs, t->nrefs, max);
        free(nk);
        if (rc)
            return db_err_set(err, c->err.code, "trainer: gradient clipping: %s", c->err.msg);
        norm = (double)(float)sqrt(ss);
    } else if (db_clip_grad_coef_ctx(c, &norm, &coef, t->refs, t->nrefs, max))
        return db_err_set(err, c->err.code, "trainer: gradient clipping: %s", c->err.msg);
    if (!isfinite(norm)) /* fp16: finite before the unscale, so not here either; bf16/fp32: diverged */
        return db_err_set(err, DB_ENUMERIC, "trainer: the gradient norm is %g at step %lld: training diverged",
                          norm, (long long)t->step + 1);
    const int64_t k = t->opt_step + 1; /* AdamW's step count after this step */
    db_adamw hu = t->o.unet_hp;
    hu.lr = db_lr_at(&t->o.unet_lr, t->opt_step);
    hu.grad_coef = coef;
    db_weights *wu = (db_weights *)db_unet_weights(t->unet);
    const int q8 = t->o.optimizer == DB_OPTIM_ADAMW8BIT;
    /* the packed tensors: AdamW's runs, 8-bit AdamW's jobs */
    hu.g16_runs = t->packed && !q8 ? t->g16_runs : NULL, hu.g16_nruns = t->packed && !q8 ? t->g16_nruns : 0;
    hu.g16_prec = DB_PREC_BF16;
    if (q8)
        q8_step(c, &t->qu, wu, t->gu.data, &hu, k, &t->maps, 0, wu->numel, t->packed);
    else
        db_opt_adamw(c, wu->data, t->mu.data, t->vu.data, t->gu.data, wu->numel, &hu, k);
    if (!unet_assigns(t)) /* else the next backward writes them */
        db_ctx_zero(c, t->gu.data, t->gu.numel * sizeof(float));
    double lr_text = 0;
    if (t->o.train_text) {
        db_adamw ht = t->o.text_hp;
        ht.lr = lr_text = db_lr_at(&t->o.text_lr, t->opt_step);
        ht.grad_coef = coef;
        ht.g16_runs = NULL, ht.g16_nruns = 0; /* (the text encoder's stay float32) */
        db_weights *wt = &t->clip->w;
        if (q8)
            q8_step(c, &t->qt, wt, t->gt.data, &ht, k, &t->maps, 0, wt->numel, 0);
        else
            db_opt_adamw(c, wt->data, t->mt.data, t->vt.data, t->gt.data, wt->numel, &ht, k);
        db_ctx_zero(c, t->gt.data, t->gt.numel * sizeof(float));
    }
    if (c->err.code)
        return db_err_set(err, c->err.code, "trainer: optimizer step: %s", c->err.msg);
    return finish_step(t, s, norm, hu.lr, lr_text, used_scale);
}

size_t db_trainer_packed_grads(const db_trainer *t) { return t->packed ? t->g16_nruns : 0; }

size_t db_trainer_grad_norms(const db_trainer *t, double *out, size_t n)
{
    if (t->o.fused_backward) { /* the last step's, recorded as it went */
        const db_weights *wu = db_unet_weights(t->unet);
        const size_t nt = wu->ix.n + (t->o.train_text ? t->clip->w.ix.n : 0);
        for (size_t i = 0; i < nt && i < n; i++)
            out[i] = t->fnorms[i];
        return nt;
    }
    /* the clip's sums of squares, on the gradients' own device; NaN when it fails */
    const size_t k = t->nrefs < n ? t->nrefs : n;
    if (k && db_sumsq_refs_ctx(t->ctx, out, t->refs, k))
        for (size_t i = 0; i < k; i++)
            out[i] = NAN;
    else
        for (size_t i = 0; i < k; i++)
            out[i] = sqrt(out[i]);
    return t->nrefs;
}

void db_trainer_state(db_trainer *t, db_train_state *st)
{
    t->ctx_valid = 0; /* the caller may load the frozen text encoder's weights through these pointers */
    memset(st, 0, sizeof *st);
    const int q8 = t->o.optimizer == DB_OPTIM_ADAMW8BIT;
    st->optimizer = t->o.optimizer;
    st->unet = (db_weights *)db_unet_weights(t->unet);
    st->unet_m = q8 ? NULL : &t->mu;
    st->unet_v = q8 ? NULL : &t->vu;
    st->unet_q8 = q8 ? &t->qu : NULL;
    if (t->o.train_text) {
        st->text = &t->clip->w;
        st->text_m = q8 ? NULL : &t->mt;
        st->text_v = q8 ? NULL : &t->vt;
        st->text_q8 = q8 ? &t->qt : NULL;
    } else
        st->text_frozen = &t->clip->w;
    st->step = t->step;
    st->opt_step = t->opt_step;
    st->loss_scale = t->scaling ? t->scale : 0.0;
    st->growth_tracker = t->scaling ? t->growth_tracker : 0;
}

void db_trainer_set_step(db_trainer *t, int64_t step) { t->step = t->opt_step = step; }

int db_trainer_set_amp(db_trainer *t, int64_t opt_step, double loss_scale, int64_t growth_tracker, db_err *err)
{
    if (opt_step < 0 || opt_step > t->step || growth_tracker < 0 || !(loss_scale >= 0) ||
        !isfinite((float)loss_scale))
        return db_err_set(err, DB_EFORMAT, "trainer: resume: %lld updates in %lld steps, loss scale %g, growth "
                          "tracker %lld: not a trainer's state", (long long)opt_step, (long long)t->step, loss_scale,
                          (long long)growth_tracker);
    t->opt_step = opt_step;
    if (t->scaling && loss_scale > 0) {
        t->scale = (float)loss_scale;
        t->growth_tracker = growth_tracker;
    }
    return 0;
}
db_unet *db_trainer_unet(db_trainer *t) { return t->unet; }
db_clip *db_trainer_clip(db_trainer *t) { return t->clip; }
const db_sched *db_trainer_sched(const db_trainer *t) { return t->sched; }
int db_trainer_num_timesteps(const db_trainer *t) { return t->ntrain; }
