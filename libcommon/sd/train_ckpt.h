/* Training checkpoints: RUN_DIR/ckpt-NNNNNN/ (NNNNNN = optimizer steps
 * done, 6 digits or more), everything a bit-identical resume needs:
 *
 *   model.safetensors      trained weights, fp32, CompVis single-file names
 *                          (model.diffusion_model.*, and
 *                          cond_stage_model.transformer.text_model.* when the
 *                          text encoder is trained); __metadata__ format
 *                          "dreambooth-c/ckpt", step, base_model_hash
 *   optimizer.safetensors  exp_avg/<name>, exp_avg_sq/<name> (AdamW moments,
 *                          fp32); with 8-bit AdamW (__metadata__ and state.json
 *                          "optimizer": "adamw8bit") a tensor of 4096 elements
 *                          or more has instead exp_avg.q8/<name> and
 *                          exp_avg_sq.q8/<name> (uint8 codes, the tensor's
 *                          shape) and exp_avg.absmax/<name>,
 *                          exp_avg_sq.absmax/<name> (fp32 scales, one per
 *                          256 elements; see optim.h)
 *   state.json             format, version, step, optimizer_step,
 *                          loss_scale and growth_tracker (fp16 runs),
 *                          base_model(+_hash), train_text_encoder, optimizer,
 *                          loss, lr, rng, data
 *   config.json            the run's resolved configuration
 *
 * The directory is written under a hidden temporary name beside its final
 * one, every file fsynced, then renamed and the run directory fsynced: a
 * crash (kill -9) at any moment leaves either the complete checkpoint or
 * none, and the previous ones untouched.  (Random-number state is a pure
 * function of the seed and the step, see trainset.h, so "rng" only records
 * the seed and scheme.) */
#ifndef DB_TRAIN_CKPT_H
#define DB_TRAIN_CKPT_H

#include <jansson.h>
#include <stdint.h>

#include "libcommon/core/err.h"
#include "libcommon/core/log.h"
#include "libcommon/sd/train.h"

#define DB_CKPT_FORMAT "dreambooth-c/ckpt"

/* Write RUN_DIR/ckpt-<step>.  state and config are JSON objects (borrowed;
 * state gets "format", "version" and "step" set here).  *out_path (may be
 * NULL) receives the final path (malloc'd). */
int db_train_ckpt_save(const char *run_dir, const db_train_state *st, const char *base_hash, json_t *state,
                       const json_t *config, char **out_path, db_err *err);

/* The same in a thread of its own (db-train --async-save), so training goes
 * on while the files are written: db_ckpt_writer_start copies st's weights
 * and moments into host memory now (off the device, or out of the CPU
 * buffers the next step overwrites; host memory the size of the
 * checkpoint), copies state and config, and starts the write; join waits for
 * it.  A writer reads only its copies: st's buffers may change at once, but
 * its tensor tables (the weights' indexes) must outlive the join.
 *
 * stage (may be NULL) is memory kept for those copies from checkpoint to
 * checkpoint (below); a writer takes it unless the previous writer still
 * holds it (not joined yet), and mallocs each copy then, as without one,
 * and the copies that do not fit when it is too small.  The files are the
 * same bytes either way. */
typedef struct db_ckpt_writer db_ckpt_writer;
typedef struct db_ckpt_stage db_ckpt_stage;
int db_ckpt_writer_start(db_ckpt_writer **out, const char *run_dir, const db_train_state *st, const char *base_hash,
                         const json_t *state, const json_t *config, db_ckpt_stage *stage, db_err *err);
/* 0 with *out_path (may be NULL; malloc'd) the checkpoint written, or -1
 * with the write's error.  Frees w; NULL: nothing to wait for, 0. */
int db_ckpt_writer_join(db_ckpt_writer *w, char **out_path, db_err *err);

/* The stage: host memory for a writer's copies, allocated once for the run.
 * From ctx's device where it gives any (db_ctx_host_alloc: CUDA's pinned
 * memory, which the copy a training step waits for fills at the bus's
 * speed: the pageable copies ran at ~1.5 GB/s on an H200, 6.7 s for SD1.5's
 * 10.3 GB trainer state), else malloc'd and touched (its page faults taken
 * up front).  Pinning gigabytes takes seconds, so db_ckpt_stage_start
 * allocates in a thread of its own and returns at once; the first writer
 * to use the stage waits for it.  bytes: db_ckpt_copy_bytes of the state
 * it will hold.  A failed allocation is no error: writers then malloc. */
size_t db_ckpt_copy_bytes(const db_train_state *st);
int db_ckpt_stage_start(db_ckpt_stage **out, db_ctx *ctx, size_t bytes, db_err *err); /* ctx NULL: malloc'd */
/* 1 when the stage's memory came from the device (waits for the allocation) */
int db_ckpt_stage_pinned(db_ckpt_stage *s);
/* After the join of the last writer that used it; NULL: nothing. */
void db_ckpt_stage_free(db_ckpt_stage *s);
/* 1 when w's copies are in a stage's memory, 0 when malloc'd (tests) */
int db_ckpt_writer_staged(const db_ckpt_writer *w);

/* Read a checkpoint into the trainer's buffers (st from db_trainer_state):
 * every tensor must be present with its shape; a text encoder in the file
 * but frozen in st (or the reverse) is refused, and so is a checkpoint of
 * another optimizer (state.json "optimizer"; absent means adamw).  *state and *config get
 * the JSON (caller decrefs). */
int db_train_ckpt_load(const char *ckpt_dir, const db_train_state *st, json_t **state, json_t **config,
                       db_err *err);

/* The steps of run_dir's ckpt-<digits> directories, ascending (temporaries
 * such as .ckpt-000800.tmp-* do not match); *steps malloc'd (NULL when
 * none). */
int db_train_ckpt_list(const char *run_dir, int64_t **steps, size_t *n, db_err *err);
/* run_dir/ckpt-NNNNNN of a step (malloc'd). */
char *db_train_ckpt_path(const char *run_dir, int64_t step);
/* ckpt_dir/state.json, checked to be a checkpoint's ("format" and a
 * "step"): *state (caller decrefs) and *step, or -1 with err naming the
 * file and what is wrong. */
int db_train_ckpt_state(const char *ckpt_dir, json_t **state, int64_t *step, db_err *err);
/* The same, and the checkpoint is complete: model.safetensors is there too
 * (state.json is written last, so ours always are). */
int db_train_ckpt_complete(const char *ckpt_dir, json_t **state, int64_t *step, db_err *err);

/* The newest complete checkpoint of run_dir (db_train_ckpt_complete),
 * malloc'd into *path; *path NULL (and 0 returned) when none. */
int db_train_ckpt_latest(const char *run_dir, char **path, int64_t *step, db_err *err);

/* Remove all but the newest keep checkpoints (keep <= 0: keep all) and any
 * temporary left by an interrupted write (.ckpt-*, .config.json.tmp-*,
 * ckpt-*.replaced). */
void db_train_ckpt_prune(const char *run_dir, int keep, const db_log *lg);

/* Restore the trainer's counters from a checkpoint's state.json:
 * db_trainer_set_step(step), then db_trainer_set_amp with
 * "optimizer_step" (absent in older checkpoints: step), "loss_scale" and
 * "growth_tracker" (absent, e.g. an fp32 run: the initial scale).  A run
 * may resume in another precision: only an fp16 trainer uses the scale. */
int db_train_ckpt_restore_counters(const json_t *state, db_trainer *t, db_err *err);

/* Is `path` a checkpoint directory (has state.json)? */
int db_train_ckpt_is(const char *path);

#endif
