/* db-train: DreamBooth fine-tuning of an SD1.x model on db-prep's instance
 * latents with db-prior's class-prior latents (DESIGN §6).
 *
 *   db-train --model M --instance instance.dbt [--class class.dbt|ENDPOINT]
 *            [--instance-prompt P] [--class-prompt Q] [--steps 800] [--lr 1e-6] ...
 *            -o RUN_DIR
 *   db-train --resume RUN_DIR[/ckpt-N] [--steps N]
 *
 * main: options (command line over --config FILE over a resumed run's
 * config), data, model, then the loop: per optimizer step, grad_accum
 * micro-batches drawn as trainset.h describes, one AdamW step, a log line,
 * TensorBoard scalars, a checkpoint every --save-every steps (and at the end,
 * and on SIGINT / SIGTERM). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "libcommon/core/cli.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/log.h"
#include "libcommon/core/version.h"
#include "libcommon/dist/dist.h"
#include "libcommon/io/dbt.h"
#include "libcommon/io/json.h"
#include "libcommon/io/model.h"
#include "libcommon/io/png.h"
#include "libcommon/io/tfevents.h"
#include "libcommon/sd/clip.h"
#include "libcommon/sd/optim.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/train_ckpt.h"
#include "libcommon/sd/txt2img.h"
#include "libcommon/sd/vae.h"
#include "libcommon/sd/trainset.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/weights.h"

/* SIGINT and SIGTERM are taken by one thread, synchronously (sigwait): every
 * thread of the process blocks them from the start of main (the threads
 * that libraries create later inherit the mask), so no signal is ever
 * delivered asynchronously into the compute threads.  (An asynchronous
 * handler, which only set a flag, made a run stopped mid-step corrupt
 * its heap now and then on our AVX-512 machine: 5 in 50 SIGINTs, through
 * the whole history of the tool.)  Before training starts a signal has
 * its default effect (the watcher re-raises it with the default action);
 * during training it asks the loop to stop after the current step. */
static atomic_int g_stop;     /* the signal that asked us to stop, 0 none */
static atomic_int g_training; /* 1 once the training loop runs */

static void *signal_watch(void *arg)
{
    const sigset_t *set = arg;
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        if (!atomic_load(&g_training)) { /* not yet training: die of it, as without a handler */
            sigset_t one;
            sigemptyset(&one);
            sigaddset(&one, sig);
            signal(sig, SIG_DFL);
            pthread_sigmask(SIG_UNBLOCK, &one, NULL);
            raise(sig);
        }
        atomic_store(&g_stop, sig);
    }
    return NULL;
}

/* Block SIGINT and SIGTERM in this (the main) thread and so in every thread
 * created from now on, and start the thread that waits for them. */
static void watch_signals(void)
{
    static sigset_t set; /* the watcher's, for the life of the process */
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_t th;
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) == 0 && pthread_create(&th, NULL, signal_watch, &set) == 0)
        pthread_detach(th);
    else /* no watcher: the signals keep their default effect */
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

/* ---- options ---------------------------------------------------------------- */

typedef struct opts {
    const char *model, *model_config, *instance, *klass, *instance_prompt, *class_prompt, *lr_schedule;
    const char *output, *resume, *config, *record, *replay, *device, *val_prompt, *val_sched;
    const char *precision;      /* --precision: runtime, like --device */
    const char *async_save;     /* --async-save auto|on|off: runtime */
    const char *optimizer;
    int64_t steps, warmup, batch, grad_accum, save_every, keep_last, seed, threads, log_every;
    int64_t val_every, val_images, val_steps;
    double val_guidance;
    double prior_weight, lr, text_lr, offset_noise, snr_gamma, max_grad_norm, b1, b2, wd, eps;
    int train_text, grad_ckpt, fused, no_graph, plan, quiet, verbose;
} opts;

/* Options that are not part of a run's configuration: where things go, how
 * to run them.  Everything else is saved in RUN_DIR/config.json and every
 * checkpoint, and a resume takes it from there. */
static const char *const RUNTIME_KEYS[] = {"output", "resume", "config", "record", "replay", "plan", "threads",
                                           "device", "quiet", "verbose", "log-every", "precision",
                                           "async-save", "no-graph", NULL};
/* Run settings a resume may change (they do not change the math of the
 * steps already taken; see the man page for --steps and the lr schedule). */
static const char *const RESUMABLE_KEYS[] = {"steps", "save-every", "keep-last", NULL};

static int in_list(const char *const *l, const char *k)
{
    for (; *l; l++)
        if (!strcmp(*l, k))
            return 1;
    return 0;
}

/* The option's value as JSON (NULL for an unset string). */
static json_t *opt_json(const db_opt *o)
{
    switch (o->type) {
    case DB_OPT_FLAG:
        return json_boolean(*(int *)o->dest);
    case DB_OPT_STR:
        return *(const char **)o->dest ? json_string(*(const char **)o->dest) : json_null();
    case DB_OPT_INT:
        return json_integer(*(int64_t *)o->dest);
    case DB_OPT_FLOAT:
        return json_real(*(double *)o->dest);
    }
    return json_null();
}

/* Set option o from JSON v; keeps strings pointing into v (the caller keeps
 * the document alive).  -1 with err on a type mismatch. */
static int opt_set(db_opt *o, const json_t *v, const char *where, db_err *err)
{
    switch (o->type) {
    case DB_OPT_FLAG:
        if (!json_is_boolean(v))
            break;
        *(int *)o->dest = json_is_true(v);
        return 0;
    case DB_OPT_STR:
        if (json_is_null(v)) {
            *(const char **)o->dest = NULL;
            return 0;
        }
        if (!json_is_string(v))
            break;
        *(const char **)o->dest = json_string_value(v);
        return 0;
    case DB_OPT_INT:
        if (!json_is_integer(v))
            break;
        *(int64_t *)o->dest = json_integer_value(v);
        return 0;
    case DB_OPT_FLOAT:
        if (!json_is_number(v))
            break;
        *(double *)o->dest = json_number_value(v);
        return 0;
    }
    return db_err_set(err, DB_EFORMAT, "%s: '%s' should be %s, not %s", where, o->name,
                      o->type == DB_OPT_FLAG ? "true or false" : o->type == DB_OPT_STR ? "a string" : "a number",
                      db_json_type_name(v));
}

/* Option named k in the table, accepting '_' for '-' (JSON written by
 * hand or by Python). */
static db_opt *opt_find(db_opt *t, const char *k)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%s", k);
    for (char *c = buf; *c; c++)
        if (*c == '_')
            *c = '-';
    for (; t->name; t++)
        if (!strcmp(t->name, buf))
            return t;
    return NULL;
}

/* Apply a --config file: every key must be an option; options given on the
 * command line win (their `given` counts stay; config ones get given = -1). */
static int apply_config(db_opt *t, const json_t *cfg, const char *path, db_err *err)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)cfg, k, v)
    {
        db_opt *o = opt_find(t, k);
        if (!o || (in_list(RUNTIME_KEYS, o->name) && strcmp(o->name, "threads") && strcmp(o->name, "log-every") &&
                   strcmp(o->name, "precision")))
            return db_err_set(err, DB_EUSAGE, "%s: unknown or not configurable key '%s'", path, k);
        if (o->given > 0)
            continue;
        if (opt_set(o, v, path, err))
            return -1;
        o->given = -1;
    }
    return 0;
}

/* The run's configuration: every option but the runtime ones. */
static json_t *config_json(const db_opt *t)
{
    json_t *j = json_object();
    for (; j && t->name; t++)
        if (!in_list(RUNTIME_KEYS, t->name))
            json_object_set_new(j, t->name, opt_json(t));
    return j;
}

/* Take a resumed run's configuration: an option given now that differs from
 * the run's is refused unless resumable. */
static int apply_resumed(db_opt *t, const json_t *cfg, const char *path, db_err *err)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)cfg, k, v)
    {
        db_opt *o = opt_find(t, k);
        if (!o || in_list(RUNTIME_KEYS, o->name))
            return db_err_set(err, DB_EFORMAT, "%s: unknown key '%s' (written by another version?)", path, k);
        if (o->given) {
            json_t *now = opt_json(o);
            int same = json_equal(now, v) || (json_is_number(now) && json_is_number(v) &&
                                              json_number_value(now) == json_number_value(v));
            json_decref(now);
            if (!same && !in_list(RESUMABLE_KEYS, o->name)) {
                char *was = json_dumps(v, JSON_ENCODE_ANY);
                db_err_set(err, DB_EUSAGE,
                           "--%s differs from the run being resumed (%s in %s): a resume continues the same run; "
                           "start a new one (-o) to change it",
                           o->name, was ? was : "?", path);
                free(was);
                return -1;
            }
            continue;
        }
        if (opt_set(o, v, path, err))
            return -1;
    }
    return 0;
}

/* ---- the run ---------------------------------------------------------------- */

