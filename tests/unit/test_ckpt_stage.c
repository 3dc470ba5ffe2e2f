/* The background checkpoint writer's stage (train_ckpt.h db_ckpt_stage:
 * host memory for the copies, kept from checkpoint to checkpoint; pinned on
 * a GPU): checkpoints written through it are byte for byte those of the
 * synchronous writer (every piece of the copy at its own place: an overlap
 * would show as a difference), for AdamW and 8-bit AdamW; a writer that
 * finds the stage still held by an unjoined one mallocs its copies, one
 * with a stage too small mallocs what does not fit, and both write the same
 * bytes; the stage is pinned exactly on a CUDA device.  Runs on $DB_TEST_DEVICE (tap.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernels/ops.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/train_ckpt.h"
#include "tap.h"

static const char *const FILES[] = {"model.safetensors", "optimizer.safetensors"};

/* the checkpoint files of step `step` under dirs a and b are the same bytes */
static int same(const char *a, const char *b, int64_t step)
{
    int ok = 1;
    for (size_t f = 0; ok && f < 2; f++) {
        char *pa = db_train_ckpt_path(a, step), *pb = db_train_ckpt_path(b, step);
        char fa[1024], fb[1024];
        snprintf(fa, sizeof fa, "%s/%s", pa, FILES[f]);
        snprintf(fb, sizeof fb, "%s/%s", pb, FILES[f]);
        free(pa), free(pb);
        char *da = NULL, *dbuf = NULL;
        size_t la = 0, lb = 0;
        db_err err = {0};
        ok = db_read_file(fa, (size_t)1 << 30, &da, &la, &err) == 0 &&
             db_read_file(fb, (size_t)1 << 30, &dbuf, &lb, &err) == 0 && la == lb && memcmp(da, dbuf, la) == 0;
        if (err.code)
            tap_diag("%s", err.msg);
        free(da), free(dbuf);
    }
    return ok;
}

static char *dir_of(const char *name)
{
    char *d = db_path_join(tap_tmpdir(), name);
    db_rm_rf(d);
    if (mkdir(d, 0777))
        perror(d);
    return d;
}

