/* Training data and per-step draws (see trainset.h). */
#include "trainset.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/sd/init.h"
#include "libcommon/sd/noise.h"

enum { PURPOSE_PERM = 0x7065726d, PURPOSE_TIMESTEP = 0x74696d65 }; /* "perm", "time" */

/* A double in [0, 1) from Philox counter (a, b, purpose, c) under seed. */
static double uniform(uint64_t seed, uint64_t a, uint32_t b, uint32_t purpose, uint32_t c)
{
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)a, (uint32_t)(a >> 32) ^ (b << 16) ^ c, purpose, b};
    uint32_t r[4];
    db_philox4x32(ctr, key, r);
    const uint64_t bits = ((uint64_t)r[0] << 21) ^ (r[1] >> 11); /* 53 bits */
    return (double)(bits & ((1ull << 53) - 1)) * 0x1p-53;
}

size_t db_trainset_record_floats(const db_trainset *s)
{
    return (size_t)(s->posterior ? 2 : 1) * s->C * s->h * s->w;
}

void db_trainset_free(db_trainset *s)
{
    for (size_t i = 0; s->prompt && i < s->n; i++)
        free(s->prompt[i]);
    free(s->prompt);
    free(s->data);
    free(s->source);
    memset(s, 0, sizeof *s);
}

int db_trainset_load(db_trainset *s, const char *source, int allow_fixed, const db_dbt_ropts *ro, db_err *err)
{
    db_dbt_reader *r = NULL;
    if (db_dbt_open_read(&r, source, ro, err)) {
        memset(s, 0, sizeof *s);
        return db_err_prefix(err, "%s", source);
    }
    int rc = db_trainset_read(s, r, source, allow_fixed, err);
    db_dbt_reader_close(r);
    return rc;
}

int db_trainset_read(db_trainset *s, db_dbt_reader *r, const char *source, int allow_fixed, db_err *err)
{
    memset(s, 0, sizeof *s);
    s->source = strdup(source);
    const char *kind = NULL, *pkey = "caption";
    if (!s->source) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto fail;
    }
    size_t cap = 0, per = 0;
    uint64_t last_stream = UINT64_MAX;
    db_dbt_record rec;
    int rc;
    while ((rc = db_dbt_next(r, &rec, err)) == 1) {
        if (rec.stream->index != last_stream) { /* a new stream: check its header */
            last_stream = rec.stream->index;
            const char *k = rec.stream->kind;
            if (strcmp(k, "instance") != 0 && !(allow_fixed && strcmp(k, "prior") == 0)) {
                db_err_set(err, DB_EFORMAT, "a stream of kind '%s' where %s belong", k,
                           allow_fixed ? "db-prep's (instance) or db-prior's (prior) latents" : "db-prep's "
                                                                                              "(instance) latents");
                goto fail;
            }
            if (kind && strcmp(k, kind) != 0) {
                db_err_set(err, DB_EFORMAT, "streams of kinds '%s' and '%s' mixed in one input", kind, k);
                goto fail;
            }
            if (!kind) {
                kind = strcmp(k, "prior") == 0 ? "prior" : "instance";
                s->posterior = strcmp(kind, "instance") == 0;
                pkey = s->posterior ? "caption" : "prompt";
            }
            const char *h = NULL;
            size_t hl = 0;
            char hash[17] = "";
            if (db_meta_str(&rec.stream->meta, "model_hash", &h, &hl) && hl < sizeof hash)
                memcpy(hash, h, hl), hash[hl] = 0;
            if (s->n && strcmp(hash, s->hash) != 0) {
                db_err_set(err, DB_EFORMAT, "streams of different models (model_hash '%s' and '%s')", s->hash,
                           hash);
                goto fail;
            }
            memcpy(s->hash, hash, sizeof hash);
            double sf;
            if (db_meta_float(&rec.stream->meta, "scaling_factor", &sf))
                s->scaling_factor = sf;
        }
        const int want_ndim = s->posterior ? 4 : 3;
        if (rec.dtype != DB_F32 || rec.ndim != want_ndim || (s->posterior && rec.shape[0] != 2)) {
            db_err_set(err, DB_EFORMAT, "record '%s' (%zu): expected f32 %s, got %s with %d dimensions", rec.name,
                       s->n, s->posterior ? "(2, C, h, w) [mean, logvar]" : "(C, h, w) latents",
                       db_dtype_name(rec.dtype), rec.ndim);
            goto fail;
        }
        const int64_t *sh = rec.shape + (s->posterior ? 1 : 0);
        if (!s->n && !s->C) {
            if (sh[0] <= 0 || sh[1] <= 0 || sh[2] <= 0 || sh[0] > 64 || sh[1] > 4096 || sh[2] > 4096) {
                db_err_set(err, DB_EFORMAT, "record '%s': implausible latent shape", rec.name);
                goto fail;
            }
            s->C = (int)sh[0], s->h = (int)sh[1], s->w = (int)sh[2];
            per = db_trainset_record_floats(s);
        } else if (sh[0] != s->C || sh[1] != s->h || sh[2] != s->w) {
            db_err_set(err, DB_EFORMAT, "record '%s' (%zu) has latents %lldx%lldx%lld, the first had %dx%dx%d",
                       rec.name, s->n, (long long)sh[0], (long long)sh[1], (long long)sh[2], s->C, s->h, s->w);
            goto fail;
        }
        if (s->n == cap) {
            size_t nc = cap ? 2 * cap : 16;
            float *d = realloc(s->data, nc * per * sizeof(float));
            char **p = d ? realloc(s->prompt, nc * sizeof *p) : NULL;
            if (d)
                s->data = d;
            if (!d || !p) {
                db_err_set(err, DB_ENOMEM, "out of memory for %zu records", nc);
                goto fail;
            }
            s->prompt = p;
            cap = nc;
        }
        float *dst = s->data + s->n * per;
        memcpy(dst, rec.data, per * sizeof(float));
        for (size_t i = 0; i < per; i++)
            if (!isfinite(dst[i])) {
                db_err_set(err, DB_EFORMAT, "record '%s' (%zu) holds a non-finite value", rec.name, s->n);
                goto fail;
            }
        s->prompt[s->n] = db_meta_strdup(&rec.meta, pkey);
        if (!s->prompt[s->n] && !(s->prompt[s->n] = strdup(""))) {
            db_err_set(err, DB_ENOMEM, "out of memory");
            goto fail;
        }
        s->n++;
    }
    if (rc < 0)
        goto fail;
    if (!s->n) {
        db_err_set(err, DB_EFORMAT, "no records");
        goto fail;
    }
    return 0;