typedef struct run {
    opts o;
    db_dist dist;               /* this process's place in a data-parallel job (rank 0 of 1 alone) */
    db_log lg;
    db_model m;
    int have_model;
    char hash[17];
    db_trainset inst, cls;
    int has_class;
    int32_t *inst_ids, *cls_ids; /* (n, T) token ids per record */
    int T;                      /* tokens per prompt */
    db_ctx *ctx;
    db_trainer *tr;
    json_t *config;             /* resolved configuration */
    char *run_dir;
    db_tfevents *ev;
    db_dbt_writer *rec;
    db_dbt_reader *rep;
    /* one micro-batch */
    int B, ni, C, h, w;
    size_t per;                 /* C*h*w */
    float *latents, *noise, *eps, *offset;
    int64_t *ts, *idx;
    int64_t step0;              /* the step we started (or resumed) at */
    db_vae *vae;                /* validation samples' decoder, loaded at the first one */
    char *last_ckpt;
    int async;                  /* --async-save resolved: checkpoints written by a background writer */
    db_ckpt_writer *writer;     /* the checkpoint being written in the background, or NULL */
    db_ckpt_stage *stage;       /* --async-save: the writers' host copies, kept for the run */
} run;

static int tokenize_all(run *r, const db_trainset *s, const char *override, int32_t **out, const char *what,
                        db_err *err)
{
    db_tokenizer *tok = NULL;
    char data_dir[4096];
    if (db_tokenizer_load_default(&tok, r->m.tokenizer_dir, db_data_dir(data_dir, sizeof data_dir), err))
        return -1;
    int rc = 0;
    *out = malloc(s->n * (size_t)r->T * sizeof **out);
    if (!*out)
        rc = db_err_set(err, DB_ENOMEM, "out of memory");
    for (size_t i = 0; !rc && i < s->n; i++) {
        const char *p = override ? override : s->prompt[i];
        if (!*p) {
            rc = db_err_set(err, DB_EUSAGE, "%s: record %zu has no %s; give --%s-prompt", s->source, i,
                            s->posterior ? "caption" : "prompt", what);
            break;
        }
        rc = db_tokenize(tok, p, r->T, *out + i * r->T, NULL, err);
    }
    db_tokenizer_free(tok);
    return rc;
}

/* Fill the micro-batch u's draws: from the seed, or from --replay. */
static int draw(run *r, uint64_t u, db_err *err)
{
    const opts *o = &r->o;
    const int B = r->B, ni = r->ni;
    if (r->rep) { /* the recorded draws of u, in the order --record wrote them */
        static const char *const names[] = {"index", "timesteps", "noise", "eps"};
        for (int q = 0; q < 4; q++) {
            db_dbt_record rc;
            int got;
            char want[64];
            snprintf(want, sizeof want, "%" PRIu64 "/%s", u, names[q]);
            for (;;) {
                got = db_dbt_next(r->rep, &rc, err);
                if (got != 1)
                    return got < 0 ? -1
                                   : db_err_set(err, DB_EFORMAT, "%s: ends before micro-batch %" PRIu64, o->replay, u);
                uint64_t ru = strtoull(rc.name, NULL, 10);
                if (ru >= u)
                    break; /* earlier ones: a resumed run skips them */
            }
            const size_t n = q < 2 ? (size_t)B : (size_t)B * r->per;
            const db_dtype dt = q < 2 ? DB_I64 : DB_F32;
            if (strcmp(rc.name, want) || rc.dtype != dt || rc.nbytes != n * db_dtype_size(dt))
                return db_err_set(err, DB_EFORMAT, "%s: record '%s' where '%s' (%zu %s) belongs", o->replay,
                                  rc.name, want, n, db_dtype_name(dt));
            void *dst = q == 0 ? (void *)r->idx : q == 1 ? (void *)r->ts : q == 2 ? (void *)r->noise : (void *)r->eps;
            memcpy(dst, rc.data, rc.nbytes);
        }
        for (int b = 0; b < B; b++) {
            const size_t lim = b < ni ? r->inst.n : r->cls.n;
            if (r->idx[b] < 0 || (size_t)r->idx[b] >= lim || r->ts[b] < 0 ||
                r->ts[b] >= db_trainer_num_timesteps(r->tr))
                return db_err_set(err, DB_EFORMAT, "%s: micro-batch %" PRIu64 " row %d: index or timestep out of "
                                  "range", o->replay, u, b);
        }
        return 0;
    }
    size_t *pi = malloc((size_t)ni * sizeof *pi), *pp = malloc((size_t)ni * sizeof *pp);
    if (!pi || !pp) {
        free(pi), free(pp);
        return db_err_set(err, DB_ENOMEM, "out of memory");
    }
    int rc = db_train_pick((uint64_t)o->seed, u, ni, r->inst.n, r->has_class ? r->cls.n : 0, pi, pp, err);
    for (int b = 0; !rc && b < ni; b++) {
        r->idx[b] = (int64_t)pi[b];
        if (r->has_class)
            r->idx[ni + b] = (int64_t)pp[b];
    }
    free(pi), free(pp);
    if (rc)
        return -1;
    const int T = db_trainer_num_timesteps(r->tr);
    for (int b = 0; b < B; b++)
        r->ts[b] = db_train_timestep((uint64_t)o->seed, u, b, T);
    db_train_noise((uint64_t)o->seed, u, B, r->C, r->per, r->noise, r->eps, o->offset_noise > 0 ? r->offset : NULL);
    if (o->offset_noise > 0) /* diffusers: noise + offset * randn(B, C, 1, 1) */
        for (int b = 0; b < B; b++)
            for (int c = 0; c < r->C; c++) {
                const float a = (float)o->offset_noise * r->offset[b * r->C + c];
                float *p = r->noise + ((size_t)b * r->C + c) * r->h * r->w;
                for (int k = 0; k < r->h * r->w; k++)
                    p[k] = p[k] + a;
            }
    return 0;
}

static int record_draws(run *r, uint64_t u, db_err *err)
{
    const int64_t sb[1] = {r->B}, sl[4] = {r->B, r->C, r->h, r->w};
    char name[64];
    snprintf(name, sizeof name, "%" PRIu64 "/index", u);
    if (db_dbt_write_record(r->rec, name, DB_I64, 1, sb, r->idx, NULL, 0, err))
        return -1;
    snprintf(name, sizeof name, "%" PRIu64 "/timesteps", u);
    if (db_dbt_write_record(r->rec, name, DB_I64, 1, sb, r->ts, NULL, 0, err))
        return -1;
    snprintf(name, sizeof name, "%" PRIu64 "/noise", u);
    if (db_dbt_write_record(r->rec, name, DB_F32, 4, sl, r->noise, NULL, 0, err))
        return -1;
    snprintf(name, sizeof name, "%" PRIu64 "/eps", u);
    return db_dbt_write_record(r->rec, name, DB_F32, 4, sl, r->eps, NULL, 0, err);
}

/* One micro-batch: draws -> latents -> the trainer. */
static int micro_batch(run *r, uint64_t u, db_train_stats *s, db_err *err)
{
    if (draw(r, u, err) || (r->rec && record_draws(r, u, err)))
        return -1;
    const float sf = (float)r->m.arch.vae.scaling_factor;
    int32_t *ids = malloc((size_t)r->B * r->T * sizeof *ids);
    if (!ids)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    for (int b = 0; b < r->B; b++) {
        const db_trainset *s_ = b < r->ni ? &r->inst : &r->cls;
        const int32_t *tok = (b < r->ni ? r->inst_ids : r->cls_ids) + (size_t)r->idx[b] * r->T;
        memcpy(ids + (size_t)b * r->T, tok, (size_t)r->T * sizeof *ids);
        const float *src = s_->data + (size_t)r->idx[b] * db_trainset_record_floats(s_);
        float *dst = r->latents + (size_t)b * r->per;
        if (s_->posterior)
            db_train_posterior_sample(dst, src, src + r->per, r->eps + (size_t)b * r->per, r->per, sf);
        else
            memcpy(dst, src, r->per * sizeof(float));
    }
    db_train_batch bt = {.B = r->B, .n_inst = r->ni, .C = r->C, .H = r->h, .W = r->w, .T = r->T,
                         .latents = r->latents, .noise = r->noise, .timesteps = r->ts, .ids = ids};
    int rc = db_trainer_accumulate(r->tr, &bt, s, err);
    free(ids);
    return rc;
}

/* Are all of w's values finite (w may be NULL)?  On the weights' device:
 * their sum of squares (in double, which no float32 values overflow) is
 * finite exactly when they all are. */
static int all_finite(db_ctx *c, const db_weights *w)
{
    double q = 0;
    return !w || (db_opt_sumsq(c, &q, w->data, w->numel) == 0 && isfinite(q));
}

/* A checkpoint is complete (written, or its background write joined): log
 * it, keep its path for messages, apply --keep-last. */
