/* Training checkpoints (see train_ckpt.h). */
#include "train_ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "libcommon/core/fsutil.h"
#include "libcommon/io/json.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/arch.h"

/* ---- writing ---------------------------------------------------------------- */

typedef struct group {
    const db_weights *w;
    const char *prefix;    /* component prefix of the CompVis names */
    const char *kind;      /* "" (weights), "exp_avg/", "exp_avg_sq/" */
} group;

/* A group with 8-bit AdamW moments: w gives the names and shapes. */
typedef struct q8group {
    const db_weights *w;
    const db_q8_state *q;
    const char *prefix;
} q8group;

/* Where an item's bytes come from: src on ctx's device (NULL: host). */
typedef struct wsrc {
    const void *src;
    db_ctx *ctx;
    size_t bytes;
} wsrc;

typedef struct wjob {
    group g[6];
    int ng;
    q8group q[2];
    int nq;
    db_st_item *items;
    wsrc *src;
    char **names;
    size_t n, cap;
} wjob;

static int fill(void *ctx, size_t i, void *dst, db_err *err)
{
    const wjob *j = ctx;
    const wsrc *s = &j->src[i];
    if (!s->ctx) { /* host (CPU) buffers */
        memcpy(dst, s->src, s->bytes);
        return 0;
    }
    /* device buffers: the writer's buffer is host memory */
    if (db_ctx_copy(s->ctx, dst, s->src, s->bytes, DB_COPY_D2H))
        return db_err_set(err, s->ctx->err.code, "%s", s->ctx->err.msg);
    return 0;
}

static void wjob_free(wjob *j)
{
    for (size_t i = 0; i < j->n; i++)
        free(j->names[i]);
    free(j->names);
    free(j->items);
    free(j->src);
}

/* Append item kind + prefix + name (dtype, shape) read from src. */
static int wjob_add(wjob *j, const char *kind, const char *prefix, const char *name, db_dtype dt, int ndim,
                    const int64_t *shape, const void *src, db_ctx *ctx, db_err *err)
{
    if (j->n == j->cap) {
        const size_t cap = j->cap ? 2 * j->cap : 256;
        db_st_item *it = realloc(j->items, cap * sizeof *it);
        if (it)
            j->items = it;
        wsrc *sr = it ? realloc(j->src, cap * sizeof *sr) : NULL;
        if (sr)
            j->src = sr;
        char **nm = sr ? realloc(j->names, cap * sizeof *nm) : NULL;
        if (!nm)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        j->names = nm;
        j->cap = cap;
    }
    const size_t len = strlen(kind) + strlen(prefix) + strlen(name) + 1;
    char *nm = malloc(len);
    if (!nm)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    snprintf(nm, len, "%s%s%s", kind, prefix, name);
    db_st_item *it = &j->items[j->n];
    memset(it, 0, sizeof *it);
    it->name = nm;
    it->dtype = dt;
    it->ndim = ndim;
    memcpy(it->shape, shape, (size_t)ndim * sizeof *shape);
    j->src[j->n] = (wsrc){src, ctx, (size_t)db_shape_numel(ndim, shape) * db_dtype_size(dt)};
    j->names[j->n++] = nm;
    return 0;
}

/* 8-bit moments of one tensor: exp_avg.q8/NAME and exp_avg_sq.q8/NAME
 * (uint8 codes, the tensor's shape), exp_avg.absmax/NAME and
 * exp_avg_sq.absmax/NAME (float32 block scales, (ceil(n / 256))); a tensor
 * under DB_Q8_MIN_SIZE elements keeps float32 exp_avg/NAME and
 * exp_avg_sq/NAME as AdamW's. */