fail:
    db_err_prefix(err, "%s", source);
    db_trainset_free(s);
    return -1;
}

/* perm (L) = the permutation of epoch e. */
static void permutation(uint64_t seed, uint64_t e, size_t L, size_t *perm)
{
    for (size_t i = 0; i < L; i++)
        perm[i] = i;
    for (size_t i = L; i > 1; i--) { /* Fisher-Yates from the top */
        size_t j = (size_t)(uniform(seed, e, (uint32_t)(i >> 32), PURPOSE_PERM, (uint32_t)i) * (double)i);
        if (j >= i)
            j = i - 1;
        size_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

int db_train_pick(uint64_t seed, uint64_t u, int batch, size_t n_inst, size_t n_prior, size_t *inst, size_t *prior,
                  db_err *err)
{
    if (!n_inst || batch <= 0)
        return db_err_set(err, DB_EUSAGE, "no instance records to train on");
    const size_t L = n_inst > n_prior ? n_inst : n_prior;
    size_t *perm = malloc(L * sizeof *perm);
    if (!perm)
        return db_err_set(err, DB_ENOMEM, "out of memory for a data order of %zu", L);
    uint64_t have = UINT64_MAX;
    for (int b = 0; b < batch; b++) {
        const uint64_t g = u * (uint64_t)batch + (uint64_t)b, e = g / L;
        if (e != have)
            permutation(seed, e, L, perm), have = e;
        const size_t j = perm[g % L];
        inst[b] = j % n_inst;
        if (prior && n_prior)
            prior[b] = j % n_prior;
    }
    free(perm);
    return 0;
}

int64_t db_train_timestep(uint64_t seed, uint64_t u, int r, int T)
{
    int64_t t = (int64_t)(uniform(seed, u, (uint32_t)r, PURPOSE_TIMESTEP, 0) * T);
    return t >= T ? T - 1 : t;
}

void db_train_noise(uint64_t seed, uint64_t u, int B, int C, size_t n, float *noise, float *eps, float *offset)
{
    const uint64_t stream = 1 + u;
    db_noise_fill(noise, (size_t)B * n, seed, stream, 0);
    db_noise_fill(eps, (size_t)B * n, seed, stream, (uint64_t)B * n);
    if (offset)
        db_noise_fill(offset, (size_t)B * C, seed, stream, (uint64_t)(2 * B) * n);
}
