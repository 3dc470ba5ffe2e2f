#include "txt2img.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/progress.h"
#include "clip.h"
#include "noise.h"
#include "prompt.h"
#include "sched.h"
#include "tokenizer.h"
#include "unet.h"
#include "vae.h"

enum { CHUNK = 75, COMMA_BACKTRACK = 20 };

int db_sd_open(db_sd *sd, const char *path, const db_model_opts *mo, int threads, db_err *err)
{
    return db_sd_open_device(sd, path, mo, "cpu", threads, err);
}

int db_sd_open_device(db_sd *sd, const char *path, const db_model_opts *mo, const char *device, int threads,
                      db_err *err)
{
    memset(sd, 0, sizeof *sd);
    sd->threads = threads;
    if (db_model_open(&sd->model, path, mo, err))
        return -1;
    if (db_ctx_create_device(&sd->ctx, device, threads, err)) {
        db_model_close(&sd->model);
        return -1;
    }
    return 0;
}

/* Free whichever networks are loaded (the kept step first: its graph
 * replays into the UNet's buffers). */
static void release(db_sd *sd)
{
    db_sd_drop_step(sd);
    if (sd->clip)
        db_clip_free(sd->clip);
    if (sd->tok)
        db_tokenizer_free(sd->tok);
    if (sd->unet)
        db_unet_free(sd->unet);
    if (sd->vae)
        db_vae_free(sd->vae);
    sd->clip = NULL;
    sd->tok = NULL;
    sd->unet = NULL;
    sd->vae = NULL;
}

void db_sd_close(db_sd *sd)
{
    release(sd);
    if (sd->ctx)
        db_ctx_destroy(sd->ctx);
    if (sd->model.path)
        db_model_close(&sd->model);
    memset(sd, 0, sizeof *sd);
}

/* --- prompt -> chunks of 77 ids with per-token weights (A1111) -------------- */

typedef struct chunks {
    int32_t *ids;    /* (k, 77) */
    float *weights;  /* (k, 77) */
    int k, cap;
    /* the chunk being filled */
    int32_t cur[CHUNK];
    float curw[CHUNK];
    int n, last_comma;
} chunks;

static int close_chunk(chunks *c, const db_tokenizer_info *ti, db_err *err)
{
    if (c->k == c->cap) {
        int cap = c->cap ? c->cap * 2 : 4;
        int32_t *ids = realloc(c->ids, (size_t)cap * 77 * sizeof *ids);
        if (!ids)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        c->ids = ids;
        float *w = realloc(c->weights, (size_t)cap * 77 * sizeof *w);
        if (!w)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        c->weights = w;
        c->cap = cap;
    }
    int32_t *ids = c->ids + (size_t)c->k * 77;
    float *w = c->weights + (size_t)c->k * 77;
    ids[0] = ti->bos;
    w[0] = 1;
    for (int i = 0; i < CHUNK; i++) {
        ids[1 + i] = i < c->n ? c->cur[i] : ti->eos; /* A1111 pads SD1 chunks with EOS */
        w[1 + i] = i < c->n ? c->curw[i] : 1.0f;
    }
    ids[76] = ti->eos;
    w[76] = 1;
    c->k++;
    c->n = 0;
    c->last_comma = -1;
    return 0;
}

