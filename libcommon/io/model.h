/* A Stable Diffusion checkpoint in any layout, seen one way: every known
 * tensor under its CompVis name, the architecture, and the configs.
 *
 *   diffusers folder   model_index.json + unet/ vae/ text_encoder/ (config.json
 *                      + *.safetensors or *.bin) + scheduler/ + tokenizer/
 *   single file        .safetensors or .ckpt in the CompVis layout
 *
 * The format is detected from content, never from the file name. */
#ifndef DB_MODEL_H
#define DB_MODEL_H

#include <jansson.h>
#include <stdint.h>

#include "../core/err.h"
#include "../core/log.h"
#include "../sd/arch.h"
#include "tindex.h"

typedef enum db_format { DB_FMT_DIFFUSERS = 0, DB_FMT_SAFETENSORS, DB_FMT_CKPT } db_format;
const char *db_format_name(db_format f); /* "diffusers" "safetensors" "ckpt" */

#define DB_MODEL_MAXSRC 16

typedef struct db_model {
    db_format format;
    char *path;
    db_tindex t;            /* known tensors, CompVis names and shapes, table order */
    db_arch arch;
    int arch_from_config;   /* 1: configs gave the arch; 0: detected from weights */
    json_t *config[DB_NCOMP]; /* component config.json as read (NULL for single files) */
    json_t *scheduler;      /* scheduler_config.json as read, or the SD1.x default */
    char *tokenizer_dir;    /* the model's tokenizer/ folder, or NULL */
    db_tindex raw;          /* tensors as stored (names as in the files) */
    size_t n_ignored;       /* stored tensors that are not part of the model */
    char *ignored_example;  /* the first such name, for messages */
    void *src[DB_MODEL_MAXSRC]; /* open files (safetensors / ckpt handles), or a
                                   db_tsrc the model owns (DB_MODEL_SRC_OWNED) */
    int src_kind[DB_MODEL_MAXSRC];
    int nsrc;
} db_model;

enum { DB_MODEL_SRC_OWNED = 3 }; /* src[i] is a db_tsrc closed through its close() */

typedef struct db_model_opts {
    const char *config_dir; /* diffusers-style configs overriding detection (single files) */
    const db_log *log;      /* warnings about ignored tensors etc.; may be NULL */
} db_model_opts;

int db_model_open(db_model *m, const char *path, const db_model_opts *o, db_err *err);
void db_model_close(db_model *m);

/* Open just the stored tensors of a file or diffusers folder (no model
 * checks): for `verify` of any safetensors/ckpt.  Fills m->raw and m->format. */
int db_model_open_raw(db_model *m, const char *path, db_err *err);

/* Take the bytes of every tensor stored in the safetensors file `path` in
 * place of m's own: a fine-tuned subset over its base model (a training
 * checkpoint's model.safetensors).  Names are CompVis names, as a single file
 * has them; each must be a known tensor of m (m->t) with the same shape, and
 * floating point (its dtype may differ from the base's).  All are checked
 * before any is replaced: on error m is unchanged and err names the file and
 * the tensor.  Only m->t changes (m->raw keeps the base's files); the file
 * stays open until db_model_close.  *n_replaced (may be NULL) gets the count. */
int db_model_overlay(db_model *m, const char *path, size_t *n_replaced, db_err *err);

/* Parameter count and dtype histogram of one component. */
typedef struct db_comp_stats {
    int64_t params;
    int64_t tensors;
    int64_t by_dtype[DB_NDTYPE]; /* tensors per stored dtype */
} db_comp_stats;
void db_model_stats(const db_model *m, int comp, db_comp_stats *s);

/* A content hash over (name, dtype, shape, bytes) of every known tensor in
 * table order: equal for the same weights in any layout.  hex gets 16 chars. */
int db_model_hash(const db_model *m, char hex[17], db_err *err);

/* Write the model.  dtype < 0 keeps each tensor's stored dtype; otherwise
 * floating-point tensors are converted (integer buffers keep theirs). */
int db_model_save_safetensors(const db_model *m, const char *path, int dtype, db_err *err);
int db_model_save_diffusers(const db_model *m, const char *dir, int dtype, const char *data_dir, db_err *err);

/* DIR/unet/config.json, DIR/vae/config.json, DIR/text_encoder/config.json,
 * each optional: cfg[comp] gets a new reference or NULL. */
int db_config_dir_load(const char *dir, json_t *cfg[DB_NCOMP], db_err *err);

/* The default SD1.x scheduler config (PNDM, scaled_linear 0.00085..0.012). */
json_t *db_default_scheduler_config(void);

/* Where the project's data files (CLIP vocabulary...) are: $DB_DATA_DIR, or
 * relative to the running executable (build tree or installed share/). */
const char *db_data_dir(char *buf, size_t n);

#endif