static void saved(run *r, char *path)
{
    db_info(&r->lg, "saved %s", path);
    free(r->last_ckpt);
    r->last_ckpt = path;
    db_train_ckpt_prune(r->run_dir, (int)r->o.keep_last, &r->lg);
}

/* Wait for the checkpoint being written in the background, if any. */
static int join_writer(run *r, db_err *err)
{
    db_ckpt_writer *w = r->writer;
    r->writer = NULL;
    char *path = NULL;
    if (db_ckpt_writer_join(w, &path, err))
        return -1;
    if (path)
        saved(r, path);
    return 0;
}

/* The newest complete checkpoint, for messages after a failure (a
 * background write is waited for: it may be the one). */
static const char *last_good(run *r)
{
    db_err e = {0};
    if (join_writer(r, &e))
        db_error(&r->lg, "%s", e.msg);
    return r->last_ckpt;
}

static int save(run *r, const db_train_stats *s, db_err *err)
{
    db_train_state st;
    db_trainer_state(r->tr, &st);
    /* a step can overflow the weights while its loss was finite: such a
     * state is no checkpoint (the next step would call it diverged) */
    if (!all_finite(r->ctx, st.unet) || !all_finite(r->ctx, st.text)) {
        const char *last = last_good(r);
        return db_err_set(err, DB_ENUMERIC, "step %" PRId64 ": the weights are no longer finite: training diverged%s%s",
                          st.step, last ? "; the last checkpoint is " : "; no checkpoint was written",
                          last ? last : "");
    }
    char *abs = realpath(r->o.model, NULL); /* db-ckpt export finds the base from any directory */
    json_t *state = json_pack("{s:s, s:s, s:{s:f, s:f, s:f, s:f}, s:f, s:{s:s, s:I, s:I}, s:{s:I, s:I, s:I}}",
                              "base_model", abs ? abs : r->o.model, "tool", "db-train " DB_VERSION, "loss", "loss", s->loss,
                              "loss_instance", s->loss_instance, "loss_prior", s->loss_prior, "grad_norm",
                              s->grad_norm, "lr", s->lr, "rng", "scheme", "philox-counter (trainset.h)", "seed",
                              (json_int_t)r->o.seed, "micro_batches",
                              (json_int_t)(st.step * r->o.grad_accum * r->dist.world), "data", "instance_records",
                              (json_int_t)r->inst.n, "class_records", (json_int_t)(r->has_class ? r->cls.n : 0),
                              "examples_seen", (json_int_t)(st.step * r->o.grad_accum * r->o.batch * r->dist.world));
    if (state) {
        json_object_set_new(state, "processes", json_integer(r->dist.world));
        /* of the steps since the run (re)started: a resume may change it */
        json_object_set_new(state, "precision", json_string(db_precision_name(r->ctx->precision)));
    }
    free(abs);
    if (!state)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    char *path = NULL;
    int rc;
    if (r->async) { /* the previous write first (one at a time), then this one in the background */
        rc = join_writer(r, err) ||
             db_ckpt_writer_start(&r->writer, r->run_dir, &st, r->hash, state, r->config, r->stage, err);
        if (rc == 0)
            db_debug(&r->lg, "writing the checkpoint of step %" PRId64 " in the background%s", st.step,
                     r->stage && db_ckpt_stage_pinned(r->stage) ? " (its copy in pinned memory)" : "");
    } else if ((rc = db_train_ckpt_save(r->run_dir, &st, r->hash, state, r->config, &path, err)) == 0)
        saved(r, path);
    json_decref(state);
    if (rc)
        return -1;
    if (r->ev && db_tfevents_flush(r->ev, err))
        return -1;
    return 0;
}

/* Peak resident memory of this process so far, bytes. */
static size_t peak_rss(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) ? 0 : (size_t)ru.ru_maxrss * 1024;
}

/* Current resident memory, bytes (/proc/self/statm). */
static size_t current_rss(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long sz = 0, res = 0;
    if (f) {
        if (fscanf(f, "%lu %lu", &sz, &res) != 2)
            res = 0;
        fclose(f);
    }
    return (size_t)res * (size_t)sysconf(_SC_PAGESIZE);
}

/* The optimizer state, tensor by tensor (8-bit AdamW keeps float32
 * moments under 4096 elements, as the trainer does). */
static size_t optim_bytes(const run *r, db_optim_kind *kind)
{
    db_optim_kind ok = DB_OPTIM_ADAMW;
    db_optim_parse(r->o.optimizer, &ok);
    if (kind)
        *kind = ok;
    return db_tentries_optim_bytes(r->m.t.v, r->m.t.n, DB_COMP_UNET, ok) +
           (r->o.train_text ? db_tentries_optim_bytes(r->m.t.v, r->m.t.n, DB_COMP_TEXT, ok) : 0);
}

/* The device memory of this configuration in compute precision prec (on a
 * GPU: --plan's device figures, and the check before the weights load). */
static size_t device_plan(const run *r, int lh, int lw, int prec, db_train_device_plan *d)
{
    const db_arch *a = &r->m.arch;
    db_unet_train_device_plan(a, r->B, lh, lw, r->T, r->o.train_text, r->o.grad_ckpt, r->o.fused, !r->o.no_graph,
                              (db_precision)prec, d);
    if (r->o.val_prompt && *r->o.val_prompt)
        db_unet_validation_device_plan(a, lh, lw, !r->o.no_graph, (db_precision)prec, d);
    /* the optimizer's state as this run keeps it (8-bit moments: adam) */
    const size_t adam = optim_bytes(r, NULL);
    d->total = d->total - d->moments + adam;
    d->moments = adam;
    return d->total;
}

/* On a GPU, before the weights go there: the plan's device peak against
 * the memory the device has free now.  A warning naming what would lower
 * it, not an error: a plan is an estimate (1-5 % above the peaks measured
 * so far), and the run may still fit. */
static void preflight(run *r, const char *dev, int prec)
{
    db_mem_stats ms;
    db_ctx_mem_stats(r->ctx, &ms);
    if (!ms.device_free)
        return;
    db_train_device_plan d;
    const double MB = 1048576.0, need = (double)device_plan(r, r->h, r->w, prec, &d);
    if (need <= (double)ms.device_free) {
        db_info(&r->lg, "%s: predicted device peak %.0f MiB, %.0f MiB free (of %.0f)", dev, need / MB,
                ms.device_free / MB, ms.device_total / MB);
        return;
    }
    char tips[200] = "";
    if (!r->o.grad_ckpt)
        strcat(tips, ", --gradient-checkpointing");
    if (!r->o.fused && r->dist.world == 1 && r->o.grad_accum == 1 && prec != DB_PREC_F16)
        strcat(tips, ", --fused-backward");
    db_optim_kind ok = DB_OPTIM_ADAMW;
    db_optim_parse(r->o.optimizer, &ok);
    if (ok != DB_OPTIM_ADAMW8BIT)
        strcat(tips, ", --optimizer adamw8bit");
    if (prec == DB_PREC_F32)
        strcat(tips, ", --precision bf16");
    db_warn(&r->lg, "%s: the predicted device peak, %.0f MiB, is more than the %.0f MiB free (of %.0f): the run may "
            "run out of memory (--plan itemises it%s%s)",
            dev, need / MB, ms.device_free / MB, ms.device_total / MB, *tips ? "; lower it with" : "",
            *tips ? tips + 1 : "");
}