static int prompt_chunks(const db_tokenizer *tok, const char *text, chunks *c, db_err *err)
{
    memset(c, 0, sizeof *c);
    c->last_comma = -1;
    db_tokenizer_info ti;
    db_tokenizer_get_info(tok, &ti);
    int32_t comma = db_tokenizer_id(tok, ",</w>");
    db_prompt p;
    if (db_prompt_parse(&p, text, err))
        return -1;
    int rc = 0;
    for (size_t f = 0; f < p.n && !rc; f++) {
        if (p.v[f].weight < 0) { /* BREAK */
            rc = close_chunk(c, &ti, err);
            continue;
        }
        int32_t *ids = NULL;
        size_t n = 0;
        if ((rc = db_tokenize_words(tok, p.v[f].text, &ids, &n, err)))
            break;
        for (size_t i = 0; i < n && !rc; i++) {
            if (ids[i] == comma) {
                c->last_comma = c->n;
            } else if (c->n == CHUNK && c->last_comma >= 0 && c->n - c->last_comma <= COMMA_BACKTRACK) {
                /* move the words after the last comma to the next chunk */
                int from = c->last_comma + 1, moved = c->n - from;
                int32_t mids[CHUNK];
                float mw[CHUNK];
                memcpy(mids, c->cur + from, (size_t)moved * sizeof *mids);
                memcpy(mw, c->curw + from, (size_t)moved * sizeof *mw);
                c->n = from;
                if ((rc = close_chunk(c, &ti, err)))
                    break;
                memcpy(c->cur, mids, (size_t)moved * sizeof *mids);
                memcpy(c->curw, mw, (size_t)moved * sizeof *mw);
                c->n = moved;
            }
            if (c->n == CHUNK && (rc = close_chunk(c, &ti, err)))
                break;
            c->cur[c->n] = ids[i];
            c->curw[c->n++] = (float)p.v[f].weight;
        }
        free(ids);
    }
    if (!rc && (c->n || !c->k))
        rc = close_chunk(c, &ti, err);
    db_prompt_free(&p);
    if (rc) {
        free(c->ids);
        free(c->weights);
        memset(c, 0, sizeof *c);
    }
    return rc;
}

int db_sd_encode_prompt(db_tokenizer *tok, db_clip *clip, const char *prompt, int clip_skip, float **emb, int *T,
                        db_err *err)
{
    chunks c;
    *emb = NULL;
    if (prompt_chunks(tok, prompt, &c, err))
        return -1;
    int D = clip->arch.hidden, L = clip->arch.layers;
    if (clip_skip < 1 || clip_skip > L) {
        free(c.ids);
        free(c.weights);
        return db_err_set(err, DB_EUSAGE, "clip skip %d: must be 1..%d", clip_skip, L);
    }
    /* The embeddings are host memory (the caller's; the emphasis below is a
     * host loop).  The encoder writes each chunk into a device buffer, copied
     * back; on the CPU that buffer is the chunk itself (the copy is none). */
    db_ctx *x = clip->ctx;
    const size_t zb = (size_t)77 * (size_t)D * sizeof(float);
    float *out = malloc((size_t)c.k * zb);
    float *zd = x->device == DB_CPU ? NULL : db_ctx_alloc(x, zb);
    int rc = out && (x->device == DB_CPU || zd) ? 0 : db_err_set(err, DB_ENOMEM, "out of memory");
    for (int k = 0; k < c.k && !rc; k++) {
        float *z = out + (size_t)k * 77 * (size_t)D, *zdev = zd ? zd : z;
        const int32_t *ids = c.ids + (size_t)k * 77;
        if (clip_skip == 1)
            rc = db_clip_forward(clip, zdev, NULL, NULL, ids, 1, 77, err);
        else if (!(rc = db_clip_forward(clip, NULL, NULL, NULL, ids, 1, 77, err)))
            rc = db_clip_hidden_ln(clip, zdev, L + 1 - clip_skip, err);
        if (!rc && db_ctx_copy(x, z, zdev, zb, DB_COPY_D2H))
            rc = db_err_set(err, x->err.code, "text encoder: %s", x->err.msg);
        if (rc)
            break;
        const float *w = c.weights + (size_t)k * 77;
        int plain = 1;
        for (int t = 0; t < 77; t++)
            plain &= w[t] == 1.0f;
        if (plain)
            continue; /* exactly diffusers' embedding */
        /* A1111 "original" emphasis: scale by weight, then restore the mean
         * (the means are taken in float32 over the whole chunk, as torch does) */
        double before = 0, after = 0;
        for (size_t i = 0; i < (size_t)77 * (size_t)D; i++)
            before += z[i];
        for (int t = 0; t < 77; t++)
            for (int d = 0; d < D; d++) {
                z[(size_t)t * (size_t)D + (size_t)d] *= w[t];
                after += z[(size_t)t * (size_t)D + (size_t)d];
            }
        float ratio = after != 0 ? (float)(before / after) : 1.0f;
        for (size_t i = 0; i < (size_t)77 * (size_t)D; i++)
            z[i] *= ratio;
    }
    free(c.ids);
    free(c.weights);
    db_ctx_free(x, zd);
    if (rc) {
        free(out);
        return -1;
    }
    *emb = out;
    *T = 77 * c.k;
    return 0;
}

