#include "weights.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int db_weights_load(db_weights *w, const db_model *m, int comp, db_err *err)
{
    memset(w, 0, sizeof *w);
    w->comp = comp;
    db_tindex_init(&w->ix);
    const char *prefix = db_comp_prefix(comp);
    size_t lp = prefix ? strlen(prefix) : 0;
    /* pass 1: the layout */
    for (size_t i = 0; i < m->t.n; i++) {
        const db_tentry *e = &m->t.v[i];
        if (e->comp != comp || !db_dtype_is_float(e->dtype))
            continue;
        db_tentry d = *e;
        d.name = strncmp(e->name, prefix, lp) ? e->name : e->name + lp;
        d.key = (int64_t)i; /* index in m->t, for pass 2 */
        d.offset = (int64_t)w->numel;
        d.dtype = DB_F32;
        d.ptr = NULL;
        d.src = NULL;
        if (db_tindex_add(&w->ix, &d, err))
            goto fail;
        /* keep every tensor 16-float aligned (64 bytes) for vector loads */
        w->numel += ((size_t)db_shape_numel(e->ndim, e->shape) + 15) & ~(size_t)15;
    }
    w->n = w->ix.n;
    if (!w->n) {
        db_err_set(err, DB_EFORMAT, "%s: no %s weights", m->path, db_comp_name(comp));
        goto fail;
    }
    w->data = aligned_alloc(64, (w->numel * sizeof(float) + 63) & ~(size_t)63);
    if (!w->data) {
        db_err_set(err, DB_ENOMEM, "%s: out of memory for %zu %s weights", m->path, w->numel, db_comp_name(comp));
        goto fail;
    }
    /* pass 2: the bytes, converted to fp32 */
    for (size_t k = 0; k < w->ix.n; k++) {
        db_tentry *d = &w->ix.v[k];
        if (db_tindex_read(&m->t, (size_t)d->key, w->data + d->offset, DB_F32, err))
            goto fail;
        db_tindex_release(&m->t, (size_t)d->key);
        /* zero the alignment padding: flat loops (the optimizer, checksums,
         * memcmp of whole buffers) read it, so it must be defined */
        const size_t nk = (size_t)db_shape_numel(d->ndim, d->shape);
        const size_t end = k + 1 < w->ix.n ? (size_t)w->ix.v[k + 1].offset : w->numel;
        memset(w->data + d->offset + nk, 0, (end - (size_t)d->offset - nk) * sizeof(float));
    }
    return 0;
fail:
    db_weights_free(w);
    return -1;
}

/* ctx's device when it is not plain host memory, else NULL (see weights.h). */
static db_ctx *device_of(db_ctx *ctx) { return ctx && ctx->device != DB_CPU ? ctx : NULL; }

int db_weights_to(db_weights *w, db_ctx *ctx, db_err *err)
{
    ctx = device_of(ctx);
    if (!ctx || w->ctx == ctx || !w->data)
        return 0;
    if (w->ctx)
        return db_err_set(err, DB_EUSAGE, "%s weights: already on another device", db_comp_name(w->comp));
    const size_t bytes = w->numel * sizeof(float);
    float *d = db_ctx_alloc(ctx, bytes);
    /* declared as weights: a 16-bit mode keeps one working copy of them */
    if (!d || db_ctx_copy(ctx, d, w->data, bytes, DB_COPY_H2D) || db_ctx_declare_weights(ctx, d, w->numel)) {
        db_err_set(err, ctx->err.code ? ctx->err.code : DB_ENOMEM, "%s weights: to the device: %s",
                   db_comp_name(w->comp), ctx->err.msg);
        db_ctx_free(ctx, d);
        return -1;
    }
    free(w->data); /* the host staging copy */
    w->data = d;
    w->ctx = ctx;
    return 0;
}

int db_weights_load_ctx(db_weights *w, db_ctx *ctx, const db_model *m, int comp, db_err *err)
{
    if (db_weights_load(w, m, comp, err))
        return -1;
    if (db_weights_to(w, ctx, err)) {
        db_weights_free(w);
        return -1;
    }
    return 0;
}

int db_weights_like(db_weights *w, const db_weights *like, db_err *err)
{
    memset(w, 0, sizeof *w);
    w->comp = like->comp;
    db_tindex_init(&w->ix);
    for (size_t k = 0; k < like->ix.n; k++)
        if (db_tindex_add(&w->ix, &like->ix.v[k], err)) {
            db_weights_free(w);
            return -1;
        }
    w->n = like->n;
    w->numel = like->numel;
    if (like->ctx) {
        w->ctx = like->ctx;
        w->data = db_ctx_alloc(w->ctx, w->numel * sizeof(float));
        if (w->data && db_ctx_zero(w->ctx, w->data, w->numel * sizeof(float)) == 0)
            return 0;
        db_err_set(err, w->ctx->err.code ? w->ctx->err.code : DB_ENOMEM, "%zu weights on the device: %s",
                   like->numel, w->ctx->err.msg);
        db_weights_free(w);
        return -1;
    }
    w->data = aligned_alloc(64, (w->numel * sizeof(float) + 63) & ~(size_t)63);
    if (!w->data) {
        db_weights_free(w);
        return db_err_set(err, DB_ENOMEM, "out of memory for %zu weights", like->numel);
    }
    memset(w->data, 0, w->numel * sizeof(float));
    return 0;
}

