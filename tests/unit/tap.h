/* Minimal TAP producer for unit tests: each check prints "ok N - what" or
 * "not ok N - what" plus a diagnostic; tap_done() prints the plan and
 * returns the exit status.  Fixtures are found through $TOP (the repo root). */
#ifndef DB_TAP_H
#define DB_TAP_H

#include <stddef.h>

#include "kernels/ops.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/train.h"

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

/* The reference training batches of tests/data/refs/train_steps.safetensors
 * (diffusers' three DreamBooth steps; test_train.c, test_train_amp.c): the
 * instance posterior, per step the posterior draw, the noise and the
 * timesteps, and the two prompts' token ids.  B, C, H, W: the latents'. */
enum { TAP_TRAIN_REF_STEPS = 3 };
typedef struct tap_train_ref {
    db_tensor mean, logvar, eps[TAP_TRAIN_REF_STEPS], noise[TAP_TRAIN_REF_STEPS], ts[TAP_TRAIN_REF_STEPS];
    int32_t ids[2 * 77];
    int B, C, H, W;
} tap_train_ref;
int tap_train_ref_load(const db_tindex *ix, tap_train_ref *in, db_err *err);
/* The trainer tests' fixture: the reference batches above and the tiny
 * model (its diffusers folder), each with a tap_ok line; 0, or -1 when one
 * failed (the test should end: tap_done).  Close frees both. */
typedef struct tap_train_fix {
    db_tindex rix;
    db_safetensors *rst;
    tap_train_ref in;
    db_model m;
    int have_model;
} tap_train_fix;
int tap_train_fix_open(tap_train_fix *f);
void tap_train_fix_close(tap_train_fix *f);

/* Reference batch k (mod TAP_TRAIN_REF_STEPS) as db_train_batch: its clean
 * latents (posterior draw k x SD1's scaling factor 0.18215) written to lat
 * (B*C*H*W floats, the caller's), one instance row, 77 tokens. */
db_train_batch tap_train_ref_batch(const tap_train_ref *in, int k, float *lat);
/* One optimizer step of t on reference batch k: accumulate, apply (s: its stats). */
int tap_train_ref_step(db_trainer *t, const tap_train_ref *in, int k, db_train_stats *s, db_err *err);

/* A synthetic DreamBooth problem on the tiny model (test_train_learn.c,
 * test_adamw8bit.c): 4 x 16 x 16 latents; the "subject", a smooth field
 * (blobs per channel) with posterior logvar -12; TAP_LEARN_NPRIOR class
 * latents (noise stream 99); the prompts "a photo of sks dog" and "a photo
 * of a dog" tokenized (data/clip/sd-tokenizer). */
enum { TAP_LEARN_C = 4, TAP_LEARN_H = 16, TAP_LEARN_W = 16, TAP_LEARN_T = 77, TAP_LEARN_NPRIOR = 4,
       TAP_LEARN_N = TAP_LEARN_C * TAP_LEARN_H * TAP_LEARN_W };
typedef struct tap_learn {
    float subject[TAP_LEARN_N], logvar[TAP_LEARN_N]; /* the instance posterior */
    float prior[TAP_LEARN_NPRIOR][TAP_LEARN_N];     /* class latents */
    int32_t ids_inst[TAP_LEARN_T], ids_cls[TAP_LEARN_T];
} tap_learn;
int tap_learn_make(tap_learn *f, db_err *err);
/* One micro-batch of the draws (seed, u), as db-train makes them, through
 * db_trainer_accumulate (or db_trainer_eval when eval).  rows 2: the
 * instance row (a posterior sample of the subject) then class row
 * u % NPRIOR; rows 1 (half the cost): even u an instance row, odd u class
 * row u / 2 % NPRIOR. */
int tap_learn_batch(db_trainer *tr, const tap_learn *f, int rows, uint64_t seed, uint64_t u, int eval,
                    db_train_stats *s, db_err *err);

/* dlopen the CUDA backend a GPU test program checks: $B/lib/libdb_cuda.so,
 * else $TOP/build/lib/..., else ../../lib/ beside the executable
 * (build/tests/gpu/X); the path tried goes to path (n bytes).  NULL as
 * dlopen (dlerror says why). */
void *tap_cuda_open(char *path, size_t n);

/* ---- the device a test runs on ----------------------------------------------------
 * Model tests run on the ctx named by $DB_TEST_DEVICE ("cpu" when unset or
 * empty; "cuda", "cuda:1"), so the same fixture comparisons check a GPU
 * backend (tests/gpu/t0100-fixtures.sh).  Buffers the model reads or writes
 * live on that device; the helpers below move them to and from the host for
 * the comparisons.  On a CPU ctx every one of them hands back the pointer it
 * was given (nothing copied, nothing extra allocated), so the CPU tests
 * compute exactly what they computed before the device existed here. */

/* The device name ($DB_TEST_DEVICE, or "cpu"), for messages. */
const char *tap_device(void);
/* Create the ctx of tap_device() (all cores).  Call it before the first
 * tap_ok: when the device cannot be created and $DB_TEST_DEVICE_OPTIONAL is
 * 1, it prints "1..0 # SKIP <reason>" and exits 0 (a machine without that
 * device); otherwise it returns -1 with err set and the test must fail
 * (a GPU session must not pass by skipping). */
int tap_ctx_create(db_ctx **c, db_err *err);

/* A buffer of `bytes` on c's device: malloc on the CPU (what the tests used
 * before), db_ctx_alloc elsewhere; NULL on failure.  Free with tap_dev_free. */
void *tap_dev_alloc(db_ctx *c, size_t bytes);
void tap_dev_free(db_ctx *c, void *p);
/* Host data where c's device can read it: `host` itself on the CPU, else a
 * device copy (NULL on failure, reason in c->err).  Release with
 * tap_put_free (nothing to do on the CPU). */
void *tap_put(db_ctx *c, const void *host, size_t bytes);
void tap_put_free(db_ctx *c, const void *dev);
/* A host buffer mirroring device buffer `dev` (`dev` itself on the CPU,
 * else malloc'd, uninitialised): db_ctx_copy(c, h, dev, .., DB_COPY_D2H) and
 * back then work on every device (a copy onto itself copies nothing).
 * Release with tap_host_free. */
void *tap_mirror(db_ctx *c, const void *dev, size_t bytes);
/* tap_mirror filled with dev's contents (D2H); NULL on failure (c->err). */
void *tap_fetch(db_ctx *c, const void *dev, size_t bytes);
void tap_host_free(db_ctx *c, const void *host);

#endif