/* --plan: the memory this configuration needs, from the architecture alone. */
static void plan(run *r, int lh, int lw)
{
    const db_arch *a = &r->m.arch;
    db_comp_stats su, st;
    db_model_stats(&r->m, DB_COMP_UNET, &su);
    db_model_stats(&r->m, DB_COMP_TEXT, &st);
    const double MB = 1048576.0;
    const int B = r->B, T = r->T;
    const size_t pu = (size_t)su.params * 4, pt = (size_t)st.params * 4;
    /* the gradient buffers, or the fused backward's window (the largest unit) */
    size_t grads = pu + (r->o.train_text ? pt : 0);
    if (r->o.fused) {
        const size_t wu = db_tentries_window_floats(r->m.t.v, r->m.t.n, DB_COMP_UNET);
        const size_t wt = r->o.train_text ? db_tentries_window_floats(r->m.t.v, r->m.t.n, DB_COMP_TEXT) : 0;
        grads = 4 * (wu > wt ? wu : wt);
    }
    db_optim_kind ok;
    const size_t adam = optim_bytes(r, &ok);
    const size_t act = db_unet_train_bytes_arch(&a->unet, B, lh, lw, T, r->o.grad_ckpt);
    const size_t act_full = db_unet_train_bytes_arch(&a->unet, B, lh, lw, T, 0);
    const size_t act_ck = db_unet_train_bytes_arch(&a->unet, B, lh, lw, T, 1);
    const size_t N = (size_t)B * T, D = (size_t)a->text.hidden;
    const size_t clip_act = db_clip_workspace_bytes(&a->text, N, r->o.train_text);
    const size_t per = (size_t)a->unet.in_channels * lh * lw;
    const size_t data = 4 * (r->inst.n * 2 * per + (r->has_class ? r->cls.n * db_trainset_record_floats(&r->cls) : 0));
    const size_t bufs = 4 * ((size_t)B * per * 9 + 2 * N * D);
    /* the program, its libraries and the tokenizer's heap, as loaded now
     * (the training data is resident already: counted once, below) */
    const size_t rss = current_rss(), base = rss > data ? rss - data : 0;
    /* --async-save: a host copy of what a checkpoint holds while it is written */
    const size_t ckcopy = r->async ? pu + (r->o.train_text ? pt : 0) + adam : 0;
    /* --validation-prompt: the VAE (kept from the first validation on), its
     * decode workspace, the sampler's buffers and the image; the UNet and
     * the text encoder sample through the training workspaces */
    const size_t val = r->o.val_prompt && *r->o.val_prompt ? db_unet_validation_host_bytes(a, lh, lw) : 0;
    const size_t total = base + pu + pt + grads + adam + act + clip_act + data + bufs + ckcopy + val;
    printf("memory plan: %d rows (batch %lld x %s), %dx%d latents, %d tokens, text encoder %s, gradient "
           "checkpointing %s%s\n",
           B, (long long)r->o.batch, r->has_class ? "instance + class" : "instance", lh, lw, T,
           r->o.train_text ? "trained" : "frozen", r->o.grad_ckpt ? "on" : "off",
           r->o.fused ? ", fused backward" : "");
    if (strcmp(r->o.device, "cpu") != 0) {
        /* On a GPU the weights, gradients, moments and workspaces live in
         * device memory (db_unet_train_device_plan); the host keeps the
         * program, the data, the staging copies of the batch, and for a
         * moment while loading one component's fp32 weights (the staging
         * buffer of db_weights_load_ctx). */
        db_train_device_plan d;
        const int prec = db_precision_parse(r->o.precision) > 0 ? db_precision_parse(r->o.precision) : DB_PREC_F32;
        device_plan(r, lh, lw, prec, &d);
        const size_t stage = pu > pt ? pu : pt, host = base + (stage > ckcopy ? stage : ckcopy) + data + bufs;
        printf("  host\n");
        printf("  %-34s %10.1f MiB\n", "program, libraries, tokenizer", base / MB);
        printf("  %-34s %10.1f MiB\n", "weights staging (while loading)", stage / MB);
        if (ckcopy) /* not at the same time as the staging: the larger counts */
            printf("  %-34s %10.1f MiB\n", "checkpoint copy (--async-save)", ckcopy / MB);
        printf("  %-34s %10.1f MiB\n", "training data", data / MB);
        printf("  %-34s %10.1f MiB\n", "batch buffers", bufs / MB);
        printf("  %-34s %10.1f MiB\n", "predicted peak", host / MB);
        printf("  device %s\n", r->o.device);
        printf("  %-34s %10.1f MiB\n", "weights (UNet + text encoder, fp32)", d.weights / MB);
        printf("  %-34s %10.1f MiB\n", r->o.fused ? "gradient window (fused backward)" : "gradients",
               d.grads / MB);
        printf("  %-34s %10.1f MiB\n", ok == DB_OPTIM_ADAMW8BIT ? "AdamW moments (8-bit)" : "AdamW moments",
               d.moments / MB);
        printf("  %-34s %10.1f MiB\n", "UNet activations + gradients", d.unet_act / MB);
        printf("  %-34s %10.1f MiB\n", "text encoder activations", d.text_act / MB);
        printf("  %-34s %10.1f MiB\n", "batch buffers", d.batch / MB);
        printf("  %-34s %10.1f MiB\n", "cuDNN workspace allowance", d.conv_ws / MB);
        if (prec != DB_PREC_F32) {
            printf("  %-34s %10.1f MiB\n", "weights' 16-bit working copy", d.shadow / MB);
            printf("  %-34s %10.1f MiB\n", "16-bit conversion scratch", d.convert / MB);
        }
        printf("  %-34s %10.1f MiB\n", "allocator rounding", d.rounding / MB);
        if (d.graphs)
            printf("  %-34s %10.1f MiB\n", "CUDA graphs' temporaries", d.graphs / MB);
        if (d.validation)
            printf("  %-34s %10.1f MiB\n", "validation samples (VAE, sampler)", d.validation / MB);
        printf("  %-34s %10.1f MiB  (%s)\n", "predicted device peak", d.total / MB,
               db_precision_name((db_precision)prec));
        return;
    }
    printf("  %-34s %10.1f MiB\n", "program, libraries, tokenizer", base / MB);
    printf("  %-34s %10.1f MiB\n", "weights (UNet + text encoder, fp32)", (pu + pt) / MB);
    printf("  %-34s %10.1f MiB\n", r->o.fused ? "gradient window (fused backward)" : "gradients", grads / MB);
    printf("  %-34s %10.1f MiB\n", ok == DB_OPTIM_ADAMW8BIT ? "AdamW moments (8-bit)" : "AdamW moments", adam / MB);
    printf("  %-34s %10.1f MiB  (%.1f MiB %s checkpointing)\n", "UNet activations + gradients", act / MB,
           (r->o.grad_ckpt ? act_full : act_ck) / MB, r->o.grad_ckpt ? "without" : "with");
    printf("  %-34s %10.1f MiB\n", "text encoder activations", clip_act / MB);
    printf("  %-34s %10.1f MiB\n", "training data", data / MB);
    printf("  %-34s %10.1f MiB\n", "batch buffers", bufs / MB);
    if (ckcopy)
        printf("  %-34s %10.1f MiB\n", "checkpoint copy (--async-save)", ckcopy / MB);
    if (val)
        printf("  %-34s %10.1f MiB\n", "validation samples (VAE, sampler)", val / MB);
    printf("  %-34s %10.1f MiB\n", "predicted peak", total / MB);
}

/* Validation samples of the weights as they are at `step`: the trained UNet
 * and text encoder sample --validation-prompt (seeds 0..n-1 of noise
 * stream i, as db-sample --seed 0 -n n), the VAE decodes, and each image
 * goes to RUN_DIR/samples/step-NNNNNN-K.png and to TensorBoard as
 * validation/K. */
static int validate(run *r, int64_t step, db_err *err)
{
    const opts *o = &r->o;
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/samples", r->run_dir);
    if (mkdir(dir, 0777) && errno != EEXIST)
        return db_err_errno(err, dir);
    db_unet *u = db_trainer_unet(r->tr);
    db_sd sd;
    memset(&sd, 0, sizeof sd);
    sd.ctx = r->ctx;
    sd.model = r->m; /* read only: the scheduler config, the architecture, the VAE's tensors */
    sd.threads = (int)o->threads;
    sd.keep_models = 1;
    sd.borrowed = 1;
    sd.clip = db_trainer_clip(r->tr);
    sd.unet = u;
    sd.vae = r->vae;
    db_txt2img_opts to;
    memset(&to, 0, sizeof to);
    to.prompt = o->val_prompt;
    to.negative = "";
    to.scheduler = o->val_sched;
    to.steps = (int)o->val_steps;
    to.guidance = o->val_guidance;
    to.width = r->w * 8;
    to.height = r->h * 8;
    to.n_images = (int)o->val_images;
    to.batch = 1;
    to.seed = 0;
    to.clip_skip = 1;
    to.no_graph = o->no_graph;
    to.log = &r->lg;
    db_txt2img_out out;
    memset(&out, 0, sizeof out);
    db_unet_keep_activations(u, 0); /* inference workspace while sampling */
    int rc = db_txt2img(&sd, &to, 1, 0, &out, err);
    db_unet_keep_activations(u, 1);
    r->vae = sd.vae;
    if (sd.tok)
        db_tokenizer_free(sd.tok);
    const int W = to.width, H = to.height;
    uint8_t *rgb = rc ? NULL : malloc((size_t)W * H * 3);
    if (!rc && !rgb)
        rc = db_err_set(err, DB_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < to.n_images; i++) {
        db_image_to_rgb8(rgb, out.images + (size_t)i * 3 * W * H, H, W);
        snprintf(path, sizeof path, "%s/step-%06" PRId64 "-%d.png", dir, step, i);
        char params[1024];
        snprintf(params, sizeof params, "%s\nSteps: %d, Sampler: %s, CFG scale: %g, Seed: 0, Size: %dx%d, "
                 "Training step: %" PRId64, o->val_prompt, to.steps, to.scheduler, to.guidance, W, H, step);
        const char *text[] = {"parameters", params, "Software", "dreambooth-c db-train " DB_VERSION, NULL};
        char *png = NULL;
        size_t n = 0;
        char tag[32];
        snprintf(tag, sizeof tag, "validation/%d", i);
        rc = db_png_write(path, rgb, W, H, text, err) || db_read_file(path, (size_t)1 << 30, &png, &n, err) ||
             (r->ev && db_tfevents_image(r->ev, tag, step, db_tfevents_now(), (const uint8_t *)png, n, H, W, 3, err));
        free(png);
    }
    free(rgb);
    db_txt2img_out_free(&out);
    if (!rc)
        db_info(&r->lg, "validation samples of step %" PRId64 " in %s", step, dir);
    return rc ? db_err_prefix(err, "validation samples") : 0;
}