void db_weights_free(db_weights *w)
{
    if (w->ctx)
        db_ctx_free(w->ctx, w->data);
    else
        free(w->data);
    db_tindex_free(&w->ix);
    memset(w, 0, sizeof *w);
}

float *db_weights_get(const db_weights *w, db_err *err, int64_t numel, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    long k = db_tindex_find(&w->ix, name);
    if (k < 0) {
        db_err_set(err, DB_EFORMAT, "%s: missing tensor '%s'", db_comp_name(w->comp), name);
        return NULL;
    }
    const db_tentry *e = &w->ix.v[k];
    int64_t have = db_shape_numel(e->ndim, e->shape);
    if (numel >= 0 && have != numel) {
        db_err_set(err, DB_EFORMAT, "%s: tensor '%s' has %lld elements, expected %lld", db_comp_name(w->comp), name,
                   (long long)have, (long long)numel);
        return NULL;
    }
    return w->data + e->offset;
}

/* ---- gradient units ---------------------------------------------------------------- */

/* length of the first k dot-separated components of s (all of s when it has fewer) */
static size_t first_parts(const char *s, int k)
{
    size_t i = 0;
    for (; s[i]; i++)
        if (s[i] == '.' && --k == 0)
            return i;
    return i;
}

size_t db_grad_unit_key(int comp, const char *name)
{
    const char *pre = db_comp_prefix(comp);
    const size_t lp = pre ? strlen(pre) : 0;
    const size_t skip = lp && !strncmp(name, pre, lp) ? lp : 0;
    const char *s = name + skip;
    int k;
    if (comp == DB_COMP_UNET)
        k = !strncmp(s, "input_blocks.", 13) || !strncmp(s, "output_blocks.", 14) ? 3
            : !strncmp(s, "middle_block.", 13)                                   ? 2
                                                                                 : 1;
    else if (comp == DB_COMP_TEXT)
        k = !strncmp(s, "text_model.encoder.layers.", 26) ? 4 : 2;
    else
        k = 1;
    const size_t n = first_parts(s, k);
    return n ? skip + n : 0;
}

/* the entry's name is in unit `key` (key without the component prefix) */
static int in_unit(int comp, const char *name, const char *key, size_t lk)
{
    const char *pre = db_comp_prefix(comp);
    const size_t lp = pre ? strlen(pre) : 0;
    const size_t skip = lp && !strncmp(name, pre, lp) ? lp : 0;
    return db_grad_unit_key(comp, name) == skip + lk && !strncmp(name + skip, key, lk);
}

static size_t padded(const db_tentry *e) { return ((size_t)db_shape_numel(e->ndim, e->shape) + 15) & ~(size_t)15; }

int db_weights_span(const db_weights *w, const char *key, db_span *out, db_err *err)
{
    const size_t lk = strlen(key);
    size_t lo = SIZE_MAX, hi = 0, n = 0;
    for (size_t i = 0; i < w->ix.n; i++) {
        const db_tentry *e = &w->ix.v[i];
        if (!in_unit(w->comp, e->name, key, lk))
            continue;
        const size_t a = (size_t)e->offset, b = a + padded(e);
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
        n += (size_t)db_shape_numel(e->ndim, e->shape);
    }
    if (hi == 0)
        return db_err_set(err, DB_EUSAGE, "%s weights: no tensor of %s", db_comp_name(w->comp), key);
    for (size_t i = 0; i < w->ix.n; i++) {
        const db_tentry *e = &w->ix.v[i];
        if ((size_t)e->offset >= lo && (size_t)e->offset < hi && !in_unit(w->comp, e->name, key, lk))
            return db_err_set(err, DB_EUNSUPP, "%s weights: %s lies among the tensors of %s in this layout",
                              db_comp_name(w->comp), e->name, key);
    }
    *out = (db_span){lo, hi, n != hi - lo}; /* (no other tensor inside: the rest is padding) */
    return 0;
}

size_t db_grad_window_floats(int comp, const char *const *names, const size_t *numels, size_t n)
{
    size_t best = 0, run = 0, lk = 0;
    const char *key = NULL;
    for (size_t i = 0; i < n; i++) {
        const size_t l = db_grad_unit_key(comp, names[i]);
        if (!key || l != lk || strncmp(names[i], key, l))
            run = 0, key = names[i], lk = l;
        run += (numels[i] + 15) & ~(size_t)15;
        best = run > best ? run : best;
    }
    return best;
}

size_t db_tentries_window_floats(const db_tentry *v, size_t n, int comp)
{
    const char **names = malloc((n ? n : 1) * sizeof *names);
    size_t *numels = malloc((n ? n : 1) * sizeof *numels), k = 0, r = 0;
    if (names && numels) {
        for (size_t i = 0; i < n; i++) {
            if (v[i].comp != comp || !db_dtype_is_float(v[i].dtype))
                continue;
            names[k] = v[i].name;
            numels[k++] = (size_t)db_shape_numel(v[i].ndim, v[i].shape);
        }
        r = db_grad_window_floats(comp, names, numels, k);
    }
    free(names);
    free(numels);
    return r;
}

size_t db_weights_window_floats(const db_weights *w) { return db_tentries_window_floats(w->ix.v, w->ix.n, w->comp); }

size_t db_tentries_optim_bytes(const db_tentry *v, size_t n, int comp, db_optim_kind kind)
{
    size_t r = 0;
    for (size_t i = 0; i < n; i++)
        if (v[i].comp == comp)
            r += db_optim_state_bytes(kind, (size_t)db_shape_numel(v[i].ndim, v[i].shape));
    return r;
}