/* (T, D) -> (T2, D) by appending copies of `fill` (77, D) chunks. */
static int pad_chunks(float **emb, int *T, int T2, const float *fill, int D, db_err *err)
{
    if (*T == T2)
        return 0;
    float *e = realloc(*emb, (size_t)T2 * (size_t)D * sizeof *e);
    if (!e)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    for (int t = *T; t < T2; t += 77)
        memcpy(e + (size_t)t * (size_t)D, fill, (size_t)77 * (size_t)D * sizeof *e);
    *emb = e;
    *T = T2;
    return 0;
}

static int encode_prompts(db_sd *sd, const db_txt2img_opts *o, db_txt2img_out *out, db_err *err)
{
    char dd[4096];
    float *empty = NULL;
    int rc = -1, Te;
    if ((!sd->tok && db_tokenizer_load_default(&sd->tok, sd->model.tokenizer_dir, db_data_dir(dd, sizeof dd), err)) ||
        (!sd->clip && db_clip_create(&sd->clip, sd->ctx, &sd->model, err)))
        goto out;
    db_tokenizer *tok = sd->tok;
    db_clip *clip = sd->clip;
    int clip_skip = o->clip_skip ? o->clip_skip : 1;
    if (db_sd_encode_prompt(tok, clip, o->prompt ? o->prompt : "", clip_skip, &out->prompt_embeds, &out->T, err))
        goto out;
    int Tn;
    if (db_sd_encode_prompt(tok, clip, o->negative ? o->negative : "", clip_skip, &out->negative_embeds, &Tn, err))
        goto out;
    out->D = clip->arch.hidden;
    if (Tn != out->T) { /* pad the shorter with encodings of an empty chunk (A1111) */
        if (db_sd_encode_prompt(tok, clip, "", clip_skip, &empty, &Te, err))
            goto out;
        int T2 = Tn > out->T ? Tn : out->T;
        if (pad_chunks(&out->prompt_embeds, &out->T, T2, empty, out->D, err) ||
            pad_chunks(&out->negative_embeds, &Tn, T2, empty, out->D, err))
            goto out;
    }
    rc = 0;
out:
    free(empty);
    if (!sd->borrowed && (!sd->keep_models || rc)) { /* the text encoder is done with */
        if (sd->clip)
            db_clip_free(sd->clip);
        if (sd->tok)
            db_tokenizer_free(sd->tok);
        sd->clip = NULL;
        sd->tok = NULL;
    }
    return rc;
}

/* One denoising step's device work on fixed buffers: the input copied into
 * the guidance half, the UNet, and the guidance mix.  The graph of
 * sample_latents replays exactly this; xin's first half and ts are
 * refreshed in place before each call. */
typedef struct denoise {
    db_unet *u;
    db_ctx *c;
    float *xin, *eps, *ts, *ctxt;
    int B, h, w, T, cfg; /* B: the UNet's batch (both halves with cfg) */
    size_t nb;           /* floats of one half */
    float g;
} denoise;

static int denoise_run(void *arg, db_err *err)
{
    denoise *d = arg;
    db_ctx *c = d->c;
    if (d->cfg && db_ctx_copy(c, d->xin + d->nb, d->xin, d->nb * sizeof *d->xin, DB_COPY_D2D))
        return db_err_set(err, c->err.code, "sample: %s", c->err.msg);
    if (db_unet_forward(d->u, d->eps, d->xin, d->ts, d->ctxt, d->B, d->h, d->w, d->T, err))
        return -1;
    /* noise_pred = uncond + g * (text - uncond), in that order, as two
     * axpbys on the device: text - uncond is 1*text + -1*uncond (both
     * products exact), then 1*uncond + g*diff: the same roundings */
    if (d->cfg) {
        db_axpby_forward(c, d->eps + d->nb, d->eps + d->nb, d->eps, 1.0f, -1.0f, d->nb);
        db_axpby_forward(c, d->eps, d->eps, d->eps + d->nb, 1.0f, d->g, d->nb);
    }
    if (c->err.code)
        return db_err_set(err, c->err.code, "sample: guidance: %s", c->err.msg);
    return 0;
}

/* The denoising step's buffers and graph for one shape of call (txt2img.h
 * db_sd.step): xin, eps, ctxt and ts are what the UNet reads and writes, on
 * the ctx's device; xin_h, eps_h and ts_h stage them through the host
 * around the scheduler (on the CPU they are the device buffers themselves,
 * so nothing is copied and nothing extra held). */
