#include "tindex.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void db_tindex_init(db_tindex *ix)
{
    memset(ix, 0, sizeof *ix);
    db_arena_init(&ix->arena, 1 << 16);
}

void db_tindex_free(db_tindex *ix)
{
    free(ix->v);
    free(ix->hash);
    db_arena_free(&ix->arena);
    memset(ix, 0, sizeof *ix);
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static int rehash(db_tindex *ix, size_t cap)
{
    uint32_t *h = calloc(cap, sizeof *h);
    if (!h)
        return -1;
    for (size_t i = 0; i < ix->n; i++) {
        size_t j = hash_str(ix->v[i].name) & (cap - 1);
        while (h[j])
            j = (j + 1) & (cap - 1);
        h[j] = (uint32_t)(i + 1);
    }
    free(ix->hash);
    ix->hash = h;
    ix->hcap = cap;
    return 0;
}

long db_tindex_find(const db_tindex *ix, const char *name)
{
    if (!ix->hcap)
        return -1;
    for (size_t j = hash_str(name) & (ix->hcap - 1);; j = (j + 1) & (ix->hcap - 1)) {
        uint32_t k = ix->hash[j];
        if (!k)
            return -1;
        if (!strcmp(ix->v[k - 1].name, name))
            return (long)k - 1;
    }
}

int db_tindex_add(db_tindex *ix, const db_tentry *e, db_err *err)
{
    if (db_tindex_find(ix, e->name) >= 0)
        return db_err_set(err, DB_EFORMAT, "duplicate tensor name '%s'", e->name);
    if (ix->n >= UINT32_MAX - 1)
        return db_err_set(err, DB_EFORMAT, "too many tensors");
    if (ix->n == ix->cap) {
        size_t cap = ix->cap ? ix->cap * 2 : 256;
        db_tentry *v = realloc(ix->v, cap * sizeof *v);
        if (!v)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        ix->v = v;
        ix->cap = cap;
    }
    db_tentry *d = &ix->v[ix->n];
    *d = *e;
    d->name = db_arena_strdup(&ix->arena, e->name);
    if (!d->name)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    ix->n++;
    if (ix->n * 2 > ix->hcap) {
        if (rehash(ix, ix->hcap ? ix->hcap * 2 : 1024)) {
            ix->n--;
            return db_err_set(err, DB_ENOMEM, "out of memory");
        }
    } else {
        size_t j = hash_str(d->name) & (ix->hcap - 1);
        while (ix->hash[j])
            j = (j + 1) & (ix->hcap - 1);
        ix->hash[j] = (uint32_t)ix->n;
    }
    return 0;
}

int db_tindex_read(const db_tindex *ix, size_t i, void *dst, db_dtype want, db_err *err)
{
    if (i >= ix->n)
        return db_err_set(err, DB_EUSAGE, "tensor index %zu out of range", i);
    const db_tentry *e = &ix->v[i];
    int64_t numel = db_shape_numel(e->ndim, e->shape);
    const void *src = e->ptr;
    void *tmp = NULL;
    if (!src) {
        if (!e->src || !e->src->read)
            return db_err_set(err, DB_EUSAGE, "tensor '%s' has no data source", e->name);
        if (want == e->dtype)
            return e->src->read(e->src, e, dst, err);
        tmp = malloc(e->nbytes ? e->nbytes : 1);
        if (!tmp)
            return db_err_set(err, DB_ENOMEM, "tensor '%s': out of memory", e->name);
        if (e->src->read(e->src, e, tmp, err)) {
            free(tmp);
            return -1;
        }
        src = tmp;
    }
    int rc = db_convert(dst, want, src, e->dtype, (size_t)numel, err);
    free(tmp);
    if (rc)
        db_err_prefix(err, "tensor '%s'", e->name);
    return rc;
}

int db_tindex_load(const db_tindex *ix, size_t i, int want, db_tensor *out, db_err *err)
{
    const db_tentry *e = &ix->v[i];
    db_dtype dt = want < 0 ? e->dtype : (db_dtype)want;
    if (db_tensor_alloc(out, dt, e->ndim, e->shape, err))
        return db_err_prefix(err, "tensor '%s'", e->name);
    if (db_tindex_read(ix, i, out->data, dt, err)) {
        db_tensor_free(out);
        return -1;
    }
    return 0;
}

void db_tindex_truncate(db_tindex *ix, size_t n)
{
    if (n >= ix->n)
        return;
    ix->n = n;
    if (ix->hcap)
        rehash(ix, ix->hcap);
}

void db_tindex_release(const db_tindex *ix, size_t i)
{
    if (i >= ix->n || !ix->v[i].ptr || ix->v[i].nbytes < (1u << 20))
        return;
    /* whole pages strictly inside the tensor; read-only private file
     * mappings simply fault them in again if touched */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)ix->v[i].ptr + page - 1) & ~(page - 1);
    uintptr_t b = ((uintptr_t)ix->v[i].ptr + ix->v[i].nbytes) & ~(page - 1);
    if (b > a)
        madvise((void *)a, b - a, MADV_DONTNEED);
}
