/* Minimal TAP producer for unit tests: each check prints "ok N - what" or
 * "not ok N - what" plus a diagnostic; tap_done() prints the plan and
 * returns the exit status.  Fixtures are found through $TOP (the repo root). */
#ifndef DB_TAP_H
#define DB_TAP_H

#include <stddef.h>

#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"

int tap_ok(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tap_diag(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int tap_done(void);
/* $TOP/rel (or ./rel when TOP is unset); static buffer per call slot. */
const char *tap_path(const char *rel);
/* A fresh temporary directory (removed by tap_done). */
const char *tap_tmpdir(void);

/* Relative L2 error ||got - want|| / ||want|| and the worst element (a NaN
 * counts as the worst; rel is INFINITY then). */
typedef struct tap_cmp {
    double rel, maxabs;
    size_t at;
} tap_cmp;
tap_cmp tap_compare(const float *got, const float *want, size_t n);

/* Reference tensors (tests/data/refs): open a safetensors file under $TOP
 * as an index (the caller frees both with db_tindex_free and
 * db_safetensors_close), and load tensor `name` of it as f32 into t. */
int tap_ref_open(db_tindex *ix, db_safetensors **st, const char *rel, db_err *err);
int tap_ref_get(const db_tindex *ix, const char *name, db_tensor *t, db_err *err);

#endif