/* the trainer's reductions: gradients live on the run's device, loss sums on the host */
static int reduce_f32(void *u, float *x, size_t n, db_err *err)
{
    run *r = u;
    return db_dist_sum_dev(&r->dist, r->ctx, x, n, err);
}
static int reduce_f64(void *u, double *x, size_t n, db_err *err) { return db_dist_sum_f64(&((run *)u)->dist, x, n, err); }
/* bucketed: each unit's sum begun in the backward (NCCL: overlapping it), waited for before the clip */
static int reduce_f32_start(void *u, float *x, size_t n, db_err *err)
{
    run *r = u;
    return db_dist_sum_dev_start(&r->dist, r->ctx, x, n, err);
}
static int reduce_wait(void *u, db_err *err)
{
    run *r = u;
    return db_dist_wait(&r->dist, r->ctx, err);
}

int main(int argc, char **argv)
{
    watch_signals(); /* first: before any library starts a thread */
    run R;
    memset(&R, 0, sizeof R);
    run *r = &R;
    opts *o = &r->o;
    r->lg = (db_log){"db-train", DB_LOG_WARN};
    o->steps = 800, o->lr = 1e-6, o->prior_weight = 1.0, o->lr_schedule = "constant", o->batch = 1;
    o->grad_accum = 1, o->save_every = 500, o->max_grad_norm = 1.0, o->b1 = 0.9, o->b2 = 0.999, o->wd = 1e-2;
    o->eps = 1e-8, o->text_lr = -1, o->device = "cpu", o->optimizer = "adamw", o->async_save = "auto";
    o->precision = "fp32";
    o->val_images = 2, o->val_steps = 25, o->val_guidance = 7.5, o->val_sched = "ddim";
    db_opt t[] = {
        {"model", 'm', DB_OPT_STR, "MODEL", "base checkpoint: diffusers folder, .safetensors or .ckpt", &o->model,
         NULL, 0},
        {"model-config", 0, DB_OPT_STR, "DIR", "diffusers-style config folder for a single-file model",
         &o->model_config, NULL, 0},
        {"instance", 'i', DB_OPT_STR, "STREAM", "db-prep's instance latents (file, - or ZeroMQ endpoint)",
         &o->instance, NULL, 0},
        {"class", 'c', DB_OPT_STR, "STREAM", "class latents: db-prior's samples or db-prep'd class photos",
         &o->klass, NULL, 0},
        {"instance-prompt", 0, DB_OPT_STR, "P", "prompt of every instance record (default: its caption)",
         &o->instance_prompt, NULL, 0},
        {"class-prompt", 0, DB_OPT_STR, "Q", "prompt of every class record (default: its own)", &o->class_prompt,
         NULL, 0},
        {"prior-weight", 0, DB_OPT_FLOAT, "X", "weight of the class-prior loss", &o->prior_weight, "1.0", 0},
        {"steps", 0, DB_OPT_INT, "N", "optimizer steps", &o->steps, "800", 0},
        {"lr", 0, DB_OPT_FLOAT, "X", "learning rate", &o->lr, "1e-6", 0},
        {"lr-schedule", 0, DB_OPT_STR, "NAME",
         "constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial", &o->lr_schedule,
         "constant", 0},
        {"warmup", 0, DB_OPT_INT, "N", "warm-up steps of the schedule", &o->warmup, "0", 0},
        {"batch", 0, DB_OPT_INT, "B", "instance examples per micro-batch (and as many class examples)", &o->batch,
         "1", 0},
        {"grad-accum", 0, DB_OPT_INT, "K", "micro-batches per optimizer step", &o->grad_accum, "1", 0},
        {"train-text-encoder", 0, DB_OPT_FLAG, NULL, "train the text encoder too", &o->train_text, NULL, 0},
        {"text-encoder-lr", 0, DB_OPT_FLOAT, "X", "its learning rate (default: --lr)", &o->text_lr, NULL, 0},
        {"gradient-checkpointing", 0, DB_OPT_FLAG, NULL, "recompute UNet block activations in the backward",
         &o->grad_ckpt, NULL, 0},
        {"fused-backward", 0, DB_OPT_FLAG, NULL, "step the optimizer block by block inside the backward: no "
         "gradient buffers (SD1.5: 3.3 GiB less, 3.7 with the text encoder), clipping per tensor; needs "
         "--grad-accum 1 and no fp16", &o->fused, NULL, 0},
        {"no-graph", 0, DB_OPT_FLAG, NULL, "on a GPU, launch the UNet's kernels one by one instead of replaying "
         "its forward and backward (and the sample previews' steps) as CUDA graphs (same results; ~450 MiB less "
         "for SD1.5; for debugging)",
         &o->no_graph, NULL, 0},
        {"offset-noise", 0, DB_OPT_FLOAT, "X", "add X * N(0,1) per image and channel to the noise (0: off)",
         &o->offset_noise, "0", 0},
        {"snr-gamma", 0, DB_OPT_FLOAT, "G", "min-SNR-gamma loss weighting (0: off; 5 is usual)", &o->snr_gamma,
         "0", 0},
        {"max-grad-norm", 0, DB_OPT_FLOAT, "X", "clip the global gradient norm (0: no clipping)",
         &o->max_grad_norm, "1.0", 0},
        {"adam-beta1", 0, DB_OPT_FLOAT, "X", "AdamW beta1", &o->b1, "0.9", 0},
        {"adam-beta2", 0, DB_OPT_FLOAT, "X", "AdamW beta2", &o->b2, "0.999", 0},
        {"adam-weight-decay", 0, DB_OPT_FLOAT, "X", "AdamW decoupled weight decay", &o->wd, "1e-2", 0},
        {"adam-eps", 0, DB_OPT_FLOAT, "X", "AdamW epsilon", &o->eps, "1e-8", 0},
        {"optimizer", 0, DB_OPT_STR, "NAME",
         "adamw, or adamw8bit (bitsandbytes' AdamW8bit: 8-bit block-wise moments, ~2 instead of 8 bytes per "
         "parameter)", &o->optimizer, "adamw", 0},
        {"seed", 's', DB_OPT_INT, "S", "seed of every random draw (data order, timesteps, noise)", &o->seed, "0",
         0},
        {"save-every", 0, DB_OPT_INT, "N", "checkpoint every N steps (0: only at the end)", &o->save_every, "500",
         0},
        {"keep-last", 0, DB_OPT_INT, "K", "keep only the newest K checkpoints (0: all)", &o->keep_last, "0", 0},
        {"validation-prompt", 0, DB_OPT_STR, "P", "sample P from the weights being trained (see --validation-every)",
         &o->val_prompt, NULL, 0},
        {"validation-every", 0, DB_OPT_INT, "N", "validation samples every N steps and at the end (0: only at the end)",
         &o->val_every, "0", 0},
        {"validation-images", 0, DB_OPT_INT, "N", "images per validation (seeds 0..N-1)", &o->val_images, "2", 0},
        {"validation-steps", 0, DB_OPT_INT, "N", "sampler steps of a validation image", &o->val_steps, "25", 0},
        {"validation-guidance", 0, DB_OPT_FLOAT, "X", "its classifier-free guidance scale", &o->val_guidance, "7.5",
         0},
        {"validation-scheduler", 0, DB_OPT_STR, "NAME", "its sampler (as db-sample --scheduler)", &o->val_sched,
         "ddim", 0},
        {"output", 'o', DB_OPT_STR, "RUN_DIR", "run directory: checkpoints, config.json, TensorBoard events",
         &o->output, NULL, 0},
        {"resume", 0, DB_OPT_STR, "PATH", "continue RUN_DIR (its newest checkpoint) or RUN_DIR/ckpt-N",
         &o->resume, NULL, 0},
        {"config", 0, DB_OPT_STR, "FILE", "JSON object of option names and values (the command line wins)",
         &o->config, NULL, 0},
        {"record", 0, DB_OPT_STR, "FILE", "write every micro-batch's random draws to FILE (.dbt)", &o->record,
         NULL, 0},
        {"replay", 0, DB_OPT_STR, "FILE", "take the draws from FILE (written by --record) instead of the seed",
         &o->replay, NULL, 0},
        {"plan", 0, DB_OPT_FLAG, NULL,
         "print the predicted peak memory and exit (a run on a GPU checks the device part against the free memory "
         "at start and warns when it is over)",
         &o->plan, NULL, 0},
        {"threads", 0, DB_OPT_INT, "N", "worker threads (0: all cores)", &o->threads, "0", 0},
        {"log-every", 0, DB_OPT_INT, "N", "a log line every N steps when stderr is not a terminal (0: auto)",
         &o->log_every, "0", 0},
        {"device", 0, DB_OPT_STR, "cpu|cuda[:N]", "compute device (cpu-strict: the CPU with a GPU's memory discipline, for tests)", &o->device, "cpu", 0},
        {"precision", 0, DB_OPT_STR, "fp32|bf16|fp16", "compute type of the matmuls, convolutions and attention "
         "(autocast; weights, gradients and AdamW stay fp32; fp16 adds dynamic loss scaling; on the CPU an "
         "emulation, slower); a resume may change it", &o->precision, "fp32", 0},
        {"async-save", 0, DB_OPT_STR, "auto|on|off", "write checkpoints in a background thread from a host copy "
         "(training goes on meanwhile; host memory the size of a checkpoint, taken at the start and kept, "
         "pinned on a GPU); auto: on for GPU devices",
         &o->async_save, "auto", 0},
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &o->quiet, NULL, 0},
        {"verbose", 'v', DB_OPT_FLAG, NULL, "more detail on stderr", &o->verbose, NULL, 0},
        {0},
    };
    db_cli cli = {"db-train",
                  "--model MODEL --instance STREAM [--class STREAM] [options] -o RUN_DIR\n"
                  "       db-train --resume RUN_DIR[/ckpt-N] [--steps N]",
                  "DreamBooth fine-tuning as diffusers' train_dreambooth.py computes it: per step, latents "
                  "sampled from each instance record's posterior (x scaling factor), noise, t ~ U{0..999}, "
                  "instance loss + prior-weight x class loss, global gradient clipping, AdamW. Every random "
                  "draw is a function of --seed and the step, so a resumed run is bit-identical to an "
                  "uninterrupted one. Checkpoints go to RUN_DIR/ckpt-NNNNNN (db-ckpt export makes a model of "
                  "one); SIGINT or SIGTERM saves one and exits with status 130.",
                  t, NULL};
    char *pos[argc + 1];
    int npos;
    db_err e = {0};
    if (db_dist_init(&r->dist, &argc, &argv, &e)) {
        db_error(&r->lg, "%s", e.msg);
        return 1;
    }
    int rc = db_cli_main(&cli, argc, argv, pos, &npos, &r->lg);
    if (rc >= 0) {
        db_dist_finish(&r->dist);
        return rc;
    }
    r->lg.level = o->quiet ? DB_LOG_QUIET : o->verbose ? DB_LOG_DEBUG : DB_LOG_INFO;
    const int lead = r->dist.rank == 0; /* only rank 0 writes the run directory and logs progress */
    if (!lead && r->lg.level > DB_LOG_WARN)
        r->lg.level = DB_LOG_WARN;
    int status = 1;
    json_t *cfg_file = NULL, *resumed_cfg = NULL, *resumed_state = NULL;
    char *ckpt = NULL;
    if (npos) {
        db_error(&r->lg, "unexpected argument '%s' (see --help)", pos[0]);
        return 2;
    }
    if (o->config) {
        if (!(cfg_file = db_json_load_object(o->config, &e)) || apply_config(t, cfg_file, o->config, &e)) {
            db_error(&r->lg, "%s", e.msg);
            json_decref(cfg_file);
            return 2;
        }
    }
    if (o->resume) {
        if (db_train_ckpt_is(o->resume)) {
            ckpt = strdup(o->resume);
        } else if (db_is_dir(o->resume)) {
            if (db_train_ckpt_latest(o->resume, &ckpt, NULL, &e)) {
                db_error(&r->lg, "%s", e.msg);
                goto out;
            }
            if (!ckpt) {
                db_error(&r->lg, "%s: no complete checkpoint to resume from", o->resume);
                goto out;
            }
        } else {
            db_error(&r->lg, "--resume %s: not a run directory or checkpoint", o->resume);
            goto out;
        }
        char *cp = db_path_join(ckpt, "config.json");
        resumed_cfg = cp ? db_json_load_object(cp, &e) : NULL;
        if (!resumed_cfg || apply_resumed(t, resumed_cfg, cp, &e)) {
            db_error(&r->lg, "%s", cp && e.code ? e.msg : "out of memory");
            free(cp);
            goto out;
        }
        free(cp);
        if (!o->output) { /* the checkpoint's run directory */
            char *d = strdup(ckpt), *sl = d ? strrchr(d, '/') : NULL;
            if (sl)
                *sl = 0;
            o->output = d && sl ? d : ".";
            r->run_dir = d;
        }
    }
    if (!o->model || !o->instance || (!o->output && !o->plan)) {
        db_error(&r->lg, "--model, --instance and -o are required (see --help)");
        status = 2;
        goto out;
    }
    if (db_device_check(o->device, &e)) {
        db_error(&r->lg, "%s", e.msg);
        status = 2;
        goto out;
    }
    const int prec = db_precision_parse(o->precision);
    if (prec < 0) {
        db_error(&r->lg, "--precision %s: unknown precision (fp32, bf16 or fp16)", o->precision);
        status = 2;
        goto out;
    }
    if (!strcmp(o->async_save, "on") || !strcmp(o->async_save, "off") || !strcmp(o->async_save, "auto"))
        r->async = !strcmp(o->async_save, "on") || (!strcmp(o->async_save, "auto") && strcmp(o->device, "cpu"));
    else {
        db_error(&r->lg, "--async-save %s: auto, on or off", o->async_save);
        status = 2;
        goto out;
    }
    db_lr_kind lk;
    if (db_lr_kind_parse(o->lr_schedule, &lk)) {
        db_error(&r->lg, "--lr-schedule %s: unknown (see --help)", o->lr_schedule);
        status = 2;
        goto out;
    }
    db_optim_kind optk;
    if (db_optim_parse(o->optimizer, &optk)) {
        db_error(&r->lg, "--optimizer %s: unknown (adamw or adamw8bit)", o->optimizer);
        status = 2;
        goto out;
    }
    if (lk == DB_LR_POLYNOMIAL) { /* diffusers refuses lr <= lr_end (1e-7): the schedule would be NaN */
        const db_lr_schedule ps = db_lr_schedule_make(lk, 1, 0, 1);
        if (!(o->lr > ps.lr_end) || (o->text_lr != -1 && !(o->text_lr > ps.lr_end))) {
            db_error(&r->lg, "--lr-schedule polynomial needs learning rates above its end value %g", ps.lr_end);
            status = 2;
            goto out;
        }
    }
    if (o->steps < 1 || o->batch < 1 || o->batch > 256 || o->grad_accum < 1 || o->grad_accum > 4096 ||
        o->save_every < 0 || o->keep_last < 0 || o->val_every < 0 || o->val_images < 1 || o->val_images > 64 ||
        o->val_steps < 1 || o->val_steps > 1000 || o->warmup < 0 || o->threads < 0 || !(o->lr > 0) ||
        !(o->prior_weight >= 0) || !(o->offset_noise >= 0) || !(o->snr_gamma >= 0) || !(o->max_grad_norm >= 0) ||
        !(o->b1 >= 0 && o->b1 < 1) || !(o->b2 >= 0 && o->b2 < 1) || !(o->eps > 0) || !(o->wd >= 0) ||
        (o->text_lr != -1 && !(o->text_lr > 0)) || o->log_every < 0) {
        db_error(&r->lg, "an option is out of range (steps, batch, grad-accum >= 1; lr, adam-eps > 0; betas in "
                         "[0, 1); the rest >= 0)");
        status = 2;
        goto out;
    }
    if (o->fused && (o->grad_accum != 1 || prec == DB_PREC_F16)) {
        db_error(&r->lg, "--fused-backward updates the weights inside the backward: it takes --grad-accum 1 (not "
                         "%lld) and no --precision fp16 (a step cannot be skipped once begun)",
                 (long long)o->grad_accum);
        status = 2;
        goto out;
    }
    if (o->record && o->replay) {
        db_error(&r->lg, "--record and --replay exclude each other");
        status = 2;
        goto out;
    }
    if (r->dist.world > 1 && (o->record || o->replay || o->plan)) {
        db_error(&r->lg, "--record, --replay and --plan take one process (this job has %d)", r->dist.world);
        status = 2;
        goto out;
    }
    if (r->dist.world > 1 && !o->threads) { /* share the cores among this host's processes */
        const char *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
        const long cores = sysconf(_SC_NPROCESSORS_ONLN), local = ls ? atol(ls) : r->dist.world;
        o->threads = cores / (local > 0 ? local : 1) > 0 ? cores / (local > 0 ? local : 1) : 1;
    }
    if (!r->run_dir && o->output && !(r->run_dir = strdup(o->output))) {
        db_error(&r->lg, "out of memory");
        goto out;
    }
    if (!o->resume && !o->plan && r->run_dir) { /* a new run must not overwrite an old one */
        char *latest = NULL;
        if (db_is_dir(r->run_dir) && db_train_ckpt_latest(r->run_dir, &latest, NULL, &e) == 0 && latest) {
            db_error(&r->lg, "%s already holds checkpoints (%s): use --resume %s, or another -o", r->run_dir, latest,
                     r->run_dir);
            free(latest);
            goto out;
        }
    }

    /* model and data */
    db_model_opts mo = {o->model_config, &r->lg};
    if (db_model_open(&r->m, o->model, &mo, &e)) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    r->have_model = 1;
    r->T = r->m.arch.text.max_positions;
    db_info(&r->lg, "hashing %s", o->model);
    if (db_model_hash(&r->m, r->hash, &e) || db_trainset_load(&r->inst, o->instance, 0, NULL, &e) ||
        (o->klass && db_trainset_load(&r->cls, o->klass, 1, NULL, &e))) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    r->has_class = o->klass != NULL;
    const db_trainset *sets[2] = {&r->inst, r->has_class ? &r->cls : NULL};
    for (int k = 0; k < 2 && sets[k]; k++) {
        const db_trainset *s = sets[k];
        if (s->hash[0] && strcmp(s->hash, r->hash) != 0) {
            db_error(&r->lg, "%s: latents made with another model (model_hash %s; %s is %s)", s->source, s->hash,
                     o->model, r->hash);
            goto out;
        }
        if (s->C != r->m.arch.unet.in_channels) {
            db_error(&r->lg, "%s: %d latent channels, the model's UNet takes %d", s->source, s->C,
                     r->m.arch.unet.in_channels);
            goto out;
        }
        if (s->scaling_factor && fabs(s->scaling_factor - r->m.arch.vae.scaling_factor) > 1e-6) {
            db_error(&r->lg, "%s: scaling factor %g, the model's is %g", s->source, s->scaling_factor,
                     r->m.arch.vae.scaling_factor);
            goto out;
        }
    }
    if (r->has_class && (r->cls.h != r->inst.h || r->cls.w != r->inst.w)) {
        db_error(&r->lg, "%s has %dx%d latents but %s has %dx%d: train at one size", o->klass, r->cls.h, r->cls.w,
                 o->instance, r->inst.h, r->inst.w);
        goto out;
    }
    const int mult = 1 << (r->m.arch.unet.nlevels - 1);
    if (r->inst.h % mult || r->inst.w % mult) {
        db_error(&r->lg, "%s: latents %dx%d are not multiples of %d", o->instance, r->inst.h, r->inst.w, mult);
        goto out;
    }
    r->ni = (int)o->batch;
    r->B = r->ni * (r->has_class ? 2 : 1);
    r->C = r->inst.C, r->h = r->inst.h, r->w = r->inst.w;
    r->per = (size_t)r->C * r->h * r->w;
    if (tokenize_all(r, &r->inst, o->instance_prompt, &r->inst_ids, "instance", &e) ||
        (r->has_class && tokenize_all(r, &r->cls, o->class_prompt, &r->cls_ids, "class", &e))) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    if (o->plan) { /* after tokenizing: the tokenizer's heap stays resident */
        plan(r, r->h, r->w);
        status = 0;
        goto out;
    }

    /* the trainer */
    db_train_opts to = db_train_opts_defaults(o->lr, o->steps);
    to.train_text = o->train_text;
    to.gradient_checkpointing = o->grad_ckpt;
    to.fused_backward = o->fused;
    to.no_graph = o->no_graph;
    to.log = &r->lg;
    to.prior_weight = o->prior_weight;
    to.snr_gamma = o->snr_gamma;
    to.max_grad_norm = o->max_grad_norm;
    to.grad_accum = (int)o->grad_accum;
    to.unet_hp = (db_adamw){.lr = o->lr, .beta1 = o->b1, .beta2 = o->b2, .eps = o->eps, .weight_decay = o->wd};
    to.text_hp = to.unet_hp;
    to.optimizer = optk;
    to.unet_lr = db_lr_schedule_make(lk, o->lr, o->warmup, o->steps);
    to.text_lr = db_lr_schedule_make(lk, o->text_lr > 0 ? o->text_lr : o->lr, o->warmup, o->steps);
    if (r->dist.world > 1) {
        to.world = r->dist.world;
        to.reduce_f32 = reduce_f32;
        to.reduce_f64 = reduce_f64;
        to.reduce_f32_start = reduce_f32_start;
        to.reduce_wait = reduce_wait;
        to.reduce_user = r;
    }
    /* several processes on "cuda": one GPU each, by their rank on the host */
    char devname[32];
    snprintf(devname, sizeof devname, "%s", o->device);
    if (r->dist.world > 1 && !strcmp(o->device, "cuda"))
        snprintf(devname, sizeof devname, "cuda:%d", db_dist_local_rank(&r->dist));
    const int ctx_rc = db_ctx_create_device(&r->ctx, devname, (int)o->threads, &e);
    if (ctx_rc == 0) { /* before the trainer: in fp16 it scales the loss */
        db_ctx_set_precision(r->ctx, (db_precision)prec);
        preflight(r, devname, prec);
    }
    if (ctx_rc || db_trainer_create(&r->tr, r->ctx, &r->m, &to, &e) || db_dist_bind(&r->dist, r->ctx, &e)) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    if (r->dist.world > 1)
        db_debug(&r->lg, "process %d of %d on %s, gradients summed over %s", r->dist.rank, r->dist.world, devname,
                 db_dist_transport(&r->dist, r->ctx));
    r->config = config_json(t);
    if (!r->config) {
        db_error(&r->lg, "out of memory");
        goto out;
    }
    if (ckpt) {
        db_train_state st;
        db_trainer_state(r->tr, &st);
        json_t *cc = NULL;
        if (db_train_ckpt_load(ckpt, &st, &resumed_state, &cc, &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
        json_decref(cc);
        const char *bh = json_string_value(json_object_get(resumed_state, "base_model_hash"));
        if (bh && strcmp(bh, r->hash) != 0) {
            db_error(&r->lg, "%s was trained from a model with hash %s; %s is %s", ckpt, bh, o->model, r->hash);
            goto out;
        }
        /* the draws index the records: other data would continue another run */
        json_t *dj = json_object_get(resumed_state, "data");
        const json_int_t ni = json_integer_value(json_object_get(dj, "instance_records"));
        const json_int_t nc = json_integer_value(json_object_get(dj, "class_records"));
        json_t *jp = json_object_get(resumed_state, "processes");
        const json_int_t np = jp ? json_integer_value(jp) : 1;
        if (np != r->dist.world) {
            db_error(&r->lg, "%s was trained by %lld processes, this job has %d: the draws of each step depend on "
                             "it, so resume with the same number",
                     ckpt, (long long)np, r->dist.world);
            goto out;
        }
        if (dj && (ni != (json_int_t)r->inst.n || nc != (json_int_t)(r->has_class ? r->cls.n : 0))) {
            db_error(&r->lg, "%s was trained on %lld instance and %lld class records; %s and %s hold %zu and %zu: "
                             "a resume must read the same data",
                     ckpt, (long long)ni, (long long)nc, o->instance, o->klass ? o->klass : "(no class stream)",
                     r->inst.n, r->has_class ? r->cls.n : 0);
            goto out;
        }
        r->step0 = json_integer_value(json_object_get(resumed_state, "step"));
        if (db_train_ckpt_restore_counters(resumed_state, r->tr, &e)) {
            db_error(&r->lg, "%s: %s", ckpt, e.msg);
            goto out;
        }
        db_info(&r->lg, "resuming %s at step %" PRId64, ckpt, r->step0);
    }
    if (r->step0 >= o->steps) {
        db_info(&r->lg, "%s is at step %" PRId64 " of %" PRId64 ": nothing to do", ckpt, r->step0, o->steps);
        status = 0;
        goto out;
    }
    if (lead && mkdir(r->run_dir, 0777) && errno != EEXIST) {
        db_error(&r->lg, "%s: %s", r->run_dir, strerror(errno));
        goto out;
    }
    if (lead)
        db_train_ckpt_prune(r->run_dir, 0, &r->lg); /* temporaries of an interrupted write */
    if (lead) {
        char *cp = db_path_join(r->run_dir, "config.json");
        db_outfile of;
        char *s = json_dumps(r->config, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
        int bad = !cp || !s || db_outfile_open(&of, cp, &e);
        if (!bad) {
            fputs(s, of.f);
            fputc('\n', of.f);
            bad = db_outfile_commit(&of, &e);
        }
        free(cp), free(s);
        if (bad) {
            db_error(&r->lg, "%s", e.code ? e.msg : "out of memory");
            goto out;
        }
    }
    if (lead && db_tfevents_open(&r->ev, r->run_dir, &e)) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    if (lead && r->async) { /* pinned (on a GPU) in the background while the first steps run */
        db_train_state st;
        db_trainer_state(r->tr, &st);
        if (db_ckpt_stage_start(&r->stage, r->ctx, db_ckpt_copy_bytes(&st), &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
    }
    if (o->record) {
        db_meta hm;
        db_meta_init(&hm);
        db_meta_put_str(&hm, "tool", "db-train " DB_VERSION);
        db_meta_put_str(&hm, "model_hash", r->hash);
        db_meta_put_int(&hm, "seed", o->seed);
        db_meta_put_int(&hm, "rows", r->B);
        db_meta_put_int(&hm, "instance_rows", r->ni);
        db_meta_put_int(&hm, "grad_accum", o->grad_accum);
        db_meta_put_int(&hm, "first_micro_batch", r->step0 * o->grad_accum);
        int bad = db_meta_finish(&hm, &e) || db_dbt_open_write(&r->rec, o->record, NULL, &e) ||
                  db_dbt_write_header(r->rec, "train-draws", hm.buf, hm.len, &e);
        db_meta_free(&hm);
        if (bad) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
    }
    if (o->replay && db_dbt_open_read(&r->rep, o->replay, NULL, &e)) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    const size_t nb = (size_t)r->B * r->per;
    r->latents = malloc(nb * sizeof(float));
    r->noise = malloc(nb * sizeof(float));
    r->eps = malloc(nb * sizeof(float));
    r->offset = malloc((size_t)r->B * r->C * sizeof(float));
    r->ts = malloc((size_t)r->B * sizeof *r->ts);
    r->idx = malloc((size_t)r->B * sizeof *r->idx);
    if (!r->latents || !r->noise || !r->eps || !r->offset || !r->ts || !r->idx) {
        db_error(&r->lg, "out of memory");
        goto out;
    }

    /* the loop */
    atomic_store(&g_training, 1); /* a signal now stops after the step (signal_watch) */
    const int tty = isatty(2) && r->lg.level >= DB_LOG_INFO;
    const int64_t every = o->log_every ? o->log_every : (o->steps >= 20 ? o->steps / 20 : 1);
    db_info(&r->lg, "training %" PRId64 " steps from step %" PRId64 ": %zu instance and %zu class records, %d rows of "
                    "%dx%d, %s", o->steps, r->step0, r->inst.n, r->has_class ? r->cls.n : 0, r->B, r->h, r->w,
            r->run_dir);
    if (r->ctx->precision != DB_PREC_F32)
        db_info(&r->lg, "compute precision %s%s%s", db_precision_name(r->ctx->precision),
                r->ctx->device == DB_CPU ? " (emulated on the CPU)" : "",
                r->ctx->precision == DB_PREC_F16 ? "; dynamic loss scaling" : "");
    db_train_stats s = {0};
    double t_start = db_tfevents_now(), t_flush = t_start;
    for (int64_t step = r->step0; step < o->steps; step++) {
        const double t0 = db_tfevents_now();
        for (int64_t k = 0; k < o->grad_accum; k++)
            /* micro-batch j = k * W + rank of the step's K * W: the job does
             * what one process with --grad-accum K * W does */
            if (micro_batch(r, (uint64_t)((step * o->grad_accum + k) * r->dist.world + r->dist.rank), NULL, &e)) {
                const char *last = last_good(r);
                db_error(&r->lg, "step %" PRId64 ": %s%s%s", step + 1, e.msg, last ? "; the last checkpoint is " : "",
                         last ? last : "");
                goto out;
            }
        if (db_trainer_apply(r->tr, &s, &e)) {
            const char *last = last_good(r);
            db_error(&r->lg, "step %" PRId64 ": %s%s%s", step + 1, e.msg, last ? "; the last checkpoint is " : "",
                     last ? last : "");
            goto out;
        }
        if (step == r->step0 && db_trainer_packed_grads(r->tr))
            db_info(&r->lg, "the UNet's %zu linear and convolution weight gradients are kept in bf16 (bf16 values "
                            "either way: the same numbers, fewer bytes)", db_trainer_packed_grads(r->tr));
        const double t1 = db_tfevents_now(), dt = t1 - t0;
        const struct {
            const char *tag;
            double v;
        } sc[] = {{"loss", s.loss},           {"loss_instance", s.loss_instance}, {"loss_prior", s.loss_prior},
                  {"lr", s.lr},               {"grad_norm", s.grad_norm},         {"step_time", dt},
                  {"lr_text", s.lr_text}};
        for (size_t q = 0; q < sizeof sc / sizeof *sc - (o->train_text ? 0 : 1); q++)
            if (r->ev && (q != 2 || r->has_class) &&
                db_tfevents_scalar(r->ev, sc[q].tag, s.step, t1, (float)sc[q].v, &e)) {
                db_error(&r->lg, "%s", e.msg);
                goto out;
            }
        if (r->ev && s.loss_scale > 0 && db_tfevents_scalar(r->ev, "loss_scale", s.step, t1, (float)s.loss_scale, &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
        if (s.skipped) /* not an error: GradScaler's way of finding the scale */
            db_info(&r->lg, "step %" PRId64 ": fp16 gradients overflowed at loss scale %g: update skipped, scale "
                            "halved", s.step, s.loss_scale);
        if (r->ev && t1 - t_flush > 30) {
            if (db_tfevents_flush(r->ev, &e)) {
                db_error(&r->lg, "%s", e.msg);
                goto out;
            }
            t_flush = t1;
        }
        if (tty)
            fprintf(stderr, "\rdb-train: step %" PRId64 "/%" PRId64 "  loss %.4f  lr %.3g  %.2f s/it   ", s.step,
                    o->steps, s.loss, s.lr, dt);
        else if (s.step % every == 0 || s.step == o->steps) {
            char ls[48] = "";
            if (s.loss_scale > 0)
                snprintf(ls, sizeof ls, "  loss scale %g", s.loss_scale);
            db_info(&r->lg, "step %" PRId64 "/%" PRId64 "  loss %.5f (instance %.5f, prior %.5f)  grad norm %.4g  "
                            "lr %.3g%s  %.2f s/it",
                    s.step, o->steps, s.loss, s.loss_instance, s.loss_prior, s.grad_norm, s.lr, ls, dt);
        }
        const int last = s.step == o->steps;
        int stop = atomic_load(&g_stop); /* every process stops after the same step */
        if (db_dist_max_int(&r->dist, &stop, &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
        if (last || (o->save_every && s.step % o->save_every == 0) || stop) {
            if (tty)
                fputc('\n', stderr);
            if (lead && save(r, &s, &e)) {
                db_error(&r->lg, "%s", e.msg);
                goto out;
            }
        }
        if (lead && o->val_prompt && (last || (o->val_every && s.step % o->val_every == 0)) &&
            validate(r, s.step, &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
        if (stop) {
            db_info(&r->lg, "stopped by signal %d after step %" PRId64 "; resume with --resume %s", stop,
                    s.step, r->run_dir);
            status = 130;
            goto out;
        }
    }
    if (r->rec) {
        db_dbt_writer *w = r->rec;
        r->rec = NULL;
        if (db_dbt_close(w, &e)) {
            db_error(&r->lg, "%s", e.msg);
            goto out;
        }
    }
    if (join_writer(r, &e)) {
        db_error(&r->lg, "%s", e.msg);
        goto out;
    }
    db_info(&r->lg, "done: %" PRId64 " steps in %.1f s, peak memory %.0f MiB; %s", o->steps - r->step0,
            db_tfevents_now() - t_start, peak_rss() / 1048576.0, r->last_ckpt ? r->last_ckpt : "");
    status = 0;
out:
    if (r->writer) { /* a checkpoint still being written (a signal's, or before an error): finish it */
        db_err e2 = {0};
        if (join_writer(r, &e2)) {
            db_error(&r->lg, "%s", e2.msg);
            if (status == 0 || status == 130)
                status = 1;
        }
    }
    if (status == 1)
        db_dist_abort(&r->dist, 1); /* the other processes would wait for this one forever */
    if (r->rec)
        db_dbt_abort(r->rec, "db-train stopped");
    if (r->rep)
        db_dbt_reader_close(r->rep);
    if (r->ev) {
        db_err e2 = {0};
        db_tfevents_close(r->ev, &e2);
    }
    db_ckpt_stage_free(r->stage); /* (every writer joined above) */
    db_trainer_free(r->tr);
    db_vae_free(r->vae);
    db_ctx_destroy(r->ctx);
    if (r->have_model)
        db_model_close(&r->m);
    db_trainset_free(&r->inst);
    db_trainset_free(&r->cls);
    free(r->inst_ids), free(r->cls_ids);
    free(r->latents), free(r->noise), free(r->eps), free(r->offset), free(r->ts), free(r->idx);
    free(r->last_ckpt);
    free(r->run_dir);
    free(ckpt);
    json_decref(r->config);
    json_decref(resumed_state);
    json_decref(resumed_cfg);
    json_decref(cfg_file);
    db_dist_finish(&r->dist);
    return status;
}
