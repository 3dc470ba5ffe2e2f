#include "tap.h"

#include <dlfcn.h>
#include <libgen.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "libcommon/core/fsutil.h"
#include "libcommon/sd/noise.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/trainset.h"

static int n_run, n_fail;
static char tmpdir[256];

int tap_ok(int cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", cond ? "ok" : "not ok", ++n_run);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!cond)
        n_fail++;
    fflush(stdout);
    return cond;
}

void tap_diag(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("# ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

int tap_done(void)
{
    printf("1..%d\n", n_run);
    if (tmpdir[0])
        db_rm_rf(tmpdir);
    return n_fail ? 1 : 0;
}

const char *tap_path(const char *rel)
{
    static char buf[8][1024];
    static int slot;
    const char *top = getenv("TOP");
    char *b = buf[slot++ & 7];
    snprintf(b, sizeof buf[0], "%s/%s", top ? top : ".", rel);
    return b;
}

const char *tap_tmpdir(void)
{
    if (!tmpdir[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(tmpdir, sizeof tmpdir, "%s/dbtest-XXXXXX", t ? t : "/tmp");
        if (!mkdtemp(tmpdir)) {
            perror("mkdtemp");
            exit(2);
        }
    }
    return tmpdir;
}

tap_cmp tap_compare(const float *got, const float *want, size_t n)
{
    tap_cmp c = {0, 0, 0};
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)want[i];
        num += d * d;
        den += (double)want[i] * want[i];
        if (!(fabs(d) <= c.maxabs)) { /* also catches NaN */
            c.maxabs = isnan(d) ? INFINITY : fabs(d);
            c.at = i;
        }
    }
    c.rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (isnan(c.rel))
        c.rel = INFINITY;
    return c;
}

int tap_ref_open(db_tindex *ix, db_safetensors **st, const char *rel, db_err *err)
{
    db_tindex_init(ix);
    *st = NULL;
    return db_safetensors_open(st, tap_path(rel), NULL, -1, ix, err);
}

int tap_ref_get(const db_tindex *ix, const char *name, db_tensor *t, db_err *err)
{
    long k = db_tindex_find(ix, name);
    return k < 0 ? db_err_set(err, DB_EFORMAT, "reference has no '%s'", name)
                 : db_tindex_load(ix, (size_t)k, DB_F32, t, err);
}

int tap_train_ref_load(const db_tindex *ix, tap_train_ref *in, db_err *err)
{
    db_tensor ids = {0};
    char name[64];
    if (tap_ref_get(ix, "posterior_mean", &in->mean, err) || tap_ref_get(ix, "posterior_logvar", &in->logvar, err))
        return -1;
    for (int k = 0; k < TAP_TRAIN_REF_STEPS; k++) {
        snprintf(name, sizeof name, "step%d/eps_posterior", k);
        if (tap_ref_get(ix, name, &in->eps[k], err))
            return -1;
        snprintf(name, sizeof name, "step%d/noise", k);
        if (tap_ref_get(ix, name, &in->noise[k], err))
            return -1;
        snprintf(name, sizeof name, "step%d/timesteps", k);
        long j = db_tindex_find(ix, name);
        if (j < 0 || db_tindex_load(ix, (size_t)j, DB_I64, &in->ts[k], err))
            return db_err_set(err, DB_EFORMAT, "reference has no '%s'", name);
    }
    long j = db_tindex_find(ix, "input_ids");
    if (j < 0 || db_tindex_load(ix, (size_t)j, DB_I64, &ids, err))
        return db_err_set(err, DB_EFORMAT, "reference has no input_ids");
    for (int i = 0; i < 2 * 77; i++)
        in->ids[i] = (int32_t)((const int64_t *)ids.data)[i];
    db_tensor_free(&ids);
    in->B = (int)in->mean.shape[0], in->C = (int)in->mean.shape[1];
    in->H = (int)in->mean.shape[2], in->W = (int)in->mean.shape[3];
    return 0;
}

int tap_train_fix_open(tap_train_fix *f)
{
    db_err err = {0};
    memset(f, 0, sizeof *f);
    db_tindex_init(&f->rix);
    int rc = db_safetensors_open(&f->rst, tap_path("tests/data/refs/train_steps.safetensors"), NULL, -1, &f->rix,
                                 &err);
    rc = rc ? rc : tap_train_ref_load(&f->rix, &f->in, &err);
    if (!tap_ok(rc == 0, "reference inputs%s%s", rc ? ": " : "", rc ? err.msg : ""))
        return -1;
    f->have_model = db_model_open(&f->m, tap_path("tests/data/tiny/diffusers"), NULL, &err) == 0;
    return tap_ok(f->have_model, "open model%s%s", err.code ? ": " : "", err.msg) ? 0 : -1;
}

void tap_train_fix_close(tap_train_fix *f)
{
    if (f->have_model)
        db_model_close(&f->m);
    db_tindex_free(&f->rix);
    db_safetensors_close(f->rst);
}

db_train_batch tap_train_ref_batch(const tap_train_ref *in, int k, float *lat)
{
    k %= TAP_TRAIN_REF_STEPS;
    const size_t n = (size_t)in->B * in->C * in->H * in->W;
    db_train_posterior_sample(lat, in->mean.data, in->logvar.data, in->eps[k].data, n, 0.18215f);
    return (db_train_batch){.B = in->B, .n_inst = 1, .C = in->C, .H = in->H, .W = in->W, .T = 77, .latents = lat,
                            .noise = in->noise[k].data, .timesteps = in->ts[k].data, .ids = in->ids};
}

int tap_learn_make(tap_learn *f, db_err *err)
{
    enum { C = TAP_LEARN_C, H = TAP_LEARN_H, W = TAP_LEARN_W, T = TAP_LEARN_T };
    db_tokenizer *tok = NULL;
    const int rc = db_tokenizer_load(&tok, tap_path("data/clip/sd-tokenizer"), err) ||
                   db_tokenize(tok, "a photo of sks dog", T, f->ids_inst, NULL, err) ||
                   db_tokenize(tok, "a photo of a dog", T, f->ids_cls, NULL, err);
    db_tokenizer_free(tok);
    if (rc)
        return -1;
    for (int c = 0; c < C; c++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++)
                f->subject[(c * H + y) * W + x] =
                    (float)(1.2 * sin(0.5 * x + 1.3 * c) * cos(0.4 * y - 0.7 * c) + 0.3 * (c - 1.5));
    for (int k = 0; k < TAP_LEARN_N; k++)
        f->logvar[k] = -12.0f;
    for (int p = 0; p < TAP_LEARN_NPRIOR; p++)
        db_noise_fill(f->prior[p], TAP_LEARN_N, 99, (uint64_t)p, 0);
    return 0;
}

int tap_learn_batch(db_trainer *tr, const tap_learn *f, int rows, uint64_t seed, uint64_t u, int eval,
                    db_train_stats *s, db_err *err)
{
    enum { N = TAP_LEARN_N, T = TAP_LEARN_T };
    float lat[2 * N], noise[2 * N], eps[2 * N];
    int64_t ts[2];
    int32_t ids[2 * T];
    const int inst = rows == 2 || u % 2 == 0;
    db_train_noise(seed, u, rows, TAP_LEARN_C, N, noise, eps, NULL);
    for (int r = 0; r < rows; r++)
        ts[r] = db_train_timestep(seed, u, r, db_trainer_num_timesteps(tr));
    if (inst)
        db_train_posterior_sample(lat, f->subject, f->logvar, eps, N, 1.0f);
    if (rows == 2)
        memcpy(lat + N, f->prior[u % TAP_LEARN_NPRIOR], sizeof f->prior[0]);
    else if (!inst)
        memcpy(lat, f->prior[u / 2 % TAP_LEARN_NPRIOR], sizeof f->prior[0]);
    memcpy(ids, inst ? f->ids_inst : f->ids_cls, sizeof f->ids_inst);
    if (rows == 2)
        memcpy(ids + T, f->ids_cls, sizeof f->ids_cls);
    db_train_batch b = {.B = rows, .n_inst = inst, .C = TAP_LEARN_C, .H = TAP_LEARN_H, .W = TAP_LEARN_W, .T = T,
                        .latents = lat, .noise = noise, .timesteps = ts, .ids = ids};
    return eval ? db_trainer_eval(tr, &b, s, err) : db_trainer_accumulate(tr, &b, s, err);
}

int tap_train_ref_step(db_trainer *t, const tap_train_ref *in, int k, db_train_stats *s, db_err *err)
{
    float *lat = malloc((size_t)in->B * in->C * in->H * in->W * sizeof *lat);
    if (!lat)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    const db_train_batch b = tap_train_ref_batch(in, k, lat);
    int rc = db_trainer_accumulate(t, &b, NULL, err);
    rc = rc ? rc : db_trainer_apply(t, s, err);
    free(lat);
    return rc;
}

void *tap_cuda_open(char *path, size_t n)
{
    const char *b = getenv("B"), *top = getenv("TOP");
    if (b)
        snprintf(path, n, "%s/lib/libdb_cuda.so", b);
    else if (top)
        snprintf(path, n, "%s/build/lib/libdb_cuda.so", top);
    else {
        char exe[4096];
        ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[k > 0 ? k : 0] = 0;
        snprintf(path, n, "%s/../../lib/libdb_cuda.so", k > 0 ? dirname(exe) : ".");
    }
    return dlopen(path, RTLD_NOW | RTLD_LOCAL);
}

const char *tap_device(void)
{
    const char *d = getenv("DB_TEST_DEVICE");
    return d && *d ? d : "cpu";
}

int tap_ctx_create(db_ctx **c, db_err *err)
{
    *c = NULL;
    if (db_ctx_create_device(c, tap_device(), 0, err) == 0)
        return 0;
    const char *opt = getenv("DB_TEST_DEVICE_OPTIONAL");
    /* a bad device name is a mistake in the caller, never a reason to skip */
    if (opt && !strcmp(opt, "1") && err->code != DB_EUSAGE) {
        printf("1..0 # SKIP %s: %s\n", tap_device(), err->msg);
        exit(0);
    }
    return -1;
}

static int on_cpu(const db_ctx *c) { return c->device == DB_CPU; }

void *tap_dev_alloc(db_ctx *c, size_t bytes)
{
    return on_cpu(c) ? malloc(bytes ? bytes : 1) : db_ctx_alloc(c, bytes);
}

void tap_dev_free(db_ctx *c, void *p)
{
    if (on_cpu(c))
        free(p);
    else
        db_ctx_free(c, p);
}

void *tap_put(db_ctx *c, const void *host, size_t bytes)
{
    if (on_cpu(c))
        return (void *)host;
    void *d = db_ctx_alloc(c, bytes);
    if (d && db_ctx_copy(c, d, host, bytes, DB_COPY_H2D)) {
        db_ctx_free(c, d);
        d = NULL;
    }
    return d;
}

void tap_put_free(db_ctx *c, const void *dev)
{
    if (!on_cpu(c))
        db_ctx_free(c, (void *)dev);
}

void *tap_mirror(db_ctx *c, const void *dev, size_t bytes)
{
    return on_cpu(c) ? (void *)dev : malloc(bytes ? bytes : 1);
}

void *tap_fetch(db_ctx *c, const void *dev, size_t bytes)
{
    void *h = tap_mirror(c, dev, bytes);
    if (h && db_ctx_copy(c, h, dev, bytes, DB_COPY_D2H)) {
        tap_host_free(c, h);
        h = NULL;
    }
    return h;
}

void tap_host_free(db_ctx *c, const void *host)
{
    if (!on_cpu(c))
        free((void *)host);
}
