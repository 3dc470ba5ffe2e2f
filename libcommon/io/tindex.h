/* A tensor index: (name, dtype, shape, where the bytes are) for every tensor
 * of a checkpoint, built first; bytes are read later and only on demand
 * (stable-diffusion.cpp's habit).  Readers of all formats fill one of these. */
#ifndef DB_TINDEX_H
#define DB_TINDEX_H

#include <stddef.h>
#include <stdint.h>

#include "../core/arena.h"
#include "../core/err.h"
#include "../core/tensor.h"

typedef struct db_tsrc db_tsrc;
typedef struct db_tentry db_tentry;

/* A source of tensor bytes (an mmap'd safetensors file, a zip member...). */
struct db_tsrc {
    const char *path; /* for error messages */
    /* Copy the entry's bytes, in the entry's dtype, C-contiguous, to dst
     * (entry->nbytes bytes).  NULL when entries carry a direct pointer. */
    int (*read)(db_tsrc *src, const db_tentry *e, void *dst, db_err *err);
    void (*close)(db_tsrc *src);
};

struct db_tentry {
    const char *name; /* owned by the index's arena */
    db_dtype dtype;
    int ndim;
    int64_t shape[DB_MAXDIM];
    uint64_t nbytes;  /* dtype size x numel */
    int comp;         /* model component (db_component in model.h), -1 unknown */
    /* where: either a direct pointer to contiguous bytes (mmap) ... */
    const void *ptr;
    /* ... or a source that reads them; key/offset/strides are the source's */
    db_tsrc *src;
    int64_t key;                   /* e.g. pickle storage key */
    int64_t offset;                /* element offset in that storage */
    int64_t strides[DB_MAXDIM];    /* element strides; all 0 means contiguous */
};

typedef struct db_tindex {
    db_tentry *v;
    size_t n, cap;
    db_arena arena;
    /* open-addressing hash of names -> entry index + 1 (0 = empty) */
    uint32_t *hash;
    size_t hcap;
} db_tindex;

void db_tindex_init(db_tindex *ix);
void db_tindex_free(db_tindex *ix);
/* Append an entry (name copied).  Fails on duplicate names. */
int db_tindex_add(db_tindex *ix, const db_tentry *e, db_err *err);
/* Index of `name`, or -1. */
long db_tindex_find(const db_tindex *ix, const char *name);
/* Read entry i converted to `want` (C-contiguous) into dst, which holds
 * numel * db_dtype_size(want) bytes. */
int db_tindex_read(const db_tindex *ix, size_t i, void *dst, db_dtype want, db_err *err);
/* Read into a freshly allocated tensor of dtype `want`
 * (want < 0: keep the stored dtype). */
int db_tindex_load(const db_tindex *ix, size_t i, int want, db_tensor *out, db_err *err);
/* Tell the kernel the bytes of entry i (when mmap'd) are not needed for
 * now, so reading a whole large checkpoint once does not pin it in RSS. */
void db_tindex_release(const db_tindex *ix, size_t i);
/* Drop entries n.. (their names stay in the arena until free). */
void db_tindex_truncate(db_tindex *ix, size_t n);

#endif