struct db_sd_step {
    db_ctx *c;
    db_unet *u;
    int m, bmax, T, D, no_graph; /* the shape it was made for */
    size_t per;
    float *xin, *eps, *ctxt, *ts, *xin_h, *eps_h, *ts_h;
    db_unet_graph gr;
};

static void step_free(struct db_sd_step *k)
{
    if (!k)
        return;
    db_unet_graph_free(&k->gr); /* before the buffers it replays into */
    if (k->c->device != DB_CPU) {
        free(k->xin_h);
        free(k->eps_h);
        free(k->ts_h);
    }
    db_ctx_free(k->c, k->xin);
    db_ctx_free(k->c, k->eps);
    db_ctx_free(k->c, k->ctxt);
    db_ctx_free(k->c, k->ts);
    free(k);
}

void db_sd_drop_step(db_sd *sd)
{
    step_free(sd->step);
    sd->step = NULL;
}

/* A step for UNet batches of m * bmax rows of per floats and contexts of
 * T x D; NULL out of memory. */
static struct db_sd_step *step_new(db_ctx *c, db_unet *u, int m, int bmax, size_t per, int T, int D, int no_graph)
{
    struct db_sd_step *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    k->c = c, k->u = u, k->m = m, k->bmax = bmax, k->per = per, k->T = T, k->D = D, k->no_graph = no_graph;
    const int cpu = c->device == DB_CPU;
    const size_t rows = (size_t)m * (size_t)bmax;
    k->xin = db_ctx_alloc(c, rows * per * sizeof *k->xin);
    k->eps = db_ctx_alloc(c, rows * per * sizeof *k->eps);
    k->ctxt = db_ctx_alloc(c, rows * (size_t)T * (size_t)D * sizeof *k->ctxt);
    k->ts = db_ctx_alloc(c, rows * sizeof *k->ts);
    k->xin_h = cpu ? k->xin : malloc((size_t)bmax * per * sizeof *k->xin_h);
    k->eps_h = cpu ? k->eps : malloc((size_t)bmax * per * sizeof *k->eps_h);
    k->ts_h = cpu ? k->ts : malloc(rows * sizeof *k->ts_h);
    k->gr.off = no_graph;
    if (!k->xin || !k->eps || !k->ctxt || !k->ts || !k->xin_h || !k->eps_h || !k->ts_h) {
        step_free(k);
        return NULL;
    }
    return k;
}

