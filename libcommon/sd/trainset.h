/* What db-train trains on, and the random draws of every step.
 *
 * Data: the instance stream (db-prep: kind "instance", records (2, C, h, w)
 * f32 = [posterior mean, posterior logvar], meta "caption") and the optional
 * class stream: db-prior's samples (kind "prior", records (C, h, w) f32
 * latents already multiplied by the scaling factor, meta "prompt") or real
 * class photos through db-prep (kind "instance": a posterior sampled every
 * step, as diffusers encodes its class images), read whole into memory from
 * a file, a pipe or a ZeroMQ endpoint.
 *
 * Draws: every random number of a run is a pure function of (seed, what it
 * is for, the global micro-batch index u), so a run resumed at any step
 * repeats the uninterrupted run bit for bit without saving generator states,
 * and a step can be recomputed anywhere (DESIGN §6):
 *   data order   the dataset has L = max(instances, priors) examples, as
 *                diffusers' DreamBoothDataset; epoch e visits a permutation
 *                of [0, L) (Fisher-Yates driven by Philox counter (e, 0,
 *                PURPOSE_PERM, 0)); global example g = u * batch + b is
 *                perm_e[g mod L] with e = g / L; example j pairs instance
 *                j mod I with prior j mod P;
 *   timesteps    row r of micro-batch u: floor(U * T) with U from Philox
 *                counter (u, r, PURPOSE_TIMESTEP, 0), T = num_train_timesteps;
 *   noise        db_noise_fill stream 1 + u: elements [0, B*n) the noise,
 *                [B*n, 2*B*n) the posterior eps of every row (rows with
 *                fixed latents ignore theirs), then B*C offset-noise values
 *                (n = C*h*w).
 * Rows: the micro-batch's `batch` instance examples, then (with priors) the
 * `batch` prior examples of the same positions, as diffusers' collate_fn. */
#ifndef DB_TRAINSET_H
#define DB_TRAINSET_H

#include <stddef.h>
#include <stdint.h>

#include "libcommon/core/err.h"
#include "libcommon/io/dbt.h"

typedef struct db_trainset {
    char *source;          /* where it was read from (messages) */
    int posterior;         /* 1: records are posteriors (kind "instance"); 0: fixed latents (kind "prior") */
    int C, h, w;           /* latent shape of every record */
    size_t n;              /* records */
    float *data;           /* (n, 2, C, h, w) [mean, logvar] or (n, C, h, w) latents */
    char **prompt;         /* (n) caption / prompt of each record ("" when none) */
    char hash[17];         /* model_hash of the streams ("" when they had none) */
    double scaling_factor; /* from the headers (0 when none) */
} db_trainset;

/* Read every record of `source` (all concatenated streams): kind
 * "instance", or "prior" too when allow_fixed.  Refused with an error naming
 * the source: a stream of another kind, mixed kinds, records of different
 * shapes or dtypes, streams of different models, non-finite values, an empty
 * or truncated input. */
int db_trainset_load(db_trainset *s, const char *source, int allow_fixed, const db_dbt_ropts *ro, db_err *err);
/* The same from an open reader (not closed here); source names it. */
int db_trainset_read(db_trainset *s, db_dbt_reader *r, const char *source, int allow_fixed, db_err *err);
void db_trainset_free(db_trainset *s);
size_t db_trainset_record_floats(const db_trainset *s); /* 2*C*h*w or C*h*w */

/* The examples of micro-batch u: inst[b], prior[b] record indices for
 * b in [0, batch) (prior may be NULL, or n_prior 0: no priors). */
int db_train_pick(uint64_t seed, uint64_t u, int batch, size_t n_inst, size_t n_prior, size_t *inst, size_t *prior,
                  db_err *err);
/* Timestep of row r of micro-batch u, in [0, T). */
int64_t db_train_timestep(uint64_t seed, uint64_t u, int r, int T);
/* noise (B, n), eps (B, n) and offset (B, C) of micro-batch u (offset may
 * be NULL when no offset noise is used). */
void db_train_noise(uint64_t seed, uint64_t u, int B, int C, size_t n, float *noise, float *eps, float *offset);

#endif