static int wjob_q8(wjob *j, const q8group *g, db_err *err)
{
    const db_q8_state *q = g->q;
    for (size_t k = 0; k < g->w->ix.n; k++) {
        const db_tentry *e = &g->w->ix.v[k];
        const db_q8_tensor *t = &q->t[k];
        if (!t->q8) {
            if (wjob_add(j, "exp_avg/", g->prefix, e->name, DB_F32, e->ndim, e->shape, q->m32 + t->off, q->ctx, err) ||
                wjob_add(j, "exp_avg_sq/", g->prefix, e->name, DB_F32, e->ndim, e->shape, q->v32 + t->off, q->ctx,
                         err))
                return -1;
            continue;
        }
        const int64_t nb[1] = {(int64_t)((t->n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK)};
        if (wjob_add(j, "exp_avg.q8/", g->prefix, e->name, DB_U8, e->ndim, e->shape, q->m_q + t->off, q->ctx, err) ||
            wjob_add(j, "exp_avg.absmax/", g->prefix, e->name, DB_F32, 1, nb, q->m_absmax + t->boff, q->ctx, err) ||
            wjob_add(j, "exp_avg_sq.q8/", g->prefix, e->name, DB_U8, e->ndim, e->shape, q->v_q + t->off, q->ctx,
                     err) ||
            wjob_add(j, "exp_avg_sq.absmax/", g->prefix, e->name, DB_F32, 1, nb, q->v_absmax + t->boff, q->ctx, err))
            return -1;
    }
    return 0;
}

/* Write the groups of j into path as one safetensors file. */
static int write_groups(wjob *j, const char *path, const char *const *meta, db_err *err)
{
    for (int g = 0; g < j->ng; g++) {
        const db_weights *w = j->g[g].w;
        for (size_t t = 0; t < w->ix.n; t++) {
            const db_tentry *e = &w->ix.v[t];
            if (wjob_add(j, j->g[g].kind, j->g[g].prefix, e->name, DB_F32, e->ndim, e->shape, w->data + e->offset,
                         w->ctx, err))
                return -1;
        }
    }
    for (int g = 0; g < j->nq; g++)
        if (wjob_q8(j, &j->q[g], err))
            return -1;
    return db_safetensors_write(path, j->items, j->n, meta, fill, j, err);
}

static int write_json(const char *path, const json_t *v, db_err *err)
{
    char *s = json_dumps(v, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    if (!s)
        return db_err_set(err, DB_ENOMEM, "%s: cannot serialise", path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int rc = fd < 0 ? db_err_errno(err, path) : db_write_all(fd, s, strlen(s), err);
    rc = rc ? rc : db_write_all(fd, "\n", 1, err);
    if (!rc && fsync(fd))
        rc = db_err_errno(err, path);
    if (fd >= 0 && close(fd) && !rc)
        rc = db_err_errno(err, path);
    free(s);
    return rc;
}

int db_train_ckpt_save(const char *run_dir, const db_train_state *st, const char *base_hash, json_t *state,
                       const json_t *config, char **out_path, db_err *err)
{
    char name[64], stepbuf[32];
    snprintf(name, sizeof name, "ckpt-%06" PRId64, st->step);
    snprintf(stepbuf, sizeof stepbuf, "%" PRId64, st->step);
    char *final = db_path_join(run_dir, name);
    db_outfile o = {0};
    int rc = -1;
    char *p = NULL;
    if (!final) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    /* A checkpoint of this step may exist (a run resumed from an older one
     * reaches it again): it is written aside and swapped in below, so some
     * complete ckpt-<step> exists at every moment but between two renames,
     * and even then the old one is whole under its .replaced name. */
    char *aside = NULL;
    if (db_exists(final)) {
        size_t n = strlen(final) + 16;
        if (!(aside = malloc(n))) {
            db_err_set(err, DB_ENOMEM, "out of memory");
            goto out;
        }
        snprintf(aside, n, "%s.replaced", final);
        db_rm_rf(aside);
        if (rename(final, aside)) {
            db_err_errno(err, final);
            free(aside);
            goto out;
        }
    }
    int opened = db_outdir_open(&o, final, err) == 0;
    if (!opened && aside && rename(aside, final) == 0) { /* put the old one back */
        free(aside);
        aside = NULL;
    }
    if (!opened) {
        free(aside);
        goto out;
    }
    const char *up = db_comp_prefix(DB_COMP_UNET), *tp = db_comp_prefix(DB_COMP_TEXT);
    const char *oname = db_optim_name(st->optimizer);
    const char *meta[] = {"format", DB_CKPT_FORMAT, "step", stepbuf, "base_model_hash", base_hash ? base_hash : "",
                          NULL};
    const char *ometa[] = {"format", DB_CKPT_FORMAT, "step", stepbuf, "base_model_hash", base_hash ? base_hash : "",
                           "optimizer", oname, NULL};
    wjob wm = {.ng = 0}, wo = {.ng = 0};
    wm.g[wm.ng++] = (group){st->unet, up, ""};
    if (st->unet_q8)
        wo.q[wo.nq++] = (q8group){st->unet, st->unet_q8, up};
    else {
        wo.g[wo.ng++] = (group){st->unet_m, up, "exp_avg/"};
        wo.g[wo.ng++] = (group){st->unet_v, up, "exp_avg_sq/"};
    }
    if (st->text) {
        wm.g[wm.ng++] = (group){st->text, tp, ""};
        if (st->text_q8)
            wo.q[wo.nq++] = (q8group){st->text, st->text_q8, tp};
        else {
            wo.g[wo.ng++] = (group){st->text_m, tp, "exp_avg/"};
            wo.g[wo.ng++] = (group){st->text_v, tp, "exp_avg_sq/"};
        }
    }
    json_object_set_new(state, "format", json_string(DB_CKPT_FORMAT));
    json_object_set_new(state, "version", json_integer(1));
    json_object_set_new(state, "step", json_integer(st->step));
    /* the counters a resume needs beside the step (train.h: skipped fp16
     * steps advance step but not optimizer_step) */
    json_object_set_new(state, "optimizer_step", json_integer(st->opt_step));
    if (st->loss_scale > 0) {
        json_object_set_new(state, "loss_scale", json_real(st->loss_scale));
        json_object_set_new(state, "growth_tracker", json_integer(st->growth_tracker));
    } else {
        json_object_del(state, "loss_scale");
        json_object_del(state, "growth_tracker");
    }
    json_object_set_new(state, "train_text_encoder", json_boolean(st->text != NULL));
    json_object_set_new(state, "optimizer", json_string(oname));
    if (base_hash)
        json_object_set_new(state, "base_model_hash", json_string(base_hash));
    int w1 = (p = db_path_join(o.tmp_path, "model.safetensors")) && !write_groups(&wm, p, meta, err);
    free(p);
    int w2 = w1 && (p = db_path_join(o.tmp_path, "optimizer.safetensors")) && !write_groups(&wo, p, ometa, err);
    if (w1)
        free(p);
    int w3 = w2 && (p = db_path_join(o.tmp_path, "config.json")) && !write_json(p, config, err);
    if (w2)
        free(p);
    /* state.json last: its presence marks a complete checkpoint even inside
     * the temporary directory */
    int w4 = w3 && (p = db_path_join(o.tmp_path, "state.json")) && !write_json(p, state, err);
    if (w3)
        free(p);
    wjob_free(&wm);
    wjob_free(&wo);
    if (!w4) {
        if (!err->code)
            db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (db_fsync_path(o.tmp_path, 1, err) || db_outfile_commit(&o, err)) {
        if (aside && !db_exists(final))
            rename(aside, final);
        free(aside);
        goto out;
    }
    if (aside)
        db_rm_rf(aside);
    free(aside);
    if (out_path)
        *out_path = final, final = NULL;
    rc = 0;
out:
    if (rc) {
        db_outfile_abort(&o);
        db_err_prefix(err, "checkpoint %s/%s", run_dir, name);
    }
    free(o.final_path);
    free(o.tmp_path);
    free(final);
    return rc;
}

/* ---- writing in the background ------------------------------------------------- */

struct db_ckpt_writer {
    pthread_t th;
    char *run_dir, *base_hash;
    json_t *state, *config;
    db_train_state st;                 /* pointing at the copies below */
    db_weights w[6];                   /* unet, unet_m, unet_v, text, text_m, text_v (data: host copies) */
    db_q8_state q[2];                  /* unet_q8, text_q8 (buffers: host copies) */
    db_ckpt_stage *stage;              /* the copies' memory when it was free, else NULL (malloc'd) */
    int rc;
    char *path;
    db_err err;
};

struct db_ckpt_stage {
    db_ctx *ctx;
    size_t bytes;
    pthread_t th;
    int joined;
    char *mem;  /* NULL: the allocation failed (writers malloc) */
    int pinned; /* mem from db_ctx_host_alloc, else malloc'd */
    int busy;   /* a writer's copies are in it */
};

enum { PIECE_ALIGN = 256 };

static size_t piece(size_t n) { return ((n ? n : 1) + PIECE_ALIGN - 1) / PIECE_ALIGN * PIECE_ALIGN; }

size_t db_ckpt_copy_bytes(const db_train_state *st)
{
    size_t b = 0;
    const db_weights *ws[6] = {st->unet, st->unet_m, st->unet_v, st->text, st->text_m, st->text_v};
    for (int i = 0; i < 6; i++)
        b += ws[i] ? piece(ws[i]->numel * sizeof(float)) : 0;
    const db_q8_state *qs[2] = {st->unet_q8, st->text_q8};
    for (int i = 0; i < 2; i++)
        if (qs[i])
            b += 2 * (piece(qs[i]->ncodes) + piece(qs[i]->nblocks * sizeof(float)) +
                      piece(qs[i]->nsmall * sizeof(float)));
    return b;
}

static void *stage_main(void *arg)
{
    db_ckpt_stage *s = arg;
    if ((s->mem = db_ctx_host_alloc(s->ctx, s->bytes)) != NULL)
        s->pinned = 1;
    else if ((s->mem = malloc(s->bytes)) != NULL)
        memset(s->mem, 0, s->bytes); /* its page faults now, not in the copy a step waits for */
    return NULL;
}

int db_ckpt_stage_start(db_ckpt_stage **out, db_ctx *ctx, size_t bytes, db_err *err)
{
    db_ckpt_stage *s = calloc(1, sizeof *s);
    if (!s)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    s->ctx = ctx;
    s->bytes = bytes ? bytes : 1;
    const int rc = pthread_create(&s->th, NULL, stage_main, s);
    if (rc) {
        free(s);
        errno = rc;
        return db_err_errno(err, "checkpoint stage thread");
    }
    *out = s;
    return 0;
}

static void stage_join(db_ckpt_stage *s)
{
    if (!s->joined)
        pthread_join(s->th, NULL), s->joined = 1;
}

int db_ckpt_stage_pinned(db_ckpt_stage *s)
{
    stage_join(s);
    return s->pinned;
}

void db_ckpt_stage_free(db_ckpt_stage *s)
{
    if (!s)
        return;
    stage_join(s);
    if (s->pinned)
        db_ctx_host_free(s->ctx, s->mem);
    else
        free(s->mem);
    free(s);
}

/* Where a writer's copies go: the stage's memory, or malloc for each. */
typedef struct arena {
    char *base;
    size_t cap, used;
} arena;

/* *out = host copy of n bytes of src (on ctx's device; NULL: host), in a's
 * memory while it lasts, then malloc'd.  *out is set whenever memory was
 * taken, also when the copy then fails (the writer frees it). */
static int host_copy(db_ctx *ctx, const void *src, size_t n, arena *a, void *out, db_err *err)
{
    void *d;
    if (a->base && a->cap - a->used >= piece(n)) {
        d = a->base + a->used;
        a->used += piece(n);
    } else if (!(d = malloc(n ? n : 1)))
        return db_err_set(err, DB_ENOMEM, "out of memory for a %zu MiB checkpoint copy", n >> 20);
    memcpy(out, &d, sizeof d);
    if (!ctx)
        memcpy(d, src, n);
    else if (db_ctx_copy(ctx, d, src, n, DB_COPY_D2H))
        return db_err_set(err, ctx->err.code, "checkpoint copy: %s", ctx->err.msg);
    return 0;
}

/* *dst = w with its data copied to the host (the index shared, not owned). */
static int snap_weights(db_weights *dst, const db_weights *w, db_weights **out, arena *a, db_err *err)
{
    *out = NULL;
    if (!w)
        return 0;
    *dst = *w;
    dst->ctx = NULL;
    dst->data = NULL;
    *out = dst;
    return host_copy(w->ctx, w->data, w->numel * sizeof(float), a, &dst->data, err);
}

static int snap_q8(db_q8_state *dst, const db_q8_state *q, db_q8_state **out, arena *a, db_err *err)
{
    *out = NULL;
    if (!q)
        return 0;
    *dst = *q;
    dst->ctx = NULL;
    dst->m_q = dst->v_q = NULL;
    dst->m_absmax = dst->v_absmax = dst->m32 = dst->v32 = NULL;
    *out = dst;
    return host_copy(q->ctx, q->m_q, q->ncodes, a, &dst->m_q, err) ||
                   host_copy(q->ctx, q->v_q, q->ncodes, a, &dst->v_q, err) ||
                   host_copy(q->ctx, q->m_absmax, q->nblocks * sizeof(float), a, &dst->m_absmax, err) ||
                   host_copy(q->ctx, q->v_absmax, q->nblocks * sizeof(float), a, &dst->v_absmax, err) ||
                   host_copy(q->ctx, q->m32, q->nsmall * sizeof(float), a, &dst->m32, err) ||
                   host_copy(q->ctx, q->v32, q->nsmall * sizeof(float), a, &dst->v32, err)
               ? -1
               : 0;
}

/* free p unless the stage's memory holds it */
static void copy_free(const db_ckpt_stage *s, void *p)
{
    if (!s || (char *)p < s->mem || (char *)p >= s->mem + s->bytes)
        free(p);
}

static void writer_free(db_ckpt_writer *w)
{
    for (int i = 0; i < 6; i++)
        copy_free(w->stage, w->w[i].data);
    for (int i = 0; i < 2; i++) {
        void *q[6] = {w->q[i].m_q, w->q[i].v_q, w->q[i].m_absmax, w->q[i].v_absmax, w->q[i].m32, w->q[i].v32};
        for (int k = 0; k < 6; k++)
            copy_free(w->stage, q[k]);
    }
    if (w->stage)
        w->stage->busy = 0;
    json_decref(w->state);
    json_decref(w->config);
    free(w->run_dir);
    free(w->base_hash);
    free(w->path);
    free(w);
}

static void *writer_main(void *arg)
{
    db_ckpt_writer *w = arg;
    w->rc = db_train_ckpt_save(w->run_dir, &w->st, w->base_hash, w->state, w->config, &w->path, &w->err);
    return NULL;
}

int db_ckpt_writer_start(db_ckpt_writer **out, const char *run_dir, const db_train_state *st, const char *base_hash,
                         const json_t *state, const json_t *config, db_ckpt_stage *stage, db_err *err)
{
    *out = NULL;
    db_ckpt_writer *w = calloc(1, sizeof *w);
    if (!w)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    w->st = *st;
    arena a = {0};
    if (stage && !stage->busy) { /* (busy: a writer not joined yet still reads it) */
        stage_join(stage);
        if (stage->mem) {
            stage->busy = 1;
            w->stage = stage;
            a = (arena){stage->mem, stage->bytes, 0};
        }
    }
    db_weights **ws[6] = {&w->st.unet, &w->st.unet_m, &w->st.unet_v, &w->st.text, &w->st.text_m, &w->st.text_v};
    const db_weights *src[6] = {st->unet, st->unet_m, st->unet_v, st->text, st->text_m, st->text_v};
    int rc = !(w->run_dir = strdup(run_dir)) || (base_hash && !(w->base_hash = strdup(base_hash))) ||
                     !(w->state = json_deep_copy(state)) || !(w->config = json_deep_copy(config))
                 ? db_err_set(err, DB_ENOMEM, "out of memory")
                 : 0;
    for (int i = 0; rc == 0 && i < 6; i++)
        rc = snap_weights(&w->w[i], src[i], ws[i], &a, err);
    if (rc == 0)
        rc = snap_q8(&w->q[0], st->unet_q8, &w->st.unet_q8, &a, err) ||
             snap_q8(&w->q[1], st->text_q8, &w->st.text_q8, &a, err);
    w->st.text_frozen = NULL; /* not written */
    if (rc == 0 && (rc = pthread_create(&w->th, NULL, writer_main, w)) != 0) {
        errno = rc;
        rc = db_err_errno(err, "checkpoint writer thread");
    }
    if (rc) {
        writer_free(w);
        return db_err_prefix(err, "checkpoint %s", run_dir);
    }
    *out = w;
    return 0;
}

int db_ckpt_writer_staged(const db_ckpt_writer *w) { return w->stage != NULL; }

int db_ckpt_writer_join(db_ckpt_writer *w, char **out_path, db_err *err)
{
    if (out_path)
        *out_path = NULL;
    if (!w)
        return 0;
    pthread_join(w->th, NULL);
    const int rc = w->rc;
    if (rc)
        *err = w->err;
    else if (out_path)
        *out_path = w->path, w->path = NULL;
    writer_free(w);
    return rc ? -1 : 0;
}

/* ---- reading ---------------------------------------------------------------- */

/* Read tensor kind + prefix + name of ix, which must have shape (ndim,
 * shape) (and, for uint8 codes, be stored as uint8: nothing converts to
 * codes), into dst on ctx's device (NULL: host). */
static int read_one(const db_tindex *ix, const char *file, const char *kind, const char *prefix, const char *ename,
                    db_dtype dt, int ndim, const int64_t *shape, void *dst, db_ctx *ctx, db_err *err)
{
    char name[512];
    snprintf(name, sizeof name, "%s%s%s", kind, prefix, ename);
    long k = db_tindex_find(ix, name);
    if (k < 0)
        return db_err_set(err, DB_EFORMAT, "%s: no tensor '%s'", file, name);
    const db_tentry *f = &ix->v[k];
    if (f->ndim != ndim || memcmp(f->shape, shape, (size_t)ndim * sizeof *shape))
        return db_err_set(err, DB_EFORMAT, "%s: '%s' has another shape than the model's", file, name);
    if (dt == DB_U8 && f->dtype != DB_U8)
        return db_err_set(err, DB_EFORMAT, "%s: '%s' is %s, not uint8 codes", file, name, db_dtype_name(f->dtype));
    if (!ctx) { /* host (CPU) buffers: straight in */
        if (db_tindex_read(ix, (size_t)k, dst, dt, err))
            return db_err_prefix(err, "%s", file);
        return 0;
    }
    /* device buffers: through a host copy of the one tensor */
    const size_t bytes = (size_t)db_shape_numel(ndim, shape) * db_dtype_size(dt);
    void *h = malloc(bytes ? bytes : 1);
    if (!h)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory for '%s'", file, name);
    int rc = db_tindex_read(ix, (size_t)k, h, dt, err);
    if (!rc && db_ctx_copy(ctx, dst, h, bytes, DB_COPY_H2D))
        rc = db_err_set(err, ctx->err.code, "%s", ctx->err.msg);
    free(h);
    return rc ? db_err_prefix(err, "%s", file) : 0;
}

/* Read group (w, prefix, kind) from ix; every tensor must be there. */
static int read_group(const db_tindex *ix, const char *file, const db_weights *w, const char *prefix,
                      const char *kind, db_err *err)
{
    for (size_t t = 0; t < w->ix.n; t++) {
        const db_tentry *e = &w->ix.v[t];
        if (read_one(ix, file, kind, prefix, e->name, DB_F32, e->ndim, e->shape, w->data + e->offset, w->ctx, err))
            return -1;
    }
    return 0;
}

/* Read the 8-bit moments of weights w (wjob_q8's names) into q. */
static int read_q8(const db_tindex *ix, const char *file, const db_weights *w, const db_q8_state *q,
                   const char *prefix, db_err *err)
{
    for (size_t k = 0; k < w->ix.n; k++) {
        const db_tentry *e = &w->ix.v[k];
        const db_q8_tensor *t = &q->t[k];
        int rc;
        if (!t->q8)
            rc = read_one(ix, file, "exp_avg/", prefix, e->name, DB_F32, e->ndim, e->shape, q->m32 + t->off,
                          q->ctx, err) ||
                 read_one(ix, file, "exp_avg_sq/", prefix, e->name, DB_F32, e->ndim, e->shape, q->v32 + t->off,
                          q->ctx, err);
        else {
            const int64_t nb[1] = {(int64_t)((t->n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK)};
            rc = read_one(ix, file, "exp_avg.q8/", prefix, e->name, DB_U8, e->ndim, e->shape, q->m_q + t->off,
                          q->ctx, err) ||
                 read_one(ix, file, "exp_avg.absmax/", prefix, e->name, DB_F32, 1, nb, q->m_absmax + t->boff,
                          q->ctx, err) ||
                 read_one(ix, file, "exp_avg_sq.q8/", prefix, e->name, DB_U8, e->ndim, e->shape, q->v_q + t->off,
                          q->ctx, err) ||
                 read_one(ix, file, "exp_avg_sq.absmax/", prefix, e->name, DB_F32, 1, nb, q->v_absmax + t->boff,
                          q->ctx, err);
        }
        if (rc)
            return -1;
    }
    return 0;
}

int db_train_ckpt_load(const char *ckpt_dir, const db_train_state *st, json_t **state, json_t **config,
                       db_err *err)
{
    *state = *config = NULL;
    char *ps = db_path_join(ckpt_dir, "state.json"), *pc = db_path_join(ckpt_dir, "config.json");
    char *pm = db_path_join(ckpt_dir, "model.safetensors"), *po = db_path_join(ckpt_dir, "optimizer.safetensors");
    db_tindex mix, oix;
    db_tindex_init(&mix);
    db_tindex_init(&oix);
    db_safetensors *ms = NULL, *os = NULL;
    int rc = -1;
    if (!ps || !pc || !pm || !po) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    int64_t step;
    if (db_train_ckpt_state(ckpt_dir, state, &step, err) || !(*config = db_json_load_object(pc, err)))
        goto out;
    const int text_in_file = json_is_true(json_object_get(*state, "train_text_encoder"));
    if (text_in_file != (st->text != NULL)) {
        db_err_set(err, DB_EUSAGE, "%s: the checkpoint was made %s the text encoder, this run %s it", ps,
                   text_in_file ? "training" : "without training", st->text ? "trains" : "does not train");
        goto out;
    }
    /* the moments of one optimizer do not convert into the other's: a
     * checkpoint without "optimizer" is from before there was a choice */
    const char *ofile = json_string_value(json_object_get(*state, "optimizer"));
    if (!ofile)
        ofile = db_optim_name(DB_OPTIM_ADAMW);
    if (strcmp(ofile, db_optim_name(st->optimizer)) != 0) {
        db_err_set(err, DB_EUSAGE, "%s: the checkpoint was made with --optimizer %s, this run uses %s: its "
                   "optimizer state does not convert; resume with --optimizer %s, or start a new run (-o)",
                   ps, ofile, db_optim_name(st->optimizer), ofile);
        goto out;
    }
    if (db_safetensors_open(&ms, pm, NULL, -1, &mix, err) || db_safetensors_open(&os, po, NULL, -1, &oix, err))
        goto out;
    const char *up = db_comp_prefix(DB_COMP_UNET), *tp = db_comp_prefix(DB_COMP_TEXT);
    if (read_group(&mix, pm, st->unet, up, "", err) ||
        (st->unet_q8 ? read_q8(&oix, po, st->unet, st->unet_q8, up, err)
                     : read_group(&oix, po, st->unet_m, up, "exp_avg/", err) ||
                           read_group(&oix, po, st->unet_v, up, "exp_avg_sq/", err)))
        goto out;
    if (st->text && (read_group(&mix, pm, st->text, tp, "", err) ||
                     (st->text_q8 ? read_q8(&oix, po, st->text, st->text_q8, tp, err)
                                  : read_group(&oix, po, st->text_m, tp, "exp_avg/", err) ||
                                        read_group(&oix, po, st->text_v, tp, "exp_avg_sq/", err))))
        goto out;
    rc = 0;
out:
    if (rc) {
        json_decref(*state);
        json_decref(*config);
        *state = *config = NULL;
    }
    db_safetensors_close(ms);
    db_safetensors_close(os);
    db_tindex_free(&mix);
    db_tindex_free(&oix);
    free(ps), free(pc), free(pm), free(po);
    return rc;
}

int db_train_ckpt_is(const char *path)
{
    char *p = db_path_join(path, "state.json");
    int r = p && db_exists(p);
    free(p);
    return r;
}

/* Step of a directory entry named ckpt-<digits>, or -1. */
static int64_t ckpt_step(const char *name)
{
    if (strncmp(name, "ckpt-", 5) != 0 || !name[5])
        return -1;
    int64_t s = 0;
    for (const char *c = name + 5; *c; c++) {
        if (*c < '0' || *c > '9' || s > INT64_MAX / 10 - 10)
            return -1;
        s = s * 10 + (*c - '0');
    }
    return s;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int db_train_ckpt_list(const char *run_dir, int64_t **steps, size_t *n, db_err *err)
{
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(run_dir);
    if (!d)
        return db_err_errno(err, run_dir);
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const int64_t st = ckpt_step(e->d_name);
        char *p = st < 0 ? NULL : db_path_join(run_dir, e->d_name);
        const int dir = p && db_is_dir(p);
        free(p);
        if (!dir)
            continue;
        if (*n == cap) {
            int64_t *t = realloc(*steps, (cap = cap ? 2 * cap : 16) * sizeof *t);
            if (!t) {
                closedir(d);
                free(*steps);
                *steps = NULL;
                *n = 0;
                return db_err_set(err, DB_ENOMEM, "out of memory");
            }
            *steps = t;
        }
        (*steps)[(*n)++] = st;
    }
    closedir(d);
    if (*n)
        qsort(*steps, *n, sizeof **steps, cmp_i64);
    return 0;
}

char *db_train_ckpt_path(const char *run_dir, int64_t step)
{
    char name[32];
    snprintf(name, sizeof name, "ckpt-%06" PRId64, step);
    return db_path_join(run_dir, name);
}

int db_train_ckpt_state(const char *ckpt_dir, json_t **state, int64_t *step, db_err *err)
{
    *state = NULL;
    char *p = db_path_join(ckpt_dir, "state.json");
    json_t *s = p ? db_json_load_object(p, err) : NULL;
    if (!p)
        db_err_set(err, DB_ENOMEM, "out of memory");
    if (!s) {
        free(p);
        return -1;
    }
    const char *fmt = json_string_value(json_object_get(s, "format"));
    json_t *st = json_object_get(s, "step");
    if (!fmt || strcmp(fmt, DB_CKPT_FORMAT)) {
        db_err_set(err, DB_EFORMAT, "%s: \"format\" is %s%s%s, not \"" DB_CKPT_FORMAT "\"", p, fmt ? "\"" : "",
                   fmt ? fmt : "missing", fmt ? "\"" : "");
    } else if (!json_is_integer(st) || json_integer_value(st) < 0) {
        db_err_set(err, DB_EFORMAT, "%s: \"step\" is %s, not a step count", p,
                   st ? db_json_type_name(st) : "missing");
    } else {
        *state = s;
        *step = json_integer_value(st);
        free(p);
        return 0;
    }
    json_decref(s);
    free(p);
    return -1;
}

int db_train_ckpt_complete(const char *ckpt_dir, json_t **state, int64_t *step, db_err *err)
{
    if (db_train_ckpt_state(ckpt_dir, state, step, err))
        return -1;
    char *m = db_path_join(ckpt_dir, "model.safetensors");
    const int ok = m && db_exists(m);
    free(m);
    if (ok)
        return 0;
    json_decref(*state);
    *state = NULL;
    return db_err_set(err, DB_EFORMAT, "%s: no model.safetensors", ckpt_dir);
}

int db_train_ckpt_latest(const char *run_dir, char **path, int64_t *step, db_err *err)
{
    *path = NULL;
    int64_t *steps;
    size_t n;
    if (db_train_ckpt_list(run_dir, &steps, &n, err))
        return -1;
    for (size_t i = n; i-- > 0 && !*path;) {
        char *dir = db_train_ckpt_path(run_dir, steps[i]);
        json_t *state = NULL;
        int64_t st;
        db_err why = {0};
        if (dir && db_train_ckpt_complete(dir, &state, &st, &why) == 0) {
            *path = dir, dir = NULL;
            if (step)
                *step = st;
        }
        json_decref(state);
        free(dir);
    }
    free(steps);
    return 0;
}

void db_train_ckpt_prune(const char *run_dir, int keep, const db_log *lg)
{
    DIR *d = opendir(run_dir);
    if (!d)
        return;
    struct dirent *e;
    char buf[320];
    while ((e = readdir(d))) {
        const size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, ".ckpt-", 6) == 0 || strncmp(e->d_name, ".config.json.tmp-", 17) == 0 ||
            (strncmp(e->d_name, "ckpt-", 5) == 0 && len > 9 && strcmp(e->d_name + len - 9, ".replaced") == 0)) {
            /* an interrupted write */
            snprintf(buf, sizeof buf, "%s/%s", run_dir, e->d_name);
            db_info(lg, "removing %s (an interrupted checkpoint write)", buf);
            db_rm_rf(buf);
        }
    }
    closedir(d);
    int64_t *steps;
    size_t n;
    db_err err = {0};
    if (keep <= 0 || db_train_ckpt_list(run_dir, &steps, &n, &err))
        return;
    for (size_t i = 0; i + (size_t)keep < n; i++) {
        char *p = db_train_ckpt_path(run_dir, steps[i]);
        if (p) {
            db_info(lg, "removing %s (--keep-last %d)", p, keep);
            db_rm_rf(p);
        }
        free(p);
    }
    free(steps);
}

int db_train_ckpt_restore_counters(const json_t *state, db_trainer *t, db_err *err)
{
    const json_t *js = json_object_get(state, "step"), *jo = json_object_get(state, "optimizer_step"),
                 *jl = json_object_get(state, "loss_scale"), *jg = json_object_get(state, "growth_tracker");
    if (!json_is_integer(js) || (jo && !json_is_integer(jo)) || (jl && !json_is_number(jl)) ||
        (jg && !json_is_integer(jg)))
        return db_err_set(err, DB_EFORMAT, "state.json: \"step\", \"optimizer_step\", \"loss_scale\" or "
                          "\"growth_tracker\" is not a number");
    const int64_t step = json_integer_value(js);
    db_trainer_set_step(t, step);
    /* checkpoints from before loss scaling: every step was an update */
    return db_trainer_set_amp(t, jo ? json_integer_value(jo) : step, jl ? json_number_value(jl) : 0,
                              jg ? json_integer_value(jg) : 0, err);
}