static int sample_latents(db_sd *sd, const db_txt2img_opts *o, int trace, db_txt2img_out *out, db_err *err)
{
    const db_arch *a = &sd->model.arch;
    int f = 1 << (a->vae.nlevels - 1), C = a->unet.in_channels;
    int h = o->height / f, w = o->width / f, n = o->n_images, bmax = o->batch > 0 ? o->batch : 1;
    size_t per = (size_t)C * (size_t)h * (size_t)w;
    int cfg = o->guidance > 1.0;
    int T = out->T, D = out->D;
    db_sched *s = NULL;
    /* x and noise are host memory: the scheduler (sched.c) is host code over
     * latent-sized tensors; the UNet's side is the step's (db_sd_step) */
    db_ctx *c = sd->ctx;
    float *x = NULL, *xin = NULL, *eps = NULL, *noise = NULL, *ctxt = NULL, *ts = NULL;
    float *xin_h = NULL, *eps_h = NULL, *ts_h = NULL, *tsd = NULL;
    struct db_sd_step *k = NULL;
    denoise dn = {0};
    int rc = -1;
    if (db_sched_create(&s, o->scheduler ? o->scheduler : "ddim", sd->model.scheduler, err))
        goto out;
    if (!strcmp(db_sched_name(s), "ddim") && db_sched_set_eta(s, o->eta, err))
        goto out;
    if (db_sched_set_timesteps(s, o->steps, err))
        goto out;
    int nsteps = db_sched_nsteps(s);
    if (!sd->unet && db_unet_create(&sd->unet, sd->ctx, &sd->model, err))
        goto out;
    db_unet *u = sd->unet;
    int m = cfg ? 2 : 1; /* UNet batch = m * b */
    /* the kept step when it has this call's shape (its graph then replays
     * from this call's first step), else a new one */
    k = sd->step;
    sd->step = NULL;
    if (k && !(k->c == c && k->u == u && k->m == m && k->bmax == bmax && k->per == per && k->T == T &&
               k->D == D && k->no_graph == o->no_graph)) {
        step_free(k);
        k = NULL;
    }
    if (!k)
        k = step_new(c, u, m, bmax, per, T, D, o->no_graph);
    if (k) {
        xin = k->xin, eps = k->eps, ctxt = k->ctxt, ts = k->ts;
        xin_h = k->xin_h, eps_h = k->eps_h, ts_h = k->ts_h;
    }
    x = malloc((size_t)bmax * per * sizeof *x);
    noise = malloc((size_t)bmax * per * sizeof *noise);
    out->latents = malloc((size_t)n * per * sizeof *out->latents);
    if (trace)
        out->step_latents = malloc((size_t)nsteps * (size_t)n * per * sizeof *out->step_latents);
    if (!k || !x || !noise || !out->latents || (trace && !out->step_latents)) {
        db_err_set(err, DB_ENOMEM, "out of memory for %d images of %dx%d", n, o->width, o->height);
        goto out;
    }
    size_t te = (size_t)T * (size_t)D;
    /* context rows: diffusers concatenates [negative, prompt] */
    for (int j = 0; j < bmax; j++) {
        if (cfg) {
            db_ctx_copy(c, ctxt + (size_t)j * te, out->negative_embeds, te * sizeof *ctxt, DB_COPY_H2D);
            db_ctx_copy(c, ctxt + (size_t)(bmax + j) * te, out->prompt_embeds, te * sizeof *ctxt, DB_COPY_H2D);
        } else {
            db_ctx_copy(c, ctxt + (size_t)j * te, out->prompt_embeds, te * sizeof *ctxt, DB_COPY_H2D);
        }
    }
    /* DDIM without noise (db-sample's and db-prior's default) steps on the
     * device (db_ddim_step_forward, the host loop's float operations, so
     * the same bits): the latents stay in xin between the UNet's calls, and
     * the host queues step after step without waiting for one, so that a
     * graph's launch (host time) overlaps the step before it on the GPU.
     * Every call's timesteps go up once (tsd).  Other schedulers, eta > 0,
     * a trace of every step or host_step: the scheduler on the host. */
    db_ddim_coef kc;
    const int rows = m * bmax;
    const int on_dev = !trace && !o->host_step && db_sched_ddim_coef(s, 0, &kc) == 0 && !kc.noise_on;
    if (on_dev) {
        float *th = malloc((size_t)nsteps * (size_t)rows * sizeof *th);
        tsd = db_ctx_alloc(c, (size_t)nsteps * (size_t)rows * sizeof *tsd);
        if (!th || !tsd) {
            free(th);
            db_err_set(err, DB_ENOMEM, "out of memory for %d timesteps", nsteps);
            goto out;
        }
        for (int i = 0; i < nsteps; i++)
            for (int j = 0; j < rows; j++)
                th[(size_t)i * rows + j] = (float)db_sched_timestep(s, i);
        const int bad = db_ctx_copy(c, tsd, th, (size_t)nsteps * (size_t)rows * sizeof *th, DB_COPY_H2D);
        free(th);
        if (bad) {
            db_err_set(err, c->err.code, "sample: %s", c->err.msg);
            goto out;
        }
    }
    db_progress pr;
    db_progress_start(&pr, "sample", (int64_t)nsteps * n, o->progress);
    float g = (float)o->guidance;
    for (int i0 = 0; i0 < n; i0 += bmax) {
        int b = n - i0 < bmax ? n - i0 : bmax;
        size_t nb = (size_t)b * per;
        if (i0 && db_sched_set_timesteps(s, o->steps, err)) /* fresh sampler state per batch */
            goto out;
        float sigma0 = db_sched_init_noise_sigma(s);
        for (int j = 0; j < b; j++) {
            float *xj = x + (size_t)j * per;
            if (o->init_latents)
                memcpy(xj, o->init_latents + (size_t)(i0 + j) * per, per * sizeof *xj);
            else
                db_noise_latents(xj, per, o->seed, (uint64_t)(o->first_index + i0 + j), 0);
            for (size_t q = 0; q < per; q++)
                xj[q] *= sigma0;
        }
        /* when the batch is short, the context rows of the cfg half start at b */
        if (cfg && b != bmax)
            for (int j = 0; j < b; j++)
                db_ctx_copy(c, ctxt + (size_t)(b + j) * te, out->prompt_embeds, te * sizeof *ctxt, DB_COPY_H2D);
        /* the cross-attentions' k and v of this batch's context, made once
         * for all its steps (unet.h; the same bits as making them each step) */
        if (db_unet_cache_context(u, ctxt, m * b, T, err))
            goto out;
        memset(&dn, 0, sizeof dn); /* db_unet_graph_run compares it byte for byte */
        dn.u = u, dn.c = c, dn.xin = xin, dn.eps = eps, dn.ts = ts, dn.ctxt = ctxt;
        dn.B = m * b, dn.h = h, dn.w = w, dn.T = T, dn.cfg = cfg, dn.nb = nb, dn.g = g;
        /* on the device: x in xin from here (DDIM's model input is x) */
        if (on_dev && db_ctx_copy(c, xin, x, nb * sizeof *xin, DB_COPY_H2D)) {
            db_err_set(err, c->err.code, "sample: %s", c->err.msg);
            goto out;
        }
        uint64_t queued = 0; /* (on the device) the fence after the step before */
        for (int i = 0; i < nsteps; i++) {
            /* (the guidance half is copied from it inside the step: denoise_run) */
            if (on_dev) {
                db_ctx_copy(c, ts, tsd + (size_t)i * rows, (size_t)(m * b) * sizeof *ts, DB_COPY_D2D);
            } else {
                db_sched_scale_model_input(s, i, xin_h, x, nb);
                db_ctx_copy(c, xin, xin_h, nb * sizeof *xin, DB_COPY_H2D);
                float t = (float)db_sched_timestep(s, i);
                for (int j = 0; j < m * b; j++)
                    ts_h[j] = t;
                db_ctx_copy(c, ts, ts_h, (size_t)(m * b) * sizeof *ts, DB_COPY_H2D);
            }
            if (c->err.code) {
                db_err_set(err, c->err.code, "sample: %s", c->err.msg);
                goto out;
            }
            /* the first step of a batch size runs directly (it also builds
             * what the ops make at a first call: plans, 16-bit weight
             * copies), the second records the step's work as a graph, and
             * every step from there replays it */
            if (db_unet_graph_run(&k->gr, u, denoise_run, &dn, sizeof dn, o->log, err))
                goto out;
            if (on_dev) {
                /* the step queued, then a wait for the one before it: the
                 * device always has the next step (the CPU: no fences, each
                 * step done when queued) */
                db_sched_ddim_coef(s, i, &kc);
                const uint64_t fe = db_ddim_step_forward(c, xin, NULL, eps, NULL, nb, &kc) ? 0 : db_ctx_fence(c);
                if (c->err.code || (queued && db_ctx_fence_wait(c, queued))) {
                    db_err_set(err, c->err.code, "sample: step %d: %s", i, c->err.msg);
                    goto out;
                }
                if (queued || !fe)
                    db_progress_add(&pr, b);
                queued = fe;
                continue;
            }
            /* the scheduler's input, back on the host */
            if (db_ctx_copy(c, eps_h, eps, nb * sizeof *eps, DB_COPY_D2H)) {
                db_err_set(err, c->err.code, "sample: guidance: %s", c->err.msg);
                goto out;
            }
            if (db_sched_needs_noise(s, i))
                for (int j = 0; j < b; j++)
                    db_noise_latents(noise + (size_t)j * per, per, o->seed, (uint64_t)(o->first_index + i0 + j),
                                     (uint64_t)i + 1);
            if (db_sched_step(s, i, eps_h, x, nb, noise, NULL, err))
                goto out;
            if (trace)
                memcpy(out->step_latents + ((size_t)i * (size_t)n + (size_t)i0) * per, x, nb * sizeof *x);
            db_progress_add(&pr, b);
        }
        if (on_dev) { /* x back from the device (a wait for its last step) */
            if (db_ctx_copy(c, x, xin, nb * sizeof *x, DB_COPY_D2H)) {
                db_err_set(err, c->err.code, "sample: %s", c->err.msg);
                goto out;
            }
            if (queued)
                db_progress_add(&pr, b);
        }
        memcpy(out->latents + (size_t)i0 * per, x, nb * sizeof *x);
    }
    db_progress_end(&pr);
    rc = 0;
out:
    /* kept for the next call where the networks are, else freed (before
     * the UNet whose buffers its graph replays into); a borrowed UNet is
     * given back without the context cache, whose context was the step's */
    if (k && rc == 0 && sd->keep_models && !sd->borrowed) {
        sd->step = k;
    } else {
        if (sd->unet)
            db_unet_cache_context(sd->unet, NULL, 0, 0, NULL);
        step_free(k);
    }
    if (sd->unet && !sd->borrowed && (!sd->keep_models || rc)) {
        db_unet_free(sd->unet);
        sd->unet = NULL;
    }
    db_sched_free(s);
    db_ctx_free(c, tsd);
    free(x);
    free(noise);
    return rc;
}

