/* safetensors: a lazy mmap'd reader that validates the whole header before
 * trusting it, and an atomic streaming writer.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {str: str}}, then the data section.  Offsets are relative
 * to the data section; tensors must tile it exactly (no gaps, no overlap),
 * as the reference implementation requires. */
#ifndef DB_SAFETENSORS_H
#define DB_SAFETENSORS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"
#include "tindex.h"

#define DB_ST_MAX_HEADER (100u << 20) /* same bound as the reference reader */

typedef struct db_safetensors {
    char *path;
    void *map;
    size_t size;
    json_t *metadata; /* "__metadata__" object or NULL */
    db_tsrc src;
} db_safetensors;

/* Validate a header: `buf` holds the first `n` bytes of a file of `file_size`
 * bytes (n must cover 8 + header length).  Adds one entry per tensor to ix
 * with ptr = data_base + begin (data_base may be NULL when only validating)
 * and comp = `comp`; `prefix` (may be NULL) is prepended to each name.
 * *metadata receives a new reference to "__metadata__" (NULL if absent). */
int db_safetensors_parse(const void *buf, size_t n, uint64_t file_size, const unsigned char *data_base,
                         const char *prefix, int comp, db_tindex *ix, json_t **metadata, db_err *err);

/* mmap `path` and add its tensors to ix (see db_safetensors_parse). */
int db_safetensors_open(db_safetensors **out, const char *path, const char *prefix, int comp, db_tindex *ix,
                        db_err *err);
void db_safetensors_close(db_safetensors *st);

/* Does this look like a safetensors file (plausible length + '{')? */
int db_safetensors_probe(const void *head, size_t n, uint64_t file_size);

/* One tensor to write; `fill` produces its bytes (C-contiguous, in dtype). */
typedef struct db_st_item {
    const char *name;
    db_dtype dtype;
    int ndim;
    int64_t shape[DB_MAXDIM];
} db_st_item;

typedef int (*db_st_fill_fn)(void *ctx, size_t i, void *dst, db_err *err);

/* Write items (in the order (dtype size desc, name), like the reference
 * writer) to `path` atomically: temp file, fsync, rename.  meta_kv is a
 * NULL-terminated list of key, value strings for "__metadata__" (may be NULL).
 * fill(ctx, i, dst) is called once per item with a buffer of its size. */
int db_safetensors_write(const char *path, const db_st_item *items, size_t n, const char *const *meta_kv,
                         db_st_fill_fn fill, void *ctx, db_err *err);

#endif