static void test_optimizer(db_ctx *ctx, const tap_train_fix *fx, db_optim_kind opt, const char *on)
{
    db_train_opts o = db_train_opts_defaults(1e-3, 10);
    o.train_text = 1;
    o.optimizer = opt;
    db_trainer *t = NULL;
    db_err err = {0};
    db_train_stats s;
    if (!tap_ok(db_trainer_create(&t, ctx, &fx->m, &o, &err) == 0 && tap_train_ref_step(t, &fx->in, 0, &s, &err) == 0,
                "%s: a trainer and one step%s%s", on, err.code ? ": " : "", err.msg)) {
        db_trainer_free(t);
        return;
    }
    char name[64];
    snprintf(name, sizeof name, "stage-%s-", db_optim_name(opt));
    char *dirs[5];
    static const char *const SUB[5] = {"sync", "staged", "busy", "small", "again"};
    for (int i = 0; i < 5; i++) {
        char n2[96];
        snprintf(n2, sizeof n2, "%s%s", name, SUB[i]);
        dirs[i] = dir_of(n2);
    }
    json_t *state = json_object(), *cfg = json_object();
    db_train_state st;
    db_trainer_state(t, &st);
    const size_t bytes = db_ckpt_copy_bytes(&st);
    int rc = db_train_ckpt_save(dirs[0], &st, "h", state, cfg, NULL, &err);
    tap_ok(rc == 0, "%s: the synchronous checkpoint%s%s", on, rc ? ": " : "", err.msg);

    db_ckpt_stage *stage = NULL, *small = NULL;
    rc = db_ckpt_stage_start(&stage, ctx, bytes, &err) || db_ckpt_stage_start(&small, ctx, bytes - 1, &err);
    if (!tap_ok(rc == 0, "%s: two stages (%zu bytes and one less)%s%s", on, bytes, rc ? ": " : "", err.msg))
        goto out;
    const int want_pinned = ctx->device == DB_CUDA;
    tap_ok(db_ckpt_stage_pinned(stage) == want_pinned, "%s: the stage is %s", on,
           want_pinned ? "pinned memory (the device's)" : "malloc'd (the CPU devices give none)");

    /* through the stage, and a second writer while the first still holds it */
    db_ckpt_writer *w1 = NULL, *w2 = NULL, *w3 = NULL;
    rc = db_ckpt_writer_start(&w1, dirs[1], &st, "h", state, cfg, stage, &err);
    rc = rc ? rc : db_ckpt_writer_start(&w2, dirs[2], &st, "h", state, cfg, stage, &err);
    rc = rc ? rc : db_ckpt_writer_start(&w3, dirs[3], &st, "h", state, cfg, small, &err);
    const int s1 = w1 && db_ckpt_writer_staged(w1), s2 = w2 && db_ckpt_writer_staged(w2),
              s3 = w3 && db_ckpt_writer_staged(w3);
    db_err e1 = {0}, e2 = {0}, e3 = {0};
    rc |= db_ckpt_writer_join(w1, NULL, &e1) | db_ckpt_writer_join(w2, NULL, &e2) |
          db_ckpt_writer_join(w3, NULL, &e3);
    if (!tap_ok(rc == 0, "%s: three background writers%s%s%s%s", on, err.msg, e1.msg, e2.msg, e3.msg))
        goto out;
    tap_ok(s1 && !s2 && s3, "%s: the first writer's copies in the stage, a second's begun before its join "
           "malloc'd; a stage a byte short takes what fits (%d %d %d)", on, s1, s2, s3);
    tap_ok(same(dirs[0], dirs[1], 1), "%s: staged == synchronous, byte for byte", on);
    tap_ok(same(dirs[0], dirs[2], 1) && same(dirs[0], dirs[3], 1), "%s: the malloc'd ones too", on);

    /* the stage again, after another step: its old contents overwritten */
    rc = tap_train_ref_step(t, &fx->in, 1, &s, &err);
    db_trainer_state(t, &st);
    db_ckpt_writer *w4 = NULL;
    rc = rc ? rc : db_ckpt_writer_start(&w4, dirs[4], &st, "h", state, cfg, stage, &err);
    const int s4 = w4 && db_ckpt_writer_staged(w4);
    rc = rc ? rc : db_ckpt_writer_join(w4, NULL, &err);
    rc = rc ? rc : db_train_ckpt_save(dirs[0], &st, "h", state, cfg, NULL, &err);
    tap_ok(rc == 0 && s4 && same(dirs[0], dirs[4], 2), "%s: reused after a join, step 2 == its synchronous "
           "checkpoint%s%s", on, rc ? ": " : "", err.msg);
    /* the comparison can fail: steps 1 and 2 differ */
    char *p1 = db_train_ckpt_path(dirs[1], 1), *p2 = db_train_ckpt_path(dirs[1], 2);
    tap_ok(rename(p1, p2) == 0 && !same(dirs[1], dirs[4], 2), /* step 1's files under step 2's name */
           "%s: the comparison can fail (step 1 != step 2)", on);
    free(p1), free(p2);
out:
    db_ckpt_stage_free(stage);
    db_ckpt_stage_free(small);
    json_decref(state);
    json_decref(cfg);
    for (int i = 0; i < 5; i++)
        db_rm_rf(dirs[i]), free(dirs[i]);
    db_trainer_free(t);
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    if (!tap_ok(tap_ctx_create(&ctx, &err) == 0, "%s context%s%s", tap_device(), err.code ? ": " : "", err.msg))
        return tap_done();
    static tap_train_fix fx;
    if (tap_train_fix_open(&fx))
        return tap_done();
    test_optimizer(ctx, &fx, DB_OPTIM_ADAMW, "adamw");
    test_optimizer(ctx, &fx, DB_OPTIM_ADAMW8BIT, "adamw8bit");
    tap_train_fix_close(&fx);
    db_ctx_destroy(ctx);
    return tap_done();
}