static int decode_latents(db_sd *sd, const db_txt2img_opts *o, db_txt2img_out *out, db_err *err)
{
    const db_arch *a = &sd->model.arch;
    int f = 1 << (a->vae.nlevels - 1), C = a->unet.in_channels;
    int h = o->height / f, w = o->width / f;
    size_t per = (size_t)C * (size_t)h * (size_t)w, img = (size_t)3 * (size_t)o->height * (size_t)o->width;
    /* z (host) = latents / scaling factor, then the decoder on the device:
     * its input and output go through zd and imd (on the CPU: z and the
     * caller's image itself, nothing copied) */
    db_ctx *c = sd->ctx;
    const int cpu = c->device == DB_CPU;
    float *z = malloc(per * sizeof *z);
    float *zd = cpu ? z : db_ctx_alloc(c, per * sizeof *zd), *imd = cpu ? NULL : db_ctx_alloc(c, img * sizeof *imd);
    out->images = malloc((size_t)o->n_images * img * sizeof *out->images);
    int rc = -1;
    if (!z || !zd || (!cpu && !imd) || !out->images) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (!sd->vae && db_vae_create(&sd->vae, sd->ctx, &sd->model, err))
        goto out;
    db_vae *v = sd->vae;
    float sf = (float)a->vae.scaling_factor;
    for (int i = 0; i < o->n_images; i++) {
        const float *l = out->latents + (size_t)i * per;
        for (size_t k = 0; k < per; k++)
            z[k] = l[k] / sf;
        float *im = out->images + (size_t)i * img, *imdev = cpu ? im : imd;
        if (db_ctx_copy(c, zd, z, per * sizeof *z, DB_COPY_H2D) || db_vae_decode(v, imdev, zd, 1, h, w, err))
            goto out_ctx;
        if (db_ctx_copy(c, im, imdev, img * sizeof *im, DB_COPY_D2H))
            goto out_ctx;
    }
    rc = 0;
    goto out;
out_ctx: /* a failed copy (the decoder reports its own failures) */
    if (!err->code)
        db_err_set(err, c->err.code, "vae decode: %s", c->err.msg);
out:
    if (sd->vae && (!sd->keep_models || rc)) {
        db_vae_free(sd->vae);
        sd->vae = NULL;
    }
    if (!cpu) {
        db_ctx_free(c, zd);
        db_ctx_free(c, imd);
    }
    free(z);
    return rc;
}

int db_txt2img(db_sd *sd, const db_txt2img_opts *o, int decode, int trace, db_txt2img_out *out, db_err *err)
{
    memset(out, 0, sizeof *out);
    const db_arch *a = &sd->model.arch;
    int f = 1 << (a->vae.nlevels - 1);
    if (o->width <= 0 || o->height <= 0 || o->width % f || o->height % f)
        return db_err_set(err, DB_EUSAGE, "size %dx%d: width and height must be positive multiples of %d", o->width,
                          o->height, f);
    if (o->n_images <= 0 || o->steps <= 0)
        return db_err_set(err, DB_EUSAGE, "need at least one image and one step");
    if (encode_prompts(sd, o, out, err) || sample_latents(sd, o, trace, out, err) ||
        (decode && decode_latents(sd, o, out, err))) {
        db_txt2img_out_free(out);
        return -1;
    }
    return 0;
}

void db_txt2img_out_free(db_txt2img_out *out)
{
    free(out->latents);
    free(out->images);
    free(out->step_latents);
    free(out->prompt_embeds);
    free(out->negative_embeds);
    memset(out, 0, sizeof *out);
}
